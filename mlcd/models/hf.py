"""Exact interop with Hugging Face `transformers`.

RoPE2D models <-> `MLCDVisionModel` (model_type mlcd_vision_model, the released ViT-bigG/14 MLCD models);
learned-position models <-> `CLIPVisionModel`, or `CLIPVisionModelWithProjection` when the model has a
projection (the released B/32 and L/14-336 MLCD models are `clip_vision_model`s). A full `CLIPModel`
directory (model_type clip, e.g. OpenAI CLIP) imports as its vision tower plus `visual_projection`.
A RoPE2D model is never exported as a CLIP class (`hf_class` says why): LLaVA-style code must load it
with `MLCDVisionModel`.

A released model is also a starting point for training: `hf_source(dir)` reads what it is (class, our model
config, image processor) without loading weights, and refuses what cannot start a run (train.init_from);
`export_hf(model, out, like=dir)` writes the adapted model in that source's class with its image processor.

Exported weights use the `vision_model.` prefix of the released checkpoints (including its `pre_layrnorm`
spelling), which transformers 4.x and 5.x both load; `visual_projection.weight` sits at the top level.
"""
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mlcd import fileio
from mlcd.data.transforms import CLIP_MEAN, CLIP_STD
from mlcd.models import build_model, model_config
from mlcd.models.vit import ROPE_THETA

_ACTS = ("gelu", "quick_gelu")
# Checkpoint entries that carry no weights of the vision tower (a full CLIPModel, old buffers).
_IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
_IGNORED_SUFFIXES = ("position_ids", "inv_freq")


# ----------------------------------------------------------------------------------------------- configs
HF_CLASSES = ("MLCDVisionModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")


def hf_class(cfg, requested: str | None = None) -> str:
    """The transformers class an export of this model declares: MLCDVisionModel for RoPE2D, CLIPVisionModel
    (WithProjection when it has one) for learned positions; `requested` may pick another that fits.

    A RoPE2D model never becomes a CLIP class: CLIPVisionModel has a learned absolute position embedding that
    nothing in our weights fills, and from_pretrained initialises it randomly with only a log line, so the
    features would be silently wrong."""
    cfg = model_config(cfg)
    rope = cfg["pos_embed"] == "rope2d"
    auto = ("MLCDVisionModel" if rope else
            "CLIPVisionModelWithProjection" if cfg["embed_dim"] else "CLIPVisionModel")
    if requested in (None, "auto"):
        return auto
    if requested not in HF_CLASSES:
        raise ValueError(f"hf class must be auto or one of {HF_CLASSES}, got {requested!r}")
    if rope and requested != "MLCDVisionModel":
        raise ValueError(f"model {cfg['name']!r} uses RoPE2D positions: it exports as MLCDVisionModel only, not "
                         f"{requested}. {requested} has a learned position embedding that these weights cannot "
                         "fill; from_pretrained would initialise it randomly and return wrong features. Load the "
                         "export with transformers.MLCDVisionModel (or AutoModel); LLaVA-style code that hard-codes "
                         "CLIPVisionModel must be changed to do so.")
    if not rope and requested == "MLCDVisionModel":
        raise ValueError(f"model {cfg['name']!r} has learned absolute positions: MLCDVisionModel is RoPE2D only; "
                         "export as CLIPVisionModel or CLIPVisionModelWithProjection")
    if requested == "CLIPVisionModelWithProjection" and not cfg["embed_dim"]:
        raise ValueError(f"model {cfg['name']!r} has no projection: export as CLIPVisionModel")
    return requested


def to_hf_config(cfg, requested: str | None = None):
    """Our model config -> a transformers config (MLCDVisionConfig or CLIPVisionConfig) with `architectures`
    (`requested`: see hf_class)."""
    from transformers import CLIPVisionConfig, MLCDVisionConfig
    cfg = model_config(cfg)
    arch = hf_class(cfg, requested)
    common = dict(hidden_size=cfg["width"], intermediate_size=cfg["mlp_dim"], num_hidden_layers=cfg["layers"],
                  num_attention_heads=cfg["heads"], num_channels=3, image_size=cfg["image_size"],
                  patch_size=cfg["patch_size"], hidden_act=cfg["act"], layer_norm_eps=cfg["ln_eps"],
                  attention_dropout=0.0)
    if arch == "MLCDVisionModel":
        hf = MLCDVisionConfig(**common, num_key_value_groups=1,
                              rope_parameters={"rope_theta": ROPE_THETA, "rope_type": "axial"})
    else:
        hf = CLIPVisionConfig(**common, projection_dim=cfg["embed_dim"] or cfg["width"])
    hf.architectures = [arch]
    return hf


