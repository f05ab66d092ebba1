"""PartialFC step time (forward + backward + sparse AdamW step) and peak memory vs class count and sampling ratio.

Single process (world size 1) on whatever device this machine has. Each configuration runs in its own subprocess
so its peak memory is its own (CPU: peak RSS minus the RSS after imports; GPU: torch.cuda.max_memory_allocated).
Writes bench/results/partial_fc.json. Target: at C = 1M, r = 0.1 takes at most 0.25x the step time of r = 1.0.

    python bench/partial_fc.py [--classes 100000 1000000] [--ratios 0.1 1.0] [--steps 3]
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(num_classes: int, ratio: float, dim: int, batch: int, num_labels: int, steps: int) -> dict:
    from mlcd.partial_fc import PartialFC
    from mlcd.train.optim import SparseRowAdamW

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_rss = _rss_mb()
    torch.manual_seed(0)
    pfc = PartialFC(num_classes, dim, sample_ratio=ratio, seed=0).to(device)
    opt = SparseRowAdamW(pfc.weight, lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(batch, dim, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, num_classes, (batch, num_labels), generator=g).to(device)
    setup_rss = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times, cols = [], 0
    for step in range(steps + 1):                           # step 0 is a warm-up, not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = pfc(emb, labels, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        emb.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t0)
        cols = pfc.last_index.numel()
    out = {"num_classes": num_classes, "ratio": ratio, "sampled_columns": cols, "loss": float(loss),
           "step_s_median": sorted(times)[len(times) // 2], "step_s_all": times}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = _rss_mb() - base_rss
        out["state_rss_mb"] = setup_rss - base_rss             # weights + AdamW moments + inputs
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--num-labels", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)      # internal: run one config, print JSON
    ap.add_argument("--out", default=str(ROOT / "bench/results/partial_fc.json"))
    args = ap.parse_args()
    if args.one:
        c, r = args.one.split(",")
        print(json.dumps(run_one(int(c), float(r), args.dim, args.batch, args.num_labels, args.steps)))
        return

    results = []
    for c in args.classes:
        for r in args.ratios:
            cmd = [sys.executable, __file__, "--one", f"{c},{r}", "--dim", str(args.dim), "--batch", str(args.batch),
                   "--num-labels", str(args.num_labels), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)

    def step_time(c, r):
        return next((x["step_s_median"] for x in results if x["num_classes"] == c and x["ratio"] == r), None)

    c_max = max(args.classes)
    sampled, full = step_time(c_max, 0.1), step_time(c_max, 1.0)
    ratio = sampled / full if sampled and full else None
    report = {
        "bench": "partial_fc", "what": "one step = PartialFC forward + backward + SparseRowAdamW step, world size 1",
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch_threads": torch.get_num_threads()},
        "sizes": {"classes": args.classes, "ratios": args.ratios, "dim": args.dim, "global_batch": args.batch,
                  "labels_per_sample": args.num_labels, "timed_steps": args.steps, "warmup_steps": 1},
        "results": results,
        "target": f"at C={c_max}, step time(r=0.1) <= 0.25 x step time(r=1.0)",
        "time_ratio_r0.1_over_r1.0": ratio,
        "target_met": ratio is not None and ratio <= 0.25,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}: r=0.1 / r=1.0 step time at C={c_max} = {ratio}")


if __name__ == "__main__":
    main()
