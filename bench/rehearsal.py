"""Rehearsal at the mission's scale: the real entry points, at the paper's class count, on this machine's CPUs.

    python bench/rehearsal.py                      # full size, ~1 h on 2 cores -> bench/results/rehearsal.json
    python bench/rehearsal.py --small --work-dir /tmp/reh --out /tmp/reh.json     # tiny sizes, ~2 min (the test)
    python bench/rehearsal.py --phases a --k 100000 --rows-per-center 5          # one phase, other sizes

Resumable: every step's record is written into the output JSON (atomically) as soon as it finishes, and a re-run
skips the steps it finds there (sizes must match; delete the JSON and the work dir to start over).

(a) Clustering at K = 1,000,000 with the paper preset's k-means (configs/cluster/experiment/laion400m_vitl14.yaml:
    two_level, coarse sqrt(K) = 1000 groups, 20 iterations per level, refine_iters 10, refine_probe 16,
    max_points_per_centroid 100) run as `cluster.py experiment=laion400m_vitl14 stages=[kmeans]` then
    `stages=[assign]` (one process per stage, so each has its own wall time and peak RSS) over feature files
    written in the extract stage's own format (mlcd.cluster.files.write_features + features/manifest.json) for
    empty placeholder tars (the kmeans and assign stages only read the shard names). The features are synthetic,
    with known structure: K generating centers uniform on the unit sphere, every center used by exactly
    `rows_per_center` rows (a shuffled order), each row = normalize(center + noise * g / sqrt(d)), g ~ N(0, I_d).
    Assignment uses `assign.method=ivf` (exact top-8 of 5M x 1M is ~3e14 FLOP, over an hour here); the stage
    itself measures recall@8 against exact search on a sample. `kmeans.final_stats=false` for the same reason (it
    is one more exact pass over the sample); the empty centers and objectives are computed here instead. The full
    size runs ONE refinement pass (preset 10): a pass over 5M rows x 1M centers at d = 32 is ~5e12 FLOP, measured
    at 1.8 GFLOP/s on a loaded 2-core box (~15 min idle, ~45 min loaded); --refine-iters 10 runs the preset's.
    Reported: wall time and peak RSS per stage, the FLOPs of each sub-phase from the algorithm and its rate beside
    the GEMM rate measured in the same run, empty centers, the objective against the generating centers', and the
    plain arithmetic scaling of the FLOP counts to the paper's 100M-row sample (400M rows for assignment) at d = 768.
(b) Training `train.py experiment=laion400m_vitb32` changed only in sizes (global batch, steps, checkpoint interval
    with data.segment_steps equal to it as in the preset, loader workers, shards, labels, num_classes; log every step,
    no wandb, no progress bar) over LAION-like JPEG shards with captions and synthetic top-8 labels
    over num_classes in the cluster stage's label format: 2 gloo ranks under torchrun, killed with SIGKILL (torchrun
    and every rank's process group) once the first checkpoint lands, resumed on 3 ranks to the end, exported to
    Hugging Face (mlcd.export_hf) and probed on Fashion-MNIST (eval_linear_probe.py backbone.type=hf). Per-rank peak
    RSS (VmHWM, polled from /proc) is set beside `python plan.py ... gpu=cpu --json` (tensor bytes only).
    --small trains model=vit_tiny at 10k classes and fixes the probe's L2 strength (probe.lam; the search alone took
    7 min on a loaded box, see the findings in the JSON).
"""
import argparse
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlcd import fileio  # noqa: E402
from runners.kit import show  # noqa: E402

PY = sys.executable
MB = 2**20

# The paper's clustering and training sizes (README "Scale-out"): the targets of the arithmetic scaling.
PAPER = {"k": 1_000_000, "kmeans_rows": 100_000_000, "assign_rows": 400_000_000, "d": 768, "coarse_k": 1000,
         "niter": 20, "refine_iters": 10, "refine_probe": 16,
         "readme_pflop": {"two_level_iteration": 0.31, "refine_pass": 2.5, "exact_top8_assignment": 614},
         "readme_gpu_rate_flops": 50e12}   # README's assumed FAISS fp32 rate per H100 (an assumption, not measured)

FULL = dict(k=1_000_000, rows_per_center=5, dim=32, shards=50, noise=0.5, refine_iters=1, eval_sample=10_000,
            recall_sample=10_000, model=None, classes=1_000_000, batch=12, steps=8, ckpt_every=4, images=384,
            image_shards=4, num_workers=1, probe_train=300, probe_test=200, probe_lam=None, small=False)
SMALL = dict(k=2000, rows_per_center=5, dim=16, shards=4, noise=0.5, refine_iters=3, eval_sample=2000,
             recall_sample=2000, model="vit_tiny", classes=10_000, batch=6, steps=6, ckpt_every=2, images=36,
             image_shards=3, num_workers=0, probe_train=200, probe_test=100, probe_lam=1e-3, small=True)

# LAION-400M's common image sizes (w, h): photos at 4:3 / 3:4 / 3:2 / 16:9, squares, thumbnails, and large ones.
LAION_SIZES = [(500, 375), (640, 480), (800, 600), (375, 500), (480, 640), (1024, 768), (600, 400), (800, 533),
               (1280, 720), (256, 256), (300, 300), (512, 512), (220, 330), (150, 150), (1200, 800), (400, 267)]
SMALL_SIZES = [(96, 72), (64, 64), (72, 96), (120, 80)]
CAPTION_WORDS = ("photo dog cat red blue vintage car house garden beach sunset portrait logo poster shirt shoes "
                 "table chair mountain city night street food cake flower bird painting old new modern").split()


# ---------------------------------------------------------------------------------------------- records
class Record:
    """The output JSON doubles as the resume ledger: one entry per finished step, written atomically."""

    def __init__(self, path: Path, sizes: dict, work: Path):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() else {}
        if old and old.get("sizes") != sizes:
            raise SystemExit(f"{path} holds a rehearsal at other sizes ({old.get('sizes')}); delete it (and "
                             f"{old.get('work_dir')}) or pass another --out / --work-dir")
        self.data = old or {"benchmark": "rehearsal at the mission's scale (bench/rehearsal.py)", "sizes": sizes,
                            "work_dir": str(work), "steps": {}}

    def done(self, name: str) -> dict | None:
        return self.data["steps"].get(name)

    def put(self, name: str, value: dict) -> dict:
        self.data["steps"][name] = value
        self.save()
        return value

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_json(self.path, self.data)


