"""Clustering: k-means recovers known mixtures, top-k matches NumPy, IVF recall is reported truthfully.

Subprocess tests (extraction, SIGKILL + resume, torchrun) are in tests/test_cluster_dist.py.
"""
from pathlib import Path

import faiss
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from sklearn.metrics import normalized_mutual_info_score

from mlcd.cluster import assign, kmeans
from mlcd.cluster.files import load_json, write_features
from mlcd import fileio
from mlcd.cluster.kmeans import size_stats, split_k, train_kmeans
from mlcd.data.labels import read_shard_labels

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs" / "cluster")


def sphere_mixture(n_comp, per, d, noise, seed):
    """Points around `n_comp` random unit means, L2-normalised; returns (x f32, true component)."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n_comp, d))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_comp), per)
    x = mu[y] + noise * rng.standard_normal((len(y), d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def nearest(x, c):
    return np.argmax(x.astype(np.float64) @ c.astype(np.float64).T, axis=1)


def numpy_topk(x, c, k):
    s = x.astype(np.float64) @ c.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def assert_same_topk(ids, sims, ref_ids, ref_sims, atol=1e-5):
    """Equal ids, except that a swap is allowed between entries whose exact similarities tie within atol."""
    np.testing.assert_allclose(sims, ref_sims, atol=atol)
    diff = ids != ref_ids
    if diff.any():  # any mismatch must be a near-tie in the float64 reference
        rows = np.flatnonzero(diff.any(1))
        for r in rows:
            j = np.flatnonzero(diff[r])
            gaps = np.abs(np.diff(ref_sims[r]))
            assert all(gaps[max(i - 1, 0):i + 1].min() < atol for i in j), (r, ids[r], ref_ids[r])
    assert diff.mean() < 0.01


# ---- k-means -------------------------------------------------------------------------------------

def test_split_k_properties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = rng.integers(1, 30)
        sizes = rng.integers(0, 50, g) * (rng.random(g) < 0.8)
        sizes[0] = max(sizes[0], 1)
        nonempty = int((sizes > 0).sum())
        k = int(rng.integers(nonempty, sizes.sum() + 1))
        a = split_k(sizes, k)
        assert a.sum() == k
        assert np.all(a[sizes == 0] == 0) and np.all(a[sizes > 0] >= 1) and np.all(a <= sizes)
    a = split_k([300, 100, 100, 500], 10)  # exactly proportional when it can be
    assert a.tolist() == [3, 1, 1, 5]
    with pytest.raises(ValueError, match="cannot split"):
        split_k([5, 5, 5], 2)  # fewer centers than groups
    with pytest.raises(ValueError, match="cannot split"):
        split_k([1, 2], 4)  # more centers than points


def test_flat_kmeans_recovers_mixture():
    x, y = sphere_mixture(40, 150, 32, noise=0.08, seed=1)
    centers, rep = train_kmeans(x, 40, niter=25, seed=3, mode="flat")
    assert centers.shape == (40, 32) and centers.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 1, atol=1e-5)
    assert normalized_mutual_info_score(y, nearest(x, centers)) > 0.9
    its = rep["iterations"]
    assert 1 <= len(its) <= 25 and its[-1]["mean_cos"] >= its[0]["mean_cos"]  # FAISS stops once converged
    # the report's final statistics agree with an independent float64 assignment
    sizes, summ = size_stats(x, centers, gpu=False)
    lab = nearest(x, centers)
    np.testing.assert_array_equal(sizes, np.bincount(lab, minlength=40))
    ref_cos = (x.astype(np.float64) * centers[lab]).sum(1).mean()
    assert abs(summ["mean_cos"] - ref_cos) < 1e-5
    assert summ["empty"] == int((sizes == 0).sum())
    assert abs(summ["objective_eq2"] - np.mean(np.sum((x - centers[lab]) ** 2, 1))) < 1e-4


@pytest.mark.parametrize("refine,probe", [(0, 8), (2, 2), (2, 0)])
def test_two_level_kmeans_recovers_mixture(refine, probe):
    x, y = sphere_mixture(64, 100, 32, noise=0.08, seed=2)
    centers, rep = train_kmeans(x, 64, niter=20, seed=5, mode="two_level", coarse_k=8, refine_iters=refine,
                                refine_probe=probe)
    assert centers.shape == (64, 32)
    assert rep["coarse"]["k"] == 8 and rep["fine"]["groups"] == 8
    assert normalized_mutual_info_score(y, nearest(x, centers)) > 0.9
    assert len(rep.get("refine_iterations", [])) == refine


@pytest.mark.parametrize("probe", [1, 3, 6])
def test_local_refine_equals_masked_lloyd(probe):
    """Local refinement == Lloyd passes in NumPy where point i may only pick centers owned by its
    `probe` nearest coarse groups (probe = all groups: plain Lloyd)."""
    from mlcd.cluster.kmeans import _local_refine
    g = np.random.default_rng(3)
    x = g.standard_normal((600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    coarse = x[:6] + 0.1 * g.standard_normal((6, 16)).astype(np.float32)
    src = g.choice(600, 40, replace=False)
    owner = (x[src] @ coarse.T).argmax(1)              # a center's source point can always reach it
    centers = x[src] + 0.01 * g.standard_normal((40, 16)).astype(np.float32)
    got, stats = _local_refine(x, centers, coarse, owner, probe, 3, gpu=False, progress=False, seed=1234)

    near = np.argsort(-(x.astype(np.float64) @ coarse.T), axis=1)[:, :probe]
    allowed = (owner[None, :, None] == near[:, None, :]).any(2)            # [n, K]
    c = centers.astype(np.float64)
    for it in range(3):
        sims = np.where(allowed, x @ c.T, -np.inf)
        lab = sims.argmax(1)
        assert abs(stats[it]["mean_cos"] - sims.max(1).mean()) < 1e-5
        for j in range(len(c)):
            if (lab == j).any():
                m = x[lab == j].sum(0)
                c[j] = m / np.linalg.norm(m)
        assert stats[it]["nsplit"] == len(c) - len(np.unique(lab)) == 0   # (splits: the next test)
    np.testing.assert_allclose(got, c, atol=1e-5)


def test_local_refine_reseeds_empty_centers():
    """A center no point picks (here: the antipode of the data) takes over half of a big cluster."""
    from mlcd.cluster.kmeans import _local_refine
    x, y = sphere_mixture(4, 50, 8, noise=0.05, seed=4)
    one_each = [int(np.flatnonzero(y == c)[0]) for c in range(4)]
    coarse = x[one_each]
    centers = np.concatenate([x[one_each], -x[one_each[:1]]])
    owner = np.array([0, 1, 2, 3, 0])
    got, stats = _local_refine(x, centers, coarse, owner, 4, 5, gpu=False, progress=False, seed=1234)
    assert stats[0]["nsplit"] == 1
    assert (x @ got[4]).max() > 0.9                                  # it moved into the data
    assert stats[-1]["mean_cos"] >= stats[0]["mean_cos"]


def test_kmeans_rejects_too_few_points():
    with pytest.raises(ValueError, match="cannot make k=10"):
        train_kmeans(np.eye(5, 4, dtype=np.float32), 10)
    with pytest.raises(ValueError, match="kmeans.mode must be one of"):
        train_kmeans(sphere_mixture(2, 10, 4, 0.1, 0)[0], 2, mode="hier")


# ---- assignment ----------------------------------------------------------------------------------

def test_exact_topk_matches_numpy():
    rng = np.random.default_rng(4)
    c = rng.standard_normal((300, 48)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x, _ = sphere_mixture(30, 40, 48, noise=0.5, seed=5)
    index = assign.build_index(c, "exact")
    ids, sims, missing = assign.topk(index, x, 8, chunk_size=333)  # chunking must not matter
    assert ids.dtype == np.int32 and sims.dtype == np.float32 and missing == 0
    ref_ids, ref_sims = numpy_topk(x, c, 8)
    assert_same_topk(ids, sims, ref_ids, ref_sims)
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_recall_at_k_definition():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    e = np.array([[3, 2, 9], [7, 8, 0]])
    assert assign.recall_at_k(a, e) == pytest.approx(2 / 6)


# ---- stages (in process, on synthetic feature files) ---------------------------------------------

def _features(out, n_shards=3, per=400, seed=0):
    """Fake extracted features (a sphere mixture) as the extract stage would leave them."""
    x, y = sphere_mixture(32, n_shards * per // 32, 24, noise=0.15, seed=seed)
    fdir = Path(out) / "features"
    fdir.mkdir(parents=True)
    urls = []
    for s in range(n_shards):
        stem = f"shard-{s:06d}"
        part = x[s * per:(s + 1) * per]
        write_features(fdir, stem, part.astype(np.float16), [f"{stem}/{i:05d}" for i in range(len(part))], {})
        urls.append(f"/nowhere/{stem}.tar")
    fileio.write_json(fdir / "manifest.json", {"complete": True, "rows": int(len(x)), "settings": {}})
    return urls, x


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose("cluster", overrides=[f"out_dir={out}", "shards=unused", "kmeans.gpu=false", *overrides])


def _load_all(out, urls, sub="labels"):
    rows = [read_shard_labels(Path(out) / sub, Path(u).stem) for u in urls]
    return (np.concatenate([r[1] for r in rows]), np.concatenate([r[2] for r in rows]))


@pytest.mark.slow
def test_kmeans_and_exact_assign_stages(tmp_path):
    urls, _ = _features(tmp_path)
    stems = [Path(u).stem for u in urls]
    cfg = _cfg(tmp_path, "kmeans.k=48", "kmeans.mode=flat", "kmeans.niter=10", "kmeans.max_points_per_centroid=10")
    kmeans.run(cfg, {}, stems)
    centers = np.load(tmp_path / "centers.npy")
    rep = load_json(tmp_path / "kmeans_report.json")
    assert centers.shape == (48, 24) and rep["n"] == 480  # sample = k * max_points_per_centroid
    assert rep["final"]["n"] == 480 and (tmp_path / "cluster_sizes.png").stat().st_size > 1000
    man = load_json(tmp_path / "manifest.json")
    assert man["kmeans"]["k"] == 48 and "faiss" in man["versions"]
    kmeans.run(cfg, {}, stems)  # finished: skipped, centers untouched
    assert np.array_equal(np.load(tmp_path / "centers.npy"), centers)
    with pytest.raises(ValueError, match="other settings"):
        kmeans.run(_cfg(tmp_path, "kmeans.k=40", "kmeans.mode=flat"), {}, stems)

    assign.run(cfg, {}, urls)
    labels, sims = _load_all(tmp_path, urls)
    feats = np.concatenate([np.load(tmp_path / "features" / f"{s}.npy") for s in stems]).astype(np.float32)
    ref_ids, ref_sims = numpy_topk(feats, centers, 8)
    assert_same_topk(labels, sims, ref_ids, ref_sims)
    lman = load_json(tmp_path / "labels" / "manifest.json")
    assert lman["complete"] and lman["num_classes"] == 48 and lman["rows"] == len(feats)


@pytest.mark.slow
def test_two_level_stage_keeps_the_float16_sample_and_equals_the_float32_run(tmp_path):
    """Two-level k-means reads the float16 feature files without a float32 copy of the sample (half the RAM at
    1M centers), and gives the centers the same run on a float32 copy gives: the sample is only converted
    piecewise, to the same float32 values."""
    from mlcd.cluster.files import sample_rows
    urls, _ = _features(tmp_path)
    stems = [Path(u).stem for u in urls]
    settings = ["kmeans.k=64", "kmeans.mode=two_level", "kmeans.coarse_k=8", "kmeans.niter=8",
                "kmeans.max_points_per_centroid=10", "kmeans.refine_iters=2", "kmeans.refine_probe=3"]
    kmeans.run(_cfg(tmp_path, *settings), {}, stems)
    rep = load_json(tmp_path / "kmeans_report.json")
    assert rep["dtype"] == "float16" and rep["n"] == 640
    x32 = sample_rows(tmp_path / "features", stems, 640, 1234, dtype=np.float32)
    ref, ref_rep = train_kmeans(x32, 64, niter=8, seed=1234, mode="two_level", coarse_k=8, refine_iters=2,
                                refine_probe=3, max_points_per_centroid=10, gpu=False)
    assert ref_rep["dtype"] == "float32"
    np.testing.assert_allclose(np.load(tmp_path / "centers.npy"), ref, atol=1e-6)
    assert [it["obj"] for it in rep["refine_iterations"]] == pytest.approx([it["obj"] for it in ref_rep["refine_iterations"]])
    # flat passes over all k read the whole sample at once: that stage samples float32
    (tmp_path / "flat_refine").mkdir()
    (tmp_path / "flat_refine" / "features").symlink_to(tmp_path / "features")
    kmeans.run(_cfg(tmp_path / "flat_refine", *settings[:-1], "kmeans.refine_probe=0"), {}, stems)
    assert load_json(tmp_path / "flat_refine" / "kmeans_report.json")["dtype"] == "float32"
    with pytest.raises(ValueError, match="float16 or float32, got float64"):
        train_kmeans(x32.astype(np.float64), 8, mode="two_level")


# Deliberately lossy settings (IVF: 2 of 32 cells; HNSW: 8 candidates, 4 links), so a wrong recall would show.
APPROX = {"ivf": ["assign.nlist=32", "assign.nprobe=2"],
          "hnsw": ["assign.hnsw_m=4", "assign.ef_search=8", "assign.ef_construction=8"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_approx_assign_recall_is_reported_truthfully(tmp_path, method):
    urls, _ = _features(tmp_path, seed=7)
    cfg = _cfg(tmp_path, "kmeans.k=256", "kmeans.mode=two_level", "kmeans.coarse_k=16", "kmeans.niter=10",
               f"assign.method={method}", *APPROX[method], "assign.recall_sample=100000")
    kmeans.run(cfg, {}, [Path(u).stem for u in urls])
    assign.run(cfg, {}, urls)
    rep = load_json(tmp_path / "labels" / "assign_report.json")
    centers = np.load(tmp_path / "centers.npy")
    feats = np.concatenate([np.load(tmp_path / "features" / f"{Path(u).stem}.npy") for u in urls]).astype(np.float32)
    labels, sims = _load_all(tmp_path, urls)
    ref_ids, _ = numpy_topk(feats, centers, 8)
    hits = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(labels, ref_ids)])
    assert rep["recall_sample"] == len(feats)  # the sample covers every image here, so the numbers must agree
    assert abs(rep["recall_at_k"] - hits) < 1e-3, (rep["recall_at_k"], hits)
    assert 0.3 < hits < 0.999, hits
    # similarities are the true inner products of the returned centers, sorted
    np.testing.assert_allclose(sims, np.take_along_axis(feats.astype(np.float64) @ centers.T.astype(np.float64),
                                                        labels.astype(np.int64), 1), atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-7)
    other = {"ivf": "assign.nprobe=4", "hnsw": "assign.ef_search=16"}[method]
    with pytest.raises(ValueError, match="other settings"):  # resume with another setting must not mix labels
        assign.run(_cfg(tmp_path, "kmeans.k=256", "kmeans.mode=two_level", "kmeans.coarse_k=16", "kmeans.niter=10",
                        f"assign.method={method}", *APPROX[method], other), {}, urls)


def test_assign_without_centers_fails_clearly(tmp_path):
    urls, _ = _features(tmp_path, n_shards=1)
    with pytest.raises(FileNotFoundError, match="no centers"):
        assign.run(_cfg(tmp_path), {}, urls)


def test_negative_refine_probe_names_the_key():
    with pytest.raises(ValueError, match="kmeans.refine_probe must be >= 0"):
        train_kmeans(sphere_mixture(4, 20, 8, 0.1, 0)[0], 8, mode="two_level", coarse_k=2, refine_iters=1,
                     refine_probe=-1)
