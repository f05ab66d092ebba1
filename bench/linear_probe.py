"""Our L-BFGS probe vs scikit-learn LogisticRegression(lbfgs) on the same cached features.

Features: 512-d random ReLU features of Fashion-MNIST pixels (a fixed Gaussian projection per seed),
60,000 train / 10,000 test, standardised once with the train statistics and given to both.
Same objective (mean CE + lam/2 ||W||^2, i.e. C = 1 / (lam n)), same tol on max|grad| (1e-4,
scikit-learn's default), same max_iter (1000, CLIP's). Target: >= 5x faster, <= 0.3 points lower.
Ours is also run without the preconditioner (the ablation).
Both solvers on 1 thread (torch.set_num_threads / threadpoolctl for sklearn's BLAS), three rounds on three
projection seeds, the median ratio is the headline: a round varies by the machine's load (~10%) and by the
seed (L-BFGS's iteration count moves by +-10% with the problem's details); then both once on seed 0 at their
default thread counts.
Writes bench/results/linear_probe.json.
"""
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from mlcd.data import fashion_mnist
from mlcd.eval.linear_probe import fit_logreg, pick_device

LAM, TOL, MAX_ITER, DIM, SEEDS = 1e-4, 1e-4, 1000, 512, (0, 1, 2)


def objective(x, y, w, b, lam):
    """The shared objective in float64 (to compare how far each solver got)."""
    z = x.astype(np.float64) @ w.T.astype(np.float64) + b
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean() + 0.5 * lam * (w.astype(np.float64) ** 2).sum())


def random_features(xtr, xte, seed):
    """ReLU of a fixed Gaussian projection of the pixels, standardised with the train statistics."""
    proj = np.random.default_rng(seed).standard_normal((784, DIM)).astype(np.float32) / 28
    feats = lambda a: np.maximum(a.reshape(len(a), -1).astype(np.float32) / 255 @ proj, 0)  # noqa: E731
    ftr, fte = feats(xtr), feats(xte)
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    return (ftr - mean) / std, (fte - mean) / std


def main():
    xtr, ytr = fashion_mnist.load("train", download=False)
    xte, yte = fashion_mnist.load("test", download=False)
    n = len(xtr)
    dev = pick_device("auto")
    default_threads = torch.get_num_threads()

    def run_both(threads, seed, ablation=True):
        ftr, fte = random_features(xtr, xte, seed)
        rows = {"seed": seed}
        torch.set_num_threads(threads)
        t = time.perf_counter()
        clf = fit_logreg(ftr, ytr, 10, LAM, standardize=False, tol=TOL, max_iter=MAX_ITER, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        rows["ours"] = {"seconds": sec, "accuracy": float((clf.predict(fte) == yte).mean() * 100),
                        "n_iter": clf.n_iter, "n_evals": clf.n_evals,
                        "objective": objective(ftr, ytr, clf.weight.cpu().numpy(), clf.bias.cpu().numpy(), LAM),
                        "grad_max": clf.info["grad_max"]}
        print(threads, seed, "ours", rows["ours"], flush=True)
        if ablation:
            t = time.perf_counter()
            plain = fit_logreg(ftr, ytr, 10, LAM, standardize=False, tol=TOL, max_iter=MAX_ITER, device=dev,
                               precondition=False)
            rows["ours_no_precondition"] = {"seconds": time.perf_counter() - t,
                                            "accuracy": float((plain.predict(fte) == yte).mean() * 100),
                                            "n_iter": plain.n_iter, "n_evals": plain.n_evals,
                                            "grad_max": plain.info["grad_max"]}
            print(threads, "ours, no preconditioner", rows["ours_no_precondition"], flush=True)
        with threadpool_limits(limits=threads):
            t = time.perf_counter()
            sk = LogisticRegression(C=1.0 / (LAM * n), tol=TOL, max_iter=MAX_ITER, solver="lbfgs").fit(ftr, ytr)
            sec = time.perf_counter() - t
        rows["sklearn"] = {"seconds": sec, "accuracy": float((sk.predict(fte) == yte).mean() * 100),
                           "n_iter": int(sk.n_iter_[0]),
                           "objective": objective(ftr, ytr, sk.coef_, sk.intercept_, LAM)}
        print(threads, seed, "sklearn", rows["sklearn"], flush=True)
        rows["speedup"] = rows["sklearn"]["seconds"] / rows["ours"]["seconds"]
        rows["accuracy_gap_points"] = rows["sklearn"]["accuracy"] - rows["ours"]["accuracy"]
        rows["load_avg_1m_after"] = os.getloadavg()[0]
        return rows

    # The single-thread pair on three seeds; headline = the median ratio.
    single = run_both(1, SEEDS[0])
    repeats = [single] + [run_both(1, seed, ablation=False) for seed in SEEDS[1:]]
    single["rounds"] = [{"seed": r["seed"], "ours_s": r["ours"]["seconds"], "sklearn_s": r["sklearn"]["seconds"],
                         "ours_iter": r["ours"]["n_iter"], "sklearn_iter": r["sklearn"]["n_iter"],
                         "speedup": r["speedup"], "accuracy_gap_points": r["accuracy_gap_points"]} for r in repeats]
    single["median_speedup"] = float(np.median([r["speedup"] for r in repeats]))
    single["worst_accuracy_gap_points"] = max(r["accuracy_gap_points"] for r in repeats)
    multi = run_both(default_threads, SEEDS[0])
    torch.set_num_threads(default_threads)
    rows = {"single_thread": single, f"default_threads_{default_threads}": multi}
    speedup, acc_gap = single["median_speedup"], single["worst_accuracy_gap_points"]
    result = {
        "bench": "linear_probe",
        "what": "multinomial logistic regression on cached features: ours (L-BFGS preconditioned by the "
                "feature covariance, Armijo backtracking, float32, hand-written chunked loss/grad) vs sklearn "
                "LogisticRegression(solver='lbfgs', float64); ours_no_precondition = the ablation",
        "features": f"Fashion-MNIST random ReLU features, {n} x {DIM} train, {len(xte)} test, standardised; "
                    f"projection seeds {list(SEEDS)}",
        "settings": {"lam": LAM, "C_sklearn": 1.0 / (LAM * n), "tol": TOL, "max_iter": MAX_ITER,
                     "ours_history_size": 200, "sklearn_history_size": "10 (scipy default)"},
        "results": rows,
        "headline": "single_thread (median of 3 rounds, one per projection seed; accuracy gap = the worst round)",
        "speedup": speedup,
        "accuracy_gap_points": acc_gap,
        "target": ">= 5x faster at <= 0.3 points lower accuracy",
        "target_met": bool(speedup >= 5 and acc_gap <= 0.3),
        "target_met_by_setting": {k: bool(v.get("median_speedup", v["speedup"]) >= 5
                                          and v.get("worst_accuracy_gap_points", v["accuracy_gap_points"]) <= 0.3)
                                  for k, v in rows.items()},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": default_threads,
                    "load_avg_1m_at_end": os.getloadavg()[0], "platform": platform.platform(),
                    "torch": torch.__version__, "sklearn": sklearn.__version__, "device": str(dev),
                    "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None},
        "note": "the headline is the single-thread pair (per-core speed, and stable on a shared machine); the "
                "default-thread pair is what a user gets from both libraries' defaults on this machine",
    }
    out = Path(__file__).resolve().parent / "results" / "linear_probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(json.dumps({k: result[k] for k in ("speedup", "accuracy_gap_points", "target_met")}))


if __name__ == "__main__":
    main()
