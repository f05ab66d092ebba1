"""transformers as the oracle: HF models imported into ours, and ours exported and loaded back with
`from_pretrained`, give the same outputs (fp32, 1e-5) on square and non-square inputs."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mlcd.models import build_model
from mlcd.models.hf import export_hf, from_hf_config, import_hf, load_hf_model, to_hf_config

transformers = pytest.importorskip("transformers")
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig,  # noqa: E402
                          CLIPVisionModel, CLIPVisionModelWithProjection, MLCDVisionConfig, MLCDVisionModel)

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, intermediate_size=256,
            image_size=56)
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train" / "model").glob("*.yaml"))
ATOL = 1e-5


def randomize(model, seed=0):
    """Move every parameter off its init (LayerNorm 1/0, zero biases) so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def assert_same(ours, theirs, pooled=True):
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=ATOL)
    if pooled:
        torch.testing.assert_close(ours.pooled, theirs.pooler_output, rtol=0, atol=ATOL)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def run_both(ours, hf, x, **hf_kwargs):
    with torch.no_grad():
        return ours(x, output_hidden_states=True), hf(pixel_values=x, output_hidden_states=True, **hf_kwargs)


def test_mlcd_import_matches_transformers(tmp_path):
    hf = randomize(MLCDVisionModel(MLCDVisionConfig(**TINY)))
    hf.save_pretrained(tmp_path / "hf")
    for ours in (import_hf(hf), import_hf(tmp_path / "hf")):
        assert ours.cfg["pos_embed"] == "rope2d" and ours.proj is None and ours.cfg["act"] == "gelu"
        for hw in ((56, 56), (56, 84), (84, 42), (112, 112)):     # square, non-square both ways, other size
            o, t = run_both(ours, hf, torch.randn(2, 3, *hw))
            assert_same(o, t)
            assert torch.equal(o.embedding, o.pooled)


