"""The trainer end to end under real torchrun (gloo, CPU): loss falls, kill -9 + resume is bitwise exact,
resume at another world size re-shards the centers, accumulation matches the big batch, export loads."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (NUM_CLASSES, ROOT, _compose, _error_lines, _final_state, _full_centers, _overrides,  # noqa: F401
                     _run_inprocess, _torchrun, _write_dataset)

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    """An uninterrupted 2-rank run; other tests compare against it."""
    out = tmp_path_factory.mktemp("ref_run")
    _torchrun(2, _overrides(dataset, out))
    return out


@pytest.mark.slow
def test_two_rank_run_loss_falls(reference_run):
    rows = [json.loads(l) for l in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 13, 2))
    losses = [r["loss"] for r in rows]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(r["nonfinite_skipped"] == 0 for r in rows)
    bad = [r["skipped/bad_image"] for r in rows]  # the corrupt sample, counted over both ranks and all segments
    assert bad[-1] >= 1 and bad == sorted(bad), bad
    assert all(r["skipped/no_image"] == 0 for r in rows)
    ckpts = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000008", "step-00000012"]
    manifest = json.loads((reference_run / "checkpoints/step-00000012/manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["num_classes"] == NUM_CLASSES
    assert manifest["samples_seen"] == 12 * 16


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_exact(dataset, reference_run, tmp_path):
    # 0.4 s per step after the math: the 8 steps after the first checkpoint take >= 3.2 s, so the kill below
    # lands in steps 5..8 however fast the machine is
    proc = _torchrun(2, _overrides(dataset, tmp_path), wait=False, step_delay=0.4)
    ckpt_root = tmp_path / "checkpoints"
    deadline = time.time() + 180
    while not (ckpt_root / "step-00000004").exists():  # kill once the first checkpoint landed (mid-run)
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    time.sleep(np.random.default_rng().uniform(0, 1.5))  # a random step in 5..8
    # torchrun starts its workers in their own sessions: kill -9 every process of this run by its out_dir
    subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)
    proc.wait()
    while subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).returncode == 0:
        time.sleep(0.05)
    done = sorted(p.name for p in ckpt_root.iterdir() if p.name.startswith("step-"))
    assert "step-00000012" not in done, "the run finished before the kill; nothing was tested"
    _torchrun(2, _overrides(dataset, tmp_path, **{"train.resume": "auto"}))
    m_ref, bb_ref, sh_ref = _final_state(reference_run, 12)
    m_new, bb_new, sh_new = _final_state(tmp_path, 12)
    assert bb_ref.keys() == bb_new.keys()
    for k in bb_ref:
        assert torch.equal(bb_ref[k], bb_new[k]), k
    assert torch.equal(_full_centers(sh_ref), _full_centers(sh_new))
    # metrics.jsonl has each step once even though steps after the checkpoint ran twice
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 13, 2))


@pytest.mark.slow
def test_workers_exit_when_torchrun_is_killed(tmp_path):
    """kill -9 of torchrun alone (its workers live in sessions of their own) must not leave them training on into
    the run directory that a re-run resumes into."""
    out = tmp_path / "run"
    proc = _torchrun(2, [f"{k}={v}" for k, v in {**_SYNTHETIC, "out_dir": str(out), "train.total_steps": 100000,
                                                 "train.ckpt_every": 100000}.items()], wait=False)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists():  # the workers are past start-up and training
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-f", f"python -u .*train.py .*out_dir={out}"], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)  # torchrun only
    proc.wait()
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", f"out_dir={out}"], capture_output=True).returncode == 0:
        if time.time() > deadline:
            subprocess.run(["pkill", "-9", "-f", f"out_dir={out}"])
            pytest.fail("torchrun's workers kept running 30 s after it was killed")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_at_other_world_size_reshards(dataset, reference_run, tmp_path, new_world):
    from mlcd.train import checkpoint
    from mlcd.train.checkpoint import reshard

    src = reference_run / "checkpoints" / "step-00000008"
    saved = checkpoint.load_center_states(src, 2)
    moved = reshard(saved, new_world)
    assert len(moved) == new_world
    sizes = [s["shard"]["weight"].shape[0] for s in moved]
    assert sum(sizes) == NUM_CLASSES and max(sizes) - min(sizes) <= 1
    assert torch.equal(_full_centers(saved), _full_centers(moved))
    for name in ("exp_avg", "exp_avg_sq"):
        def full(states):
            return torch.cat([s["optim"]["state"][0][name] for s in states])
        assert torch.equal(full(saved), full(moved)), name

    # and a real run continues from it at the new world size
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.symlink(src, run / "checkpoints" / src.name)
    _torchrun(new_world, _overrides(dataset, run, **{"train.resume": "auto", "train.total_steps": 10,
                                                    "train.ckpt_every": 2, "train.global_batch_size": 18}))
    manifest, _, shards = _final_state(run, 10)
    assert manifest["world_size"] == new_world and len(shards) == new_world
    assert _full_centers(shards).shape == (NUM_CLASSES, 16)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and np.isfinite(rows[-1]["loss"])


# ---- in-process (world size 1) checks of the step function ------------------------------------------

@pytest.mark.slow
def test_grad_accumulation_matches_big_batch(dataset, tmp_path):
    """2 micro-batches of 8 give the same update as 1 batch of 16 (r = 1: no sampling difference)."""
    common = {"train.total_steps": 1, "train.ckpt_every": 1, "loss.sample_ratio": 1.0, "train.deterministic": False}
    _run_inprocess(_compose(dataset, tmp_path / "a", **common, **{"train.grad_accum": 1}))
    _run_inprocess(_compose(dataset, tmp_path / "b", **common, **{"train.grad_accum": 2}))
    _, bb_a, sh_a = _final_state(tmp_path / "a", 1)
    _, bb_b, sh_b = _final_state(tmp_path / "b", 1)
    torch.manual_seed(3)  # the initial weights, to compare updates rather than weights
    from mlcd.models import build_model
    init = build_model(_compose(dataset, tmp_path / "c").model).state_dict()
    worst = 0.0
    for k in bb_a:
        da, db = bb_a[k] - init[k], bb_b[k] - init[k]
        worst = max(worst, ((da - db).abs().max() / da.abs().max().clamp_min(1e-12)).item())
    assert worst < 1e-3, worst  # relative to the update size; AdamW's first step is ~lr*sign(g)
    assert torch.allclose(_full_centers(sh_a), _full_centers(sh_b), atol=1e-6)


@pytest.mark.slow
def test_nonfinite_loss_skips_step_and_aborts_after_n_in_a_row(dataset, tmp_path, monkeypatch):
    import mlcd.train.loop as loop

    real_build = loop.build_partial_fc
    bad_steps = {2, 3}

    def poisoned(*args, **kwargs):
        pfc = real_build(*args, **kwargs)
        forward = pfc.forward

        def forward_with_nan(emb, labels, step):
            loss = forward(emb, labels, step)
            return loss * float("nan") if step in bad_steps else loss
        pfc.forward = forward_with_nan
        return pfc

    monkeypatch.setattr(loop, "build_partial_fc", poisoned)
    _run_inprocess(_compose(dataset, tmp_path / "skip", **{"train.total_steps": 6, "train.log_every": 1}))
    rows = [json.loads(l) for l in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert np.isfinite(rows[-1]["loss"])
    with pytest.raises(RuntimeError, match="non-finite"):
        _run_inprocess(_compose(dataset, tmp_path / "abort", **{"train.total_steps": 6,
                                                              "train.max_nonfinite_in_row": 2}))


@pytest.mark.slow
def test_checkpoint_mismatch_is_an_error_naming_the_field(dataset, reference_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    src = reference_run / "checkpoints" / "step-00000012"
    os.symlink(src, run / "checkpoints" / src.name)
    import shutil
    labels30 = tmp_path / "labels30"  # a clustering of 30 centers over the same shards: the checkpoint has 23
    shutil.copytree(dataset[1], labels30)
    (labels30 / "manifest.json").write_text(json.dumps({"num_classes": 30}))
    with pytest.raises(ValueError, match="num_classes: 23 there, 30 now"):
        _run_inprocess(_compose((dataset[0], str(labels30)), run, **{"train.total_steps": 14}))
    with pytest.raises(ValueError, match="model"):
        _run_inprocess(_compose(dataset, run, **{"model.layers": 3, "train.total_steps": 14}))


@pytest.mark.slow
def test_export_hf_of_trained_checkpoint_loads_in_transformers(reference_run, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from mlcd.models.loading import load_backbone

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "mlcd.export_hf", str(reference_run), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, _ = load_backbone(reference_run)
    hf = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        a, b = ours(pixels), hf(pixel_values=pixels)
    assert torch.allclose(a.embedding, b.image_embeds, atol=1e-5)
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-5)


@pytest.mark.slow
def test_wandb_offline_logging(dataset, tmp_path, monkeypatch):
    """The default logging mode (offline) writes a wandb run under the run dir, and a resume reuses its id."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _run_inprocess(_compose(dataset, out, **{"logging.wandb.mode": "offline", "train.total_steps": 2,
                                            "train.ckpt_every": 2}))
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}")), list((out / "wandb").iterdir())
    _run_inprocess(_compose(dataset, out, **{"logging.wandb.mode": "offline", "train.total_steps": 3,
                                            "train.ckpt_every": 3}))
    assert (out / "wandb_id.txt").read_text().strip() == run_id


