"""Export a trained backbone to Hugging Face `transformers` so it drops into LLaVA-style code.

    python -m mlcd.export_hf <checkpoint dir | run dir> <out dir> [--like HF_DIR | --hf-class CLASS]

RoPE2D models become `MLCDVisionModel` (only: `--hf-class CLIPVisionModel` is refused for them, since
CLIPVisionModel would fill its missing position embedding with random values), absolute-position models
`CLIPVisionModel` (`CLIPVisionModelWithProjection` when the model has a projection).

A run started from a Hugging Face model (train.init_from=HF_DIR) exports LIKE its source by default: the source's
class (a full CLIPModel's vision half: CLIPVisionModelWithProjection) and its preprocessor_config.json (resize and
crop rescaled if the image size changed), so code that loaded the source loads the adapted model unchanged.
`--like HF_DIR` names the source explicitly, `--like none` turns this off.

The export is checked by loading it back with `from_pretrained` (the class it declares) and comparing outputs on
random pixels.
"""
import argparse
from pathlib import Path

import torch

from mlcd.models.hf import HF_CLASSES, export_hf, is_hf_dir, load_hf_model
from mlcd.models.loading import find_checkpoint, load_backbone, read_manifest


def source_of(checkpoint) -> tuple[Path | None, str]:
    """(the Hugging Face directory the run was initialised from, or None; a note for the console)."""
    try:
        init = read_manifest(find_checkpoint(checkpoint)).get("config", {}).get("train", {}).get("init_from")
    except FileNotFoundError:
        return None, ""
    if not init:
        return None, ""
    if is_hf_dir(init):
        return Path(init), f"exporting like its source {init} (train.init_from; --like none to turn off)"
    if not Path(init).exists():
        return None, (f"note: the run was initialised from {init}, which is gone; if it was a Hugging Face model, "
                      "give --like <its directory> to export in its class with its image processor")
    return None, ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint dir (run/checkpoints/step-N) or a run dir (newest checkpoint)")
    ap.add_argument("out_dir", help="directory to write (config.json, model.safetensors, preprocessor_config.json)")
    ap.add_argument("--hf-class", default="auto", choices=("auto", *HF_CLASSES),
                    help="transformers class to export for (auto: the source's with --like, else MLCDVisionModel for "
                         "RoPE2D, else CLIPVisionModel[WithProjection]); a RoPE2D model refuses the CLIP classes")
    ap.add_argument("--like", default="auto",
                    help="a Hugging Face model dir to export like (its class and image processor); auto: the run's "
                         "train.init_from when that is one; none: off")
    ap.add_argument("--no-verify", action="store_true", help="skip the from_pretrained round-trip check")
    args = ap.parse_args(argv)

    if args.like == "auto":
        like, note = source_of(args.checkpoint)
        if args.hf_class != "auto" and like is not None:
            like, note = None, f"--hf-class {args.hf_class} given: not exporting like {like}"
    else:
        like, note = (None if args.like in ("none", "") else Path(args.like)), ""
    model, _ = load_backbone(args.checkpoint)
    if note:
        print(note)
    try:
        out = export_hf(model, args.out_dir, args.hf_class, like=like)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"export refused: {e}") from None
    print(f"exported {args.checkpoint} -> {out}")
    if not args.no_verify:
        hf = load_hf_model(args.out_dir).eval()
        pixels = torch.randn(2, 3, model.image_size, model.image_size)
        with torch.no_grad():
            ours, theirs = model(pixels), hf(pixel_values=pixels)
        # CLIPVisionModelWithProjection returns the projected embedding; the others the pooled class token.
        if getattr(theirs, "image_embeds", None) is not None:
            what, err = "embedding", (ours.embedding - theirs.image_embeds).abs().max().item()
        else:
            what, err = "pooled", (ours.pooled - theirs.pooler_output).abs().max().item()
        print(f"verified with transformers {type(hf).__name__}.from_pretrained: max |{what} difference| = {err:.2e}")
        if err > 1e-4:
            raise SystemExit(f"export check failed: {what} outputs differ by {err:.2e}")


if __name__ == "__main__":
    main()
