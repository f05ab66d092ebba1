"""Why single-label training (UNICOM's ArcFace softmax on the first cluster label) ends BELOW the random-init ViT in the
ablation grid (docs/ablation.md), while MLCD ends above it: a diagnosis over training steps, and every loss kind's
tuning widened by the loss scale s. Writes bench/results/single_label.json (+ .png: kNN, held-out train kNN,
effective rank and cluster-id kNN vs step).

    python bench/single_label.py               single, mlcd, mlc and per_slot at s = 16, 32, 64 (the grid: s = 64),
                                               200 steps x 128, measured every 50 steps: 2-3 min per (kind, s)
                                               on a quiet 2-core machine
    python bench/single_label.py --small       a few steps on the data given (tests/test_single_label_bench.py)
    python bench/single_label.py --help        every setting

Each (kind, s) trains with the grid's own train.py overrides (runners.ablate.train_and_eval: configs/ablate.yaml's
`train` list, the kind's tuned lr and margin from bench/results/ablation.json, l = 8, or 1 for single), plus
loss.scale=s and a checkpoint every --every steps (data.segment_steps too, so the data stream is segmented
differently from the grid's run). At step 0 (the run's own random init: torch.manual_seed(seed) then build_model, as
train.py builds it) and at each checkpoint, the frozen backbone (pooled feature, the probe's) is measured on a fixed
stratified n-eval of Fashion-MNIST train (the kNN bank) and of test, on L2-normalised features:
  knn_top1             kNN top-1 on the test subset (k 20, T 0.07, the probe's kNN)
  effective_rank, dim  exp(entropy of the normalised singular values) of the centred test features (Roy & Vetterli)
  uniformity           log mean exp(-2 |f_i - f_j|^2) over pairs of 2,000 train-subset images (Wang & Isola)
  align_class          mean |f_i - f_j|^2 over train-subset pairs of the same true class
  align_cluster        the same over pairs sharing their FIRST cluster label (the collapse check)
  loo_knn_class        leave-one-out kNN top-1 of the true class within the train subset
  loo_knn_cluster      the same for the first cluster label: does training fit the pseudo-labels, losing the classes?
  train_loss           the last logged training loss at or before the step (train_loss_step says which)
Resumable: a run whose final checkpoint exists is not trained again (train.py resumes a killed one itself), and
each measurement is cached as <run>/measure/step-N.json (step 0, the same init for every run: <root>/init/). The
JSON is rewritten after every measurement, `complete: false` until every run has every step. A root made with
other settings is refused (kinds and scales may be added).
"""
import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlcd import fileio  # noqa: E402
from runners.ablate import CONFIG, KIND_LOSS, setting  # noqa: E402
from runners.kit import REPO, run_stage  # noqa: E402

