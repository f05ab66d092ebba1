"""Adapting a released encoder to new images (README "Adapt a released encoder"), measured on a domain shift made
from Fashion-MNIST's classes -> bench/results/adapt.json (+ adapt.md).

    python bench/adapt.py                       the full bench: 3 seeds, 350 steps x 256 on 2 ranks per training
                                                (the source: 700); ~70 min on a quiet 2-core machine (estimate:
                                                10 x 350 training steps ~50 min, 15 probes ~11 min, the rest ~9)
    python bench/adapt.py --small               a few hundred images and a few steps (tests/test_adapt.py): minutes
    python bench/adapt.py --help                every setting

The "released" encoder: the demo's tiny ViT (configs/train/model/vit_tiny.yaml) trained with MLCD on the training
images of classes 0-4 only (T-shirt, Trouser, Pullover, Dress, Coat), clustered as the demo clusters (a random-init
ViT-S-32 teacher), and exported to Hugging Face format (CLIPVisionModelWithProjection). The new domain: the training
images of classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) as a flat folder of PNGs with no labels. The recipe,
each step the command line it prints:

    make_shards --source folder                         the unlabelled folder -> shards
    cluster.py extract.backbone={type: hf, path: SRC}   clustered with the source encoder, k = images / per_center
    train.py experiment=adapt train.init_from=SRC       continue from the source (lr: a tenth of its own, 2e-3 -> 2e-4)
    python -m mlcd.export_hf RUN OUT                    back to the source's class and image processor
    eval_linear_probe.py backbone.type=hf ...           linear probe + kNN on classes 5-9's test split

compared, on classes 5-9's test split (the probes train on their labelled training images), with
(i) the source encoder, (ii) the adapted encoder, (iii) the same ViT trained from scratch on the same clusters for
the same steps (the demo's from-scratch recipe, lr 2e-3), (iv) raw pixels; each seed re-clusters (k-means seed) and
re-trains (ii) and (iii). Also measured: how pure the source encoder's clusters of the new images are, what the
adapted encoder keeps of the old classes (probe on classes 0-4), and k at other images-per-center values (seed 0).

Resumable: every finished stage leaves a marker JSON (command, seconds, results) under <root>/markers and is skipped
on a re-run; a root made with other settings is refused (seeds may be added). The report is rewritten after every
stage, `complete: false` until all are done.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlcd import fileio  # noqa: E402
from runners.stats import probe_scores, summary  # noqa: E402
from runners.kit import REPO, load_marker, run_once  # noqa: E402

OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
SOURCE_LR = 2.0e-3           # the demo's lr, which trains the source
PY = sys.executable


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny data and steps (tests): settings below become small")
    ap.add_argument("--root", help="work directory (default runs/bench_adapt, --small: runs/bench_adapt_small)")
    ap.add_argument("--out", help="report JSON (default bench/results/adapt.json, --small: <root>/adapt.json)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--small: 0)")
    ap.add_argument("--steps", type=int, help="steps of each adaptation / scratch training (default 350)")
    ap.add_argument("--source-steps", type=int, help="steps of the source's training (default 700)")
    ap.add_argument("--batch", type=int, help="global batch (default 256)")
    ap.add_argument("--nproc", type=int, default=2, help="training ranks (torchrun, gloo on CPU)")
    ap.add_argument("--per-center", type=int, help="the k rule: k = images / this (default 100)")
    ap.add_argument("--sweep", type=int, nargs="*", help="other images-per-center values, seed 0, adapted only "
                    "(default 30 300; --small: none)")
    ap.add_argument("--per-class", type=int, help="training images per class (default all 6000; --small 60)")
    ap.add_argument("--test-per-class", type=int, help="test images per class (default all 1000; --small 40)")
    ap.add_argument("--probe-train", type=int, help="probe training images, stratified (default 10000; small all)")
    a = ap.parse_args(argv)
    small = a.small
    pick = lambda v, full, sm: v if v is not None else (sm if small else full)  # noqa: E731
    a.root = Path(pick(a.root, "runs/bench_adapt", "runs/bench_adapt_small")).resolve()
    a.out = Path(pick(a.out, REPO / "bench" / "results" / "adapt.json", a.root / "adapt.json")).resolve()
    a.seeds = pick(a.seeds, [0, 1, 2], [0])
    a.steps = pick(a.steps, 350, 4)
    a.source_steps = pick(a.source_steps, 700, 4)
    a.batch = pick(a.batch, 256, 32)
    a.per_center = pick(a.per_center, 100, 30)
    a.sweep = pick(a.sweep, [30, 300], [])
    a.per_class = pick(a.per_class, None, 60)
    a.test_per_class = pick(a.test_per_class, None, 40)
    a.probe_train = pick(a.probe_train, 10000, None)
    return a


SETTINGS = ("steps", "source_steps", "batch", "nproc", "per_center", "per_class", "test_per_class", "probe_train")


# ------------------------------------------------------------------------------------------------ data
def make_data(a) -> dict:
    """The two domains as image folders (PNG, named by Fashion-MNIST training index): <root>/data/{old,new}_images/
    (flat, unlabelled: what a user has) and, for the probes, <root>/data/probe_{old,new}/{train,test}/<class>/
    (hard links to the same files for train). <root>/data/classes_{old,new}.json: key -> class, for the cluster
    purity only (training never reads it)."""
    from mlcd.data import fashion_mnist
    from mlcd.data.make_shards import png_from_array
    marker = a.root / "markers" / "data.json"
    if marker.exists():
        return load_marker(marker)
    d = a.root / "data"
    t0 = time.time()
    counts = {}
    for split, per in (("train", a.per_class), ("test", a.test_per_class)):
        images, labels = fashion_mnist.load(split)
        for name, classes in (("old", OLD), ("new", NEW)):
            keys = {}
            for c in classes:
                idx = np.flatnonzero(labels == c)[:per]
                folder = d / f"probe_{name}" / split / str(c)
                folder.mkdir(parents=True, exist_ok=True)
                for i in idx:
                    key = f"{split}{i:05d}"
                    png = folder / f"{key}.png"
                    png.write_bytes(png_from_array(images[i]))
                    if split == "train":  # the unlabelled folder: the same files, no class directories
                        flat = d / f"{name}_images" / png.name
                        flat.parent.mkdir(parents=True, exist_ok=True)
                        if not flat.exists():
                            os.link(png, flat)
                    keys[key] = c
            counts[f"{name}_{split}"] = len(keys)
            if split == "train":
                fileio.write_json(d / f"classes_{name}.json", keys)
    done = {"counts": counts, "seconds": round(time.time() - t0, 1)}
    marker.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json(marker, done)
    return done


def shards(a, name: str, n_images: int) -> str:
    """make_shards over the unlabelled folder; returns the brace pattern of its tars."""
    out = a.root / "shards" / name
    per_shard = max(1, -(-n_images // 12))  # 12 shards, as the demo's 60k: every loader worker gets several
    run_once(a.root / "markers" / f"shards_{name}.json",
             [PY, "-m", "mlcd.data.make_shards", "--source", "folder", "--input",
              str(a.root / "data" / f"{name}_images"), "--out", str(out), "--prefix", name,
              "--max-per-shard", str(per_shard)], "adapt")
    n = len(json.loads((out / "manifest.json").read_text())["shards"])
    return f"{out}/{name}-{{000000..{n - 1:06d}}}.tar"


# ------------------------------------------------------------------------------------------------ stages
def k_for(n_images: int, per_center: int) -> int:
    """The k rule: one center per `per_center` images (README: k = images / 100)."""
    return max(2, round(n_images / per_center))


def cluster(a, tag: str, domain: str, shard_pattern: str, out: Path, k: int, seed: int, backbone: Path | None,
            features_from: Path | None = None) -> dict:
    """cluster.py over a domain's shards: the demo's random teacher (backbone None) or the source encoder.
    `features_from`: another clustering of the same images by the same encoder, whose features are linked in and
    only k-means + assignment run (the features do not depend on the seed or k)."""
    from runners.rounds import label_metrics, top1_labels
    cmd = [PY, "cluster.py", f"shards='{shard_pattern}'", f"out_dir='{out}'", f"kmeans.k={k}",
           f"kmeans.seed={1234 + seed}", f"seed={seed}", f"assign.topk={min(8, k)}"]
    if backbone is not None:
        cmd += [f"extract.backbone={{type: hf, path: '{backbone}'}}", "extract.feature=embedding"]
    marker = a.root / "markers" / f"cluster_{tag}.json"
    if features_from is not None and not marker.exists():
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "features").exists():
            os.symlink(features_from / "features", out / "features")
        cmd.append("stages=[kmeans,assign]")

    def labels():
        classes = json.loads((a.root / "data" / f"classes_{domain}.json").read_text())
        tars = sorted((Path(shard_pattern).parent).glob("*.tar"))
        m = label_metrics(top1_labels(out / "labels", tars), None, classes)
        return {"k": k, "ami_vs_classes": round(m["ami_vs_classes"], 4), "purity": round(m["purity"], 4),
                "clusters_used": m["clusters_used"]}
    return run_once(marker, cmd, "adapt", labels)


def train(a, tag: str, shard_pattern: str, labels: Path, out: Path, seed: int, steps: int, adapt_from: Path | None):
    launch = ([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
              if a.nproc > 1 else [PY])
    every = max(1, steps // 2)
    cmd = [*launch, "train.py", f"data.train_shards='{shard_pattern}'", f"data.labels_dir='{labels}'",
           f"out_dir='{out}'", f"seed={seed}", f"train.total_steps={steps}", f"train.global_batch_size={a.batch}",
           f"train.ckpt_every={every}", f"data.segment_steps={every}", f"train.log_every={max(1, min(10, steps // 4))}",
           "train.progress_bar=false", "logging.wandb.mode=disabled", "monitor.every=0"]
    if adapt_from is not None:   # the recipe's preset; what the tiny ViT on 28 px images needs, as the demo sets it
        cmd += ["experiment=adapt", f"train.init_from='{adapt_from}'", f"optim.lr={SOURCE_LR / 10}",
                f"optim.warmup_steps={max(1, steps // 20)}", "data.crop_scale=[0.7,1.0]", "data.num_workers=1"]
    elif a.small:
        cmd += [f"optim.warmup_steps={max(1, steps // 4)}"]

    def info():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {"final_loss": rows[-1]["loss"], "run": str(out),
                # training time without start-up: each logged interval's samples over its measured throughput
                "step_seconds": round(sum((r["samples_seen"] - p) / r["images_per_s"]
                                          for r, p in zip(rows, [0] + [r["samples_seen"] for r in rows])), 1)}
    return run_once(a.root / "markers" / f"train_{tag}.json", cmd, "adapt", info)


def export(a, tag: str, run: Path, out: Path) -> dict:
    def info():
        return {"architectures": json.loads((out / "config.json").read_text())["architectures"]}
    return run_once(a.root / "markers" / f"export_{tag}.json", [PY, "-m", "mlcd.export_hf", str(run), str(out)],
                    "adapt", info)


def probe(a, tag: str, domain: str, backbone: list[str]) -> dict:
    out = a.root / "eval" / f"{tag}_on_{domain}"
    name = f"fmnist_{domain}5"
    cmd = [PY, "eval_linear_probe.py", *backbone,
           f"datasets=[{{name: {name}, type: imagefolder, root: '{a.root / 'data' / f'probe_{domain}'}'}}]",
           f"out_dir='{out}'", f"cache_dir='{a.root / 'feature_cache'}'", "num_workers=1"]
    if a.probe_train:
        cmd.append(f"limit_train={a.probe_train}")
    if a.small:  # a fixed L2 strength: the search (~1,000 L-BFGS iterations) is most of a small run's time
        cmd.append("probe.lam=0.01")

    def scores():
        lp, knn = probe_scores(out / "results.json", name)
        return {"linear_probe_top1": round(lp, 2), "knn_top1": round(knn, 2)}
    return run_once(a.root / "markers" / f"probe_{tag}_on_{domain}.json", cmd, "adapt", scores)


# ------------------------------------------------------------------------------------------------ report
ARMS = {"source": "(i) source encoder (trained on classes 0-4)", "adapted": "(ii) adapted from the source",
        "scratch": "(iii) same ViT from scratch, same clusters and steps", "pixels": "(iv) raw pixels"}


def report(a, seconds_this_call: float) -> dict:
    markers = {p.stem: json.loads(p.read_text()) for p in sorted((a.root / "markers").glob("*.json"))}
    get = lambda key: markers.get(key)  # noqa: E731
    p = a.per_center

    def arm(tags: list[str], domain: str) -> dict:
        found = [get(f"probe_{t}_on_{domain}") for t in tags]
        found = [f for f in found if f]
        return {"n": len(found), **{m: summary([f[m] for f in found]) for m in ("linear_probe_top1", "knn_top1")}}
    seeds = a.seeds
    new = {"source": arm(["source"], "new"), "adapted": arm([f"adapted_s{s}_p{p}" for s in seeds], "new"),
           "scratch": arm([f"scratch_s{s}" for s in seeds], "new"), "pixels": arm(["pixels"], "new")}
    old = {"source": arm(["source"], "old"), "adapted": arm([f"adapted_s{s}_p{p}" for s in seeds], "old"),
           "pixels": arm(["pixels"], "old")}
    sweep = {}
    for q in sorted({p, *a.sweep}):
        c, t, e = get(f"cluster_new_s0_p{q}"), get(f"train_adapted_s0_p{q}"), get(f"probe_adapted_s0_p{q}_on_new")
        sweep[str(q)] = {"k": c and c["k"], "purity": c and c["purity"], "ami_vs_classes": c and c["ami_vs_classes"],
                         "linear_probe_top1": e and e["linear_probe_top1"], "knn_top1": e and e["knn_top1"],
                         "train_seconds": t and t["seconds"]}
    clusters = {s: get(f"cluster_new_s{s}_p{p}") for s in seeds}
    trainings = [m for k, m in markers.items() if k.startswith("train_") and k != "train_source"]
    stage_seconds = {k: m.get("seconds") for k, m in markers.items()}
    expected = 4 + 3 * len(seeds) + len(set(a.sweep) - {p})  # probes
    n_probes = sum(k.startswith("probe_") for k in markers)
    out = {
        "bench": "adapt",
        "what": "adapt a released encoder (tiny ViT trained with MLCD on Fashion-MNIST classes 0-4, exported as "
                "CLIPVisionModelWithProjection) to classes 5-9's unlabelled training images; linear probe and kNN "
                "top-1 (%) on classes 5-9's test split, mean/std over seeds",
        "settings": {k: getattr(a, k) for k in (*SETTINGS, "seeds", "sweep")} | {
            "source_lr": SOURCE_LR, "adapt_lr": SOURCE_LR / 10, "root": str(a.root), "small": a.small},
        "arms": ARMS,
        "on_new_classes": new,
        "on_old_classes": old,
        "new_domain_clusters": {"per_center": p, **{f"seed{s}": c for s, c in clusters.items()}},
        "source_clusters": get("cluster_old"),
        "source_training": get("train_source"),
        "k_sweep_seed0": sweep,
        "timing": {"stage_seconds": stage_seconds,
                   "total_stage_seconds": round(sum(v for v in stage_seconds.values() if v), 1),
                   "training_seconds_each": [m["seconds"] for m in trainings],
                   "this_call_seconds": round(seconds_this_call, 1)},
        "complete": n_probes >= expected,
    }
    fileio.write_json(a.out, out)
    fileio.write_text(a.out.with_suffix(".md"), markdown(out) + "\n")
    return out


def markdown(r: dict) -> str:
    f = lambda s: "-" if s["mean"] is None else (  # noqa: E731
        f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else ""))
    lines = ["| encoder | linear probe top-1 (classes 5-9) | kNN top-1 (classes 5-9) | n |", "|---|---|---|---|"]
    for key, label in ARMS.items():
        v = r["on_new_classes"][key]
        lines.append(f"| {label} | {f(v['linear_probe_top1'])} | {f(v['knn_top1'])} | {v['n']} |")
    lines += ["", "| encoder | linear probe top-1 (classes 0-4) | kNN top-1 (classes 0-4) | n |", "|---|---|---|---|"]
    for key, v in r["on_old_classes"].items():
        lines.append(f"| {ARMS[key]} | {f(v['linear_probe_top1'])} | {f(v['knn_top1'])} | {v['n']} |")
    lines += ["", "| images per center | k | purity | AMI(classes) | adapted probe | adapted kNN |",
              "|---|---|---|---|---|---|"]
    for q, v in r["k_sweep_seed0"].items():
        lines.append(f"| {q} | {v['k']} | {v['purity']} | {v['ami_vs_classes']} | {v['linear_probe_top1']} | "
                     f"{v['knn_top1']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def check_settings(a) -> None:
    settings = {k: getattr(a, k) for k in SETTINGS}
    path = a.root / "settings.json"
    old = load_marker(path)
    if old is not None and old != settings:
        diff = "; ".join(f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in SETTINGS
                         if old.get(k) != settings[k])
        raise SystemExit(f"adapt: {a.root} holds runs made with other settings ({diff}); choose another --root")
    a.root.mkdir(parents=True, exist_ok=True)
    fileio.write_json(path, settings)


def main(argv=None) -> dict:
    a = parse_args(argv)
    check_settings(a)
    t0 = time.time()
    r = a.root
    data = make_data(a)
    n_old, n_new = data["counts"]["old_train"], data["counts"]["new_train"]

    # the "released" encoder: MLCD on classes 0-4 (the demo's clustering and training), exported to HF
    old_shards = shards(a, "old", n_old)
    cluster(a, "old", "old", old_shards, r / "source" / "cluster", k_for(n_old, a.per_center), 0, None)
    train(a, "source", old_shards, r / "source" / "cluster" / "labels", r / "source" / "train", 0, a.source_steps, None)
    src = r / "source" / "hf"
    export(a, "source", r / "source" / "train", src)
    report(a, time.time() - t0)

    # baselines that do not depend on the seed
    new_shards = shards(a, "new", n_new)
    for domain in ("new", "old"):
        probe(a, "source", domain, ["backbone.type=hf", f"backbone.path='{src}'"])
        probe(a, "pixels", domain, ["backbone.type=pixels", "backbone.mode=L"])
    report(a, time.time() - t0)

    # per seed: cluster the new images with the source, adapt, train from scratch on the same clusters, probe
    runs = [(s, a.per_center) for s in a.seeds] + [(a.seeds[0], q) for q in a.sweep if q != a.per_center]
    first = r / f"seed{runs[0][0]}" / f"cluster_p{runs[0][1]}"   # extracts the features the others reuse
    for s, q in runs:
        d = r / f"seed{s}"
        labels = d / f"cluster_p{q}"
        cluster(a, f"new_s{s}_p{q}", "new", new_shards, labels, k_for(n_new, q), s, src,
                None if labels == first else first)
        tag = f"adapted_s{s}_p{q}"
        train(a, tag, new_shards, labels / "labels", d / f"adapted_p{q}", s, a.steps, src)
        export(a, tag, d / f"adapted_p{q}", d / f"adapted_p{q}_hf")
        probe(a, tag, "new", ["backbone.type=hf", f"backbone.path='{d / f'adapted_p{q}_hf'}'"])
        if q == a.per_center:
            probe(a, tag, "old", ["backbone.type=hf", f"backbone.path='{d / f'adapted_p{q}_hf'}'"])
            train(a, f"scratch_s{s}", new_shards, labels / "labels", d / "scratch", s, a.steps, None)
            probe(a, f"scratch_s{s}", "new", ["backbone.type=mlcd", f"backbone.path='{d / 'scratch'}'"])
        report(a, time.time() - t0)
    out = report(a, time.time() - t0)
    print(markdown(out))
    print(f"\nwritten {a.out} (complete: {out['complete']}); this call {time.time() - t0:.0f} s, "
          f"all stages {out['timing']['total_stage_seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main()
