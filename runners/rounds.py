"""Self-training rounds, DeepCluster-style: cluster -> train -> cluster with the new encoder -> train ...

    python -m runners.rounds [rounds.key=value ...]        (settings: configs/rounds.yaml)
    python -m runners.rounds --help                        (this, and the default settings)

Round 0 clusters the demo's shards with the teacher (cluster.py's open_clip settings); round i >= 1 clusters them
with round i-1's final checkpoint (`extract.backbone={type: mlcd, path: <checkpoint>}`), and trains from that
checkpoint's backbone (`rounds.init=previous`, class centers not taken: the clustering changes) or from scratch.
`rounds.recluster=false` is the control: every round trains on round 0's clustering, so the same training steps
run without re-clustering.
After each round's training, the linear probe + kNN on Fashion-MNIST test; once, the baselines (raw pixels, the
teacher's features). Under rounds.root:
    round{i}/{cluster,train,eval}/        each stage's output dir, its log ({stage}.log) and, once it finished,
    round{i}/{cluster,train,eval}.json    a marker (command line, seconds, results): a finished stage is skipped
    baselines/{pixels,teacher}(.json)
    settings.json                         what the rounds were made with: a re-run with other settings is refused
    rounds_report.json, rounds_report.md, rounds.png
Label agreement between rounds: top-1 label ids of two clusterings are arbitrary, so the report gives the adjusted
mutual information (keys aligned) between consecutive rounds and with the true classes (the shards' `.cls`),
the majority-class purity, and the fraction of images that left their old cluster's majority successor.
Like runners.demo and runners.ablate, every stage runs as the command line it prints.
"""
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mlcd import fileio
from mlcd.cluster.extract import encoder_config
from mlcd.data.labels import read_shard_labels
from mlcd.validate import refuse_other_settings
from runners.stats import probe_scores
from runners.kit import (REPO, check_stage, compose, fmnist_shards, hydra_overrides, launch, load_marker,
                         load_runner_config, run_once)

CONFIG = REPO / "configs" / "rounds.yaml"
STAGES = ("cluster", "train", "eval")
# settings that decide the results: a root made with others is refused (num_rounds may grow)
SETTINGS = ("init", "init_from", "feature", "recluster", "shards_dir", "limit", "max_per_shard", "nproc", "cluster",
            "train", "eval")


def clustering_dir(r, root: Path, i: int) -> Path:
    """Round i's clustering: its own, or round 0's when rounds.recluster=false (the control run)."""
    return root / f"round{i if r.recluster else 0}" / "cluster"



# ------------------------------------------------------------------------------------------------ checks
def train_model_cfg(train_overrides) -> dict:
    """The model config train.py will build with these overrides."""
    return OmegaConf.to_container(compose("train", train_overrides).model, resolve=True)


def check_init(path, model_cfg: dict, what: str) -> Path:
    """The checkpoint a training will start from: it exists and its model is the config's (train.py's rule:
    only image_size and name may differ). Returns the checkpoint directory."""
    from mlcd.models.loading import find_checkpoint, read_manifest
    from mlcd.train.checkpoint import check_same_model

    try:
        ckpt = find_checkpoint(path)
        check_same_model(read_manifest(ckpt).get("model", {}), model_cfg, ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"rounds: {what}={path}: {e}: it cannot initialise rounds.train") from None
    return ckpt