@pytest.mark.slow
def test_init_from_another_resolution(dataset, reference_run, tmp_path):
    """The paper's 224 -> 336 step in miniature: a new run at 42 px from the 28 px reference run. With lr 0
    nothing moves, so its checkpoint must hold exactly the source weights (the position embedding: its
    bicubic resize 4x4 -> 6x6) and the source centers, re-split over 1 rank."""
    from mlcd.models.vit import resize_pos_embed
    run = tmp_path / "ft"
    proc = _torchrun(1, _overrides(dataset, run, **{"model.image_size": 42, "train.init_from": str(reference_run),
                                                    "optim.lr": 0.0, "train.total_steps": 2, "train.ckpt_every": 2}))
    assert "initialised from" in proc.stdout and "resized positional_embedding" in proc.stdout
    _, src, src_shards = _final_state(reference_run, 12)
    manifest, got, shards = _final_state(run, 2)
    assert manifest["model"]["image_size"] == 42 and got["positional_embedding"].shape == (1 + 36, 32)
    for key, value in src.items():
        want = resize_pos_embed(value, 6, 6) if key == "positional_embedding" else value
        assert torch.equal(got[key], want), key
    assert torch.equal(_full_centers(shards), _full_centers(src_shards))


@pytest.mark.slow
def test_init_from_other_architecture_names_the_field(reference_run):
    from mlcd.models import build_model
    from mlcd.train import checkpoint
    src = checkpoint.find_checkpoint(reference_run)
    cfg = {**json.loads((src / "manifest.json").read_text())["model"], "width": 48, "heads": 2}
    with pytest.raises(ValueError, match="model.width is 32 there but 48"):
        checkpoint.init_backbone_from(build_model(cfg), src, cfg)


