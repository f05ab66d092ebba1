"""Write webdataset tar shards from an image folder, a CSV/TSV/parquet table, Fashion-MNIST or a torchvision dataset.

    python -m mlcd.data.make_shards --source folder --input /data/imgs --out /data/shards --prefix imgs
    python -m mlcd.data.make_shards --source csv --input list.tsv --out DIR          # path[<TAB>caption]
    python -m mlcd.data.make_shards --source fashion_mnist --split all --out data/fmnist
    python -m mlcd.data.make_shards --source torchvision --dataset CIFAR10 --root ~/cifar --out DIR

Each sample is `{__key__, jpg|png|webp, [txt], [cls]}`. Keys are stable (derived from the relative path or
the row/index), so the key-aligned label files beside the shards (mlcd/data/labels.py) stay valid when the
shards are rewritten. JPEG/PNG/WEBP files are copied byte for byte; anything else (other file formats,
arrays) is encoded once with --image-format. Every tar is written under a temp name and renamed, and
OUT/manifest.json (written last) lists per shard its name, count and first/last key.
"""
import argparse
import csv
import io
import json
import os
import re
import struct
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from mlcd import fileio

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


def sniff_format(data: bytes) -> str | None:
    """The tar extension for bytes we may copy as they are, from magic bytes (not the file name)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def png_from_array(a: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG (filter 0, zlib level 6). Several times faster than PIL's adaptive
    filtering on small images (Fashion-MNIST: 70k of them), equally lossless."""
    h, w = a.shape[:2]
    rows = np.zeros((h, 1 + a[0].size), np.uint8)  # each row: filter byte 0, then the pixels
    rows[:, 1:] = a.reshape(h, -1)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if a.ndim == 2 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def encode_image(img, image_format: str = "png", quality: int = 95) -> bytes:
    """PIL image or uint8 array ([H, W] gray or [H, W, 3] RGB) -> encoded bytes."""
    if isinstance(img, np.ndarray):
        if image_format == "png" and img.dtype == np.uint8 and (img.ndim == 2 or img.shape[-1:] == (3,)):
            return png_from_array(img)
        img = Image.fromarray(img)
    if image_format == "jpg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif image_format == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    elif image_format == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"image_format must be png, jpg or webp, got {image_format!r}")
    return buf.getvalue()


def image_member(data: bytes, image_format: str, quality: int, verify: bool = False) -> tuple[str, bytes]:
    """(extension, bytes): copied when already JPEG/PNG/WEBP, else decoded and re-encoded (raises if unreadable)."""
    ext = sniff_format(data)
    if ext is not None and not verify:
        return ext, data
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if ext is not None:
            return ext, data
        return image_format, encode_image(img, image_format, quality)


def sanitize_key(relpath: str) -> str:
    """'a/b c.d/x.jpg' -> 'a_b_c_d_x': webdataset splits a member name at the first '.' of its basename."""
    stem = relpath[: -len(Path(relpath).suffix)] if Path(relpath).suffix else relpath
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace(os.sep, "/").replace("/", "__"))


def _member(name: str, data: bytes) -> bytes:
    """One tar member (header + data + padding). Fixed metadata: the same input gives byte-identical shards.

    Names up to 100 bytes get a plain ustar header written here (tarfile's is ~10x slower per member);
    longer ones a PAX header from tarfile."""
    raw = name.encode("utf-8")
    if len(raw) <= 100:
        h = bytearray(512)
        h[0:len(raw)] = raw
        h[100:108], h[108:116], h[116:124] = b"0000444\0", b"0000000\0", b"0000000\0"
        h[124:136], h[136:148] = b"%011o\0" % len(data), b"00000000000\0"
        h[148:156], h[156:157], h[257:265] = b" " * 8, b"0", b"ustar\x0000"
        h[148:156] = b"%06o\0 " % sum(h)
        header = bytes(h)
    else:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + b"\0" * (-len(data) % 512)


