"""Reports: the top-level manifest (one section per stage) and the cluster-size histogram."""
import time
from pathlib import Path

import numpy as np

from mlcd import fileio
from mlcd.cluster.files import load_json, versions


def update_manifest(directory, cfg: dict, section: str | None = None, data: dict | None = None) -> dict:
    """Read-modify-write `directory/manifest.json`: config, versions, and `data` under `section`."""
    path = Path(directory) / "manifest.json"
    man = load_json(path)
    man.update(config=cfg, versions=versions(), updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if section is not None:
        man[section] = data
    fileio.write_json(path, man)
    return man


def plot_sizes(sizes: np.ndarray, path, title: str) -> None:
    """Histogram of cluster sizes (log-count axis), written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.arange(0, sizes.max() + 2) - 0.5 if sizes.max() < 100 else 100
    ax.hist(sizes, bins=bins, log=True, color="tab:blue")
    ax.set_xlabel("points per cluster (training sample)")
    ax.set_ylabel("clusters (log)")
    ax.set_title(title)
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
