"""The MLCD training loop: a DDP or FSDP backbone, class centers sharded outside it (PartialFC), one step function.

Read top to bottom: check the settings -> build -> resume -> for each step: batches -> train_step -> log ->
checkpoint. Every rank runs the same collectives in the same order. The components own their state: the batch
stream (mlcd/data/streams.py), the checkpointer (checkpoint.py: save, async save, restore), the run log (metrics.py).

Exact resume: all randomness after initialisation is derived from (seed, rank, step): the PartialFC negative
sample from (seed, rank, step), the data stream from (seed, step) (see streams.py), so a resumed run sees exactly
the batches an uninterrupted run sees.
"""
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mlcd import dist, fileio
from mlcd.data.streams import ShardBatches, SyntheticBatches
from mlcd.models import build_model
from mlcd.partial_fc import build_partial_fc
from mlcd.sweep import FINGERPRINT, check_same_settings, fingerprint
from mlcd.train import checkpoint
from mlcd.train.metrics import MetricsLog, peak_memory_mb
from mlcd.train.monitor import KnnMonitor
from mlcd.train.optim import build_backbone_optimizer, build_center_optimizer, lr_at, set_lr
from mlcd.train.sharding import held_parameters, uses_autocast, wrap_backbone
from mlcd.train.step import train_step
from mlcd.validate import check_train_config, resolve_wandb_mode  # noqa: F401  (tests import it from here)


def train(cfg) -> dict:
    # ---- settings: every check before any output or work ----
    device = dist.init()
    world, t = dist.world_size(), cfg.train
    run_dir = Path(cfg.out_dir)
    checkpointer = checkpoint.Checkpointer(run_dir / "checkpoints", t.keep_last, async_save=t.async_ckpt)
    resume_dir = checkpointer.resume_dir(t.resume)
    if t.init_from:  # a Hugging Face source gives the model config; a source that is neither kind is refused here
        cfg.model = checkpoint.init_model_config(t.init_from, cfg.model, resuming=resume_dir is not None)
    settings = check_train_config(cfg, world, device)
    precision, num_classes = settings["precision"], settings["num_classes"]
    if t.resume == "auto" and resume_dir is not None:  # only a run with a step to lose guards its settings, so a
        check_same_settings(run_dir, cfg)              # start that failed before its first checkpoint blocks nothing
    if dist.is_main():
        checkpointer.root.mkdir(parents=True, exist_ok=True)
        fileio.write_json(run_dir / FINGERPRINT, fingerprint(cfg))
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    dist.barrier()

    # ---- build: model, classifier, optimizers, batch stream, monitor ----
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    pfc = build_partial_fc(cfg.loss, num_classes, model.embed_dim, cfg.seed).to(device)
    pfc.bf16_cosines = precision == "bf16"
    train_model = wrap_backbone(model, t.sharding, device, precision)  # FSDP shards `model` in place
    backbone_opt = build_backbone_optimizer(model, cfg.optim)
    center_opt = build_center_optimizer(pfc, cfg.optim)
    per_rank_batch = t.global_batch_size // (world * t.grad_accum)
    stream = (SyntheticBatches(cfg, num_classes, per_rank_batch, model.image_size, t.grad_accum)
              if cfg.data.source == "synthetic" else
              ShardBatches(cfg, per_rank_batch, model.image_size, t.grad_accum))
    # rank 0 evaluates; under FSDP every rank runs the monitor's forwards (they all-gather the weights together)
    monitor = (KnnMonitor(cfg.monitor, cfg.model.image_size)
               if cfg.monitor.every and (dist.is_main() or t.sharding == "fsdp") else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=precision == "bf16" and uses_autocast(t.sharding))
    if t.deterministic:
        torch.use_deterministic_algorithms(True)

    # ---- resume (or start from another run's weights) ----
    # What a checkpoint must agree on with the config; anything else (world size, lr, ...) may change.
    identity = {"num_classes": num_classes, "embed_dim": model.embed_dim,
                "model": OmegaConf.to_container(cfg.model, resolve=True)}
    start_step, counters = 0, {"nonfinite_skipped": 0}
    if resume_dir is not None:
        restored = checkpointer.restore(resume_dir, model, backbone_opt, pfc, center_opt, stream, identity)
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
    metrics = MetricsLog(run_dir, cfg, start_step, settings["wandb_mode"])
    held, total = held_parameters(model)
    metrics.say(f"backbone: {total:,} parameters, train.sharding={t.sharding}: rank 0 holds {held:,}; class centers: "
                f"{num_classes:,} x {model.embed_dim}, rank 0 holds {pfc.shard_spec.n_local(0):,} rows")

    def save(step):
        manifest = {**identity, "shards": pfc.shard_spec.to_dict(), "samples_seen": step * t.global_batch_size,
                    "config": OmegaConf.to_container(cfg, resolve=True), "torch": torch.__version__}
        counters.update(stream.state_dict())  # a collective: the skip counts summed over ranks
        checkpointer.save(step, model, backbone_opt, pfc, center_opt, {"counters": counters}, manifest)

    window = {"t": time.time(), "steps": 0}

    def log(step, result, lr):
        skipped = stream.skipped()  # a collective
        elapsed, window["t"] = time.time() - window["t"], time.time()
        row = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
               "images_per_s": window["steps"] * t.global_batch_size / max(elapsed, 1e-9),
               "samples_seen": step * t.global_batch_size, "peak_mem_mb": peak_memory_mb(device),
               "nonfinite_skipped": counters["nonfinite_skipped"], **{f"skipped/{k}": v for k, v in skipped.items()}}
        window["steps"] = 0
        if monitor is not None and (monitor.due(step) or step == t.total_steps):
            row.update(monitor(model))  # logged by rank 0 only
        metrics.log(row)
        metrics.say(f"step {step:>7d} | loss {result.loss:.4f} | lr {lr:.2e} | {row['images_per_s']:.1f} img/s | "
                    f"grad {result.grad_norm:.3f} | mem {row['peak_mem_mb']:.0f} MB | skipped {sum(skipped.values())} "
                    f"| nonfinite {counters['nonfinite_skipped']}"
                    + (f" | kNN {row['monitor/knn_top1']:.2f}" if "monitor/knn_top1" in row else ""), bar)

    # ---- steps ----
    from tqdm import tqdm
    bar = tqdm(total=t.total_steps, initial=start_step, disable=not dist.is_main() or not t.progress_bar,
               desc="train", dynamic_ncols=True)
    nonfinite_in_row, result = 0, None
    for step in range(start_step, t.total_steps):
        checkpointer.poll()  # an async save finishes (or raises its failed write) at a step boundary
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, t.total_steps, cfg.optim.min_lr_ratio)
        set_lr(backbone_opt, lr)
        set_lr(center_opt, lr)
        result = train_step(train_model, pfc, backbone_opt, center_opt, stream.batches(step), step, t.grad_accum,
                            t.clip_grad, autocast)
        # a non-finite step was skipped by every rank together (they all see the same values)
        nonfinite_in_row = 0 if result.applied else nonfinite_in_row + 1
        counters["nonfinite_skipped"] += 0 if result.applied else 1
        if nonfinite_in_row >= t.max_nonfinite_in_row:
            raise RuntimeError(f"step {step}: non-finite loss/gradient {t.max_nonfinite_in_row} steps in a row "
                               f"(loss={result.loss}, grad_norm={result.grad_norm}); lower optim.lr or "
                               "train.clip_grad, or check the labels")
        bar.update(1)
        window["steps"] += 1
        if (step + 1) % t.log_every == 0 or step + 1 == t.total_steps:
            log(step + 1, result, lr)
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