def _square(value, what):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"HF config {what}={value} is not square; our ViT needs a single int")
        value = value[0]
    return int(value)


def from_hf_config(hf_config, with_projection: bool | None = None, name: str | None = None) -> dict:
    """A transformers config (object or config.json dict) -> our model config dict.

    with_projection: whether the checkpoint has `visual_projection.weight` (None: guess from `architectures`)."""
    from transformers import AutoConfig
    if isinstance(hf_config, dict):
        d = dict(hf_config)
        model_type = d.pop("model_type", None)
        if model_type is None:
            raise ValueError("HF config has no model_type")
        hf_config = AutoConfig.for_model(model_type, **d)
    model_type = hf_config.model_type
    archs = list(getattr(hf_config, "architectures", None) or [])
    if model_type == "clip":            # a full CLIP model: its vision tower and visual_projection
        vc, projection_dim = hf_config.vision_config, hf_config.projection_dim
        if with_projection is None:
            with_projection = True
    elif model_type in ("clip_vision_model", "mlcd_vision_model"):
        vc, projection_dim = hf_config, getattr(hf_config, "projection_dim", None)
        if with_projection is None:
            with_projection = any("WithProjection" in a for a in archs)
    else:
        raise ValueError(f"unsupported HF model_type {model_type!r} (expected mlcd_vision_model, "
                         "clip_vision_model or clip)")
    act = vc.hidden_act
    if act not in _ACTS:
        raise ValueError(f"HF config hidden_act={act!r} is not supported (expected one of {_ACTS})")
    if getattr(vc, "num_channels", 3) != 3:
        raise ValueError(f"HF config num_channels={vc.num_channels}: only RGB (3) is supported")
    cfg = dict(name=name or f"hf_{model_type}", image_size=_square(vc.image_size, "image_size"),
               patch_size=_square(vc.patch_size, "patch_size"), width=vc.hidden_size,
               layers=vc.num_hidden_layers, heads=vc.num_attention_heads, mlp_dim=vc.intermediate_size,
               embed_dim=None, act=act, ln_eps=vc.layer_norm_eps)
    if model_type == "mlcd_vision_model":
        rope = dict(getattr(vc, "rope_parameters", None) or {})
        theta = float(rope.get("rope_theta", ROPE_THETA))
        if theta != ROPE_THETA or rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"HF MLCD rope_parameters={rope}: only axial rope, theta {ROPE_THETA} is supported")
        if getattr(vc, "num_key_value_groups", 1) != 1:
            raise ValueError(f"HF MLCD num_key_value_groups={vc.num_key_value_groups}: only 1 is supported")
        cfg["pos_embed"] = "rope2d"
        if with_projection:
            raise ValueError("MLCDVisionModel has no projection head; with_projection must be False")
    else:
        cfg["pos_embed"] = "learned"
        cfg["embed_dim"] = int(projection_dim) if with_projection else None
    return model_config(cfg)


# ---------------------------------------------------------------------------------------------- weights
def _hf_names(cfg) -> list[tuple[str, list[str]]]:
    """(our key, [HF keys without the vision_model. prefix]); a fused qkv maps to three HF keys."""
    names = [("conv1.weight", ["embeddings.patch_embedding.weight"]),
             ("class_embedding", ["embeddings.class_embedding"])]
    if cfg["pos_embed"] == "learned":
        names.append(("positional_embedding", ["embeddings.position_embedding.weight"]))
    else:
        names.append(("class_pos_emb", ["class_pos_emb"]))
    for wb in ("weight", "bias"):
        names.append((f"ln_pre.{wb}", [f"pre_layrnorm.{wb}"]))
        names.append((f"ln_post.{wb}", [f"post_layernorm.{wb}"]))
    for i in range(cfg["layers"]):
        ours, hf = f"blocks.{i}.", f"encoder.layers.{i}."
        for wb in ("weight", "bias"):
            names += [(f"{ours}ln_1.{wb}", [f"{hf}layer_norm1.{wb}"]),
                      (f"{ours}ln_2.{wb}", [f"{hf}layer_norm2.{wb}"]),
                      (f"{ours}attn.in_proj.{wb}", [f"{hf}self_attn.{q}_proj.{wb}" for q in "qkv"]),
                      (f"{ours}attn.out_proj.{wb}", [f"{hf}self_attn.out_proj.{wb}"]),
                      (f"{ours}mlp.fc1.{wb}", [f"{hf}mlp.fc1.{wb}"]),
                      (f"{ours}mlp.fc2.{wb}", [f"{hf}mlp.fc2.{wb}"])]
    return names


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under the released checkpoints' names (`vision_model.` prefix, `visual_projection.weight`)."""
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {}
    for key, hf_keys in _hf_names(model.cfg):
        parts = ours.pop(key).chunk(len(hf_keys), dim=0)
        for hf_key, part in zip(hf_keys, parts):
            out["vision_model." + hf_key] = part.clone().contiguous()
    proj = ours.pop("proj.weight", None)
    if proj is not None and model.cfg["pos_embed"] == "learned":
        out["visual_projection.weight"] = proj.clone().contiguous()
    if ours:
        raise RuntimeError(f"weights with no HF name: {sorted(ours)}")
    return out


