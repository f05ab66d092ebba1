"""cluster.py end to end in subprocesses: SIGKILL + resume is byte-identical; 2 ranks (torchrun, gloo) = 1 rank.

Model: a tiny random-init open_clip CLIP (32 px, 2-layer ViT, 1-layer text tower) registered from a JSON
config through `extract.model_config` -- the fastest open_clip model that still runs the real code path
(create_model_and_transforms, encode_image/encode_text). Shards: 6 x 8 small PNGs written with
mlcd.data.make_shards, half with captions (so the image+text fusion runs), one image corrupt.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlcd.data.labels import read_shard_labels

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
N_SHARDS, PER_SHARD = 6, 8


def make_shards(tmp):
    from PIL import Image

    from mlcd.data.make_shards import shards_from_table

    rng = np.random.default_rng(0)
    img_dir = tmp / "imgs"
    img_dir.mkdir()
    rows = []
    for i in range(N_SHARDS * PER_SHARD):
        color = rng.integers(0, 256, 3) if i % 3 else np.array([255, 0, 0])
        arr = np.clip(color + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        p = img_dir / f"{i:03d}.png"
        Image.fromarray(arr).save(p)
        rows.append(f"{p}\t{'a photo number %d' % i if i % 2 else ''}")
    (img_dir / "013.png").write_bytes((img_dir / "013.png").read_bytes()[:60])  # corrupt: truncated PNG
    (tmp / "list.tsv").write_text("\n".join(rows) + "\n")
    shards_from_table(tmp / "list.tsv", tmp / "shards", prefix="img", max_per_shard=PER_SHARD)
    (tmp / "mlcd-tiny-clip.json").write_text(json.dumps(TINY))


def args(tmp, out):
    return [f"shards='{tmp}/shards/img-{{000000..{N_SHARDS - 1:06d}}}.tar'", f"out_dir={out}",  # hydra: quote braces f"out_dir={out}",
            "extract.model=mlcd-tiny-clip", f"extract.model_config={tmp}/mlcd-tiny-clip.json",
            "extract.pretrained=null", "extract.batch_size=3", "extract.num_workers=0", "extract.text=true",
            "kmeans.k=6", "kmeans.mode=two_level", "kmeans.coarse_k=2", "kmeans.niter=5", "kmeans.refine_iters=1",
            "kmeans.max_points_per_centroid=1000", "kmeans.gpu=false", "assign.topk=3"]


def env():
    e = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    e.pop("WORLD_SIZE", None)
    return e


def run(cmd, e, log, timeout=300):
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert r.returncode == 0, Path(log).read_text()[-3000:]


def run_and_kill(cmd, e, marker_dir, pattern, log, timeout=300):
    """Start `cmd`; SIGKILL it as soon as a file matching `pattern` appears in `marker_dir`."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            while not (marker_dir.exists() and any(marker_dir.glob(pattern))):
                assert p.poll() is None, "finished before it could be killed:\n" + Path(log).read_text()[-3000:]
                assert time.time() - t0 < timeout, "timed out waiting for the first shard"
                time.sleep(0.02)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()


