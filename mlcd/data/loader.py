"""Webdataset loaders: the training stream (images + multi-labels) and the single-pass extraction stream.

Both read tar shards directly (local paths, brace patterns, `pipe:` commands and URLs via webdataset's
gopen) with a small tar reader that can tell a clean end from a truncated file, group members into
samples by `__key__` (webdataset's rule: the name up to the first '.' of the basename), decode with PIL
and transform in DataLoader workers.

Bad data is skipped and counted, never silently: every stream keeps a count per reason (REASONS),
attaches a snapshot of its cumulative counts to each batch it yields (and one final snapshot when it
ends), and the loader sums the latest snapshot of every worker in the main process: `.skip_counts()`.

Training (`make_train_loader`):
  * resampled=True (training): an infinite stream. Stream s = rank * num_workers + worker of S streams
    reads the shards urls[s::S] (all shards if there are fewer than S) in a fresh random order on each
    pass. Within a pass no two streams read the same shard.
  * resampled=False: one exact pass; shards (shuffled by `seed` when shuffle=True, identically on every
    rank) are split by rank, then by worker; every sample is seen once over all ranks and workers.
  * then a shuffle buffer over the raw (still encoded) samples, decode, TrainTransform, batches of
    (images float32 [B, 3, S, S], labels int64 [B, k]).
  * All randomness comes from generators seeded by (seed, rank, world_size, worker, num_workers), and the
    DataLoader's round-robin over workers is deterministic: the same arguments give the same batches.
  * Labels are joined by key from the files beside the shards (mlcd/data/labels.py), loaded once per
    shard in each worker. A missing label or a label file of the wrong shape/dtype raises an error
    naming shard and key, or with on_bad_labels='skip' is skipped and counted.

Extraction (`make_extract_loader`): one pass in shard order then in-shard order, whatever num_workers:
batch b of the stream is decoded by worker b % num_workers (every worker reads the tar bytes, only the
owner decodes), and the DataLoader's in-order round-robin hands the batches back as 0, 1, 2, ... For
remote `pipe:` shards that means num_workers reads of each tar: use few workers, or local copies.
"""
import glob
import gzip
import io
import logging
import os
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mlcd import dist
from mlcd.dist import derive_seed
from mlcd.data.labels import read_shard_labels, shard_stem
from mlcd.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, to_rgb

log = logging.getLogger("mlcd.data")

