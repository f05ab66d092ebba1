"""Train a ViT with the MLCD loss.

    torchrun --nproc_per_node=N train.py [experiment=laion400m_vitb32] [key=value ...]    (or plain `python train.py`)
"""
import hydra

from mlcd.train.loop import train


@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg):
    train(cfg)


if __name__ == "__main__":
    main()
