"""Top-k center assignment (the multi-labels): exact inner product, or an approximate index over the centers.

Exact is `IndexFlatIP` (BLAS sgemm + heap on CPU; a GPU flat index when FAISS sees a GPU). The two
approximate indexes are for CPU-only fleets, at a recall cost that `recall_at_k` measures on a sample
against exact search and writes to the report:
- IVF puts the K centers in `nlist` cells and scans `nprobe` cells per image (GPU too).
- HNSW (CPU only) walks a proximity graph over the centers (`hnsw_m` links per node, `ef_search`
  candidates per query). On centers with little cluster structure, where IVF's cells cut through the
  neighbourhoods, it keeps recall@8 >= 0.95 at several times exact's speed (bench/cluster.py, c).
Either index is built once (rank 0) and saved beside the labels, so every rank and every resume uses
the same one (a multi-threaded HNSW build is not deterministic). Rows for which the index finds fewer
than k centers are redone exactly, so every row gets k labels.
"""
import faiss
import numpy as np

from mlcd.cluster.kmeans import flat_ip_index, search, to_gpu

METHODS = ("exact", "ivf", "hnsw")


def build_index(centers: np.ndarray, method: str = "exact", nlist: int | None = None, nprobe: int = 32,
                gpu: bool = False, device=None, seed: int = 1234, hnsw_m: int = 32, ef_search: int = 128,
                ef_construction: int = 200):
    """An index over the unit `centers` [K, d] answering inner-product top-k."""
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    k_centers, d = centers.shape
    if method == "exact":
        index = flat_ip_index(d, gpu, device)
        index.add(centers)
        return index
    if method == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.add(centers)
        index.hnsw.efSearch = int(ef_search)
        return index
    if method != "ivf":
        raise ValueError(f"assign.method must be one of {list(METHODS)}, got {method!r}")
    nlist = int(nlist or max(1, round(4 * np.sqrt(k_centers))))
    if nlist > k_centers:
        raise ValueError(f"assign.nlist={nlist} exceeds the number of centers {k_centers}")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.cp.min_points_per_centroid = 1  # the centers are the whole training set; no warning spam
    index.cp.spherical = True
    index.train(centers)
    index.add(centers)
    index.nprobe = int(nprobe)
    if gpu:
        index = to_gpu(index, device or 0)
        index.nprobe = int(nprobe)
    return index


