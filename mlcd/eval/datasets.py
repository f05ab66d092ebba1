"""Linear-probe datasets from local roots (torchvision classes, download=False), CLIP_benchmark
webdatasets and ImageFolders.

Names are CLIP_benchmark's (`cifar10`, `flowers`, `imagenet1k`, ..., `wds/<name>`), so result tables line up
with published ones; `fashion_mnist` is ours. A `wds/<name>` dataset is a local copy of the HF repo
clip-benchmark/wds_<name> (`/` in the name -> `-`): <root>/{train,test}/*.tar holding <key>.webp|png|jpg +
<key>.cls, and optionally classnames.txt; its default root is <datasets_root>/wds_<name>.

Each loader returns PIL images and int labels. The search metric follows CLIP's Table 9 / MLCD's
Table 11: mean per-class accuracy for Pets, Flowers-102, Caltech-101 and FGVC Aircraft, top-1
elsewhere. Datasets without an official split are split here, seeded, with CLIP's sizes
(Caltech-101: 30 train images per class, the rest test; SUN397: 50 train + 50 test per class).
Datasets without an official val split give up a stratified `val_fraction` of train for the
L2 search (CLIP / CLIP_benchmark), which is merged back for the final fit.
"""
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

KNOWN = ("caltech101", "cars", "cifar10", "cifar100", "dtd", "fashion_mnist", "fgvc_aircraft", "flowers", "food101",
         "imagenet1k", "pets", "sun397")
ALIASES = {"flowers102": "flowers", "imagenet": "imagenet1k"}    # our earlier names -> CLIP_benchmark's
MEAN_PER_CLASS = {"pets", "flowers", "caltech101", "fgvc_aircraft"}
KINDS = (None, "imagefolder", "wds")


def canonical_name(name: str, kind: str | None = None) -> str:
    """The CLIP_benchmark name of a dataset entry. Raises (before any work is done) for an unknown name,
    listing the known ones."""
    if kind not in KINDS:
        raise ValueError(f"dataset {name!r}: type must be imagefolder or wds (or absent), got {kind!r}")
    if kind == "imagefolder" or (name.startswith("wds/") and len(name) > 4):
        return name
    if kind == "wds":
        return f"wds/{name}"
    name = ALIASES.get(name, name)
    if name not in KNOWN:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(KNOWN)}; or wds/<name> (a CLIP_benchmark "
                       "webdataset), or a mapping {name: ..., type: imagefolder, root: ...}")
    return name


def default_root(name: str, datasets_root) -> Path:
    """Where a dataset is looked for: <datasets_root>/<name>, or <datasets_root>/wds_<name> for wds/<name>."""
    base = Path(datasets_root or ".")
    if name.startswith("wds/"):
        return base / ("wds_" + name.removeprefix("wds/").replace("/", "-"))
    return base / name


def base_name(name: str) -> str:
    """`wds/vtab/pets` -> `pets` (which metric a dataset's search uses does not depend on its format)."""
    return name.removeprefix("wds/").removeprefix("vtab/")


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
    if name == "flowers":
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
    if name == "imagenet1k":
        cls = _tv("ImageNet")
        tr = cls(r, split="train")
        return tr, None, cls(r, split="val"), 1000, False
    if name == "fashion_mnist":
        from mlcd.data import fashion_mnist
        tr = ArrayImages(*fashion_mnist.load("train", root=root, download=False))
        te = ArrayImages(*fashion_mnist.load("test", root=root, download=False))
        return tr, None, te, 10, True
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(KNOWN)}")


class WdsImages(Dataset):
    """One split of a CLIP_benchmark webdataset (<dir>/*.tar; samples <key>.webp|png|jpg + <key>.cls), read by
    index: the tar headers are scanned once and each image is read back from its byte offset."""
    IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")

    def __init__(self, split_dir: Path):
        tars = sorted(Path(split_dir).glob("*.tar"), key=lambda p: (len(p.stem), p.stem))   # 0, 1, ..., 10
        if not tars:
            raise FileNotFoundError(f"{split_dir}: no .tar shards")
        self.samples, labels = [], []
        for path in tars:
            with tarfile.open(path) as tf:
                parts: dict[str, dict] = {}
                for m in tf.getmembers():
                    if m.isfile():     # webdataset's key: the path up to the first dot of the file name
                        folder, _, file = m.name.rpartition("/")
                        stem, _, ext = file.partition(".")
                        parts.setdefault(f"{folder}/{stem}", {})[ext.lower()] = m
                for key, members in parts.items():
                    image = next((members[e] for e in self.IMAGE_EXTS if e in members), None)
                    if image is None or "cls" not in members:
                        raise ValueError(f"{path}: sample {key!r} has no image or no .cls ({sorted(members)})")
                    labels.append(int(tf.extractfile(members["cls"]).read()))
                    self.samples.append((str(path), image.offset_data, image.size))
        self.targets = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, offset, size = self.samples[i]
        with open(path, "rb") as f:
            f.seek(offset)
            return Image.open(io.BytesIO(f.read(size))), int(self.targets[i])


def _wds(root: str):
    base = Path(root)
    if not (base / "train").is_dir() or not (base / "test").is_dir():
        raise FileNotFoundError(f"webdataset root {base} needs train/ and test/ shard directories "
                                "(a local copy of huggingface.co/datasets/clip-benchmark/wds_<name>)")
    tr, te = WdsImages(base / "train"), WdsImages(base / "test")
    va = WdsImages(base / "val") if (base / "val").is_dir() else None
    names = base / "classnames.txt"
    if names.exists():
        nc = len([line for line in names.read_text().splitlines() if line.strip()])
    else:
        nc = int(max(d.targets.max() for d in (tr, te, va) if d is not None)) + 1
    return tr, va, te, nc, False


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
    elif name.startswith("wds/"):
        tr, va, te, nc, gray = _wds(root)
    else:
        tr, va, te, nc, gray = _load(name, root, seed)
    metric = metric or ("mean_per_class" if base_name(name) in MEAN_PER_CLASS else "top1")
    return Splits(name, tr, va, te, nc, metric, gray, "official" if va is not None else "held_out")