TUNING = REPO / "bench" / "results" / "ablation.json"
MAKE_DATA = ("make them with `python -m runners.ablate` (its first phase writes data/demo/shards and "
             "data/ablate/cluster-k1000/labels; runners/ablate.py shards_pattern and labels_dir are the commands)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="data/demo/shards/fmnist-train-{000000..000011}.tar")
    ap.add_argument("--labels", default="data/ablate/cluster-k1000/labels", help="the grid's k=1000 clustering")
    ap.add_argument("--root", help="run dirs (default runs/single_label, --small: runs/single_label_small)")
    ap.add_argument("--out", help="report JSON (default bench/results/single_label.json, --small: <root>/...)")
    ap.add_argument("--kinds", nargs="+", default=["single", "mlcd", "mlc", "per_slot"], choices=sorted(KIND_LOSS))
    ap.add_argument("--scales", nargs="+", type=float, default=[16, 32, 64], help="loss.scale s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="training steps (default 200, --small 4)")
    ap.add_argument("--batch", type=int, help="global batch (default 128, --small 16)")
    ap.add_argument("--every", type=int, help="checkpoint / measurement cadence (default 50, --small 2)")
    ap.add_argument("--n-eval", type=int, help="train and test images measured (default 5000, --small 500)")
    ap.add_argument("--small", action="store_true", help="tiny steps, batch and n-eval (tests)")
    a = ap.parse_args(argv)
    pick = lambda v, full, small: v if v is not None else (small if a.small else full)  # noqa: E731
    a.steps, a.batch = pick(a.steps, 200, 4), pick(a.batch, 128, 16)
    a.every, a.n_eval = pick(a.every, 50, 2), pick(a.n_eval, 5000, 500)
    a.shards, a.labels = os.path.abspath(a.shards), os.path.abspath(a.labels)  # train.py runs in the repo root
    a.root = Path(pick(a.root, "runs/single_label", "runs/single_label_small")).resolve()
    a.out = Path(pick(a.out, REPO / "bench" / "results" / "single_label.json", a.root / "single_label.json")).resolve()
    return a


def run_dir(a, kind, scale) -> Path:
    return a.root / f"{kind}-s{scale:g}"


def train_overrides(a, kind: str, scale: float, out: Path, **extra) -> list[str]:
    """train.py's overrides: the grid's for `kind` (runners.ablate.train_and_eval), then s, the cadence and `extra`."""
    from omegaconf import OmegaConf
    g = OmegaConf.load(CONFIG).ablate
    best = json.loads(TUNING.read_text())["tuning"]["best"]
    if kind not in best:
        raise SystemExit(f"{TUNING}: no tuned lr/margin for {kind!r} (run the grid's tuning: python -m runners.ablate)")
    s = setting(g, {"kind": kind, "l": 1 if kind == "single" else g.base.l}, best)
    ov = {"data.train_shards": f"'{a.shards}'", "data.labels_dir": f"'{a.labels}'", "out_dir": f"'{out}'",
          "seed": a.seed, "loss": KIND_LOSS[kind], "data.num_labels": s["l"], "loss.sample_ratio": s["r"],
          "optim.lr": s["lr"], "loss.margin": s["margin"], **dict(o.split("=", 1) for o in g.train),
          "loss.scale": scale, "train.total_steps": a.steps, "train.global_batch_size": a.batch,
          "train.ckpt_every": a.every, "train.keep_last": 100, "data.segment_steps": a.every}
    if a.small:
        ov["optim.warmup_steps"] = 1
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def init_backbone(run: Path, seed: int):
    """The run's step 0: its model config (config.yaml, as train.py saved it) at random init from its seed."""
    from omegaconf import OmegaConf
    from mlcd.models.backbones import build_backbone
    model = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").model, resolve=True)
    return build_backbone({"type": "random", "model": model, "seed": seed})


def check_data(a):
    from mlcd.data.labels import missing_shard_labels, shard_stem
    from mlcd.data.tars import expand_urls
    try:
        stems = [shard_stem(u) for u in expand_urls(a.shards)]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"shards {a.shards} missing ({e}): {MAKE_DATA}") from None
    if not (Path(a.labels) / "manifest.json").exists() or missing_shard_labels(a.labels, stems):
        raise SystemExit(f"labels {a.labels} missing or incomplete: {MAKE_DATA}")
    return stems


def eval_data(a, stems) -> dict:
    """Fixed subsets: stratified n-eval of the train images that have cluster labels, and of test."""
    from mlcd.data import fashion_mnist
    from mlcd.data.labels import read_shard_labels
    from mlcd.eval.datasets import ArrayImages, stratified_pick
    first = {}
    for stem in stems:
        keys, labels, _ = read_shard_labels(a.labels, stem)
        for key, row in zip(keys, labels[:, 0]):
            m = re.fullmatch(r"fmnist-train-(\d+)", key)  # make_shards --source fashion_mnist's keys
            if m:
                first[int(m.group(1))] = int(row)
    if not first:
        raise SystemExit(f"{a.labels}: no key like fmnist-train-0000123 (shards of make_shards --source fashion_mnist)")
    (xtr, ytr), (xte, yte) = fashion_mnist.load("train"), fashion_mnist.load("test")
    have = np.array(sorted(first))
    itr = have[stratified_pick(ytr[have], a.n_eval, a.seed)]
    ite = stratified_pick(yte, a.n_eval, a.seed)
    uni = np.random.default_rng(a.seed).permutation(len(itr))[:2000]
    return {"train": ArrayImages(xtr[itr], ytr[itr]), "test": ArrayImages(xte[ite], yte[ite]), "uni": uni,
            "ytr": ytr[itr], "yte": yte[ite], "ctr": np.array([first[i] for i in itr])}


def group_align(f: torch.Tensor, groups: np.ndarray) -> float:
    """Mean |f_i - f_j|^2 over pairs in the same group (unit f: 2 - 2 cos; sum of cos = (|sum f|^2 - n) / 2)."""
    _, g = np.unique(groups, return_inverse=True)
    g = torch.as_tensor(g)
    sums = torch.zeros(int(g.max()) + 1, f.shape[1], dtype=torch.float64).index_add_(0, g, f.double())
    n = torch.bincount(g).double()
    pairs = (n * (n - 1) / 2).sum()
    return float(2 - 2 * ((sums.pow(2).sum(1) - n) / 2).sum() / pairs) if pairs else float("nan")


def loo_knn(f: torch.Tensor, y: np.ndarray, k: int = 20, t: float = 0.07) -> float:
    """Leave-one-out weighted kNN top-1 (%) of labels y within f (unit rows)."""
    _, lab = np.unique(y, return_inverse=True)
    lab = torch.as_tensor(lab)
    hits = 0
    for i in range(0, len(f), 1000):
        sims = f[i:i + 1000] @ f.T
        sims[torch.arange(len(sims)), torch.arange(i, i + len(sims))] = -float("inf")
        s, idx = sims.topk(min(k, len(f) - 1), dim=1)
        votes = torch.zeros(len(s), int(lab.max()) + 1).scatter_add_(1, lab[idx], (s / t).exp())
        hits += int((votes.argmax(1) == lab[i:i + len(s)]).sum())
    return 100 * hits / len(f)


@torch.no_grad()
def measure(backbone, ev) -> dict:
    from mlcd.eval.features import extract
    from mlcd.eval.knn import knn_predict
    tr, te = (F.normalize(torch.as_tensor(extract(backbone, ev[s], batch_size=500, num_workers=0, device="cpu",
                                                  desc=s)[0]), dim=1) for s in ("train", "test"))
    sv = torch.linalg.svdvals((te - te.mean(0)).double())
    p = sv / sv.sum()
    u = tr[ev["uni"]]
    iu = torch.triu_indices(len(u), len(u), 1)
    return {"knn_top1": 100 * float((knn_predict(tr, ev["ytr"], te, 10, 20, 0.07, device="cpu") == ev["yte"]).mean()),
            "effective_rank": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())), "dim": int(tr.shape[1]),
            "uniformity": float(torch.cdist(u, u).pow(2)[iu[0], iu[1]].mul(-2).exp().mean().log()),
            "align_class": group_align(tr, ev["ytr"]), "align_cluster": group_align(tr, ev["ctr"]),
            "loo_knn_class": loo_knn(tr, ev["ytr"]), "loo_knn_cluster": loo_knn(tr, ev["ctr"])}


