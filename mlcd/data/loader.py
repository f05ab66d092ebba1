"""Webdataset loaders: the training stream (images + multi-labels) and the single-pass extraction stream.

Both read tar shards through mlcd/data/tars.py (shard lists, the tar reader, samples grouped by key), decode with PIL
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
from mlcd.data.device_decode import DeviceDecoder, device_decodable, pack
from mlcd.data.labels import read_shard_labels, shard_stem
from mlcd.data.tars import IMAGE_EXTS, REASONS, Counts, expand_urls, iter_samples
from mlcd.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, to_rgb

log = logging.getLogger("mlcd.data")

DECODES = ("cpu", "gpu")  # data.decode: PIL in the workers | the training process's device (device_decode.py)


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
