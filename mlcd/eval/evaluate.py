"""Linear probe + kNN of one frozen backbone on a list of datasets -> results.json and a table.

Per dataset: features of train/(val)/test are extracted once (cached); the L2 strength is searched
on val (official, else a stratified `val_fraction` of train), the probe is refitted on train+val
and scored on test; kNN uses train+val as its memory bank.

Names and layout are CLIP_benchmark's (its cli.py / metrics/linear_probe.py), so tables compare with
published ones: one record per dataset, {"dataset", "model", "pretrained", "task": "linear_probe",
"metrics"}, metrics `lp_acc1`, `lp_acc5` (None below 6 classes), `lp_mean_per_class_recall` as fractions
in [0, 1], plus `seed`, `fewshot_k` (-1: all), `normalized` (False: we z-score, not L2-normalise) and ours:
`lp_lam` (the chosen L2 strength), `knn_acc1`, `knn_mean_per_class_recall`. results.json lists the records
under "results" (with our extras under "details") and the datasets that failed under "failed" with their
reason; each record is also written alone to clip_benchmark/<dataset>.json, the files
`clip_benchmark build` turns into a CSV.

Every dataset name is checked before any work. A dataset that fails (not on disk, or an error while probing)
does not stop the others; results.json is written either way, and eval_linear_probe.py then exits with
status 1 naming the failures, so a partial table is never mistaken for a full one.
"""
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from mlcd import fileio
from mlcd.models.backbones import build_backbone
from mlcd.eval.datasets import canonical_name, default_root, labels_of, load_dataset, stratified_pick
from mlcd.eval.features import cached_features
from mlcd.eval.knn import knn_predict
from mlcd.eval.linear_probe import METRICS, fit_logreg, lam_grid, mean_per_class_accuracy, pick_device, search_lam

PROBE_DEFAULTS = dict(lam=None, lam_lo=-6.0, lam_hi=2.0, steps_per_decade=8, coarse_every=16, max_iter=3000,
                      tol=1e-6, history_size=200, standardize=True, val_fraction=0.1)
KNN_DEFAULTS = dict(enabled=True, k=20, temperature=0.07)
TASK = "linear_probe"


def dataset_specs(datasets, datasets_root) -> list[dict]:
    """Entries (names or {name, root, type, metric}) -> specs with CLIP_benchmark names and roots; raises on
    the first unknown name, duplicate or bad metric, so nothing runs on a list that cannot finish."""
    specs = []
    for entry in datasets:
        spec = {"name": entry} if isinstance(entry, str) else dict(entry)
        if "name" not in spec:
            raise ValueError(f"dataset entry {entry!r} has no 'name'")
        spec["name"] = canonical_name(spec["name"], spec.get("type"))
        if spec.get("metric") not in (None, *METRICS):
            raise ValueError(f"dataset {spec['name']!r}: metric must be one of {sorted(METRICS)}, "
                             f"got {spec['metric']!r}")
        spec.setdefault("root", str(default_root(spec["name"], datasets_root)))
        specs.append(spec)
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names repeat: {names}")
    return specs


def top_k_accuracy(logits: torch.Tensor, target, k: int) -> float:
    top = logits.topk(k, dim=1).indices.cpu().numpy()
    return float((top == np.asarray(target)[:, None]).any(1).mean())


