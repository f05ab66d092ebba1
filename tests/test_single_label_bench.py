"""bench/single_label.py --small end to end on a tiny real Fashion-MNIST shard set: a row per (kind, s) at step 0 and
at the last step with finite metrics, and the step-0 backbone is the run's own initial weights (an lr = 0 step of
the same training leaves them unchanged, and must equal the script's step-0 random init)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlcd.data.labels import write_shard_labels
from mlcd.data.make_shards import shards_from_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("single_label", ROOT / "bench" / "single_label.py")  # not bench/ on
single_label = importlib.util.module_from_spec(_spec)  # sys.path: its cluster.py and train.py would shadow the root's
_spec.loader.exec_module(single_label)

N, PER_SHARD, CLASSES = 256, 64, 40


def _data(tmp: Path):
    """4 shards of real Fashion-MNIST (make_shards' keys), 8 distinct labels per image, the first class-derived."""
    from mlcd.data import fashion_mnist
    _, y = fashion_mnist.load("train")
    m = shards_from_fashion_mnist(tmp / "shards", "train", "fmnist-train", PER_SHARD, limit=N)
    for s, shard in enumerate(m["shards"]):
        idx = np.arange(s * PER_SHARD, s * PER_SHARD + shard["count"])
        first = y[idx] * 4 + idx % 4
        labels = (first[:, None] + 5 * np.arange(8)[None]) % CLASSES
        write_shard_labels(tmp / "labels", shard["name"][:-4], [f"fmnist-train-{i:07d}" for i in idx], labels,
                           np.ones(labels.shape, np.float32))
    (tmp / "labels" / "manifest.json").write_text(json.dumps({"num_classes": CLASSES, "complete": True}))
    n = len(m["shards"])
    return f"{tmp}/shards/fmnist-train-{{000000..{n - 1:06d}}}.tar", str(tmp / "labels")


@pytest.mark.bench
@pytest.mark.slow
def test_single_label_bench_small(tmp_path, capsys):
    shards, labels = _data(tmp_path)
    args = ["--small", "--shards", shards, "--labels", labels, "--root", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out.json"), "--kinds", "single", "mlcd", "--scales", "16", "--n-eval", "200"]
    proc = subprocess.run([sys.executable, "bench/single_label.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["complete"] and (tmp_path / "out.png").stat().st_size > 0
    assert set(out["runs"]) == {"single-s16", "mlcd-s16"}
    for name, r in out["runs"].items():
        assert [x["step"] for x in r["rows"]] == [0, 2, 4], name
        assert "loss.scale=16.0" in r["train_cmd"] and f"loss={single_label.KIND_LOSS[r['kind']]}" in r["train_cmd"]
        assert f"data.num_labels={1 if r['kind'] == 'single' else 8}" in r["train_cmd"]
        for x in r["rows"]:
            for k in ("knn_top1", "effective_rank", "uniformity", "align_class", "align_cluster", "loo_knn_class",
                      "loo_knn_cluster"):
                assert math.isfinite(x[k]), (name, x)
            assert 1 <= x["effective_rank"] <= x["dim"] == 128
        assert r["rows"][-1]["train_loss_step"] == 4 and r["rows"][0]["train_loss"] is None
        assert r["rows"][0] != r["rows"][-1]  # training moved the features

    assert out["runs"]["single-s16"]["rows"][0] == out["runs"]["mlcd-s16"]["rows"][0]  # one init, measured once

    # a re-run (here in-process) trains and measures nothing: every row comes from its cached marker
    capsys.readouterr()
    assert single_label.main(args)["runs"] == out["runs"]
    printed = capsys.readouterr().out
    assert "$ " not in printed and "step 0:" not in printed, printed

    # step 0 = the run's initial weights: the same training with lr 0 saves them after one step
    from hydra import compose, initialize_config_dir
    from mlcd.train.loop import train
    a = single_label.parse_args(args)
    lr0 = tmp_path / "lr0"
    overrides = single_label.train_overrides(a, "single", 16, lr0, **{
        "optim.lr": 0, "optim.warmup_steps": 0, "train.total_steps": 1, "train.ckpt_every": 1,
        "data.segment_steps": 1, "data.num_workers": 0})
    with initialize_config_dir(str(ROOT / "configs" / "train"), version_base=None):
        train(compose("train", overrides=overrides))
    saved = load_file(str(lr0 / "checkpoints" / "step-00000001" / "backbone.safetensors"))
    init = single_label.init_backbone(a.root / "single-s16", a.seed).model.state_dict()
    trained = load_file(str(a.root / "single-s16" / "checkpoints" / "step-00000004" / "backbone.safetensors"))
    assert saved.keys() == init.keys()
    assert all(torch.equal(saved[k], init[k]) for k in saved)
    assert not all(torch.equal(trained[k], init[k]) for k in saved)  # the check can tell trained weights apart
