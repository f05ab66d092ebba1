"""Checkpoints: one directory per step, written to a temp name and renamed, loadable at any world size.

    step-00001000/
      manifest.json            step, world size, class count, embed dim, shard table, model + full config
      backbone.safetensors     the full backbone weights (unwrapped from DDP, gathered from FSDP shards)
      trainer.pt               the full backbone optimizer state (parameter-name keyed) and counters
      centers-rank00000.pt     this rank's class-center shard + its optimizer state (sparse AdamW moments)
      rng-rank00000.pt         this rank's RNG streams (restored only at the same world size)

A directory named `step-*` is complete by construction: every file is fsynced, then rank 0 writes the manifest
(last), renames the directory into place and fsyncs its parent, so neither a killed process nor a lost node leaves
a `step-*` that reads back incomplete; `.tmp-*` leftovers are ignored and replaced. A failed write raises one
CheckpointWriteError on every rank naming the step, the rank, the file and the OS's reason (e.g. ENOSPC).

Nothing is unpickled as code: the .pt files hold only tensors, numbers, strings and containers and are read with
torch.load(weights_only=True). A rank resuming at another world size reads only the rows it will hold: the old
shards are memory-mapped and sliced, so its peak memory is its new shard, not the whole [C, D] matrix.
"""
import copy
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mlcd import dist, fileio
from mlcd.models.loading import BACKBONE, MANIFEST, find_checkpoint, list_checkpoints, load_backbone_weights, read_manifest
from mlcd.partial_fc import ShardSpec
from mlcd.train.sharding import full_state, load_full_state
from mlcd.validate import refuse_other_settings

__all__ = ["Checkpointer", "CheckpointWriteError", "save", "restore", "init_from", "init_model_config", "resolve_resume", "find_checkpoint", "list_checkpoints",
           "read_manifest", "load_center_shard", "load_center_states", "reshard", "check_compatible"]
_MOMENTS = ("exp_avg", "exp_avg_sq", "row_step")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _centers_file(ckpt_dir, rank: int) -> Path:
    return Path(ckpt_dir) / f"centers-rank{rank:05d}.pt"


def _load(path, mmap: bool = False):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG stream of this process, as tensors and plain numbers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- save
class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written: the message names the step, the rank, the file and the OS's reason."""


def _cause(exc: BaseException) -> str:
    """The OS-level reason behind a failed write. torch.save reports a full disk only as "basic_ios::clear: iostream
    error" (the OSError is its context when it writes through a Python file), safetensors as "... (os error 28)"."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"[Errno {seen.errno}] {os.strerror(seen.errno)}"
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        return f"[Errno {found.group(1)}] {os.strerror(int(found.group(1)))}"
    return f"{type(exc).__name__}: {exc}"


def _write_file(path: Path, obj) -> None:
    """One checkpoint file, flushed to disk before the call returns."""
    if path.name == BACKBONE:
        save_file(obj, str(path))
        fileio.fsync(path)
        return
    with open(path, "wb") as f:  # a Python file, so a failed write keeps its OSError (and errno) in the chain
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _cpu_copy(obj):
    """A copy whose tensors own fresh CPU memory: what a background save writes while training goes on. Containers
    keep their type and a state_dict's `_metadata`, so the file is byte for byte the synchronous save's."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj  # numbers, strings: immutable, and shared as in the original so the pickle is the same


class _Pending:
    """One save in flight on this rank: its files (path -> state) and, once written, the error if any."""

    def __init__(self, step: int, tmp: Path, files: dict, manifest: dict):
        self.step, self.tmp, self.files, self.manifest = step, tmp, files, manifest
        self.error, self.thread = None, None

    def write(self) -> None:
        try:
            for path, obj in self.files.items():
                try:
                    _write_file(path, obj)
                except Exception as e:  # noqa: BLE001 - reported to every rank by Checkpointer._finish
                    self.error = f"rank {dist.rank()} could not write {path}: {_cause(e)}"
                    return
        finally:
            self.files = None  # free the copy as soon as it is on disk

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