def _match_names(cfg, names) -> tuple[dict, list[str], list[str]]:
    """({our key: [full HF keys]}, missing HF keys, unexpected HF keys) for the HF weight names `names` (with or
    without the vision_model. prefix; the text tower of a full CLIPModel and old buffers are ignored)."""
    hf = {}
    for k in names:
        if k.startswith(_IGNORED_PREFIXES) or k.endswith(_IGNORED_SUFFIXES):
            continue
        hf[k.removeprefix("_orig_mod.").removeprefix("vision_model.")] = k
    found, missing = {}, []
    for key, hf_keys in _hf_names(cfg):
        if any(h not in hf for h in hf_keys):
            missing += [h for h in hf_keys if h not in hf]
            continue
        found[key] = [hf.pop(h) for h in hf_keys]
    if cfg["embed_dim"]:
        if "visual_projection.weight" in hf:
            found["proj.weight"] = [hf.pop("visual_projection.weight")]
        else:
            missing.append("visual_projection.weight")
    return found, missing, sorted(hf)


def _names_error(missing, unexpected) -> str:
    more = lambda n: "..." if n > 8 else ""  # noqa: E731
    return (f"HF weights do not match the config: missing {missing[:8]}{more(len(missing))}, "
            f"unexpected {unexpected[:8]}{more(len(unexpected))}")


