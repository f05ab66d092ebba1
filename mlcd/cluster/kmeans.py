"""Spherical k-means with FAISS: flat, or two-level for very large K (up to ~1M centers).

Flat is FAISS's own Lloyd loop (`faiss.Clustering`, spherical=True, inner-product assignment). Its
cost is 2*n*K*d FLOP per iteration: at K = 1M that is GPU-only work. Two-level turns it into about
2*n*sqrt(K)*d: a coarse k-means with `coarse_k` (default sqrt(K)) centers, then, inside each coarse
group, a k-means whose center count is K split in proportion to the group sizes; optional refinement
passes then fix the group borders. A refinement pass is a Lloyd iteration in which each point only
looks at the centers of its `refine_probe` nearest coarse groups (its own and the neighbours across the
borders): about refine_probe/coarse_k of a flat pass, 2*n*refine_probe*(K/coarse_k)*d FLOP (at K = 1M,
1000 groups, refine_probe 16: 62x cheaper). `refine_probe=0` runs flat FAISS passes over all K instead.

Memory: flat k-means hands FAISS the whole sample as float32. Two-level keeps the sample in the dtype it was
given (float16, as the feature files store it, halves the RAM of a 1M-center run: 100M x 768 is 154 GB instead of
307 GB) and converts to float32 only what one FAISS call or one refinement chunk reads.

Empty clusters: FAISS re-seeds them by splitting a large cluster (`nsplit` in the stats); the final
sizes on the training sample are reported, so any cluster left empty is visible.
"""
import contextlib
import time

import faiss
import numpy as np

MODES = ("flat", "two_level")
COARSE_MAX_POINTS_PER_CENTROID = 2000


def use_gpu(gpu) -> bool:
    """`gpu`: 'auto' (GPU when FAISS sees one), True/False."""
    if gpu in ("auto", None):
        return faiss.get_num_gpus() > 0
    if gpu and faiss.get_num_gpus() == 0:
        raise RuntimeError("kmeans.gpu=true but FAISS sees no GPU (faiss.get_num_gpus() == 0)")
    return bool(gpu)


def flat_ip_index(d: int, gpu: bool, device=None):
    """Exact inner-product index; on GPU either one device (`device`) or replicated on all of them."""
    index = faiss.IndexFlatIP(d)
    if not gpu:
        return index
    if device is None:
        return faiss.index_cpu_to_all_gpus(index)
    return to_gpu(index, device)


def to_gpu(index, device):
    """Move a CPU index to GPU `device`, keeping its GPU resources alive as long as the index."""
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, int(device), index)
    gpu_index.referenced_objects = [res]
    return gpu_index


def search(index, x: np.ndarray, k: int, chunk_size: int = 65536, ids_dtype=np.int64):
    """Top-k by inner product in query chunks (bounded memory); returns (sims f32 [n,k], ids [n,k] as `ids_dtype`)."""
    n = x.shape[0]
    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), ids_dtype)
    for s in range(0, n, chunk_size):
        q = np.ascontiguousarray(x[s:s + chunk_size], dtype=np.float32)
        sims[s:s + len(q)], ids[s:s + len(q)] = index.search(q, k)
    return sims, ids


@contextlib.contextmanager
def _threads_for(flop: float):
    """One OpenMP thread for small FAISS calls: thread start/barrier costs dominate them (100x on a busy box)."""
    before = faiss.omp_get_max_threads()
    small = flop < 2e9
    if small:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        if small:
            faiss.omp_set_num_threads(before)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _faiss_kmeans(x, k, niter, seed, max_ppc, min_ppc, gpu, init=None):
    """One faiss.Clustering run; returns (centers [k,d], per-iteration stats list)."""
    n, d = x.shape
    cp = faiss.ClusteringParameters()
    cp.niter = int(niter)
    cp.seed = int(seed)
    cp.spherical = True
    cp.max_points_per_centroid = int(max_ppc)
    cp.min_points_per_centroid = int(min_ppc)
    cp.verbose = False
    clus = faiss.Clustering(d, k, cp)
    if init is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(init, dtype=np.float32).ravel(), clus.centroids)
    with _threads_for(0 if gpu else 2.0 * min(n, k * max_ppc) * k * d):
        clus.train(x, flat_ip_index(d, gpu))
    centers = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
    st = clus.iteration_stats
    # FAISS's `time` is cumulative; `obj` is the sum over the (sub)sample of the best inner product
    # *before* that iteration's update. Keep per-iteration times.
    stats, prev = [], 0.0
    for i in range(st.size()):
        s = st.at(i)
        stats.append({"obj": s.obj, "time_s": s.time - prev, "imbalance": s.imbalance_factor, "nsplit": s.nsplit})
        prev = s.time
    return centers, stats


