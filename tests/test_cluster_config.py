"""cluster.py's config: bad settings are refused before any work, its own config tree, the LAION presets."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mlcd.validate import check_cluster_config  # noqa: E402
from mlcd.cluster.files import load_json  # noqa: E402


def cfg_of(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "cluster"), version_base=None):
        return compose("cluster", overrides=list(overrides))


# (overrides, the start of the error: key=value)
BAD = [
    (["kmeans.k=4", "assign.topk=9"], "assign.topk=9: exceeds kmeans.k=4"),
    (["kmeans.k=-5"], "kmeans.k=-5: must be an integer >= 1"),
    (["kmeans.k=0"], "kmeans.k=0: must be an integer >= 1"),
    (["kmeans.k=1e3"], "kmeans.k=1000.0: must be an integer"),
    (["kmeans.mode=hier"], "kmeans.mode='hier': must be one of ['flat', 'two_level']"),
    (["kmeans.niter=0"], "kmeans.niter=0:"),
    (["kmeans.seed=-1"], "kmeans.seed=-1:"),
    (["kmeans.max_points_per_centroid=0"], "kmeans.max_points_per_centroid=0:"),
    (["kmeans.min_points_per_centroid=-1"], "kmeans.min_points_per_centroid=-1:"),
    (["kmeans.mode=two_level", "kmeans.coarse_k=2000"], "kmeans.coarse_k=2000: more coarse groups than kmeans.k=1000"),
    (["kmeans.mode=flat", "kmeans.coarse_k=10"], "kmeans.coarse_k=10: only kmeans.mode=two_level uses it"),
    (["kmeans.refine_iters=-1"], "kmeans.refine_iters=-1:"),
    (["kmeans.refine_probe=-1"], "kmeans.refine_probe=-1:"),
    (["kmeans.gpu=yes"], "kmeans.gpu='yes': must be one of"),
    (["kmeans.final_stats=maybe"], "kmeans.final_stats='maybe':"),
    (["assign.topk=0"], "assign.topk=0:"),
    (["assign.method=lsh"], "assign.method='lsh': must be one of ['exact', 'ivf', 'hnsw']"),
    (["assign.nlist=5000"], "assign.nlist=5000: more IVF cells than kmeans.k=1000"),
    (["assign.nprobe=0"], "assign.nprobe=0:"),
    (["assign.hnsw_m=1"], "assign.hnsw_m=1: must be an integer >= 2"),
    (["assign.ef_search=0"], "assign.ef_search=0:"),
    (["assign.recall_sample=-1"], "assign.recall_sample=-1:"),
    (["assign.chunk_size=0"], "assign.chunk_size=0:"),
    (["assign.labels_dir=''"], "assign.labels_dir='':"),
    (["extract.precision=fp8"], "extract.precision='fp8': must be one of ['auto', 'bf16', 'fp16', 'fp32']"),
    (["extract.fusion=concat"], "extract.fusion='concat': must be one of ['mean']"),
    (["extract.text=yes"], "extract.text='yes':"),
    (["extract.batch_size=0"], "extract.batch_size=0:"),
    (["extract.num_workers=-1"], "extract.num_workers=-1:"),
    (["extract.image_size=-32"], "extract.image_size=-32: must be an integer >= 1 or null"),
    (["extract.model=''"], "extract.model='':"),
    (["extract.model_config=/nowhere/m.json"], "extract.model_config='/nowhere/m.json': no such file"),
    (["stages=[extract,cluster]"], "stages=['extract', 'cluster']: must be a non-empty list drawn from"),
    (["stages=[]"], "stages=[]:"),
    (["seed=-1"], "seed=-1:"),
    (["dist_timeout_minutes=0"], "dist_timeout_minutes=0:"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_check_config_names_key_and_value(overrides, message):
    with pytest.raises(ValueError) as e:
        check_cluster_config(cfg_of(*overrides))
    assert str(e.value).startswith(message), str(e.value)


def run_cluster(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "cluster.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["topk_over_k", "no_shards", "bad_mode", "assign_without_centers"])
def test_refused_before_any_work(tmp_path, case):
    """The process fails naming the setting, and leaves no output dir (no config.yaml, features, centers)."""
    shard = tmp_path / "s-000000.tar"
    shard.write_bytes(b"")  # exists: only the setting under test is wrong (a real extract would fail on it)
    out = tmp_path / "out"
    no_match = f"{tmp_path}/t-{{000000..000003}}.tar"
    args, message = {
        "topk_over_k": ([f"shards={shard}", "kmeans.k=4", "assign.topk=9"], "assign.topk=9: exceeds kmeans.k=4"),
        "no_shards": ([f"shards='{no_match}'"], f"shards='{no_match}': 4 of 4 shards do not exist"),
        "bad_mode": ([f"shards={shard}", "kmeans.mode=hier"], "kmeans.mode='hier'"),
        "assign_without_centers": ([f"shards={shard}", "stages=[assign]"], f"out_dir='{out}': no centers.npy"),
    }[case]
    proc = run_cluster(f"out_dir={out}", *args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_help_lists_only_cluster_groups():
    """cluster.py has its own config tree: --help shows its experiments, not train.py's model/loss/optim/data."""
    proc = run_cluster("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "experiment: demo, laion400m_vitb32, laion400m_vitl14" in groups
    for train_group in ("model:", "loss:", "optim:", "data:", "demo:"):
        assert train_group not in groups, groups


def test_defaults_are_the_demo_and_pass():
    """`python cluster.py` with no argument clusters the demo's shards (what `make demo` writes)."""
    cfg = cfg_of()
    check_cluster_config(cfg)
    assert cfg.shards == "data/demo/shards/fmnist-train-{000000..000011}.tar" and cfg.out_dir == "data/demo/cluster"
    assert cfg.extract.image_size == 32 and cfg.kmeans.k == 1000 and cfg.kmeans.mode == "flat"


@pytest.mark.parametrize("name,model", [("laion400m_vitl14", "ViT-L-14"), ("laion400m_vitb32", "ViT-B-32")])
def test_laion_presets(name, model):
    """The paper's setting, and shard names + labels dir that train.py's LAION presets read."""
    cfg = cfg_of(f"experiment={name}")
    check_cluster_config(cfg)
    assert (cfg.extract.model, cfg.extract.pretrained, cfg.extract.image_size) == (model, "openai", 224)
    km = cfg.kmeans
    assert (km.k, km.mode, km.max_points_per_centroid, km.refine_iters, km.refine_probe) == \
           (1000000, "two_level", 100, 10, 16)
    assert cfg.assign.topk == 8 and cfg.assign.method == "exact"
    for train_preset in sorted((ROOT / "configs" / "train" / "experiment").glob("laion400m_*.yaml")):
        data = OmegaConf.load(train_preset).get("data", {})
        if "train_shards" in data:
            assert cfg.shards == data.train_shards, train_preset
    if name == "laion400m_vitl14":  # the paper's labels: the ones the training presets read
        train = OmegaConf.load(ROOT / "configs" / "train" / "experiment" / "laion400m_vitl14.yaml")
        assert str(Path(cfg.out_dir) / "labels") == train.data.labels_dir


@pytest.mark.slow
def test_a_failed_extract_start_does_not_refuse_the_corrected_command(tmp_path):
    """extract.model=<typo> fails after the features manifest is written; with no feature file written yet, that
    manifest binds nothing, so the corrected command runs (a finished shard still guards its settings)."""
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "mlcd.data.make_shards", "--source", "fashion_mnist", "--split", "train",
                    "--out", str(shards), "--prefix", "fm", "--max-per-shard", "40", "--limit", "80"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    common = [f"shards='{shards}/fm-{{000000..000001}}.tar'", f"out_dir={tmp_path / 'out'}", "stages=[extract]",
              "extract.batch_size=40", "extract.num_workers=0"]
    typo = run_cluster(*common, "extract.model=ViT-S-33")
    assert typo.returncode != 0 and "ViT-S-33" in typo.stderr, typo.stderr[-2000:]
    fixed = run_cluster(*common)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert load_json(tmp_path / "out" / "features" / "manifest.json")["rows"] == 80
    other = run_cluster(*common, "extract.image_size=64")  # now a shard exists: other settings are refused
    assert other.returncode != 0 and "image_size" in other.stderr, other.stderr[-2000:]
