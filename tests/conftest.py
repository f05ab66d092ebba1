"""The suite runs on the CPU (gloo, fp32) even on a GPU machine: its multi-rank tests start several ranks on one
host and compare them with CPU references. The CUDA paths are what bench/gpu_check.py (`make gpu-check`) checks;
tests/test_gpu_check.py runs it with the GPUs this machine was started with (ORIGINAL_CUDA_VISIBLE_DEVICES)."""
import os

ORIGINAL_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything imports torch: every test and subprocess sees no GPU
