"""Frozen backbones: what image goes in (the backbone's eval transform) and which feature comes out. The one
place an encoder is built, for every consumer: the linear probe (mlcd/eval), feature extraction for clustering
(cluster.py: its open_clip teacher or extract.backbone, via mlcd.cluster.extract.encoder_config) and the training
monitor. So the probe's "features used for clustering" baseline is the clustering encoder by construction.

types:  mlcd      our training checkpoint (mlcd.models.loading.load_backbone)
        hf        an HF CLIPVisionModel / MLCDVisionModel directory (mlcd.models.hf.import_hf)
        open_clip model name + pretrained tag or file (none: random init from `seed`, warned); `model_config`: an
                  open_clip JSON registered first; `text: true` keeps the text tower (encode_text, tokenizer)
        random    our ViT at random init from a model config (a baseline)
        pixels    the identity: flattened raw pixels in [0, 1] (a sanity baseline)
features (our ViT and open_clip ViTs):
        pooled      ln_post(class token), before the projection (CLIP's I_f; the default)
        embedding   after the projection (= pooled when the model has none); open_clip: encode_image itself
        patch_mean  mean of the last layer's patch tokens
"""
import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from mlcd.data.transforms import EvalTransform, resize_center_crop
from mlcd.validate import PRECISIONS

FEATURES = ("pooled", "embedding", "patch_mean")


class PixelsTransform:
    """Raw pixels in [0, 1] for the sanity baseline: mode L or RGB, resize_center_crop to `size` when given."""

    def __init__(self, size, mode: str):
        self.size, self.mode = size, mode

    def __call__(self, img):
        img = img.convert(self.mode)
        x = torch.from_numpy(np.array(resize_center_crop(img, int(self.size)) if self.size else img, dtype=np.uint8))
        return (x[None] if x.ndim == 2 else x.permute(2, 0, 1)).float().div(255)  # torchvision's to_tensor

    def __repr__(self):
        return f"PixelsTransform(size={self.size}, mode={self.mode})"


def path_signature(path) -> str:
    """Cheap fingerprint of a file or directory tree: names, sizes and mtimes (no reading)."""
    p = Path(path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"backbone path {p} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha1(str(p).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class Backbone:
    """A frozen feature extractor: `transform` (PIL -> tensor) and `__call__` (batch -> [B, D], float32).
    `name` and `pretrained` are what CLIP_benchmark's results call `model` and `pretrained`.
    `precision` (mlcd.validate.PRECISIONS): auto = bf16 autocast on a GPU; the CPU always runs fp32.
    `encode_text` and `tokenizer`: an open_clip model's text side when built with `text: true`, else None."""

    def __init__(self, kind, model, transform, feature, identity, forward, name: str, pretrained: str,
                 text=None):
        self.kind, self.model, self.transform, self.feature = kind, model, transform, feature
        self.identity = dict(identity, type=kind, feature=feature, transform=repr(transform))
        self._forward = forward
        self.name, self.pretrained = name, pretrained
        self.precision = "auto"
        self.device = torch.device("cpu")
        self._dim = None
        # text: (module holding the text tower, tokens -> features, tokenizer)
        self._text_model, text_forward, self.tokenizer = text or (None, None, None)
        self.encode_text = None if text_forward is None else (lambda tokens: self._run(text_forward, tokens))

    def to(self, device):
        self.device = torch.device(device)
        for m in (self.model, self._text_model):
            if m is not None:
                m.to(self.device)
        return self

    def _autocast(self, device: torch.device):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {list(PRECISIONS)}")
        if device.type != "cuda" or self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)

    @torch.no_grad()
    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        with self._autocast(x.device):
            f = fn(x)
        return f.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self._forward, x)

    @property
    def dim(self) -> int:
        """The feature width, from one forward of a blank image (an empty shard still needs its [0, D] array)."""
        if self._dim is None:
            from PIL import Image
            self._dim = int(self(self.transform(Image.new("RGB", (64, 64)))[None].to(self.device)).shape[1])
        return self._dim


def _our_vit_forward(model, feature):
    def forward(x):
        out = model(x)
        if feature == "pooled":
            return out.pooled
        if feature == "embedding":
            return out.embedding
        return out.last_hidden_state[:, 1:].mean(1)
    return forward


