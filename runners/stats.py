"""The statistics every runner and bench reports with: one metric over seeds (mean, sample std), two settings
compared by the difference of their means and its standard error, and the probe's scores read from
eval_linear_probe.py's results.json."""
import json
from pathlib import Path

import numpy as np

METRICS = ("linear_probe_top1", "knn_top1")


def summary(values: list) -> dict:
    """Mean, sample std (ddof 1; None below 2 values) and the values of one metric over seeds."""
    v = np.array(values, dtype=float)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "values": v.tolist()}


def probe_scores(results_json: Path, dataset: str = "fashion_mnist") -> tuple[float, float]:
    """(linear-probe top-1, kNN top-1) in percent on `dataset` from eval_linear_probe.py's results.json."""
    res = json.loads(Path(results_json).read_text())
    for entry in res["results"]:                            # CLIP_benchmark layout
        if entry["dataset"] == dataset:
            return 100 * entry["metrics"]["lp_acc1"], 100 * entry["metrics"]["knn_acc1"]
    raise ValueError(f"{results_json}: no {dataset} record (failed: {res.get('failed')})")


def compare(a: dict, b: dict) -> dict:
    """Difference of two rows' means with its standard error over seeds (Welch): 'holds' when A - B > 2 SE,
    'reversed' when A - B < -2 SE, 'within spread' otherwise; None without two seeds on each side."""
    diff = a["mean"] - b["mean"]
    if len(a["values"]) < 2 or len(b["values"]) < 2:
        return {"diff": diff, "se": None, "verdict": None}
    se = float(np.sqrt(a["std"] ** 2 / len(a["values"]) + b["std"] ** 2 / len(b["values"])))
    verdict = "holds" if diff > 2 * se else "reversed" if diff < -2 * se else "within spread"
    return {"diff": diff, "se": se, "verdict": verdict}