def split_k(sizes, k: int) -> np.ndarray:
    """Split k centers over groups in proportion to their sizes (largest remainder).

    Guarantees: sum == k exactly; every non-empty group gets >= 1 and never more than its size;
    empty groups get 0. Needs (#non-empty groups) <= k <= sum(sizes).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    nonempty = sizes > 0
    if not nonempty.sum() <= k <= sizes.sum():
        raise ValueError(f"cannot split k={k} over {int(nonempty.sum())} non-empty groups of {int(sizes.sum())} points")
    ideal = k * sizes / sizes.sum()
    alloc = np.where(nonempty, np.clip(np.floor(ideal), 1, sizes), 0).astype(np.int64)
    rest = ideal - alloc
    while alloc.sum() < k:  # give to the largest remainders first, where a group has room
        room = np.where(alloc < sizes, rest, -np.inf)
        order = np.argsort(-room, kind="stable")[: k - alloc.sum()]
        order = order[np.isfinite(room[order])]
        alloc[order] += 1
        rest[order] -= 1
    while alloc.sum() > k:  # take from the smallest remainders first, never below 1
        room = np.where(alloc > 1, rest, np.inf)
        order = np.argsort(room, kind="stable")[: alloc.sum() - k]
        order = order[np.isfinite(room[order])]
        alloc[order] -= 1
        rest[order] += 1
    return alloc


def train_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 1234, mode: str = "flat",
                 coarse_k: int | None = None, refine_iters: int = 0, refine_probe: int = 16,
                 max_points_per_centroid: int = 256, min_points_per_centroid: int = 1, gpu="auto",
                 progress: bool = False):
    """Spherical k-means of rows `x` [n, d] (L2-normalised; float32, or float16 for two-level) into `k` unit centers.

    Returns (centers float32 [k, d], report dict). `report["iterations"]` holds per-iteration
    `obj` (sum of best cosines over the training sample FAISS used), `mean_cos`, `time_s`,
    `nsplit` (empty clusters re-seeded) for the flat run, or per level for two-level.
    """
    if x.dtype not in (np.float16, np.float32):
        raise ValueError(f"k-means: features must be float16 or float32, got {x.dtype}")
    if mode != "two_level":
        x = np.ascontiguousarray(x, dtype=np.float32)  # FAISS's Clustering reads one float32 array
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means: {n} points cannot make k={k} centers")
    gpu = use_gpu(gpu)
    t0 = time.time()
    rep = {"mode": mode, "k": k, "n": n, "d": d, "dtype": str(x.dtype), "niter": niter, "seed": seed, "gpu": gpu,
           "max_points_per_centroid": max_points_per_centroid}
    if mode == "flat":
        centers, stats = _faiss_kmeans(x, k, niter, seed, max_points_per_centroid, min_points_per_centroid, gpu)
        rep["iterations"] = _with_mean(stats, min(n, k * max_points_per_centroid))
    elif mode == "two_level":
        centers, coarse, owner = _two_level(x, k, niter, seed, coarse_k, max_points_per_centroid,
                                            min_points_per_centroid, gpu, rep, progress)
        if refine_probe < 0:
            raise ValueError(f"kmeans.refine_probe must be >= 0 (0 = flat passes), got {refine_probe}")
        if refine_iters > 0 and refine_probe > 0:
            centers, rep["refine_iterations"] = _local_refine(x, centers, coarse, owner, refine_probe,
                                                              refine_iters, gpu, progress, seed)
        elif refine_iters > 0:
            centers, stats = _faiss_kmeans(_f32(x), k, refine_iters, seed, max_points_per_centroid,
                                           min_points_per_centroid, gpu, init=centers)
            rep["refine_iterations"] = _with_mean(stats, min(n, k * max_points_per_centroid))
        rep["refine_probe"] = int(refine_probe)
    else:
        raise ValueError(f"kmeans.mode must be one of {list(MODES)}, got {mode!r}")
    rep["train_s"] = time.time() - t0
    return _normalize(centers).astype(np.float32), rep


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _with_mean(stats, n_used):
    return [{**s, "mean_cos": s["obj"] / n_used} for s in stats]


def _two_level(x, k, niter, seed, coarse_k, max_ppc, min_ppc, gpu, rep, progress):
    n, d = x.shape
    coarse_k = int(coarse_k or max(1, round(np.sqrt(k))))
    coarse_k = min(coarse_k, k)
    t0 = time.time()
    # The coarse level trains on up to COARSE_MAX_POINTS_PER_CENTROID points per group (FAISS contrib's choice): its
    # sqrt(k) centroids are cheap, and a coarse partition trained on 256 per centroid cost the final objective 7%
    # (bench/cluster.py section d, isotropic data).
    # We draw that sample ourselves, so that only it is converted to float32.
    coarse_ppc = max(max_ppc, COARSE_MAX_POINTS_PER_CENTROID)
    m = min(n, coarse_k * coarse_ppc)
    xc = x if m == n else x[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
    coarse, stats = _faiss_kmeans(_f32(xc), coarse_k, niter, seed, coarse_ppc, min_ppc, gpu)
    del xc
    rep["coarse"] = {"k": coarse_k, "iterations": _with_mean(stats, m)}
    _, group = search(_index_with(coarse, gpu), x, 1)
    group = group[:, 0]
    sizes = np.bincount(group, minlength=coarse_k)
    alloc = split_k(sizes, k)
    rep["coarse"].update(train_s=time.time() - t0, group_size_min=int(sizes.min()), group_size_max=int(sizes.max()),
                         k_per_group_min=int(alloc[sizes > 0].min()), k_per_group_max=int(alloc.max()))
    t1 = time.time()
    order = np.argsort(group, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    groups = range(coarse_k)
    if progress:
        from tqdm import tqdm
        groups = tqdm(groups, desc="kmeans fine level", unit="group")
    for g in groups:
        kg = int(alloc[g])
        if kg == 0:
            continue
        xg = _f32(x[order[bounds[g]:bounds[g + 1]]])
        if kg == len(xg):  # as many centers as points: the points are the centers
            out.append(xg)
        elif kg == 1:
            out.append(xg.mean(0, keepdims=True))
        else:
            c, _ = _faiss_kmeans(xg, kg, niter, seed + 1 + g, max_ppc, min_ppc, gpu)
            out.append(c)
    rep["fine"] = {"train_s": time.time() - t1, "groups": int((alloc > 0).sum())}
    owner = np.repeat(np.arange(coarse_k), alloc)      # coarse group of each fine center
    return _normalize(np.concatenate(out)).astype(np.float32), coarse, owner


def _local_refine(x, centers, coarse, owner, probe, iters, gpu, progress, seed: int, chunk: int = 65536):
    """Lloyd passes where each point competes only for the centers of its `probe` nearest coarse groups.

    The point -> groups lists are fixed once (from the coarse centers); every pass assigns each point to
    its best candidate, then moves every center to the normalised mean of its points. A center that wins
    no point is re-seeded as FAISS does: it takes half of a big cluster (picked with probability
    proportional to size - 1), starting from a slightly perturbed copy of its center, and joins that
    cluster's coarse group. Returns (centers, per-pass stats like FAISS's: `obj` is the sum of best
    cosines before that pass's update, `nsplit` the centers re-seeded).
    """
    import torch

    dev = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    n, d = x.shape
    g_count = len(coarse)
    probe = min(int(probe), g_count)
    # The candidate lists: for each coarse group, the points that probe it. int32 ids, and the int64 temporaries
    # freed once built: at 100M points x probe 16 they are 6.4 GB held instead of 38 GB.
    _, near = search(_index_with(coarse, gpu), x, probe, ids_dtype=np.int32)   # [n, probe] coarse groups per point
    splits = np.cumsum(np.bincount(near.ravel(), minlength=g_count))[:-1]
    by_group = np.argsort(near.ravel(), kind="stable")
    del near
    by_group //= probe
    point_ids = by_group.astype(np.int32)
    del by_group
    point_lists = [torch.from_numpy(p) for p in np.split(point_ids, splits)]
    owner = np.asarray(owner).copy()
    rng = np.random.default_rng(seed)
    split_sign = torch.from_numpy(np.where(np.arange(d) % 2 == 0, 1.0, -1.0).astype(np.float32)) / 1024
    xt = torch.from_numpy(x)
    c = torch.from_numpy(np.ascontiguousarray(centers, dtype=np.float32)).clone()
    stats = []
    passes = range(iters)
    if progress:
        from tqdm import tqdm
        passes = tqdm(passes, desc=f"kmeans refine (probe {probe})", unit="pass")
    for _ in passes:
        t0 = time.time()
        order = np.argsort(owner, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=g_count))])
        best = torch.full((n,), -np.inf)
        best_id = torch.zeros(n, dtype=torch.int64)
        for g in range(g_count):
            ids = torch.from_numpy(order[bounds[g]:bounds[g + 1]])
            pts = point_lists[g]
            if len(ids) == 0 or len(pts) == 0:
                continue
            val, arg = (xt[pts].to(dev, torch.float32) @ c[ids].to(dev).T).max(1)
            val, arg = val.cpu(), arg.cpu()
            win = val > best[pts]
            best[pts[win]] = val[win]
            best_id[pts[win]] = ids[arg[win]]
        sums = torch.zeros_like(c)
        for s in range(0, n, chunk):                              # float32 one chunk at a time
            sums.index_add_(0, best_id[s:s + chunk], xt[s:s + chunk].float())
        counts = torch.bincount(best_id, minlength=len(c)).numpy().astype(np.float64)
        moved = counts > 0
        c[moved] = torch.nn.functional.normalize(sums[moved], dim=1)
        empty = np.flatnonzero(~moved)
        for j in empty:                                            # FAISS's split of a big cluster
            donor = rng.choice(len(c), p=np.maximum(counts - 1, 0) / np.maximum(counts - 1, 0).sum())
            c[j], c[donor] = c[donor] * (1 + split_sign), c[donor] * (1 - split_sign)
            counts[j] = counts[donor] / 2
            counts[donor] -= counts[j]
            owner[j] = owner[donor]
        stats.append({"obj": float(best.double().sum()), "time_s": time.time() - t0, "nsplit": int(len(empty)),
                      "mean_cos": float(best.double().mean())})
    return torch.nn.functional.normalize(c, dim=1).numpy(), stats


def _index_with(centers, gpu, device=None):
    index = flat_ip_index(centers.shape[1], gpu, device)
    index.add(np.ascontiguousarray(centers, dtype=np.float32))
    return index


def size_stats(x: np.ndarray, centers: np.ndarray, gpu="auto", chunk_size: int = 65536):
    """Assign `x` to its nearest center; return (sizes int64 [K], summary dict) for the report."""
    k = centers.shape[0]
    sims, ids = search(_index_with(centers, use_gpu(gpu)), x, 1, chunk_size)
    sizes = np.bincount(ids[:, 0], minlength=k)
    mean_cos = float(sims[:, 0].astype(np.float64).mean())
    pct = [0, 1, 5, 25, 50, 75, 95, 99, 100]
    summary = {
        "n": int(len(x)), "k": int(k),
        "mean_cos": mean_cos,
        "objective_eq2": 2.0 - 2.0 * mean_cos,  # mean ||e - w||^2 for unit e, w (paper Eq. 2)
        "empty": int((sizes == 0).sum()),
        "small": {f"<{t}": int((sizes < t).sum()) for t in (2, 5, 10)},
        "size_percentiles": {str(p): float(v) for p, v in zip(pct, np.percentile(sizes, pct))},
        "size_mean": float(sizes.mean()),
    }
    return sizes, summary


# ---- stage ---------------------------------------------------------------------------------------

KMEANS_KEYS = ("k", "niter", "seed", "max_points_per_centroid", "min_points_per_centroid", "mode", "coarse_k",
               "refine_iters", "refine_probe")


def run(cfg, cfg_dict: dict, stems: list[str]) -> None:
    """Stage 2, rank 0 only: sample features, train, write centers.npy + kmeans_report.json + PNG."""
    from pathlib import Path

    from mlcd import fileio
    from mlcd.cluster.files import RESUME_ELSEWHERE, load_json, sample_rows, sha256
    from mlcd.cluster.report import plot_sizes, update_manifest
    from mlcd.validate import refuse_other_settings

    out, kc = Path(cfg.out_dir), cfg.kmeans
    fman_path = out / "features" / "manifest.json"
    fman = load_json(fman_path)
    if not fman.get("complete"):
        raise ValueError(f"{fman_path}: feature extraction is missing or incomplete; run stages=[extract] first")
    settings = {key: kc[key] for key in KMEANS_KEYS}
    settings["features_rows"] = fman["rows"]
    man_path = out / "manifest.json"
    old = load_json(man_path).get("kmeans")
    if (out / "centers.npy").exists() and old is not None:
        refuse_other_settings(old["settings"], settings, f"{man_path.parent} (centers)", RESUME_ELSEWHERE,
                              only_shared=True)
        print(f"kmeans: {out / 'centers.npy'} exists with the same settings; skipping")
        return
    k, mppc = int(kc.k), int(kc.max_points_per_centroid)
    t0 = time.time()
    # Two-level reads its sample piecewise, so it stays in the files' dtype (float16: half the RAM); the FAISS
    # calls that read the whole sample at once (flat, or flat refinement passes) need one float32 array.
    whole_f32 = kc.mode != "two_level" or (int(kc.refine_iters) > 0 and int(kc.refine_probe) == 0)
    x = sample_rows(out / "features", stems, k * mppc, int(kc.seed), dtype=np.float32 if whole_f32 else None)
    load_s = time.time() - t0
    print(f"kmeans: {len(x)} of {fman['rows']} feature rows (d={x.shape[1]}, {x.dtype}, {x.nbytes / 2**30:.2f} GiB) "
          f"-> k={k}, mode={kc.mode}")
    centers, rep = train_kmeans(x, k, niter=int(kc.niter), seed=int(kc.seed), mode=kc.mode, coarse_k=kc.coarse_k,
                                refine_iters=int(kc.refine_iters), refine_probe=int(kc.refine_probe),
                                max_points_per_centroid=mppc,
                                min_points_per_centroid=int(kc.min_points_per_centroid), gpu=kc.gpu, progress=True)
    rep["load_s"] = load_s
    if kc.final_stats:  # one more assignment pass over the sample: true final objective and sizes
        t1 = time.time()
        sizes, rep["final"] = size_stats(x, centers, kc.gpu)
        rep["final"]["time_s"] = time.time() - t1
        plot_sizes(sizes, out / "cluster_sizes.png", f"k={k} ({kc.mode}), {len(x)} points")
        print(f"kmeans: mean cos {rep['final']['mean_cos']:.4f}, empty {rep['final']['empty']}, "
              f"sizes p1/p50/p99 {rep['final']['size_percentiles']['1']:.0f}/"
              f"{rep['final']['size_percentiles']['50']:.0f}/{rep['final']['size_percentiles']['99']:.0f}")
    fileio.write_json(out / "kmeans_report.json", rep)
    fileio.save_npy(out / "centers.npy", centers)
    update_manifest(out, cfg_dict, "kmeans", {"settings": settings, "k": k, "d": int(centers.shape[1]),
                                              "sample_rows": int(len(x)), "centers_sha256": sha256(out / "centers.npy"),
                                              "train_s": rep["train_s"], "final": rep.get("final")})
    print(f"kmeans: wrote {out / 'centers.npy'} in {time.time() - t0:.1f}s")
