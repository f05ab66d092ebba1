"""Linear probe + kNN of a frozen backbone on local datasets (CLIP's protocol). See configs/eval/eval_linear_probe.yaml.

    python eval_linear_probe.py backbone.type=mlcd backbone.path=runs/demo datasets=[fashion_mnist]

Results (CLIP_benchmark's layout and metric names) go to out_dir/results.json even when some datasets fail;
the exit status is then 1, with the failed datasets and their reasons printed last.
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mlcd.eval import evaluate

MODEL_DIR = Path(__file__).resolve().parent / "configs" / "train" / "model"


def model_config_path(model):
    """backbone.model of type random: a bare name (vit_tiny) means configs/train/model/<name>.yaml. Resolved here,
    in the entry script, because the mlcd library takes only a mapping or a .yaml path (it reads no configs/)."""
    if isinstance(model, str) and not model.endswith(".yaml"):
        return str(MODEL_DIR / f"{model}.yaml")
    return model


@hydra.main(config_path="configs/eval", config_name="eval_linear_probe", version_base=None)
def main(cfg: DictConfig):
    print(OmegaConf.to_yaml(cfg, resolve=True))
    c = OmegaConf.to_container(cfg, resolve=True)
    if c["backbone"].get("type") == "random":
        c["backbone"]["model"] = model_config_path(c["backbone"].get("model"))
    res = evaluate(c["backbone"], c["datasets"], feature=c["feature"], probe=c["probe"], knn=c["knn"],
                   datasets_root=c["datasets_root"], limit_train=c["limit_train"], limit_test=c["limit_test"],
                   seed=c["seed"], cache_dir=c["cache_dir"], out_dir=c["out_dir"], batch_size=c["batch_size"],
                   num_workers=c["num_workers"], device=c["device"], config=c)
    if res["failed"]:
        lines = [f"  {f['dataset']}: {f['error']}" for f in res["failed"]]
        print(f"\n{len(res['failed'])} of {len(c['datasets'])} datasets FAILED (the others are in "
              f"{c['out_dir']}/results.json):\n" + "\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