def check(r, root: Path) -> dict:
    """Everything that can be refused before any work; returns the settings to record."""
    if r.init not in ("previous", "scratch"):
        raise SystemExit(f"rounds.init={r.init!r}: previous | scratch")
    if r.feature not in ("embedding", "pooled", "patch_mean"):
        raise SystemExit(f"rounds.feature={r.feature!r}: embedding | pooled | patch_mean")
    for key in ("num_rounds", "nproc"):
        if not isinstance(r[key], int) or r[key] < 1:
            raise SystemExit(f"rounds.{key}={r[key]!r}: an integer >= 1")
    rc = OmegaConf.to_container(r, resolve=True)
    settings = {k: rc[k] for k in SETTINGS}
    old = load_marker(root / "settings.json")
    if old is not None:
        old.setdefault("recluster", True)  # roots made before the setting existed re-clustered every round
    if old is not None:
        try:
            refuse_other_settings({f"rounds.{k}": v for k, v in old.items()},
                                  {f"rounds.{k}": v for k, v in settings.items()}, f"rounds: {root}",
                                  "Choose another rounds.root, or delete it to start over.")
        except ValueError as e:
            raise SystemExit(str(e)) from None
    check_stage("rounds", "cluster", [f"shards='{r.shards_dir}/x.tar'", f"out_dir='{root}'", *r.cluster])
    check_stage("rounds", "train", [f"data.train_shards='{r.shards_dir}/x.tar'", f"data.labels_dir='{root}'",
                                    f"out_dir='{root}'", *r.train], r.nproc)
    if r.init_from:
        check_init(r.init_from, train_model_cfg(r.train), "rounds.init_from")
    for i in range(r.num_rounds):  # a finished training the next round builds on must still be there
        done = load_marker(root / f"round{i}" / "train.json")
        if done and i + 1 < r.num_rounds and not Path(done["checkpoint"]).is_dir():
            raise SystemExit(f"rounds: round {i}'s checkpoint {done['checkpoint']} is gone (round {i + 1} clusters "
                             f"with it); delete {root / f'round{i}'} and later rounds to redo them")
    return settings


# ------------------------------------------------------------------------------------------------ stages
def shards_pattern(r) -> tuple[str, list[Path]]:
    """(brace pattern, tar paths) of the demo's shards, made when missing."""
    sd = Path(r.shards_dir)
    return fmnist_shards(sd, r.max_per_shard, r.limit, "rounds", sd.parent / "make_shards.log")[:2]


def one_round(r, root: Path, i: int, shards: str) -> None:
    """Cluster, train, probe round i (each step skipped once finished)."""
    d, py = root / f"round{i}", sys.executable
    prev = load_marker(root / f"round{i - 1}" / "train.json")["checkpoint"] if i else None
    init = prev if i and r.init == "previous" else (r.init_from if not i else None)
    if init:  # before the round's clustering: it fails now, not after
        check_init(init, train_model_cfg(r.train), f"round {i}: train.init_from")
    teacher = [f"extract.backbone={{type: mlcd, path: '{prev}'}}", f"extract.feature={r.feature}"] if i else []
    if r.recluster or i == 0:
        run_once(d / "cluster.json", [py, "cluster.py", f"shards='{shards}'", f"out_dir='{d / 'cluster'}'",
                                      *r.cluster, *teacher], "rounds")
    labels = clustering_dir(r, root, i) / "labels"


    def newest_checkpoint():
        from mlcd.models.loading import find_checkpoint
        return {"checkpoint": str(find_checkpoint(d / "train").resolve()), "init_from": str(init) if init else None}
    trained = run_once(d / "train.json", [
        *launch("train.py", r.nproc), f"data.train_shards='{shards}'", f"data.labels_dir='{labels}'",
        f"out_dir='{d / 'train'}'", *([f"train.init_from='{init}'", "train.init_centers=false"] if init else []),
        *r.train], "rounds", newest_checkpoint)
    evaluate(r, d / "eval", ["backbone.type=mlcd", f"backbone.path='{trained['checkpoint']}'"])


def evaluate(r, out: Path, backbone: list[str]) -> dict:
    def scores():
        lp, knn = probe_scores(out / "results.json")
        return {"linear_probe_top1": lp, "knn_top1": knn}
    return run_once(out.with_suffix(".json"), [sys.executable, "eval_linear_probe.py", *backbone,
                                               "datasets=[fashion_mnist]", f"out_dir='{out}'", *r.eval], "rounds", scores)


