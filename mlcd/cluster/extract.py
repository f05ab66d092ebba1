"""Stage 1: image (and optionally caption) features, one fp16 file per input shard.

The features come from an open_clip model (`extract.model` + `extract.pretrained`: the paper's CLIP teacher) or,
with `extract.backbone`, from any backbone the linear probe can load (one of our runs or checkpoints, an exported
Hugging Face model, open_clip), so that a trained encoder can re-cluster its own data (runners.rounds). Either way
`encoder_config` names the encoder and mlcd.models.backbones builds it, the one builder the linear probe uses too.

Each rank takes shards r, r+W, r+2W, ... and skips shards whose features already exist, so a killed
run resumes shard by shard. One loader reads this rank's shards, each DataLoader worker whole shards (each
tar is read once); a shard's batches never span shards and arrive in tar order, and its file is written
when its last batch arrives, so the bytes written do not depend on num_workers, the world size or where a
run was resumed.

Fusion (`extract.text=true`): UNICOM reports clustering "joint textual and visual features"; how they
were combined is not published. We use f = normalize(normalize(img) + normalize(txt)), the
normalised mean of the two unit vectors; a sample without a caption keeps its image feature.
"""
import logging
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mlcd import dist, fileio
from mlcd.cluster.files import RESUME_ELSEWHERE, has_features, load_json, versions, write_features
from mlcd.cluster.report import update_manifest
from mlcd.data.labels import shard_stem
from mlcd.models.backbones import build_backbone
from mlcd.validate import refuse_other_settings

log = logging.getLogger(__name__)
EXTRACT_KEYS = ("model", "pretrained", "model_config", "image_size", "text", "fusion", "backbone", "feature")


def encoder_config(ec, seed: int) -> tuple[dict, str]:
    """(backbone config for mlcd.models.backbones.build_backbone, feature) of the encoder that makes the clustering
    features of `ec` (a cluster config's `extract` section, `seed` its top-level seed): `extract.backbone` and
    `extract.feature` when given, else the open_clip teacher's embedding (encode_image)."""
    if ec.get("backbone"):
        b = ec.get("backbone")
        return (OmegaConf.to_container(b, resolve=True) if OmegaConf.is_config(b) else dict(b)), ec.get("feature")
    return ({"type": "open_clip", "name": ec.get("model"), "pretrained": ec.get("pretrained"),
             "model_config": ec.get("model_config"), "image_size": ec.get("image_size"), "seed": int(seed),
             "text": bool(ec.get("text"))}, "embedding")


def build_encoder(cfg, device):
    """The clustering encoder of cluster config `cfg`, on `device`, at `extract.precision`."""
    ec = cfg.extract
    if not ec.get("backbone") and not ec.pretrained:
        banner = "!" * 100
        msg = (f"\n{banner}\nextract.pretrained is null: '{ec.model}' gets RANDOM weights. The features, clusters and "
               f"labels are meaningless for training (fine for tests and smoke runs only).\n{banner}")
        log.warning(msg)
        print(msg, flush=True)
    bb = build_backbone(*encoder_config(ec, int(cfg.seed)))
    bb.precision = ec.precision
    return bb.to(device)


def read_captions(url: str) -> dict[str, str]:
    """{key: caption} from a local tar's `.txt` members (webdataset key = path up to the first dot)."""
    if url.startswith("pipe:"):
        raise ValueError(f"extract.text=true needs local shard files to read captions; got {url!r}")
    caps = {}
    with tarfile.open(url) as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            stem, _, ext = base.partition(".")
            if ext == "txt":
                key = os.path.join(os.path.dirname(m.name), stem)
                caps[key] = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
    return caps


@torch.no_grad()
def _encode(bb, images, keys, caps: dict, device):
    """(fp16 features [B, d] on the CPU, captions used) for one batch."""
    f = F.normalize(bb(images.to(device, non_blocking=True)), dim=-1)
    idx = [i for i, k in enumerate(keys) if k in caps]
    if idx:
        t = F.normalize(bb.encode_text(bb.tokenizer([caps[keys[i]] for i in idx]).to(device)), dim=-1)
        f[idx] = F.normalize(f[idx] + t, dim=-1)  # fusion: normalised mean of the two unit vectors
    return f.half().cpu(), len(idx)


