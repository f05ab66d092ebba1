"""Webdataset loaders: the training stream (images + multi-labels) and the single-pass extraction stream.

Both read tar shards directly (local paths, brace patterns, `pipe:` commands and URLs via webdataset's
gopen) with a small tar reader that can tell a clean end from a truncated or corrupt file, group members into
samples by `__key__` (webdataset's rule: the name up to the first '.' of the basename), decode with PIL
and transform in DataLoader workers.

Bad data is skipped and counted, never silently: every stream keeps a count per reason (REASONS),
attaches a snapshot of its cumulative counts to each batch it yields (and one final snapshot when it
ends), and the loader sums the latest snapshot of every worker in the main process: `.skip_counts()`.
The counts are samples (except 'uncounted_shards'), so for every shard: yielded + counted = its samples.
  * A sample is a run of adjacent members with the same key; a member whose extension the run already has
    starts a new sample. A key already seen in the same shard (adjacent or not) makes the sample corrupt:
    the first occurrence is kept, every repeat is skipped as 'duplicate_key' (a streaming reader cannot
    take back the first, and which of two different samples is right cannot be known).
  * A sample without an image member is 'no_image', one whose image PIL cannot decode 'bad_image'.
  * A shard whose bytes stop early ('truncated_tar', .tar.gz too), that has a bad header or a failing read
    ('corrupt_tar'), or that cannot be opened, is empty or is not a tar ('shard_error'): every sample read
    whole before that point is yielded, the one in progress too unless one of its own members is cut (it
    may lack later members, e.g. its .txt; the reader cannot know). What came after cannot be read, so the
    lost samples are counted from the manifest.json beside the shard (mlcd.data.make_shards writes each
    shard's count): lost = count - samples read. Without that count (`pipe:` URLs, tars from elsewhere, a
    stale manifest) only a cut sample in progress is counted, and the shard adds 1 to 'uncounted_shards'.

Training (`make_train_loader`):
  * resampled=True (training): an infinite stream. Stream s = rank * num_workers + worker of S streams
    reads the shards urls[s::S] (all shards if there are fewer than S) in a fresh random order on each
    pass. Within a pass no two streams read the same shard.
  * resampled=False: one exact pass; shards (shuffled by `seed` when shuffle=True, identically on every
    rank) are split by rank, then by worker; every sample is seen once over all ranks and workers.
  * then a shuffle buffer over the raw (still encoded) samples, decode, TrainTransform, batches of
    (images float32 [B, 3, S, S], labels int64 [B, k]).
  * decode='gpu' (mlcd/data/device_decode.py): the workers stop before decoding. They send batches of encoded
    JPEGs with the crop box and flip drawn from the stream's RNG exactly as TrainTransform draws them (other
    formats decoded and transformed in the worker), and the training process decodes and augments each batch
    on its device (images on that device, labels on the CPU). An image that fails to decode there is counted
    'bad_image' by this process and its slot filled by the next sample of the stream: every batch has exactly
    B images (the last one of a single pass B or fewer, kept unless partial=False), nothing read is dropped
    except what a loader rebuild drops on both paths (shuffle buffers, prefetched batches).
  * All randomness comes from generators seeded by (seed, rank, world_size, worker, num_workers), and the
    DataLoader's round-robin over workers is deterministic: the same arguments give the same batches.
  * Labels are joined by key from the files beside the shards (mlcd/data/labels.py), loaded once per
    shard in each worker. A missing label or a label file of the wrong shape/dtype raises an error
    naming shard and key, or with on_bad_labels='skip' is skipped and counted.

Extraction (`make_extract_loader`): one pass. Worker w of n reads the whole shards w, w+n, w+2n, ... (each
tar is read once, the workers in parallel) in batches that never span shards. `.batches()` yields them
tagged with their shard in the DataLoader's round-robin order (fixed for given shards, batch size and
num_workers), a shard's last batch with the shard's skip counts: the cluster stage encodes each batch and
writes a shard's features when its last batch arrives. Iterating the loader gives (images, keys) in shard
order then tar order; to do so it holds the decoded batches of shards that arrive early (up to about
num_workers - 1 shards' worth).
"""
import glob
import gzip
import io
import json
import logging
import os
import random
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mlcd import dist
from mlcd.dist import derive_seed
from mlcd.data.device_decode import DeviceDecoder, device_decodable, pack
from mlcd.data.labels import read_shard_labels, shard_stem
from mlcd.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, to_rgb