def step(rec: Record, name: str, fn) -> dict:
    got = rec.done(name)
    if got is not None:
        print(f"[rehearsal] {name}: done before, skipped", flush=True)
        return got
    print(f"[rehearsal] {name} ...", flush=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    out = fn()
    out.setdefault("wall_s", round(time.time() - t0, 2))
    out["load_avg_1min_start_end"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    print(f"[rehearsal] {name}: {out['wall_s']:.1f} s", flush=True)
    return rec.put(name, out)


# ---------------------------------------------------------------------------------------------- processes
def _proc_table() -> dict:
    """pid -> ppid for every process (from /proc/*/stat)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        out[int(p.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def _descendants(root: int, table: dict) -> list[int]:
    kids = {}
    for pid, ppid in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _env_of(pid: int, name: str) -> str | None:
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(name.encode() + b"="):
                return item.split(b"=", 1)[1].decode()
    except OSError:
        return None
    return None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class TreeWatch(threading.Thread):
    """Polls a launcher's process tree: each rank's peak RSS (VmHWM) and process group, its loader workers' peaks."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval, self.stop = root, interval, threading.Event()
        self.ranks = {}      # pid -> {"rank", "pgid", "peak_kb"}
        self.workers = {}    # pid -> {"parent_rank", "peak_kb"}
        self.lock = threading.Lock()

    def poll(self):
        table = _proc_table()
        with self.lock:
            for pid in _descendants(self.root, table):
                ppid = table.get(pid)
                if ppid == self.root and pid not in self.ranks:
                    rank = _env_of(pid, "RANK")
                    if rank is None:
                        continue
                    try:
                        pgid = os.getpgid(pid)
                    except OSError:
                        continue
                    self.ranks[pid] = {"rank": int(rank), "pgid": pgid, "peak_kb": 0, "anon_kb": 0}
                elif ppid in self.ranks and pid not in self.workers:
                    self.workers[pid] = {"parent_rank": self.ranks[ppid]["rank"], "peak_kb": 0, "anon_kb": 0}
            for pid, info in list(self.ranks.items()) + list(self.workers.items()):
                hwm, anon = _status_kb(pid, "VmHWM"), _status_kb(pid, "RssAnon")
                if hwm:
                    info["peak_kb"] = max(info["peak_kb"], hwm)
                if anon:
                    info["anon_kb"] = max(info["anon_kb"], anon)

    def run(self):
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.interval)

    def summary(self) -> dict:
        with self.lock:
            ranks = sorted(self.ranks.values(), key=lambda r: r["rank"])
            out = {"per_rank_peak_rss_mb": [round(r["peak_kb"] / 1024, 1) for r in ranks],
                   "per_rank_max_polled_anon_rss_mb": [round(r["anon_kb"] / 1024, 1) for r in ranks],
                   "ranks_seen": [r["rank"] for r in ranks]}
            if self.workers:
                out["loader_worker_peak_rss_mb_max"] = round(max(w["peak_kb"] for w in self.workers.values()) / 1024, 1)
            return out


def run_cmd(cmd: list[str], log: Path, env: dict | None = None, watch: bool = False, kill_when=None) -> dict:
    """Run `cmd` from the repo root in its own session, output appended to `log`. Returns wall time, exit status and
    the peak RSS of the process and its reaped descendants (wait4's rusage). `watch`: poll the tree for per-rank
    peaks (torchrun). `kill_when()`: checked every 0.1 s; when true, SIGKILL the launcher's process group and every
    rank's (torchrun starts each worker in a session of its own)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {show(cmd)}", flush=True)
    with open(log, "ab") as f:
        f.write(f"\n$ {show(cmd)}\n".encode())
        f.flush()
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        watcher = TreeWatch(proc.pid) if watch else None
        if watcher:
            watcher.start()
        killed = None
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if kill_when is not None and killed is None and kill_when():
                    killed = _kill_tree(proc.pid, watcher)
                time.sleep(0.1)
        except BaseException:
            _kill_tree(proc.pid, watcher)
            raise
        wall = time.time() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if watcher:
            watcher.stop.set()
            watcher.join()
    out = {"cmd": show(cmd), "wall_s": round(wall, 2), "exit_code": proc.returncode,
           "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "log": str(log)}
    if watcher:
        out.update(watcher.summary())
    if killed is not None:
        out["killed"] = killed
    elif proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"{tail}\n[rehearsal] failed (exit {proc.returncode}), log {log}: {show(cmd)}")
    return out


def _kill_tree(root: int, watcher: TreeWatch | None) -> dict:
    """SIGKILL a launcher and its ranks, as a crash of the node would; returns what was killed."""
    if watcher is not None:
        watcher.poll()
    ranks = dict(watcher.ranks) if watcher is not None else {}
    root_pgid = os.getpgid(root)
    groups = sorted({root_pgid} | {r["pgid"] for r in ranks.values()})
    t = time.time()
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in ranks):
        time.sleep(0.05)
    return {"at_unix": round(t, 2), "launcher_pgid": root_pgid,
            "rank_pgids": {str(r["rank"]): r["pgid"] for r in ranks.values()},
            "ranks_outside_launcher_group": sorted(r["rank"] for r in ranks.values() if r["pgid"] != root_pgid),
            "ranks_alive_after": sorted(r["rank"] for p, r in ranks.items() if _alive(p))}


# ---------------------------------------------------------------------------------------------- GEMM rate
def gemm_rates(shapes: dict, repeats: int = 5) -> dict:
    """float32 matmul rates (torch, all threads) for named (m, k, n) shapes: median and best of `repeats`."""
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        flop = 2.0 * m * k * n
        out[name] = {"shape_mkn": [m, k, n], "median_gflops": round(flop / np.median(times) / 1e9, 2),
                     "best_gflops": round(flop / min(times) / 1e9, 2), "repeats": repeats}
    return out


# ---------------------------------------------------------------------------------------------- phase (a)
def write_placeholder_tar(path: Path) -> None:
    """An empty, valid tar (the kmeans and assign stages read only shard names; the features stand for it)."""
    if path.exists():
        return
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def make_features(a: dict, paths: dict) -> dict:
    """Synthetic features in the extract stage's on-disk format; returns the record (how they were made)."""
    from mlcd.cluster.files import versions, write_features
    from mlcd.cluster.report import update_manifest

    k, rpc, d, n_shards = a["k"], a["rows_per_center"], a["dim"], a["shards"]
    n = k * rpc
    rng = np.random.default_rng(a["seed"])
    gen = rng.standard_normal((k, d), dtype=np.float32)
    gen /= np.linalg.norm(gen, axis=1, keepdims=True)
    ids = rng.permutation(np.repeat(np.arange(k, dtype=np.int32), rpc))
    syn = paths["synthetic"]
    syn.mkdir(parents=True, exist_ok=True)
    fileio.save_npy(syn / "generating_centers.npy", gen)
    fileio.save_npy(syn / "generating_ids.npy", ids)
    fdir = paths["cluster"] / "features"
    fdir.mkdir(parents=True, exist_ok=True)
    paths["tars"].mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, n_shards + 1).astype(np.int64)
    scale = np.float32(a["noise"] / np.sqrt(d))
    own_cos_sum = 0.0
    for s in range(n_shards):
        stem = f"{s:05d}"
        write_placeholder_tar(paths["tars"] / f"{stem}.tar")
        sl = ids[bounds[s]:bounds[s + 1]]
        x = gen[sl] + scale * rng.standard_normal((len(sl), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x16 = x.astype(np.float16)
        own_cos_sum += float((x16.astype(np.float32) * gen[sl]).sum(1).astype(np.float64).sum())
        keys = [f"{stem}{i:06d}" for i in range(len(sl))]
        write_features(fdir, stem, x16, keys, {})
    how = (f"{k:,} generating centers uniform on the unit sphere in d = {d} (normalized N(0, I)); every center used by "
           f"exactly {rpc} rows, in a shuffled order; row = normalize(center + {a['noise']} * g / sqrt(d)), "
           f"g ~ N(0, I_d) (noise norm ~{a['noise']}); stored fp16 as the extract stage stores features")
    settings = {"synthetic": how, "seed": a["seed"]}
    fileio.write_json(fdir / "manifest.json", {"settings": settings, "complete": True, "config": {"synthetic": how},
                                               "versions": versions(), "shards": n_shards, "rows": int(n), "dim": d,
                                               "skipped": {}, "dtype": "float16", "normalized": True})
    update_manifest(paths["cluster"], {"synthetic": how}, "extract",
                    {"features_dir": str(fdir), "rows": int(n), "dim": d, "shards": n_shards, "skipped": {}})
    return {"how": how, "rows": int(n), "dim": d, "generating_centers": k, "rows_per_center": rpc,
            "noise_norm": a["noise"], "shards": n_shards, "rows_per_shard": int(n // n_shards),
            "mean_cos_to_own_generating_center_all_rows": own_cos_sum / n,
            "features_bytes": int(n * d * 2), "features_dir": str(fdir)}


def cluster_cmd(a: dict, paths: dict, stage: str) -> list[str]:
    return [PY, "cluster.py", "experiment=laion400m_vitl14", f"stages=[{stage}]", f"out_dir={paths['cluster']}",
            f"shards='{paths['tars']}/{{00000..{a['shards'] - 1:05d}}}.tar'", f"kmeans.k={a['k']}",
            f"kmeans.refine_iters={a['refine_iters']}", "kmeans.final_stats=false", "assign.method=ivf",
            f"assign.recall_sample={a['recall_sample']}"]


def ivf_default_niter() -> int:
    import faiss
    return int(faiss.IndexIVFFlat(faiss.IndexFlatIP(4), 4, 2, faiss.METRIC_INNER_PRODUCT).cp.niter)


def kmeans_flops(n: int, d: int, k: int, coarse_k: int, niter: int, probe: int, refine_iters: int,
                 max_ppc: int) -> dict:
    """FLOPs of each k-means sub-phase from the algorithm (mlcd/cluster/kmeans.py; 2 FLOP per multiply-add of a
    similarity). The fine level and the refinement assume equal coarse groups (the exact count needs the group
    sizes, which the report does not keep)."""
    m_coarse = min(n, coarse_k * max(max_ppc, 2000))    # kmeans.COARSE_MAX_POINTS_PER_CENTROID
    per_group = k / coarse_k
    return {"coarse_lloyd": 2.0 * m_coarse * coarse_k * d * niter,
            "coarse_group_assignment": 2.0 * n * coarse_k * d,
            "fine_lloyd": 2.0 * n * per_group * d * niter,
            "refine_candidate_search": 2.0 * n * coarse_k * d,
            "refine_pass": 2.0 * n * probe * per_group * d,
            "refine_all_passes": 2.0 * n * probe * per_group * d * refine_iters,
            "final_stats_exact_pass_not_run": 2.0 * n * k * d}


def assign_flops(n: int, k: int, d: int, nlist: int, nprobe: int, recall_sample: int, ivf_niter: int) -> dict:
    per_query = 2.0 * d * (nlist + nprobe * k / nlist)   # coarse quantizer + the probed lists (equal lists)
    return {"ivf_train": 2.0 * k * nlist * d * ivf_niter, "ivf_add": 2.0 * k * nlist * d,
            "recall_exact": 2.0 * recall_sample * k * d, "recall_ivf": recall_sample * per_query,
            "ivf_search_all_rows": n * per_query, "exact_top8_all_rows_not_run": 2.0 * n * k * d}


def quality(a: dict, paths: dict) -> dict:
    """Objective of the learned centers vs the generating ones, and the centers left empty."""
    import faiss
    from mlcd.cluster.files import read_features, sample_rows
    from mlcd.data.labels import read_shard_labels

    stems = [f"{s:05d}" for s in range(a["shards"])]
    fdir = paths["cluster"] / "features"
    centers = np.load(paths["cluster"] / "centers.npy")
    gen = np.load(paths["synthetic"] / "generating_centers.npy")
    gen_ids = np.load(paths["synthetic"] / "generating_ids.npy")
    k, d = centers.shape
    n = a["k"] * a["rows_per_center"]
    out = {"k_learned": int(k), "d": int(d), "rows": int(n)}

    def top1(index_of, x):
        index = faiss.IndexFlatIP(index_of.shape[1])
        index.add(np.ascontiguousarray(index_of, dtype=np.float32))
        sims, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return sims[:, 0].astype(np.float64), ids[:, 0]

    m = min(a["eval_sample"], n)
    seed = a["seed"] + 7
    x = sample_rows(fdir, stems, m, seed)
    idx = np.arange(n) if m >= n else np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    t0 = time.time()
    g_sim, g_id = top1(gen, x)
    l_sim, _ = top1(centers, x)
    own = (x * gen[gen_ids[idx]]).sum(1).astype(np.float64)
    out["sample"] = {
        "rows": int(m), "exact_search_s": round(time.time() - t0, 2),
        "mean_cos_nearest_generating_center": float(g_sim.mean()),
        "mean_cos_nearest_learned_center": float(l_sim.mean()),
        "mean_cos_own_generating_center": float(own.mean()),
        "fraction_whose_nearest_generating_center_is_its_own": float((g_id == gen_ids[idx]).mean()),
        "objective_eq2_generating": float(2 - 2 * g_sim.mean()),
        "objective_eq2_learned": float(2 - 2 * l_sim.mean()),
        "learned_over_generating_mean_cos": float(l_sim.mean() / g_sim.mean()),
    }
    # Empty centers over all rows (= the k-means sample: k * max_points_per_centroid >= rows): the nearest center of
    # every row, exactly when that is cheap, else the IVF top-1 from the label files (recall measured by assign).
    if 2.0 * n * k * d <= 2e11:
        allx = np.concatenate([read_features(fdir, s)[1].astype(np.float32) for s in stems])
        sims, top = top1(centers, allx)
        how = "exact nearest center of every row"
    else:
        parts = [read_shard_labels(paths["labels"], s) for s in stems]
        top = np.concatenate([p[1][:, 0] for p in parts])
        sims = np.concatenate([p[2][:, 0] for p in parts]).astype(np.float64)
        in_top8 = np.bincount(np.concatenate([p[1].ravel() for p in parts]), minlength=k)
        out["centers_in_no_top8_list"] = int((in_top8 == 0).sum())
        how = "top-1 of the IVF labels of every row (approximate: see assign recall@8)"
    sizes = np.bincount(top, minlength=k)
    pct = [0, 1, 50, 99, 100]
    out["all_rows"] = {"how": how, "empty_centers": int((sizes == 0).sum()),
                       "empty_fraction": float((sizes == 0).mean()),
                       "size_percentiles": {str(p): float(v) for p, v in zip(pct, np.percentile(sizes, pct))},
                       "mean_cos_top1": float(sims.mean())}
    return out


def phase_a(rec: Record, a: dict, paths: dict) -> dict:
    step(rec, "a_features", lambda: make_features(a, paths))
    n, d, k = a["k"] * a["rows_per_center"], a["dim"], a["k"]
    ck = int(round(np.sqrt(k)))
    probe = 16
    shapes = {"refine_group_block": (max(1, n * probe // ck), d, max(1, k // ck)),
              "faiss_blas_block": (4096, d, 1024),
              "square_2048": (2048, 2048, 2048)}
    step(rec, "a_gemm", lambda: {"rates": gemm_rates(shapes), "library": "torch.matmul float32",
                                 "threads": os.cpu_count()})
    step(rec, "a_kmeans", lambda: run_cmd(cluster_cmd(a, paths, "kmeans"), paths["logs"] / "kmeans.log"))
    step(rec, "a_assign", lambda: run_cmd(cluster_cmd(a, paths, "assign"), paths["logs"] / "assign.log"))
    step(rec, "a_quality", lambda: quality(a, paths))
    return summarize_a(rec, a, paths)


def preset_changes(a: dict, k: int, passes: list, fl: dict, af: dict) -> dict:
    """What differs from configs/cluster/experiment/laion400m_vitl14.yaml, and why."""
    out = {"kmeans.final_stats": "false: it is one more exact pass over the whole sample "
                                 f"({fl['final_stats_exact_pass_not_run']:.3g} FLOP here); the empty centers and the "
                                 "objective are computed by the rehearsal instead",
           "assign.method": f"ivf with the stage's defaults (exact top-8 is {af['exact_top8_all_rows_not_run']:.3g} "
                            "FLOP here)",
           "assign.recall_sample": a["recall_sample"]}
    if a["refine_iters"] != PAPER["refine_iters"]:
        mean = float(np.mean([p["time_s"] for p in passes])) if passes else None
        out["kmeans.refine_iters"] = (f"{a['refine_iters']} (preset {PAPER['refine_iters']}) to fit the time: one pass "
                                      f"took {mean:.0f} s here, so the preset's {PAPER['refine_iters']} would take "
                                      f"~{PAPER['refine_iters'] * mean / 60:.0f} min" if mean else
                                      f"{a['refine_iters']} (preset {PAPER['refine_iters']})")
    if k != PAPER["k"]:
        out["kmeans.k"] = f"{k} (preset {PAPER['k']})"
    return out


def summarize_a(rec: Record, a: dict, paths: dict) -> dict:
    s = rec.data["steps"]
    rep = json.loads((paths["cluster"] / "kmeans_report.json").read_text())
    arep = json.loads((paths["labels"] / "assign_report.json").read_text())
    n, d, k = rep["n"], rep["d"], rep["k"]
    gemm = {name: r["median_gflops"] for name, r in s["a_gemm"]["rates"].items()}
    passes = rep.get("refine_iterations", [])
    fl = kmeans_flops(n, d, k, rep["coarse"]["k"], rep["niter"], rep.get("refine_probe", 16), len(passes),
                      rep["max_points_per_centroid"])
    refine_s = sum(p["time_s"] for p in passes)
    times = {"load_sample": rep.get("load_s"), "coarse (lloyd + group assignment)": rep["coarse"]["train_s"],
             "fine_lloyd": rep["fine"]["train_s"], "refine_passes": refine_s,
             "refine_candidate_search_and_setup": rep["train_s"] - rep["coarse"]["train_s"] - rep["fine"]["train_s"]
             - refine_s}

    def rate(flop, sec):
        return round(flop / sec / 1e9, 2) if sec and sec > 0 else None

    kmeans_phases = {
        "coarse": {"flop": fl["coarse_lloyd"] + fl["coarse_group_assignment"], "seconds": times[
            "coarse (lloyd + group assignment)"]},
        "fine": {"flop": fl["fine_lloyd"], "seconds": times["fine_lloyd"]},
        "refine": {"flop": fl["refine_all_passes"], "seconds": refine_s,
                   "per_pass_seconds": [round(p["time_s"], 2) for p in passes],
                   "per_pass_empty_reseeded": [p["nsplit"] for p in passes],
                   "per_pass_mean_cos": [round(p["mean_cos"], 5) for p in passes]},
        "refine_setup": {"flop": fl["refine_candidate_search"], "seconds": times["refine_candidate_search_and_setup"]},
    }
    # FAISS (coarse, fine, candidate search) runs BLAS on blocks of 4096 queries x 1024 centers; the refinement
    # runs torch matmuls of one coarse group's candidate points x its centers.
    reference = {"coarse": "faiss_blas_block", "fine": "faiss_blas_block", "refine": "refine_group_block",
                 "refine_setup": "faiss_blas_block"}
    for name, v in kmeans_phases.items():
        v["gflop_per_s"] = rate(v["flop"], v["seconds"])
        v["gemm_reference"] = f"{reference[name]} ({gemm[reference[name]]} GFLOP/s)"
        v["fraction_of_gemm_rate"] = (round(v["gflop_per_s"] / gemm[reference[name]], 3)
                                      if v["gflop_per_s"] else None)
    ivf_niter = ivf_default_niter()
    af = assign_flops(n, k, d, arep["nlist"], arep["nprobe"], arep.get("recall_sample", 0), ivf_niter)
    search_s = arep.get("assign_s_this_run")
    assign = {"recall_at_8": arep.get("recall_at_k"), "recall_sample": arep.get("recall_sample"),
              "nlist": arep["nlist"], "nprobe": arep["nprobe"], "ivf_train_niter": ivf_niter,
              "index_build_and_recall_seconds": arep.get("index_build_s"), "search_seconds": search_s,
              "approx_queries_per_s": arep.get("approx_queries_per_s"),
              "exact_queries_per_s": arep.get("exact_queries_per_s"),
              "speedup_vs_exact_on_sample": (arep["approx_queries_per_s"] / arep["exact_queries_per_s"]
                                             if arep.get("exact_queries_per_s") else None),
              "flop": af, "search_gflop_per_s": rate(af["ivf_search_all_rows"], search_s),
              "exact_search_gflop_per_s_on_sample": rate(2.0 * k * d, 1 / arep["exact_queries_per_s"])
              if arep.get("exact_queries_per_s") else None}
    # Arithmetic only: the same FLOP formulas at the paper's sizes (with K equal, a plain n*d ratio).
    pf = kmeans_flops(PAPER["kmeans_rows"], PAPER["d"], PAPER["k"], PAPER["coarse_k"], PAPER["niter"],
                      PAPER["refine_probe"], PAPER["refine_iters"], 100)
    paper_nlist = int(round(4 * np.sqrt(PAPER["k"])))   # the stage's default nlist = 4 sqrt(K), at the paper's K
    paf = assign_flops(PAPER["assign_rows"], PAPER["k"], PAPER["d"], paper_nlist, arep["nprobe"], 0, ivf_niter)
    kmeans_total = fl["coarse_lloyd"] + fl["coarse_group_assignment"] + fl["fine_lloyd"] + fl[
        "refine_candidate_search"] + fl["refine_all_passes"]
    paper_kmeans_total = pf["coarse_lloyd"] + pf["coarse_group_assignment"] + pf["fine_lloyd"] + pf[
        "refine_candidate_search"] + pf["refine_all_passes"]
    kmeans_s = rep["train_s"]
    kmeans_rate = kmeans_total / kmeans_s
    search_rate = af["ivf_search_all_rows"] / search_s if search_s else None
    scaling = {
        "note": "arithmetic, not a measurement: the FLOP formulas above evaluated at the paper's sizes (k-means on a "
                "100M-row sample = 100 per center, assignment of 400M rows, d = 768, K = 1M, refine_iters 10); with "
                "K equal this is the plain ratio of n*d (FLOPs scale with n*k*d). Times divide those FLOPs by the "
                "rate measured here or by the README's assumed GPU rate.",
        "plain_ratio_n_d_kmeans": PAPER["kmeans_rows"] * PAPER["d"] * PAPER["k"] / (n * d * k),
        "plain_ratio_n_d_assign": PAPER["assign_rows"] * PAPER["d"] * PAPER["k"] / (n * d * k),
        "kmeans_flop_ratio_paper_over_here": paper_kmeans_total / kmeans_total,
        "paper_kmeans_pflop": paper_kmeans_total / 1e15,
        "paper_kmeans_pflop_by_phase": {kk: v / 1e15 for kk, v in pf.items() if isinstance(v, float)},
        "paper_kmeans_hours_at_rate_measured_here": paper_kmeans_total / kmeans_rate / 3600,
        "paper_kmeans_minutes_at_readme_gpu_rate": paper_kmeans_total / PAPER["readme_gpu_rate_flops"] / 60,
        "paper_two_level_iteration_pflop_as_coded": (pf["coarse_lloyd"] + pf["fine_lloyd"]) / PAPER["niter"] / 1e15,
        "paper_refine_pass_pflop": pf["refine_pass"] / 1e15,
        "readme_pflop": PAPER["readme_pflop"],
        "paper_assign_ivf_pflop": paf["ivf_search_all_rows"] / 1e15,
        "paper_assign_exact_pflop": paf["exact_top8_all_rows_not_run"] / 1e15,
        "assign_flop_ratio_paper_over_here": paf["ivf_search_all_rows"] / af["ivf_search_all_rows"],
        "paper_assign_ivf_core_hours_at_rate_measured_here": (paf["ivf_search_all_rows"] / search_rate / 3600
                                                              * (os.cpu_count() or 1)) if search_rate else None,
    }
    q = s["a_quality"]
    return {"k": k, "rows": n, "d": d, "coarse_k": rep["coarse"]["k"], "refine_iters": len(passes),
            "refine_probe": rep.get("refine_probe"), "niter": rep["niter"],
            "preset_changes": preset_changes(a, k, passes, fl, af),
            "kmeans": {"wall_s": s["a_kmeans"]["wall_s"], "peak_rss_mb": s["a_kmeans"]["peak_rss_mb"],
                       "train_seconds": kmeans_s, "seconds_by_phase": times, "phases": kmeans_phases,
                       "total_flop": kmeans_total, "gflop_per_s": round(kmeans_rate / 1e9, 2)},
            "assign": {"wall_s": s["a_assign"]["wall_s"], "peak_rss_mb": s["a_assign"]["peak_rss_mb"], **assign},
            "gemm_gflop_per_s_median": gemm,
            "empty_centers": q["all_rows"]["empty_centers"],
            "objective": q["sample"], "sizes_all_rows": q["all_rows"],
            "scaling_to_paper": scaling}


# ---------------------------------------------------------------------------------------------- phase (b)
def _jpeg(w: int, h: int, rng) -> bytes:
    """A photo-like JPEG: a colour gradient, shapes, blur and mild noise (q 85-95)."""
    from PIL import Image, ImageDraw, ImageFilter
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    img = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(max(2, min(w, h) // 20), max(3, min(w, h) // 2)))
        draw.ellipse([x0, y0, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue()


def make_train_data(b: dict, paths: dict) -> dict:
    """LAION-like shards (mlcd.data.make_shards.ShardWriter: JPEG + .txt caption) and top-8 labels over num_classes
    in the cluster stage's label format (mlcd.data.labels + a manifest.json like assign writes)."""
    from mlcd.data.labels import write_shard_labels
    from mlcd.data.make_shards import ShardWriter

    rng = np.random.default_rng(b["seed"])
    sizes = SMALL_SIZES if b["small"] else LAION_SIZES
    per_shard = -(-b["images"] // b["image_shards"])
    writer = ShardWriter(paths["img_shards"], "laion", per_shard, overwrite=True)
    keys_by_shard, nbytes, used = {}, 0, {}
    for i in range(b["images"]):
        w, h = sizes[i % len(sizes)]
        data = _jpeg(w, h, rng)
        nbytes += len(data)
        used[f"{w}x{h}"] = used.get(f"{w}x{h}", 0) + 1
        key = f"{i // per_shard:05d}{i % per_shard:04d}"
        caption = " ".join(rng.choice(CAPTION_WORDS, int(rng.integers(3, 12))))
        writer.write(key, "jpg", data, txt=caption)
        keys_by_shard.setdefault(f"laion-{i // per_shard:06d}", []).append(key)
    man = writer.finish({"synthetic": "LAION-like JPEGs (bench/rehearsal.py)"})
    c, topk = b["classes"], 8
    for stem, keys in keys_by_shard.items():
        labels = np.empty((len(keys), topk), np.int32)
        for r in range(len(keys)):
            row = np.unique(rng.integers(0, c, 4 * topk))
            labels[r] = rng.permutation(row)[:topk]
        sims = -np.sort(-rng.uniform(0.2, 0.9, (len(keys), topk)).astype(np.float32), axis=1)
        write_shard_labels(paths["labels_b"], stem, keys, labels, sims)
    rows = sum(len(v) for v in keys_by_shard.values())
    fileio.write_json(paths["labels_b"] / "manifest.json", {
        "settings": {"topk": topk, "method": "synthetic"}, "complete": True, "num_classes": c, "topk": topk,
        "shards": len(keys_by_shard), "rows": rows,
        "synthetic": f"{topk} distinct class ids per image uniform over {c:,}, similarities sorted descending"})
    return {"images": rows, "shards": man["num_shards"], "mean_jpeg_kb": round(nbytes / rows / 1024, 1),
            "image_sizes": used, "captions": "3-11 random words (.txt)", "num_classes": c, "labels_per_image": topk,
            "pattern": str(paths["img_shards"] / man["urls"])}


def train_overrides(b: dict, paths: dict, pattern: str) -> list[str]:
    out = [f"num_classes={b['classes']}", f"train.global_batch_size={b['batch']}", f"train.total_steps={b['steps']}",
           f"train.ckpt_every={b['ckpt_every']}", f"data.segment_steps={b['ckpt_every']}", "train.log_every=1",
           f"data.num_workers={b['num_workers']}", f"data.train_shards='{pattern}'",
           f"data.labels_dir={paths['labels_b']}", "logging.wandb.mode=disabled", "train.progress_bar=false"]
    if b["model"]:
        out.append(f"model={b['model']}")
    return out


def torchrun_cmd(nproc: int, overrides: list[str], paths: dict) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
            "experiment=laion400m_vitb32", f"out_dir={paths['run']}", *overrides]


def runtime_baseline() -> dict:
    """RSS of a process that has only imported train.py (torch and the library), the floor under every rank."""
    code = ("import json, sys; sys.argv = ['train.py']; import train; from pathlib import Path; "
            "print(json.dumps({l.split(':')[0]: int(l.split()[1]) for l in "
            "Path('/proc/self/status').read_text().splitlines() if l.startswith(('VmHWM', 'RssAnon'))}))")
    p = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    kb = json.loads(p.stdout.strip().splitlines()[-1])
    return {"rss_mb": round(kb["VmHWM"] / 1024, 1), "anon_mb": round(kb["RssAnon"] / 1024, 1)}


def plan_for(world: int, overrides: list[str]) -> dict:
    cmd = [PY, "plan.py", "experiment=laion400m_vitb32", f"world_size={world}", "gpu=cpu",
           *[o for o in overrides if not o.startswith(("logging.", "train.progress_bar"))], "--json"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    plan = json.loads(p.stdout)
    mem = plan["memory_bytes"]
    return {"cmd": show(cmd), "peak_mb": round(mem["peak"] / MB, 1), "persistent_mb": round(mem["persistent"] / MB, 1),
            "peak_phase": plan["peak_phase"], "centers_and_moments_mb": round(
                (mem["centers"] + mem["center_moments"] + mem["center_row_step"]) / MB, 1),
            "rank0_rows": plan["shard"]["rows"], "flop_per_step": plan["flops"]["per_step"]}


def _metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line] if p.exists() else []


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else []


def _dir_mb(p: Path) -> float:
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / MB, 1)


def train_killed(b: dict, paths: dict, overrides: list[str]) -> dict:
    import shutil
    if paths["run"].exists():   # an unfinished attempt of this step: start the 2-rank run over
        shutil.rmtree(paths["run"])
    out = run_cmd(torchrun_cmd(2, overrides, paths), paths["logs"] / "train_2ranks.log", watch=True,
                  kill_when=lambda: bool(_checkpoints(paths["run"])))
    ck = _checkpoints(paths["run"])
    if "killed" not in out:
        raise SystemExit(f"[rehearsal] the 2-rank run ended (exit {out['exit_code']}) before it was killed; "
                         f"checkpoints {[c.name for c in ck]}; log {paths['logs'] / 'train_2ranks.log'}")
    man = json.loads((ck[-1] / "manifest.json").read_text())
    out.update(checkpoints_after_kill=[c.name for c in ck], killed_after_step=man["step"],
               checkpoint_world_size=man["world_size"], checkpoint_mb=_dir_mb(ck[-1]),
               steps_logged=[{k: r.get(k) for k in ("step", "loss", "peak_mem_mb", "images_per_s")}
                             for r in _metrics(paths["run"])])
    return out


def train_resumed(b: dict, paths: dict, overrides: list[str]) -> dict:
    out = run_cmd(torchrun_cmd(3, overrides, paths), paths["logs"] / "train_3ranks.log", watch=True)
    text = (paths["logs"] / "train_3ranks.log").read_text(errors="replace")
    m = re.findall(r"resumed from \S+ \(step (\d+), saved at world size (\d+), now (\d+)\)", text)
    ck = _checkpoints(paths["run"])
    man = json.loads((ck[-1] / "manifest.json").read_text())
    rows = _metrics(paths["run"])
    out.update(resumed_from_step=int(m[-1][0]) if m else None, saved_world_size=int(m[-1][1]) if m else None,
               resumed_world_size=int(m[-1][2]) if m else None, final_step=man["step"],
               final_checkpoint_world_size=man["world_size"], final_checkpoint_mb=_dir_mb(ck[-1]),
               checkpoints=[c.name for c in ck],
               steps_logged=[{k: r.get(k) for k in ("step", "loss", "peak_mem_mb", "images_per_s")} for r in rows],
               last_metrics_step=rows[-1]["step"] if rows else None)
    return out


def export(paths: dict) -> dict:
    out = run_cmd([PY, "-m", "mlcd.export_hf", str(paths["run"]), str(paths["export"])], paths["logs"] / "export.log")
    text = (paths["logs"] / "export.log").read_text(errors="replace")
    m = re.findall(r"verified with transformers (\w+)\.from_pretrained: max \|(\w+) difference\| = (\S+)", text)
    out.update(export_dir=str(paths["export"]), hf_class=m[-1][0] if m else None,
               max_abs_difference=float(m[-1][2]) if m else None,
               files=sorted(p.name for p in paths["export"].iterdir()))
    return out


def probe(b: dict, paths: dict) -> dict:
    cmd = [PY, "eval_linear_probe.py", "backbone.type=hf", f"backbone.path={paths['export']}",
           "datasets=[fashion_mnist]", f"limit_train={b['probe_train']}", f"limit_test={b['probe_test']}",
           f"out_dir={paths['eval']}", f"cache_dir={paths['work'] / 'feature_cache'}", "num_workers=1"]
    if b["probe_lam"] is not None:   # a fixed L2 strength instead of the search
        cmd.append(f"probe.lam={b['probe_lam']}")
    out = run_cmd(cmd, paths["logs"] / "probe.log")
    res = json.loads((paths["eval"] / "results.json").read_text())
    r = res["results"][0]
    out.update(dataset=r.get("dataset"), metrics=r.get("metrics"), failed=res.get("failed"),
               limit_train=b["probe_train"], limit_test=b["probe_test"])
    return out


def phase_b(rec: Record, b: dict, paths: dict) -> dict:
    data = step(rec, "b_data", lambda: make_train_data(b, paths))
    ov = train_overrides(b, paths, data["pattern"])
    plans = step(rec, "b_plan", lambda: {"world_2": plan_for(2, ov), "world_3": plan_for(3, ov),
                                         "runtime_baseline": runtime_baseline()})
    killed = step(rec, "b_train_2ranks_killed", lambda: train_killed(b, paths, ov))
    resumed = step(rec, "b_train_3ranks_resumed", lambda: train_resumed(b, paths, ov))
    exp = step(rec, "b_export", lambda: export(paths))
    pr = step(rec, "b_probe", lambda: probe(b, paths))

    base = plans["runtime_baseline"]

    def vs_plan(run, plan):
        out = []
        for r, (mb, anon) in enumerate(zip(run.get("per_rank_peak_rss_mb", []),
                                           run.get("per_rank_max_polled_anon_rss_mb", []))):
            out.append({"rank": r, "peak_rss_mb": mb, "max_polled_anon_rss_mb": anon,
                        "planned_tensor_peak_mb": plan["peak_mb"],
                        "peak_rss_minus_import_baseline_mb": round(mb - base["rss_mb"], 1),
                        "anon_minus_import_baseline_over_plan": round((anon - base["anon_mb"]) / plan["peak_mb"], 3)})
        return out
    return {"model": b["model"] or "vit_b32 (preset)", "num_classes": b["classes"], "global_batch": b["batch"],
            "total_steps": b["steps"], "ckpt_every": b["ckpt_every"],
            "killed_after_step": killed["killed_after_step"], "kill": killed["killed"],
            "resumed_from_step": resumed["resumed_from_step"], "resumed_world_size": resumed["resumed_world_size"],
            "final_step": resumed["final_step"], "final_checkpoint_world_size": resumed["final_checkpoint_world_size"],
            "per_rank_memory_2ranks": vs_plan(killed, plans["world_2"]),
            "per_rank_memory_3ranks": vs_plan(resumed, plans["world_3"]),
            "import_baseline": base,
            "plan_note": "the planner counts tensor bytes (rank 0 holds the most center rows, the others at most one "
                         "row less); RSS adds the runtime (`import train`: the baseline above, mostly torch's "
                         "libraries), the loader, and on resume the file-backed pages of the memory-mapped old "
                         "shards. Anonymous RSS is polled every 0.2 s (a maximum over the polls, not a kernel peak)",
            "wall_s": {"data": data["wall_s"], "train_2ranks": killed["wall_s"], "train_3ranks": resumed["wall_s"],
                       "export": exp["wall_s"], "probe": pr["wall_s"]},
            "checkpoint_mb": resumed["final_checkpoint_mb"], "export_dir": exp["export_dir"],
            "export_hf_class": exp["hf_class"], "export_max_abs_difference": exp["max_abs_difference"],
            "probe": pr["metrics"]}


# ---------------------------------------------------------------------------------------------- main
def findings(res: dict) -> list[str]:
    out = []
    a, b = res.get("phase_a"), res.get("phase_b")
    if a:
        g = a["gemm_gflop_per_s_median"]
        for name, ph in a["kmeans"]["phases"].items():
            if ph.get("fraction_of_gemm_rate") is not None and ph["fraction_of_gemm_rate"] < 0.25:
                out.append(f"k-means {name}: {ph['gflop_per_s']} GFLOP/s, {ph['fraction_of_gemm_rate']:.2f}x the "
                           f"GEMM rate of its block shape, {ph['gemm_reference']}: slower than its FLOPs")
        if a["assign"].get("search_gflop_per_s"):
            out.append(f"IVF assignment runs at {a['assign']['search_gflop_per_s']} GFLOP/s (list scans are not GEMM; "
                       f"GEMM here {g['faiss_blas_block']} GFLOP/s at FAISS's block shape)")
        out.append(f"empty centers: {a['empty_centers']} of {a['k']:,} ({a['sizes_all_rows']['how']})")
    if b:
        for run, key in (("2 ranks", "per_rank_memory_2ranks"), ("3 ranks (resumed)", "per_rank_memory_3ranks")):
            worst = max((r["anon_minus_import_baseline_over_plan"] for r in b[key]), default=None)
            if worst is not None and worst > 1.2 and b[key][0]["planned_tensor_peak_mb"] >= 1000:  # tensors dominate
                out.append(f"{run}: anonymous RSS above the import baseline is {worst:.2f}x the planner's tensor peak "
                           f"({b[key][0]['planned_tensor_peak_mb']} MB per rank)"
                           + ("; the planner does not count the resume's transient copy of the center-state shard "
                              "loaded from the checkpoint" if "resumed" in run else ""))
    if b and b["kill"].get("ranks_outside_launcher_group"):
        out.append("torchrun starts every rank in a session of its own (start_new_session=True): kill -9 of the "
                   "torchrun process group alone leaves ranks "
                   f"{b['kill']['ranks_outside_launcher_group']} running; the rehearsal kills each rank's group too")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes (a couple of minutes): the test's mode")
    ap.add_argument("--work-dir", default=None, help="data and runs (default data/rehearsal, or data/rehearsal_small)")
    ap.add_argument("--out", default=None, help="the JSON (default bench/results/rehearsal.json; _small with --small)")
    ap.add_argument("--phases", default="ab", help="a (clustering), b (training), or ab")
    for key in ("k", "rows_per_center", "dim", "shards", "refine_iters", "eval_sample", "recall_sample", "classes",
                "batch", "steps", "ckpt_every", "images", "image_shards", "num_workers", "probe_train", "probe_test"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--noise", type=float, default=None)
    ap.add_argument("--probe-lam", type=float, default=None,
                    help="fixed probe L2 strength (default: the search; --small: 1e-3)")
    ap.add_argument("--model", default=None, help="train model override (default: the preset's vit_b32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sizes = dict(SMALL if args.small else FULL)
    for key in sizes:
        v = getattr(args, key, None)
        if v is not None and key != "small":
            sizes[key] = v
    sizes["seed"] = args.seed
    phases = "".join(sorted(set(args.phases)))  # not a size: phases run separately add to one record
    if not set(phases) <= {"a", "b"}:
        raise SystemExit(f"--phases {args.phases!r}: a, b or ab")
    if sizes["batch"] % 6:
        raise SystemExit(f"--batch {sizes['batch']}: must divide by 2 and 3 (the run goes from 2 to 3 ranks)")
    if sizes["steps"] < 2 * sizes["ckpt_every"]:
        raise SystemExit("--steps must be at least 2 x --ckpt-every (killed after the first checkpoint, resumed to "
                         "the end)")
    suffix = "_small" if args.small else ""
    work = Path(args.work_dir or ROOT / "data" / f"rehearsal{suffix}").resolve()
    out = Path(args.out or ROOT / "bench" / "results" / f"rehearsal{suffix}.json").resolve()
    paths = {"work": work, "logs": work / "logs", "tars": work / "a" / "shards", "cluster": work / "a" / "cluster",
             "synthetic": work / "a" / "synthetic", "labels": work / "a" / "cluster" / "labels",
             "img_shards": work / "b" / "shards", "labels_b": work / "b" / "labels", "run": work / "b" / "run",
             "export": work / "b" / "export_hf", "eval": work / "b" / "eval"}
    rec = Record(out, sizes, work)
    rec.data.update(machine={"cpu_count": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(), "mem_total_gb": round(
                                 os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
                    target="every real entry point (cluster.py kmeans + assign at K = 1M, torchrun train.py at 1M "
                           "classes killed and resumed at another world size, export, probe) runs at the mission's "
                           "class count on this machine, resumably, in about an hour (full size)")
    rec.save()
    t0 = time.time()
    if "a" in phases:
        rec.data["phase_a"] = phase_a(rec, sizes, paths)
        rec.save()
    if "b" in phases:
        rec.data["phase_b"] = phase_b(rec, sizes, paths)
        rec.save()
    rec.data["findings"] = findings(rec.data)
    rec.data["wall_s_this_invocation"] = round(time.time() - t0, 1)
    rec.data["wall_s_all_steps"] = round(sum(v.get("wall_s", 0) for v in rec.data["steps"].values()), 1)
    b = rec.data.get("phase_b")
    rec.data["met"] = bool(rec.data.get("phase_a") and b is not None
                           and b["final_step"] == sizes["steps"] and b["resumed_world_size"] == 3)
    rec.save()
    print(json.dumps({k: rec.data[k] for k in ("findings", "wall_s_all_steps", "met")}, indent=2))
    print(f"[rehearsal] wrote {out}")


if __name__ == "__main__":
    main()
