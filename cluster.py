"""Cluster images into pseudo-classes: CLIP features -> spherical k-means -> top-k labels per image.

    python cluster.py "shards='d/{000000..000099}.tar'" out_dir=out/cluster [stages=[extract,kmeans,assign]]
    torchrun --nproc_per_node=8 cluster.py ...
Config: configs/cluster.yaml. Every stage skips finished work, so re-running resumes.
"""
import hydra
from omegaconf import OmegaConf

from mlcd import dist
from mlcd.cluster import assign, extract, kmeans
from mlcd import fileio
from mlcd.cluster.files import expand_shards

STAGES = ("extract", "kmeans", "assign")


@hydra.main(config_path="configs", config_name="cluster", version_base=None)
def main(cfg):
    device = dist.init(timeout_minutes=cfg.dist_timeout_minutes)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ValueError(f"stages: unknown {bad}; choose from {list(STAGES)}")
    urls = expand_shards(OmegaConf.to_container(cfg.shards) if OmegaConf.is_list(cfg.shards) else cfg.shards)
    if dist.is_main():
        print(OmegaConf.to_yaml(cfg, resolve=True))
        from pathlib import Path
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
