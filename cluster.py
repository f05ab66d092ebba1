"""Cluster images into pseudo-classes: CLIP features -> spherical k-means -> top-k labels per image.

    python cluster.py                                   # the demo's shards (`make demo`)
    python cluster.py experiment=laion400m_vitl14       # the paper: ViT-L/14 features, 1M centers, top-8
    python cluster.py "shards='d/{000000..000099}.tar'" out_dir=out/cluster [stages=[extract,kmeans,assign]]
    torchrun --nproc_per_node=8 cluster.py ...
Config: configs/cluster/ (cluster.yaml + experiment/), a tree apart from train.py's groups.
Every stage skips finished work, so re-running resumes. Bad settings are refused before any of it.
"""
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from mlcd import dist
from mlcd.cluster import assign, extract, kmeans
from mlcd import fileio
from mlcd.cluster.files import expand_shards

STAGES = ("extract", "kmeans", "assign")
PRECISIONS = ("bf16", "fp16", "fp32")
FUSIONS = ("mean",)


BACKBONE_TYPES = ("mlcd", "hf", "open_clip", "random", "pixels")


def check_config(cfg) -> None:
    """Refuse a bad setting before any work (hours of extraction or k-means); the error names key and value."""
    def get(key):
        return OmegaConf.select(cfg, key)

    def fail(key, why):
        raise ValueError(f"{key}={get(key)!r}: {why}")

    def integer(key, lo, null_ok=False):
        v = get(key)
        if not (v is None and null_ok) and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            fail(key, f"must be an integer >= {lo}" + (" or null" if null_ok else ""))

    def one_of(key, choices):
        if get(key) not in choices:
            fail(key, f"must be one of {list(choices)}")

    def text(key, null_ok=False):
        v = get(key)
        if not (v is None and null_ok) and (not isinstance(v, str) or not v):
            fail(key, "must be a non-empty string" + (" or null" if null_ok else ""))

    stages = get("stages")
    if not OmegaConf.is_list(stages) or not stages or any(s not in STAGES for s in stages):
        fail("stages", f"must be a non-empty list drawn from {list(STAGES)}")
    text("out_dir")
    integer("seed", 0)
    t = get("dist_timeout_minutes")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        fail("dist_timeout_minutes", "must be a number > 0")

    text("extract.model")
    text("extract.pretrained", null_ok=True)
    text("extract.model_config", null_ok=True)
    if get("extract.model_config") and not Path(get("extract.model_config")).is_file():
        fail("extract.model_config", "no such file (an open_clip model-config JSON)")
    integer("extract.image_size", 1, null_ok=True)
    integer("extract.batch_size", 1)
    integer("extract.num_workers", 0)
    one_of("extract.precision", PRECISIONS)
    one_of("extract.text", (True, False))
    one_of("extract.fusion", FUSIONS)
    backbone = get("extract.backbone")
    if backbone is not None:  # a project backbone instead of open_clip: it must load before any work starts
        if not OmegaConf.is_dict(backbone) or backbone.get("type") not in BACKBONE_TYPES:
            fail("extract.backbone", f"a mapping with type one of {list(BACKBONE_TYPES)}, e.g. "
                                     "{type: mlcd, path: runs/demo}")
        if get("extract.text"):
            fail("extract.text", "captions need an open_clip text tower: not with extract.backbone")
        one_of("extract.feature", ("pooled", "embedding", "patch_mean"))
        if backbone.get("type") in ("mlcd", "hf"):
            from mlcd.models.loading import find_checkpoint
            path = backbone.get("path")
            try:
                if backbone.get("type") == "mlcd":
                    find_checkpoint(path)
                elif not (Path(str(path)) / "config.json").is_file():
                    raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
            except (FileNotFoundError, TypeError) as e:
                fail("extract.backbone.path", str(e))

    integer("kmeans.k", 1)
    k = get("kmeans.k")
    one_of("kmeans.mode", kmeans.MODES)
    integer("kmeans.niter", 1)
    integer("kmeans.seed", 0)
    integer("kmeans.max_points_per_centroid", 1)
    integer("kmeans.min_points_per_centroid", 0)
    integer("kmeans.coarse_k", 1, null_ok=True)
    if get("kmeans.coarse_k") is not None:
        if get("kmeans.mode") != "two_level":
            fail("kmeans.coarse_k", f"only kmeans.mode=two_level uses it (kmeans.mode={get('kmeans.mode')!r})")
        if get("kmeans.coarse_k") > k:
            fail("kmeans.coarse_k", f"more coarse groups than kmeans.k={k} centers")
    integer("kmeans.refine_iters", 0)
    integer("kmeans.refine_probe", 0)
    one_of("kmeans.gpu", ("auto", True, False))
    one_of("kmeans.final_stats", (True, False))

    integer("assign.topk", 1)
    if get("assign.topk") > k:
        fail("assign.topk", f"exceeds kmeans.k={k}: each image gets topk distinct centers out of k")
    one_of("assign.method", assign.METHODS)
    integer("assign.nlist", 1, null_ok=True)
    if get("assign.nlist") is not None and get("assign.nlist") > k:
        fail("assign.nlist", f"more IVF cells than kmeans.k={k} centers")
    integer("assign.nprobe", 1)
    integer("assign.hnsw_m", 2)           # FAISS's HNSW crashes (segfault) at M = 1
    integer("assign.ef_search", 1)
    integer("assign.ef_construction", 1)
    integer("assign.recall_sample", 0, null_ok=True)
    integer("assign.chunk_size", 1)
    text("assign.labels_dir", null_ok=True)


def shard_urls(cfg) -> list[str]:
    """The shard list; an error names the `shards` pattern it came from."""
    spec = OmegaConf.to_container(cfg.shards) if OmegaConf.is_list(cfg.shards) else cfg.shards
    try:
        return expand_shards(spec)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"shards={spec!r}: {e}") from None


def check_inputs(cfg) -> None:
    """A stage run without the stage before it needs that stage's outputs in out_dir already."""
    out = Path(cfg.out_dir)
    if "kmeans" in cfg.stages and "extract" not in cfg.stages and not (out / "features" / "manifest.json").exists():
        raise FileNotFoundError(f"out_dir={cfg.out_dir!r}: no features/manifest.json for stages={list(cfg.stages)}; "
                                "run the extract stage first (or check out_dir)")
    if "assign" in cfg.stages and "kmeans" not in cfg.stages and not (out / "centers.npy").exists():
        raise FileNotFoundError(f"out_dir={cfg.out_dir!r}: no centers.npy for stages={list(cfg.stages)}; "
                                "run the kmeans stage first (or check out_dir)")


@hydra.main(config_path="configs/cluster", config_name="cluster", version_base=None)
def main(cfg):
    check_config(cfg)
    urls = shard_urls(cfg)
    check_inputs(cfg)
    device = dist.init(timeout_minutes=cfg.dist_timeout_minutes)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    if dist.is_main():
        print(OmegaConf.to_yaml(cfg, resolve=True))
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        fileio.write_text(Path(cfg.out_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    dist.barrier()
    if "extract" in cfg.stages:
        extract.run(cfg, cfg_dict, urls, device)
    if "kmeans" in cfg.stages:
        if dist.is_main():
            from mlcd.data.labels import shard_stem
            kmeans.run(cfg, cfg_dict, [shard_stem(u) for u in urls])
        dist.barrier()
    if "assign" in cfg.stages:
        assign.run(cfg, cfg_dict, urls, device.index if device.type == "cuda" else None)
    dist.cleanup()


if __name__ == "__main__":
    main()