def from_hf_state_dict(cfg, hf_state) -> dict[str, torch.Tensor]:
    """HF weights (with or without the vision_model. prefix) -> our state dict; every entry must be used."""
    found, missing, unexpected = _match_names(cfg, hf_state.keys())
    if missing or unexpected:
        raise ValueError(_names_error(missing, unexpected))
    out = {}
    for key, hf_keys in found.items():
        parts = [hf_state[h] for h in hf_keys]
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def read_hf_weights(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory: model.safetensors, a sharded safetensors index, or (older
    checkpoints) pytorch_model.bin read with torch.load(weights_only=True), so nothing is unpickled as code."""
    from safetensors.torch import load_file
    hf_dir = Path(hf_dir)
    single, index, pt = (hf_dir / f for f in _WEIGHT_FILES)
    if single.exists():
        return load_file(single)
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_file(hf_dir / f))
        return state
    if pt.exists():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{hf_dir}: no weights ({', '.join(_WEIGHT_FILES)})")


def hf_weight_names(hf_dir) -> list[str]:
    """The tensor names of an HF model directory, read without loading the tensors (safetensors headers, the
    index's weight map, or a memory-mapped pytorch_model.bin)."""
    from safetensors import safe_open
    hf_dir = Path(hf_dir)
    single, index, pt = (hf_dir / f for f in _WEIGHT_FILES)
    if single.exists():
        with safe_open(str(single), "pt") as f:
            return list(f.keys())
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    if pt.exists():
        try:
            return list(torch.load(pt, map_location="cpu", weights_only=True, mmap=True))
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            return list(torch.load(pt, map_location="cpu", weights_only=True))
    raise FileNotFoundError(f"{hf_dir}: no weights ({', '.join(_WEIGHT_FILES)})")


# ------------------------------------------------------------------------------------------ import/export
def import_hf(hf_dir_or_model):
    """Our ViT (fp32) from an HF directory (config.json + safetensors) or an instantiated transformers model."""
    if isinstance(hf_dir_or_model, torch.nn.Module):
        hf_config, state, name = hf_dir_or_model.config, hf_dir_or_model.state_dict(), None
    else:
        hf_dir = Path(hf_dir_or_model)
        if not (hf_dir / "config.json").exists():
            raise FileNotFoundError(f"{hf_dir}: no config.json (expected a transformers model directory)")
        hf_config = json.loads((hf_dir / "config.json").read_text())
        state, name = read_hf_weights(hf_dir), hf_dir.resolve().name
    has_proj = "visual_projection.weight" in state
    cfg = from_hf_config(hf_config, with_projection=has_proj, name=name)
    model = build_model(cfg)
    model.load_state_dict({k: v.float() for k, v in from_hf_state_dict(cfg, state).items()})
    return model


# ------------------------------------------------------------------------------- a released model as a start
VISION_TYPES = {"mlcd_vision_model": "MLCDVisionModel", "clip_vision_model": "CLIPVisionModel", "clip": "CLIPModel"}
TEXT_TYPES = {"clip_text_model": "CLIPTextModel"}
PROCESSOR = "preprocessor_config.json"


@dataclass(frozen=True)
class HFSource:
    """What a Hugging Face vision model directory offers as a starting point (read from its config.json, weight
    names and preprocessor_config.json; the weights themselves are not loaded)."""
    path: Path
    model: dict                  # our model config (its name: the directory's)
    declared: str                # the class its config.json declares (architectures[0], else from model_type)
    hf_class: str                # the class an adapted export declares: the source's own (CLIPModel: its vision
                                 #   half, CLIPVisionModelWithProjection)
    processor: dict | None       # its preprocessor_config.json, when it has one


def is_hf_dir(path) -> bool:
    """A transformers model directory (config.json), not one of our checkpoints or run directories."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "manifest.json").exists()


def hf_source(path, what: str = "train.init_from") -> HFSource:
    """Check `path` is a vision model this project can start from, before any work; every refusal names `what`
    and the problem: not a model directory, no weights, a text-only model, another model family, a vision config
    we do not implement, weights that do not match the config, or an image processor whose normalisation is not
    the CLIP mean/std every stage here uses."""
    from mlcd.data.transforms import CLIP_MEAN, CLIP_STD
    p = Path(path)
    where = f"{what}={path}"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{where}: no config.json: not a Hugging Face model directory")
    try:
        config = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: config.json is not JSON ({e})") from None
    model_type = config.get("model_type")
    archs = list(config.get("architectures") or [])
    if model_type in TEXT_TYPES or any("TextModel" in a for a in archs):
        raise ValueError(f"{where} is a text-only model ({archs[0] if archs else TEXT_TYPES[model_type]}, "
                         f"model_type {model_type!r}): it has no vision tower to start an image encoder from. Give "
                         f"a vision model: {', '.join(HF_CLASSES)} or a full CLIPModel")
    if model_type not in VISION_TYPES:
        raise ValueError(f"{where} is not a vision model this project can start from: model_type {model_type!r}"
                         f"{f', architectures {archs}' if archs else ''} (expected {', '.join(HF_CLASSES)} or "
                         "CLIPModel: model_type mlcd_vision_model, clip_vision_model or clip)")
    try:
        names = hf_weight_names(p)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: {e}") from None
    if model_type == "clip" and not any(n.startswith("vision_model.") for n in names):
        raise ValueError(f"{where}: a CLIPModel config but no vision_model.* weights (a text-only checkpoint?)")
    try:
        cfg = from_hf_config(config, with_projection="visual_projection.weight" in names, name=p.resolve().name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    _, missing, unexpected = _match_names(cfg, names)
    if missing or unexpected:
        raise ValueError(f"{where}: {_names_error(missing, unexpected)}")
    declared = archs[0] if len(archs) == 1 else VISION_TYPES[model_type]
    if model_type == "clip":
        export_as = "CLIPVisionModelWithProjection"
    else:
        export_as = declared if declared in HF_CLASSES else hf_class(cfg)
        export_as = hf_class(cfg, export_as)  # a WithProjection config whose weights lack the projection refuses
    processor = None
    if (p / PROCESSOR).is_file():
        processor = json.loads((p / PROCESSOR).read_text())
        for key, ours in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            theirs = processor.get(key)
            if theirs is not None and (len(theirs) != 3 or max(abs(a - b) for a, b in zip(theirs, ours)) > 1e-4):
                raise ValueError(f"{where}: its {PROCESSOR} normalises with {key}={theirs}, but every stage here "
                                 f"(clustering, training, probing) normalises with CLIP's {list(ours)}: training would "
                                 "feed it images it was not trained on")
    return HFSource(p, cfg, declared, export_as, processor)


def adapted_processor(processor: dict, old_size: int, new_size: int) -> dict:
    """The source's image processor settings for a model now `new_size` px (resize and crop scaled alike)."""
    out = json.loads(json.dumps(processor))
    if new_size == old_size:
        return out
    crop = out.get("crop_size")
    if isinstance(crop, dict):
        out["crop_size"] = {"height": new_size, "width": new_size}
    elif crop is not None:
        out["crop_size"] = new_size
    size = out.get("size")
    if isinstance(size, dict) and "shortest_edge" in size:
        out["size"] = {"shortest_edge": round(size["shortest_edge"] * new_size / old_size)}
    elif isinstance(size, dict):
        out["size"] = {"height": new_size, "width": new_size}
    elif size is not None:
        out["size"] = round(size * new_size / old_size)
    return out


def image_processor(image_size: int):
    """CLIP preprocessing: resize the shortest side (bicubic) then center crop to image_size, CLIP mean/std.
    Its crop is the one mlcd.data.transforms.EvalTransform takes (floor offset; tests/test_hf_interop.py)."""
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, resample=3,
                              do_center_crop=True, crop_size={"height": image_size, "width": image_size},
                              do_rescale=True, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                              do_convert_rgb=True)


def export_hf(model, out_dir, hf_class_name: str | None = None, like=None) -> Path:
    """Write a directory `from_pretrained` loads: config.json, model.safetensors, preprocessor_config.json.
    `hf_class_name` picks the transformers class (default: see hf_class; a RoPE2D model refuses CLIP ones).
    `like`: the Hugging Face directory this model was adapted from (train.init_from): the export declares that
    source's class (a full CLIPModel: CLIPVisionModelWithProjection) and carries its preprocessor_config.json
    (resize and crop rescaled if the image size changed), so code that loaded the source loads the export
    unchanged; the model must have the source's architecture (image_size may differ).
    Written to a temp dir beside out_dir and renamed into place (an existing out_dir is replaced)."""
    from safetensors.torch import save_file
    cfg = model_config(model.cfg)
    processor = None                                     # None: ours (image_processor)
    if like is not None:
        src = hf_source(like, what="export like")
        for key in sorted(set(src.model) | set(cfg)):
            if key not in ("image_size", "name") and src.model[key] != cfg[key]:
                raise ValueError(f"export like {like}: model.{key} is {cfg[key]!r} here but {src.model[key]!r} in "
                                 "the source: this model was not adapted from it")
        if hf_class_name not in (None, "auto", src.hf_class):
            raise ValueError(f"export like {like} declares {src.hf_class} (the source's class), not {hf_class_name}")
        hf_class_name = src.hf_class
        if src.processor is not None and src.model["image_size"] == cfg["image_size"]:
            processor = (src.path / PROCESSOR).read_bytes()   # byte for byte
        elif src.processor is not None:
            processor = adapted_processor(src.processor, src.model["image_size"], cfg["image_size"])
    hf_config = to_hf_config(cfg, hf_class_name)        # refuses before anything is written
    if cfg["pos_embed"] == "rope2d" and cfg["embed_dim"]:
        warnings.warn("MLCDVisionModel has no projection head: the projection is not exported "
                      "(pooler_output is our `pooled`, not our `embedding`)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    hf_config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf_config.save_pretrained(tmp)
    save_file(to_hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
    if processor is None:
        image_processor(cfg["image_size"]).save_pretrained(tmp)
    elif isinstance(processor, bytes):
        (tmp / PROCESSOR).write_bytes(processor)
    else:
        fileio.write_json(tmp / PROCESSOR, processor)
    fileio.replace_dir(tmp, out_dir)
    return out_dir


def load_hf_model(hf_dir):
    """The transformers model an exported directory declares (config.json `architectures`)."""
    import transformers
    archs = json.loads((Path(hf_dir) / "config.json").read_text()).get("architectures") or []
    if len(archs) != 1 or archs[0] not in HF_CLASSES:
        raise ValueError(f"{hf_dir}/config.json architectures={archs}: expected one of {HF_CLASSES}")
    return getattr(transformers, archs[0]).from_pretrained(hf_dir)