def probe_features(xtr, ytr, xval, yval, xte, yte, num_classes, metric, probe=None, knn=None, device=None):
    """The classifier part on given features: search lam on val (by `metric`), refit on train+val, score on
    test. Returns (metrics, details): CLIP_benchmark's lp_* metrics plus ours, and how they were reached."""
    p = {**PROBE_DEFAULTS, **(probe or {})}
    k = {**KNN_DEFAULTS, **(knn or {})}
    dev = pick_device(device)
    fit_kw = dict(standardize=p["standardize"], max_iter=p["max_iter"], tol=p["tol"],
                  history_size=p["history_size"])
    t0 = time.time()
    history = []
    if p["lam"] is not None:
        lam = float(p["lam"])
    else:
        grid = lam_grid(p["lam_lo"], p["lam_hi"], p["steps_per_decade"])
        lam, history = search_lam(xtr, ytr, xval, yval, num_classes, metric, grid=grid,
                                  coarse_every=p["coarse_every"], device=dev, **fit_kw)
    xall, yall = np.concatenate([xtr, xval]), np.concatenate([ytr, yval])
    clf = fit_logreg(xall, yall, num_classes, lam, device=dev, **fit_kw)
    logits = clf.logits(xte)
    pred = logits.argmax(1).cpu().numpy()
    metrics = {"lp_acc1": float((pred == yte).mean()),
               "lp_acc5": top_k_accuracy(logits, yte, 5) if num_classes > 5 else None,
               "lp_mean_per_class_recall": mean_per_class_accuracy(pred, yte),
               "lp_lam": lam, "seed": None, "fewshot_k": -1, "normalized": False}
    details = {"search_metric": metric, "C_sklearn": 1.0 / (lam * len(xall)), "n_iter": clf.n_iter,
               "stop": clf.info["stop"], "search": history, "probe_seconds": time.time() - t0}
    if k["enabled"]:
        t1 = time.time()
        pred = knn_predict(xall, yall, xte, num_classes, k=k["k"], temperature=k["temperature"], device=dev)
        metrics.update(knn_acc1=float((pred == yte).mean()),
                       knn_mean_per_class_recall=mean_per_class_accuracy(pred, yte))
        details["knn_seconds"] = time.time() - t1
    return metrics, details


def evaluate_dataset(backbone, splits, *, probe, knn, limit_train, limit_test, seed, cache_dir, batch_size,
                     num_workers, device):
    """(metrics, details) of one backbone on one opened dataset."""
    p = {**PROBE_DEFAULTS, **(probe or {})}
    name = splits.name.replace("/", "_")
    tr_labels, te_labels = labels_of(splits.train), labels_of(splits.test)
    tr_idx = stratified_pick(tr_labels, limit_train, seed) if limit_train else np.arange(len(tr_labels))
    te_idx = stratified_pick(te_labels, limit_test, seed) if limit_test else np.arange(len(te_labels))
    sub = lambda idx, n: "" if len(idx) == n else f"-n{len(idx)}s{seed}"  # noqa: E731
    kw = dict(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, device=device)
    xtr, ytr = cached_features(backbone, splits.train, f"{name}-train{sub(tr_idx, len(tr_labels))}", tr_idx, **kw)
    xte, yte = cached_features(backbone, splits.test, f"{name}-test{sub(te_idx, len(te_labels))}", te_idx, **kw)
    if splits.val is not None:
        va_labels = labels_of(splits.val)
        va_idx = stratified_pick(va_labels, limit_train, seed) if limit_train else np.arange(len(va_labels))
        xval, yval = cached_features(backbone, splits.val, f"{name}-val{sub(va_idx, len(va_labels))}", va_idx, **kw)
    else:                                   # hold out a stratified part of train for the search
        n_val = max(1, int(round(p["val_fraction"] * len(ytr))))
        val_pos = stratified_pick(ytr, n_val, seed + 1)
        mask = np.zeros(len(ytr), bool)
        mask[val_pos] = True
        xval, yval, xtr, ytr = xtr[mask], ytr[mask], xtr[~mask], ytr[~mask]
    metrics, details = probe_features(xtr, ytr, xval, yval, xte, yte, splits.num_classes, splits.metric,
                                      probe=probe, knn=knn, device=device)
    metrics["seed"] = seed
    details.update(n_train=int(len(ytr) + len(yval)), n_val=int(len(yval)), val_source=splits.val_source,
                   n_test=int(len(yte)), num_classes=splits.num_classes, feature_dim=int(xtr.shape[1]))
    return metrics, details