def measure_run(a, run: Path, ev):
    """Yields the rows at step 0 and at every checkpoint, each cached as a marker JSON."""
    from mlcd.models.backbones import build_backbone
    from mlcd.models.loading import list_checkpoints
    from omegaconf import OmegaConf
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    todo = [(0, None)] + [(int(c.name.split("-")[1]), c) for c in list_checkpoints(run / "checkpoints")]
    model = json.dumps(OmegaConf.to_container(OmegaConf.load(run / "config.yaml").model, resolve=True), sort_keys=True)
    for step, ckpt in todo:  # step 0 is the same for every run of one model config and seed: measured once
        marker = (run / "measure" / f"step-{step:08d}.json" if step else
                  a.root / "init" / f"{hashlib.sha1(model.encode()).hexdigest()[:12]}-seed{a.seed}.json")
        if not marker.exists():
            t0 = time.time()
            bb = init_backbone(run, a.seed) if ckpt is None else build_backbone({"type": "mlcd", "path": str(ckpt)})
            last = [r for r in logged if r["step"] <= step][-1:]
            row = {"step": step, **measure(bb, ev), "train_loss": last[0]["loss"] if last else None,
                   "train_loss_step": last[0]["step"] if last else None, "measure_seconds": round(time.time() - t0, 1)}
            marker.parent.mkdir(parents=True, exist_ok=True)
            fileio.write_json(marker, row)
            print(f"  {run.name} step {step}: kNN {row['knn_top1']:.2f}  erank {row['effective_rank']:.1f}/"
                  f"{row['dim']}  cluster LOO kNN {row['loo_knn_cluster']:.2f}", flush=True)
        yield json.loads(marker.read_text())


