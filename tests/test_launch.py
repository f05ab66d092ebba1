"""Launchers: `srun python` (SLURM variables only), `srun torchrun` (torchrun's variables win) and multi-node
torchrun with a c10d rendezvous, each with real processes that call mlcd.dist.init() and all-reduce over gloo."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlcd import dist
from mlcd.dist import first_host, launch_env

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST",
               "SLURM_NODELIST", "SLURM_JOB_ID")

# What every launched process runs: init, one all-reduce of (rank + 1), report what it saw.
WORKER = """
import json, os, torch
from mlcd import dist
dist.init(timeout_minutes=1)
t = torch.tensor([dist.rank() + 1.0])
dist.all_reduce_sum(t)
line = "RESULT " + json.dumps({"rank": dist.rank(), "world": dist.world_size(), "local_rank": dist.local_rank(),
      "sum": t.item(), "RANK": os.environ.get("RANK"), "MASTER_ADDR": os.environ.get("MASTER_ADDR"),
      "MASTER_PORT": os.environ.get("MASTER_PORT")}) + "\\n"
os.write(1, line.encode())   # one write(2) under PIPE_BUF: workers sharing a pipe cannot interleave inside it

dist.cleanup()
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_KEYS}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), **extra}


def _free_port(lo=None, hi=None) -> int:
    """A port nobody listens on: any (lo=None) or the first free one in [lo, hi)."""
    for port in ([0] if lo is None else range(lo, hi)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{lo}, {hi})")


def _results(procs, timeout=120):
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, stdout[-3000:]
        # torchrun's workers share one pipe: a line may start mid-way through another worker's output
        out += [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", stdout)]
    return sorted(out, key=lambda r: r["rank"])


def _popen(cmd, env):
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return str(path)


@pytest.mark.slow
def test_srun_python_uses_slurm_variables(worker):
    """Two plain processes with only SLURM's variables, as `srun --ntasks=2 python ...` starts them: the
    rendezvous host comes from the node list, the port from the job id (no MASTER_ADDR/PORT, no RANK)."""
    port = _free_port(29500, 30500)
    job_id = 7000 + port - 29500                                        # 29500 + job_id % 1000 == port
    procs = [_popen([sys.executable, worker], _clean_env(
        SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NODELIST="localhost,otherhost")) for r in range(2)]
    res = _results(procs)
    assert [(r["rank"], r["world"], r["local_rank"], r["sum"]) for r in res] == [(0, 2, 0, 3.0), (1, 2, 1, 3.0)]
    # exported torchrun-style, so code reading RANK / MASTER_* sees the same values
    assert [(r["RANK"], r["MASTER_ADDR"], r["MASTER_PORT"]) for r in res] == [
        ("0", "localhost", str(port)), ("1", "localhost", str(port))]


@pytest.mark.slow
def test_srun_torchrun_prefers_torchrun_variables(worker):
    """Under `srun torchrun` each worker inherits its node task's SLURM_PROCID/NTASKS/LOCALID; they are not its
    rank. Here they say rank 5 of 7: the workers must still be ranks 0 and 1 of 2."""
    env = _clean_env(SLURM_PROCID="5", SLURM_NTASKS="7", SLURM_LOCALID="4", SLURM_JOB_NODELIST="nohost[1-7]")
    proc = _popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker], env)
    res = _results([proc])
    assert [(r["rank"], r["world"], r["local_rank"], r["sum"]) for r in res] == [(0, 2, 0, 3.0), (1, 2, 1, 3.0)]


@pytest.mark.slow
def test_multinode_torchrun_c10d_rendezvous(worker):
    """Two torchrun launchers (two "nodes", one worker each) meeting at a c10d rendezvous endpoint, as on two
    machines: torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=mlcd-test", worker]
    res = _results([_popen(cmd, _clean_env()) for _ in range(2)])
    assert [(r["rank"], r["world"], r["local_rank"], r["sum"]) for r in res] == [(0, 2, 0, 3.0), (1, 2, 0, 3.0)]


def test_single_slurm_task_stays_single_process(monkeypatch):
    for k in LAUNCH_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch_env()["world_size"] == 1
    dist.init()
    assert not dist.is_dist() and dist.world_size() == 1 and "RANK" not in os.environ


def test_launch_env_order_and_defaults():
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu-[003-010,12],login1", "SLURM_JOB_ID": "4242"}
    assert launch_env(slurm) == {"launcher": "slurm", "rank": 9, "world_size": 16, "local_rank": 1,
                                 "master_addr": "gpu-003", "master_port": "29742"}
    explicit = launch_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (explicit["master_addr"], explicit["master_port"]) == ("head", "1234")
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    assert launch_env({**slurm, **torchrun}) == {"launcher": "torchrun", "rank": 3, "world_size": 4,
                                                 "local_rank": 1, "master_addr": "h", "master_port": "5"}
    assert launch_env({})["world_size"] == 1 and launch_env({})["launcher"] is None


@pytest.mark.parametrize("nodelist, first", [("node01", "node01"), ("node[01-04]", "node01"),
                                             ("gpu-[003-010,12],login1", "gpu-003"), ("a,b[1-2]", "a"),
                                             ("n[7,9]x", "n7x"), ("r[1-2]n[3-4]", "r1n3")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("env, message", [
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS is not"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "neither MASTER_ADDR nor SLURM_JOB_NODELIST"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"}, "rank 2 is not in [0, world size 2)"),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"}, "SLURM_PROCID='x' is not an integer"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
])
def test_launch_env_errors_name_the_variable(env, message):
    with pytest.raises(ValueError) as err:
        launch_env(env)
    assert message in str(err.value)
