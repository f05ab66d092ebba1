"""Train a ViT with the MLCD loss.

    torchrun --nproc_per_node=N train.py [experiment=laion400m_vitb32] [key=value ...]    (or plain `python train.py`)
    python train.py -m seed=0,1,2 loss.sample_ratio=0.1,1.0      (a sweep: one run dir per job, see mlcd/sweep.py)
"""
import hydra

from mlcd import dist
from mlcd.sweep import job_out_dir, register_resolvers
from mlcd.train.loop import train

register_resolvers()


@hydra.main(config_path="configs/train", config_name="train", version_base=None)
def main(cfg):
    cfg.out_dir = job_out_dir(cfg)  # a multirun job: ${out_dir}/<its swept values> (mlcd/sweep.py)
    train(cfg)
    # A gloo/NCCL group left to interpreter teardown can abort a finished rank ("terminate called without an
    # active exception", pytorch#190489). Only after success: a rank that raised must not wait on the others here.
    dist.cleanup()


if __name__ == "__main__":
    main()
