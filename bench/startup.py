"""What a paper run pays before and between its steps, measured: the start-up checks over LAION-400M's 41,456 shards
(every shard exists, every shard has its label file) and the cost of one data-loader rebuild (train.py rebuilds the
loader every data.segment_steps steps). Writes bench/results/startup.json.

    python bench/startup.py [--shards 41456] [--repeats 3]

Rebuild cost = (N batches from two loaders of N/2 each) - (N batches from one loader), interleaved per repeat: the
worker start-up, the shuffle buffer's refill and the prefetched batches thrown away, as mlcd.data.streams.ShardBatches pays them. The
paper-scale figure for data.segment_steps is arithmetic from it (see "segment_steps" in the JSON).
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import make_images  # noqa: E402  (bench/data.py: photo-like 500x375 JPEGs)
from mlcd import fileio  # noqa: E402
from mlcd.data.labels import missing_shard_labels, shard_stem, write_shard_labels  # noqa: E402
from mlcd.data.tars import expand_urls, iter_samples  # noqa: E402
from mlcd.data.loader import make_train_loader  # noqa: E402
from mlcd.data.make_shards import shards_from_folder  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "startup.json"


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def startup_checks(tmp: Path, n: int, repeats: int) -> dict:
    shards, labels = tmp / "shards", tmp / "labels"
    shards.mkdir()
    labels.mkdir()
    for i in range(n):  # empty files: the checks look at names, not contents
        (shards / f"{i:05d}.tar").touch()
        for ext in (".keys.txt", ".labels.npy", ".sims.npy"):
            (labels / f"{i:05d}{ext}").touch()
    pattern = f"{shards}/{{00000..{n - 1:05d}}}.tar"
    stems = [shard_stem(u) for u in expand_urls(pattern)]
    assert not missing_shard_labels(labels, stems)
    return {"shards": n,
            "shards_exist_s": timed(lambda: expand_urls(pattern), repeats),
            "label_files_exist_s": timed(lambda: missing_shard_labels(labels, stems), repeats),
            "floor_one_listdir_s": timed(lambda: os.listdir(labels), repeats),
            "note": "local disk, warm cache; on a network file system the listing is one metadata call per "
                    "directory page, the shard check one stat per shard"}


def rebuild_cost(tmp: Path, batches: int, batch_size: int, workers: int, buffer: int, repeats: int) -> dict:
    make_images(tmp / "imgs", 1000)
    m = shards_from_folder(tmp / "imgs", tmp / "rshards", prefix="laion", max_per_shard=250, image_format="jpg")
    urls = [str(tmp / "rshards" / s["name"]) for s in m["shards"]]
    for u in urls:
        keys = [s["__key__"] for s in iter_samples(u, None)]
        write_shard_labels(tmp / "rlabels", shard_stem(u), keys, np.zeros((len(keys), 8), np.int32),
                           np.ones((len(keys), 8), np.float32))

    def run(segments):
        for seed in range(segments):
            it = iter(make_train_loader(urls, str(tmp / "rlabels"), batch_size=batch_size, num_workers=workers,
                                        image_size=224, seed=seed, shuffle_buffer=buffer, resampled=True))
            for _ in range(batches // segments):
                next(it)
            del it
    one, two = [], []
    for _ in range(repeats):  # interleaved: the machine is shared
        one += timed(lambda: run(1), 1)
        two += timed(lambda: run(2), 1)
    cost = [b - a for a, b in zip(one, two)]
    return {"batches": batches, "batch_size": batch_size, "num_workers": workers, "shuffle_buffer": buffer,
            "one_loader_s": one, "two_loaders_s": two, "rebuild_s": cost,
            "batch_s": [a / batches for a in one], "rebuild_in_batches": [c / (a / batches) for a, c in zip(one, cost)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=41456)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        checks = startup_checks(Path(tmp), a.shards, a.repeats)
        rebuild = rebuild_cost(Path(tmp), batches=24, batch_size=64, workers=2, buffer=500, repeats=a.repeats)
    med = float(np.median(rebuild["rebuild_in_batches"]))
    # Arithmetic for a paper run (B/32, 410 images per GPU per step, 8 workers): a rebuild throws away about the
    # same number of batches' worth of decoding per worker as measured here, at the paper's step time.
    steps = 380232
    per_segment = {s: {"rebuilds": -(-steps // s), "rebuild_batches_total": round(-(-steps // s) * med)}
                   for s in (175, 1000, 2000, 5000)}
    out = {"bench": "start-up checks at LAION-400M's shard count, and one data-loader rebuild",
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "checks": checks, "rebuild": rebuild,
           "segment_steps": {"rebuild_in_batches_median": med, "paper_steps": steps, "by_segment_steps": per_segment,
                             "arithmetic": "rebuilds x rebuild_in_batches = batches of loader time lost; at 2000 that "
                                           "is rebuilds/steps of the run, with ckpt_every a multiple so a resume "
                                           "replays nothing"}}
    fileio.write_json(Path(a.out), out)
    print({k: [round(x, 3) for x in v] for k, v in checks.items() if isinstance(v, list)})
    print("rebuild s:", [round(x, 2) for x in rebuild["rebuild_s"]], "in batches:", round(med, 2))


if __name__ == "__main__":
    main()
