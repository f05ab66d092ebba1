"""Image transforms: the training crop (RandomResizedCrop + flip) driven by an explicit RNG, and the eval resize.

TrainTransform.params is the transform's random draws alone (box and flip), shared with the device-side path
(data.decode=gpu, mlcd/data/device_decode.py), which crops the same boxes from the decoded batch on the GPU.

The training transform takes its randomness from a `random.Random` passed in by the caller (one per
loader stream), never from torch's or Python's global RNG: the loader restarts with a derived seed
at checkpoint boundaries and must reproduce the same stream bit for bit.
"""
import math
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images -> 3-channel RGB (alpha dropped)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def to_normalized_tensor(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W], (x / 255 - mean) / std."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    return x.mul_(scale).sub_(shift)


def crop_params(width: int, height: int, scale, ratio, rng: random.Random):
    """(left, top, w, h) of a random crop with area fraction in `scale` and aspect ratio in `ratio`.

    Same algorithm as torchvision's RandomResizedCrop.get_params (10 tries, then a central crop with
    the ratio clamped), with `rng` instead of the global torch RNG."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio, bicubic) + horizontal flip + CLIP mean/std: `t(img, rng) -> [3, S, S]`."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bicubic", mean=CLIP_MEAN, std=CLIP_STD):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.size, self.scale, self.ratio, self.hflip = int(size), tuple(scale), tuple(ratio), float(hflip)
        self.interpolation, self.mean, self.std = _INTERP[interpolation], tuple(mean), tuple(std)

    def params(self, width: int, height: int, rng: random.Random):
        """(left, top, w, h, flip) for an image of this size: the random draws of one call, in the call's order.
        decode=gpu draws its boxes with this in the worker (mlcd/data/device_decode.py): the same stream."""
        left, top, w, h = crop_params(width, height, self.scale, self.ratio, rng)
        return left, top, w, h, bool(self.hflip and rng.random() < self.hflip)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = to_rgb(img)
        left, top, w, h, flip = self.params(img.width, img.height, rng)
        img = img.resize((self.size, self.size), self.interpolation, box=(left, top, left + w, top + h))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img, self.mean, self.std)


def resize_center_crop(img: Image.Image, size: int, interpolation=Image.BICUBIC) -> Image.Image:
    """The shorter side to `size` (torchvision's Resize(int) rounding), then a `size` center crop whose offset is
    floor((W - size) / 2), as Hugging Face's image processors crop (all versions and backends), so the
    CLIPImageProcessor mlcd.models.hf exports sees exactly these pixels. torchvision's CenterCrop rounds half to
    even: 1 px off whenever W - size is 3 mod 4."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), interpolation)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


class EvalTransform:
    """The one eval transform (the probe, feature extraction, the training monitor, the exported processor):
    resize_center_crop (bicubic), CLIP mean/std: `t(img) -> [3, S, S]`; grayscale and the like -> RGB."""

    def __init__(self, size: int, interpolation: str = "bicubic", mean=CLIP_MEAN, std=CLIP_STD):
        self.size, self.interpolation, self.mean, self.std = int(size), _INTERP[interpolation], tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, rng=None) -> torch.Tensor:
        return to_normalized_tensor(resize_center_crop(to_rgb(img), self.size, self.interpolation), self.mean, self.std)

    def __repr__(self):  # part of a probe backbone's identity (its feature cache key): no object address
        return f"EvalTransform(size={self.size}, interpolation={self.interpolation}, mean={self.mean}, std={self.std})"
