"""How often an image's rank-j label is a center of its own class, per number of centers k (the ablation's
clusterings, data/ablate/cluster-k*/labels; `make ablate` makes them). A center's class is the majority class of
the images whose top-1 label it is. Writes bench/results/label_purity.json.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlcd import fileio  # noqa: E402
from mlcd.data import fashion_mnist  # noqa: E402
from mlcd.data.labels import read_shard_labels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "label_purity.json"


def purity_by_rank(labels_dir: Path, classes: np.ndarray) -> list[float]:
    manifest = json.loads((labels_dir / "manifest.json").read_text())
    labels, truth = [], []
    for keys_file in sorted(labels_dir.glob("*.keys.txt")):
        keys, lab, _ = read_shard_labels(labels_dir, keys_file.name.removesuffix(".keys.txt"))
        labels.append(lab)
        truth += [classes[int(k.rsplit("-", 1)[1])] for k in keys]  # fmnist-train-0000123: image 123
    labels, truth = np.concatenate(labels), np.array(truth)
    center_class = np.full(manifest["num_classes"], -1)
    for c in np.unique(labels[:, 0]):
        center_class[c] = np.bincount(truth[labels[:, 0] == c]).argmax()
    return [round(100 * float(np.mean(center_class[labels[:, j]] == truth)), 2) for j in range(labels.shape[1])]


def main():
    dirs = sorted(ROOT.glob("data/ablate/cluster-k*/labels"), key=lambda d: int(d.parent.name.removeprefix("cluster-k")))
    if not dirs:
        print("no data/ablate/cluster-k*/labels: run `make ablate` first")
        return
    classes = fashion_mnist.load("train")[1]
    out = {d.parent.name.removeprefix("cluster-"): purity_by_rank(d, classes) for d in dirs}
    fileio.write_json(OUT, {"bench": "label_purity", "what": "percent of images whose rank-j label (j = 1..) is a "
                            "center of their own class", "by_k": out})
    for k, v in out.items():
        print(k, " ".join(f"{j}:{v[j - 1]:.0f}" for j in (1, 8, 16) if j <= len(v)))


if __name__ == "__main__":
    main()
