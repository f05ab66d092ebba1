"""Checkpoints under faults: a failed write names the step, rank, file and errno on every rank and leaves the
previous checkpoint the newest complete one; every file is fsynced before the rename that makes it visible; an
asynchronous save writes exactly the synchronous save's files; a kill during an asynchronous write leaves nothing
that reads back as complete."""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import ROOT, _error_lines, _overrides, _torchrun, _write_dataset
from mlcd import fileio
from mlcd.models import build_model
from mlcd.partial_fc import PartialFC
from mlcd.train import checkpoint
from mlcd.train.optim import SparseRowAdamW, build_backbone_optimizer

TINY = {"name": "vit_tiny", "image_size": 28, "patch_size": 7, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64,
        "embed_dim": 16, "pos_embed": "learned", "act": "gelu", "ln_eps": 1e-5}


def _state(classes=50):
    """A tiny backbone, its AdamW, a PartialFC shard and its sparse AdamW, each with non-trivial moments."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.create(TINY))
    opt = build_backbone_optimizer(model, OmegaConf.create({"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98],
                                                            "eps": 1e-6}))
    model(torch.randn(2, 3, 28, 28)).embedding.square().sum().backward()
    opt.step()
    pfc = PartialFC(classes, TINY["embed_dim"], seed=0)
    center_opt = SparseRowAdamW(pfc.weight, lr=1e-3)
    st = center_opt.state[pfc.weight]
    with torch.no_grad():
        st["exp_avg"].copy_(pfc.weight * 0.5)
        st["exp_avg_sq"].copy_(pfc.weight.square())
    manifest = {"num_classes": classes, "embed_dim": TINY["embed_dim"], "shards": pfc.shard_spec.to_dict(),
                "model": TINY}
    return model, opt, pfc, center_opt, manifest


def _files(ckpt: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir()) if p.name != "manifest.json"}


def _record_fsync_and_replace(monkeypatch) -> list:
    """Every os.fsync (as the path of its descriptor) and os.replace, in order, still done for real."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    return events


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = _record_fsync_and_replace(monkeypatch)
    target = tmp_path / "out.json"
    fileio.write_json(target, {"a": 1})
    tmp = str(fileio._tmp_name(target))
    assert events == [("fsync", tmp), ("replace", tmp, str(target)), ("fsync", str(tmp_path))]


def test_a_checkpoint_is_fsynced_file_by_file_before_its_manifest_and_rename(tmp_path, monkeypatch):
    events = _record_fsync_and_replace(monkeypatch)
    model, opt, pfc, copt, manifest = _state()
    final = checkpoint.save(tmp_path, 3, model, opt, pfc, copt, {"counters": {}}, manifest, keep_last=2)
    tmp = tmp_path / ".tmp-step-00000003"
    synced = [e[1] for e in events if e[0] == "fsync"]
    manifest_rename = events.index(("replace", str(fileio._tmp_name(tmp / "manifest.json")), str(tmp / "manifest.json")))
    dir_rename = events.index(("replace", str(tmp), str(final)))
    for name in ("backbone.safetensors", "trainer.pt", "centers-rank00000.pt", "rng-rank00000.pt"):
        assert synced.index(str(tmp / name)) < manifest_rename, name
    assert ("fsync", str(tmp)) in events[:dir_rename]  # the directory's entries, before it becomes visible
    assert events[dir_rename + 1:] == [("fsync", str(tmp_path))]  # then the rename itself
    assert checkpoint.list_checkpoints(tmp_path) == [final]


