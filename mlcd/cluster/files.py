"""The clustering output directory: shard lists, feature files, manifests, atomic writes.

    OUT/config.yaml                     resolved config of the last run
    OUT/manifest.json                   config, versions, per-stage summaries, centers checksum
    OUT/features/{stem}.npy             fp16 [n, d], L2-normalised, rows aligned with ...
    OUT/features/{stem}.keys.txt        ... the sample keys (written last: marks the shard complete)
    OUT/features/{stem}.skips.json      what the loader skipped in that shard, and why
    OUT/features/manifest.json
    OUT/centers.npy  OUT/kmeans_report.json  OUT/cluster_sizes.png
    OUT/labels/  (mlcd.data.labels format)  + manifest.json, assign_report.json
"""
import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import numpy as np

from mlcd import fileio

from mlcd.data.labels import shard_stem


def expand_shards(spec) -> list[str]:
    """A list, a brace pattern ('d/s-{000..009}.tar') or a glob ('d/*.tar') -> list of urls (unique names)."""
    from mlcd.data.tars import expand_urls

    if spec is None:
        raise ValueError("cluster: `shards` is not set (brace pattern, glob, or list of tar files)")
    urls = expand_urls(spec)
    stems = [shard_stem(u) for u in urls]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"cluster: shard names must be unique (outputs are keyed by name); duplicated: {dup[:5]}")
    if not urls:
        raise ValueError(f"cluster: shards={spec!r} gives no shard")
    return urls


def load_json(path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    import faiss
    import torch
    out = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
           "faiss": faiss.__version__, "cpu_count": os.cpu_count(), "faiss_gpus": faiss.get_num_gpus()}
    try:  # from the package metadata: importing open_clip pulls in transformers (slow)
        out["open_clip"] = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


RESUME_ELSEWHERE = "Use another out_dir or delete the old outputs."



# ---- features ------------------------------------------------------------------------------------

def feature_paths(features_dir, stem: str):
    d = Path(features_dir)
    return d / f"{stem}.npy", d / f"{stem}.keys.txt"


def has_features(features_dir, stem: str) -> bool:
    return all(p.exists() for p in feature_paths(features_dir, stem))


def write_features(features_dir, stem: str, feats: np.ndarray, keys: list[str], skips: dict) -> None:
    """Arrays first, keys last: `{stem}.keys.txt` existing means the shard is complete."""
    npy, keys_p = feature_paths(features_dir, stem)
    if len(keys) != len(feats):
        raise ValueError(f"shard {stem}: {len(feats)} feature rows but {len(keys)} keys")
    fileio.save_npy(npy, feats.astype(np.float16))
    fileio.write_json(Path(features_dir) / f"{stem}.skips.json", skips)
    fileio.write_text(keys_p, "".join(k + "\n" for k in keys))


def read_features(features_dir, stem: str, mmap: bool = False):
    """(keys, fp16 [n, d]) for one shard; errors name the file."""
    npy, keys_p = feature_paths(features_dir, stem)
    if not keys_p.exists():
        raise FileNotFoundError(f"no features for shard {stem!r}: {keys_p} missing (run the extract stage)")
    keys = keys_p.read_text(encoding="utf-8").splitlines()
    feats = np.load(npy, mmap_mode="r" if mmap else None)
    if feats.ndim != 2 or feats.shape[0] != len(keys):
        raise ValueError(f"{npy}: shape {feats.shape} does not match {len(keys)} keys in {keys_p}")
    return keys, feats


def sample_rows(features_dir, stems: list[str], m: int, seed: int, dtype=np.float32) -> np.ndarray:
    """`m` rows drawn uniformly without replacement over all shards (all rows if m >= n), as `dtype` (None: the
    files' own dtype)."""
    mms = [read_features(features_dir, s, mmap=True)[1] for s in stems]
    counts = np.array([len(a) for a in mms], dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        raise ValueError(f"{features_dir}: the feature files hold no rows")
    d = mms[0].shape[1]
    idx = np.arange(n) if m >= n else np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    out = np.empty((len(idx), d), dtype or mms[0].dtype)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for i, a in enumerate(mms):
        lo, hi = np.searchsorted(idx, offsets[i]), np.searchsorted(idx, offsets[i + 1])
        if hi > lo:
            out[lo:hi] = a[idx[lo:hi] - offsets[i]]
    return out
