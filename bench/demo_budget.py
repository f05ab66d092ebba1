"""Collect the demo-budget checks into bench/results/demo_budget.json: runs of the demo's training (350 x 256
on 2 ranks) with one setting changed, each probed as the demo probes (eval_linear_probe.py limit_train=20000 into
<run>/eval). This script only reads finished runs; each run's config.yaml holds its full settings.

    python bench/demo_budget.py runs/demo runs/demo_k100 runs/demo_700 runs/demo_1050
"""
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlcd import fileio  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "demo_budget.json"


def collect(run: Path) -> dict:
    cfg = OmegaConf.load(run / "config.yaml")
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    probe = run / "eval" / "results.json"
    if not probe.exists():  # `make demo`'s own run: its trained backbone is the first of its four evaluations
        probe = run / "eval" / "backbone0" / "results.json"
    res = json.loads(probe.read_text())["results"][0]["metrics"]
    return {"run": str(run), "labels_dir": cfg.data.labels_dir, "num_labels": cfg.data.num_labels,
            "total_steps": cfg.train.total_steps, "global_batch_size": cfg.train.global_batch_size,
            "lr": cfg.optim.lr, "final_loss": metrics[-1]["loss"],
            "median_images_per_s": sorted(m["images_per_s"] for m in metrics)[len(metrics) // 2],
            # training time without start-up: each logged interval's samples over its measured throughput
            "step_seconds": round(sum((m["samples_seen"] - p) / m["images_per_s"]
                                      for m, p in zip(metrics, [0] + [m["samples_seen"] for m in metrics])), 1),
            "linear_probe_top1": round(100 * res["lp_acc1"], 2), "knn_top1": round(100 * res["knn_acc1"], 2)}


if __name__ == "__main__":
    if len(sys.argv) < 2:  # `make bench` runs every script: this one only collects runs named on its command line
        print(__doc__)
        sys.exit(0)
    old = json.loads(OUT.read_text())["runs"] if OUT.exists() else []
    runs = {r["run"]: r for r in old}
    runs.update({str(Path(p)): collect(Path(p)) for p in sys.argv[1:]})
    fileio.write_json(OUT, {"bench": "demo_budget", "runs": list(runs.values())})
    print(json.dumps(list(runs.values()), indent=1))
