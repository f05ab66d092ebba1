"""Adapting a released encoder: train.init_from=<a Hugging Face vision model directory>.

Sources are tiny random transformers models saved with save_pretrained (MLCDVisionModel, CLIPVisionModelWithProjection,
a full CLIPModel), so transformers itself is the oracle: the run starts from exactly the source's weights, and an
export of the run (in the source's own class, with the source's image processor) gives our features. Bad sources
and model settings that contradict the source are refused before any work: no run directory is written.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import _final_state, _torchrun, _write_dataset

transformers = pytest.importorskip("transformers")
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel,  # noqa: E402
                          CLIPVisionConfig, CLIPVisionModelWithProjection, MLCDVisionConfig, MLCDVisionModel)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=7)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def _randomize(model, seed):
    """Every parameter moved off its init (LayerNorm 1/0, zero biases), so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _processor(size):
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Released-model stand-ins, each with its own preprocessor_config.json as published models have."""
    root = tmp_path_factory.mktemp("hf_sources")
    made = {
        "mlcd": (MLCDVisionModel(MLCDVisionConfig(**TINY, image_size=56)), 56),           # RoPE2D, like bigG
        "clip_proj": (CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, image_size=28, projection_dim=16)), 28),
        "clip_full": (CLIPModel(CLIPConfig(vision_config=dict(TINY, image_size=28), text_config=TEXT,
                                           projection_dim=24)), 28),
    }
    out = {}
    for i, (name, (model, size)) in enumerate(made.items()):
        _randomize(model, i).save_pretrained(root / name)
        _processor(size).save_pretrained(root / name)
        out[name] = root / name
    CLIPTextModel(CLIPTextConfig(**TEXT)).save_pretrained(root / "text")
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(root / "bert")
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out.update(text=root / "text", bert=root / "bert", images=root / "images")
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("adapt_data"))


def _overrides(dataset, out_dir, **extra):
    """A run on the fixture's shards with NO model settings: with an HF init_from the model is the source's."""
    shards, labels_dir = dataset
    args = {"data.train_shards": shards, "data.labels_dir": labels_dir, "data.num_workers": 0,
            "data.shuffle_buffer": 32, "out_dir": str(out_dir), "seed": 3, "train.global_batch_size": 16,
            "train.total_steps": 3, "train.ckpt_every": 3, "train.log_every": 1, "train.keep_last": 5,
            "train.progress_bar": False, "train.deterministic": True, "optim.lr": 2e-3, "optim.warmup_steps": 1,
            "loss.sample_ratio": 0.5, "logging.wandb.mode": "disabled", "monitor.every": 0}
    args.update(extra)
    return [f"{k}='{v}'" if isinstance(v, str) and "{" in v else f"{k}={v}" for k, v in args.items()]


def _inprocess(dataset, out_dir, **extra):
    from hydra import compose, initialize_config_dir

    from mlcd.train.loop import train
    with initialize_config_dir(str(ROOT / "configs" / "train"), version_base=None):
        cfg = compose("train", overrides=_overrides(dataset, out_dir, **extra))
    torch.set_num_threads(1)
    return train(cfg)


def _hf_outputs(model, x):
    """What code that loaded the model reads: the projected embedding where there is one, else the pooled output."""
    with torch.no_grad():
        if isinstance(model, CLIPModel):   # transformers 5 returns an output whose pooler_output is projected
            feats = model.get_image_features(pixel_values=x)
            return feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        out = model(pixel_values=x)
    return out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output


# ---- reading a source ---------------------------------------------------------------------------------------------

def test_hf_source_reads_class_model_and_processor(sources):
    from mlcd.models.hf import hf_source
    m, p, f = (hf_source(sources[k]) for k in ("mlcd", "clip_proj", "clip_full"))
    assert (m.declared, m.hf_class, m.model["pos_embed"], m.model["embed_dim"]) == (
        "MLCDVisionModel", "MLCDVisionModel", "rope2d", None)
    assert (p.declared, p.hf_class, p.model["pos_embed"], p.model["embed_dim"]) == (
        "CLIPVisionModelWithProjection", "CLIPVisionModelWithProjection", "learned", 16)
    assert (f.declared, f.hf_class, f.model["embed_dim"]) == ("CLIPModel", "CLIPVisionModelWithProjection", 24)
    assert m.model["image_size"] == 56 and m.processor["crop_size"] == {"height": 56, "width": 56}
    assert (m.model["width"], m.model["layers"], m.model["patch_size"]) == (32, 2, 7)


def test_model_config_rule(sources):
    """The source's config, whatever the experiment's model group; explicit keys: image_size taken, name a label,
    anything else must agree with the source (every contradicting field named)."""
    from mlcd.train.checkpoint import init_model_config
    tiny = {"name": "vit_tiny", "image_size": 28, "patch_size": 4, "width": 128, "layers": 4, "heads": 4,
            "mlp_dim": 512, "embed_dim": 128, "pos_embed": "learned", "act": "gelu", "ln_eps": 1e-5}
    src = sources["clip_proj"]
    got = init_model_config(src, tiny, resuming=False, explicit=set())
    assert got["width"] == 32 and got["patch_size"] == 7 and got["embed_dim"] == 16 and got["name"] == "clip_proj"
    assert got["act"] == "quick_gelu"   # CLIPVisionConfig's default, taken from the source, not the group's gelu
    got = init_model_config(src, {**tiny, "image_size": 42, "name": "mine"}, False, explicit={"image_size", "name"})
    assert (got["image_size"], got["name"], got["width"]) == (42, "mine", 32)
    agreeing = {**got, "width": 32, "layers": 2}
    assert init_model_config(src, agreeing, False, explicit={"width", "layers"})["width"] == 32
    with pytest.raises(ValueError, match=r"model\.width=128 \(the source has 32\)") as e:
        init_model_config(src, tiny, False, explicit={"width"})
    assert "layers" not in str(e.value)                       # only the keys given are checked
    with pytest.raises(ValueError, match=r"model\.heads=4 .*model\.layers=4 .*model\.mlp_dim=512 .*model\.patch_size"
                                         r"=4 .*model\.width=128 .*model group choice"):
        init_model_config(src, tiny, False, explicit={"*"})   # model=vit_tiny on the command line: all of it
    rope = init_model_config(sources["mlcd"], {**tiny, "image_size": 28}, False, explicit={"image_size"})
    assert rope["pos_embed"] == "rope2d" and rope["image_size"] == 28
    with pytest.raises(ValueError, match=r"model\.pos_embed='learned' \(the source has 'rope2d'\)"):
        init_model_config(sources["mlcd"], tiny, False, explicit={"pos_embed"})
    assert init_model_config("/nonexistent", tiny, resuming=True) is tiny   # a resume does not read it


@pytest.mark.parametrize("source,message", [
    ("text", "is a text-only model (CLIPTextModel"),
    ("bert", "is not a vision model this project can start from: model_type 'bert'"),
    ("images", "is not one of our checkpoints or run directories"),
    ("missing", "does not exist"),
])
def test_a_source_that_is_not_a_vision_model_fails_before_any_work(sources, dataset, tmp_path, source, message):
    src = sources.get(source, tmp_path / "missing")
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        _inprocess(dataset, tmp_path / "run", **{"train.init_from": str(src)})
    assert not (tmp_path / "run").exists()


def test_model_keys_are_read_from_the_command_line(monkeypatch):
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    from mlcd.train.checkpoint import command_line_model_keys
    task = ["model.image_size=42", "+model.width=64", "optim.lr=1e-4", "train.init_from=x", "seed=1"]
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(overrides=SimpleNamespace(task=task))))
    assert command_line_model_keys() == {"image_size", "width"}
    task.append("model=vit_tiny")
    assert command_line_model_keys() == {"image_size", "width", "*"}
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: False))
    assert command_line_model_keys() == set()


@pytest.mark.slow
@pytest.mark.parametrize("source,extra,message", [
    ("clip_proj", {"model.width": 48}, "model.width=48 (the source has 32)"),
    ("mlcd", {"model": "vit_tiny"}, "model.pos_embed='learned' (the source has 'rope2d')"),
])
def test_a_contradicting_model_setting_fails_before_any_work(sources, dataset, tmp_path, source, extra, message):
    """Through train.py's real command line (where the explicit model keys are seen): refused, naming the field,
    and no run directory written."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *_overrides(dataset, out, **{"train.init_from": str(sources[source]), **extra})],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_adapt_preset(tmp_path):
    """experiment=adapt: the continuation settings its comments give, and the source and data are required (a run
    without them fails naming the key, before any work)."""
    from hydra import compose, initialize_config_dir

    from mlcd.train.loop import train
    with initialize_config_dir(str(ROOT / "configs" / "train"), version_base=None):
        cfg = compose("train", overrides=["experiment=adapt", f"out_dir={tmp_path / 'run'}"])
    assert (cfg.optim.lr, cfg.optim.centers_lr_mult, cfg.train.init_centers) == (1e-4, 10.0, False)
    assert cfg.data.segment_steps == cfg.train.ckpt_every and cfg.optim.warmup_steps < cfg.train.total_steps
    assert cfg.train.init_from == "<required>" and cfg.data.train_shards is None and cfg.data.labels_dir is None
    with pytest.raises(FileNotFoundError, match="train.init_from=<required> does not exist"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# ---- the weights a run starts from, and its export ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlcd", "clip_proj", "clip_full"])
def test_run_starts_from_the_source_weights_and_exports_in_its_class(sources, dataset, tmp_path, name, capsys):
    """lr 0: the run's checkpoint holds exactly the source's weights (read back by transformers, the oracle), and
    its export (--like auto: the run's source) loads in the source's class with the source's processor and gives
    the source model's outputs."""
    from mlcd.models.hf import from_hf_state_dict, hf_source
    src = sources[name]
    run = tmp_path / "run"
    _inprocess(dataset, run, **{"train.init_from": str(src), "optim.lr": 0.0, "train.total_steps": 1,
                                "train.ckpt_every": 1})
    manifest, backbone, _ = _final_state(run, 1)
    source = hf_source(src)
    assert manifest["model"] == source.model and manifest["num_classes"] == 23
    original = getattr(transformers, source.declared).from_pretrained(src).eval()
    want = from_hf_state_dict(source.model, original.state_dict())
    assert sorted(backbone) == sorted(want)
    for key, value in want.items():
        assert torch.equal(backbone[key], value), key

    from mlcd.export_hf import main as export_main
    out = tmp_path / "export"
    export_main([str(run), str(out)])        # --like auto: the run's train.init_from
    assert f"exporting like its source {src}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [source.hf_class]
    assert (out / "preprocessor_config.json").read_bytes() == (src / "preprocessor_config.json").read_bytes()
    exported = getattr(transformers, source.hf_class).from_pretrained(out).eval()
    size = source.model["image_size"]
    x = torch.randn(3, 3, size, size)
    torch.testing.assert_close(_hf_outputs(exported, x), _hf_outputs(original, x), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,image_size", [("mlcd", 28), ("clip_proj", 42)])
def test_two_rank_run_resume_and_export(sources, dataset, tmp_path, name, image_size):
    """torchrun, 2 ranks (gloo): 3 steps from the source at another image size (RoPE2D: nothing to resize; learned:
    the position embedding resized), resumed to 5 steps, exported: the export loads in the source's class, its
    processor rescaled to the new size, and gives our features for the trained weights."""
    from mlcd.models.hf import hf_source
    from mlcd.models.loading import load_backbone
    src, run = sources[name], tmp_path / "run"
    args = {"train.init_from": str(src), "model.image_size": image_size}
    proc = _torchrun(2, _overrides(dataset, run, **args))
    assert f"initialised from Hugging Face {hf_source(src).declared}" in proc.stdout
    assert ("resized positional_embedding" in proc.stdout) == (name == "clip_proj")
    assert "class centers start fresh" in proc.stdout
    proc = _torchrun(2, _overrides(dataset, run, **args, **{"train.total_steps": 5, "train.ckpt_every": 5}))
    assert "resumed from" in proc.stdout and "initialised from" not in proc.stdout
    manifest, backbone, shards = _final_state(run, 5)
    source = hf_source(src)
    assert manifest["model"] == {**source.model, "image_size": image_size} and len(shards) == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]

    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "mlcd.export_hf", str(run), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    exported = getattr(transformers, source.hf_class).from_pretrained(out).eval()
    assert type(exported).__name__ == source.declared
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": image_size, "width": image_size}
    assert processor["size"] == {"shortest_edge": image_size}
    assert processor["image_mean"] == json.loads((src / "preprocessor_config.json").read_text())["image_mean"]
    ours, _ = load_backbone(run)
    trained = load_file(str(run / "checkpoints" / "step-00000005" / "backbone.safetensors"))
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in trained.items())
    x = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        mine = ours(x)
    want = mine.embedding if source.model["embed_dim"] else mine.pooled
    torch.testing.assert_close(_hf_outputs(exported, x), want, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(exported(pixel_values=x).last_hidden_state, mine.last_hidden_state,
                                   rtol=0, atol=1e-5)


def test_export_like_refuses_a_model_not_adapted_from_the_source(sources, tmp_path):
    from mlcd.models import build_model
    from mlcd.models.hf import export_hf, hf_source
    other = build_model({**hf_source(sources["clip_proj"]).model, "width": 64, "mlp_dim": 128})
    with pytest.raises(ValueError, match=r"model\.mlp_dim is 128 here but 64 in the source"):
        export_hf(other, tmp_path / "e", like=sources["clip_proj"])
    same = build_model(hf_source(sources["clip_proj"]).model)
    with pytest.raises(ValueError, match="declares CLIPVisionModelWithProjection .* not CLIPVisionModel"):
        export_hf(same, tmp_path / "e", "CLIPVisionModel", like=sources["clip_proj"])
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
@pytest.mark.bench
def test_bench_small_mode_runs_the_recipe_and_resumes(tmp_path):
    """bench/adapt.py --small: every stage of the recipe as a command line, a complete report; run again, every
    stage is skipped; other settings on the same root are refused."""
    root, out = tmp_path / "bench", tmp_path / "adapt.json"
    cmd = [sys.executable, str(ROOT / "bench" / "adapt.py"), "--small", "--root", str(root), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and out.with_suffix(".md").exists()
    for arm in ("source", "adapted", "scratch", "pixels"):
        got = report["on_new_classes"][arm]
        assert got["n"] == 1 and 0 <= got["linear_probe_top1"]["mean"] <= 100, arm
    assert report["on_old_classes"]["adapted"]["n"] == 1
    markers = root / "markers"
    for stage in ("export_source", "export_adapted_s0_p30"):
        assert json.loads((markers / f"{stage}.json").read_text())["architectures"] == ["CLIPVisionModelWithProjection"]
    adapted_cmd = json.loads((markers / "train_adapted_s0_p30.json").read_text())["cmd"]
    assert "experiment=adapt" in adapted_cmd and f"train.init_from='{root / 'source' / 'hf'}'" in adapted_cmd
    assert "extract.backbone={type: hf" in json.loads((markers / "cluster_new_s0_p30.json").read_text())["cmd"]

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ " not in again.stdout, again.stdout[-3000:]
    assert json.loads(out.read_text())["on_new_classes"] == report["on_new_classes"]
    other = subprocess.run(cmd + ["--steps", "5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "steps: 4 there, 5 now" in other.stderr