def topk(index, x: np.ndarray, k: int, chunk_size: int = 65536, exact_index=None):
    """(labels int32 [n,k], sims float32 [n,k]) sorted by decreasing similarity.

    `exact_index` (for IVF): rows with a missing result (-1) are searched again exactly.
    Returns also the number of such rows.
    """
    sims, ids = search(index, x, k, chunk_size)
    missing = np.flatnonzero((ids < 0).any(1))
    if len(missing):
        if exact_index is None:
            raise RuntimeError(f"{len(missing)} rows got fewer than k={k} results and no exact fallback was given")
        sims[missing], ids[missing] = search(exact_index, x[missing], k, chunk_size)
    return ids.astype(np.int32), sims, len(missing)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over rows of |approx top-k ∩ exact top-k| / k."""
    hits = (approx_ids[:, :, None] == exact_ids[:, None, :]).any(2).sum()
    return float(hits) / exact_ids.size


# ---- stage ---------------------------------------------------------------------------------------

def run(cfg, cfg_dict: dict, urls: list[str], device_id=None) -> None:
    """Stage 3, every rank: labels for the shards r, r+W, ... (skipping shards already labelled)."""
    import time
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from mlcd import dist, fileio
    from mlcd.cluster.files import RESUME_ELSEWHERE, load_json, read_features, sample_rows, versions
    from mlcd.cluster.kmeans import use_gpu
    from mlcd.cluster.report import update_manifest
    from mlcd.validate import refuse_other_settings
    from mlcd.data.labels import has_shard_labels, shard_stem, write_shard_labels

    out, ac = Path(cfg.out_dir), cfg.assign
    labels_dir = Path(ac.labels_dir) if ac.labels_dir else out / "labels"
    stems = [shard_stem(u) for u in urls]
    kman = load_json(out / "manifest.json").get("kmeans")
    if not (out / "centers.npy").exists() or kman is None:
        raise FileNotFoundError(f"{out / 'centers.npy'}: no centers; run stages=[kmeans] first")
    centers = np.load(out / "centers.npy")
    k = int(ac.topk)
    if k > len(centers):
        raise ValueError(f"assign.topk={k} exceeds the number of centers {len(centers)}")
    settings = {"topk": k, "method": ac.method, "centers_sha256": kman["centers_sha256"]}
    if ac.method == "ivf":
        settings.update(nlist=ac.nlist, nprobe=int(ac.nprobe))
    elif ac.method == "hnsw":
        settings.update(hnsw_m=int(ac.hnsw_m), ef_search=int(ac.ef_search), ef_construction=int(ac.ef_construction))
    man_path = labels_dir / "manifest.json"
    if dist.is_main():
        labels_dir.mkdir(parents=True, exist_ok=True)
        old = load_json(man_path)
        if old and any(has_shard_labels(labels_dir, s) for s in stems):  # a failed start blocks nothing
            refuse_other_settings(old.get("settings", {}), settings, f"{man_path.parent} (labels)", RESUME_ELSEWHERE,
                                  only_shared=True)
        if not old.get("complete"):
            fileio.write_json(man_path, {**old, "settings": settings, "complete": False, "config": cfg_dict})
    dist.barrier()

    gpu = use_gpu(cfg.kmeans.gpu)
    t0 = time.time()
    exact = build_index(centers, "exact", gpu=gpu, device=device_id)
    index, report = exact, {"method": ac.method, "topk": k, "num_centers": int(len(centers))}
    if ac.method in ("ivf", "hnsw"):
        import faiss
        path = labels_dir / f"{ac.method}.index"  # built once on rank 0: every rank (and resume) uses the same one
        if dist.is_main() and not path.exists():
            cpu_index = build_index(centers, ac.method, ac.nlist, int(ac.nprobe), gpu=False, seed=int(cfg.kmeans.seed),
                                    hnsw_m=int(ac.hnsw_m), ef_search=int(ac.ef_search),
                                    ef_construction=int(ac.ef_construction))
            faiss.write_index(cpu_index, str(path) + ".tmp")
            Path(str(path) + ".tmp").replace(path)
        dist.barrier()
        index = faiss.read_index(str(path))
        if ac.method == "ivf":
            index.nprobe = int(ac.nprobe)
            report.update(nlist=int(index.nlist), nprobe=int(ac.nprobe))
            if gpu:
                index = to_gpu(index, device_id or 0)
                index.nprobe = int(ac.nprobe)
        else:
            index.hnsw.efSearch = int(ac.ef_search)
            report.update(hnsw_m=int(ac.hnsw_m), ef_search=int(ac.ef_search), ef_construction=int(ac.ef_construction))
        if dist.is_main() and ac.recall_sample:
            x = sample_rows(out / "features", stems, int(ac.recall_sample), int(cfg.seed))
            t1 = time.time()
            approx, _, _ = topk(index, x, k, int(ac.chunk_size), exact)
            t2 = time.time()
            ref, _, _ = topk(exact, x, k, int(ac.chunk_size))
            t3 = time.time()
            report.update(recall_at_k=recall_at_k(approx, ref), recall_sample=int(len(x)),
                          approx_queries_per_s=len(x) / max(t2 - t1, 1e-9),
                          exact_queries_per_s=len(x) / max(t3 - t2, 1e-9))
            print(f"assign: {ac.method} recall@{k} = {report['recall_at_k']:.4f} on {len(x)} sampled images "
                  f"({report['approx_queries_per_s']:.0f} vs {report['exact_queries_per_s']:.0f} queries/s exact)")
    report["index_build_s"] = time.time() - t0

    mine = [(u, s) for i, (u, s) in enumerate(zip(urls, stems))
            if i % dist.world_size() == dist.rank() and not has_shard_labels(labels_dir, s)]
    rows = fallback = 0
    t0 = time.time()
    bar = tqdm(mine, desc="assign", unit="shard", disable=not dist.is_main())
    for url, stem in bar:
        keys, feats = read_features(out / "features", stem)
        labels, sims, missing = topk(index, feats.astype(np.float32), k, int(ac.chunk_size), exact)
        write_shard_labels(labels_dir, stem, keys, labels, sims)
        rows, fallback = rows + len(keys), fallback + missing
        bar.set_postfix(img_s=f"{rows / max(time.time() - t0, 1e-9):.0f}")
    dev = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")  # NCCL: CUDA tensors
    totals = dist.all_reduce_sum(torch.tensor([rows, fallback], dtype=torch.float64, device=dev)).cpu()
    dist.barrier()
    if dist.is_main():
        counts = [len((labels_dir / f"{s}.keys.txt").read_text(encoding="utf-8").splitlines()) for s in stems]
        report.update(rows_this_run=int(totals[0]), exact_fallback_rows_this_run=int(totals[1]),
                      assign_s_this_run=time.time() - t0)
        fileio.write_json(labels_dir / "assign_report.json", report)
        fileio.write_json(man_path, {"settings": settings, "complete": True, "config": cfg_dict, "versions": versions(),
                             "num_classes": int(len(centers)), "topk": k, "shards": len(stems),
                             "rows": int(sum(counts)), "report": report,
                             "centers": str((out / "centers.npy").resolve())})
        update_manifest(out, cfg_dict, "assign", {"labels_dir": str(labels_dir), "rows": int(sum(counts)),
                                                  "shards": len(stems)})
        print(f"assign: {sum(counts)} images in {len(stems)} shards labelled -> {labels_dir}")
