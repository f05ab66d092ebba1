"""Loading a trained backbone from one of our checkpoints: what evaluation, export and feature extraction use; and
telling our checkpoints from Hugging Face model directories (`init_source`, for train.init_from).

This module knows the read side of the checkpoint layout (written by mlcd/train/checkpoint.py): a directory
`step-NNNNNNNN/` with `manifest.json` (model config, step, world size, ...) and `backbone.safetensors`. It
lives beside the models, not the trainer, so reading a backbone never imports training code.
"""
import json
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file

MANIFEST = "manifest.json"
BACKBONE = "backbone.safetensors"


def list_checkpoints(ckpt_root) -> list[Path]:
    """Complete checkpoints under `ckpt_root`, oldest first (a `step-*` dir is complete once it has a manifest)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(path) -> Path:
    """A checkpoint directory, or a run directory's newest checkpoint."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: neither a checkpoint nor a run dir with checkpoints/step-*")
    return found[-1]


def init_source(path) -> tuple[str, Path]:
    """What `train.init_from` names: ("mlcd", checkpoint dir) for one of our checkpoints or run directories (its
    newest checkpoint), ("hf", dir) for a Hugging Face model directory (config.json; mlcd.models.hf.hf_source says
    whether it is a vision model we can start from). Neither: FileNotFoundError naming both kinds."""
    from mlcd.models.hf import is_hf_dir

    path = Path(path)
    if is_hf_dir(path):
        return "hf", path
    try:
        return "mlcd", find_checkpoint(path)
    except FileNotFoundError:
        kinds = (f"one of our checkpoints or run directories ({MANIFEST} or checkpoints/step-*/), or a Hugging Face "
                 "model directory (config.json + weights)")
        if not path.exists():
            raise FileNotFoundError(f"train.init_from={path} does not exist (expected {kinds})") from None
        raise FileNotFoundError(f"train.init_from={path} is not {kinds}") from None


def read_manifest(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a complete checkpoint ({MANIFEST} missing)")
    return json.loads(path.read_text())


def load_backbone_weights(ckpt_dir) -> dict:
    return load_file(str(Path(ckpt_dir) / BACKBONE))


def load_backbone(path):
    """(model in eval mode, model config) from a checkpoint directory or a run dir (its newest checkpoint)."""
    from mlcd.models import build_model

    try:
        ckpt = find_checkpoint(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (train one with train.py, or run `make demo` for the default runs/demo)") from None
    model_cfg = OmegaConf.create(read_manifest(ckpt)["model"])
    model = build_model(model_cfg)
    model.load_state_dict(load_backbone_weights(ckpt))
    return model.eval(), model_cfg
