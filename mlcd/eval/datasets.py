"""Linear-probe datasets from local roots (torchvision classes, download=False) and ImageFolders.

Each loader returns PIL images and int labels. The metric follows CLIP's Table 9 / MLCD's
Table 11: mean per-class accuracy for Pets, Flowers-102, Caltech-101 and FGVC Aircraft, top-1
elsewhere. Datasets without an official split are split here, seeded, with CLIP's sizes
(Caltech-101: 30 train images per class, the rest test; SUN397: 50 train + 50 test per class).
Datasets without an official val split give up a stratified `val_fraction` of train for the
L2 search (CLIP / CLIP_benchmark), which is merged back for the final fit.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

MEAN_PER_CLASS = {"pets", "flowers102", "caltech101", "fgvc_aircraft"}


class ArrayImages(Dataset):
    """uint8 arrays [n, H, W] or [n, H, W, 3] served as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.targets = images, np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), int(self.targets[i])


@dataclass
class Splits:
    name: str
    train: Dataset
    val: Dataset | None      # None: hold out part of train for the search
    test: Dataset
    num_classes: int
    metric: str              # "top1" | "mean_per_class"
    grayscale: bool = False
    val_source: str = "official"


def labels_of(ds) -> np.ndarray:
    """All labels of a dataset without decoding images (the attribute torchvision keeps them in)."""
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[np.asarray(ds.indices)]
    for attr in ("targets", "_labels", "labels", "y"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "_samples"):                       # StanfordCars
        return np.asarray([s[1] for s in ds._samples], dtype=np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def stratified_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices whose class proportions follow `labels` (seeded), in ascending order."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    lab = labels[perm]
    by_class = np.argsort(lab, kind="stable")         # random order within each class
    counts = np.bincount(lab)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(lab)) - starts[lab[by_class]]
    rank = np.empty(len(labels))
    rank[perm[by_class]] = (pos + 0.5) / counts[lab[by_class]]   # fraction of its class taken so far
    order = np.lexsort((rng.random(len(labels)), rank))
    return np.sort(order[:n])


def per_class_split(labels: np.ndarray, n_train: int, n_test: int | None, seed: int):
    """Seeded per-class split: n_train per class for train, then n_test (None: the rest) for test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train += idx[:n_train].tolist()
        test += idx[n_train:n_train + n_test if n_test else None].tolist()
    return sorted(train), sorted(test)


def _tv(name):
    import torchvision.datasets as tvd
    return getattr(tvd, name)


def _load(name: str, root: str, seed: int):
    """(train, val or None, test, num_classes, grayscale) for a known dataset name."""
    r = str(root)
    if name in ("cifar10", "cifar100"):
        cls = _tv(name.upper())
        tr, te = cls(r, train=True, download=False), cls(r, train=False, download=False)
        return tr, None, te, len(tr.classes), False
    if name == "food101":
        cls = _tv("Food101")
        tr = cls(r, split="train", download=False)
        return tr, None, cls(r, split="test", download=False), len(tr.classes), False
    if name == "dtd":
        cls = _tv("DTD")
        tr = cls(r, split="train", download=False)
        return tr, cls(r, split="val", download=False), cls(r, split="test", download=False), len(tr.classes), False
    if name == "pets":
        cls = _tv("OxfordIIITPet")
        tr = cls(r, split="trainval", target_types="category", download=False)
        return tr, None, cls(r, split="test", target_types="category", download=False), len(tr.classes), False
    if name == "flowers102":
        cls = _tv("Flowers102")
        tr = cls(r, split="train", download=False)
        return tr, cls(r, split="val", download=False), cls(r, split="test", download=False), 102, False
    if name == "cars":
        cls = _tv("StanfordCars")
        tr = cls(r, split="train", download=False)
        return tr, None, cls(r, split="test", download=False), len(tr.classes), False
    if name == "fgvc_aircraft":
        cls = _tv("FGVCAircraft")
        kw = dict(annotation_level="variant", download=False)
        tr = cls(r, split="train", **kw)
        return tr, cls(r, split="val", **kw), cls(r, split="test", **kw), len(tr.classes), False
    if name in ("sun397", "caltech101"):
        full = _tv("SUN397")(r, download=False) if name == "sun397" else \
            _tv("Caltech101")(r, target_type="category", download=False)
        n_train, n_test = (50, 50) if name == "sun397" else (30, None)
        tr_idx, te_idx = per_class_split(labels_of(full), n_train, n_test, seed)
        return Subset(full, tr_idx), None, Subset(full, te_idx), len(full.categories), False
    if name == "imagenet":
        cls = _tv("ImageNet")
        tr = cls(r, split="train")
        return tr, None, cls(r, split="val"), 1000, False
    if name == "fashion_mnist":
        from mlcd.data import fashion_mnist
        tr = ArrayImages(*fashion_mnist.load("train", root=root, download=False))
        te = ArrayImages(*fashion_mnist.load("test", root=root, download=False))
        return tr, None, te, 10, True
    raise KeyError(f"unknown dataset {name!r}; known: {sorted(KNOWN)} or type: imagefolder")


KNOWN = {"cifar10", "cifar100", "food101", "dtd", "pets", "flowers102", "cars", "fgvc_aircraft", "sun397",
         "caltech101", "imagenet", "fashion_mnist"}


def _imagefolder(root: str):
    from torchvision.datasets import ImageFolder
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"ImageFolder root {base} does not exist")
    parts = {s: base / s for s in ("train", "val", "test") if (base / s).is_dir()}
    if "train" not in parts or not ({"val", "test"} & set(parts)):
        raise FileNotFoundError(f"{base}: an ImageFolder dataset needs train/ and test/ (or val/) subdirectories")
    sets = {s: ImageFolder(str(p)) for s, p in parts.items()}
    classes = sets["train"].classes
    for s, d in sets.items():
        if d.classes != classes:
            raise ValueError(f"{base}/{s}: classes differ from train/ ({len(d.classes)} vs {len(classes)})")
    if "test" not in sets:                            # train/ + val/: val is the test set, search on train
        return sets["train"], None, sets["val"], len(classes), False
    return sets["train"], sets.get("val"), sets["test"], len(classes), False


def load_dataset(name: str, root: str, kind: str | None = None, metric: str | None = None,
                 seed: int = 0) -> Splits:
    """Open a dataset from disk (never downloads). Raises FileNotFoundError/RuntimeError when absent."""
    if kind == "imagefolder":
        tr, va, te, nc, gray = _imagefolder(root)
    else:
        tr, va, te, nc, gray = _load(name, root, seed)
    metric = metric or ("mean_per_class" if name in MEAN_PER_CLASS else "top1")
    return Splits(name, tr, va, te, nc, metric, gray, "official" if va is not None else "held_out")
