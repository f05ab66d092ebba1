"""How the backbone is spread over ranks: `ddp` (replicated, DistributedDataParallel) or `fsdp` (FSDP2: each
transformer block and the root `fully_shard`-ed, parameters as Shard(0) DTensors).

The class centers stay outside both: PartialFC already splits them by rows and has its own optimizer, so the
two optimizers never mix DTensor and plain parameters (a foreach AdamW over both fails: scale.md section 2).

Checkpoints hold the FULL backbone state whatever the sharding (gathered to rank 0 on save, split again on load
by torch.distributed.checkpoint.state_dict), so a run saved under FSDP resumes under DDP and the reverse, at any
world size, and export/eval read the same backbone.safetensors.
"""
import contextlib

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from mlcd import dist

SHARDINGS = ("ddp", "fsdp")


def check_sharding(kind: str, world_size: int) -> None:
    if kind not in SHARDINGS:
        raise ValueError(f"train.sharding={kind!r}: must be one of {SHARDINGS}")
    if kind == "fsdp" and world_size < 2:
        raise ValueError("train.sharding=fsdp needs world size >= 2 (launch with torchrun or srun); on one process "
                         "use train.sharding=ddp, which trains the plain model")


def wrap_backbone(model: torch.nn.Module, kind: str, device: torch.device, precision: str) -> torch.nn.Module:
    """The module the training step calls. FSDP shards `model` in place (the returned module IS `model`), with
    bf16 parameters and fp32 gradient reduction under precision=bf16; build the backbone optimizer after this."""
    world = dist.world_size()
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
              else MixedPrecisionPolicy())
        for block in model.blocks:  # gathered block by block: one computing, the next prefetched (mlcd.plan)
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    if world > 1:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def held_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this rank holds, parameters of the model): equal under DDP, about 1/W of it under FSDP."""
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    return held, sum(p.numel() for p in model.parameters())


def uses_autocast(kind: str) -> bool:
    """FSDP casts its parameters itself (MixedPrecisionPolicy); DDP runs fp32 weights under bf16 autocast."""
    return kind != "fsdp"


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps that are not the last."""
    if enabled:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def local_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's part of a gradient: the local shard of an FSDP (DTensor) gradient, else the gradient."""
    return p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad


def is_sharded(p: torch.nn.Parameter) -> bool:
    return isinstance(p.grad if p.grad is not None else p, DTensor)


_FULL = StateDictOptions(full_state_dict=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) of the whole backbone, parameter-name keyed, on CPU. Collective under FSDP (each
    tensor is gathered); rank 0 is the one that writes them."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.world_size() > 1)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict,
                    optim_state: dict | None) -> None:
    """The reverse of full_state, on every rank (each rank holds the full state read from disk; FSDP keeps its
    shard of each tensor). An optimizer state saved by index (checkpoints before sharding existed) loads as is."""
    set_model_state_dict(model, weights, options=_FULL)
    if optimizer is None or optim_state is None:
        return
    if all(isinstance(k, int) for k in optim_state["state"]):
        optimizer.load_state_dict(optim_state)
    else:
        set_optimizer_state_dict(model, optimizer, optim_state, options=_FULL)
