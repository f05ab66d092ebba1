"""Peak RAM of two-level k-means with its sample kept in the feature files' float16 (what the kmeans stage does now)
vs the same sample converted to float32 first (what it did before): same features, same settings, same centers.

Each measurement runs in a fresh process: draw the sample from float16 feature files (mlcd.cluster.files.sample_rows)
as float16 or float32, then train_kmeans two-level with local refinement and the stage's 100 points per center
(n = k x 100: the whole sample; the coarse level trains on its own 2000 per coarse center), and report the process's peak RSS (VmHWM)
above its RSS just before sampling, overall and for the k-means phase alone (the sampling phase's peak also counts
the memory-mapped feature pages it reads). Interleaved repeats; the centers of the two paths must agree.

    python bench/kmeans_memory.py [--n 409600] [--dim 768] [--k 4096] [--repeats 3]  -> bench/results/kmeans_memory.json
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlcd import fileio  # noqa: E402
from mlcd.cluster.files import sample_rows, write_features  # noqa: E402
from mlcd.cluster.kmeans import train_kmeans  # noqa: E402

OUT = ROOT / "bench" / "results" / "kmeans_memory.json"
SHARD_ROWS = 100_000


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def make_features(fdir: Path, n: int, d: int, seed: int = 0) -> list[str]:
    """Clustered unit vectors (4096 random directions + noise) as float16 feature shards."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((4096, d)).astype(np.float32)
    stems = []
    for s in range(0, n, SHARD_ROWS):
        m = min(SHARD_ROWS, n - s)
        x = means[rng.integers(0, len(means), m)] + 0.6 * rng.standard_normal((m, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        stem = f"shard-{s // SHARD_ROWS:06d}"
        write_features(fdir, stem, x.astype(np.float16), [f"{stem}/{i}" for i in range(m)], {})
        stems.append(stem)
    return stems


def child(args) -> None:
    import torch  # noqa: F401  (the refinement passes import it: its ~0.5 GB of libraries are not the sample's)
    stems = sorted(p.name.removesuffix(".npy") for p in Path(args.features).glob("*.npy"))
    Path("/proc/self/clear_refs").write_text("5")   # peak := current RSS
    before = kib("VmRSS")
    t0 = time.time()
    x = sample_rows(args.features, stems, args.n, 1234, dtype=np.float16 if args.child == "float16" else np.float32)
    sampling_peak = kib("VmHWM") - before        # includes the memory-mapped feature pages read (page cache)
    Path("/proc/self/clear_refs").write_text("5")
    centers, rep = train_kmeans(x, args.k, niter=5, seed=1234, mode="two_level", refine_iters=1, refine_probe=16,
                                max_points_per_centroid=100, gpu=False)
    kmeans_peak = kib("VmHWM") - before
    out = {"dtype": args.child, "sample_gib": x.nbytes / 2**30, "peak_above_start_gib": max(sampling_peak, kmeans_peak) / 2**20,
           "sampling_peak_gib": sampling_peak / 2**20, "kmeans_peak_gib": kmeans_peak / 2**20,
           "seconds": time.time() - t0, "final_mean_cos": rep["refine_iterations"][-1]["mean_cos"]}
    np.save(args.centers, centers)
    print("RESULT " + json.dumps(out))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=409_600)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=["float16", "float32"])
    p.add_argument("--features")
    p.add_argument("--centers")
    args = p.parse_args()
    if args.child:
        return child(args)
    runs, centers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        fdir = Path(tmp) / "features"
        fdir.mkdir()
        make_features(fdir, args.n, args.dim)
        for r in range(args.repeats):
            for dtype in ("float16", "float32"):
                c = Path(tmp) / f"centers-{dtype}-{r}.npy"
                proc = subprocess.run([sys.executable, __file__, "--child", dtype, "--features", str(fdir),
                                       "--centers", str(c), "--n", str(args.n), "--k", str(args.k)],
                                      capture_output=True, text=True, check=True)
                res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
                runs.append({"repeat": r, **res})
                centers[(dtype, r)] = np.load(c)
                print(runs[-1], flush=True)
        diff = max(float(np.abs(centers[("float16", r)] - centers[("float32", r)]).max()) for r in range(args.repeats))

    def median(dtype, key):
        return float(np.median([x[key] for x in runs if x["dtype"] == dtype]))
    f16, f32 = median("float16", "peak_above_start_gib"), median("float32", "peak_above_start_gib")
    copy = median("float32", "sample_gib") - median("float16", "sample_gib")
    result = {"bench": "kmeans_memory", "machine": platform.processor() or platform.machine(),
              "n": args.n, "dim": args.dim, "k": args.k, "mode": "two_level, 5 iterations per level, 1 refinement pass, probe 16",
              "runs": runs, "max_abs_center_diff_float16_vs_float32": diff,
              "median_peak_gib": {"float16": f16, "float32": f32}, "peak_ratio_float16_over_float32": f16 / f32,
              "saved_gib": f32 - f16, "float32_copy_gib": copy,
              "kmeans_phase_median_peak_gib": {"float16": median("float16", "kmeans_peak_gib"),
                                               "float32": median("float32", "kmeans_peak_gib")},
              "median_seconds": {"float16": median("float16", "seconds"), "float32": median("float32", "seconds")},
              "target": "the float16 path saves >= 0.9x the float32 copy of the sample (sample_gib float32 - float16) "
                        "of peak RAM, with the same centers (max abs diff <= 1e-6)",
              "met": bool(f32 - f16 >= 0.9 * copy and diff <= 1e-6)}
    fileio.write_json(OUT, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
