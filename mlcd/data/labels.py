"""Per-shard multi-label files kept beside the image shards (the clustering -> training contract).

Why beside and not inside the tars: re-clustering (another K, another top-k, other features) must not
rewrite hundreds of TB of images, and several label sets can sit over the same shards. The loader
joins labels to samples by `__key__`, so skipped/corrupt samples can never shift labels.

For a shard `.../NAME.tar` and a labels directory L:
    L/NAME.keys.txt     utf-8, one `__key__` per line, row order of the arrays below
    L/NAME.labels.npy   int32 [n, k], center ids sorted by decreasing similarity
    L/NAME.sims.npy     float32 [n, k], the matching cosine similarities
plus L/manifest.json written by the stage that produced them.
"""
import json
import os
from pathlib import Path

import numpy as np

from mlcd import fileio


def shard_stem(url: str) -> str:
    """`pipe:aws s3 cp s3://b/x/shard-0001.tar -` or `/d/shard-000001.tar` -> `shard-000001`."""
    name = url.rstrip().split()[-1] if url.startswith("pipe:") else url
    name = name.rstrip("/").rsplit("/", 1)[-1]
    if name == "-":  # `pipe:cmd ... -`: take the last token that looks like a path
        name = [t for t in url.split() if t.endswith(".tar")][-1].rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _paths(labels_dir, stem):
    d = Path(labels_dir)
    return d / f"{stem}.keys.txt", d / f"{stem}.labels.npy", d / f"{stem}.sims.npy"


def write_shard_labels(labels_dir, stem: str, keys, labels: np.ndarray, sims: np.ndarray) -> None:
    """Write one shard's labels atomically (arrays first, keys last: keys.txt marks completion)."""
    labels = np.asarray(labels)
    sims = np.asarray(sims, dtype=np.float32)
    if labels.ndim != 2 or labels.shape[0] != len(keys) or sims.shape != labels.shape:
        raise ValueError(f"shard {stem}: labels {labels.shape}, sims {sims.shape} and {len(keys)} keys disagree")
    if any("\n" in k for k in keys):
        raise ValueError(f"shard {stem}: a key contains a newline")
    keys_p, labels_p, sims_p = _paths(labels_dir, stem)
    keys_p.parent.mkdir(parents=True, exist_ok=True)
    fileio.save_npy(labels_p, labels.astype(np.int32))
    fileio.save_npy(sims_p, sims)
    fileio.write_text(keys_p, "".join(k + "\n" for k in keys))


def label_width(labels_dir, stem: str) -> int:
    """k, the labels per image in a shard's label file (reads only the .npy header)."""
    _, labels_p, _ = _paths(labels_dir, stem)
    if not labels_p.exists():
        raise FileNotFoundError(f"no labels for shard {stem!r}: {labels_p} missing (did cluster.py assign run?)")
    return int(np.load(labels_p, mmap_mode="r").shape[1])


def manifest_num_classes(labels_dir) -> int | None:
    """The class count cluster.py wrote in the labels' manifest.json, or None where there is no manifest."""
    manifest = Path(labels_dir) / "manifest.json"
    if not manifest.exists():
        return None
    info = json.loads(manifest.read_text())
    for key in ("num_classes", "k", "num_centers"):
        if key in info:
            return int(info[key])
    raise ValueError(f"{manifest}: no num_classes field (is it cluster.py's labels manifest?)")


def resolve_num_classes(num_classes, labels_dir) -> int:
    """The class count: the labels' manifest wherever it exists, and a num_classes given must agree with it (5000
    centers over labels of 1000 would train 4000 centers that are never a positive). labels_dir None: no labels."""
    from_manifest = manifest_num_classes(labels_dir) if labels_dir else None
    if num_classes:
        if from_manifest is not None and int(num_classes) != from_manifest:
            raise ValueError(f"num_classes={num_classes} but {Path(labels_dir) / 'manifest.json'} says the labels "
                             f"index {from_manifest:,} centers: set num_classes={from_manifest} (or null to read it), "
                             "or point data.labels_dir at the clustering you mean")
        return int(num_classes)
    if from_manifest is None:
        raise ValueError(f"num_classes is not set and there is no labels manifest (data.labels_dir={labels_dir}): "
                         "run cluster.py first (or `make demo`), or set num_classes=... and data.labels_dir=...")
    return from_manifest


def missing_shard_labels(labels_dir, stems) -> list[str]:
    """The stems among `stems` without a complete label file. One directory listing, not a stat per file: at
    41,456 shards on a network file system that is the difference between a second and minutes."""
    d = Path(labels_dir)
    if not d.is_dir():
        return list(stems)
    names = {e.name for e in os.scandir(d)}
    return [s for s in stems if f"{s}.keys.txt" not in names or f"{s}.labels.npy" not in names]


def has_shard_labels(labels_dir, stem: str) -> bool:
    return all(p.exists() for p in _paths(labels_dir, stem))


def read_shard_labels(labels_dir, stem: str):
    """Return (keys list[str], labels int32 [n, k], sims float32 [n, k]); errors name the file."""
    keys_p, labels_p, sims_p = _paths(labels_dir, stem)
    if not keys_p.exists():
        raise FileNotFoundError(f"no labels for shard {stem!r}: {keys_p} missing (did cluster.py assign run?)")
    keys = keys_p.read_text(encoding="utf-8").splitlines()
    labels = np.load(labels_p)
    sims = np.load(sims_p) if sims_p.exists() else None
    if labels.dtype != np.int32 or labels.ndim != 2 or labels.shape[0] != len(keys):
        raise ValueError(f"{labels_p}: expected int32 [{len(keys)}, k], got {labels.dtype} {labels.shape}")
    return keys, labels, sims
