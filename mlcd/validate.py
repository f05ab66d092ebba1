"""One validator per stage, in one place: each entry script calls its stage's check first (and a runner may call it
on the config it composes), so a bad setting is refused, naming the key and the value, before any output, process
group, download or hour of work. The checks read only the config and what it points at; none of them writes."""
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # auto: bf16 on a GPU, fp32 on the CPU; training refuses fp16
WANDB_MODES = ("online", "offline", "disabled")
FUSIONS = ("mean",)
STAGES = ("extract", "kmeans", "assign")


# ---------------------------------------------------------------------------------------------- resuming
def refuse_other_settings(old: dict, new: dict, where, remedy: str, only_shared: bool = False) -> None:
    """The one "do not resume under other settings" check (a run directory, cluster outputs, a checkpoint, rounds):
    outputs made with one setting must never be mixed with another's. `only_shared` compares the keys both sides
    record, so outputs written before a setting existed still resume. The error names every key that differs."""
    keys = old.keys() & new.keys() if only_shared else old.keys() | new.keys()
    differ = sorted(k for k in keys if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if differ:
        shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} now" for k in differ[:8])
        more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise ValueError(f"{where} was made with other settings ({shown}{more}). {remedy}")


# ---------------------------------------------------------------------------------------------- cluster.py
BACKBONE_TYPES = ("mlcd", "hf", "open_clip", "random", "pixels")


def check_cluster_config(cfg) -> None:
    """Refuse a bad setting before any work (hours of extraction or k-means); the error names key and value."""
    from mlcd.cluster.assign import METHODS
    from mlcd.cluster.kmeans import MODES

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
    one_of("extract.precision", PRECISIONS)  # fp16 is fine for inference
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
    one_of("kmeans.mode", MODES)
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
    one_of("assign.method", METHODS)
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


def check_cluster_inputs(cfg) -> None:
    """A stage run without the stage before it needs that stage's outputs in out_dir already."""
    out = Path(cfg.out_dir)
    if "kmeans" in cfg.stages and "extract" not in cfg.stages and not (out / "features" / "manifest.json").exists():
        raise FileNotFoundError(f"out_dir={cfg.out_dir!r}: no features/manifest.json for stages={list(cfg.stages)}; "
                                "run the extract stage first (or check out_dir)")
    if "assign" in cfg.stages and "kmeans" not in cfg.stages and not (out / "centers.npy").exists():
        raise FileNotFoundError(f"out_dir={cfg.out_dir!r}: no centers.npy for stages={list(cfg.stages)}; "
                                "run the kmeans stage first (or check out_dir)")



# ---------------------------------------------------------------------------------------------- train.py
def check_label_files(data_cfg) -> None:
    """Before step 0: every training shard has its label file (a missing one would otherwise crash a worker at
    whatever step first reads that shard), and data.num_labels (l) is at most the labels per image on disk."""
    from mlcd.data.labels import label_width, missing_shard_labels, shard_stem
    from mlcd.data.tars import expand_urls

    urls = expand_urls(data_cfg.train_shards)
    missing = missing_shard_labels(data_cfg.labels_dir, [shard_stem(u) for u in urls])
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} training shards have no label file in "
                                f"data.labels_dir={data_cfg.labels_dir}, e.g. {missing[:3]} (did cluster.py's "
                                "assign stage finish over these shards?)")
    want = data_cfg.get("num_labels")
    if want is None:
        return
    have = label_width(data_cfg.labels_dir, shard_stem(urls[0]))
    if not 1 <= int(want) <= have:
        raise ValueError(f"data.num_labels={want}: the label files in {data_cfg.labels_dir} hold {have} labels per "
                         f"image (cluster.py assign.topk); use 1..{have}")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "fp16":
        raise ValueError("train.precision=fp16 is not supported (it needs a gradient scaler; the margin loss at "
                         "s = 64 overflows fp16 logits): use bf16 (GPU) or fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: must be one of {[p for p in PRECISIONS if p != 'fp16']}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_wandb_mode(mode) -> str:
    """wandb's convention: the config's value when set explicitly, else $WANDB_MODE, else offline."""
    source = "logging.wandb.mode"
    if mode is None:
        mode, source = os.environ.get("WANDB_MODE", "offline"), "WANDB_MODE"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in WANDB_MODES:
        raise ValueError(f"{source}={mode!r}: must be one of {WANDB_MODES}")
    return mode



def check_train_config(cfg, world: int, device: torch.device, inputs: bool = True) -> dict:
    """Every train.py setting that can be judged before the model is built. Returns what it resolved:
    {"precision", "wandb_mode", "num_classes"}. inputs=False judges the settings alone (a runner checking a config
    whose shards and label files a stage before it will make): no file is read and num_classes is left unresolved."""
    from mlcd.data.labels import resolve_num_classes
    from mlcd.partial_fc import check_loss_settings
    from mlcd.train.sharding import check_sharding

    t = cfg.train
    precision = resolve_precision(t.precision, device)
    check_sharding(t.sharding, world)
    wandb_mode = resolve_wandb_mode(cfg.logging.wandb.mode)
    if t.global_batch_size % (world * t.grad_accum):
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by world size {world} "
                         f"x train.grad_accum={t.grad_accum}")
    if int(cfg.data.segment_steps) < 1:
        raise ValueError(f"data.segment_steps={cfg.data.segment_steps}: must be >= 1")
    loss = cfg.loss
    check_loss_settings(loss.kind, loss.margin_type, loss.sample_ratio, loss.budget, loss.get("slots"))
    if cfg.data.source not in ("shards", "synthetic"):
        raise ValueError(f"data.source={cfg.data.source!r}: shards | synthetic")
    if cfg.data.source == "shards":
        for key in ("train_shards", "labels_dir"):
            if not cfg.data.get(key):
                raise ValueError(f"data.{key} is not set: pick an experiment (experiment=demo, laion400m_...) or set it")
        if inputs:
            check_label_files(cfg.data)  # shards that match nothing fail here too, before any output or wandb
    labels_dir = cfg.data.labels_dir if cfg.data.source == "shards" else None
    num_classes = resolve_num_classes(cfg.num_classes, labels_dir) if inputs else None
    if cfg.monitor.every < 0 or (cfg.monitor.every and cfg.monitor.every % t.log_every):
        raise ValueError(f"monitor.every={cfg.monitor.every}: 0 (off) or a multiple of train.log_every={t.log_every}")
    if cfg.monitor.every and not cfg.monitor.dataset:
        raise ValueError(f"monitor.every={cfg.monitor.every} needs monitor.dataset (e.g. fashion_mnist)")
    return {"precision": precision, "wandb_mode": wandb_mode, "num_classes": num_classes}
