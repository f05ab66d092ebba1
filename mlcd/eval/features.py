"""Feature extraction, once per (backbone identity, feature, transform, dataset, split, subset).

Cached as CACHE/<dataset>-<split>-<key>.npz (x float32 [n, d], y int64 [n], index int64 [n]),
written to a temp name and renamed, so an interrupted run never leaves a half file behind.
"""
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mlcd import fileio
from mlcd.models.backbones import Backbone, identity_key


class _Transformed(Dataset):
    def __init__(self, ds, transform, indices):
        self.ds, self.transform, self.indices = ds, transform, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, label = self.ds[int(self.indices[i])]
        return self.transform(img), label


@torch.no_grad()
def extract(backbone: Backbone, ds, indices=None, *, batch_size: int = 256, num_workers: int = 2,
            device="cpu", desc: str = "features"):
    """(features float32 [n, d], labels int64 [n]) for ds[indices] in order."""
    indices = np.arange(len(ds)) if indices is None else np.asarray(indices)
    loader = DataLoader(_Transformed(ds, backbone.transform, indices), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
    backbone.to(device)
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        feats.append(backbone(x.to(device, non_blocking=True)).cpu())
        labels.append(torch.as_tensor(y))
    if not feats:
        raise ValueError(f"{desc}: no samples to extract")
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def cached_features(backbone: Backbone, ds, split_id: str, indices, cache_dir, **kw):
    """extract() through the cache. split_id names dataset, split and subset (e.g. 'cifar10-train-n5000-s0')."""
    key = identity_key({"backbone": backbone.identity, "split": split_id,
                        "indices": _digest(indices) if indices is not None else None})
    path = Path(cache_dir) / f"{split_id}-{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path) as z:
            return z["x"], z["y"]
    x, y = extract(backbone, ds, indices, desc=split_id, **kw)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=x, y=y)
    return x, y


def _digest(indices) -> str:
    import hashlib
    return hashlib.sha1(np.ascontiguousarray(np.asarray(indices, dtype=np.int64)).tobytes()).hexdigest()
