"""cluster.py extracting with one of our own checkpoints (extract.backbone): the features equal the linear probe's
features of the same images, and a missing checkpoint fails before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "vit_tiny", "model.image_size": 28, "model.patch_size": 7, "model.width": 32, "model.layers": 2,
        "model.heads": 2, "model.mlp_dim": 64, "model.embed_dim": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run (synthetic data) and 2 shards of real Fashion-MNIST images."""
    from hydra import compose, initialize_config_dir

    from mlcd.data.make_shards import shards_from_fashion_mnist
    from mlcd.train.loop import train

    tmp = tmp_path_factory.mktemp("cluster_backbone")
    args = {**TINY, "data.source": "synthetic", "num_classes": 10, "train.total_steps": 2, "train.ckpt_every": 2,
            "train.global_batch_size": 8, "train.progress_bar": False, "logging.wandb.mode": "disabled",
            "out_dir": str(tmp / "run")}
    with initialize_config_dir(str(ROOT / "configs" / "train"), version_base=None):
        train(compose("train", overrides=[f"{k}={v}" for k, v in args.items()]))
    shards_from_fashion_mnist(tmp / "shards", "train", prefix="fm", max_per_shard=60, limit=120)
    return tmp


def _cluster(tmp, out, *extra):
    cmd = [sys.executable, "cluster.py", f"shards='{tmp}/shards/fm-{{000000..000001}}.tar'", f"out_dir={out}",
           "extract.batch_size=32", "extract.num_workers=0", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("feature", ["embedding", "pooled"])
def test_features_from_our_checkpoint_equal_the_probe_features(trained, tmp_path, feature):
    from mlcd.data import fashion_mnist
    from mlcd.models.backbones import build_backbone
    from mlcd.eval.datasets import ArrayImages
    from mlcd.eval.features import extract

    out = tmp_path / "clu"
    proc = _cluster(trained, out, f"extract.backbone={{type: mlcd, path: {trained / 'run'}}}",
                    f"extract.feature={feature}", "stages=[extract]")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ours = np.concatenate([np.load(out / "features" / f"fm-{s:06d}.npy") for s in range(2)]).astype(np.float32)
    images, labels = fashion_mnist.load("train")
    probe, _ = extract(build_backbone({"type": "mlcd", "path": str(trained / "run")}, feature),
                       ArrayImages(images[:120], labels[:120]), num_workers=0)
    probe = torch.nn.functional.normalize(torch.as_tensor(probe), dim=1).numpy()
    assert ours.shape == probe.shape == (120, 16 if feature == "embedding" else 32)
    np.testing.assert_allclose(ours, probe, atol=2e-3)  # fp16 storage of unit vectors
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert manifest["settings"]["backbone_identity"]["sig"]  # the checkpoint's signature guards a resume


@pytest.mark.slow
def test_missing_checkpoint_fails_before_any_work(trained, tmp_path):
    out = tmp_path / "clu"
    proc = _cluster(trained, out, f"extract.backbone={{type: mlcd, path: {tmp_path / 'nowhere'}}}")
    assert proc.returncode != 0
    assert "extract.backbone.path" in proc.stderr and "nowhere" in proc.stderr
    assert not out.exists()
