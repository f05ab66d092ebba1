"""Checkpoints: one directory per step, written to a temp name and renamed, loadable at any world size.

    step-00001000/
      manifest.json            step, world size, class count, embed dim, shard table, model + full config
      backbone.safetensors     backbone weights (unwrapped from DDP)
      trainer.pt               backbone optimizer state, step, counters (identical on every rank)
      centers-rank00000.pt     this rank's class-center shard + its optimizer state (sparse AdamW moments)
      rng-rank00000.pt         this rank's RNG streams (restored only at the same world size)

A directory named `step-*` is complete by construction (the rename happens after every rank wrote
and rank 0 wrote the manifest); `.tmp-*` leftovers from a killed run are ignored and cleaned up.
"""
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from mlcd import dist

MANIFEST = "manifest.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(ckpt_root) -> list[Path]:
    """Complete checkpoints under `ckpt_root`, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_root, step: int, backbone: torch.nn.Module, backbone_opt, pfc, center_opt,
         trainer_state: dict, manifest: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    r = dist.rank()
    torch.save({"shard": pfc.state_dict(), "optim": center_opt.state_dict()}, tmp / f"centers-rank{r:05d}.pt")
    torch.save(rng_state(), tmp / f"rng-rank{r:05d}.pt")
    if dist.is_main():
        save_file({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()},
                  str(tmp / "backbone.safetensors"))
        torch.save({"optim": backbone_opt.state_dict(), **trainer_state}, tmp / "trainer.pt")
    dist.barrier()
    if dist.is_main():
        manifest = {**manifest, "step": step, "world_size": dist.world_size(), "time": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_manifest(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a complete checkpoint ({MANIFEST} missing)")
    return json.loads(path.read_text())


def check_compatible(manifest: dict, expected: dict, ckpt_dir) -> None:
    """A checkpoint that does not match the config is an error naming the field, never a silent re-init."""
    for key, want in expected.items():
        have = manifest.get(key)
        if have != want:
            raise ValueError(f"checkpoint {ckpt_dir} does not match the config: {key} is {have!r} in the "
                             f"checkpoint but {want!r} in the config")


def resolve_resume(resume, ckpt_root) -> Path | None:
    """`auto` -> newest complete checkpoint or None; `none`/null -> None; otherwise an explicit directory."""
    if resume in (None, False, "none", "null", ""):
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    read_manifest(path)  # fails clearly when it is not a checkpoint
    return path


def load_center_states(ckpt_dir, saved_world: int) -> list[dict]:
    states = []
    for r in range(saved_world):
        path = Path(ckpt_dir) / f"centers-rank{r:05d}.pt"
        if not path.exists():
            raise FileNotFoundError(f"{ckpt_dir}: center shard {path.name} missing (saved at world size {saved_world})")
        states.append(torch.load(path, map_location="cpu", weights_only=False))
    return states


def load_trainer_state(ckpt_dir) -> dict:
    return torch.load(Path(ckpt_dir) / "trainer.pt", map_location="cpu", weights_only=False)


def load_rng_state(ckpt_dir, rank: int) -> dict | None:
    path = Path(ckpt_dir) / f"rng-rank{rank:05d}.pt"
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def load_backbone_weights(ckpt_dir) -> dict:
    return load_file(str(Path(ckpt_dir) / "backbone.safetensors"))


def load_backbone(ckpt_dir):
    """(model, model_cfg) from a training checkpoint directory (or a run dir: its newest checkpoint)."""
    from mlcd.models import build_model

    try:
        path = find_checkpoint(ckpt_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (train one with train.py, or run `make demo` for the default runs/demo)") from None
    manifest = read_manifest(path)
    model_cfg = OmegaConf.create(manifest["model"])
    model = build_model(model_cfg)
    model.load_state_dict(load_backbone_weights(path))
    return model.eval(), model_cfg


def find_checkpoint(path) -> Path:
    """A checkpoint directory, or a run directory's newest checkpoint."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: neither a checkpoint nor a run dir with checkpoints/step-*")
    return found[-1]


def init_backbone_from(model: torch.nn.Module, ckpt_dir, model_cfg: dict) -> list[str]:
    """Load another run's backbone into `model` for a new run (e.g. the paper's 224 -> 336 fine-tune).

    The architecture must match in everything but `image_size` and the `name` label (an error names the
    field otherwise); a learned position embedding is resized bicubically to the new patch grid.
    Returns the resized keys."""
    from mlcd.models.vit import resize_pos_embed

    manifest = read_manifest(ckpt_dir)
    for key in sorted(set(manifest["model"]) | set(model_cfg)):
        if key not in ("image_size", "name") and manifest["model"].get(key) != model_cfg.get(key):
            raise ValueError(f"train.init_from={ckpt_dir}: model.{key} is {manifest['model'].get(key)!r} there but "
                             f"{model_cfg.get(key)!r} in the config (only image_size may differ)")
    state, resized = load_backbone_weights(ckpt_dir), []
    if "positional_embedding" in state and state["positional_embedding"].shape != model.positional_embedding.shape:
        state["positional_embedding"] = resize_pos_embed(state["positional_embedding"], model.grid, model.grid)
        resized.append("positional_embedding")
    model.load_state_dict(state)
    return resized
