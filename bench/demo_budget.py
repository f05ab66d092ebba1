"""Collect the demo-budget checks into bench/results/demo_budget.json: runs of the demo's training (1,050 x 256
on 2 ranks by default) with the step count, the seed or the labels changed, each probed as the demo probes
(eval_linear_probe.py limit_train=20000 into <run>/eval). This script only reads finished runs; each run's config.yaml
holds its full settings. Runs are summarised per (centers, steps) over seeds, beside the demo's baselines (raw pixels,
the clustering features, the random-init ViT) read from `make demo`'s own run.

    python bench/demo_budget.py runs/demo runs/demo_350_s1 runs/demo_1050_s1 ...
"""
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlcd import fileio  # noqa: E402
from runners.stats import summary  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "demo_budget.json"


def collect(run: Path) -> dict:
    cfg = OmegaConf.load(run / "config.yaml")
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    probe = run / "eval" / "results.json"
    if not probe.exists():  # `make demo`'s own run: its trained backbone is the first of its four evaluations
        probe = run / "eval" / "backbone0" / "results.json"
    res = json.loads(probe.read_text())["results"][0]["metrics"]
    labels = json.loads((Path(cfg.data.labels_dir) / "manifest.json").read_text())
    return {"run": str(run), "labels_dir": cfg.data.labels_dir, "centers": labels["num_classes"],
            "num_labels": cfg.data.num_labels, "seed": cfg.seed,
            "total_steps": cfg.train.total_steps, "global_batch_size": cfg.train.global_batch_size,
            "lr": cfg.optim.lr, "final_loss": metrics[-1]["loss"],
            "median_images_per_s": sorted(m["images_per_s"] for m in metrics)[len(metrics) // 2],
            # training time without start-up: each logged interval's samples over its measured throughput
            "step_seconds": round(sum((m["samples_seen"] - p) / m["images_per_s"]
                                      for m, p in zip(metrics, [0] + [m["samples_seen"] for m in metrics])), 1),
            "linear_probe_top1": round(100 * res["lp_acc1"], 2), "knn_top1": round(100 * res["knn_acc1"], 2)}


def summarise(runs: list) -> list:
    """Mean and std over seeds of each (centers, total_steps) setting; a seed run twice counts once (the newest)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["centers"], r["total_steps"]), {})[r["seed"]] = r
    out = []
    for (centers, steps), by_seed in sorted(groups.items()):
        rs = [by_seed[s] for s in sorted(by_seed)]
        out.append({"centers": centers, "total_steps": steps, "seeds": sorted(by_seed), "n": len(rs),
                    **{m: summary([r[m] for r in rs]) for m in ("linear_probe_top1", "knn_top1")}})
    return out


def demo_baselines(run: Path) -> dict:
    rows = json.loads((run / "demo_results.json").read_text())["rows"]
    return {r["backbone"]: {"linear_probe_top1": round(r["linear_probe_top1"], 2), "knn_top1": round(r["knn_top1"], 2)}
            for r in rows[1:]}  # rows[0] is the trained ViT itself, collected as a run


if __name__ == "__main__":
    if len(sys.argv) < 2:  # `make bench` runs every script: this one only collects runs named on its command line
        print(__doc__)
        sys.exit(0)
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    runs = {r["run"]: r for r in old.get("runs", [])}
    runs.update({str(Path(p)): collect(Path(p)) for p in sys.argv[1:]})
    demo = next((Path(p) for p in sys.argv[1:] if (Path(p) / "demo_results.json").exists()), None)
    result = {"bench": "demo_budget", "runs": list(runs.values()), "settings": summarise(list(runs.values())),
              "baselines": demo_baselines(demo) if demo else old.get("baselines")}
    fileio.write_json(OUT, result)
    print(json.dumps(result["settings"], indent=1))
