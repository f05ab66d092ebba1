"""Frozen backbones: what image goes in (the backbone's eval transform) and which feature comes out. The one
loading path for every consumer of a trained or external encoder: the linear probe (mlcd/eval), feature
extraction for clustering (cluster.py extract.backbone) and the training monitor.

types:  mlcd      our training checkpoint (mlcd.models.loading.load_backbone)
        hf        an HF CLIPVisionModel / MLCDVisionModel directory (mlcd.models.hf.import_hf)
        open_clip model name + pretrained tag or file (none: random init, warned)
        random    our ViT at random init from a model config (a baseline)
        pixels    the identity: flattened raw pixels in [0, 1] (a sanity baseline)
features (our ViT and open_clip ViTs):
        pooled      ln_post(class token), before the projection (CLIP's I_f; the default)
        embedding   after the projection (= pooled when the model has none)
        patch_mean  mean of the last layer's patch tokens
"""
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torchvision import transforms as T

from mlcd.data.transforms import CLIP_MEAN, CLIP_STD

FEATURES = ("pooled", "embedding", "patch_mean")
REPO = Path(__file__).resolve().parents[2]


def _to_rgb(img):
    return img.convert("RGB")


def _to_gray(img):
    return img.convert("L")


class CenterCropFloor:
    """Center crop whose offset is floor((W - size) / 2), as Hugging Face's image processors crop (all
    versions and backends); torchvision's CenterCrop rounds half to even, 1 px off whenever W - size is 3
    mod 4. Why: our exported CLIPImageProcessor must see exactly the pixels this eval transform sees."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img):
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self):
        return f"CenterCropFloor(size={self.size})"


def eval_transform(image_size: int):
    """Resize the shorter side (bicubic), center crop (floor offset), CLIP normalisation; grayscale -> RGB.
    The same pixels as the CLIPImageProcessor mlcd.models.hf exports (tests/test_hf_interop.py)."""
    return T.Compose([T.Lambda(_to_rgb), T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      CenterCropFloor(image_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


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
    """A frozen feature extractor: `transform` (PIL -> tensor) and `__call__` (batch -> [B, D]).
    `name` and `pretrained` are what CLIP_benchmark's results call `model` and `pretrained`."""

    def __init__(self, kind, model, transform, feature, identity, forward, name: str, pretrained: str):
        self.kind, self.model, self.transform, self.feature = kind, model, transform, feature
        self.identity = dict(identity, type=kind, feature=feature, transform=repr(transform))
        self._forward = forward
        self.name, self.pretrained = name, pretrained

    def to(self, device):
        if self.model is not None:
            self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        use_amp = x.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            f = self._forward(x)
        return f.float()


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
    """A model config mapping, or the name of configs/train/model/<name>.yaml."""
    from omegaconf import OmegaConf
    if isinstance(cfg, str):
        path = Path(cfg) if cfg.endswith(".yaml") else REPO / "configs" / "train" / "model" / f"{cfg}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"model config {path} not found")
        cfg = OmegaConf.load(path)
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)


def _open_clip(cfg, feature):
    import open_clip
    pretrained = cfg.get("pretrained")
    if pretrained in (None, "", "none"):
        warnings.warn(f"open_clip backbone {cfg['name']} has no pretrained weights: probing a RANDOM init")
        pretrained = None
    # Seeded like cluster.py's extract stage, so a random-init model here is the one that made the clusters.
    torch.manual_seed(int(cfg.get("seed") or 0))
    model, _, preprocess = open_clip.create_model_and_transforms(cfg["name"], pretrained=pretrained,
                                                                 force_image_size=cfg.get("image_size"))
    visual = model.visual.eval()
    ident = {"name": cfg["name"], "pretrained": pretrained, "image_size": cfg.get("image_size")}
    if pretrained is None:
        ident["seed"] = int(cfg.get("seed") or 0)
    if pretrained and os.path.exists(pretrained):
        ident["pretrained_sig"] = path_signature(pretrained)
    is_vit = all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool"))
    if not is_vit and feature != "embedding":
        raise ValueError(f"open_clip {cfg['name']} is not a ViT: only feature=embedding is available")

    def forward(x):
        if not is_vit:
            return visual(x)
        pooled, tokens = visual._pool(visual.transformer(visual._embeds(x)))
        if feature == "pooled":
            return pooled
        if feature == "embedding":
            return pooled @ visual.proj if visual.proj is not None else pooled
        return tokens.mean(1)
    return visual, preprocess, ident, forward


def build_backbone(cfg, feature: str = "pooled", grayscale: bool = False) -> Backbone:
    """Backbone from a config mapping with `type` and the type's keys (configs/eval/eval_linear_probe.yaml)."""
    cfg = dict(cfg)
    kind = cfg.get("type")
    if kind != "pixels" and feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if kind == "pixels":
        size = cfg.get("image_size")
        mode = cfg.get("mode") or ("L" if grayscale else "RGB")
        steps = [T.Lambda(_to_gray if mode == "L" else _to_rgb)]
        if size:
            steps += [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), CenterCropFloor(size)]
        tf = T.Compose(steps + [T.ToTensor()])
        return Backbone(kind, None, tf, "pixels", {"image_size": size, "mode": mode}, lambda x: x.flatten(1),
                        name=f"pixels{size or ''}", pretrained="none")
    if kind == "open_clip":
        model, tf, ident, fwd = _open_clip(cfg, feature)
        pretrained = ident["pretrained"] or f"random_init_seed{ident['seed']}"
        return Backbone(kind, model, tf, feature, ident, fwd, name=cfg["name"], pretrained=str(pretrained))
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
    return Backbone(kind, model, eval_transform(int(model.image_size)), feature, ident,
                    _our_vit_forward(model, feature), name=model.cfg.get("name") or "vit", pretrained=pretrained)


def identity_key(identity: dict) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
