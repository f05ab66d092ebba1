"""The ViT against a float64 reference written here from the spec (mlcd_method.md §5), RoPE2D properties,
gradient checkpointing, input errors, and every configs/train/model/*.yaml (built on the meta device, with the
parameter counts of the released models)."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mlcd.models import build_model
from mlcd.models.vit import apply_rope, rope2d_angles

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train" / "model").glob("*.yaml"))
SMALL = dict(image_size=28, patch_size=7, width=32, layers=2, heads=4, mlp_dim=64)


def perturbed(cfg, seed=0):
    """A model whose every parameter (biases, LayerNorms too) is random, so no mapping hides behind 0/1."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def rotation(angles, head_dim):
    """[S, hd, hd] block rotation: dims (i, i + hd/2) turn together by angles[:, i] (split-half RoPE)."""
    S, half = angles.shape[0], head_dim // 2
    R = torch.zeros(S, head_dim, head_dim, dtype=torch.float64)
    for i in range(half):
        c, s = torch.cos(angles[:, i]), torch.sin(angles[:, i])
        R[:, i, i], R[:, i, i + half] = c, -s
        R[:, i + half, i], R[:, i + half, i + half] = s, c
    return R


def reference(model, x):
    """Dense float64 forward from the architecture description; returns (pooled, embedding, hidden list)."""
    cfg = model.cfg
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = x.double()
    B, _, H, W = x.shape
    p, D, nh = cfg["patch_size"], cfg["width"], cfg["heads"]
    hd, gh, gw = D // nh, H // p, W // p
    patches = x.reshape(B, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, 3 * p * p)
    tok = patches @ sd["conv1.weight"].reshape(D, -1).T
    tok = torch.cat([sd["class_embedding"].expand(B, 1, D), tok], 1)
    S = tok.shape[1]

    def ln(t, name):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + cfg["ln_eps"]) * sd[name + ".weight"] + sd[name + ".bias"]

    R = None
    if cfg["pos_embed"] == "learned":
        assert (gh, gw) == (model.grid, model.grid)
        tok = tok + sd["positional_embedding"]
    else:
        half = hd // 2
        angles = torch.zeros(S, half, dtype=torch.float64)
        angles[0] = sd["class_pos_emb"][0]
        for s in range(1, S):
            r, c = divmod(s - 1, gw)       # row-major patches: row = (s-1) // cols
            for j in range(half // 2):
                f = 10000.0 ** (-2 * j / half)
                angles[s, j], angles[s, half // 2 + j] = r * f, c * f
        R = rotation(angles, hd)
    act = (lambda t: t * torch.sigmoid(1.702 * t)) if cfg["act"] == "quick_gelu" else \
        (lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))))
    h = ln(tok, "ln_pre")
    hidden = [h]
    for i in range(cfg["layers"]):
        pre = f"blocks.{i}."
        y = ln(h, pre + "ln_1")
        qkv = y @ sd[pre + "attn.in_proj.weight"].T + sd[pre + "attn.in_proj.bias"]
        q, k, v = (qkv[..., j * D:(j + 1) * D].reshape(B, S, nh, hd) for j in range(3))
        if R is not None:
            q, k = torch.einsum("sij,bshj->bshi", R, q), torch.einsum("sij,bshj->bshi", R, k)
        att = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(hd), -1)
        o = torch.einsum("bhst,bthd->bshd", att, v).reshape(B, S, D)
        h = h + o @ sd[pre + "attn.out_proj.weight"].T + sd[pre + "attn.out_proj.bias"]
        y = act(ln(h, pre + "ln_2") @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        h = h + y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        hidden.append(h)
    pooled = ln(h[:, 0], "ln_post")
    emb = pooled @ sd["proj.weight"].T if "proj.weight" in sd else pooled
    return pooled, emb, hidden


@pytest.mark.parametrize("pos_embed,act,embed_dim,hw", [
    ("rope2d", "gelu", None, (28, 28)),
    ("rope2d", "gelu", 16, (21, 35)),        # non-square: 3 rows x 5 columns of patches
    ("rope2d", "quick_gelu", None, (35, 14)),
    ("learned", "quick_gelu", 16, (28, 28)),
    ("learned", "gelu", None, (28, 28)),
])
def test_matches_float64_reference(pos_embed, act, embed_dim, hw):
    model = perturbed(dict(SMALL, pos_embed=pos_embed, act=act, embed_dim=embed_dim))
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    pooled, emb, hidden = reference(model, x)
    assert out.last_hidden_state.shape == (2, 1 + (hw[0] // 7) * (hw[1] // 7), 32)
    assert out.embedding.shape == (2, embed_dim or 32) and model.embed_dim == (embed_dim or 32)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1] is out.last_hidden_state
    for a, b in zip(out.hidden_states, hidden):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled.double(), pooled, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.embedding.double(), emb, atol=2e-5, rtol=1e-5)
    assert model(x).hidden_states is None


def test_rope2d_is_relative_and_row_major():
    """q.k after RoPE2D depends only on the (row, col) offset; angles are [rows | cols] in row-major order."""
    hd, gh, gw = 16, 3, 5
    angles = rope2d_angles(gh, gw, hd, torch.zeros(1, hd // 2))
    assert angles.shape == (1 + gh * gw, hd // 2)
    inv = 10000.0 ** (-torch.arange(0, hd // 2, 2).double() / (hd // 2))
    for s in range(gh * gw):
        r, c = divmod(s, gw)
        torch.testing.assert_close(angles[1 + s].double(), torch.cat([r * inv, c * inv]), rtol=0, atol=1e-6)
    full = torch.cat([angles, angles], -1)
    cos, sin = full.cos(), full.sin()
    torch.manual_seed(0)
    u, v = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def rot(t):   # the same vector placed at every position, rotated
        return apply_rope(t.float().expand(1, 1 + gh * gw, 1, hd), cos, sin)[0, :, 0].double()

    def pos(r, c):
        return 1 + r * gw + c

    ru, rv = rot(u), rot(v)
    pairs = [((0, 0), (1, 2), (1, 1), (2, 3)), ((2, 4), (0, 1), (2, 3), (0, 0))]
    for (r1, c1), (r2, c2), (r3, c3), (r4, c4) in pairs:
        assert (r1 - r2, c1 - c2) == (r3 - r4, c3 - c4)
        torch.testing.assert_close(ru[pos(r1, c1)] @ rv[pos(r2, c2)], ru[pos(r3, c3)] @ rv[pos(r4, c4)],
                                   atol=1e-5, rtol=0)
    assert not torch.allclose(ru[pos(0, 0)] @ rv[pos(0, 1)], ru[pos(0, 0)] @ rv[pos(1, 0)], atol=1e-3)


def test_learned_pos_embed_resizes_grid_and_keeps_class_position():
    model = perturbed(dict(SMALL, pos_embed="learned"))
    pe = model.positional_embedding
    assert model.position_embedding(4, 4) is pe
    big = model.position_embedding(3, 6)
    assert big.shape == (1 + 18, 32)
    assert torch.equal(big[0], pe[0])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 21, 42)).last_hidden_state.shape == (1, 19, 32)


def test_grad_checkpointing_same_output_and_grads():
    for pos_embed in ("rope2d", "learned"):
        model = perturbed(dict(SMALL, pos_embed=pos_embed, embed_dim=16)).train()
        x = torch.randn(3, 3, 28, 28)
        results = []
        for ckpt in (False, True):
            model.zero_grad()
            model.set_grad_checkpointing(ckpt)
            out = model(x)
            (out.embedding.square().sum() + out.last_hidden_state[:, 1:].mean()).backward()
            results.append((out.embedding.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
        assert results[0][1].keys() == results[1][1].keys()
        for n in results[0][1]:
            torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-5, atol=1e-6, msg=n)
        assert results[0][1]["blocks.0.attn.in_proj.weight"].abs().sum() > 0


def test_bf16_autocast_close_to_fp32():
    model = perturbed(dict(SMALL, pos_embed="rope2d"))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = model(x).pooled
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).pooled
    assert low.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(low).all()
    assert F.cosine_similarity(low.float(), ref, dim=-1).min() > 0.99


def test_input_errors_are_clear():
    model = build_model(dict(SMALL))
    with pytest.raises(ValueError, match=r"30x28 is not divisible by the patch size 7"):
        model(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="unknown keys \\['depth'\\]"):
        build_model(dict(SMALL, depth=3))
    with pytest.raises(ValueError, match="missing keys \\['mlp_dim'\\]"):
        build_model({k: v for k, v in SMALL.items() if k != "mlp_dim"})
    with pytest.raises(ValueError, match="pos_embed"):
        build_model(dict(SMALL, pos_embed="sincos"))
    with pytest.raises(ValueError, match="head_dim"):
        build_model(dict(SMALL, heads=16, pos_embed="rope2d"))    # head_dim 2: no (row, col) split


def count(model):
    return sum(p.numel() for p in model.parameters())


def vit_params(image_size, patch, width, layers, heads, mlp, embed_dim, rope):
    """Parameter count from the architecture: patch conv + class token + positions + 3 LayerNorms +
    blocks (2 LN, fused qkv with bias, out proj, fc1, fc2) + projection."""
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (width * mlp + mlp) + (mlp * width + width)
    pos = (width // heads) // 2 if rope else (1 + (image_size // patch) ** 2) * width
    return 3 * patch * patch * width + width + pos + 2 * 2 * width + layers * block + (width * (embed_dim or 0))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_yaml_builds_on_meta(path):
    cfg = OmegaConf.load(path)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.cfg["name"] == path.stem
    assert model.image_size == cfg.image_size and model.width == cfg.width
    assert model.embed_dim == (cfg.embed_dim or cfg.width)
    assert hasattr(model, "class_pos_emb") == (cfg.pos_embed == "rope2d")
    assert hasattr(model, "positional_embedding") == (cfg.pos_embed == "learned")
    if cfg.pos_embed == "rope2d":
        assert cfg.heads == 16
    assert count(model) == vit_params(cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads,
                                      cfg.mlp_dim, cfg.embed_dim, cfg.pos_embed == "rope2d")


def test_bigg_matches_released_mlcd_parameter_count():
    from transformers import MLCDVisionConfig, MLCDVisionModel
    expected = vit_params(336, 14, 1664, 48, 16, 8192, None, True)
    assert 1.83e9 < expected < 1.85e9                       # "~1.84B"
    with torch.device("meta"):
        hf = MLCDVisionModel(MLCDVisionConfig())
        ours = {s: build_model(OmegaConf.load(p)) for s, p in
                ((s, p) for p in CONFIGS for s in [p.stem] if s.startswith("vit_bigg14"))}
    assert count(hf) == expected
    assert set(ours) == {"vit_bigg14_224", "vit_bigg14_336", "vit_bigg14_448"}
    for model in ours.values():     # RoPE2D: the count does not depend on the resolution
        assert count(model) == expected
        assert model.head_dim == 104 and model.class_pos_emb.shape == (1, 52)


def test_l14_336_matches_clip_vision_tower_count():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    with torch.device("meta"):
        hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                              intermediate_size=4096, patch_size=14, image_size=336))
        ours = build_model(OmegaConf.load(CONFIGS[0].parent / "vit_l14_336.yaml"))
    assert count(ours) == count(hf) + 1024 * 768 == vit_params(336, 14, 1024, 24, 16, 4096, 768, False)
    assert 3.0e8 < count(ours) < 3.1e8