def plot(runs: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = (("knn_top1", "test kNN top-1 (%)"), ("loo_knn_class", "true-class LOO kNN (%, train: selects s)"),
            ("effective_rank", "effective rank (test)"), ("loo_knn_cluster", "cluster-id LOO kNN (%, train)"))
    kinds = sorted({r["kind"] for r in runs.values()})
    scales = sorted({r["scale"] for r in runs.values()})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8))
    for ax, (key, title) in zip(axes, keys):
        for name, r in runs.items():  # colour = kind, line style = s
            ax.plot([x["step"] for x in r["rows"]], [x[key] for x in r["rows"]], marker="o", ms=3,
                    color=f"C{kinds.index(r['kind'])}", ls=("-", "--", ":", "-.")[scales.index(r["scale"]) % 4],
                    label=f"{r['kind']} s={r['scale']:g}")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with fileio.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def report(a, runs: dict, t0: float) -> dict:
    want = sorted({0, *range(a.every, a.steps + 1, a.every), a.steps})
    out = {"bench": "single_label", "what": __doc__.split("\n\n")[0].replace("\n", " "),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
           "runs": runs, "seconds_this_call": round(time.time() - t0, 1),
           "complete": len(runs) == len(a.kinds) * len(a.scales)
           and all([x["step"] for x in r["rows"]] == want for r in runs.values())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json(a.out, out)
    if runs:
        plot(runs, a.out.with_suffix(".png"))
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0 = time.time()
    ev = eval_data(a, check_data(a))
    fixed = {k: str(getattr(a, k)) for k in ("shards", "labels", "seed", "steps", "batch", "every", "n_eval")}
    made = a.root / "settings.json"  # the runs and cached measurements of a root hold for these only
    if made.exists() and json.loads(made.read_text()) != fixed:
        raise SystemExit(f"{a.root} was made with other settings ({made}): use another --root")
    a.root.mkdir(parents=True, exist_ok=True)
    fileio.write_json(made, fixed)
    runs = {}
    for kind in a.kinds:
        for scale in a.scales:
            run = run_dir(a, kind, scale)
            cmd = [sys.executable, "train.py", *train_overrides(a, kind, scale, run)]
            if not (run / "checkpoints" / f"step-{a.steps:08d}" / "manifest.json").exists():
                seconds = run_stage(cmd, "single_label", run / "train.log")
                fileio.write_json(run / "trained.json", {"seconds": seconds})
            trained = json.loads((run / "trained.json").read_text()) if (run / "trained.json").exists() else {}
            runs[run.name] = {"kind": kind, "scale": scale, "train_cmd": cmd[1:], "rows": [],
                              "train_seconds": trained.get("seconds")}
            for row in measure_run(a, run, ev):
                runs[run.name]["rows"].append(row)
                report(a, runs, t0)
    out = report(a, runs, t0)
    print(f"written {a.out} (complete: {out['complete']}) in {out['seconds_this_call']:.0f} s")
    return out


if __name__ == "__main__":
    main()
