"""The MLCD training loop: a DDP or FSDP backbone, class centers sharded outside it (PartialFC), one step function.

Read top to bottom: setup -> resume -> for each step: batches -> train_step -> log -> checkpoint. Every rank runs
the same collectives in the same order.

Exact resume: all randomness after initialisation is derived from (seed, rank, step). The PartialFC negative
sample is seeded from (seed, rank, step) and the data stream from (seed, segment start), where a data segment is
`data.segment_steps` steps long: the loader is rebuilt at every segment start, and a run resumed inside a segment
rebuilds that segment's loader and skips the batches already trained on. So a resumed run sees exactly the batches
an uninterrupted run sees, and how often checkpoints are written changes nothing.
"""
import json
import os
import resource
import time
import uuid
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mlcd import dist, fileio
from mlcd.data.labels import label_width, missing_shard_labels, resolve_num_classes, shard_stem
from mlcd.data.loader import expand_urls, make_train_loader
from mlcd.dist import derive_seed
from mlcd.models import build_model
from mlcd.partial_fc import build_partial_fc, check_loss_settings
from mlcd.sweep import FINGERPRINT, check_same_settings, fingerprint
from mlcd.train import checkpoint
from mlcd.train.monitor import KnnMonitor
from mlcd.train.optim import build_backbone_optimizer, build_center_optimizer, lr_at, set_lr
from mlcd.train.sharding import check_sharding, held_parameters, uses_autocast, wrap_backbone
from mlcd.train.step import train_step

PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("online", "offline", "disabled")


