"""Loader throughput: one DataLoader worker decoding JPEG shards at 224 with the training transforms, side by
side with a plain PIL open + the same transform loop over the same image files, and the device-decode path
(data.decode=gpu) run with device=cpu: the worker reads and checks the samples and draws the boxes, the main
process decodes (torchvision.io.decode_jpeg, libjpeg-turbo) and crops/resizes/flips/normalises the batch.
Writes bench/results/data.json.

    python bench/data.py [--n 600] [--rounds 8]

Targets: the loader (1 worker) reaches at least 0.9x the plain loop's images/s; the decode=gpu path on the CPU is
not slower per CPU-second than the decode=cpu loader (median over rounds of the per-round ratio >= 1).
The capacity planner (plan.py) takes images_per_s_best.loader_1_worker as one worker's rate: keep that key.
On a GPU the decode=gpu rate is measured by bench/gpu_check.py (`make gpu-check`, check `decode`).
"""
import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlcd.data.labels import write_shard_labels  # noqa: E402
from mlcd.data.tars import iter_samples  # noqa: E402
from mlcd.data.loader import make_train_loader  # noqa: E402
from mlcd.data.make_shards import shards_from_folder  # noqa: E402
from mlcd.data.transforms import TrainTransform  # noqa: E402


def make_images(folder: Path, n: int, size=(500, 375), seed=0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, shapes, mild noise, q=90) at ImageNet's typical 500x375."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
        img = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.integers(0, size[0]), rng.integers(0, size[1])
            draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (size[1], size[0], 3))
        p = folder / f"img{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def _cpu() -> float:
    """CPU seconds of this process plus its reaped children (the DataLoader worker, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def plain_loop(paths, transform, batch_size, seed):
    rng = random.Random(seed)
    batch, n = [], 0
    c0, t0 = _cpu(), time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            batch.append(transform(img.convert("RGB"), rng))
        if len(batch) == batch_size:
            torch.stack(batch)
            n += len(batch)
            batch = []
    if batch:
        torch.stack(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0), n / (_cpu() - c0)


def loader_run(urls, labels_dir, num_workers, batch_size, seed, decode="cpu"):
    loader = make_train_loader(urls, labels_dir, batch_size=batch_size, num_workers=num_workers, image_size=224,
                               seed=seed, resampled=False, shuffle_buffer=256, decode=decode, device="cpu")
    n = 0
    c0, t0 = _cpu(), time.perf_counter()  # includes worker start-up
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - t0), n / (_cpu() - c0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded; make the plain loop match

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.time()
        paths = make_images(tmp / "imgs", a.n)
        print(f"made {a.n} JPEGs in {time.time() - t:.1f} s")
        m = shards_from_folder(tmp / "imgs", tmp / "shards", prefix="bench", max_per_shard=250)
        urls = [str(tmp / "shards" / s["name"]) for s in m["shards"]]
        for u in urls:
            keys = [s["__key__"] for s in iter_samples(u, None)]
            write_shard_labels(tmp / "labels", Path(u).stem, keys, np.zeros((len(keys), 2), np.int32),
                               np.ones((len(keys), 2), np.float32))
        transform = TrainTransform(224)
        import torchvision.io  # noqa: F401 - its first import takes seconds: not inside a timed run
        results = {"plain_loop": [], "loader_1_worker": [], "loader_in_process": [], "gpu_path_1_worker": [],
                   "gpu_path_in_process": []}
        per_cpu_s = {k: [] for k in results}
        lab = str(tmp / "labels")
        for r in range(a.rounds):  # interleaved rounds: the machine is shared
            for name, fn in (("plain_loop", lambda: plain_loop(paths, transform, a.batch_size, r)),
                             ("loader_1_worker", lambda: loader_run(urls, lab, 1, a.batch_size, r)),
                             ("gpu_path_1_worker", lambda: loader_run(urls, lab, 1, a.batch_size, r, "gpu")),
                             ("loader_in_process", lambda: loader_run(urls, lab, 0, a.batch_size, r)),
                             ("gpu_path_in_process", lambda: loader_run(urls, lab, 0, a.batch_size, r, "gpu"))):
                wall, cpu = fn()
                results[name].append(wall)
                per_cpu_s[name].append(cpu)
            print({k: round(v[-1], 1) for k, v in results.items()})
        mean_kb = np.mean([p.stat().st_size for p in paths]) / 1024

    best = {k: max(v) for k, v in results.items()}
    best_cpu = {k: max(v) for k, v in per_cpu_s.items()}

    def median_ratio(d, name, ref="plain_loop"):  # per round: vs the reference run beside it (same machine load)
        return float(np.median([x / p for x, p in zip(d[name], d[ref])]))
    ratio = median_ratio(results, "loader_1_worker")
    gpu_cpu_s = median_ratio(per_cpu_s, "gpu_path_1_worker", "loader_1_worker")
    out = {
        "benchmark": "webdataset train loader vs plain PIL loop, JPEG -> RandomResizedCrop(224, bicubic) + flip + "
                     "CLIP normalize, batches stacked",
        "images_per_s_best": {k: round(v, 1) for k, v in best.items()},
        "images_per_s_all_rounds": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "ratio_loader_1_worker_vs_plain": round(ratio, 3),
        "ratio_loader_in_process_vs_plain": round(median_ratio(results, "loader_in_process"), 3),
        "ratio_of_best_loader_1_worker_vs_plain": round(best["loader_1_worker"] / best["plain_loop"], 3),
        "images_per_cpu_s_best": {k: round(v, 1) for k, v in best_cpu.items()},
        "ratio_per_cpu_s_loader_1_worker_vs_plain": round(median_ratio(per_cpu_s, "loader_1_worker"), 3),
        "images_per_cpu_s_all_rounds": {k: [round(x, 1) for x in v] for k, v in per_cpu_s.items()},
        "ratio_gpu_path_vs_loader_1_worker": {
            "per_cpu_s": round(gpu_cpu_s, 3), "per_wall_s": round(median_ratio(results, "gpu_path_1_worker",
                                                                                "loader_1_worker"), 3),
            "in_process_per_cpu_s": round(median_ratio(per_cpu_s, "gpu_path_in_process", "loader_in_process"), 3),
            "in_process_per_wall_s": round(median_ratio(results, "gpu_path_in_process", "loader_in_process"), 3)},
        "target": "loader with 1 worker >= 0.9x plain loop (median over rounds of the per-round wall-clock ratio)",
        "target_met": bool(ratio >= 0.9),
        "target_gpu_path": "decode=gpu on the CPU (1 worker) >= decode=cpu loader (1 worker) in images per CPU-second "
                           "(median over rounds of the per-round ratio)",
        "target_gpu_path_met": bool(gpu_cpu_s >= 1.0),
        "sizes": {"images": a.n, "image_size_src": [500, 375], "jpeg_quality": 90, "mean_jpeg_kb": round(mean_kb, 1),
                  "shards": len(urls), "batch_size": a.batch_size, "out_size": 224, "rounds": a.rounds,
                  "shuffle_buffer": 256},
        "notes": "loader timings include DataLoader worker start-up and moving batches to the main process; "
                 "gpu_path_*: data.decode=gpu with device=cpu (the worker reads, checks, draws boxes; the main "
                 "process decodes with torchvision.io.decode_jpeg and resizes on uint8, antialiased bicubic); "
                 "plain loop and loader worker both run with 1 torch thread; interleaved rounds on a shared machine, "
                 "ratios are medians of per-round ratios. images_per_cpu_s counts CPU time of the main process plus the joined worker, so it "
                 "is less sensitive to other load on the machine than wall-clock images/s",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "pillow": Image.__version__, "device": "cpu",
                    "load_avg_1m": os.getloadavg()[0]},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