# Why a sample (or the rest of a shard) was skipped. Always all present in skip_counts(), so ranks can
# all-reduce the same keys.
REASONS = (
    "truncated_tar",   # shard ended before the end-of-archive marker (per shard; a possibly incomplete sample dropped)
    "corrupt_tar",     # bad tar header checksum / unreadable stream (per shard; the rest of the shard is lost)
    "shard_error",     # shard could not be opened or read, or was empty (per shard)
    "no_image",        # sample without a jpg/jpeg/png/webp member
    "bad_image",       # image bytes PIL cannot decode
    "missing_labels",  # on_bad_labels='skip': no labels for this key / shard
    "bad_labels",      # on_bad_labels='skip': labels of the wrong shape, dtype or value
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MAX_WARNINGS = 20  # per stream; the counts keep going


# ---------------------------------------------------------------- shard lists and tar reading

def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_urls(urls) -> list[str]:
    """'d/s-{000..009}.tar', 'a.tar::b/{0..3}.tar', a glob, or a list of any of these -> a list of shards.

    Local paths must exist (the error names the missing ones)."""
    from webdataset.shardlists import expand_urls as wds_expand

    items = urls.split("::") if isinstance(urls, str) else list(urls)
    out = []
    for item in items:
        for u in wds_expand(str(item)):
            if not _is_remote(u) and any(c in u for c in "*?["):
                found = sorted(glob.glob(os.path.expanduser(u)))
                if not found:
                    raise FileNotFoundError(f"no shards match {u!r}")
                out.extend(found)
            else:
                out.append(u if _is_remote(u) else os.path.expanduser(u))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    missing = [u for u in out if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(out)} shards do not exist, e.g. {missing[:3]}")
    return out


def open_url(url: str):
    if _is_remote(url):
        import webdataset as wds
        return wds.gopen(url, "rb")
    return open(url, "rb")


class TarError(Exception):
    def __init__(self, reason: str, msg: str, name: str | None = None):
        super().__init__(msg)
        self.reason, self.name = reason, name  # name: the member being read, when its header was intact


def _read_exact(f, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _octal(field: bytes) -> int:
    s = field.rstrip(b"\0 ").strip()
    return int(s, 8) if s else 0


def _pax_path(data: bytes):
    """The 'path' record of a PAX extended header ('%d path=...\\n' records), if any."""
    i = 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        rec = data[sp + 1: i + n - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            return v.decode("utf-8")
        i += n
    return None


def iter_tar(f):
    """Yield (name, bytes) of the regular files in a tar stream (ustar, PAX and GNU long names).

    Raises TarError('truncated_tar') when the stream ends before the end-of-archive block and
    TarError('corrupt_tar') on a header whose checksum does not match."""
    next_name, first = None, True
    while True:
        hdr = _read_exact(f, 512)
        if first and not hdr:
            raise TarError("shard_error", "empty stream (0 bytes): a failed download or pipe command?")
        first = False
        if len(hdr) < 512:
            raise TarError("truncated_tar", f"tar ends inside a header or without an end marker ({len(hdr)} bytes)")
        if hdr.count(0) == 512:
            return
        stored = _octal(hdr[148:156]) if hdr[148:156].strip(b"\0 ") else -1
        if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarError("corrupt_tar", "tar header checksum mismatch")
        if hdr[124] & 0x80:
            raise TarError("corrupt_tar", "base-256 sizes (members > 8 GiB) are not supported")
        size, kind = _octal(hdr[124:136]), hdr[156:157]
        data = _read_exact(f, size)
        pad = (-size) % 512
        if len(data) < size or len(_read_exact(f, pad)) < pad:
            name = next_name or hdr[0:100].rstrip(b"\0").decode("utf-8", "replace")
            raise TarError("truncated_tar", f"tar ends inside member {name} ({len(data)} of {size} bytes)",
                           name if kind in (b"0", b"\0", b"7") else None)
        if kind == b"x":
            next_name = _pax_path(data) or next_name
        elif kind == b"L":
            next_name = data.rstrip(b"\0").decode("utf-8")
        elif kind in (b"0", b"\0", b"7"):
            name = next_name
            if name is None:
                name = hdr[0:100].rstrip(b"\0").decode("utf-8")
                prefix = hdr[345:500].rstrip(b"\0").decode("utf-8") if hdr[257:262] == b"ustar" else ""
                name = f"{prefix}/{name}" if prefix else name
            next_name = None
            yield name, data
        else:  # directories, links, global headers: not samples
            next_name = None


def split_key(name: str):
    """webdataset's rule: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg')."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class Counts(dict):
    def __init__(self):
        super().__init__({r: 0 for r in REASONS})
        self.warned = 0

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self[reason] += 1
        if self.warned < _MAX_WARNINGS:
            self.warned += 1
            log.warning("skipped (%s) %s %s%s", reason, where, detail,
                        " [further skip warnings from this stream suppressed]" if self.warned == _MAX_WARNINGS else "")


def iter_samples(url: str, counts: Counts | None):
    """Samples {'__key__', '__url__', ext: bytes} of one shard in tar order; tar problems end the shard, counted."""
    sample, failed = None, False
    try:
        f = open_url(url)
    except Exception as e:  # noqa: BLE001 - a shard that cannot be opened mid-run is skipped and counted
        if counts is not None:
            counts.add("shard_error", url, f"{type(e).__name__}: {e}")
        return
    try:
        gz = url.endswith((".gz", ".tgz")) or (hasattr(f, "peek") and f.peek(2)[:2] == b"\x1f\x8b")
        stream = gzip.GzipFile(fileobj=f) if gz else f
        for name, data in iter_tar(stream):
            if name.rsplit("/", 1)[-1].startswith("."):
                continue
            key, ext = split_key(name)
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
        if sample is not None:
            yield sample
    except TarError as e:
        # the sample in progress is complete only if the broken member starts another key; else it is dropped
        if sample is not None and e.name is not None and split_key(e.name)[0] != sample["__key__"]:
            yield sample
        failed = True
        if counts is not None:
            counts.add(e.reason, url, str(e))
    except (OSError, EOFError, ValueError) as e:  # gzip errors, pipe failures
        failed = True
        if counts is not None:
            counts.add("shard_error", url, f"{type(e).__name__}: {e}")
    finally:
        try:
            f.close()  # a `pipe:` command's non-zero exit status surfaces here
        except Exception as e:  # noqa: BLE001
            if counts is not None and not failed:
                counts.add("shard_error", url, f"{type(e).__name__}: {e}")


def decode_image(sample: dict):
    """RGB PIL image of the sample, or the skip reason ('no_image' / 'bad_image')."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return "no_image"
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        img.load()
        return to_rgb(img)
    except Exception:  # noqa: BLE001 - any decoder failure is a bad image
        return "bad_image"


def _worker():
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _stack(tensors: list) -> torch.Tensor:
    """torch.stack; in a worker straight into shared memory, saving the copy the trip to the main process makes."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype).share_memory_()
    return torch.stack(tensors, out=out)


class _Loader:
    """Iterates a DataLoader over a stream dataset; strips and aggregates the per-worker skip counts."""

    def __init__(self, dataset: IterableDataset, num_workers: int):
        self.dataset, self.num_workers = dataset, int(num_workers)
        self._done = {r: 0 for r in REASONS}   # from finished iterations
        self._live = {}                         # worker id -> latest cumulative counts of this iteration

    def __iter__(self):
        for c in self._live.values():
            for r, v in c.items():
                self._done[r] += v
        self._live = {}
        kw = dict(prefetch_factor=2) if self.num_workers > 0 else {}
        dl = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        generator=torch.Generator().manual_seed(0), **kw)  # keep torch's global RNG untouched
        it = iter(dl)
        try:
            for *batch, wid, counts in it:
                self._live[wid] = counts
                if batch[0] is not None:  # None: a stream's final counts, or a batch with no good sample
                    yield tuple(batch)
        finally:  # stop workers now: left to the garbage collector after an error, shutdown waits 5 s per worker
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def skip_counts(self) -> dict:
        total = dict(self._done)
        for c in self._live.values():
            for r, v in c.items():
                total[r] += v
        return total


# ---------------------------------------------------------------- extraction (single pass, ordered)

class _ExtractStream(IterableDataset):
    def __init__(self, urls, transform, batch_size):
        self.urls, self.transform, self.batch_size = urls, transform, int(batch_size)

    def _decode(self, raw, counts):
        images, keys = [], []
        for s in raw:
            img = decode_image(s)
            if isinstance(img, str):
                counts.add(img, s["__url__"], s["__key__"])
                continue
            images.append(self.transform(img))
            keys.append(s["__key__"])
        return (_stack(images) if images else None), keys

    def __iter__(self):
        wid, nw = _worker()
        counts = Counts()
        b = 0  # global batch index; batch b belongs to worker b % nw
        for url in self.urls:
            raw, n = [], 0
            # shard-level problems are seen by every worker: only worker 0 counts them
            for s in iter_samples(url, counts if wid == 0 else None):
                if b % nw == wid:
                    raw.append(s)
                n += 1
                if n == self.batch_size:
                    if b % nw == wid:
                        yield (*self._decode(raw, counts), wid, dict(counts))
                    raw, n, b = [], 0, b + 1
            if n:
                if b % nw == wid:
                    yield (*self._decode(raw, counts), wid, dict(counts))
                b += 1
        yield None, None, wid, dict(counts)


def make_extract_loader(urls, transform=None, batch_size: int = 256, num_workers: int = 4, image_size: int = 224):
    """Single pass over `urls` in shard order, then tar order -> (images [B, 3, H, W], keys list[str]).

    `transform(pil_rgb) -> Tensor[3, H, W]` (default: EvalTransform(image_size)). Bad samples are skipped
    and counted (`.skip_counts()`); a batch whose samples were all bad is dropped. Cheap to build per
    shard (the cluster stage calls it with one shard at a time)."""
    urls = expand_urls(urls)
    transform = transform if transform is not None else EvalTransform(image_size)
    return _Loader(_ExtractStream(urls, transform, batch_size), num_workers)


# ---------------------------------------------------------------- training (labels joined by key)

class _LabelIndex:
    """One shard's labels as {key: row int64 [k]}, or the reason every key of the shard is bad."""

    def __init__(self, labels_dir, url: str, k: int):
        self.stem, self.rows, self.problem = shard_stem(url), {}, None
        try:
            keys, labels, _ = read_shard_labels(labels_dir, self.stem)
        except FileNotFoundError as e:
            self.problem = ("missing_labels", str(e))
            return
        except ValueError as e:
            self.problem = ("bad_labels", str(e))
            return
        if labels.shape[1] < k:
            self.problem = ("bad_labels", f"labels of shard {self.stem} have k={labels.shape[1]} columns, "
                                          f"{k} are needed")
            return
        labels = labels[:, :k].astype(np.int64)  # columns are sorted by similarity: the first k are the top-k
        self.rows = dict(zip(keys, labels))

    def get(self, key: str):
        """(row, None) or (None, (reason, detail))."""
        if self.problem is not None:
            return None, self.problem
        row = self.rows.get(key)
        if row is None:
            return None, ("missing_labels", f"key not in the labels of shard {self.stem}")
        if (row < -1).any():
            return None, ("bad_labels", f"label ids {row.tolist()} (only -1 may pad)")
        return row, None


def infer_k(labels_dir, urls) -> int:
    """k of the first shard whose labels exist (read from the .npy header only)."""
    for url in urls:
        p = Path(labels_dir) / f"{shard_stem(url)}.labels.npy"
        if p.exists():
            arr = np.load(p, mmap_mode="r")
            if arr.ndim != 2:
                raise ValueError(f"{p}: labels must be [n, k], got shape {arr.shape}")
            return int(arr.shape[1])
    raise FileNotFoundError(f"no label files for any of the {len(urls)} shards in {labels_dir} "
                            f"(expected e.g. {shard_stem(urls[0])}.labels.npy; run cluster.py assign)")


def shuffle_buffer(items, bufsize: int, rng: random.Random):
    """Reservoir-style shuffle: keep `bufsize` items, emit a random one for each new item."""
    if bufsize <= 1:
        yield from items
        return
    buf = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        i = rng.randrange(len(buf))
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


def split_shards(urls, rank: int, world: int, worker: int, num_workers: int) -> list[str]:
    """Single-pass split: by rank (node), then by worker; a partition of `urls`."""
    return urls[rank::world][worker::num_workers]


class _TrainStream(IterableDataset):
    def __init__(self, urls, labels_dir, batch_size, k, seed, rank, world, num_workers, transform,
                 bufsize, resampled, shuffle, on_bad_labels, partial, cache_shards=8):
        self.__dict__.update(urls=urls, labels_dir=labels_dir, batch_size=int(batch_size), k=int(k),
                             seed=int(seed), rank=rank, world=world, num_workers=max(int(num_workers), 1),
                             transform=transform, bufsize=int(bufsize), resampled=resampled, shuffle=shuffle,
                             on_bad_labels=on_bad_labels, partial=partial, cache_shards=cache_shards)

    def _shards(self, wid: int, rng: random.Random):
        if not self.resampled:
            urls = list(self.urls)
            if self.shuffle:  # the same permutation on every rank and worker, so the split stays a partition
                random.Random(derive_seed(self.seed, "shard-order")).shuffle(urls)
            yield from split_shards(urls, self.rank, self.world, wid, self.num_workers)
            return
        n_streams = self.world * self.num_workers
        s = self.rank * self.num_workers + wid
        mine = self.urls[s::n_streams] if len(self.urls) >= n_streams else list(self.urls)
        while True:
            yield from rng.sample(mine, len(mine))

    def _labelled(self, wid: int, counts: Counts):
        """Raw samples with their label row, in shard order; bad labels raise or are counted."""
        rng = random.Random(derive_seed(self.seed, "shards", self.rank, self.world, wid, self.num_workers))
        cache = OrderedDict()  # url -> _LabelIndex, small LRU (resampled streams revisit shards)
        empty_passes, n_shards, n_good = 0, 0, 0
        for url in self._shards(wid, rng):
            if url not in cache:
                cache[url] = _LabelIndex(self.labels_dir, url, self.k)
                if len(cache) > self.cache_shards:
                    cache.popitem(last=False)
            cache.move_to_end(url)
            index = cache[url]
            for s in iter_samples(url, counts):
                row, problem = index.get(s["__key__"])
                if problem is not None:
                    reason, detail = problem
                    if self.on_bad_labels != "skip":
                        raise ValueError(f"shard {url}: sample {s['__key__']!r}: {reason}: {detail}. "
                                         "Fix the labels, or set data.on_bad_labels=skip to skip such samples")
                    counts.add(reason, url, f"{s['__key__']}: {detail}")
                    continue
                s["__labels__"] = row
                n_good += 1
                yield s
            n_shards += 1
            if self.resampled and n_shards % max(len(self.urls), 1) == 0:  # guard: an endless loop over bad data
                empty_passes = empty_passes + 1 if n_good == 0 else 0
                n_good = 0
                if empty_passes >= 2:
                    raise RuntimeError(f"no usable sample in {len(self.urls)} shards over two passes "
                                       f"(skip counts {dict(counts)}); check the shards and {self.labels_dir}")

    def _batch(self, images, labels, wid, counts):
        return _stack(images), torch.from_numpy(np.stack(labels)), wid, dict(counts)

    def __iter__(self):
        wid, nw = _worker()
        if nw != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers runs in {nw}")
        counts = Counts()
        tag = (self.seed, self.rank, self.world, wid, self.num_workers)
        shuffle_rng = random.Random(derive_seed(*tag, "shuffle"))
        aug_rng = random.Random(derive_seed(*tag, "augment"))
        samples = self._labelled(wid, counts)
        if self.shuffle:
            samples = shuffle_buffer(samples, self.bufsize, shuffle_rng)
        images, labels = [], []
        for s in samples:
            img = decode_image(s)
            if isinstance(img, str):
                counts.add(img, s["__url__"], s["__key__"])
                continue
            images.append(self.transform(img, aug_rng))
            labels.append(s["__labels__"])
            if len(images) == self.batch_size:
                yield self._batch(images, labels, wid, counts)
                images, labels = [], []
        if images and self.partial:
            yield self._batch(images, labels, wid, counts)
        yield None, None, wid, dict(counts)


def make_train_loader(urls, labels_dir, batch_size: int, num_workers: int, image_size: int, seed: int,
                      k: int | None = None, shuffle_buffer: int = 2000, resampled: bool = True,
                      on_bad_labels: str = "error", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                      interpolation: str = "bicubic", mean=CLIP_MEAN, std=CLIP_STD, augment: bool = True,
                      shuffle: bool = True, partial: bool | None = None, rank: int | None = None,
                      world_size: int | None = None):
    """Batches of (images float32 [B, 3, S, S], labels int64 [B, k]) for this rank; see the module docstring.

    resampled=True: infinite, shards split by (rank, worker) stream and re-drawn each pass.
    resampled=False: one exact pass (partial last batch kept unless partial=False).
    k: labels per image (the first k columns of the label files); None = the files' k.
    augment=False: EvalTransform (resize + center crop) instead of RandomResizedCrop + flip.
    rank / world_size: default mlcd.dist.rank() / world_size().
    The stream is a function of (urls, labels, seed, rank, world_size, num_workers, batch_size, settings)."""
    if on_bad_labels not in ("error", "skip"):
        raise ValueError(f"on_bad_labels must be 'error' or 'skip', got {on_bad_labels!r}")
    urls = expand_urls(urls)
    if not os.path.isdir(labels_dir):
        raise FileNotFoundError(f"labels_dir {labels_dir} does not exist (run cluster.py, or set data.labels_dir)")
    rank = dist.rank() if rank is None else int(rank)
    world = dist.world_size() if world_size is None else int(world_size)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    k = infer_k(labels_dir, urls) if k is None else int(k)
    if augment:
        transform = TrainTransform(image_size, scale, ratio, hflip, interpolation, mean, std)
    else:
        transform = EvalTransform(image_size, interpolation, mean, std)
    if not resampled and len(urls) < world * max(num_workers, 1):
        log.warning("%d shards for %d ranks x %d workers: some streams get no shard", len(urls), world,
                    max(num_workers, 1))
    stream = _TrainStream(urls, str(labels_dir), batch_size, k, seed, rank, world, num_workers, transform,
                          shuffle_buffer, resampled, shuffle, on_bad_labels, (not resampled) if partial is None
                          else partial)
    return _Loader(stream, num_workers)
