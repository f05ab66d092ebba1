"""Fashion-MNIST from its idx files: Debian's `dataset-fashion-mnist` package, else torchvision's download."""
import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 8:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} bytes (truncated?)")
    return arr.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for cand in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / stem):
        if cand.exists():
            return cand
    return None


def resolve_root(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find the idx files: an explicit root, then Debian's package, then torchvision's download."""
    candidates = [Path(root)] if root else []
    candidates.append(DEBIAN_ROOT)
    for cand in candidates:
        if _find(cand, _FILES["train"][0]) is not None:
            return cand
    if download:
        from torchvision.datasets import FashionMNIST
        dl_root = Path(root or os.path.expanduser("~/.cache/mlcd/fashion-mnist"))
        FashionMNIST(str(dl_root), train=True, download=True)
        FashionMNIST(str(dl_root), train=False, download=True)
        return dl_root
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found in {[str(c) for c in candidates]}; "
        "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or allow download")


def load(split: str, root: str | os.PathLike | None = None, download: bool = True):
    """Return (images uint8 [n, 28, 28], labels int64 [n]) for split 'train' (60k) or 'test' (10k)."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    base = resolve_root(root, download)
    img_stem, lbl_stem = _FILES[split]
    images, labels = _read_idx(_find(base, img_stem)), _read_idx(_find(base, lbl_stem))
    if len(images) != len(labels):
        raise ValueError(f"{base}: {len(images)} images but {len(labels)} labels for split {split!r}")
    return images, labels.astype(np.int64)