def _model_cfg(cfg):
    """A model config: a mapping or the path of a .yaml file. A bare name (vit_tiny) is the entry script's to
    resolve (eval_linear_probe.py: configs/train/model/<name>.yaml); the library reads no configs/ directory."""
    from omegaconf import OmegaConf
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        if path.suffix != ".yaml":
            raise ValueError(f"backbone.model={str(cfg)!r}: give a model config mapping or the path of a .yaml file "
                             f"(e.g. configs/train/model/{path.name}.yaml)")
        if not path.exists():
            raise FileNotFoundError(f"backbone.model={str(cfg)!r}: model config {path} not found")
        cfg = OmegaConf.load(path)
    elif not (isinstance(cfg, Mapping) or OmegaConf.is_dict(cfg)):
        raise ValueError(f"backbone.model={cfg!r}: give a model config mapping or the path of a .yaml file")
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)


def _open_clip(cfg, feature):
    import open_clip
    if cfg.get("model_config"):  # a custom architecture given as an open_clip JSON config
        open_clip.add_model_config(cfg["model_config"])
    pretrained = cfg.get("pretrained")
    if pretrained in (None, "", "none"):
        warnings.warn(f"open_clip backbone {cfg['name']} has no pretrained weights: probing a RANDOM init")
        pretrained = None
    # A random init must be the same on every rank, every resume, and in the probe of the clustering features.
    torch.manual_seed(int(cfg.get("seed") or 0))
    model, _, preprocess = open_clip.create_model_and_transforms(cfg["name"], pretrained=pretrained,
                                                                 force_image_size=cfg.get("image_size"))
    model.eval()
    visual = model.visual
    ident = {"name": cfg["name"], "pretrained": pretrained, "image_size": cfg.get("image_size")}
    if cfg.get("model_config"):
        ident["model_config"] = str(cfg["model_config"])
        ident["model_config_sig"] = path_signature(cfg["model_config"])
    if pretrained is None:
        ident["seed"] = int(cfg.get("seed") or 0)
    if pretrained and os.path.exists(pretrained):
        ident["pretrained_sig"] = path_signature(pretrained)
    is_vit = all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool"))
    if not is_vit and feature != "embedding":
        raise ValueError(f"open_clip {cfg['name']} is not a ViT: only feature=embedding is available")

    def forward(x):
        if feature == "embedding":
            return visual(x)  # what encode_image (normalize=False) runs, so clustering features stay bit-identical
        pooled, tokens = visual._pool(visual.transformer(visual._embeds(x)))
        return pooled if feature == "pooled" else tokens.mean(1)
    text = (model, model.encode_text, open_clip.get_tokenizer(cfg["name"])) if cfg.get("text") else None
    return visual, preprocess, ident, forward, text


def build_backbone(cfg, feature: str = "pooled", grayscale: bool = False) -> Backbone:
    """Backbone from a config mapping with `type` and the type's keys (configs/eval/eval_linear_probe.yaml)."""
    cfg = dict(cfg)
    kind = cfg.get("type")
    if kind != "pixels" and feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if kind == "pixels":
        size = cfg.get("image_size")
        mode = cfg.get("mode") or ("L" if grayscale else "RGB")
        return Backbone(kind, None, PixelsTransform(size, mode), "pixels", {"image_size": size, "mode": mode}, lambda x: x.flatten(1),
                        name=f"pixels{size or ''}", pretrained="none")
    if kind == "open_clip":
        model, tf, ident, fwd, text = _open_clip(cfg, feature)
        pretrained = ident["pretrained"] or f"random_init_seed{ident['seed']}"
        return Backbone(kind, model, tf, feature, ident, fwd, name=cfg["name"], pretrained=str(pretrained), text=text)
    if kind == "mlcd":
        from mlcd.models.loading import load_backbone
        model, model_cfg = load_backbone(cfg["path"])
        ident = {"path": str(Path(cfg["path"]).resolve()), "sig": path_signature(cfg["path"])}
        pretrained = ident["path"]
    elif kind == "hf":
        from mlcd.models.hf import import_hf
        model = import_hf(cfg["path"])
        ident = {"path": str(Path(cfg["path"]).resolve()), "sig": path_signature(cfg["path"])}
        pretrained = ident["path"]
    elif kind == "random":
        from mlcd.models import build_model
        model_cfg = _model_cfg(cfg["model"])
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = build_model(model_cfg)
        ident = {"model": model_cfg, "seed": int(cfg.get("seed", 0))}
        pretrained = f"random_init_seed{ident['seed']}"
    else:
        raise ValueError(f"backbone.type must be mlcd | hf | open_clip | random | pixels, got {kind!r}")
    model.eval()
    return Backbone(kind, model, EvalTransform(int(model.image_size)), feature, ident,
                    _our_vit_forward(model, feature), name=model.cfg.get("name") or "vit", pretrained=pretrained)


def identity_key(identity: dict) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
