"""The capacity planner (mlcd/plan.py, its command line plan.py) against independent measurements:
- parameter count and forward FLOPs of every model config vs the built model (torch's FlopCounterMode);
- the logits width (positives + sampled negatives) vs PartialFC's real sampling at the paper's scale;
- the planned peak memory vs the measured peak of real training runs (train.py's loop, CPU fp32, 1 and 2 ranks).

How memory is measured: torch.profiler(profile_memory=True) records every allocation and free of PyTorch's CPU
allocator; their running sum over the run is the live tensor memory, and its maximum is the peak, which is what
torch.cuda.max_memory_allocated reports on a GPU. It counts tensors only (not RSS: no Python, libraries or
allocator caching), which is what the planner models. Each run trains 2 steps (the second one with AdamW state).
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import plan as plan_cli
from mlcd import plan as planner
from mlcd.plan import GIB, plan
from plan import load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in (ROOT / "configs" / "train" / "model").glob("*.yaml"))
RECIPES = ("laion400m_vitb32", "laion400m_vitb16", "laion400m_vitl14", "laion400m_vitl14_336", "laion400m_vitbigg14")
TOLERANCE = 0.15


# ---------------------------------------------------------------------------------------------- the ViT
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_params_and_flops_match_the_built_model(name):
    from torch.utils.flop_counter import FlopCounterMode
    from mlcd.models import build_model
    cfg = OmegaConf.to_container(load_config([f"model={name}"]).model, resolve=True)
    with torch.device("meta"):
        model = build_model(cfg)
        images = torch.empty(2, 3, cfg["image_size"], cfg["image_size"])
    assert planner.vit_params(cfg) == sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    assert planner.vit_forward_flops(cfg) * 2 == counter.get_total_flops()


# ---------------------------------------------------------------------------------------------- the logits width
@pytest.mark.parametrize("num_classes, world, batch, l, ratio", [
    (1_000_000, 80, 32_800, 8, 0.1),    # the paper: L/14, 80 GPUs
    (1_000_000, 8, 32_768, 8, 0.1),     # one node: positives are a larger share of the shard
    (50_000, 4, 4_096, 4, 0.3),         # few classes: most of a shard is positive
])
def test_columns_match_partial_fc_sampling(num_classes, world, batch, l, ratio):
    """Uniformly random labels through PartialFC.sample on rank 0 of `world` (built alone, as for offline tools)."""
    from mlcd.partial_fc import PartialFC
    pfc = PartialFC(num_classes, 4, sample_ratio=ratio, rank=0, world_size=world)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (batch, l), generator=gen)
    index = pfc.sample(labels, step=0)[0]
    n_local = planner.shard_rows(num_classes, world)
    positives = planner.expected_positives(num_classes, n_local, batch * l)
    owned = labels[(labels >= pfc.start) & (labels < pfc.start + pfc.n_local)].unique().numel()
    hit = positives / n_local
    four_sigma = 4 * (n_local * hit * (1 - hit)) ** 0.5                 # the distinct count is nearly binomial
    assert n_local == pfc.n_local
    assert positives == pytest.approx(owned, abs=four_sigma)
    assert planner.sampled_columns(n_local, positives, ratio, "ratio") == pytest.approx(index.numel(), abs=four_sigma)


def test_paper_logits_figure_and_batch_divisibility():
    """The README's per-rank logits figure for L/14 on 80 GPUs at the presets' batch, the paper's 32,800. A batch
    that does not divide by the world size (32,768 on 80) is refused, as train.py refuses it."""
    with pytest.raises(ValueError, match=r"train.global_batch_size=32768 is not divisible by world_size=80"):
        plan(load_config(["experiment=laion400m_vitl14", "train.global_batch_size=32768"]), 80)
    p = plan(load_config(["experiment=laion400m_vitl14"]), 80)
    assert p["shard"]["rows"] == 12_500 and p["config"]["per_rank_batch"] == 410
    assert p["shard"]["logits_shape"][0] == 32_800 and 3_800 < p["shard"]["columns"] < 3_900
    assert 2_850 < p["shard"]["positives"] < 2_920 and 950 < p["shard"]["negatives"] < 975
    assert p["memory_bytes"]["logits_fp32"] == pytest.approx(0.505e9, rel=0.01)
    assert p["fits"] and p["config"]["num_labels"] == 8


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_plan_at_80_gpus(recipe):
    p = plan(load_config([f"experiment={recipe}"]), 80, gpu="h100")
    m = p["memory_bytes"]
    assert p["fits"] and m["peak"] > m["persistent"] > m["params"] > 0 and p["time"]["days"] > 0
    assert m["activations_ckpt"] < m["activations_no_ckpt"]


# ---------------------------------------------------------------------------------------------- errors and CLI
@pytest.mark.parametrize("kwargs, message", [
    ({"gpu": "v100"}, "gpu='v100': must be one of"),
    ({"mfu": 1.5}, "mfu=1.5: must be in (0, 1]"),
    ({"world_size": 0}, "world_size=0: must be a positive integer"),
])
def test_plan_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        plan(load_config([]), **{"world_size": 2, **kwargs})
    assert message in str(err.value)


def test_parse_args_errors():
    with pytest.raises(ValueError, match="world_size=N is required"):
        plan_cli.parse_args(["experiment=laion400m_vitb32"])
    with pytest.raises(ValueError, match="world_size='eight' is not a int"):
        plan_cli.parse_args(["world_size=eight"])
    opts, overrides = plan_cli.parse_args(["world_size=8", "gpu=h200", "--json", "model=vit_b16", "loss.margin=0.2"])
    assert opts == {"json": True, "world_size": 8, "gpu": "h200"} and overrides == ["model=vit_b16", "loss.margin=0.2"]
    assert plan_cli.parse_args(["experiment=laion400m_vitb32", "--help"]) == ({"help": True}, [])
    assert plan_cli.parse_args(["world_size=8", "loader_rate=90"])[0]["loader_rate"] == 90.0


# ---------------------------------------------------------------------------------------------- time: recompute, loader
def test_checkpointing_recompute_is_in_step_time():
    """Checkpointing reruns every block's forward in backward: hardware FLOPs = model FLOPs + one more forward of
    the blocks per image (about 4/3 of the backbone's 3 passes), and the step time grows by exactly that ratio."""
    base = ["experiment=laion400m_vitl14"]
    off = plan(load_config(base + ["train.grad_checkpointing=false"]), 80)
    on = plan(load_config(base + ["train.grad_checkpointing=true"]), 80)
    model_cfg = OmegaConf.to_container(load_config(base).model, resolve=True)
    fwd = off["flops"]["forward_per_image"]
    blocks = fwd - planner.vit_forward_flops({**model_cfg, "layers": 0})    # patch embedding + projection left out
    assert 1.32 < (3 * fwd + blocks) / (3 * fwd) <= 4 / 3
    G, model_flops = 32_800, off["flops"]["per_step"]
    assert on["flops"]["per_step"] == model_flops == off["flops"]["hardware_per_step"]   # MFU's FLOPs unchanged
    expected = (model_flops + G * blocks) / model_flops
    assert on["flops"]["hardware_per_step"] == model_flops + G * blocks
    assert on["time"]["compute_step_s"] / off["time"]["compute_step_s"] == pytest.approx(expected, rel=1e-12)
    assert on["time"]["achieved_mfu"] == pytest.approx(0.4 / expected) and off["time"]["achieved_mfu"] == 0.4


def test_loader_bound_b32_on_80_gpus(capsys):
    """B/32 on 80 GPUs consumes ~4,555 img/s per GPU; 8 workers at the measured ~199 img/s feed ~1,593: loader-bound
    by ~2.9x, and the days are the loader's."""
    rate, source = plan_cli.loader_rate_per_worker()
    assert source == "bench/results/data.json" and rate == planner.LOADER_RATE_MEASURED   # the copy is current
    p = plan_cli.main(["experiment=laion400m_vitb32", "world_size=80"])
    ld, tm = p["loader"], p["time"]
    assert ld["needed_per_gpu"] == pytest.approx(4_555, abs=1) and ld["available_per_gpu"] == 8 * rate
    assert ld["bound"] and ld["factor"] == pytest.approx(4_555 / (8 * rate), rel=1e-3) and 2.8 < ld["factor"] < 3.0
    assert tm["days"] == tm["loader_days"] == pytest.approx(tm["compute_days"] * ld["factor"])
    assert tm["images_per_s"] == pytest.approx(80 * 8 * rate)
    out = capsys.readouterr().out
    assert f"WARNING: loader-bound by {ld['factor']:.1f}x: data.num_workers=8" in out
    assert f"days: {tm['loader_days']:.1f}, loader-bound (compute-bound {tm['compute_days']:.1f}" in out


def test_loader_rate_override_and_fallback(capsys, monkeypatch):
    p = plan_cli.main(["experiment=laion400m_vitb32", "world_size=80", "loader_rate=1e6"])
    assert not p["loader"]["bound"] and p["loader"]["rate_source"] == "loader_rate"
    assert p["time"]["days"] == p["time"]["compute_days"] and "WARNING" not in capsys.readouterr().out
    p = plan(load_config(["experiment=laion400m_vitb32", "data.source=synthetic"]), 80)
    assert p["loader"] is None and p["time"]["days"] == p["time"]["compute_days"]
    monkeypatch.setattr(plan_cli, "LOADER_BENCH", Path("/nonexistent/data.json"))
    assert plan_cli.loader_rate_per_worker()[0] == planner.LOADER_RATE_MEASURED


@pytest.mark.slow
def test_cli_help_and_unknown_keys():
    def run(*args):
        return subprocess.run([sys.executable, "plan.py", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    for flag in ("--help", "-h"):
        r = run(flag)
        assert r.returncode == 0 and r.stdout.startswith("Capacity planner") and "loader_rate" in r.stdout
    r = run("experiment=laion400m_vitb32", "world_size=80", "gpus=h100")
    assert r.returncode == 1 and "'gpus' is neither a planner option" in r.stderr and "did you mean gpu=" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(ValueError, match=r"train.grad_acum=2: 'train.grad_acum' is neither .* \+train.grad_acum=2"):
        load_config(["train.grad_acum=2"])
    with pytest.raises(ValueError, match="unknown flag --jsn"):
        plan_cli.parse_args(["world_size=8", "--jsn"])
    assert load_config(["+train.extra=1"]).train.extra == 1                 # hydra's + still adds a key


@pytest.mark.slow
def test_cli_table_json_and_error(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "plan.py", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    out = tmp_path / "plan.json"
    r = run("experiment=laion400m_vitb32", "world_size=80", "gpu=h100", f"out={out}")
    assert r.returncode == 0, r.stderr
    assert "PEAK per GPU" in r.stdout and "verdict: FITS" in r.stdout
    saved = json.loads(out.read_text())
    assert saved["config"]["world_size"] == 80 and saved["config"]["model"] == "vit_b32"
    r = run("experiment=laion400m_vitb32", "world_size=80", "--json", "model.layers=6")
    assert json.loads(r.stdout)["backbone_params"] < saved["backbone_params"]
    r = run("experiment=laion400m_vitl14", "world_size=64")
    assert r.returncode == 1 and "train.global_batch_size=32800 is not divisible by world_size=64" in r.stderr
    r = run("world_size=2", "train.no_such_key=1")
    assert r.returncode != 0 and "no_such_key" in r.stderr


# ---------------------------------------------------------------------------------------------- measured memory
def _write_data(out: Path, n=600, size=28, l=4, num_classes=1000):
    """One shard of random images with l distinct random labels each (mlcd.data.labels format)."""
    import webdataset as wds
    from PIL import Image
    from mlcd.data.labels import write_shard_labels
    rng = np.random.default_rng(0)
    (out / "shards").mkdir(parents=True)
    keys = [f"img{i:06d}" for i in range(n)]
    with wds.TarWriter(str(out / "shards" / "s-000000.tar")) as sink:
        for key in keys:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": key, "png": buf.getvalue()})
    labels = np.stack([rng.choice(num_classes, l, replace=False) for _ in keys]).astype(np.int32)
    write_shard_labels(out / "labels", "s-000000", keys, labels, np.ones(labels.shape, np.float32))
    return [f"data.train_shards={out}/shards/s-000000.tar", f"data.labels_dir={out}/labels", f"data.num_labels={l}",
            "data.num_workers=0", "data.shuffle_buffer=16"]


def _run_overrides(data, out_dir, extra):
    return data + [f"out_dir={out_dir}", "logging.wandb.mode=disabled", "train.progress_bar=false",
                   "train.total_steps=2", "optim.warmup_steps=1", "train.log_every=1"] + extra


def measure_peak_bytes(fn) -> int:
    """Peak live bytes of PyTorch's CPU allocator while fn() runs (see module docstring)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))   # negative for a free
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _measure_train(overrides) -> int:
    from mlcd.train.loop import train
    cfg = load_config(overrides)
    return measure_peak_bytes(lambda: train(cfg))


def _compare(measured, p, what):
    m = p["memory_bytes"]
    parts = {k: round(m[k] / 2**20, 1) for k in ("persistent", "activations", "loss_buffers", "input_batch",
                                                 "grads", "peak")}
    print(f"{what}: measured {measured / 2**20:.1f} MiB, planned {m['peak'] / 2**20:.1f} MiB "
          f"({m['peak'] / measured:.3f}x; peak during {p['peak_phase']}) {parts}")
    assert abs(m["peak"] / measured - 1) <= TOLERANCE, (what, measured, parts)


# Shapes each dominated by a different part of the plan (per_slot: B x l logits rows).
CONFIGS = {
    "centers": ["model=vit_tiny", "num_classes=100000", "train.global_batch_size=64", "loss.sample_ratio=0.1"],
    "activations_quick_gelu": ["model=vit_tiny", "model.act=quick_gelu", "model.image_size=32", "num_classes=1000",
                               "train.global_batch_size=128"],
    "logits_checkpointing": ["model=vit_tiny", "model.width=64", "model.mlp_dim=256", "model.layers=6",
                             "model.embed_dim=32", "num_classes=50000", "loss.sample_ratio=1.0",
                             "train.global_batch_size=256", "train.grad_checkpointing=true"],
    "logits_per_slot": ["model=vit_tiny", "model.layers=2", "model.width=64", "model.mlp_dim=128", "model.heads=2",
                        "model.embed_dim=64", "loss=per_slot", "num_classes=20000", "loss.sample_ratio=0.5",
                        "train.global_batch_size=128"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("plan_data"), size=32)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_planned_peak_matches_a_measured_run(name, data, tmp_path):
    overrides = _run_overrides(data, tmp_path / "run", CONFIGS[name])
    measured = _measure_train(overrides)
    _compare(measured, plan(load_config(overrides), 1, gpu="cpu"), name)


@pytest.mark.slow
@pytest.mark.parametrize("sharding, shape", [
    # the loss over both ranks' gathered batch dominates; DDP's buckets
    ("ddp", ["model.layers=2", "model.width=64", "model.mlp_dim=128", "model.heads=2", "model.embed_dim=64",
             "num_classes=40001", "loss.sample_ratio=0.5", "train.global_batch_size=256"]),
    # the backbone dominates (12.6 MB of weights): FSDP's halved states, gathered blocks and block gradients
    ("fsdp", ["model.layers=4", "model.width=256", "model.mlp_dim=1024", "model.heads=4", "model.embed_dim=64",
              "num_classes=1000", "train.global_batch_size=32"]),
])
def test_planned_peak_matches_a_measured_two_rank_run(sharding, shape, data, tmp_path):
    """Two ranks under torchrun (gloo), under DDP and under FSDP."""
    overrides = _run_overrides(data, tmp_path / "run", ["model=vit_tiny", f"train.sharding={sharding}", *shape])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *overrides]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PEAK_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    measured = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("peak-rank*.json"))]
    assert sorted(m["rank"] for m in measured) == [0, 1]
    p = plan(load_config(overrides), 2, gpu="cpu")
    if sharding == "ddp":
        assert p["memory_bytes"]["ddp_buckets"] > 0 and p["shard"]["logits_shape"][0] == 256
    else:
        assert p["memory_bytes"]["ddp_buckets"] == 0 and p["memory_bytes"]["params"] * 2 >= 4 * p["backbone_params"]
    for m in measured:
        _compare(m["bytes"], p, f"2 ranks, rank {m['rank']}")


if __name__ == "__main__":   # the torchrun worker of the two-rank test: train, write this rank's measured peak
    peak = _measure_train(sys.argv[1:])
    rank = int(os.environ["RANK"])
    (Path(os.environ["PEAK_DIR"]) / f"peak-rank{rank}.json").write_text(json.dumps({"rank": rank, "bytes": peak}))


def test_gpu_decode_is_not_judged_by_the_cpu_workers_rate():
    """data.decode=gpu: the PIL workers' rate says nothing about the GPU decoder; the plan says so instead of warning,
    and a measured loader_rate= judges it again."""
    p = plan(load_config(["experiment=laion400m_vitb32", "data.decode=gpu"]), 80)
    assert p["loader"] is None and "make gpu-check" in p["time"]["loader_note"]
    assert p["time"]["days"] == p["time"]["compute_days"]
    measured = plan(load_config(["experiment=laion400m_vitb32", "data.decode=gpu"]), 80, loader_rate=100.0)
    assert measured["loader"]["bound"] and "loader_note" not in measured["time"]
