"""Linear probe + kNN of one frozen backbone on a list of datasets -> results.json and a table.

Per dataset: features of train/(val)/test are extracted once (cached); the L2 strength is searched
on val (official, else a stratified `val_fraction` of train), the probe is refitted on train+val
and scored on test with the dataset's metric; kNN uses train+val as its memory bank.
A dataset that cannot be opened is skipped with its reason; the others still run.
"""
import json
import os
import time
from pathlib import Path

import numpy as np

from mlcd import fileio
from mlcd.eval.backbones import build_backbone
from mlcd.eval.datasets import labels_of, load_dataset, stratified_pick
from mlcd.eval.features import cached_features
from mlcd.eval.knn import knn_predict
from mlcd.eval.linear_probe import METRICS, fit_logreg, lam_grid, pick_device, search_lam

PROBE_DEFAULTS = dict(lam=None, lam_lo=-6.0, lam_hi=2.0, steps_per_decade=8, coarse_every=16, max_iter=1000,
                      tol=1e-4, history_size=200, standardize=True, val_fraction=0.1)
KNN_DEFAULTS = dict(enabled=True, k=20, temperature=0.07)


def _dataset_spec(entry, datasets_root):
    if isinstance(entry, str):
        entry = {"name": entry}
    spec = dict(entry)
    if "name" not in spec:
        raise ValueError(f"dataset entry {entry!r} has no 'name'")
    spec.setdefault("root", str(Path(datasets_root or ".") / spec["name"]))
    return spec


def probe_features(xtr, ytr, xval, yval, xte, yte, num_classes, metric, probe=None, knn=None, device=None):
    """The classifier part on given features: search lam on val, refit on train+val, score on test."""
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
    score = METRICS[metric](clf.predict(xte), yte)
    out = {"linear_probe": score, "lam": lam, "C_sklearn": 1.0 / (lam * len(xall)), "n_iter": clf.n_iter,
           "search": history, "probe_seconds": time.time() - t0}
    if k["enabled"]:
        t1 = time.time()
        pred = knn_predict(xall, yall, xte, num_classes, k=k["k"], temperature=k["temperature"], device=dev)
        out.update(knn=METRICS[metric](pred, yte), knn_seconds=time.time() - t1)
    return out


def evaluate_dataset(backbone, splits, *, probe, knn, limit_train, limit_test, seed, cache_dir, batch_size,
                     num_workers, device):
    p = {**PROBE_DEFAULTS, **(probe or {})}
    name = splits.name
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
    res = probe_features(xtr, ytr, xval, yval, xte, yte, splits.num_classes, splits.metric,
                         probe=probe, knn=knn, device=device)
    return {"metric": splits.metric, **res, "n_train": int(len(ytr) + len(yval)), "n_val": int(len(yval)),
            "val_source": splits.val_source, "n_test": int(len(yte)), "num_classes": splits.num_classes,
            "feature_dim": int(xtr.shape[1])}


def markdown_table(results: dict) -> str:
    rows = ["| dataset | metric | linear probe | kNN | L2 (lam) | n_train | n_test |",
            "|---|---|---|---|---|---|---|"]
    done = results["datasets"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name, r in done.items():
        rows.append(f"| {name} | {r['metric']} | {fmt(r['linear_probe'])} | {fmt(r.get('knn'))} | "
                    f"{r['lam']:.3g} | {r['n_train']} | {r['n_test']} |")
    if done:
        rows.append(f"| **mean** | | {fmt(results['mean']['linear_probe'])} | {fmt(results['mean'].get('knn'))}"
                    " | | | |")
    lines = [f"backbone: {results['backbone']['type']}  feature: {results['feature']}", "", *rows]
    for name, why in results["skipped"].items():
        lines.append(f"\nskipped {name}: {why}")
    return "\n".join(lines) + "\n"


def evaluate(backbone: dict, datasets, *, feature: str = "pooled", probe: dict | None = None,
             knn: dict | None = None, datasets_root: str | None = None, limit_train: int | None = None,
             limit_test: int | None = None, seed: int = 0, cache_dir: str | None = "runs/feature_cache",
             out_dir: str | None = None, batch_size: int = 256, num_workers: int = 2, device: str = "auto",
             config: dict | None = None, verbose: bool = True) -> dict:
    """Probe one backbone (a config mapping, see mlcd.eval.backbones) on `datasets` (names or
    {name, root, type, metric} mappings). Returns the results dict; writes results.json,
    results.md (and config.yaml when `config` is given) into out_dir when set."""
    dev = pick_device(device)
    results = {"backbone": dict(backbone), "feature": feature, "datasets": {}, "skipped": {},
               "probe": {**PROBE_DEFAULTS, **(probe or {})}, "knn": {**KNN_DEFAULTS, **(knn or {})},
               "limit_train": limit_train, "limit_test": limit_test, "seed": seed, "device": str(dev)}
    built = {}
    for entry in datasets:
        spec = _dataset_spec(entry, datasets_root)
        name = spec["name"]
        try:                                # only opening the dataset may fail softly
            splits = load_dataset(name, spec["root"], spec.get("type"), spec.get("metric"), seed)
        except (FileNotFoundError, RuntimeError, OSError) as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (root {spec['root']})"
            results["skipped"][name] = why
            if verbose:
                print(f"skipping {name}: {why}", flush=True)
            continue
        gray = splits.grayscale if backbone.get("type") == "pixels" else None  # only pixels care
        if gray not in built:
            built[gray] = build_backbone(backbone, feature, grayscale=bool(gray))
        bb = built[gray]
        results["backbone_identity"], results["feature"] = bb.identity, bb.feature
        r = evaluate_dataset(bb, splits, probe=probe, knn=knn, limit_train=limit_train, limit_test=limit_test,
                             seed=seed, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                             device=dev)
        results["datasets"][name] = r
        if verbose:
            print(f"{name}: {r['metric']} linear probe {r['linear_probe']:.2f}"
                  + (f"  kNN {r['knn']:.2f}" if "knn" in r else "") + f"  (lam {r['lam']:.3g})", flush=True)
    done = results["datasets"].values()
    results["mean"] = {"linear_probe": float(np.mean([r["linear_probe"] for r in done])) if done else None,
                       "knn": float(np.mean([r["knn"] for r in done])) if done and all("knn" in r for r in done)
                       else None}
    table = markdown_table(results)
    if verbose:
        print(table, flush=True)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fileio.write_text(out / "results.json", json.dumps(results, indent=2, default=str))
        fileio.write_text(out / "results.md", table)
        if config is not None:
            from omegaconf import OmegaConf
            fileio.write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    return results
