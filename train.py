"""Train a ViT with the MLCD loss.

    torchrun --nproc_per_node=N train.py [experiment=laion400m_vitb32] [key=value ...]    (or plain `python train.py`)
    python train.py -m seed=0,1,2 loss.sample_ratio=0.1,1.0      (a sweep: one run dir per job, see mlcd/sweep.py)
"""
import hydra

from mlcd.sweep import job_out_dir, register_resolvers
from mlcd.train.loop import train

register_resolvers()


@hydra.main(config_path="configs/train", config_name="train", version_base=None)
def main(cfg):
    cfg.out_dir = job_out_dir(cfg)  # a multirun job: ${out_dir}/<its swept values> (mlcd/sweep.py)
    train(cfg)


if __name__ == "__main__":
    main()