class Checkpointer:
    """A run's checkpoint writer: every rank calls each method together (they are collectives).

    save() takes the state at a step boundary (FSDP gathers the backbone to rank 0) and each rank writes its files
    into .tmp-step-N/, each one fsynced. Finishing is collective: every rank reports whether its writes succeeded.
    On success rank 0 writes the manifest (the last file: it is what makes a directory complete), renames the
    directory into place, fsyncs the parent and prunes old checkpoints. On failure every rank raises the same
    CheckpointWriteError naming which rank failed to write which file and why; the previous checkpoint stays the
    newest complete one and the partial directory is removed.

    async_save: the state is copied to CPU memory at the step boundary (host memory: one more copy of the
    backbone, its moments and this rank's centers) and written by a background thread while training goes on.
    poll(), called at every step boundary, finishes the save once every rank has written (one tiny all-reduce per
    step while a save is in flight) and raises a failed write there; a save waits for the one before it (at most one
    in flight); wait() blocks until it is finished (the end of training). The files are the synchronous save's."""

    def __init__(self, root, keep_last: int, async_save: bool = False):
        self.root, self.keep_last, self.async_save = Path(root), int(keep_last), bool(async_save)
        self._pending: _Pending | None = None

    def resume_dir(self, resume) -> Path | None:
        """train.resume: `auto` -> the newest complete checkpoint here or None; none -> None; else that directory."""
        return resolve_resume(resume, self.root)

    def restore(self, ckpt_dir, model, backbone_opt, pfc, center_opt, stream, identity: dict) -> dict:
        """Resume in one call: the backbone and its optimizer, this rank's centers and moments, its RNG streams (see
        `restore`) and the data stream's state. Returns {"step", "counters", "world_size" (the saved one)}."""
        restored = restore(ckpt_dir, model, backbone_opt, pfc, center_opt, identity)
        stream.load_state_dict({"skipped": restored["counters"].get("skipped", {})})
        return restored

    def save(self, step: int, backbone: torch.nn.Module, backbone_opt, pfc, center_opt, trainer_state: dict,
             manifest: dict) -> Path:
        """`backbone` is the unwrapped model (FSDP-sharded in place or not). Returns the final directory (complete
        on return when synchronous; after a later poll()/wait() when asynchronous)."""
        self.wait()
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        r = dist.rank()
        weights, optim_state = full_state(backbone, backbone_opt)
        files = {_centers_file(tmp, r): {"shard": pfc.state_dict(), "optim": center_opt.state_dict()},
                 tmp / f"rng-rank{r:05d}.pt": rng_state()}
        if dist.is_main():
            files[tmp / BACKBONE] = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
            files[tmp / "trainer.pt"] = {"optim": optim_state, **trainer_state}
        pending = _Pending(step, tmp, _cpu_copy(files) if self.async_save else files, copy.deepcopy(manifest))
        self._pending = pending
        if self.async_save:
            pending.thread = threading.Thread(target=pending.write, name=f"checkpoint-{step}", daemon=True)
            pending.thread.start()
        else:
            pending.write()
            self._finish()
        return self.root / step_dir_name(step)

    def poll(self) -> None:
        """At a step boundary: finish the save in flight if every rank has written its files (or one has failed)."""
        if self._pending is None:
            return
        p = self._pending
        not_done, failed = dist.all_reduce_sum(torch.tensor([float(not p.done()), float(p.error is not None)]))
        if failed or not not_done:
            self._finish()

    def wait(self) -> None:
        """Block until the save in flight (if any) is finished; raises its CheckpointWriteError."""
        if self._pending is not None:
            self._finish()

    def _finish(self) -> None:
        p, self._pending = self._pending, None
        if p.thread is not None:
            p.thread.join()
        self._raise_any(p, p.error)
        error = None
        if dist.is_main():
            try:
                fileio.fsync(p.tmp)
                fileio.write_json(p.tmp / MANIFEST, {**p.manifest, "step": p.step, "world_size": dist.world_size(),
                                                     "time": time.time()})
                fileio.replace_dir(p.tmp, self.root / step_dir_name(p.step))  # a re-saved step replaces the old one
            except Exception as e:  # noqa: BLE001
                error = f"rank 0 could not write {p.tmp / MANIFEST} or rename it into place: {_cause(e)}"
            else:
                for old in list_checkpoints(self.root)[:-self.keep_last] if self.keep_last > 0 else []:
                    shutil.rmtree(old, ignore_errors=True)
        self._raise_any(p, error)

    def _raise_any(self, p: _Pending, error: str | None) -> None:
        errors = [e for e in dist.all_gather_object(error) if e]
        if not errors:
            return
        if dist.is_main():
            shutil.rmtree(p.tmp, ignore_errors=True)  # frees the space a full disk needs back
        newest = list_checkpoints(self.root)
        raise CheckpointWriteError(
            f"checkpoint step {p.step} was not saved: {'; '.join(errors)}. The newest complete checkpoint is "
            f"{newest[-1] if newest else 'none'} (resume starts there)")


