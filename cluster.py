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

from mlcd import dist, fileio
from mlcd.cluster import assign, extract, kmeans
from mlcd.cluster.files import expand_shards
from mlcd.validate import check_cluster_config, check_cluster_inputs


def shard_urls(cfg) -> list[str]:
    """The shard list; an error names the `shards` pattern it came from."""
    spec = OmegaConf.to_container(cfg.shards) if OmegaConf.is_list(cfg.shards) else cfg.shards
    try:
        return expand_shards(spec)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"shards={spec!r}: {e}") from None


@hydra.main(config_path="configs/cluster", config_name="cluster", version_base=None)
def main(cfg):
    check_cluster_config(cfg)
    urls = shard_urls(cfg)
    check_cluster_inputs(cfg)
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