log = logging.getLogger("mlcd.data")

# Why samples were skipped. Always all present in skip_counts(), so ranks can all-reduce the same keys.
REASONS = (
    "truncated_tar",     # samples lost because the shard's bytes stop early (a cut .tar or .tar.gz)
    "corrupt_tar",       # samples lost at a bad tar header checksum or a failing read (corrupt gzip, I/O error)
    "shard_error",       # samples of a shard that cannot be opened, is empty, or is not a tar archive
    "duplicate_key",     # a repeat of a key seen earlier in the same shard (the first one is kept)
    "no_image",          # sample without a jpg/jpeg/png/webp member
    "bad_image",         # image bytes PIL cannot decode (garbage, empty, cut)
    "missing_labels",    # on_bad_labels='skip': no labels for this key / shard
    "bad_labels",        # on_bad_labels='skip': labels of the wrong shape, dtype or value
    "uncounted_shards",  # SHARDS, not samples: broken shards that lost a number of samples no manifest tells
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DECODES = ("cpu", "gpu")  # data.decode: PIL in the workers | the training process's device (device_decode.py)
_MAX_WARNINGS = 20  # per stream; the counts keep going
_READ_ERRORS = (OSError, ValueError, zlib.error)  # disk or pipe failures, corrupt gzip data, undecodable names


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


def manifest_count(url: str) -> int | None:
    """The sample count mlcd.data.make_shards recorded for this shard in the manifest.json beside it, if any."""
    if _is_remote(url):
        return None
    try:
        rows = json.loads((Path(url).parent / "manifest.json").read_text())["shards"]
        return next((int(r["count"]) for r in rows if r.get("name") == Path(url).name), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class TarError(Exception):
    def __init__(self, reason: str, msg: str, name: str | None = None, detail: str = ""):
        super().__init__(msg)
        self.reason, self.name, self.detail = reason, name, detail  # name: the regular member the problem cut


def _read_exact(f, n: int) -> bytes:
    """n bytes, fewer only where the stream ends (a cut .gz stream ends here too instead of raising)."""
    chunks, got = [], 0
    while got < n:
        try:
            b = f.read(n - got)
        except EOFError:  # gzip: compressed stream ended before its end marker = the file is cut
            break
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _octal(field: bytes) -> int | None:
    s = field.rstrip(b"\0 ").strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        return None


def _header_ok(hdr: bytes) -> bool:
    """The checksum field parses and matches the header's byte sum (unsigned, or signed as old tars wrote it)."""
    stored = _octal(hdr[148:156]) if hdr[148:156].strip(b"\0 ") else None
    rest = hdr[:148] + b" " * 8 + hdr[156:]
    return stored is not None and stored in (sum(rest), sum(struct.unpack("512b", rest)))


def _ustar_name(hdr: bytes) -> str:
    name = hdr[0:100].rstrip(b"\0").decode("utf-8")
    prefix = hdr[345:500].rstrip(b"\0").decode("utf-8") if hdr[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


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

    Raises TarError: 'shard_error' for an empty stream or one that does not start with a tar header,
    'truncated_tar' when the bytes stop before the end-of-archive block, 'corrupt_tar' on a header whose
    checksum does not match or a read that fails. A member is yielded as soon as its data is whole."""
    long_name, first, cur = None, True, None  # cur: the regular member whose data is being read
    try:
        while True:
            hdr = _read_exact(f, 512)
            if first and not hdr:
                raise TarError("shard_error", "empty (0 bytes)", detail="a failed download or pipe command?")
            if hdr.count(0) == 512:
                return
            if first and (len(hdr) < 512 or not _header_ok(hdr)):
                raise TarError("shard_error", "not a tar archive", detail=f"no header in the first {len(hdr)} bytes")
            first = False
            if not hdr:
                raise TarError("truncated_tar", "the bytes stop after a member, without the end-of-archive block")
            if len(hdr) < 512:
                raise TarError("truncated_tar", f"the bytes stop inside a tar header ({len(hdr)} of 512 bytes)")
            if not _header_ok(hdr):
                raise TarError("corrupt_tar", "tar header checksum mismatch")
            size, kind = _octal(hdr[124:136]), hdr[156:157]
            if size is None or hdr[124] & 0x80:
                raise TarError("corrupt_tar", f"unreadable or base-256 size field {hdr[124:136]!r}")
            if kind in (b"0", b"\0", b"7"):
                cur = long_name or _ustar_name(hdr)
            data = _read_exact(f, size)
            if len(data) < size:
                raise TarError("truncated_tar", f"the bytes stop inside member {cur or '(an extended header)'} "
                                                f"({len(data)} of {size} bytes)", cur)
            name, cur = cur, None
            if kind == b"x":
                long_name = _pax_path(data) or long_name
            elif kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8")
            else:  # a regular file uses the long name; directories, links, global headers are not samples
                long_name = None
            if name is not None:
                yield name, data
            pad = (-size) % 512
            if len(_read_exact(f, pad)) < pad:
                raise TarError("truncated_tar", "the bytes stop inside the padding after a member")
    except _READ_ERRORS as e:
        detail = f"{type(e).__name__}: {e}"
        if first:
            what = "not a tar archive" if isinstance(e, (gzip.BadGzipFile, zlib.error)) else "cannot read"
            raise TarError("shard_error", what, detail=detail) from e
        raise TarError("corrupt_tar", "unreadable data", cur, detail) from e


def split_key(name: str):
    """webdataset's rule: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg')."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class Counts(dict):
    """Skip counts per reason; the first _MAX_WARNINGS skips are logged. A child (one shard's counts) also
    adds to its parent, which does the logging."""

    def __init__(self, parent: "Counts | None" = None):
        super().__init__({r: 0 for r in REASONS})
        self.parent, self.warned = parent, 0

    def add(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        self[reason] += n
        if self.parent is not None:
            self.parent.add(reason, where, detail, n)
        elif self.warned < _MAX_WARNINGS:
            self.warned += 1
            log.warning("skipped (%s) %s %s%s", reason, where, detail,
                        " [further skip warnings from this stream suppressed]" if self.warned == _MAX_WARNINGS else "")


def _starts_sample(sample, key: str, ext: str) -> bool:
    """A member starts a new sample unless it adds a new extension to the sample being read."""
    return sample is None or sample["__key__"] != key or ext in sample


def _count_lost(counts: Counts, url: str, e: TarError, read: int, cut: bool) -> None:
    """Count what a broken shard lost: from its manifest.json count when known, else 'uncounted_shards'."""
    where, n = f"{e}: {url}" + (f" ({e.detail});" if e.detail else ";"), manifest_count(url)
    if n is not None and n >= read + cut:
        counts.add(e.reason, where, f"{n - read} of its {n} samples (manifest.json) lost", n - read)
        return
    if cut:
        counts.add(e.reason, where, "the sample being read was cut")
    why = "no count in a manifest.json beside it" if n is None else f"manifest.json says {n} samples, {read} read"
    counts.add("uncounted_shards", where, f"an unknown number of samples lost ({why})")


def iter_samples(url: str, counts: Counts | None):
    """Samples {'__key__', '__url__', ext: bytes} of one shard in tar order; skips counted (module docstring)."""
    sample, seen, read, problem = None, set(), 0, None  # read: samples finished (yielded or duplicates)

    def first_time(s) -> bool:
        nonlocal read
        read += 1
        if s["__key__"] not in seen:
            seen.add(s["__key__"])
            return True
        if counts is not None:
            counts.add("duplicate_key", url, f"{s['__key__']}: key repeated in the shard, the first one was kept")
        return False

    try:
        f = open_url(url)
    except Exception as e:  # noqa: BLE001 - a shard that cannot be opened mid-run is skipped and counted
        problem = TarError("shard_error", "cannot open", detail=f"{type(e).__name__}: {e}")
    else:
        complete = False
        try:
            gz = url.endswith((".gz", ".tgz")) or (hasattr(f, "peek") and f.peek(2)[:2] == b"\x1f\x8b")
            for name, data in iter_tar(gzip.GzipFile(fileobj=f) if gz else f):
                if name.rsplit("/", 1)[-1].startswith("."):
                    continue
                key, ext = split_key(name)
                if _starts_sample(sample, key, ext):
                    if sample is not None and first_time(sample):
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = data
            complete = True
        except TarError as e:
            problem = e
        except _READ_ERRORS as e:  # from peeking at the first bytes
            problem = TarError("shard_error", "cannot read", detail=f"{type(e).__name__}: {e}")
        finally:
            try:
                f.close()  # a `pipe:` command's non-zero exit status surfaces here
            except Exception as e:  # noqa: BLE001
                if complete:  # the end-of-archive block was read: nothing is missing
                    log.warning("%s: closing the stream failed after a complete tar: %s: %s", url, type(e).__name__, e)
                elif problem is None:
                    problem = TarError("shard_error", "closing the stream failed", detail=f"{type(e).__name__}: {e}")
    cut = sample is not None and problem is not None and problem.name is not None \
        and not _starts_sample(sample, *split_key(problem.name))
    if sample is not None and not cut and first_time(sample):
        yield sample
    if problem is not None and counts is not None:
        _count_lost(counts, url, problem, read, cut)


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


def prepare_encoded(sample: dict, transform: TrainTransform, rng: random.Random):
    """decode='gpu', in a worker: (jpeg bytes, (left, top, w, h, flip)) for the device decoder, a transformed tensor
    (any other image, decoded here by PIL as decode_image does), or the skip reason. The RNG draws are the ones
    `transform(decode_image(sample), rng)` makes, in the same order: the same stream as decode='cpu'."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return "no_image"
    data = sample[ext]
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        if device_decodable(img, data):
            return data, transform.params(img.width, img.height, rng)
        img.load()
        img = to_rgb(img)
    except Exception:  # noqa: BLE001 - any decoder failure is a bad image
        return "bad_image"
    return transform(img, rng)


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

    def _items(self):
        """Every item the workers send, without its (worker id, counts) tail."""
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
                yield tuple(batch)
        finally:  # stop workers now: left to the garbage collector after an error, shutdown waits 5 s per worker
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __iter__(self):
        for batch in self._items():
            if batch[0] is not None:  # None: a stream's final counts, or a batch with no good sample
                yield batch

    def skip_counts(self) -> dict:
        total = dict(self._done)
        for c in self._live.values():
            for r, v in c.items():
                total[r] += v
        return total


class _DeviceLoader(_Loader):
    """decode='gpu': the workers' encoded batches decoded and augmented on `decoder.device` in this process, then
    re-batched so that every batch has exactly batch_size images: the slot of an image that fails to decode here
    (counted 'bad_image', with the workers' counts in skip_counts()) goes to the next sample of the stream."""

    def __init__(self, dataset: IterableDataset, num_workers: int, decoder: DeviceDecoder, batch_size: int,
                 partial: bool):
        super().__init__(dataset, num_workers)
        self.decoder, self.batch_size, self.partial = decoder, int(batch_size), partial
        self._here = Counts()  # images that failed in this process (cumulative, like _done)

    def __iter__(self):
        B, held, n_held = self.batch_size, [], 0
        for enc, _ in self._items():
            if enc is None:
                continue
            images, failed = self.decoder(enc)
            labels = enc["labels"]
            if failed:
                for i in failed:
                    self._here.add("bad_image", enc["urls"][i], f"{enc['keys'][i]} (decode=gpu: the device decoder "
                                                                f"and PIL both failed)")
                keep = torch.ones(len(labels), dtype=torch.bool)
                keep[failed] = False
                labels = labels[keep]
            if not held and len(labels) == B:  # the usual case: a worker batch with no failure
                yield images, labels
                continue
            held.append((images, labels))
            n_held += len(labels)
            while n_held >= B:
                x, y = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
                yield x[:B], y[:B]
                held, n_held = [(x[B:], y[B:])], n_held - B
        if self.partial and n_held:
            yield torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])

    def skip_counts(self) -> dict:
        total = super().skip_counts()
        for r, v in self._here.items():
            total[r] += v
        return total


# ---------------------------------------------------------------- extraction (single pass, whole shards per worker)

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
        total = Counts()
        for i in range(wid, len(self.urls), nw):  # whole shards: each tar is read by one worker, once
            counts, raw = Counts(total), []
            for s in iter_samples(self.urls[i], counts):
                raw.append(s)
                if len(raw) == self.batch_size:
                    yield *self._decode(raw, counts), i, None, wid, dict(total)
                    raw = []
            images, keys = self._decode(raw, counts) if raw else (None, [])
            yield images, keys, i, dict(counts), wid, dict(total)  # a shard's last item carries its counts


class _ExtractLoader(_Loader):
    def batches(self):
        """(shard index, images | None, keys, the shard's skip counts on its last batch, else None) as they arrive."""
        for images, keys, i, skips in self._items():
            yield i, images, keys, skips

    def __iter__(self):
        """(images, keys) in shard order then tar order; batches of shards that arrive early wait here."""
        held, finished, cur = {}, set(), 0
        for i, images, keys, skips in self.batches():
            if images is not None:
                if i == cur:
                    yield images, keys
                else:
                    held.setdefault(i, []).append((images, keys))
            if skips is not None:
                finished.add(i)
            while cur in finished:
                cur += 1
                yield from held.pop(cur, [])


def make_extract_loader(urls, transform=None, batch_size: int = 256, num_workers: int = 4, image_size: int = 224):
    """Single pass over `urls`: (images [B, 3, H, W], keys list[str]) in shard order, then tar order.

    `transform(pil_rgb) -> Tensor[3, H, W]` (default: EvalTransform(image_size)). Bad samples are skipped
    and counted (`.skip_counts()`); a batch whose samples were all bad is dropped. `.batches()`: the same
    batches tagged by shard in arrival order, without holding any back (see the module docstring)."""
    urls = expand_urls(urls)
    transform = transform if transform is not None else EvalTransform(image_size)
    return _ExtractLoader(_ExtractStream(urls, transform, batch_size), num_workers)


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


class _TrainSamples(IterableDataset):
    def __init__(self, urls, labels_dir, batch_size, k, seed, rank, world, num_workers, transform,
                 bufsize, resampled, shuffle, on_bad_labels, partial, cache_shards=8, decode="cpu"):
        self.__dict__.update(urls=urls, labels_dir=labels_dir, batch_size=int(batch_size), k=int(k),
                             seed=int(seed), rank=rank, world=world, num_workers=max(int(num_workers), 1),
                             transform=transform, bufsize=int(bufsize), resampled=resampled, shuffle=shuffle,
                             on_bad_labels=on_bad_labels, partial=partial, cache_shards=cache_shards, decode=decode)

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

    def _encoded(self, samples, wid, counts, rng):
        """decode='gpu': batches of `pack`ed samples (mlcd/data/device_decode.py); a worker's last short batch is
        always sent (the training process re-batches, and applies `partial` to the stream's very end)."""
        items, labels, keys, urls = [], [], [], []
        for s in samples:
            item = prepare_encoded(s, self.transform, rng)
            if isinstance(item, str):
                counts.add(item, s["__url__"], s["__key__"])
                continue
            items.append(item)
            labels.append(s["__labels__"])
            keys.append(s["__key__"])
            urls.append(s["__url__"])
            if len(items) == self.batch_size:
                yield pack(items, labels, keys, urls, get_worker_info() is not None), None, wid, dict(counts)
                items, labels, keys, urls = [], [], [], []
        if items:
            yield pack(items, labels, keys, urls, get_worker_info() is not None), None, wid, dict(counts)

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
        if self.decode == "gpu":
            yield from self._encoded(samples, wid, counts, aug_rng)
            yield None, None, wid, dict(counts)
            return
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
                      world_size: int | None = None, decode: str = "cpu", device=None):
    """Batches of (images float32 [B, 3, S, S], labels int64 [B, k]) for this rank; see the module docstring.

    resampled=True: infinite, shards split by (rank, worker) stream and re-drawn each pass.
    resampled=False: one exact pass (partial last batch kept unless partial=False).
    k: labels per image (the first k columns of the label files); None = the files' k.
    augment=False: EvalTransform (resize + center crop) instead of RandomResizedCrop + flip.
    rank / world_size: default mlcd.dist.rank() / world_size().
    decode: 'cpu' (PIL in the workers) | 'gpu' (JPEGs decoded and augmented on `device` in this process, images
    yielded on it; device default: the current CUDA device, else the CPU). Augmentation needs augment=True.
    The stream is a function of (urls, labels, seed, rank, world_size, num_workers, batch_size, settings)."""
    if on_bad_labels not in ("error", "skip"):
        raise ValueError(f"on_bad_labels must be 'error' or 'skip', got {on_bad_labels!r}")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if decode == "gpu" and not augment:
        raise ValueError("decode='gpu' runs the training transform (augment=True) only")
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
    partial = (not resampled) if partial is None else partial
    stream = _TrainSamples(urls, str(labels_dir), batch_size, k, seed, rank, world, num_workers, transform,
                          shuffle_buffer, resampled, shuffle, on_bad_labels, partial, decode=decode)
    if decode == "cpu":
        return _Loader(stream, num_workers)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return _DeviceLoader(stream, num_workers, DeviceDecoder(image_size, device, interpolation, mean, std),
                         batch_size, partial)