def save(ckpt_root, step: int, backbone: torch.nn.Module, backbone_opt, pfc, center_opt,
         trainer_state: dict, manifest: dict, keep_last: int) -> Path:
    """One synchronous save (tools, benches, tests); training uses a Checkpointer."""
    return Checkpointer(ckpt_root, keep_last).save(step, backbone, backbone_opt, pfc, center_opt, trainer_state,
                                                   manifest)


# ---------------------------------------------------------------------------------------------- restore
def check_compatible(manifest: dict, expected: dict, ckpt_dir) -> None:
    """A checkpoint that does not match the config is an error naming the field, never a silent re-init."""
    refuse_other_settings({k: manifest.get(k) for k in expected}, expected, f"checkpoint {ckpt_dir}",
                          "Resume it under its own settings, or start this run in another out_dir.")


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


def restore(ckpt_dir, model, backbone_opt, pfc, center_opt, identity: dict) -> dict:
    """Resume in one call: check the checkpoint against the config, then load the backbone and its optimizer, this
    rank's rows of the class centers and their moments (re-split when the world size changed) and, at the same
    world size, this rank's RNG streams. Returns {"step", "counters", "world_size" (the saved one)}."""
    manifest = read_manifest(ckpt_dir)
    check_compatible(manifest, identity, ckpt_dir)
    trainer = _load(Path(ckpt_dir) / "trainer.pt")
    load_full_state(model, backbone_opt, load_backbone_weights(ckpt_dir), trainer["optim"])
    state = load_center_shard(ckpt_dir, manifest, pfc.rank, pfc.shard_spec.world_size)
    pfc.load_state_dict(state["shard"])
    center_opt.load_state_dict(state["optim"])
    rng_file = Path(ckpt_dir) / f"rng-rank{pfc.rank:05d}.pt"
    if manifest["world_size"] == pfc.shard_spec.world_size and rng_file.exists():
        set_rng_state(_load(rng_file))
    return {"step": manifest["step"], "counters": trainer["counters"], "world_size": manifest["world_size"]}


# ---------------------------------------------------------------------------------------------- init_from
MAY_DIFFER = ("image_size", "name")  # what an init source's model and the run's may disagree on