@pytest.mark.slow
def test_checkpoint_cadence_does_not_change_the_data_stream(dataset, tmp_path):
    """Checkpoints every 3 or every 5 steps give the same run: data segments have their own length."""
    def losses(name, every):
        _run_inprocess(_compose(dataset, tmp_path / name, **{"train.total_steps": 8, "train.ckpt_every": every,
                                                            "train.log_every": 1, "data.segment_steps": 4}))
        return [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert losses("a", 3) == losses("b", 5)


@pytest.mark.slow
def test_resume_inside_a_data_segment_is_exact(dataset, tmp_path):
    """A 1-process run resumed from its step-3 checkpoint (segments of 4: mid-segment) ends bitwise equal."""
    common = {"train.total_steps": 6, "train.ckpt_every": 3, "train.log_every": 1, "data.segment_steps": 4}
    _run_inprocess(_compose(dataset, tmp_path / "full", **common))
    _run_inprocess(_compose(dataset, tmp_path / "cut", **{**common, "train.total_steps": 3}))
    _run_inprocess(_compose(dataset, tmp_path / "cut", **common))
    _, bb_full, sh_full = _final_state(tmp_path / "full", 6)
    _, bb_cut, sh_cut = _final_state(tmp_path / "cut", 6)
    assert all(torch.equal(bb_full[k], bb_cut[k]) for k in bb_full)
    assert torch.equal(_full_centers(sh_full), _full_centers(sh_cut))
    rows = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    assert rows[-1]["skipped/bad_image"] == ref[-1]["skipped/bad_image"]  # replayed batches are not re-counted


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_reads_only_the_overlapping_center_shards(reference_run, new_world, monkeypatch):
    """Each new rank's state equals the full reshard's, and only the old shards holding its rows are opened."""
    from mlcd.models.loading import read_manifest
    from mlcd.train import checkpoint

    src = reference_run / "checkpoints" / "step-00000008"
    manifest = read_manifest(src)
    full = checkpoint.reshard(checkpoint.load_center_states(src, 2), new_world)
    opened = []
    real_load = checkpoint._load
    monkeypatch.setattr(checkpoint, "_load", lambda path, mmap=False: opened.append(Path(path).name) or real_load(path, mmap))
    for r in range(new_world):
        opened.clear()
        got = checkpoint.load_center_shard(src, manifest, r, new_world)
        assert got["shard"]["_extra_state"] == full[r]["shard"]["_extra_state"]
        assert torch.equal(got["shard"]["weight"], full[r]["shard"]["weight"])
        for key in ("exp_avg", "exp_avg_sq", "row_step"):
            assert torch.equal(got["optim"]["state"][0][key], full[r]["optim"]["state"][0][key]), key
        start, n = full[r]["shard"]["_extra_state"]["start"], full[r]["shard"]["_extra_state"]["n_local"]
        want = [f"centers-rank{o:05d}.pt" for o in range(2) if max(start, 12 * o) < min(start + n, 12 * o + (12 if o == 0 else 11))]
        assert sorted(opened) == want, (r, opened)


@pytest.mark.parametrize("key,value,message", [
    ("train.precision", "bf61", "train.precision='bf61'"),
    ("train.precision", "fp16", "fp16 is not supported"),
    ("logging.wandb.mode", "ofline", "logging.wandb.mode='ofline'"),
])
def test_bad_settings_are_refused_before_any_work(dataset, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _run_inprocess(_compose(dataset, tmp_path / "run", **{key: value}))
    assert not (tmp_path / "run").exists()


def test_wandb_mode_from_the_environment_unless_the_config_says(monkeypatch):
    from mlcd.train.loop import resolve_wandb_mode
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ValueError, match="WANDB_MODE='bogus'"):
        resolve_wandb_mode(None)
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode(None) == "offline"


@pytest.mark.parametrize("key,value,message", [
    ("loss.kind", "mlcdd", "loss.kind='mlcdd'"),
    ("loss.sample_ratio", 1.5, "loss.sample_ratio=1.5"),
    ("loss.sample_ratio", -0.1, "loss.sample_ratio=-0.1"),
    ("data.num_labels", 3, "data.num_labels=3: the label files"),  # the fixture's label files hold 2 per image
    ("data.train_shards", "/nonexistent/x-{000..001}.tar", "2 of 2 shards do not exist"),
])
def test_bad_loss_and_label_settings_fail_before_work(dataset, tmp_path, key, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        _run_inprocess(_compose(dataset, tmp_path / "run", **{key: value}))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_run_dir(dataset, tmp_path):
    """`train.py -m seed=0,1`: one directory per job, named by its swept values, each a complete run; nothing
    written outside ${out_dir} (no multirun/ in the working directory)."""
    before = set(os.listdir(ROOT))
    args = [a for a in _overrides(dataset, tmp_path / "sweep", **{"train.total_steps": 2, "train.ckpt_every": 2})
            if not a.startswith("seed=")]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "seed=0,1", *args], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["seed=0", "seed=1"], jobs
    seeds = [json.loads((tmp_path / "sweep" / j / "checkpoints/step-00000002/manifest.json").read_text())["config"]["seed"]
             for j in jobs]
    assert seeds == [0, 1]
    assert set(os.listdir(ROOT)) == before


@pytest.mark.slow
def test_resume_with_changed_settings_fails_naming_the_key(dataset, tmp_path):
    out = tmp_path / "run"
    _run_inprocess(_compose(dataset, out, **{"train.total_steps": 2, "train.ckpt_every": 2}))
    with pytest.raises(ValueError, match=r"loss.sample_ratio: 0.5 there, 0.3 now"):
        _run_inprocess(_compose(dataset, out, **{"train.total_steps": 4, "loss.sample_ratio": 0.3}))
    # what may change on resume does not trip it
    _run_inprocess(_compose(dataset, out, **{"train.total_steps": 4, "train.log_every": 1, "train.ckpt_every": 4}))
    assert (out / "checkpoints" / "step-00000004").exists()


@pytest.mark.slow
def test_knn_monitor_logs_and_does_not_change_the_run(dataset, tmp_path):
    """With the monitor every 2 steps the losses and final weights are bitwise those of a run without it."""
    common = {"train.total_steps": 4, "train.ckpt_every": 4, "train.log_every": 1}
    _run_inprocess(_compose(dataset, tmp_path / "plain", **common))
    _run_inprocess(_compose(dataset, tmp_path / "mon", **common, **{"monitor.every": 2, "monitor.train_size": 200,
                                                                  "monitor.test_size": 100}))
    plain = [json.loads(l) for l in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    mon = [json.loads(l) for l in (tmp_path / "mon" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in plain] == [r["loss"] for r in mon]
    knn = [r.get("monitor/knn_top1") for r in mon]
    assert knn[0] is None and knn[2] is None and all(0 <= k <= 100 for k in (knn[1], knn[3]))
    _, bb_a, sh_a = _final_state(tmp_path / "plain", 4)
    _, bb_b, sh_b = _final_state(tmp_path / "mon", 4)
    assert all(torch.equal(bb_a[k], bb_b[k]) for k in bb_a)
    assert torch.equal(_full_centers(sh_a), _full_centers(sh_b))
    with pytest.raises(ValueError, match="monitor.every=3"):
        _run_inprocess(_compose(dataset, tmp_path / "bad", **{"monitor.every": 3, "train.log_every": 2}))


@pytest.mark.slow
def test_world_sizes_2_and_3_equal_world_size_1_for_the_same_global_batch(tmp_path):
    """The step's math across world sizes: fed the same global batches (data.source=synthetic: each rank its
    slice), W = 2 and 3 give W = 1's losses and final weights. Covers DDP's gradient averaging against PartialFC's
    embedding-gradient scaling, the global clip norm over backbone and center shards (active: raw norms are far
    above clip_grad) and accumulation (2 micro-steps). r = 1, so every world size uses every class."""
    runs = {world: _synthetic_run(tmp_path / f"w{world}", world) for world in (1, 2, 3)}
    assert min(runs[1][1]) > 10  # clipping at 1.0 is active on every step
    for world in (2, 3):
        _assert_same_run(runs[world], runs[1], f"W={world}")


# A tiny model on synthetic global batches (the same at every world size), r = 1, 2 accumulation micro-steps.
_SYNTHETIC = {"model": "vit_tiny", "model.image_size": 28, "model.patch_size": 7, "model.width": 32,
              "model.layers": 2, "model.heads": 2, "model.mlp_dim": 64, "model.embed_dim": 16,
              "data.source": "synthetic", "data.num_labels": 3, "num_classes": NUM_CLASSES, "seed": 4,
              "train.global_batch_size": 12, "train.grad_accum": 2, "train.total_steps": 3, "train.ckpt_every": 3,
              "train.log_every": 1, "train.progress_bar": False, "optim.lr": 1e-3, "optim.warmup_steps": 1,
              "loss.sample_ratio": 1.0, "logging.wandb.mode": "disabled"}


def _synthetic_run(out: Path, world: int, **extra):
    """(losses, grad norms, final backbone, final center shards) of a _SYNTHETIC run."""
    _torchrun(world, [f"{k}={v}" for k, v in {**_SYNTHETIC, "out_dir": str(out), **extra}.items()])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {**_SYNTHETIC, **extra}["train.total_steps"]
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], *_final_state(out, steps)[1:]


def _assert_same_run(got, want, label):
    (loss, norm, bb, sh), (loss1, norm1, bb1, sh1) = got, want
    np.testing.assert_allclose(loss, loss1, rtol=1e-5, err_msg=label)
    np.testing.assert_allclose(norm, norm1, rtol=1e-4, err_msg=label)
    assert bb.keys() == bb1.keys()
    for k in bb1:
        torch.testing.assert_close(bb[k], bb1[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{label} {k}: {m}")
    torch.testing.assert_close(_full_centers(sh), _full_centers(sh1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_their_checkpoints_resume_under_each_other(tmp_path):
    """train.sharding=fsdp (FSDP2 per block, with activation checkpointing) on 2 gloo ranks: the same losses, grad
    norms (clipping active), weights and centers as DDP; a run saved under FSDP at step 3 and continued under DDP
    to step 6 equals the uninterrupted DDP run, and the reverse."""
    six = {"train.total_steps": 6, "optim.min_lr_ratio": 1.0}  # constant lr after warm-up: a 3-step run is a prefix
    ddp = _synthetic_run(tmp_path / "ddp", 2, **six)
    fsdp = _synthetic_run(tmp_path / "fsdp", 2, **six, **{"train.sharding": "fsdp", "train.grad_checkpointing": True})
    _assert_same_run(fsdp, ddp, "fsdp vs ddp")
    held = {kind: int(re.search(r"rank 0 holds ([0-9,]+);", (tmp_path / kind / "train.log").read_text())
                      .group(1).replace(",", "")) for kind in ("ddp", "fsdp")}
    assert 0.45 < held["fsdp"] / held["ddp"] < 0.55, held  # FSDP really sharded the backbone
    for first, then in (("fsdp", "ddp"), ("ddp", "fsdp")):
        out = tmp_path / f"{first}_then_{then}"
        _synthetic_run(out, 2, **{**six, "train.sharding": first, "train.total_steps": 3})
        resumed = _synthetic_run(out, 2, **six, **{"train.sharding": then})
        want = fsdp if then == "fsdp" else ddp
        _assert_same_run((resumed[0][-3:], resumed[1][-3:], *resumed[2:]), (want[0][-3:], want[1][-3:], *want[2:]),
                         f"{first} -> {then}")


def test_num_classes_must_agree_with_the_labels_manifest(dataset, tmp_path):
    """num_classes=50 over labels of 23 centers would train 27 centers that are never a positive: refused."""
    with pytest.raises(ValueError, match=r"num_classes=50 but .*manifest.json says the labels index 23 centers"):
        _run_inprocess(_compose(dataset, tmp_path / "run", num_classes=50))
    assert not (tmp_path / "run").exists()


def test_a_shard_without_label_file_is_refused_before_step_0(dataset, tmp_path):
    """A missing label file would crash a worker at whatever step first reads that shard; it fails at start."""
    import shutil
    shards, labels_dir = dataset
    labels = tmp_path / "labels"
    shutil.copytree(labels_dir, labels)
    (labels / "train-000002.labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 training shards have no label file .*'train-000002'"):
        _run_inprocess(_compose((shards, str(labels)), tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", [{"optim.lr": -1}, {"train.init_from": "/nonexistent"}])
def test_a_failed_start_does_not_refuse_the_corrected_command(dataset, tmp_path, bad):
    """A run that failed before its first checkpoint has no step to lose: the corrected command starts it."""
    out, common = tmp_path / "run", {"train.total_steps": 2, "train.ckpt_every": 2}
    with pytest.raises(Exception):
        _run_inprocess(_compose(dataset, out, **common, **bad))
    assert not list((out / "checkpoints").glob("step-*"))
    _run_inprocess(_compose(dataset, out, **common))
    assert (out / "checkpoints" / "step-00000002").exists()
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["optim.lr"] == 2e-3  # the run's settings now, guarding its resume
