"""data.decode=gpu: the training process decodes each batch's JPEGs on its own device and augments them there.

Why: PIL decoding + RandomResizedCrop in DataLoader workers gives ~120 images/s per worker on LAION-sized JPEGs
(bench/results/data.json); a ViT-B/32 step at the paper's batch wants several thousand images/s per GPU. Batched
nvJPEG (torchvision.io.decode_jpeg(list, device="cuda")) decodes that many on the GPU itself.

The split of the work:
  * DataLoader workers (mlcd/data/loader.py, `prepare_encoded`) read the tar members and join the labels as on the
    CPU path, then read only the image's header (PIL, no pixel decoding). A JPEG in RGB or grayscale that ends with
    the end-of-image marker is sent as its encoded bytes, with its crop box and flip drawn right there from the
    stream's augmentation RNG by TrainTransform.params, the very calls TrainTransform makes on the CPU path.
    Anything else (PNG, WEBP, CMYK JPEG, a JPEG cut short or with bytes after its end marker) is decoded and
    transformed in the worker by the CPU path's TrainTransform; a header PIL cannot read is 'bad_image' there.
    So the RNG draws the same numbers in the same order as decode=cpu: for the same samples both paths use the
    same boxes and flips. (They part only after an image whose header reads but whose data fails to decode on
    the device and in PIL: a draw was made for it; such an image is skipped and counted all the same.)
  * The training process (`DeviceDecoder`) decodes the batch's JPEGs in one decode_jpeg call on its device
    (nvJPEG on CUDA, libjpeg-turbo on CPU, bit-identical to PIL's decoder there), crops each box and resizes it to
    S x S with PIL's kernel (antialiased bicubic, a = -0.5), flips, normalises like to_normalized_tensor, and
    puts the worker-transformed images into their slots. If the batched call fails, each image is decoded alone;
    one the device decoder refuses is decoded by PIL on the CPU and cropped the same way; one that fails both is
    returned as failed, and the loader counts it as 'bad_image' and fills its slot with the next sample.

Output difference for the same box (tests/test_data_robustness.py, bench/gpu_check.py on CUDA): on the CPU the
uint8 resize matches PIL to ~1e-4 mean absolute difference in normalised units (one grey level is ~0.015), up to
~0.1 at the crop's border, where PIL's filter reads pixels outside the box and this one clamps to the crop.
"""
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mlcd.data.transforms import CLIP_MEAN, CLIP_STD, to_rgb

JPEG_END = b"\xff\xd9"
DEVICE_FORMATS = ("JPEG", "MPO")  # MPO: a camera's multi-picture JPEG; both decoders read its first picture
DEVICE_MODES = ("RGB", "L")       # JPEG colour modes sent to the device decoder (CMYK/YCCK: PIL in the worker)
_MODES = {"bicubic": ("bicubic", True), "bilinear": ("bilinear", True), "nearest": ("nearest-exact", False)}


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """An opened (header-only) PIL image whose bytes go to the device decoder."""
    return img.format in DEVICE_FORMATS and img.mode in DEVICE_MODES and data.endswith(JPEG_END)


def pack(items: list, labels: list, keys: list, urls: list, shared: bool) -> dict:
    """One worker batch for the device path. items[i]: (jpeg bytes, (left, top, w, h, flip)) or a transformed
    float tensor [3, S, S] (decoded in the worker). Byte ranges: data[offsets[i]:offsets[i + 1]], empty for the
    transformed ones, which sit in `ready` at positions `ready_at`. shared: allocate in shared memory (a worker)."""
    n = len(items)
    sizes = [len(it[0]) if isinstance(it, tuple) else 0 for it in items]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    if shared:
        data.share_memory_()
    view = data.numpy()
    params = np.zeros((n, 5), np.int64)  # left, top, w, h, flip
    ready, ready_at = [], []
    for i, it in enumerate(items):
        if isinstance(it, tuple):
            view[offsets[i]:offsets[i + 1]] = np.frombuffer(it[0], np.uint8)
            params[i] = it[1]
        else:
            ready.append(it)
            ready_at.append(i)
    boxes, flips = torch.from_numpy(params[:, :4].copy()), torch.from_numpy(params[:, 4] != 0)
    if ready:
        stacked = torch.empty((len(ready), *ready[0].shape), dtype=ready[0].dtype)
        ready = torch.stack(ready, out=stacked.share_memory_() if shared else stacked)
    else:
        ready = torch.empty(0)
    return {"data": data, "offsets": torch.from_numpy(offsets), "boxes": boxes, "flips": flips, "ready": ready,
            "ready_at": torch.tensor(ready_at, dtype=torch.int64), "labels": torch.from_numpy(np.stack(labels)),
            "keys": list(keys), "urls": list(urls)}


