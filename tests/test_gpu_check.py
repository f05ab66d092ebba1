"""bench/gpu_check.py: without CUDA it says so and exits 0; --smoke runs every check's code on the CPU at toy sizes
(the CUDA thresholds are for the GPU), so the script a user runs on a GPU machine is known to work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ORIGINAL_CUDA_VISIBLE_DEVICES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
# the machine's own GPUs (conftest hides them from the rest of the suite)
GPU_ENV = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
if ORIGINAL_CUDA_VISIBLE_DEVICES is not None:
    GPU_ENV["CUDA_VISIBLE_DEVICES"] = ORIGINAL_CUDA_VISIBLE_DEVICES
HAS_CUDA = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], env=GPU_ENV,
                          capture_output=True, text=True).stdout.strip() == "True"


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**(env or os.environ), "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="a CUDA machine runs the real check")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    r = _run("--out", str(tmp_path / "gpu.json"))
    assert r.returncode == 0 and "no CUDA device" in r.stdout
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_smoke_runs_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = _run("--smoke", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert set(checks) == {"bf16_step", "attention", "faiss", "features", "trainer", "throughput"}
    assert all("error" not in c for c in checks.values()), checks
    assert 0 < checks["bf16_step"]["loss_rel_diff"] < 0.02 and checks["bf16_step"]["backbone_grad_cosine"] > 0.9
    assert checks["trainer"]["resume_exact"] and len(checks["trainer"]["losses"]) == 6
    assert checks["faiss"]["assign_top1_agreement"] == 1.0  # both sides on the CPU here
    assert checks["throughput"]["images_per_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_check_passes_on_this_gpu(tmp_path):
    r = _run("--out", str(tmp_path / "gpu.json"), env=GPU_ENV)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