def baselines(r, root: Path) -> dict:
    """Raw pixels and the round-0 teacher's features (as runners.demo evaluates them), once."""
    e = OmegaConf.load(root / "round0" / "cluster" / "config.yaml")
    ec = e.extract
    encoder, feature = encoder_config(ec, e.seed)  # the encoder that made round 0's clusters, by construction
    teacher = [*hydra_overrides("backbone", encoder), f"feature={feature}"]
    if ec.get("backbone"):
        name = f"teacher features ({ec.backbone.type} {ec.backbone.path})"
    else:
        name = f"teacher features ({ec.model}, {ec.pretrained or 'random init'})"
    return {"raw pixels": evaluate(r, root / "baselines" / "pixels", ["backbone.type=pixels"]),
            name: evaluate(r, root / "baselines" / "teacher", teacher)}


# ------------------------------------------------------------------------------------------------ label metrics
def top1_labels(labels_dir: Path, tars: list[Path]) -> dict[str, int]:
    """{key: top-1 center id} over every shard's label file."""
    out = {}
    for tar in tars:
        keys, labels, _ = read_shard_labels(labels_dir, tar.name.removesuffix(".tar"))
        out.update(zip(keys, labels[:, 0].tolist()))
    return out


def true_classes(tars: list[Path]) -> dict[str, int]:
    """{key: class} from the shards' `.cls` members (make_shards writes them for Fashion-MNIST); {} if none."""
    out = {}
    for tar in tars:
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".cls"):
                    out[m.name[: -len(".cls")]] = int(tf.extractfile(m).read())
    return out