def extract_shards(bb, urls: list[str], ec, device):
    """Yield (index into urls, fp16 features [n, d], keys, skip counts, captions used) per shard, as each completes.

    The loader's workers read whole shards in parallel; the features of a shard whose batches are still
    arriving are kept here (small: [n, d] fp16 per shard in flight), then handed over for writing."""
    from mlcd.data.loader import make_extract_loader

    loader = make_extract_loader(urls, bb.transform, int(ec.batch_size), int(ec.num_workers))
    open_ = {}  # shard index -> {"feats", "keys", "caps", "n_caps"}
    for i, images, keys, skips in loader.batches():
        s = open_.setdefault(i, {"feats": [], "keys": [], "caps": read_captions(urls[i]) if ec.text else {},
                                 "n_caps": 0})
        if images is not None:
            f, n = _encode(bb, images, keys, s["caps"], device)
            s["feats"].append(f)
            s["keys"] += keys
            s["n_caps"] += n
        if skips is not None:  # the shard's last batch
            del open_[i]
            feats = torch.cat(s["feats"]).numpy() if s["feats"] else np.zeros((0, bb.dim), np.float16)
            yield i, feats, s["keys"], skips, s["n_caps"]


def run(cfg, cfg_dict: dict, urls: list[str], device) -> None:
    """Stage 1, every rank: features for shards r, r+W, ... not done yet; rank 0 writes the manifest."""
    from tqdm import tqdm

    ec = cfg.extract
    fdir = Path(cfg.out_dir) / "features"
    stems = [shard_stem(u) for u in urls]
    settings = {key: ec.get(key) for key in EXTRACT_KEYS}
    settings["backbone"] = OmegaConf.to_container(ec.backbone) if ec.get("backbone") else None
    settings["seed"] = int(cfg.seed)
    bb = None
    if settings["backbone"]:  # the checkpoint's signature too: new weights are new features
        bb = build_encoder(cfg, device)
        settings["backbone_identity"] = {k: v for k, v in bb.identity.items() if k != "transform"}
    man_path = fdir / "manifest.json"
    if dist.is_main():
        fdir.mkdir(parents=True, exist_ok=True)
        old = load_json(man_path)
        if old and any(has_features(fdir, s) for s in stems):  # a start that failed before any shard blocks nothing
            refuse_other_settings(old.get("settings", {}), settings, f"{fdir} (features)", RESUME_ELSEWHERE,
                                  only_shared=True)
        fileio.write_json(man_path, {**old, "settings": settings, "complete": False, "config": cfg_dict,
                             "versions": versions()})
    dist.barrier()

    mine = [(u, s) for i, (u, s) in enumerate(zip(urls, stems))
            if i % dist.world_size() == dist.rank() and not has_features(fdir, s)]
    if mine:
        bb = bb if bb is not None else build_encoder(cfg, device)
        n_img, t0 = 0, time.time()
        bar = tqdm(total=len(mine), desc="extract", unit="shard", disable=not dist.is_main())
        for i, feats, keys, skips, n_caps in extract_shards(bb, [u for u, _ in mine], ec, device):
            if ec.text:
                skips = {**skips, "no_caption": len(keys) - n_caps}
            write_features(fdir, mine[i][1], feats, keys, skips)
            n_img += len(keys)
            bar.update(1)
            bar.set_postfix(img_s=f"{n_img / max(time.time() - t0, 1e-9):.1f}")
        bar.close()
    dist.barrier()
    if dist.is_main():
        rows, skipped, dim = 0, {}, None
        for s in stems:
            a = np.load(fdir / f"{s}.npy", mmap_mode="r")
            rows += len(a)
            dim = dim or (a.shape[1] if len(a) else None)
            for why, c in load_json(fdir / f"{s}.skips.json").items():
                skipped[why] = skipped.get(why, 0) + int(c)
        fileio.write_json(man_path, {"settings": settings, "complete": True, "config": cfg_dict, "versions": versions(),
                             "shards": len(stems), "rows": rows, "dim": dim, "skipped": skipped,
                             "dtype": "float16", "normalized": True})
        update_manifest(cfg.out_dir, cfg_dict, "extract", {"features_dir": str(fdir), "rows": rows, "dim": dim,
                                                           "shards": len(stems), "skipped": skipped})
        print(f"extract: {rows} images in {len(stems)} shards, d={dim}, skipped {skipped} -> {fdir}")