def command_line_model_keys() -> set[str]:
    """The model.* keys given on this process's hydra command line ("*": a `model=NAME` group choice, i.e. all of
    them). Empty when not under hydra's main (compose, programmatic calls): pass `explicit` there instead."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "model" or key.startswith("model@"):
            keys.add("*")
        elif key.startswith("model."):
            keys.add(key.split(".")[1])
    return keys


def init_model_config(init_from, model_cfg, resuming: bool, explicit: set[str] | None = None):
    """The model config of a run started with `train.init_from`, decided before any work (a refusal writes nothing):

    - one of our checkpoints or runs: `model_cfg` as it is (init_backbone_from then requires the source's model
      in everything but image_size and name);
    - a Hugging Face vision model directory: the SOURCE's model (from its config.json and weight names), whatever
      model group the experiment chose. Model keys set explicitly (`explicit`: the keys given on the command line,
      read from hydra when None; "*" = a `model=NAME` group choice, i.e. every key) are checked against it:
      model.image_size is taken (a learned position embedding is resized bicubically; RoPE2D needs nothing),
      model.name is a label, and any other key that contradicts the source (width, layers, heads, mlp_dim,
      patch_size, pos_embed, embed_dim, act, ln_eps) is refused, naming each field;
    - nothing there: refused, unless the run is resuming (then the source is not read; a Hugging Face source must
      stay readable while its runs resume, since the model config comes from it)."""
    from mlcd.models import model_config
    from mlcd.models.hf import hf_source, is_hf_dir
    from mlcd.models.loading import init_source

    if not is_hf_dir(init_from):
        if not resuming:
            init_source(init_from)  # neither kind: refused here, before the run directory is made
        return model_cfg
    source = hf_source(init_from)
    ours = model_config(model_cfg)
    explicit = command_line_model_keys() if explicit is None else set(explicit)
    given = set(ours) if "*" in explicit else explicit & set(ours)
    wrong = [f"model.{k}={ours[k]!r} (the source has {source.model[k]!r})" for k in sorted(given)
             if k not in MAY_DIFFER and ours[k] != source.model[k]]
    if wrong:
        raise ValueError(f"train.init_from={init_from} is a Hugging Face {source.declared}: the model config comes "
                         f"from its config.json, and the command line contradicts it: {'; '.join(wrong)}. Drop "
                         f"{'the model group choice' if '*' in explicit else 'those overrides'} (only model.image_size "
                         "may differ: the position embedding is resized), or start from another model")
    return {**source.model, **{k: ours[k] for k in MAY_DIFFER if k in given}}


def init_from(src, model, pfc, with_centers: bool, identity: dict) -> str:
    """Start a new run from another run's weights (the paper's 224 -> 336 fine-tune), or from a Hugging Face vision
    model (MLCDVisionModel, CLIPVisionModel[WithProjection], a CLIPModel's vision tower): its backbone (a learned
    position embedding resized to the new grid) and, for our runs with `with_centers`, its class centers re-split
    over this world size (a Hugging Face model has none: they start fresh); optimizers start fresh. Returns a
    one-line description."""
    from mlcd.models.loading import init_source

    kind, src = init_source(src)
    if kind == "hf":
        resized, source = init_backbone_from_hf(model, src, identity["model"])
        return (f"initialised from Hugging Face {source.declared} {src} (backbone"
                f"{', resized ' + ', '.join(resized) if resized else ''}; class centers start fresh: it has none)")
    resized = init_backbone_from(model, src, identity["model"])
    if with_centers:
        manifest = read_manifest(src)
        check_compatible(manifest, {k: identity[k] for k in ("num_classes", "embed_dim")}, src)
        pfc.load_state_dict(load_center_shard(src, manifest, pfc.rank, pfc.shard_spec.world_size)["shard"])
    return (f"initialised from {src} (backbone{', resized ' + ', '.join(resized) if resized else ''}"
            f"{', class centers' if with_centers else ''})")


def check_same_model(theirs: dict, ours: dict, src) -> None:
    """train.py's rule for an init source: its model is the config's, MAY_DIFFER aside."""
    for key in sorted(set(theirs) | set(ours)):
        if key not in MAY_DIFFER and theirs.get(key) != ours.get(key):
            raise ValueError(f"train.init_from={src}: model.{key} is {theirs.get(key)!r} there but "
                             f"{ours.get(key)!r} in the config (only image_size may differ)")


def _load_resized(model: torch.nn.Module, state: dict) -> list[str]:
    from mlcd.models.vit import resize_pos_embed

    resized = []
    if "positional_embedding" in state and state["positional_embedding"].shape != model.positional_embedding.shape:
        state["positional_embedding"] = resize_pos_embed(state["positional_embedding"], model.grid, model.grid)
        resized.append("positional_embedding")
    load_full_state(model, None, state, None)
    return resized


def init_backbone_from(model: torch.nn.Module, ckpt_dir, model_cfg: dict) -> list[str]:
    """Load another run's backbone into `model`. The architecture must match in everything but `image_size` and
    the `name` label (an error names the field otherwise). Returns the resized keys."""
    check_same_model(read_manifest(ckpt_dir)["model"], model_cfg, ckpt_dir)
    return _load_resized(model, load_backbone_weights(ckpt_dir))


def init_backbone_from_hf(model: torch.nn.Module, hf_dir, model_cfg: dict):
    """Load a Hugging Face vision model's weights into `model` (fp32), under the same rule as init_backbone_from.
    Returns (resized keys, the source's HFSource)."""
    from mlcd.models import model_config
    from mlcd.models.hf import from_hf_state_dict, hf_source, read_hf_weights

    source = hf_source(hf_dir)
    check_same_model(source.model, model_config(model_cfg), hf_dir)
    state = {k: v.float() for k, v in from_hf_state_dict(source.model, read_hf_weights(hf_dir)).items()}
    return _load_resized(model, state), source


# ---------------------------------------------------------------------------------------------- center shards
def _take_rows(state_of, old: ShardSpec, start: int, n: int) -> tuple[dict, list | None]:
    """(rows, optimizer param groups): rows [start, start + n) of the full center matrix and of its moments, read
    from the old shards that overlap them (`state_of(r)` gives old rank r's state; the others are never opened)."""
    pieces, has_optim = {}, True
    overlapping = [r for r in range(old.world_size)
                   if max(start, old.start(r)) < min(start + n, old.start(r) + old.n_local(r))] or [0]
    for r in overlapping:  # [0] when n == 0: an empty slice of rank 0 gives the shapes
        st, s = state_of(r), old.start(r)
        lo = max(start, s) - s
        hi = max(lo, min(start + n, s + old.n_local(r)) - s)
        pieces.setdefault("weight", []).append(st["shard"]["weight"][lo:hi])
        has_optim = has_optim and "optim" in st
        for key in _MOMENTS if "optim" in st else ():
            pieces.setdefault(key, []).append(st["optim"]["state"][0][key][lo:hi])
    rows = {k: torch.cat(v) for k, v in pieces.items() if k == "weight" or has_optim}  # cat copies: no aliasing
    return rows, state_of(overlapping[0]).get("optim", {}).get("param_groups") if has_optim else None


def _shard_state(rows: dict, groups, spec: ShardSpec, rank: int) -> dict:
    start, n = spec.bounds(rank)
    info = {"num_classes": spec.num_classes, "world_size": spec.world_size, "rank": rank, "start": start, "n_local": n}
    state = {"shard": {"weight": rows["weight"], "_extra_state": info}}
    if groups is not None:
        state["optim"] = {"state": {0: {k: rows[k] for k in _MOMENTS}}, "param_groups": [{**g} for g in groups]}
    return state


def _check_old_state(state: dict, r: int, old: ShardSpec, where) -> dict:
    info = state["shard"]["_extra_state"]
    want = {"num_classes": old.num_classes, "world_size": old.world_size, "rank": r, "start": old.start(r),
            "n_local": old.n_local(r)}
    if info != want or state["shard"]["weight"].shape[0] != old.n_local(r):
        raise ValueError(f"{where}: center shard {r} is {info} with {state['shard']['weight'].shape[0]} rows, "
                         f"expected {want}")
    return state


def load_center_shard(ckpt_dir, manifest: dict, rank: int, world_size: int) -> dict:
    """This rank's {"shard", "optim"} state at `world_size`, read from a checkpoint saved at any world size. Only
    the old shards that overlap this rank's rows are opened, memory-mapped, so only those rows are read."""
    old = ShardSpec.from_dict(manifest["shards"])
    opened = {}

    def state_of(r):
        if r not in opened:
            path = _centers_file(ckpt_dir, r)
            if not path.exists():
                raise FileNotFoundError(f"{ckpt_dir}: center shard {path.name} missing (saved at world size "
                                        f"{old.world_size})")
            opened[r] = _check_old_state(_load(path, mmap=True), r, old, ckpt_dir)
        return opened[r]

    new = ShardSpec(old.num_classes, world_size)
    rows, groups = _take_rows(state_of, old, *new.bounds(rank))
    return _shard_state(rows, groups, new, rank)


def load_center_states(ckpt_dir, saved_world: int) -> list[dict]:
    """Every rank's center state as saved (tools and tests; training reads only its own rows)."""
    out = []
    for r in range(saved_world):
        path = _centers_file(ckpt_dir, r)
        if not path.exists():
            raise FileNotFoundError(f"{ckpt_dir}: center shard {path.name} missing (saved at world size {saved_world})")
        out.append(_load(path))
    return out


def reshard(rank_states: list, new_world_size: int) -> list:
    """Re-split per-rank states {"shard": PartialFC.state_dict(), "optim": SparseRowAdamW.state_dict()} (optim
    optional) saved at world size len(rank_states) into `new_world_size` states by the contiguous-block rule.
    Weights, both moments and the row step counts move with their rows. Pure."""
    num_classes = rank_states[0]["shard"]["_extra_state"]["num_classes"]
    old = ShardSpec(num_classes, len(rank_states))
    for r, state in enumerate(rank_states):
        _check_old_state(state, r, old, "reshard")
    new = ShardSpec(num_classes, new_world_size)
    return [_shard_state(*_take_rows(rank_states.__getitem__, old, *new.bounds(r)), new, r)
            for r in range(new_world_size)]
