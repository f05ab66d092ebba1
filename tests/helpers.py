"""What the trainer's tests share: a real Fashion-MNIST shard set with labels, the tiny model's overrides, a
torchrun launcher (gloo, CPU) that shows every rank's error lines, and readers of a finished run's checkpoint."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from mlcd.data import fashion_mnist
from mlcd.data.labels import write_shard_labels

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 23  # not divisible by 2 or 3: exercises uneven center shards


def _write_dataset(out: Path, n_shards=4, per_shard=64):
    """Real Fashion-MNIST images in shards, with 2 labels each: the class and a class-derived second id."""
    images, classes = fashion_mnist.load("train")
    shard_dir, labels_dir = out / "shards", out / "labels"
    shard_dir.mkdir(parents=True)
    i = 0
    for s in range(n_shards):
        keys, labels = [], []
        with wds.TarWriter(str(shard_dir / f"train-{s:06d}.tar")) as sink:
            # a corrupt image first in every shard: skipped by the loader, counted in the trainer's log
            sink.write({"__key__": f"corrupt-{s}", "png": b"not a png"})
            keys.append(f"corrupt-{s}")
            labels.append([0, 10])
            for _ in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                key = f"fm-{i:07d}"
                sink.write({"__key__": key, "png": buf.getvalue()})
                keys.append(key)
                c = int(classes[i])
                labels.append([c, 10 + (c * 7) % 13])
                i += 1
        write_shard_labels(labels_dir, f"train-{s:06d}", keys, np.array(labels, np.int32),
                           np.ones((len(keys), 2), np.float32))
    (labels_dir / "manifest.json").write_text(json.dumps({"num_classes": NUM_CLASSES}))
    return f"{shard_dir}/train-{{000000..{n_shards - 1:06d}}}.tar", str(labels_dir)


def _overrides(dataset, out_dir, **extra):
    shards, labels_dir = dataset
    args = {
        "model": "vit_tiny", "model.image_size": 28, "model.patch_size": 7, "model.width": 32,
        "model.layers": 2, "model.heads": 2, "model.mlp_dim": 64, "model.embed_dim": 16,
        "data.train_shards": shards, "data.labels_dir": labels_dir, "data.num_workers": 0,
        "data.shuffle_buffer": 32, "out_dir": str(out_dir), "seed": 3,
        "train.global_batch_size": 16, "train.total_steps": 12, "train.ckpt_every": 4,
        "train.log_every": 2, "train.keep_last": 5, "train.progress_bar": False, "train.deterministic": True,
        "optim.lr": 2e-3, "optim.warmup_steps": 2, "loss.sample_ratio": 0.5, "logging.wandb.mode": "disabled",
    }
    args.update(extra)
    # brace patterns must be quoted for hydra's override grammar
    return [f"{k}='{v}'" if isinstance(v, str) and "{" in v else f"{k}={v}" for k, v in args.items()]


def _torchrun(nproc, overrides, timeout=240, wait=True, step_delay=0.0, **env_extra):
    script = [str(ROOT / "tests" / "slow_launch.py"), str(step_delay), "train.py"] if step_delay else [str(ROOT / "train.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *script, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + _error_lines(proc.stderr)[-6000:] + proc.stderr[-8000:]
    return proc


def _error_lines(stderr: str) -> str:
    """Every rank's error lines: a crash's root cause is one rank's message, often far above the survivors'
    tracebacks, out of reach of a tail."""
    wanted = re.compile(r"terminate|enforce|Fatal|Error|rank \d")
    return "".join(line + "\n" for line in stderr.splitlines() if wanted.search(line))


def _final_state(run_dir: Path, step: int):
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    backbone = load_file(str(ckpt / "backbone.safetensors"))
    shards = [torch.load(ckpt / f"centers-rank{r:05d}.pt", weights_only=False)
              for r in range(manifest["world_size"])]
    return manifest, backbone, shards


def _full_centers(shards):
    return torch.cat([s["shard"]["weight"] for s in shards])


def _compose(dataset, out_dir, **extra):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs" / "train"), version_base=None):
        return compose("train", overrides=_overrides(dataset, out_dir, **extra))


def _run_inprocess(cfg):
    from mlcd.train.loop import train

    torch.set_num_threads(1)
    return train(cfg)


# The linear probe's lam search at a test's size (a few hundred images): the same search code (coarse sweep, then
# halving around the best), on a 1-per-decade grid 1e-4..1e2 and to a looser gradient tolerance: about half the
# fits, each far shorter. Appended to the eval overrides of the miniature pipeline tests (runners.demo, runners.ablate,
# runners.rounds), whose probe stage was most of their time; the probe's own accuracy is tested in test_linear_probe.py.
PROBE_SEARCH_SMALL = "probe.lam_lo=-4,probe.steps_per_decade=1,probe.coarse_every=2,probe.tol=1e-4"
