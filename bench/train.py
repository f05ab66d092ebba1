"""Training-step throughput and peak memory of one device: backbone forward/backward + MLCD loss over PartialFC
+ both optimizers, on synthetic tensors (the loader is benched separately in bench/data.py).

GPU: vit_b16 at 224, 1M classes, r = 0.1, bf16 autocast, plus MFU (model FLOPs / H100 bf16 dense peak).
CPU: the demo's vit_tiny at 28 px, 100k classes, r = 0.1, fp32. Writes bench/results/train.json.

    python bench/train.py [--steps 10] [--batch 256]
"""
import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlcd import fileio  # noqa: E402
from mlcd.models import build_model  # noqa: E402
from mlcd.plan import vit_forward_flops  # noqa: E402
from mlcd.partial_fc import build_partial_fc  # noqa: E402
from mlcd.train.optim import build_backbone_optimizer, build_center_optimizer  # noqa: E402
from mlcd.train.step import train_step  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = ap.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    model_name, num_classes = ("vit_b16", 1_000_000) if gpu else ("vit_tiny", 100_000)
    model_cfg = OmegaConf.load(ROOT / "configs" / "train" / "model" / f"{model_name}.yaml")
    loss_cfg = OmegaConf.load(ROOT / "configs" / "train" / "loss" / "mlcd.yaml")
    optim_cfg = OmegaConf.load(ROOT / "configs" / "train" / "optim" / "adamw.yaml")
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    pfc = build_partial_fc(loss_cfg, num_classes, model.embed_dim, seed=0).to(device)
    opt = build_backbone_optimizer(model, optim_cfg)
    center_opt = build_center_optimizer(pfc, optim_cfg)
    images = torch.randn(args.batch, 3, model.image_size, model.image_size, device=device)
    labels = torch.randint(0, num_classes, (args.batch, 8), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)

    def step(i):  # the trainer's own step (mlcd/train/step.py): one micro-batch, global-norm clip at 1.0
        return train_step(model, pfc, opt, center_opt, iter([(images, labels)]), i, grad_accum=1, clip_grad=1.0,
                          autocast=autocast)

    for i in range(args.warmup):
        step(i)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)  # returns the loss as a Python float: the device is synchronised every step
    seconds = (time.perf_counter() - t0) / args.steps
    images_per_s = args.batch / seconds
    flops = 3 * vit_forward_flops(OmegaConf.to_container(model_cfg))  # forward + backward (2x) of the backbone
    result = {
        "bench": "train_step", "device": torch.cuda.get_device_name() if gpu else "cpu",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform()},
        "model": model_name, "image_size": model_cfg.image_size, "num_classes": num_classes,
        "sample_ratio": loss_cfg.sample_ratio, "batch_per_device": args.batch, "precision": "bf16" if gpu else "fp32",
        "steps_timed": args.steps, "step_seconds": seconds, "images_per_s": images_per_s,
        "backbone_tflops_per_s": flops * images_per_s / 1e12,
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if gpu
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if gpu:
        result["mfu_vs_h100_bf16_dense"] = result["backbone_tflops_per_s"] / H100_BF16_DENSE_TFLOPS
    fileio.write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
