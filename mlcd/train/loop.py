"""The MLCD training loop: a DDP backbone, class centers sharded outside DDP, one short step function.

Read top to bottom: setup -> resume -> for each step: micro-batches -> global-norm clip -> step -> log
-> checkpoint. Every rank runs the same collectives in the same order.

Exact resume: all randomness after initialisation is derived from (seed, rank, step): the PartialFC
negative sample from (seed, rank, step) and the data stream from (seed, segment start) where a segment
runs from one checkpoint step to the next; the loader is restarted at every checkpoint boundary, so a
resumed run sees exactly the batches an uninterrupted run sees.
"""
import contextlib
import json
import math
import os
import resource
import time
import uuid
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from mlcd import dist
from mlcd.data.loader import make_train_loader
from mlcd.dist import derive_seed
from mlcd.models import build_model
from mlcd.partial_fc import build_partial_fc, reshard
from mlcd.train import checkpoint
from mlcd.train.optim import build_backbone_optimizer, lr_at, set_lr


# Tests slow the loop down so that an external kill -9 lands mid-run; it changes nothing else.
_TEST_STEP_DELAY = float(os.environ.get("MLCD_TEST_STEP_DELAY", 0))


def resolve_num_classes(cfg) -> int:
    """The class count: from the config, else from the labels' manifest written by cluster.py."""
    if cfg.num_classes:
        return int(cfg.num_classes)
    manifest = Path(cfg.data.labels_dir) / "manifest.json"
    if not manifest.exists():
        raise ValueError(f"num_classes is not set and {manifest} does not exist: run cluster.py first "
                         "(or `make demo`), or set num_classes=... and data.labels_dir=...")
    info = json.loads(manifest.read_text())
    for key in ("num_classes", "k", "num_centers"):
        if key in info:
            return int(info[key])
    raise ValueError(f"{manifest}: no num_classes field; set num_classes=... on the command line")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLog:
    """metrics.jsonl on rank 0 (truncated to the resume step so a resumed run has no duplicate rows) + wandb."""

    def __init__(self, run_dir: Path, cfg, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not dist.is_main():
            return
        if self.path.exists():
            rows = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        mode = cfg.logging.wandb.mode
        if mode != "disabled":
            import wandb
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.logging.wandb.project, name=cfg.run_name, id=run_id,
                                    resume="allow", dir=str(run_dir), mode=mode,
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, row: dict) -> None:
        if not dist.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def make_loader(cfg, segment_start: int, per_rank_batch: int, image_size: int):
    d = cfg.data
    return make_train_loader(
        d.train_shards, d.labels_dir, batch_size=per_rank_batch, num_workers=d.num_workers,
        image_size=image_size, seed=derive_seed(cfg.seed, "data", segment_start), k=d.get("num_labels"),
        shuffle_buffer=d.shuffle_buffer, on_bad_labels=d.on_bad_labels, resampled=d.resampled,
        scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip, interpolation=d.interpolation)


def skipped_total(before: dict, loader) -> dict:
    """Samples skipped since training began, summed over ranks (a collective; the keys are fixed)."""
    mine = {k: before.get(k, 0) + v for k, v in sorted(loader.skip_counts().items())}
    summed = dist.all_reduce_sum(torch.tensor(list(mine.values()), dtype=torch.float64))
    return {k: int(v) for k, v in zip(mine, summed.tolist())}


def global_grad_norm(backbone: torch.nn.Module, pfc) -> torch.Tensor:
    """||g|| over the backbone (already identical on all ranks after DDP) and ALL center shards."""
    sq = torch.zeros((), dtype=torch.float32, device=next(pfc.parameters()).device)
    sq += pfc.grad_sq_norm().float()
    dist.all_reduce_sum(sq)
    for p in backbone.parameters():
        if p.grad is not None:
            sq += p.grad.detach().float().pow(2).sum().to(sq.device)
    return sq.sqrt()


