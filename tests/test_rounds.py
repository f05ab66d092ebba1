"""`python -m runners.rounds` at a miniature size (300 images, k = 12, 3 training steps, 2 rounds): the report agrees
with an independent recomputation from the label files, round 1 clustered with round 0's checkpoint and trained from
it, a run killed after round 0 and re-run redoes nothing finished, and a bad
checkpoint or changed settings are refused before any work; the control (rounds.recluster=false) trains every round
on round 0's labels."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import adjusted_mutual_info_score

from helpers import PROBE_SEARCH_SMALL as PROBE
from runners import rounds

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.patch_size=7", "model.width=32", "model.layers=2", "model.heads=2", "model.mlp_dim=64",
        "model.embed_dim=16"]
TRAIN = [*TINY, "train.total_steps=3", "train.global_batch_size=16", "optim.warmup_steps=1", "train.ckpt_every=3",
         "train.log_every=1", "train.progress_bar=false", "logging.wandb.mode=disabled", "data.num_workers=0",
         "data.shuffle_buffer=20"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _argv(tmp: Path, root: str, train=TRAIN) -> list[str]:
    return [f"rounds.root={tmp / root}", f"rounds.shards_dir={tmp / 'shards'}", "rounds.limit=300",
            "rounds.max_per_shard=100", "rounds.num_rounds=2", "rounds.nproc=1",
            "rounds.cluster=[kmeans.k=12,assign.topk=4,extract.batch_size=100,extract.num_workers=0,kmeans.niter=5]",
            f"rounds.train=[{','.join(train)}]",
            f"rounds.eval=[limit_train=200,limit_test=100,num_workers=0,cache_dir={tmp / 'cache'},{PROBE}]"]


def _launch(argv, log: Path):
    return subprocess.Popen([sys.executable, "-m", "runners.rounds", *argv], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _top1(labels_dir: Path) -> dict:
    out = {}
    for keys_file in sorted(labels_dir.glob("*.keys.txt")):
        labels = np.load(str(keys_file).replace(".keys.txt", ".labels.npy"))
        out.update(zip(keys_file.read_text().split(), labels[:, 0].tolist()))
    return out


def _follow(a: np.ndarray, b: np.ndarray) -> float:
    return sum(np.bincount(b[a == v]).max() for v in np.unique(a)) / len(a)


@pytest.mark.slow
def test_rounds_miniature_killed_resumed_and_its_control(tmp_path):
    # a run killed once round 0 finished, then re-run: round 0 is not redone and round 1 builds on it
    run = tmp_path / "run"
    proc = _launch(_argv(tmp_path, "run"), tmp_path / "first.log")
    deadline = time.time() + 600
    while not (run / "round0" / "eval.json").exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r0 = run / "round0"
    before = {p: p.stat().st_mtime_ns for p in [*r0.glob("*.json"), *r0.glob("*.log"), *r0.rglob("*.safetensors")]}
    assert len(before) == 7  # 3 markers, 3 logs, 1 checkpoint
    proc = _launch(_argv(tmp_path, "run"), tmp_path / "second.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing of round 0 was redone
    report = json.loads((run / "rounds_report.json").read_text())

    # the report's structure, and its label metrics recomputed from the label files and the true classes
    from mlcd.data import fashion_mnist
    assert report["complete"] and [r["round"] for r in report["rounds"]] == [0, 1]
    assert set(report["baselines"]) == {"raw pixels", "teacher features (ViT-S-32, random init)"}
    classes = fashion_mnist.load("train")[1]
    t0, t1 = _top1(run / "round0" / "cluster" / "labels"), _top1(run / "round1" / "cluster" / "labels")
    keys = sorted(t0)
    assert len(keys) == 300 and sorted(t1) == keys
    a0, a1 = np.array([t0[k] for k in keys]), np.array([t1[k] for k in keys])
    c = np.array([classes[int(k.rsplit("-", 1)[1])] for k in keys])  # fmnist-train-0000123: index 123
    for row, a in zip(report["rounds"], (a0, a1)):
        assert row["num_classes"] == 12 and row["images"] == 300 and row["clusters_used"] == len(np.unique(a))
        assert row["ami_vs_classes"] == pytest.approx(adjusted_mutual_info_score(c, a), abs=1e-12)
        assert row["purity"] == pytest.approx(_follow(a, c), abs=1e-12)
        res = json.loads((run / f"round{row['round']}" / "eval" / "results.json").read_text())["results"][0]
        assert (row["linear_probe_top1"], row["knn_top1"]) == (100 * res["metrics"]["lp_acc1"],
                                                               100 * res["metrics"]["knn_acc1"])
    r0, r1 = report["rounds"]
    assert r0["ami_vs_previous"] is None and r0["top1_changed_after_majority_mapping"] is None
    assert r1["ami_vs_previous"] == pytest.approx(adjusted_mutual_info_score(a0, a1), abs=1e-12)
    assert r1["top1_changed_after_majority_mapping"] == pytest.approx(1 - _follow(a0, a1), abs=1e-12)
    for v in (*report["rounds"], *report["baselines"].values()):
        assert 0 <= v["linear_probe_top1"] <= 100 and 0 <= v["knn_top1"] <= 100
    assert report["baselines"]["raw pixels"]["linear_probe_top1"] > 40  # 10 classes: far above chance

    # round 0 clustered with the teacher; round 1 with round 0's final checkpoint, and trained from its backbone
    ckpt0 = str(run / "round0" / "train" / "checkpoints" / "step-00000003")
    assert r0["checkpoint"] == r1["clustered_with"] == r1["init_from"] == ckpt0 and r0["init_from"] is None
    f0 = json.loads((run / "round0" / "cluster" / "features" / "manifest.json").read_text())["settings"]
    f1 = json.loads((run / "round1" / "cluster" / "features" / "manifest.json").read_text())["settings"]
    assert f0["backbone"] is None and f0["model"] == "ViT-S-32"
    assert f1["backbone"] == {"type": "mlcd", "path": ckpt0}
    assert f1["backbone_identity"]["path"] == ckpt0 and f1["backbone_identity"]["feature"] == "embedding"
    cfg1 = OmegaConf.load(run / "round1" / "train" / "config.yaml")
    assert cfg1.train.init_from == ckpt0 and cfg1.train.init_centers is False
    assert f"initialised from {ckpt0} (backbone)" in (run / "round1" / "train.log").read_text()
    cmd = shlex.split(json.loads((run / "round1" / "cluster.json").read_text())["cmd"])  # pastable command line
    assert cmd[1] == "cluster.py" and f"extract.backbone={{type: mlcd, path: '{ckpt0}'}}" in cmd
    assert (run / "rounds_report.md").read_text().count("\n") == 2 + 2 + 2
    assert (run / "rounds.png").stat().st_size > 0

    # other settings over a finished root: refused before any work
    with pytest.raises(SystemExit, match=r"rounds\.train: .*train\.total_steps=3.*train\.total_steps=4"):
        rounds.main(_argv(tmp_path, "run", [*TRAIN, "train.total_steps=4"]))

    # the control (rounds.recluster=false): round 1 trains from round 0's weights on round 0's labels; its round 0 is
    # the run's above, as are the baselines (copied: neither depends on the setting)
    import shutil
    control = tmp_path / "control"
    shutil.copytree(run / "round0", control / "round0")
    shutil.copytree(run / "baselines", control / "baselines")
    copied = {p: p.stat().st_mtime_ns for p in (control / "baselines").rglob("*.json")}
    rounds.main([*_argv(tmp_path, "control"), "rounds.recluster=false"])
    assert copied and all(p.stat().st_mtime_ns == t for p, t in copied.items())  # the baselines were not redone
    assert not (control / "round1" / "cluster").exists() and not (control / "round1" / "cluster.json").exists()
    cfg = OmegaConf.load(control / "round1" / "train" / "config.yaml")
    assert cfg.data.labels_dir == str(control / "round0" / "cluster" / "labels") and cfg.train.init_from == ckpt0
    c0, c1 = json.loads((control / "rounds_report.json").read_text())["rounds"]
    assert c1["ami_vs_previous"] == pytest.approx(1.0) and c1["clustered_with"] == "teacher"
    assert c1["top1_changed_after_majority_mapping"] == 0 and c1["knn_top1"] is not None


@pytest.mark.slow
def test_bad_init_checkpoint_fails_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"rounds\.init_from=.*nowhere.*neither a checkpoint nor a run dir"):
        rounds.main([*_argv(tmp_path, "r"), f"rounds.init_from={tmp_path / 'nowhere'}"])
    # a run of another model: the vit_tiny defaults (embed_dim 128, width 128) against the test's width-32 model
    other = tmp_path / "other" / "checkpoints" / "step-00000005"
    other.mkdir(parents=True)
    model = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "train" / "model" / "vit_tiny.yaml"))
    (other / "manifest.json").write_text(json.dumps({"model": model}))
    with pytest.raises(SystemExit, match=r"step-00000005: model\.embed_dim is 128 there but 16 .*cannot initialise"):
        rounds.main([*_argv(tmp_path, "r"), f"rounds.init_from={tmp_path / 'other'}"])
    with pytest.raises(SystemExit, match="rounds.init='last'"):
        rounds.main([*_argv(tmp_path, "r"), "rounds.init=last"])
    assert not (tmp_path / "r").exists() and not (tmp_path / "shards").exists()  # nothing was started
    # the same model (image_size may differ, as train.py allows) passes the check
    tiny = {t.split("=")[0].removeprefix("model."): int(t.split("=")[1]) for t in TINY}
    (other / "manifest.json").write_text(json.dumps({"model": {**model, **tiny, "image_size": 56}}))
    assert rounds.check_init(tmp_path / "other", rounds.train_model_cfg(TRAIN), "x") == other