class ShardWriter:
    """Writes samples into OUT/{prefix}-{i:06d}.tar (temp name, then rename) and collects the manifest rows."""

    def __init__(self, out_dir, prefix: str, max_per_shard: int, overwrite: bool = False):
        if max_per_shard < 1:
            raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
            raise ValueError(f"prefix {prefix!r}: use letters, digits, '_', '-', '.' only")
        self.out, self.prefix, self.max_per_shard = Path(out_dir), prefix, max_per_shard
        self.out.mkdir(parents=True, exist_ok=True)
        old = sorted(self.out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if old and not overwrite:
            raise FileExistsError(f"{self.out} already holds {len(old)} '{prefix}-*.tar' shards; pass --overwrite")
        for p in old + [self.out / "manifest.json"]:
            if p.exists():
                p.unlink()
        self.shards, self.keys = [], set()
        self._file = None

    def _close_shard(self):
        if self._file is None:
            return
        self._file.write(b"\0" * 1024)  # end-of-archive marker
        self._file.close()
        row = self.shards[-1]
        os.replace(self.out / (row["name"] + ".tmp"), self.out / row["name"])
        self._file = None

    def write(self, key: str, image_ext: str, image: bytes, txt: str | None = None, cls: int | None = None):
        if key in self.keys:
            raise ValueError(f"duplicate key {key!r}")
        if "." in key or "\n" in key or not key:
            raise ValueError(f"invalid key {key!r}: no '.', no newline, not empty")
        self.keys.add(key)
        if self._file is None or self.shards[-1]["count"] >= self.max_per_shard:
            self._close_shard()
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._file = open(self.out / (name + ".tmp"), "wb", buffering=1 << 20)
            self.shards.append({"name": name, "count": 0, "first_key": key, "last_key": key})
        self._file.write(_member(f"{key}.{image_ext}", image))
        if txt is not None:
            self._file.write(_member(f"{key}.txt", txt.encode("utf-8")))
        if cls is not None:
            self._file.write(_member(f"{key}.cls", str(int(cls)).encode()))
        row = self.shards[-1]
        row["count"] += 1
        row["last_key"] = key

    def finish(self, source: dict, class_names=None, skipped=None) -> dict:
        self._close_shard()
        manifest = {
            "created_by": "mlcd.data.make_shards", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": source, "prefix": self.prefix, "max_per_shard": self.max_per_shard,
            "total": sum(s["count"] for s in self.shards), "num_shards": len(self.shards),
            "urls": f"{self.prefix}-{{000000..{max(len(self.shards) - 1, 0):06d}}}.tar",
            "class_names": list(class_names) if class_names is not None else None,
            "skipped": skipped or {}, "shards": self.shards,
        }
        fileio.write_json(self.out / "manifest.json", manifest, indent=1)
        return manifest


def _progress(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=None)


def write_samples(samples, out_dir, prefix, max_per_shard, source, total=None, class_names=None,
                  overwrite=False) -> dict:
    """Core writer. `samples` yields (key, ext, bytes, txt|None, cls|None) or None for an unreadable input."""
    writer = ShardWriter(out_dir, prefix, max_per_shard, overwrite)
    skipped = {}
    with _progress(total, f"shards {prefix}") as bar:
        for s in samples:
            bar.update(1)
            if isinstance(s, str):  # a skip reason
                skipped[s] = skipped.get(s, 0) + 1
                continue
            writer.write(*s)
    if not writer.shards:
        raise ValueError(f"no samples written for source {source}")
    return writer.finish(source, class_names, skipped)


# ---- sources: each is an API function (tests/demo call it) and a CLI branch ----

def shards_from_folder(folder, out_dir, prefix="shard", max_per_shard=10000, class_from_dir=False,
                       image_format="png", quality=95, verify=False, limit=None, overwrite=False) -> dict:
    """Images under `folder` (recursive, sorted), NAME.txt beside NAME.jpg as caption; optional class = top dir."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"--input {root} is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    class_names = None
    if class_from_dir:
        class_names = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
        if not class_names:
            raise ValueError(f"class_from_dir: no sub-directories under {root}")
    cls_index = {c: i for i, c in enumerate(class_names or [])}

    def samples():
        used = set()
        for p in paths:
            rel = p.relative_to(root).as_posix()
            key = sanitize_key(rel)
            n = 1
            while key in used:  # 'a/b.jpg' vs 'a_b.jpg', 'x.jpg' vs 'x.png': suffix in sorted-path order
                n += 1
                key = f"{sanitize_key(rel)}-{n}"
            used.add(key)
            try:
                ext, data = image_member(p.read_bytes(), image_format, quality, verify)
            except Exception as e:  # noqa: BLE001 - an unreadable file is skipped, counted and named
                print(f"make_shards: skipping unreadable image {p}: {type(e).__name__}: {e}", file=sys.stderr)
                yield "unreadable_image"
                continue
            cap = p.with_suffix(".txt")
            txt = cap.read_text(encoding="utf-8").strip() if cap.exists() else None
            parts = p.relative_to(root).parts
            cls = cls_index.get(parts[0]) if class_from_dir and len(parts) > 1 else None
            yield key, ext, data, txt, cls

    source = {"type": "folder", "input": str(root.resolve()), "class_from_dir": class_from_dir}
    return write_samples(samples(), out_dir, prefix, max_per_shard, source, len(paths), class_names, overwrite)


def _read_table(path: Path):
    """Rows of {'path', 'caption'?, 'cls'?} from CSV/TSV (header row optional: path[,caption]) or parquet."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            try:
                import pandas as pd
            except ImportError:
                raise ImportError(f"{path}: reading parquet needs pyarrow or pandas (pip install pyarrow); "
                                  "or convert the table to CSV/TSV") from None
            table = pd.read_parquet(path).to_dict("list")
        else:
            table = pq.read_table(path).to_pydict()
        if "path" not in table:
            raise ValueError(f"{path}: parquet needs a 'path' column, has {sorted(table)}")
        n = len(table["path"])
        return [{c: table[c][i] for c in ("path", "caption", "cls") if c in table} for i in range(n)]
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delim) if r]
    if not rows:
        raise ValueError(f"{path}: empty table")
    header = [h.strip().lower() for h in rows[0]]
    if "path" in header:
        cols, rows = header, rows[1:]
    else:
        cols = ["path", "caption", "cls"][: len(rows[0])]
    out = []
    for i, r in enumerate(rows):
        if len(r) != len(cols):
            raise ValueError(f"{path}: row {i + 1} has {len(r)} fields, expected {len(cols)} ({cols})")
        out.append({c: v for c, v in zip(cols, r) if c in ("path", "caption", "cls")})
    return out


