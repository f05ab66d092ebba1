"""The trainer's batch streams: `batches(step)` gives the micro-batches of a step, a function of (seed, step) alone,
so a resumed run sees exactly the batches an uninterrupted run sees, and how often checkpoints are written changes
nothing.

ShardBatches reads the shards; its data stream is seeded from (seed, segment start), where a segment is
`data.segment_steps` steps: the loader is rebuilt at each segment start, and a run resumed inside a segment rebuilds
that segment's loader and skips the batches already trained on. SyntheticBatches draws random images and labels.
"""
import torch

from mlcd import dist
from mlcd.data.loader import make_train_loader
from mlcd.dist import derive_seed


class ShardBatches:
    """This rank's training batches from the shards, step by step, reproducible from (seed, step) alone."""

    def __init__(self, cfg, per_rank_batch: int, image_size: int, grad_accum: int):
        self.cfg, self.per_rank_batch, self.image_size, self.grad_accum = cfg, per_rank_batch, image_size, grad_accum
        self.segment_steps = int(cfg.data.segment_steps)
        self.loader = self.it = None
        self.skipped_before = {}  # samples skipped by this rank's finished loaders (+ on rank 0, the resumed total)

    def state_dict(self) -> dict:
        """What a checkpoint keeps (a collective): the samples skipped so far, summed over ranks. The position in
        the stream needs no state: it is the step."""
        return {"skipped": self.skipped()}

    def load_state_dict(self, state: dict) -> None:
        """The resumed total is counted once, on rank 0."""
        self.skipped_before = dict(state.get("skipped", {})) if dist.is_main() else {}

    def _new_loader(self, segment_start: int):
        d = self.cfg.data
        if self.loader is not None:
            self._fold_counts(+1)
        self.loader = make_train_loader(
            d.train_shards, d.labels_dir, batch_size=self.per_rank_batch, num_workers=d.num_workers,
            image_size=self.image_size, seed=derive_seed(self.cfg.seed, "data", segment_start), k=d.get("num_labels"),
            shuffle_buffer=d.shuffle_buffer, on_bad_labels=d.on_bad_labels, resampled=d.resampled,
            scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip, interpolation=d.interpolation,
            decode=d.decode)  # gpu: images decoded on this process's device (current CUDA device)
        self.it = iter(self.loader)

    def _fold_counts(self, sign: int):
        for k, v in self.loader.skip_counts().items():
            self.skipped_before[k] = self.skipped_before.get(k, 0) + sign * v

    def batches(self, step: int):
        """The iterator of `grad_accum` micro-batches for `step`."""
        if self.loader is None or step % self.segment_steps == 0:
            start = step - step % self.segment_steps
            self._new_loader(start)
            if step > start:  # resumed inside a segment: skip what was already trained on, and its skip counts
                for _ in range((step - start) * self.grad_accum):
                    next(self.it)
                self._fold_counts(-1)
        return self.it

    def skipped(self) -> dict:
        """Samples skipped since training began, summed over ranks (a collective; the keys are fixed)."""
        mine = {k: self.skipped_before.get(k, 0) + v for k, v in sorted(self.loader.skip_counts().items())}
        summed = dist.all_reduce_sum(torch.tensor(list(mine.values()), dtype=torch.float64))
        return {k: int(v) for k, v in zip(mine, summed.tolist())}


class SyntheticBatches:
    """data.source=synthetic: random images and labels, the GLOBAL batch of each micro-step drawn from (seed, step,
    micro) and each rank taking its slice. Every world size therefore trains on the same global batches, which
    is what checks the step's math across world sizes (tests), and it times the step without I/O (benches)."""

    def __init__(self, cfg, num_classes: int, per_rank_batch: int, image_size: int, grad_accum: int):
        self.seed, self.num_classes, self.b, self.size = cfg.seed, num_classes, per_rank_batch, image_size
        self.grad_accum, self.num_labels = grad_accum, int(cfg.data.get("num_labels") or 2)

    def batches(self, step: int):
        world, rank = dist.world_size(), dist.rank()
        for micro in range(self.grad_accum):
            g = torch.Generator().manual_seed(derive_seed(self.seed, "synthetic", step, micro))
            images = torch.randn(world * self.b, 3, self.size, self.size, generator=g)
            labels = torch.randint(0, self.num_classes, (world * self.b, self.num_labels), generator=g)
            yield images[rank * self.b:(rank + 1) * self.b], labels[rank * self.b:(rank + 1) * self.b]

    def skipped(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"skipped": {}}

    def load_state_dict(self, state: dict) -> None:
        pass