def test_a_failed_write_names_step_rank_file_and_errno_and_keeps_the_previous_checkpoint(tmp_path):
    model, opt, pfc, copt, manifest = _state()
    first = checkpoint.save(tmp_path, 1, model, opt, pfc, copt, {"counters": {}}, manifest, keep_last=3)
    limit = (first / "backbone.safetensors").stat().st_size // 2
    assert (first / "centers-rank00000.pt").stat().st_size < limit  # so the backbone is the file that fails
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(checkpoint.CheckpointWriteError) as err:
            checkpoint.save(tmp_path, 2, model, opt, pfc, copt, {"counters": {}}, manifest, keep_last=3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(err.value)
    for part in ("checkpoint step 2 was not saved", "rank 0 could not write", "backbone.safetensors",
                 "[Errno 27] File too large", f"newest complete checkpoint is {first}"):
        assert part in message, message
    assert checkpoint.list_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # the partial directory is gone


def test_torch_save_failure_is_reported_with_its_errno(tmp_path):
    """torch.save alone says only 'unexpected pos'; written through a Python file, the OSError is in its chain."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(Exception) as err:
            checkpoint._write_file(tmp_path / "trainer.pt", {"x": torch.zeros(10_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert checkpoint._cause(err.value) == "[Errno 27] File too large"


def test_async_save_writes_the_state_of_its_step_while_training_goes_on(tmp_path):
    model, opt, pfc, copt, manifest = _state()
    sync = checkpoint.save(tmp_path / "sync", 5, model, opt, pfc, copt, {"counters": {"n": 1}}, manifest, 1)
    saver = checkpoint.Checkpointer(tmp_path / "async", keep_last=1, async_save=True)
    counters = {"n": 1}
    final = saver.save(5, model, opt, pfc, copt, {"counters": counters}, manifest)
    with torch.no_grad():  # training goes on while the background thread writes
        for p in model.parameters():
            p.add_(1.0)
        pfc.weight.mul_(-1)
        copt.state[pfc.weight]["exp_avg"].zero_()
    counters["n"] = 2
    saver.wait()
    assert _files(final) == _files(sync)  # byte for byte: the state as it was at the step boundary


@pytest.mark.slow
def test_two_rank_async_run_saves_the_synchronous_files_and_a_failed_write_is_named_on_every_rank(tmp_path):
    """train.async_ckpt=true on 2 ranks writes, byte for byte, what the synchronous run writes at every checkpoint.
    Then a resume under a file-size limit that only rank 0's backbone file exceeds: both ranks fail with one
    message naming step, rank, file and errno, and step 8 stays the newest complete checkpoint."""
    dataset = _write_dataset(tmp_path / "data", n_shards=2, per_shard=48)
    base = {"train.total_steps": 8, "train.log_every": 4}
    _torchrun(2, _overrides(dataset, tmp_path / "sync", **base))
    _torchrun(2, _overrides(dataset, tmp_path / "async", **base, **{"train.async_ckpt": True}))
    for step in (4, 8):
        name = f"checkpoints/step-{step:08d}"
        got, want = _files(tmp_path / "async" / name), _files(tmp_path / "sync" / name)
        assert got.keys() == want.keys()
        for file in want:
            if file.startswith("rng-"):  # Python's and numpy's global streams are seeded by the OS in each process
                a, b = (torch.load(d / name / file, weights_only=True) for d in (tmp_path / "async", tmp_path / "sync"))
                assert torch.equal(a["torch"], b["torch"]), (step, file)
            else:
                assert got[file] == want[file], (step, file)

    run = tmp_path / "sync"
    sizes = {p.name: p.stat().st_size for p in (run / "checkpoints/step-00000008").iterdir()}
    limit = sizes["backbone.safetensors"] // 2
    assert max(sizes[f"centers-rank0000{r}.pt"] for r in (0, 1)) < limit
    assert max(p.stat().st_size for p in run.iterdir() if p.is_file()) < limit  # logs and configs still fit
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *_overrides(dataset, run, **{**base, "train.total_steps": 12})]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard)))
    assert proc.returncode != 0
    want = (f"checkpoint step 12 was not saved: rank 0 could not write "
            f"{run / 'checkpoints' / '.tmp-step-00000012' / 'backbone.safetensors'}: [Errno 27] File too large")
    errors = [line for line in proc.stderr.splitlines() if "CheckpointWriteError" in line]
    assert sum(want in line for line in errors) == 2, _error_lines(proc.stderr)[-4000:]  # rank 0 and rank 1
    assert checkpoint.list_checkpoints(run / "checkpoints")[-1].name == "step-00000008"
    assert "connection closed" not in proc.stderr.lower()


@pytest.mark.slow
def test_kill_during_an_async_write_leaves_nothing_that_reads_back_as_complete(tmp_path):
    """A run whose checkpoint (400k x 16 centers + moments: 77 MB) is large beside its step, killed with SIGKILL as
    soon as a background write has begun: every checkpoint listed as complete loads, the partial one is not listed,
    and the run resumes from the newest complete one to the end."""
    out = tmp_path / "run"
    args = [f"{k}={v}" for k, v in {
        "model": "vit_tiny", "model.image_size": 28, "model.patch_size": 7, "model.width": 32, "model.layers": 2,
        "model.heads": 2, "model.mlp_dim": 64, "model.embed_dim": 16, "data.source": "synthetic",
        "num_classes": 400_000, "out_dir": str(out), "seed": 0, "train.global_batch_size": 8, "train.total_steps": 6,
        "train.ckpt_every": 2, "train.log_every": 1, "train.keep_last": 5, "train.progress_bar": False,
        "train.async_ckpt": True, "optim.warmup_steps": 1, "loss.sample_ratio": 0.01,
        "logging.wandb.mode": "disabled", "monitor.every": 0}.items()]
    proc = _torchrun(1, args, wait=False)
    seen, deadline = None, time.time() + 180
    while seen is None and proc.poll() is None and time.time() < deadline:
        ckpts = out / "checkpoints"
        partial = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-") and any(p.iterdir())] if ckpts.is_dir() else []
        if partial and checkpoint.list_checkpoints(ckpts):  # a later save in flight, an earlier one complete
            seen = partial[0]
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert seen is not None, "the run ended before a background write was seen"
    complete = checkpoint.list_checkpoints(out / "checkpoints")
    assert seen.name.removeprefix(".tmp-") not in {p.name for p in complete}
    for ckpt in complete:
        manifest = checkpoint.read_manifest(ckpt)
        state = checkpoint.load_center_shard(ckpt, manifest, 0, 1)
        assert state["shard"]["weight"].shape == (400_000, 16)
        assert json.loads((ckpt / "manifest.json").read_text())["step"] == int(ckpt.name.split("-")[1])
    _torchrun(1, args)  # resumes from the newest complete checkpoint
    assert checkpoint.list_checkpoints(out / "checkpoints")[-1].name == "step-00000006"


@pytest.mark.bench
def test_checkpoint_bench_small_mode(tmp_path):
    out = tmp_path / "checkpoint.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint.py"), "--small", "--out", str(out), "--work",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert set(report["async"]["stall_s_per_checkpoint_median"]) == {"none", "sync", "async"}
    assert report["fsync"]["seconds_median"]["fsync"] > 0 and report["fsync"]["checkpoint_bytes"] > 20_000 * 16 * 4
