"""Model zoo: one ViT class configured by data (configs/train/model/*.yaml), plus HF import/export (mlcd.models.hf)."""
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from mlcd.models.vit import ViTOutput, VisionTransformer

REQUIRED = ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim")
DEFAULTS = {"name": None, "embed_dim": None, "pos_embed": "learned", "act": "gelu", "ln_eps": 1e-5}


def model_config(cfg) -> dict:
    """A plain, complete model config dict from a dict or OmegaConf mapping; unknown or missing keys are errors."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model config must be a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    unknown = sorted(set(cfg) - set(REQUIRED) - set(DEFAULTS))
    if missing or unknown:
        raise ValueError(f"model config: missing keys {missing}, unknown keys {unknown} "
                         f"(expected {list(REQUIRED) + list(DEFAULTS)})")
    out = {**DEFAULTS, **cfg}
    for k in REQUIRED:
        out[k] = int(out[k])
    out["embed_dim"] = int(out["embed_dim"]) if out["embed_dim"] else None
    out["ln_eps"] = float(out["ln_eps"])
    return out


def build_model(cfg) -> VisionTransformer:
    """The ViT for a model config (keys: name, image_size, patch_size, width, layers, heads, mlp_dim,
    embed_dim (None: no projection), pos_embed ('learned' | 'rope2d'), act ('gelu' | 'quick_gelu'), ln_eps).
    Build under `with torch.device("meta"):` to count parameters without allocating."""
    return VisionTransformer(**model_config(cfg))


__all__ = ["build_model", "model_config", "VisionTransformer", "ViTOutput"]