def outputs(out):
    """Every data file the pipeline writes (manifests and reports hold timings, so they are left out)."""
    files = sorted(p for p in Path(out).rglob("*") if p.is_file() and p.suffix in (".npy", ".txt")
                   and ".tmp" not in p.name or p.name.endswith(".skips.json"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def assert_same_outputs(a, b):
    fa, fb = outputs(a), outputs(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, differ


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    make_shards(tmp)
    out = tmp / "ref"
    run([sys.executable, "cluster.py", *args(tmp, out)], env(), tmp / "ref.log")
    return tmp, out


@pytest.mark.slow
def test_reference_run_outputs(reference):
    tmp, out = reference
    fman = json.loads((out / "features" / "manifest.json").read_text())
    assert fman["complete"] and fman["rows"] == N_SHARDS * PER_SHARD - 1 and fman["dim"] == 32
    assert sum(v for k, v in fman["skipped"].items() if k != "no_caption") == 1  # the corrupt PNG
    assert "RANDOM weights" in (tmp / "ref.log").read_text()
    centers = np.load(out / "centers.npy")
    assert centers.shape == (6, 32)
    assert (out / "cluster_sizes.png").exists() and (out / "config.yaml").exists()
    lman = json.loads((out / "labels" / "manifest.json").read_text())
    assert lman["complete"] and lman["num_classes"] == 6 and lman["rows"] == fman["rows"]
    for s in range(N_SHARDS):
        stem = f"img-{s:06d}"
        keys, labels, sims = read_shard_labels(out / "labels", stem)
        fkeys = (out / "features" / f"{stem}.keys.txt").read_text().splitlines()
        feats = np.load(out / "features" / f"{stem}.npy")
        assert keys == fkeys and feats.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1, atol=2e-3)
        ref = np.argsort(-(feats.astype(np.float64) @ centers.T.astype(np.float64)), axis=1, kind="stable")[:, :3]
        assert (labels == ref).mean() > 0.95  # exact search (ties aside) = NumPy brute force


@pytest.mark.slow
def test_sigkill_and_resume_is_byte_identical(reference):
    tmp, ref = reference
    out = tmp / "killed"
    cmd = [sys.executable, "cluster.py", *args(tmp, out)]
    slow = [sys.executable, "tests/slow_launch.py", "0.5", "cluster.py", *args(tmp, out)]  # 0.5 s after each shard
    run_and_kill(slow, env(), out / "features", "*.keys.txt", tmp / "kill1.log")  # mid-extract
    done = len(list((out / "features").glob("*.keys.txt")))
    assert 1 <= done < N_SHARDS and not (out / "centers.npy").exists()
    run_and_kill(slow, env(), out / "labels", "*.keys.txt", tmp / "kill2.log")  # mid-assign
    done = len(list((out / "labels").glob("*.keys.txt")))
    assert 1 <= done < N_SHARDS
    run(cmd, env(), tmp / "resume.log")
    assert_same_outputs(ref, out)


@pytest.mark.slow
def test_two_ranks_match_one_rank(reference):
    tmp, ref = reference
    out = tmp / "ranks2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "cluster.py",
           *args(tmp, out)]
    run(cmd, env(), tmp / "ranks2.log")
    assert_same_outputs(ref, out)


@pytest.mark.slow
def test_features_are_open_clip_and_the_probe_backbone_by_construction(reference):
    """The features cluster.py wrote (image only, and image + caption fused) equal, to fp16 rounding, open_clip's own
    encode_image / encode_text on open_clip's own preprocessing (an oracle built here from the run's settings), and
    the probe's Backbone built from encoder_config of the run's saved config."""
    import io
    import tarfile

    import open_clip
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from PIL import Image

    from mlcd.cluster.extract import encoder_config
    from mlcd.models.backbones import build_backbone

    tmp, out = reference
    cfg = OmegaConf.load(out / "config.yaml")
    stem = "img-000000"
    keys = (out / "features" / f"{stem}.keys.txt").read_text().split()
    stored = np.load(out / "features" / f"{stem}.npy").astype(np.float32)
    images, caps = {}, {}
    with tarfile.open(tmp / "shards" / f"{stem}.tar") as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            data = tar.extractfile(m).read()
            if ext == "png":
                images[key] = Image.open(io.BytesIO(data)).convert("RGB")
            elif ext == "txt":
                caps[key] = data.decode().strip()
    assert sorted(images) == sorted(keys) and 0 < len(caps) < len(keys)  # rows with and without a caption

    def features(encode_image, encode_text, transform, tokenizer):
        with torch.no_grad():
            f = F.normalize(encode_image(torch.stack([transform(images[k]) for k in keys])).float(), dim=-1)
            idx = [i for i, k in enumerate(keys) if k in caps]
            t = F.normalize(encode_text(tokenizer([caps[keys[i]] for i in idx])).float(), dim=-1)
            f[idx] = F.normalize(f[idx] + t, dim=-1)
        return f.numpy()

    open_clip.add_model_config(cfg.extract.model_config)
    torch.manual_seed(cfg.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.extract.model, pretrained=None,
                                                                 force_image_size=cfg.extract.image_size)
    model.eval()
    oracle = features(model.encode_image, model.encode_text, preprocess, open_clip.get_tokenizer(cfg.extract.model))
    with pytest.warns(UserWarning, match="RANDOM"):
        bb = build_backbone(*encoder_config(cfg.extract, cfg.seed))
    probe = features(bb, bb.encode_text, bb.transform, bb.tokenizer)
    assert stored.shape == oracle.shape == probe.shape == (len(keys), 32)
    np.testing.assert_allclose(stored, oracle, rtol=0, atol=5e-4)  # fp16 storage of unit vectors
    np.testing.assert_allclose(stored, probe, rtol=0, atol=5e-4)
