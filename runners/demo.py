"""`make demo`: the whole MLCD pipeline on real Fashion-MNIST on a laptop-class CPU.

    python -m runners.demo [demo.key=value ...]      (settings: configs/demo.yaml)
    python -m runners.demo --help                    (this, and the default settings)

Each stage runs as the exact command line it prints, so any stage can be re-run (or changed) by hand:
shards -> cluster.py -> torchrun train.py -> eval_linear_probe.py (4 backbones) -> table + plots.
Every stage skips work already done, so an interrupted demo resumes where it stopped.
"""
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from mlcd import fileio
from mlcd.cluster.extract import encoder_config
from runners.kit import (REPO, check_stage, fmnist_shards, hydra_overrides, launch, load_runner_config, run_stage,
                         show)
from runners.stats import probe_scores

CONFIG = REPO / "configs" / "demo.yaml"


def run(cmd: list[str], timings: list) -> None:
    timings.append({"cmd": show(cmd), "seconds": run_stage(cmd, "demo")})


def main(argv=None) -> dict:
    cfg = load_runner_config(CONFIG, argv, __doc__)
    d = cfg.demo
    py = sys.executable
    data_dir, run_dir = Path(d.data_dir), Path(d.run_dir)
    shard_dir, cluster_dir, eval_dir = data_dir / "shards", data_dir / "cluster", run_dir / "eval"
    check_stage("demo", "cluster", [f"shards='{shard_dir}/x.tar'", f"out_dir='{cluster_dir}'", *d.cluster_overrides])
    check_stage("demo", "train", [f"data.train_shards='{shard_dir}/x.tar'", f"data.labels_dir='{cluster_dir}'",
                                  f"out_dir='{run_dir}'", *d.train_overrides], d.nproc_per_node)
    timings: list = []
    t_start = time.time()

    # 1. Fashion-MNIST (Debian's package, else torchvision's download) -> webdataset shards
    shards, _, made = fmnist_shards(shard_dir, d.max_per_shard, d.limit, "demo")
    timings += [made] if made else []

    # 2. CLIP features -> k-means centers -> top-k labels per image
    run([py, "cluster.py", f"shards='{shards}'", f"out_dir={cluster_dir}", *d.cluster_overrides], timings)

    # 3. MLCD training under torchrun (gloo on CPU)
    run([*launch("train.py", d.nproc_per_node), f"data.train_shards='{shards}'",
         f"data.labels_dir={cluster_dir / 'labels'}", f"out_dir={run_dir}",
         *d.train_overrides], timings)

    # 4. Linear probe + kNN on the Fashion-MNIST test split for the four backbones of the table
    cluster_cfg = OmegaConf.load(cluster_dir / "config.yaml")
    train_cfg = OmegaConf.load(run_dir / "config.yaml")
    encoder, feature = encoder_config(cluster_cfg.extract, cluster_cfg.seed)  # the encoder that made the clusters
    backbones = {
        "MLCD-trained tiny ViT": ["backbone.type=mlcd", f"backbone.path={run_dir}"],
        "same ViT, random init": ["backbone.type=random", f"backbone.model={REPO / 'configs/train/model' / (train_cfg.model.name + '.yaml')}",
                                  f"backbone.seed={train_cfg.seed}"],
        "raw pixels": ["backbone.type=pixels"],
        f"CLIP features used for clustering ({cluster_cfg.extract.model}, "
        f"{cluster_cfg.extract.pretrained or 'random init'})": [
            *hydra_overrides("backbone", encoder), f"feature={feature}"],
    }
    rows = []
    for i, (name, overrides) in enumerate(backbones.items()):
        out = eval_dir / f"backbone{i}"
        run([py, "eval_linear_probe.py", *overrides, f"out_dir={out}", "datasets=[fashion_mnist]",
             *d.eval_overrides], timings)
        lp, knn = probe_scores(out / "results.json")
        rows.append({"backbone": name, "linear_probe_top1": lp, "knn_top1": knn})

    # 5. The table (train.py wrote the loss curve)
    table = ["| backbone | linear probe top-1 | kNN top-1 |", "|---|---|---|"]
    table += [f"| {r['backbone']} | {r['linear_probe_top1']:.2f} | {r['knn_top1']:.2f} |" for r in rows]
    summary = {"rows": rows, "stages": timings, "total_seconds": round(time.time() - t_start, 1),
               "config": OmegaConf.to_container(cfg)}
    fileio.write_json(run_dir / "demo_results.json", summary)
    fileio.write_text(run_dir / "demo_results.md", "\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\ndemo finished in {summary['total_seconds'] / 60:.1f} min. Outputs:\n"
          f"  shards            {shard_dir}\n"
          f"  clusters + labels {cluster_dir}  (size histogram: {cluster_dir / 'cluster_sizes.png'})\n"
          f"  training run      {run_dir}  (loss curve: {run_dir / 'loss_curve.png'}, checkpoints/)\n"
          f"  evaluation        {eval_dir}\n"
          f"  this table        {run_dir / 'demo_results.md'}")
    return summary


if __name__ == "__main__":
    main()