def check_labels(data_cfg) -> None:
    """Before step 0: every training shard has its label file (a missing one would otherwise crash a worker at
    whatever step first reads that shard), and data.num_labels (l) is at most the labels per image on disk."""
    urls = expand_urls(data_cfg.train_shards)
    missing = missing_shard_labels(data_cfg.labels_dir, [shard_stem(u) for u in urls])
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} training shards have no label file in "
                                f"data.labels_dir={data_cfg.labels_dir}, e.g. {missing[:3]} (did cluster.py's "
                                "assign stage finish over these shards?)")
    want = data_cfg.get("num_labels")
    if want is None:
        return
    have = label_width(data_cfg.labels_dir, shard_stem(urls[0]))
    if not 1 <= int(want) <= have:
        raise ValueError(f"data.num_labels={want}: the label files in {data_cfg.labels_dir} hold {have} labels per "
                         f"image (cluster.py assign.topk); use 1..{have}")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "fp16":
        raise ValueError("train.precision=fp16 is not supported (it needs a gradient scaler; the margin loss at "
                         "s = 64 overflows fp16 logits): use bf16 (GPU) or fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: must be one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_wandb_mode(mode) -> str:
    """wandb's convention: the config's value when set explicitly, else $WANDB_MODE, else offline."""
    source = "logging.wandb.mode"
    if mode is None:
        mode, source = os.environ.get("WANDB_MODE", "offline"), "WANDB_MODE"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in WANDB_MODES:
        raise ValueError(f"{source}={mode!r}: must be one of {WANDB_MODES}")
    return mode


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLog:
    """Rank 0's record of the run: metrics.jsonl (truncated to the resume step so a resumed run has no duplicate
    rows), the console lines in train.log, and wandb."""

    def __init__(self, run_dir: Path, cfg, resume_step: int, wandb_mode: str):
        self.path, self.text_log = run_dir / "metrics.jsonl", run_dir / "train.log"
        self.wandb = None
        if not dist.is_main():
            return
        if self.path.exists():
            rows = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            fileio.write_text(self.path, "".join(r + "\n" for r in rows))  # a crash here keeps the old history
        if wandb_mode != "disabled":
            import wandb
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            fileio.write_text(id_file, run_id)
            self.wandb = wandb.init(project=cfg.logging.wandb.project, name=cfg.run_name, id=run_id,
                                    resume="allow", dir=str(run_dir), mode=wandb_mode,
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, row: dict) -> None:
        if not dist.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def say(self, line: str, bar=None) -> None:
        """A console line (through the progress bar when there is one), also appended to train.log."""
        if not dist.is_main():
            return
        (bar.write if bar is not None else print)(line)
        with open(self.text_log, "a") as f:
            f.write(line + "\n")

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


class TrainStream:
    """This rank's training batches, step by step, reproducible from (seed, step) alone (see module docstring)."""

    def __init__(self, cfg, per_rank_batch: int, image_size: int, grad_accum: int, skipped_before: dict):
        self.cfg, self.per_rank_batch, self.image_size, self.grad_accum = cfg, per_rank_batch, image_size, grad_accum
        self.segment_steps = int(cfg.data.segment_steps)
        self.loader = self.it = None
        self.skipped_before = dict(skipped_before)  # samples skipped by this rank's finished loaders (+ resumed total)

    def _new_loader(self, segment_start: int):
        d = self.cfg.data
        if self.loader is not None:
            self._fold_counts(+1)
        self.loader = make_train_loader(
            d.train_shards, d.labels_dir, batch_size=self.per_rank_batch, num_workers=d.num_workers,
            image_size=self.image_size, seed=derive_seed(self.cfg.seed, "data", segment_start), k=d.get("num_labels"),
            shuffle_buffer=d.shuffle_buffer, on_bad_labels=d.on_bad_labels, resampled=d.resampled,
            scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip, interpolation=d.interpolation,
            decode=d.get("decode", "cpu"))  # gpu: images decoded on this process's device (current CUDA device)
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


class SyntheticStream:
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


def train(cfg) -> dict:
    # ---- setup: check settings before any work, then build model, classifier, optimizers ----
    device = dist.init()
    world = dist.world_size()
    t = cfg.train
    if t.init_from:  # a Hugging Face source gives the model config; a source that is neither kind is refused here
        cfg.model = checkpoint.init_model_config(t.init_from, cfg.model, resuming=checkpoint.resolve_resume(
            t.resume, Path(cfg.out_dir) / "checkpoints") is not None)
    precision = resolve_precision(t.precision, device)
    check_sharding(t.sharding, world)
    wandb_mode = resolve_wandb_mode(cfg.logging.wandb.mode)
    if t.global_batch_size % (world * t.grad_accum):
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by world size {world} "
                         f"x train.grad_accum={t.grad_accum}")
    if int(cfg.data.segment_steps) < 1:
        raise ValueError(f"data.segment_steps={cfg.data.segment_steps}: must be >= 1")
    loss = cfg.loss
    check_loss_settings(loss.kind, loss.margin_type, loss.sample_ratio, loss.budget, loss.get("slots"))
    if cfg.data.source not in ("shards", "synthetic"):
        raise ValueError(f"data.source={cfg.data.source!r}: shards | synthetic")
    if cfg.data.source == "shards":
        for key in ("train_shards", "labels_dir"):
            if not cfg.data.get(key):
                raise ValueError(f"data.{key} is not set: pick an experiment (experiment=demo, laion400m_...) or set it")
        check_labels(cfg.data)  # shards that match nothing fail here too, before any output or wandb
    num_classes = resolve_num_classes(cfg.num_classes, cfg.data.labels_dir if cfg.data.source == "shards" else None)
    if cfg.monitor.every < 0 or (cfg.monitor.every and cfg.monitor.every % t.log_every):
        raise ValueError(f"monitor.every={cfg.monitor.every}: 0 (off) or a multiple of train.log_every={t.log_every}")
    if cfg.monitor.every and not cfg.monitor.dataset:
        raise ValueError(f"monitor.every={cfg.monitor.every} needs monitor.dataset (e.g. fashion_mnist)")
    # rank 0 evaluates; under FSDP every rank runs the monitor's forwards (they all-gather the weights together)
    monitor = (KnnMonitor(cfg.monitor, cfg.model.image_size)
               if cfg.monitor.every and (dist.is_main() or t.sharding == "fsdp") else None)
    per_rank_batch = t.global_batch_size // (world * t.grad_accum)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=precision == "bf16" and uses_autocast(t.sharding))
    if t.deterministic:
        torch.use_deterministic_algorithms(True)

    run_dir, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    resume_dir = checkpoint.resolve_resume(t.resume, ckpt_root)
    if t.resume == "auto" and resume_dir is not None:  # only a run with a step to lose guards its settings, so a
        check_same_settings(run_dir, cfg)              # start that failed before its first checkpoint blocks nothing
    if dist.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        fileio.write_json(run_dir / FINGERPRINT, fingerprint(cfg))
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    dist.barrier()

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    pfc = build_partial_fc(cfg.loss, num_classes, model.embed_dim, cfg.seed).to(device)
    pfc.bf16_cosines = precision == "bf16"
    train_model = wrap_backbone(model, t.sharding, device, precision)  # FSDP shards `model` in place
    backbone_opt = build_backbone_optimizer(model, cfg.optim)
    center_opt = build_center_optimizer(pfc, cfg.optim)

    # ---- resume (or start from another run's weights) ----
    # What a checkpoint must agree on with the config; anything else (world size, lr, ...) may change.
    identity = {"num_classes": num_classes, "embed_dim": model.embed_dim,
                "model": OmegaConf.to_container(cfg.model, resolve=True)}
    start_step, counters = 0, {"nonfinite_skipped": 0}
    if resume_dir is not None:
        restored = checkpoint.restore(resume_dir, model, backbone_opt, pfc, center_opt, identity)
        start_step, counters = restored["step"], restored["counters"]
        if dist.is_main():
            print(f"resumed from {resume_dir} (step {start_step}, saved at world size {restored['world_size']}, "
                  f"now {world})", flush=True)
    elif t.init_from:
        message = checkpoint.init_from(t.init_from, model, pfc, t.init_centers, identity)
        if dist.is_main():
            print(message, flush=True)

    if t.compile:
        train_model = torch.compile(train_model)
    metrics = MetricsLog(run_dir, cfg, start_step, wandb_mode)
    held, total = held_parameters(model)
    metrics.say(f"backbone: {total:,} parameters, train.sharding={t.sharding}: rank 0 holds {held:,}; class centers: "
                f"{num_classes:,} x {model.embed_dim}, rank 0 holds {pfc.shard_spec.n_local(0):,} rows")
    # samples skipped in earlier runs of this training: counted once, on rank 0
    stream = (SyntheticStream(cfg, num_classes, per_rank_batch, model.image_size, t.grad_accum)
              if cfg.data.source == "synthetic" else
              TrainStream(cfg, per_rank_batch, model.image_size, t.grad_accum,
                          counters.get("skipped", {}) if dist.is_main() else {}))

    checkpointer = checkpoint.Checkpointer(ckpt_root, t.keep_last, async_save=t.async_ckpt)

    def save(step):
        counters["skipped"] = stream.skipped()
        manifest = {**identity, "shards": pfc.shard_spec.to_dict(), "samples_seen": step * t.global_batch_size,
                    "config": OmegaConf.to_container(cfg, resolve=True), "torch": torch.__version__}
        checkpointer.save(step, model, backbone_opt, pfc, center_opt, {"counters": counters}, manifest)

    # ---- steps ----
    from tqdm import tqdm
    bar = tqdm(total=t.total_steps, initial=start_step, disable=not dist.is_main() or not t.progress_bar,
               desc="train", dynamic_ncols=True)
    nonfinite_in_row, window_t, window_steps, result = 0, time.time(), 0, None
    for step in range(start_step, t.total_steps):
        checkpointer.poll()  # an async save finishes (or raises its failed write) at a step boundary
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, t.total_steps, cfg.optim.min_lr_ratio)
        set_lr(backbone_opt, lr)
        set_lr(center_opt, lr)
        result = train_step(train_model, pfc, backbone_opt, center_opt, stream.batches(step), step, t.grad_accum,
                            t.clip_grad, autocast)
        if result.applied:
            nonfinite_in_row = 0
        else:  # every rank sees the same values, so every rank skipped together
            counters["nonfinite_skipped"] += 1
            nonfinite_in_row += 1
            if nonfinite_in_row >= t.max_nonfinite_in_row:
                raise RuntimeError(f"step {step}: non-finite loss/gradient {t.max_nonfinite_in_row} steps in a row "
                                   f"(loss={result.loss}, grad_norm={result.grad_norm}); lower optim.lr or "
                                   "train.clip_grad, or check the labels")
        bar.update(1)
        window_steps += 1

        # ---- log ----
        if (step + 1) % t.log_every == 0 or step + 1 == t.total_steps:
            elapsed = time.time() - window_t
            skipped = stream.skipped()
            row = {"step": step + 1, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                   "images_per_s": window_steps * t.global_batch_size / max(elapsed, 1e-9),
                   "samples_seen": (step + 1) * t.global_batch_size, "peak_mem_mb": _peak_memory_mb(device),
                   "nonfinite_skipped": counters["nonfinite_skipped"], **{f"skipped/{k}": v for k, v in skipped.items()}}
            if monitor is not None and (monitor.due(step + 1) or step + 1 == t.total_steps):
                row.update(monitor(model))  # logged by rank 0 only
            metrics.log(row)
            metrics.say(f"step {row['step']:>7d} | loss {result.loss:.4f} | lr {lr:.2e} | "
                        f"{row['images_per_s']:.1f} img/s | grad {result.grad_norm:.3f} | "
                        f"mem {row['peak_mem_mb']:.0f} MB | skipped {sum(skipped.values())} "
                        f"| nonfinite {counters['nonfinite_skipped']}"
                        + (f" | kNN {row['monitor/knn_top1']:.2f}" if "monitor/knn_top1" in row else ""), bar)
            window_t, window_steps = time.time(), 0

        # ---- checkpoint ----
        if (step + 1) % t.ckpt_every == 0 or step + 1 == t.total_steps:
            save(step + 1)
    checkpointer.wait()
    bar.close()
    metrics.close()
    if dist.is_main() and (run_dir / "metrics.jsonl").exists():
        from mlcd.train.plots import plot_loss
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", title=cfg.run_name)
    dist.barrier()
    return {"final_loss": result.loss if result else float("nan"), "step": t.total_steps, "run_dir": str(run_dir)}