def markdown_table(results: dict) -> str:
    rows = ["| dataset | lp_acc1 | lp_mean_per_class_recall | knn_acc1 | L2 (lam) | n_train | n_test |",
            "|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for r in results["results"]:
        m, d = r["metrics"], r["details"]
        rows.append(f"| {r['dataset']} | {pct(m['lp_acc1'])} | {pct(m['lp_mean_per_class_recall'])} | "
                    f"{pct(m.get('knn_acc1'))} | {m['lp_lam']:.3g} | {d['n_train']} | {d['n_test']} |")
    if results["results"]:
        mean = results["mean"]
        rows.append(f"| **mean** | {pct(mean['lp_acc1'])} | {pct(mean['lp_mean_per_class_recall'])} | "
                    f"{pct(mean.get('knn_acc1'))} | | | |")
    lines = [f"model: {results['model']}  pretrained: {results['pretrained']}  feature: {results['feature']}  "
             "(accuracies in %)", "", *rows]
    for f in results["failed"]:
        lines.append(f"\nFAILED {f['dataset']}: {f['error']}")
    return "\n".join(lines) + "\n"


def _mean(records, key):
    values = [r["metrics"].get(key) for r in records]
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def evaluate(backbone: dict, datasets, *, feature: str = "pooled", probe: dict | None = None,
             knn: dict | None = None, datasets_root: str | None = None, limit_train: int | None = None,
             limit_test: int | None = None, seed: int = 0, cache_dir: str | None = "runs/feature_cache",
             out_dir: str | None = None, batch_size: int = 256, num_workers: int = 2, device: str = "auto",
             config: dict | None = None, verbose: bool = True) -> dict:
    """Probe one backbone (a config mapping, see mlcd.models.backbones) on `datasets` (names or
    {name, root, type, metric} mappings). Returns the results dict; writes results.json, results.md,
    clip_benchmark/<dataset>.json (and config.yaml when `config` is given) into out_dir when set."""
    specs = dataset_specs(datasets, datasets_root)          # all names checked before any work
    dev = pick_device(device)
    results = {"task": TASK, "model": None, "pretrained": None, "feature": feature, "results": [], "failed": [],
               "backbone": dict(backbone), "probe": {**PROBE_DEFAULTS, **(probe or {})},
               "knn": {**KNN_DEFAULTS, **(knn or {})}, "limit_train": limit_train, "limit_test": limit_test,
               "seed": seed, "device": str(dev)}
    built = {}

    def failed(spec, e, trace):     # recorded with its reason; the others still run
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (root {spec['root']})"
        results["failed"].append({"dataset": spec["name"], "error": why})
        if verbose:
            if trace:               # an error while probing, not a dataset missing on disk: show where
                traceback.print_exc()
            print(f"FAILED {spec['name']}: {why}", flush=True)

    for spec in specs:
        name = spec["name"]
        try:
            splits = load_dataset(name, spec["root"], spec.get("type"), spec.get("metric"), seed)
        except Exception as e:      # noqa: BLE001
            failed(spec, e, trace=False)
            continue
        gray = splits.grayscale if backbone.get("type") == "pixels" else None  # only pixels care
        if gray not in built:       # a backbone that cannot be built is no dataset's failure: it stops the run
            built[gray] = build_backbone(backbone, feature, grayscale=bool(gray))
        bb = built[gray]
        results.update(model=bb.name, pretrained=bb.pretrained, feature=bb.feature, backbone_identity=bb.identity)
        try:
            metrics, details = evaluate_dataset(
                bb, splits, probe=probe, knn=knn, limit_train=limit_train, limit_test=limit_test, seed=seed,
                cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, device=dev)
        except Exception as e:      # noqa: BLE001
            failed(spec, e, trace=True)
            continue
        results["results"].append({"dataset": name, "model": bb.name, "pretrained": bb.pretrained, "task": TASK,
                                   "metrics": metrics, "details": details})
        if verbose:
            knn_txt = f"  kNN acc1 {100 * metrics['knn_acc1']:.2f}" if "knn_acc1" in metrics else ""
            print(f"{name}: linear probe acc1 {100 * metrics['lp_acc1']:.2f}  mean per-class recall "
                  f"{100 * metrics['lp_mean_per_class_recall']:.2f}{knn_txt}  (lam {metrics['lp_lam']:.3g})",
                  flush=True)
    done = results["results"]
    results["mean"] = {k: _mean(done, k) for k in ("lp_acc1", "lp_mean_per_class_recall", "knn_acc1")}
    table = markdown_table(results)
    if verbose:
        print(table, flush=True)
    if out_dir:
        out = Path(out_dir)
        (out / "clip_benchmark").mkdir(parents=True, exist_ok=True)
        slug = lambda name: name.removeprefix("wds/").replace("/", "_")  # noqa: E731 - CLIP_benchmark's file slug
        for r in done:
            fileio.write_json(out / "clip_benchmark" / f"{slug(r['dataset'])}.json",
                              {k: v for k, v in r.items() if k != "details"})
        for f in results["failed"]:  # no stale file from an earlier run may stand in for a failed dataset
            (out / "clip_benchmark" / f"{slug(f['dataset'])}.json").unlink(missing_ok=True)
        fileio.write_json(out / "results.json", results)
        fileio.write_text(out / "results.md", table)
        if config is not None:
            from omegaconf import OmegaConf
            fileio.write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    return results