def follow_majority(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of images whose b-label is the most common b-label among the images sharing their a-label:
    purity when a = cluster, b = class; 1 - (top-1 changed after mapping each old cluster to its majority
    successor) when a = previous round, b = this round."""
    from sklearn.metrics.cluster import contingency_matrix
    return float(contingency_matrix(a, b, sparse=True).max(axis=1).sum() / len(a))


def label_metrics(cur: dict, prev: dict | None, classes: dict) -> dict:
    from sklearn.metrics import adjusted_mutual_info_score as ami

    keys = sorted(cur)
    a = np.array([cur[k] for k in keys])
    m = {"images": len(keys), "clusters_used": int(len(np.unique(a))), "ami_vs_classes": None, "purity": None,
         "ami_vs_previous": None, "top1_changed_after_majority_mapping": None}
    if classes:
        c = np.array([classes[k] for k in keys])
        m.update(ami_vs_classes=float(ami(c, a)), purity=follow_majority(a, c))
    if prev is not None:
        if set(prev) != set(cur):
            raise ValueError(f"rounds: two rounds labelled different images ({len(prev)} vs {len(cur)} keys)")
        p = np.array([prev[k] for k in keys])
        m.update(ami_vs_previous=float(ami(p, a)), top1_changed_after_majority_mapping=1 - follow_majority(p, a))
    return m


# ------------------------------------------------------------------------------------------------ report
def report(r, root: Path, tars: list[Path], classes: dict, base: dict | None) -> dict:
    prev, rows = None, []
    for i in range(r.num_rounds):
        d = root / f"round{i}"
        cl, tr, ev = (load_marker(d / f"{s}.json") for s in STAGES)
        if not r.recluster and i:
            cl = tr and {"seconds": 0.0}  # round 0's clustering, kept
        if cl is None:
            break
        labels = clustering_dir(r, root, i) / "labels"
        cur = top1_labels(labels, tars)
        teacher = (load_marker(root / f"round{i - 1}" / "train.json")["checkpoint"] if i and r.recluster
                   else "teacher")
        row = {"round": i, "clustered_with": teacher,
               "num_classes": load_marker(labels / "manifest.json")["num_classes"],
               **label_metrics(cur, prev, classes)}
        row.update({k: tr and tr[k] for k in ("init_from", "checkpoint")})
        row.update({k: ev and ev[k] for k in ("linear_probe_top1", "knn_top1")})
        row["seconds"] = {s: m and m["seconds"] for s, m in zip(STAGES, (cl, tr, ev))}
        rows.append(row)
        prev = cur
    base = {k: {m: v[m] for m in ("linear_probe_top1", "knn_top1")} for k, v in (base or {}).items()}
    out = {"what": "self-training rounds (cluster -> train -> cluster with the new encoder ...) on Fashion-MNIST",
           "rounds": rows, "baselines": base, "settings": OmegaConf.to_container(r, resolve=True),
           "complete": len(rows) == r.num_rounds and all(x["knn_top1"] is not None for x in rows) and bool(base)}
    fileio.write_json(root / "rounds_report.json", out)
    fileio.write_text(root / "rounds_report.md", markdown(rows, base) + "\n")
    plot(rows, base, root / "rounds.png")
    return out


def markdown(rows: list, base: dict) -> str:
    f = lambda v, pct=False: "-" if v is None else (f"{v:.2f}" if pct else f"{v:.3f}")  # noqa: E731
    lines = ["| round | clustered with | AMI(labels, classes) | purity | AMI(vs previous round) | "
             "top-1 changed (after majority mapping) | linear probe top-1 | kNN top-1 |", "|---" * 8 + "|"]
    for x in rows:
        src = "teacher" if x["clustered_with"] == "teacher" else f"round {x['round'] - 1} encoder"
        lines.append(f"| {x['round']} | {src} | {f(x['ami_vs_classes'])} | {f(x['purity'])} | "
                     f"{f(x['ami_vs_previous'])} | {f(x['top1_changed_after_majority_mapping'])} | "
                     f"{f(x['linear_probe_top1'], True)} | {f(x['knn_top1'], True)} |")
    for name, v in base.items():
        lines.append(f"| baseline | {name} | - | - | - | - | {f(v['linear_probe_top1'], True)} | "
                     f"{f(v['knn_top1'], True)} |")
    return "\n".join(lines)


def plot(rows: list, base: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    done = [x for x in rows if x["knn_top1"] is not None]
    for key, color, label in (("linear_probe_top1", "C0", "linear probe"), ("knn_top1", "C1", "kNN")):
        ax.plot([x["round"] for x in done], [x[key] for x in done], marker="o", color=color, label=label)
        for (name, v), ls in zip(base.items(), ("--", ":")):
            ax.axhline(v[key], color=color, ls=ls, lw=1, label=f"{label}: {name}")
    ax.set(xlabel="round", ylabel="top-1 on Fashion-MNIST test (%)", title="probe per round")
    ax.legend(fontsize=7)
    for key, color, label in (("ami_vs_classes", "C2", "AMI(labels, classes)"),
                              ("ami_vs_previous", "C3", "AMI(labels, previous round)")):
        pts = [(x["round"], x[key]) for x in rows if x[key] is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
    ax2.set(xlabel="round", ylabel="AMI", title="top-1 labels")
    ax2.legend(fontsize=7)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.set_xticks([x["round"] for x in rows] or [0])
    fig.tight_layout()
    with fileio.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> dict:
    cfg = load_runner_config(CONFIG, argv, __doc__)
    r = cfg.rounds
    r.root, r.shards_dir = str(Path(r.root).resolve()), str(Path(r.shards_dir).resolve())
    if r.init_from:
        r.init_from = str(Path(r.init_from).resolve())
    root = Path(r.root)
    settings = check(r, root)
    root.mkdir(parents=True, exist_ok=True)
    fileio.write_json(root / "settings.json", settings)
    shards, tars = shards_pattern(r)
    classes = true_classes(tars)
    for i in range(r.num_rounds):
        one_round(r, root, i, shards)
        report(r, root, tars, classes, None)
    out = report(r, root, tars, classes, baselines(r, root))
    print(markdown(out["rounds"], out["baselines"]))
    print(f"\nrounds: report {root / 'rounds_report.json'}, table {root / 'rounds_report.md'}, "
          f"plot {root / 'rounds.png'}")
    return out


if __name__ == "__main__":
    main()