def train(cfg) -> dict:
    device = dist.init()
    world, rank = dist.world_size(), dist.rank()
    t = cfg.train
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    if t.global_batch_size % (world * t.grad_accum):
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by world size {world} "
                         f"x train.grad_accum={t.grad_accum}")
    per_rank_batch = t.global_batch_size // (world * t.grad_accum)
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    run_dir, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    if dist.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    dist.barrier()

    num_classes = resolve_num_classes(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    pfc = build_partial_fc(cfg.loss, num_classes, model.embed_dim, cfg.seed).to(device)
    backbone_opt = build_backbone_optimizer(model, cfg.optim)
    center_opt = pfc.make_optimizer(lr=cfg.optim.lr, weight_decay=cfg.optim.centers_weight_decay,
                                    betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    for group in center_opt.param_groups:
        group["lr_mult"] = cfg.optim.centers_lr_mult

    # What a checkpoint must agree on with the config; anything else (world size, lr, ...) may change.
    identity = {"num_classes": num_classes, "embed_dim": model.embed_dim,
                "model": OmegaConf.to_container(cfg.model, resolve=True)}
    start_step, counters = 0, {"nonfinite_skipped": 0}
    resume_dir = checkpoint.resolve_resume(t.resume, ckpt_root)
    if resume_dir is not None:
        manifest = checkpoint.read_manifest(resume_dir)
        checkpoint.check_compatible(manifest, identity, resume_dir)
        model.load_state_dict(checkpoint.load_backbone_weights(resume_dir))
        trainer_state = checkpoint.load_trainer_state(resume_dir)
        backbone_opt.load_state_dict(trainer_state["optim"])
        states = checkpoint.load_center_states(resume_dir, manifest["world_size"])
        if manifest["world_size"] != world:
            states = reshard(states, world)
        pfc.load_state_dict(states[rank]["shard"])
        center_opt.load_state_dict(states[rank]["optim"])
        rng = checkpoint.load_rng_state(resume_dir, rank) if manifest["world_size"] == world else None
        if rng is not None:
            checkpoint.set_rng_state(rng)
        start_step, counters = manifest["step"], trainer_state["counters"]
        if dist.is_main():
            print(f"resumed from {resume_dir} (step {start_step}, saved at world size {manifest['world_size']}, "
                  f"now {world})", flush=True)
    elif t.init_from:  # a new run (step 0, fresh optimizers) starting from another run's weights
        src = checkpoint.find_checkpoint(t.init_from)
        resized = checkpoint.init_backbone_from(model, src, identity["model"])
        if t.init_centers:
            manifest = checkpoint.read_manifest(src)
            checkpoint.check_compatible(manifest, {k: identity[k] for k in ("num_classes", "embed_dim")}, src)
            states = reshard(checkpoint.load_center_states(src, manifest["world_size"]), world)
            pfc.load_state_dict(states[rank]["shard"])
        if dist.is_main():
            print(f"initialised from {src} (backbone{', resized ' + ', '.join(resized) if resized else ''}"
                  f"{', class centers' if t.init_centers else ''})", flush=True)

    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if t.compile:
        ddp_model = torch.compile(ddp_model)
    metrics = MetricsLog(run_dir, cfg, start_step)

    def save(step):
        manifest = {**identity, "shards": pfc.shard_spec.to_dict(), "samples_seen": step * t.global_batch_size,
                    "config": OmegaConf.to_container(cfg, resolve=True), "torch": torch.__version__}
        return checkpoint.save(ckpt_root, step, model, backbone_opt, pfc, center_opt,
                               {"counters": counters}, manifest, t.keep_last)

    from tqdm import tqdm
    bar = tqdm(total=t.total_steps, initial=start_step, disable=not dist.is_main() or not t.progress_bar,
               desc="train", dynamic_ncols=True)
    loader_it, nonfinite_in_row, window_t, window_steps = None, 0, time.time(), 0
    # samples the loader skipped in earlier data segments: this rank's own, plus (rank 0) the resumed total
    skipped_before = dict(counters.get("skipped", {})) if dist.is_main() else {}
    loss_value = float("nan")
    for step in range(start_step, t.total_steps):
        if loader_it is None or step % t.ckpt_every == 0:  # a new data segment (see module docstring)
            if loader_it is not None:
                skipped_before = {k: skipped_before.get(k, 0) + v for k, v in loader.skip_counts().items()}
            loader = make_loader(cfg, step, per_rank_batch, model.image_size)
            loader_it = iter(loader)
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, t.total_steps, cfg.optim.min_lr_ratio)
        set_lr(backbone_opt, lr)
        set_lr(center_opt, lr)

        loss_sum = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            images, labels = next(loader_it)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            sync = micro == t.grad_accum - 1
            with (contextlib.nullcontext() if sync or world == 1 else ddp_model.no_sync()):
                with autocast:
                    embeddings = ddp_model(images).embedding
                loss = pfc(embeddings.float(), labels, step * t.grad_accum + micro) / t.grad_accum
                loss.backward()
            loss_sum += loss.detach()

        grad_norm = global_grad_norm(model, pfc)
        loss_value = float(loss_sum)  # identical on every rank: PartialFC returns the global mean
        if math.isfinite(loss_value) and torch.isfinite(grad_norm):
            nonfinite_in_row = 0
            if t.clip_grad and t.clip_grad > 0:
                coef = torch.clamp(t.clip_grad / (grad_norm + 1e-6), max=1.0)
                for p in list(model.parameters()) + list(pfc.parameters()):
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.device))
            backbone_opt.step()
            center_opt.step()
        else:  # every rank sees the same values, so every rank skips together
            counters["nonfinite_skipped"] += 1
            nonfinite_in_row += 1
            if nonfinite_in_row >= t.max_nonfinite_in_row:
                raise RuntimeError(f"step {step}: non-finite loss/gradient {t.max_nonfinite_in_row} steps in a row "
                                   f"(loss={loss_value}, grad_norm={float(grad_norm)}); lower optim.lr or "
                                   "train.clip_grad, or check the labels")
        backbone_opt.zero_grad(set_to_none=True)
        center_opt.zero_grad(set_to_none=True)
        bar.update(1)
        window_steps += 1
        if _TEST_STEP_DELAY:
            time.sleep(_TEST_STEP_DELAY)

        if (step + 1) % t.log_every == 0 or step + 1 == t.total_steps:
            elapsed = time.time() - window_t
            skipped = skipped_total(skipped_before, loader)
            row = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                   "images_per_s": window_steps * t.global_batch_size / max(elapsed, 1e-9),
                   "samples_seen": (step + 1) * t.global_batch_size, "peak_mem_mb": _peak_memory_mb(device),
                   "nonfinite_skipped": counters["nonfinite_skipped"], **{f"skipped/{k}": v for k, v in skipped.items()}}
            metrics.log(row)
            if dist.is_main():
                bar.write(f"step {row['step']:>7d} | loss {loss_value:.4f} | lr {lr:.2e} | "
                          f"{row['images_per_s']:.1f} img/s | grad {row['grad_norm']:.3f} | "
                          f"mem {row['peak_mem_mb']:.0f} MB | skipped {sum(skipped.values())} "
                          f"| nonfinite {counters['nonfinite_skipped']}")
            window_t, window_steps = time.time(), 0

        if (step + 1) % t.ckpt_every == 0 or step + 1 == t.total_steps:
            counters["skipped"] = skipped_total(skipped_before, loader)
            save(step + 1)
    bar.close()
    metrics.close()
    dist.barrier()
    return {"final_loss": loss_value, "step": t.total_steps, "run_dir": str(run_dir)}
