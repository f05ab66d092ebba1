"""The demo pipeline end to end at a miniature size: every stage's outputs exist and agree with each other."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import PROBE_SEARCH_SMALL as PROBE
from mlcd.data.labels import read_shard_labels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_miniature(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    argv = [
        f"demo.data_dir={data}", f"demo.run_dir={run}", "demo.limit=200", "demo.max_per_shard=100",
        "demo.cluster_overrides=[kmeans.k=16,assign.topk=4,extract.batch_size=100,extract.num_workers=0]",
        "demo.train_overrides=[train.total_steps=4,train.global_batch_size=32,train.ckpt_every=2,"
        "train.log_every=1,data.num_workers=0,data.shuffle_buffer=50,logging.wandb.mode=disabled]",
        f"demo.eval_overrides=[limit_train=200,limit_test=100,cache_dir={tmp_path / 'cache'},num_workers=0,{PROBE}]",
    ]
    proc = subprocess.run([sys.executable, "-m", "runners.demo", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    shards = json.loads((data / "shards" / "manifest.json").read_text())
    assert shards["total"] == 200 and len(shards["shards"]) == 2
    shard_keys = {}
    for s in shards["shards"]:
        stem = s["name"].removesuffix(".tar")
        keys, labels, sims = read_shard_labels(data / "cluster" / "labels", stem)
        assert len(keys) == s["count"] and keys[0] == s["first_key"] and keys[-1] == s["last_key"]
        assert labels.shape == (s["count"], 4) and labels.min() >= 0 and labels.max() < 16
        assert all(len(set(row)) == 4 for row in labels.tolist())  # top-4 distinct centers
        assert np.all(np.diff(sims, axis=1) <= 1e-6)  # sorted by decreasing similarity
        shard_keys[stem] = keys
    assert sum(len(k) for k in shard_keys.values()) == 200
    centers = np.load(data / "cluster" / "centers.npy")
    assert centers.shape[0] == 16 and np.allclose(np.linalg.norm(centers, axis=1), 1, atol=1e-4)
    assert json.loads((data / "cluster" / "labels" / "manifest.json").read_text())["num_classes"] == 16
    assert (data / "cluster" / "cluster_sizes.png").stat().st_size > 0

    ckpt = json.loads((run / "checkpoints" / "step-00000004" / "manifest.json").read_text())
    assert ckpt["num_classes"] == 16 and ckpt["world_size"] == 2 and ckpt["samples_seen"] == 4 * 32
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert (run / "loss_curve.png").stat().st_size > 0

    result = json.loads((run / "demo_results.json").read_text())
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert 0 <= row["linear_probe_top1"] <= 100 and 0 <= row["knn_top1"] <= 100
    pixels = next(r for r in result["rows"] if r["backbone"] == "raw pixels")
    assert pixels["linear_probe_top1"] > 50  # 10 classes: a working probe on real pixels is far above chance
    table = (run / "demo_results.md").read_text()
    assert table.count("\n") == 2 + 4 and "| backbone | linear probe top-1 | kNN top-1 |" in table
