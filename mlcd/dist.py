"""The few distributed helpers every stage shares.

Everything works without torch.distributed initialised (world size 1), so the same code runs as
plain `python`, under `torchrun` (single or multi-node) and under SLURM's `srun python` (one task per GPU).
"""
import datetime
import hashlib
import os
import re
import sys
import threading
import time

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return launch_env()["local_rank"]


def is_main() -> bool:
    return rank() == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist ("gpu-[003-010,12],login1" -> "gpu-003"), without needing scontrol."""
    host, depth = "", 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        host += ch
    # each bracket [a-b,c] keeps its first item, zero padding included
    return re.sub(r"\[([^],-]+)[^]]*\]", r"\1", host)


def launch_env(env=None) -> dict:
    """Rank, world size, local rank and rendezvous address for this process, from the launcher's variables.

    torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come first: under `srun torchrun`
    each worker also inherits its node task's SLURM_PROCID, which is not its rank (open_clip's order too).
    Otherwise SLURM's (`srun python`, one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the
    rendezvous host is MASTER_ADDR if set, else the first host of SLURM_JOB_NODELIST; the port MASTER_PORT
    if set, else 29500 + SLURM_JOB_ID % 1000 (two jobs sharing a head node do not collide). Neither: world 1.
    """
    env = os.environ if env is None else env

    def num(name):
        try:
            return int(env[name])
        except ValueError:
            raise ValueError(f"launcher variable {name}={env[name]!r} is not an integer") from None

    if "WORLD_SIZE" in env:
        if "RANK" not in env:
            raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but RANK is not: launch with torchrun, "
                             "or set both (or neither)")
        out = {"launcher": "torchrun", "rank": num("RANK"), "world_size": num("WORLD_SIZE"),
               "local_rank": num("LOCAL_RANK") if "LOCAL_RANK" in env else 0,
               "master_addr": env.get("MASTER_ADDR"), "master_port": env.get("MASTER_PORT")}
    elif "SLURM_PROCID" in env:
        if "SLURM_NTASKS" not in env:
            raise ValueError(f"SLURM_PROCID={env['SLURM_PROCID']} is set but SLURM_NTASKS is not: launch with "
                             "`srun --ntasks=N python ...` (or use torchrun)")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
        port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", 0) or 0) % 1000)
        out = {"launcher": "slurm", "rank": num("SLURM_PROCID"), "world_size": num("SLURM_NTASKS"),
               "local_rank": num("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
               "master_addr": addr, "master_port": port}
        if out["world_size"] > 1 and not addr:
            raise ValueError("SLURM launch with SLURM_NTASKS>1 but neither MASTER_ADDR nor SLURM_JOB_NODELIST is "
                             "set: export MASTER_ADDR=<first node's host name>")
    else:
        return {"launcher": None, "rank": 0, "world_size": 1, "local_rank": int(env.get("LOCAL_RANK", 0)),
                "master_addr": None, "master_port": None}
    if not 0 <= out["rank"] < out["world_size"]:
        raise ValueError(f"{out['launcher']} launch: rank {out['rank']} is not in [0, world size "
                         f"{out['world_size']})")
    return out


def init(timeout_minutes: float = 30.0) -> torch.device:
    """Initialise the process group when launched by torchrun or SLURM's srun (NCCL on GPU, gloo on CPU).

    Returns the device this rank computes on. A plain `python` launch stays single-process. Under SLURM the
    torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are exported, so code
    and libraries that read them see the same values.
    """
    env = launch_env()
    if env["launcher"] == "slurm" and env["world_size"] > 1:
        os.environ.update(RANK=str(env["rank"]), WORLD_SIZE=str(env["world_size"]),
                          LOCAL_RANK=str(env["local_rank"]), MASTER_ADDR=env["master_addr"],
                          MASTER_PORT=str(env["master_port"]))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker
        exit_with_launcher()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", env["local_rank"]) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if env["world_size"] > 1 and not is_dist():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", init_method="env://",
            rank=env["rank"], world_size=env["world_size"],
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return device


_launcher_watch: threading.Thread | None = None


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """End this process when its launcher dies. torchrun starts each worker in a session of its own, so a
    SIGKILLed torchrun (kill -9, an OOM kill) leaves its workers training on, orphaned, into the run directory
    that a re-run resumes into. A daemon thread checks the parent every `poll_s` seconds; a checkpoint cut short
    stays a `.tmp-*` directory, which is never read back."""
    global _launcher_watch
    if _launcher_watch is not None:
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"mlcd: launcher (pid {parent}) is gone: worker {os.getpid()} exits", file=sys.stderr, flush=True)
        os._exit(1)

    _launcher_watch = threading.Thread(target=watch, name="exit-with-launcher", daemon=True)
    _launcher_watch.start()


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


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place MAX all-reduce; a no-op at world size 1."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] at world size 1."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across processes and Python versions: the one way
    every per-rank / per-step / per-worker generator is seeded, so resume reproduces every stream."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
