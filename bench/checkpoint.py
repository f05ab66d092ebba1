"""What durable and asynchronous checkpoints cost, measured side by side: writes bench/results/checkpoint.json.

    python bench/checkpoint.py [--classes 1000000] [--dim 64] [--repeats 3] [--steps 40] [--every 10]
    python bench/checkpoint.py --small          a few seconds (tests/test_checkpoint_faults.py)

1. fsync: one checkpoint (a ViT-tiny backbone + AdamW and `classes` x `dim` centers with their two moments) saved
   with every fsync done, and with os.fsync replaced by a no-op (the page cache holds the data: what the save
   cost before durability), interleaved per repeat.
2. async stall: train.py on one rank (synthetic data, 1 torch thread, so the second core is free for a background
   writer as a GPU host's cores are) with that many classes, a checkpoint every `every` steps, run three ways in
   interleaved repeats: no checkpoint before the end, train.async_ckpt=false, train.async_ckpt=true. Per-step time
   comes from metrics.jsonl (log_every 1: a save's time falls in the window of the step after it). The stall of a
   run = its steps' total time minus (steps x its median step time), over the steps 2..N-1, per checkpoint; the
   no-checkpoint arm's value is the floor of this metric (noise).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mlcd import fileio  # noqa: E402
from mlcd.train import checkpoint  # noqa: E402

OUT = ROOT / "bench" / "results" / "checkpoint.json"
TINY = {"name": "vit_tiny", "image_size": 28, "patch_size": 7, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64,
        "pos_embed": "learned", "act": "gelu", "ln_eps": 1e-5}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def time_saves(a, work: Path) -> dict:
    """Seconds per synchronous save with and without fsync, interleaved."""
    from omegaconf import OmegaConf

    from mlcd.models import build_model
    from mlcd.partial_fc import PartialFC
    from mlcd.train.optim import SparseRowAdamW, build_backbone_optimizer

    model_cfg = {**TINY, "embed_dim": a.dim}
    model = build_model(OmegaConf.create(model_cfg))
    opt = build_backbone_optimizer(model, OmegaConf.create({"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98],
                                                            "eps": 1e-6}))
    model(torch.randn(2, 3, 28, 28)).embedding.sum().backward()
    opt.step()
    pfc = PartialFC(a.classes, a.dim, seed=0)
    center_opt = SparseRowAdamW(pfc.weight, lr=1e-3)
    manifest = {"num_classes": a.classes, "embed_dim": a.dim, "shards": pfc.shard_spec.to_dict(), "model": model_cfg}
    real_fsync, times, size = os.fsync, {"fsync": [], "no_fsync": []}, 0
    for r in range(a.repeats):
        for arm in ("fsync", "no_fsync"):
            root = work / f"save-{arm}-{r}"
            os.fsync = real_fsync if arm == "fsync" else (lambda fd: None)
            try:
                t0 = time.perf_counter()
                final = checkpoint.save(root, 1, model, opt, pfc, center_opt, {"counters": {}}, manifest, keep_last=1)
                times[arm].append(time.perf_counter() - t0)
            finally:
                os.fsync = real_fsync
            size = dir_bytes(final)
            shutil.rmtree(root)
        print(f"  save repeat {r}: fsync {times['fsync'][-1]:.2f} s, no fsync {times['no_fsync'][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"checkpoint_bytes": size, "seconds_all_repeats": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "seconds_median": {k: round(v, 3) for k, v in med.items()},
            "fsync_cost_s_per_checkpoint": round(med["fsync"] - med["no_fsync"], 3),
            "fsync_cost_ratio": round(med["fsync"] / med["no_fsync"], 2),
            "write_mb_per_s_with_fsync": round(size / 2**20 / med["fsync"], 1)}


def train_run(a, out: Path, arm: str) -> list[float]:
    """Per-step seconds of one train.py run (steps 1..N, from metrics.jsonl)."""
    every = a.steps if arm == "none" else a.every
    args = {"model": "vit_tiny", **{f"model.{k}": v for k, v in TINY.items() if k != "name"}, "model.embed_dim": a.dim,
            "data.source": "synthetic", "num_classes": a.classes, "out_dir": str(out), "seed": 0,
            "train.global_batch_size": 32, "train.total_steps": a.steps, "train.ckpt_every": every,
            "train.log_every": 1, "train.keep_last": 2, "train.progress_bar": False,
            "train.async_ckpt": arm == "async", "optim.warmup_steps": 1, "loss.sample_ratio": 0.1,
            "logging.wandb.mode": "disabled", "monitor.every": 0}
    cmd = [sys.executable, str(ROOT / "train.py"), *[f"{k}={v}" for k, v in args.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [32 / r["images_per_s"] for r in rows]


def stall_per_checkpoint(step_s: list[float], n_ckpt: int) -> float:
    inner = step_s[1:-1]  # step 1 pays the warm-up; after step N's save there is no window
    return (sum(inner) - len(inner) * statistics.median(inner)) / max(n_ckpt, 1)


def time_async(a, work: Path) -> dict:
    n_ckpt = len([s for s in range(a.every, a.steps, a.every)])  # saves whose cost lands in steps 2..N-1
    runs = {"none": [], "sync": [], "async": []}
    for r in range(a.repeats):
        for arm in runs:
            out = work / f"train-{arm}-{r}"
            step_s = train_run(a, out, arm)
            runs[arm].append({"stall_s_per_checkpoint": round(stall_per_checkpoint(step_s, n_ckpt), 3),
                              "median_step_s": round(statistics.median(step_s[1:-1]), 4),
                              "total_s_steps_2_to_n_minus_1": round(sum(step_s[1:-1]), 3)})
            if arm != "none":
                ckpt_bytes = dir_bytes(checkpoint.list_checkpoints(out / "checkpoints")[-1])
            shutil.rmtree(out)
            print(f"  train repeat {r} {arm}: stall {runs[arm][-1]['stall_s_per_checkpoint']:.3f} s/checkpoint, "
                  f"median step {runs[arm][-1]['median_step_s']:.4f} s", flush=True)
    med = {arm: statistics.median(x["stall_s_per_checkpoint"] for x in v) for arm, v in runs.items()}
    return {"checkpoints_measured_per_run": n_ckpt, "checkpoint_bytes": ckpt_bytes, "runs": runs,
            "stall_s_per_checkpoint_median": {k: round(v, 3) for k, v in med.items()},
            "async_vs_sync_stall_ratio": round(med["async"] / med["sync"], 3) if med["sync"] > 0 else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="tiny sizes, one repeat (tests)")
    ap.add_argument("--out", default=None, help=f"default {OUT.relative_to(ROOT)} (--small: a temp dir)")
    ap.add_argument("--work", default=None, help="scratch directory on the disk to measure (default: runs/)")
    a = ap.parse_args()
    if a.small:
        a.classes, a.dim, a.repeats, a.steps, a.every = 20_000, 16, 1, 8, 3
    work = Path(a.work or ROOT / "runs")
    work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=work))
    out = Path(a.out) if a.out else (work / "checkpoint.json" if a.small else OUT)
    torch.set_num_threads(1)
    try:
        print(f"fsync cost: {a.classes:,} x {a.dim} centers, {a.repeats} repeats", flush=True)
        saves = time_saves(a, work)
        print(f"async stall: {a.steps} steps, a checkpoint every {a.every}, {a.repeats} repeats", flush=True)
        stall = time_async(a, work)
    finally:
        if not a.small:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "checkpoint durability (fsync) and asynchronous saving (train.async_ckpt)",
        "settings": {"classes": a.classes, "dim": a.dim, "repeats": a.repeats, "steps": a.steps, "every": a.every,
                     "model": "vit_tiny (width 32, 2 layers)", "global_batch_size": 32, "ranks": 1,
                     "torch_threads": 1, "disk": str(work.parent)},
        "fsync": saves, "async": stall,
        "notes": "fsync arm: every file of the checkpoint fsynced before the manifest and the rename, the directory "
                 "after; no_fsync: os.fsync replaced by a no-op for the same save (the data stays in the page "
                 "cache). Stall = a run's total step time beyond steps x its own median step time, over steps "
                 "2..N-1, per checkpoint; the no-checkpoint arm gives the metric's floor. One rank, one torch "
                 "thread, so the background writer has the second core.",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0]},
    }
    fileio.write_json(out, report)
    print(json.dumps({"fsync": {k: saves[k] for k in ("seconds_median", "fsync_cost_s_per_checkpoint")},
                      "async": stall["stall_s_per_checkpoint_median"]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