def shards_from_table(table, out_dir, prefix=None, max_per_shard=10000, root=None, image_format="png",
                      quality=95, verify=False, limit=None, overwrite=False) -> dict:
    """Rows path[,caption[,cls]] of a CSV/TSV/parquet; relative paths resolve against `root` (default: the table's dir).

    Keys are `{table stem}-{row:09d}`: stable for the same table."""
    table = Path(table)
    rows = _read_table(table)[:limit] if limit else _read_table(table)
    base = Path(root) if root else table.parent
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", table.stem)

    def samples():
        for i, r in enumerate(rows):
            p = Path(r["path"]) if os.path.isabs(r["path"]) else base / r["path"]
            try:
                ext, data = image_member(p.read_bytes(), image_format, quality, verify)
            except Exception as e:  # noqa: BLE001
                print(f"make_shards: skipping row {i} ({p}): {type(e).__name__}: {e}", file=sys.stderr)
                yield "unreadable_image"
                continue
            cap = r.get("caption")
            cls = r.get("cls")
            yield f"{stem}-{i:09d}", ext, data, (str(cap) if cap not in (None, "") else None), \
                (int(cls) if cls not in (None, "") else None)

    source = {"type": "table", "input": str(table.resolve()), "root": str(base.resolve())}
    return write_samples(samples(), out_dir, prefix or stem, max_per_shard, source, len(rows), None, overwrite)


def _array_samples(images, labels, key_prefix, image_format, quality):
    for i, (img, lab) in enumerate(zip(images, labels)):
        yield f"{key_prefix}-{i:07d}", image_format, encode_image(img, image_format, quality), None, int(lab)


def shards_from_fashion_mnist(out_dir, split="train", prefix=None, max_per_shard=10000, root=None,
                              image_format="png", quality=95, limit=None, overwrite=False) -> dict:
    """Fashion-MNIST ('train' 60k, 'test' 10k, 'all' 70k = train then test) as 28x28 grayscale PNG + .cls.

    Keys: fmnist-train-0000123 / fmnist-test-0000123 (index within the official split)."""
    from mlcd.data import fashion_mnist
    splits = ["train", "test"] if split == "all" else [split]
    parts = [(s, *fashion_mnist.load(s, root)) for s in splits]
    total = sum(len(x) for _, x, _ in parts)

    def samples():
        n = 0
        for s, images, labels in parts:
            for sample in _array_samples(images, labels, f"fmnist-{s}", image_format, quality):
                if limit and n >= limit:
                    return
                n += 1
                yield sample

    source = {"type": "fashion_mnist", "split": split, "root": str(fashion_mnist.resolve_root(root, False)),
              "image_format": image_format}
    return write_samples(samples(), out_dir, prefix or f"fmnist-{split}", max_per_shard, source,
                         min(total, limit) if limit else total, fashion_mnist.CLASSES, overwrite)


