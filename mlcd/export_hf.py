"""Export a trained backbone to Hugging Face `transformers` so it drops into LLaVA-style code.

    python -m mlcd.export_hf <checkpoint dir | run dir> <out dir>

RoPE2D models become `MLCDVisionModel` (only: `--hf-class CLIPVisionModel` is refused for them, since
CLIPVisionModel would fill its missing position embedding with random values), absolute-position models
`CLIPVisionModel` (`CLIPVisionModelWithProjection` when the model has a projection). The export is checked
by loading it back with `from_pretrained` and comparing pooled outputs on random pixels.
"""
import argparse

import torch

from mlcd.models.hf import HF_CLASSES, export_hf, load_hf_model
from mlcd.models.loading import load_backbone


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint dir (run/checkpoints/step-N) or a run dir (newest checkpoint)")
    ap.add_argument("out_dir", help="directory to write (config.json, model.safetensors, preprocessor_config.json)")
    ap.add_argument("--hf-class", default="auto", choices=("auto", *HF_CLASSES),
                    help="transformers class to export for (auto: MLCDVisionModel for RoPE2D, else CLIPVisionModel"
                         "[WithProjection]); a RoPE2D model refuses the CLIP classes")
    ap.add_argument("--no-verify", action="store_true", help="skip the from_pretrained round-trip check")
    args = ap.parse_args(argv)

    model, _ = load_backbone(args.checkpoint)
    try:
        export_hf(model, args.out_dir, args.hf_class)
    except ValueError as e:
        raise SystemExit(f"export refused: {e}") from None
    print(f"exported {args.checkpoint} -> {args.out_dir}")
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
            raise SystemExit(f"export check failed: pooled outputs differ by {err:.2e}")


if __name__ == "__main__":
    main()
