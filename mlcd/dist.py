"""The few distributed helpers every stage shares.

Everything works without torch.distributed initialised (world size 1), so the same code runs as
plain `python` and under `torchrun`.
"""
import datetime
import hashlib
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(timeout_minutes: float = 30.0) -> torch.device:
    """Initialise the process group when launched by torchrun (NCCL on GPU, gloo on CPU).

    Returns the device this rank computes on. A plain `python` launch stays single-process.
    """
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return device


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM all-reduce; a no-op at world size 1."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across processes and Python versions: the one way
    every per-rank / per-step / per-worker generator is seeded, so resume reproduces every stream."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