def shards_from_torchvision(dataset, root, out_dir, split="train", prefix=None, max_per_shard=10000,
                            image_format="png", quality=95, limit=None, overwrite=False) -> dict:
    """A torchvision.datasets class with its files already under `root` (never downloads).

    `split` goes to the class as `split=` when it takes one (SVHN, STL10, ...), else as `train=` (CIFAR, MNIST)."""
    import inspect

    import torchvision.datasets as tvd
    cls_ = getattr(tvd, dataset, None)
    if cls_ is None:
        raise ValueError(f"torchvision.datasets has no class {dataset!r}")
    params = inspect.signature(cls_).parameters
    kw = {"split": split} if "split" in params else {"train": split == "train"} if "train" in params else {}
    if "download" in params:
        kw["download"] = False
    ds = cls_(root=str(root), **kw)
    n = min(len(ds), limit) if limit else len(ds)
    key_prefix = f"{dataset.lower()}-{split}"

    def samples():
        for i in range(n):
            img, target = ds[i]
            if isinstance(img, Image.Image) and getattr(img, "filename", None) and not img.mode.startswith("I"):
                data = Path(img.filename).read_bytes()  # file-backed datasets: copy when JPEG/PNG/WEBP
                ext, data = image_member(data, image_format, quality)
            else:
                ext, data = image_format, encode_image(img if isinstance(img, Image.Image) else np.asarray(img),
                                                        image_format, quality)
            cls = int(target) if isinstance(target, (int, np.integer)) or (
                hasattr(target, "ndim") and target.ndim == 0) else None
            yield f"{key_prefix}-{i:07d}", ext, data, None, cls

    source = {"type": "torchvision", "dataset": dataset, "root": str(Path(root).resolve()), "split": split}
    return write_samples(samples(), out_dir, prefix or key_prefix, max_per_shard, source, n,
                         getattr(ds, "classes", None), overwrite)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mlcd.data.make_shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, choices=["folder", "csv", "fashion_mnist", "torchvision"])
    ap.add_argument("--out", required=True, help="output directory for the tars and manifest.json")
    ap.add_argument("--input", help="folder: image directory; csv: a .csv/.tsv/.parquet table of path[,caption]")
    ap.add_argument("--root", help="csv: base dir for relative paths; fashion_mnist: idx dir (default: Debian "
                                   "package); torchvision: the dataset root")
    ap.add_argument("--dataset", help="torchvision: class name in torchvision.datasets, e.g. CIFAR10")
    ap.add_argument("--split", default="train", help="fashion_mnist: train|test|all; torchvision: train|test|...")
    ap.add_argument("--prefix", help="shard name prefix (default depends on the source)")
    ap.add_argument("--max-per-shard", type=int, default=10000)
    ap.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"],
                    help="encoding for images that must be (re-)encoded; JPEG/PNG/WEBP files are copied as is")
    ap.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    ap.add_argument("--class-from-dir", action="store_true", help="folder: top-level sub-directory = class (.cls)")
    ap.add_argument("--verify", action="store_true", help="decode every copied image; skip (and count) bad ones")
    ap.add_argument("--limit", type=int, help="only the first N samples")
    ap.add_argument("--overwrite", action="store_true", help="replace existing shards with the same prefix")
    a = ap.parse_args(argv)

    common = dict(max_per_shard=a.max_per_shard, image_format=a.image_format, quality=a.quality, limit=a.limit,
                  overwrite=a.overwrite)
    if a.source in ("folder", "csv") and not a.input:
        ap.error(f"--source {a.source} needs --input")
    if a.source == "folder":
        m = shards_from_folder(a.input, a.out, prefix=a.prefix or sanitize_key(Path(a.input).resolve().name) or "shard",
                               class_from_dir=a.class_from_dir, verify=a.verify, **common)
    elif a.source == "csv":
        m = shards_from_table(a.input, a.out, prefix=a.prefix, root=a.root, verify=a.verify, **common)
    elif a.source == "fashion_mnist":
        if a.split not in ("train", "test", "all"):
            ap.error("--source fashion_mnist: --split must be train, test or all")
        m = shards_from_fashion_mnist(a.out, a.split, prefix=a.prefix, root=a.root, **common)
    else:
        if not a.dataset or not a.root:
            ap.error("--source torchvision needs --dataset and --root")
        m = shards_from_torchvision(a.dataset, a.root, a.out, a.split, prefix=a.prefix, **common)
    print(f"wrote {m['total']} samples in {m['num_shards']} shards to {a.out} "
          f"(urls: {Path(a.out) / m['urls']}); skipped: {m['skipped'] or 'none'}")


if __name__ == "__main__":
    main()