def _decode_jpeg(data, device):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchVision")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def pil_decode(data: torch.Tensor) -> torch.Tensor | None:
    """The CPU fallback: uint8 [3, H, W] RGB by PIL (as decode=cpu decodes), or None when PIL fails too."""
    try:
        img = Image.open(io.BytesIO(data.numpy().tobytes()))
        img.load()
        return torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8)).permute(2, 0, 1)
    except Exception:  # noqa: BLE001 - any decoder failure is a bad image
        return None


class DeviceDecoder:
    """`decoder(batch) -> (images float32 [n_ok, 3, S, S] on `device`, positions that failed to decode)` for a
    batch `pack` made. The same code on CPU and CUDA; on CPU the resize runs on uint8 (torch's PIL-like kernel)."""

    def __init__(self, size: int, device, interpolation: str = "bicubic", mean=CLIP_MEAN, std=CLIP_STD):
        if interpolation not in _MODES:
            raise ValueError(f"interpolation={interpolation!r}: one of {sorted(_MODES)}")
        self.size, self.device = int(size), torch.device(device)
        self.mode, self.antialias = _MODES[interpolation]
        self.resize_uint8 = self.device.type == "cpu"  # CUDA's antialiased kernels take floating point only
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self.stats = {"device_decoded": 0, "single_retries": 0, "pil_fallback": 0, "failed": 0}
        import torchvision.io  # noqa: F401 - seconds on a first import: here, not inside the first batch

    def decode(self, datas: list) -> list:
        """uint8 [3, H, W] RGB on the device per encoded JPEG, None where neither the device decoder nor PIL can."""
        try:
            out = list(_decode_jpeg(datas, self.device))
            self.stats["device_decoded"] += len(out)
            return out
        except Exception:  # noqa: BLE001 - one bad image fails the batched call: decode one by one
            pass
        out = []
        for d in datas:
            self.stats["single_retries"] += 1
            try:
                out.append(_decode_jpeg(d, self.device))
                self.stats["device_decoded"] += 1
                continue
            except Exception:  # noqa: BLE001
                pass
            img = pil_decode(d)
            self.stats["pil_fallback" if img is not None else "failed"] += 1
            out.append(None if img is None else img.to(self.device))
        return out

    def crop_resize(self, img: torch.Tensor, box) -> torch.Tensor:
        """uint8 [3, H, W] -> [1, 3, S, S] of the box (left, top, w, h), uint8 on CPU, float32 elsewhere."""
        _, H, W = img.shape
        left, top, w, h = box
        left, top = min(max(left, 0), W - 1), min(max(top, 0), H - 1)  # the header's size is the decoded size;
        w, h = max(min(w, W - left), 1), max(min(h, H - top), 1)       # clamp anyway rather than fail
        x = img[:, top:top + h, left:left + w].unsqueeze(0)
        if not self.resize_uint8:
            x = x.float()
        return F.interpolate(x, size=(self.size, self.size), mode=self.mode, antialias=self.antialias,
                             align_corners=None if self.mode == "nearest-exact" else False)

    @torch.no_grad()
    def __call__(self, batch: dict):
        n, S = len(batch["flips"]), self.size
        offsets, boxes, flips = batch["offsets"].tolist(), batch["boxes"].tolist(), batch["flips"].tolist()
        encoded = [i for i in range(n) if offsets[i + 1] > offsets[i]]
        out = torch.empty((n, 3, S, S), dtype=torch.float32, device=self.device)
        failed = []
        if encoded:
            decoded = self.decode([batch["data"][offsets[i]:offsets[i + 1]] for i in encoded])
            for i, img in zip(encoded, decoded):
                if img is None:
                    failed.append(i)
                    continue
                x = self.crop_resize(img, boxes[i])
                out[i] = x[0].flip(-1) if flips[i] else x[0]
            out.round_().clamp_(0, 255).mul_(self.scale).sub_(self.shift)  # rows filled below are overwritten
        if len(batch["ready_at"]):
            out[batch["ready_at"].to(self.device)] = batch["ready"].to(self.device, non_blocking=True)
        if failed:
            keep = torch.ones(n, dtype=torch.bool)
            keep[failed] = False
            out = out[keep.to(self.device)]
        return out, failed