def test_mlcd_export_round_trips_through_from_pretrained(tmp_path):
    ours = randomize(build_model(dict(name="t", image_size=56, patch_size=14, width=64, layers=2, heads=4,
                                      mlp_dim=256, pos_embed="rope2d", act="gelu")))
    out = export_hf(ours, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mlcd_vision_model" and config["architectures"] == ["MLCDVisionModel"]
    keys = load_file(out / "model.safetensors").keys()
    assert "vision_model.pre_layrnorm.weight" in keys and "vision_model.class_pos_emb" in keys
    assert "vision_model.encoder.layers.1.self_attn.q_proj.bias" in keys
    hf, info = MLCDVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    for hw in ((56, 56), (56, 84)):
        assert_same(*run_both(ours, hf, torch.randn(2, 3, *hw)))
    # export over an existing directory replaces it, and nothing temporary is left beside it
    export_hf(ours, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # a RoPE2D model trained with a projection: MLCDVisionModel has none, so it is dropped, loudly
    cfg = dict(ours.cfg, embed_dim=16)
    with_proj = build_model(cfg)
    with pytest.warns(UserWarning, match="projection is not exported"):
        export_hf(with_proj, tmp_path / "export")
    assert "visual_projection.weight" not in load_file(out / "model.safetensors")
    assert torch.equal(import_hf(out).conv1.weight, with_proj.conv1.weight)


def test_clip_import_matches_transformers_incl_interpolation(tmp_path):
    hf = randomize(CLIPVisionModel(CLIPVisionConfig(**TINY)))
    hf.save_pretrained(tmp_path / "hf")
    for ours in (import_hf(hf), import_hf(tmp_path / "hf")):
        assert ours.cfg["pos_embed"] == "learned" and ours.proj is None and ours.cfg["act"] == "quick_gelu"
        assert_same(*run_both(ours, hf, torch.randn(2, 3, 56, 56)))
        # other sizes: our bicubic grid resize equals HF's interpolate_pos_encoding=True
        for hw in ((56, 84), (84, 56), (84, 84)):
            assert_same(*run_both(ours, hf, torch.randn(2, 3, *hw), interpolate_pos_encoding=True))


def test_clip_with_projection_import_and_export(tmp_path):
    hf = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, projection_dim=32)))
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.embed_dim == 32 and ours.cfg["embed_dim"] == 32
    for hw in ((56, 56), (56, 84)):
        kw = {} if hw == (56, 56) else {"interpolate_pos_encoding": True}
        o, t = run_both(ours, hf, torch.randn(2, 3, *hw), **kw)
        assert_same(o, t, pooled=False)           # WithProjection has no pooler_output ...
        torch.testing.assert_close(o.embedding, t.image_embeds, rtol=0, atol=ATOL)   # ... but image_embeds

    out = export_hf(ours, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model"
    assert config["architectures"] == ["CLIPVisionModelWithProjection"] and config["projection_dim"] == 32
    assert "visual_projection.weight" in load_file(out / "model.safetensors")
    back = load_hf_model(out).eval()
    assert type(back) is CLIPVisionModelWithProjection
    x = torch.randn(2, 3, 56, 56)
    o, t = run_both(ours, back, x)
    torch.testing.assert_close(o.embedding, t.image_embeds, rtol=0, atol=ATOL)
    # the plain vision tower of the same directory (what LLaVA-style code loads) gives our pooled output
    tower = CLIPVisionModel.from_pretrained(out).eval()
    assert_same(*run_both(ours, tower, x))


def test_clip_export_without_projection_and_preprocessor(tmp_path):
    ours = randomize(build_model(dict(image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_dim=256,
                                      pos_embed="learned", act="gelu")))
    out = export_hf(ours, tmp_path / "e")
    hf, info = CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.hidden_act == "gelu"
    assert_same(*run_both(ours, hf.eval(), torch.randn(2, 3, 56, 56)))
    assert_same(*run_both(ours, hf, torch.randn(2, 3, 42, 70), interpolate_pos_encoding=True))
    proc = CLIPImageProcessor.from_pretrained(out)
    assert proc.size["shortest_edge"] == 56 and (proc.crop_size["height"], proc.crop_size["width"]) == (56, 56)
    assert proc.resample == 3 and proc.do_center_crop
    assert list(proc.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(proc.image_std) == [0.26862954, 0.26130258, 0.27577711]
    import numpy as np
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    assert proc(images=img, return_tensors="pt")["pixel_values"].shape == (1, 3, 56, 56)


def test_full_clip_model_imports_vision_tower_and_projection(tmp_path):
    cfg = CLIPConfig(vision_config=dict(TINY), text_config=dict(hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, vocab_size=100), projection_dim=24)
    hf = randomize(CLIPModel(cfg))
    hf.save_pretrained(tmp_path / "clip")
    ours = import_hf(tmp_path / "clip")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)
        torch.testing.assert_close(ours(x).embedding, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_round_trip(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    hf = to_hf_config(cfg)
    assert hf.model_type == ("mlcd_vision_model" if cfg["pos_embed"] == "rope2d" else "clip_vision_model")
    back = from_hf_config(hf.to_dict(), name=cfg["name"])
    assert back == {**cfg, "ln_eps": float(cfg["ln_eps"])}


def test_bad_hf_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        from_hf_config(dict(MLCDVisionConfig(**TINY, hidden_act="gelu_new").to_dict()))
    with pytest.raises(ValueError, match="unsupported HF model_type 'vit'"):
        from_hf_config(dict(model_type="vit"))
    hf = MLCDVisionModel(MLCDVisionConfig(**TINY))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps(dict(json.loads((tmp_path / "hf" / "config.json").read_text()), num_hidden_layers=3)))
    with pytest.raises(ValueError, match="missing .*encoder.layers.2"):
        import_hf(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(tmp_path)


def test_rope2d_model_refuses_clip_export(tmp_path):
    """CLIPVisionModel.from_pretrained of a RoPE2D export fills the missing position embedding at random
    (pooled output off by 0.44 on bigG): the export must refuse the CLIP classes, before writing anything."""
    rope = build_model(dict(name="tiny_rope", image_size=56, patch_size=14, width=64, layers=2, heads=4,
                            mlp_dim=256, pos_embed="rope2d", act="gelu", embed_dim=16))
    for cls in ("CLIPVisionModel", "CLIPVisionModelWithProjection"):
        with pytest.raises(ValueError, match=f"'tiny_rope' uses RoPE2D.*MLCDVisionModel only, not {cls}"):
            export_hf(rope, tmp_path / "e", cls)
    assert not list(tmp_path.iterdir())
    learned = build_model(dict(image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_dim=256))
    with pytest.raises(ValueError, match="MLCDVisionModel is RoPE2D only"):
        export_hf(learned, tmp_path / "e", "MLCDVisionModel")
    with pytest.warns(UserWarning, match="projection is not exported"):
        out = export_hf(rope, tmp_path / "e", "MLCDVisionModel")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MLCDVisionModel"]


def test_exported_processor_crops_like_the_eval_transform(tmp_path):
    """HF's processor (as saved by the export; every backend this transformers has) and our eval transform on
    the same non-square images: the same crop box, hence the same pixels (the torchvision backend resamples
    with its own bicubic, so there only the crop position is compared)."""
    import numpy as np
    from PIL import Image
    from mlcd.data.transforms import EvalTransform
    out = export_hf(build_model(dict(image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_dim=256)),
                    tmp_path / "e")
    procs = {"CLIPImageProcessor": CLIPImageProcessor.from_pretrained(out)}
    for name in ("CLIPImageProcessorPil", "CLIPImageProcessorFast"):      # transformers 5 / 4
        if hasattr(transformers, name):
            procs[name] = getattr(transformers, name).from_pretrained(out)
    ours = EvalTransform(56)
    g = np.random.default_rng(0)
    # (h, w): no resize, the long side 56 + 15 / + 7 / + 3 / + 2 / + 1 (torchvision's CenterCrop rounds 7.5 -> 8,
    # 3.5 -> 4: 1 px off HF's floor), then resized ones (63 x 56 after resize: + 7 again)
    sizes = [(56, 71), (63, 56), (56, 59), (58, 56), (56, 57), (73, 64), (90, 120), (300, 61)]
    for h, w in sizes:
        img = Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
        mine = ours(img)
        for name, proc in procs.items():
            theirs = proc(images=img, return_tensors="pt")["pixel_values"][0]
            assert theirs.shape == mine.shape == (3, 56, 56)
            if min(h, w) == 56 or name == "CLIPImageProcessorPil":     # no resampling, or PIL's as ours
                torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5, msg=f"{name} {h}x{w}")
            else:                                   # own resampling: the crop must still line up
                def diff(dy, dx):                   # mean |difference| with ours shifted by (dy, dx)
                    return float((theirs[:, 1:-1, 1:-1] - mine[:, 1 + dy:55 + dy, 1 + dx:55 + dx]).abs().mean())
                shifted = min(diff(dy, dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)))
                assert diff(0, 0) < 0.1 < shifted, (name, h, w, diff(0, 0), shifted)
