"""`make ablate`: the paper's ablations (Tables 5-6) at small scale, 3 seeds per setting, one command.

    python -m runners.ablate [ablate.key=value ...]        (settings: configs/ablate.yaml)
    python -m runners.ablate ablate.report_only=true       (aggregate what has finished)
    python -m runners.ablate --help                        (this, and the default settings)

Phases, each skipping finished work, so the command can be killed and re-run at any point:
  1. data: the demo's shards; one clustering per number of centers k (top-16 labels on disk)
  2. tuning: every loss kind at each lr x margin, seed 0, ranked by kNN of held-out TRAIN images
  3. the grid at each kind's best setting, seed by seed (every setting at seed 0 first, so a partial run
     already covers every setting)
  4. report: bench/results/ablation.json (mean, std, n per setting; each of the paper's claims as a difference
     with its standard error over seeds), bench/results/ablation.png, and the markdown tables (printed, and in
     ablation.md beside them) for the README
A run's directory is named by its settings, so a setting that two groups share (l = 8 is also the mlcd row of
the loss group) trains once. Like runners.demo, every stage runs as the command line it prints.
"""
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from mlcd import fileio
from runners.kit import REPO, check_stage, fmnist_shards, launch, load_runner_config, run_stage
from runners.stats import METRICS, compare, probe_scores, summary  # noqa: F401

CONFIG = REPO / "configs" / "ablate.yaml"
KIND_LOSS = {"mlcd": "mlcd", "mlc": "mlc", "single": "single_label", "per_slot": "per_slot"}


def shards_pattern(a) -> str:
    return fmnist_shards(a.shards_dir, a.max_per_shard, a.limit, "ablate", Path(a.cluster_dir) / "shards.log")[0]


def labels_dir(a, k: int, shards: str) -> Path:
    """cluster.py for k centers (skips itself when done). Every k clusters the same features: they are extracted
    once, into features/ beside the cluster dirs, which each cluster dir links to."""
    out = Path(a.cluster_dir) / f"cluster-k{k}"
    manifest = out / "labels" / "manifest.json"
    if not manifest.exists() or not json.loads(manifest.read_text()).get("complete"):
        out.mkdir(parents=True, exist_ok=True)
        (Path(a.cluster_dir) / "features").mkdir(exist_ok=True)
        if not (out / "features").exists():
            (out / "features").symlink_to(Path("..") / "features")
        run_stage([sys.executable, "cluster.py", f"shards='{shards}'", f"out_dir={out}", f"kmeans.k={k}", *a.cluster],
            "ablate", out / "ablate.log")
    return out / "labels"


def setting(a, row: dict, tuned: dict) -> dict:
    """Full setting {kind, k, l, r, lr, margin} of a grid row: base, then the row, then the kind's tuned lr/margin."""
    s = {"kind": "mlcd", **OmegaConf.to_container(a.base), **row}
    return {**s, **tuned.get(s["kind"], {})}


def run_name(s: dict) -> str:
    return f"k{s['k']}/{s['kind']},l={s['l']},r={s['r']},lr={s['lr']:g},m={s['margin']:g}"


def train_overrides(a, s: dict, seed: int, shards: str, labels, out, extra=()) -> list[str]:
    """train.py's command line for one run of setting `s`."""
    return [f"data.train_shards='{shards}'", f"data.labels_dir='{labels}'", f"out_dir='{out}'", f"seed={seed}",
            f"loss={KIND_LOSS[s['kind']]}", f"data.num_labels={s['l']}", f"loss.sample_ratio={s['r']}",
            f"optim.lr={s['lr']}", f"loss.margin={s['margin']}", *a.train, *extra]


def check_settings(a) -> None:
    """Every clustering and every training the grid will run (tuning tries included), through the stages' own
    validators, before the first hour of work."""
    rows = [setting(a, row, {}) for _, row in grid_rows(a)]
    for k in sorted({s["k"] for s in rows}):
        check_stage("ablate", "cluster", [f"shards='{a.shards_dir}/x.tar'", f"out_dir='{a.cluster_dir}'", f"kmeans.k={k}",
                                          *a.cluster])
    tries = [{**setting(a, {"kind": kind, "l": 1 if kind == "single" else a.base.l}, {}), "lr": float(lr),
              "margin": float(m)} for kind in a.tune.kinds for lr in a.tune.lr for m in a.tune.margin]
    for s in rows + tries:
        check_stage("ablate", "train", train_overrides(a, s, 0, f"{a.shards_dir}/x.tar", a.cluster_dir, a.run_dir,
                                                       a.tune.monitor if s in tries else ()), a.nproc)


def train_and_eval(a, s: dict, seed: int, shards: str, extra=()) -> dict:
    """One run: train.py then eval_linear_probe.py; result.json in the run dir marks it finished."""
    out = Path(a.run_dir) / run_name(s) / f"seed={seed}"
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    ledger = load_ledger(a)
    if f"{run_name(s)}/seed={seed}" in ledger:  # finished in an earlier session (run dirs are not kept in git)
        return ledger[f"{run_name(s)}/seed={seed}"]
    t0 = time.time()
    run_stage([*launch("train.py", a.nproc), *train_overrides(a, s, seed, shards, labels_dir(a, s["k"], shards), out, extra)],
              "ablate", out / "ablate.log")
    t1 = time.time()
    run_stage([sys.executable, "eval_linear_probe.py", "backbone.type=mlcd", f"backbone.path='{out}'",
         "datasets=[fashion_mnist]", f"out_dir='{out / 'eval'}'", f"cache_dir='{out / 'eval' / 'cache'}'", *a.eval],
        "ablate", out / "ablate.log")
    lp, knn = probe_scores(out / "eval" / "results.json")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"setting": s, "seed": seed, "linear_probe_top1": lp, "knn_top1": knn,
              "final_loss": rows[-1]["loss"], "monitor_knn_train_heldout": rows[-1].get("monitor/knn_top1"),
              "train_seconds": round(t1 - t0, 1), "eval_seconds": round(time.time() - t1, 1)}
    fileio.write_json(done, result)
    Path(a.results_dir).mkdir(parents=True, exist_ok=True)
    fileio.write_json(Path(a.results_dir) / f"{a.name}_runs.json", {**load_ledger(a), f"{run_name(s)}/seed={seed}": result})
    print(f"  {run_name(s)} seed {seed}: probe {lp:.2f}  kNN {knn:.2f}  ({result['train_seconds']:.0f} s + "
          f"{result['eval_seconds']:.0f} s)", flush=True)
    return result


def load_ledger(a) -> dict:
    """{run name/seed=S: result} of every finished run, committed beside ablation.json, so the grid resumes in a
    fresh checkout (where runs/ is empty) without training again what was already measured."""
    path = Path(a.results_dir) / f"{a.name}_runs.json"
    return json.loads(path.read_text()) if path.exists() else {}


def tune(a, shards: str | None) -> tuple[dict, dict]:
    """({kind: best {lr, margin}}, {kind: every try and its score}) at seed 0, ranked by held-out-train kNN: the
    test split is not consulted. shards=None: only read the tries that finished (a kind is tuned when all are)."""
    best, record = {}, {}
    for kind in a.tune.kinds:
        scores = {}
        for lr in a.tune.lr:
            for m in a.tune.margin:
                s = setting(a, {"kind": kind, "l": 1 if kind == "single" else a.base.l}, {})
                s.update(lr=float(lr), margin=float(m))
                done = Path(a.run_dir) / run_name(s) / "seed=0" / "result.json"
                if shards is None and not done.exists() and f"{run_name(s)}/seed=0" not in load_ledger(a):
                    continue
                r = train_and_eval(a, s, 0, shards, a.tune.monitor)
                scores[(float(lr), float(m))] = r["monitor_knn_train_heldout"]
        record[kind] = [{"lr": k[0], "margin": k[1], "heldout_knn": v} for k, v in scores.items()]
        if len(scores) < len(a.tune.lr) * len(a.tune.margin):
            continue
        (lr, m), score = max(scores.items(), key=lambda kv: kv[1])
        best[kind] = {"lr": lr, "margin": m}
        print(f"tuned {kind}: lr {lr:g}, margin {m:g} (held-out-train kNN {score:.2f})", flush=True)
    return best, record


def grid_rows(a) -> list[tuple[str, dict]]:
    rows = []
    for group, items in a.groups.items():
        if a.only_groups and group not in a.only_groups:
            continue
        for row in items:
            row = OmegaConf.to_container(row)
            if row.get("kind") == "single":
                row.setdefault("l", 1)  # single-label training uses the top-1 label only
            rows.append((group, row))
    return rows


BASELINES = {"random init ViT": ["backbone.type=random", "backbone.model=vit_tiny"], "raw pixels": ["backbone.type=pixels"]}


def baselines(a, run: bool) -> dict:
    """Probe and kNN of the untrained tiny ViT (one init per seed) and of raw pixels, under the grid's eval."""
    out = {}
    for name, overrides in BASELINES.items():
        rows = []
        for seed in (a.seeds if "random" in name else a.seeds[:1]):
            d = Path(a.run_dir) / "baselines" / name.replace(" ", "_") / f"seed={seed}"
            if run and not (d / "result.json").exists():
                run_stage([sys.executable, "eval_linear_probe.py", *overrides, f"backbone.seed={seed}",
                           "datasets=[fashion_mnist]", f"out_dir='{d}'", f"cache_dir='{d / 'cache'}'", *a.eval],
                          "ablate", d / "ablate.log")
                lp, knn = probe_scores(d / "results.json")
                fileio.write_json(d / "result.json", {"linear_probe_top1": lp, "knn_top1": knn, "seed": seed})
            if (d / "result.json").exists():
                rows.append(json.loads((d / "result.json").read_text()))
        out[name] = {**{m: summary([r[m] for r in rows]) for m in METRICS}, "n": len(rows)}
    return out


def report(a, best: dict, tried: dict | None = None) -> dict:
    """Aggregate the finished runs of every grid row: mean, std (ddof 1), n; write JSON and plots. Every finished
    run found in the run dirs also goes into the ledger (ablation_runs.json)."""
    ledger = load_ledger(a)
    for p in Path(a.run_dir).glob("k*/*/seed=*/result.json"):
        ledger[p.parent.relative_to(a.run_dir).as_posix()] = json.loads(p.read_text())
    Path(a.results_dir).mkdir(parents=True, exist_ok=True)
    fileio.write_json(Path(a.results_dir) / f"{a.name}_runs.json", ledger)
    groups = {}
    for group, row in grid_rows(a):
        s = setting(a, row, best)
        found = {f"{run_name(s)}/{p.parent.name}": json.loads(p.read_text())
                 for p in (Path(a.run_dir) / run_name(s)).glob("seed=*/result.json")}
        found.update({k: v for k, v in load_ledger(a).items() if k.startswith(run_name(s) + "/")})
        runs = sorted((r for r in found.values() if r["seed"] in a.seeds), key=lambda r: r["seed"])
        groups.setdefault(group, []).append({"setting": s, "n": len(runs), "seeds": [r["seed"] for r in runs],
                                             **{m: summary([r[m] for r in runs]) for m in METRICS}})
    base = baselines(a, run=False)
    out = {"bench": "ablation", "what": "the paper's Table 5-6 directions at small scale (Fashion-MNIST, tiny ViT)",
           "config": OmegaConf.to_container(a), "tuning": {"best": best, "tried": tried or {}},
           "baselines": base, "groups": groups, "paper_directions": directions(groups),
           "complete": all(g["n"] == len(a.seeds) for rows in groups.values() for g in rows)}
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    fileio.write_json(results / f"{a.name}.json", out)
    plot(groups, base, results / f"{a.name}.png")
    text = markdown(groups, base) + "\n\n" + directions_markdown(out["paper_directions"]) + "\n"
    fileio.write_text(results / f"{a.name}.md", text)
    print(text, flush=True)
    return out


# The paper's claims that the grid tests: (claim, row A, row B, paper's A and B, where). A row is (group, the
# settings it must have). The paper's figures are ImageNet linear probe of ViT-B/32 on LAION-400M (Tables 5-6)
# or the 26-dataset linear-probe average (Table 7); k is compared at the same ratios (10x, 5x), not the same sizes.
PAPER_DIRECTIONS = [
    ("Eq. 5 (mlcd) beats Eq. 4 (mlc)", ("loss", {"kind": "mlcd"}), ("loss", {"kind": "mlc"}), 78.1, 76.9,
     "Table 6 (32 epochs)"),
    ("multi-label mlcd (l 8) beats single-label (UNICOM)", ("loss", {"kind": "mlcd"}), ("loss", {"kind": "single"}),
     81.4, 79.2, "Table 7 (26-dataset average)"),
    ("l 8 beats l 1", ("l", {"l": 8}), ("l", {"l": 1}), 75.2, 71.4, "Table 5c"),
    ("l 8 beats l 4", ("l", {"l": 8}), ("l", {"l": 4}), 75.2, 73.2, "Table 5c"),
    ("l 8 beats l 16", ("l", {"l": 8}), ("l", {"l": 16}), 75.2, 72.1, "Table 5c"),
    ("r 0.1 beats r 0.01", ("r", {"r": 0.1}), ("r", {"r": 0.01}), 75.2, 73.4, "Table 5b"),
    ("r 0.1 beats r 0.5", ("r", {"r": 0.1}), ("r", {"r": 0.5}), 75.2, 68.3, "Table 5b"),
    ("r 0.1 beats r 1.0", ("r", {"r": 0.1}), ("r", {"r": 1.0}), 75.2, 63.2, "Table 5b"),
    ("r 0.1 beats r 1.0 at k 5000", ("r_at_k5000", {"r": 0.1}), ("r_at_k5000", {"r": 1.0}), None, None, "-"),
    ("10x more centers help (k 1000 vs 100; paper 1M vs 100K)", ("k", {"k": 1000}), ("k", {"k": 100}), 75.2, 66.9,
     "Table 5a"),
    ("5x more centers hurt (k 1000 vs 5000; paper 1M vs 5M)", ("k", {"k": 1000}), ("k", {"k": 5000}),
     75.2, 74.7, "Table 5a"),
]


def find_row(groups: dict, group: str, want: dict, finished: bool = True) -> dict | None:
    """The row of `group` with the settings `want`: with a finished seed, or with `finished` false any planned one."""
    rows = [g for g in groups.get(group, [])
            if (g["n"] or not finished) and all(g["setting"].get(k) == v for k, v in want.items())]
    return rows[0] if rows else None


def directions(groups: dict) -> list:
    """Each of the paper's claims whose two rows the grid has, measured on both metrics."""
    out = []
    for claim, (ga, wa), (gb, wb), paper_a, paper_b, source in PAPER_DIRECTIONS:
        a, b = find_row(groups, ga, wa), find_row(groups, gb, wb)
        if a and b:
            out.append({"claim": claim, "paper": None if paper_a is None else round(paper_a - paper_b, 2),
                        "paper_source": source, "n": [a["n"], b["n"]],
                        **{m: compare(a[m], b[m]) for m in METRICS}})
    return out


def directions_markdown(rows: list) -> str:
    def cell(c):
        return f"{c['diff']:+.2f}" + ("" if c["se"] is None else f" ± {c['se']:.2f}: {c['verdict']}")
    lines = ["| paper's claim | paper (linear probe) | here: linear probe (diff ± SE) | here: kNN | n |",
             "|---|---|---|---|---|"]
    for r in rows:
        paper = "-" if r["paper"] is None else f"{r['paper']:+.1f}, {r['paper_source']}"
        lines.append(f"| {r['claim']} | {paper} | {cell(r['linear_probe_top1'])} | {cell(r['knn_top1'])} | "
                     f"{r['n'][0]}/{r['n'][1]} |")
    return "\n".join(lines)


def _label(group: str, s: dict) -> str:
    return {"loss": s["kind"], "l": f"l={s['l']}", "r": f"r={s['r']}", "k": f"k={s['k']}",
            "r_at_k5000": f"r={s['r']} (k=5000)"}[group]


def markdown(groups: dict, base: dict) -> str:
    fmt = lambda st: "-" if st["mean"] is None else (f"{st['mean']:.2f}" + (f" ± {st['std']:.2f}" if st["std"] else ""))  # noqa: E731
    lines = ["| group | setting | linear probe top-1 | kNN top-1 | n |", "|---|---|---|---|---|"]
    for name, b in base.items():
        lines.append(f"| baseline | {name} | {fmt(b['linear_probe_top1'])} | {fmt(b['knn_top1'])} | {b['n']} |")
    for group, rows in groups.items():
        for g in rows:
            lines.append(f"| {group} | {_label(group, g['setting'])} | {fmt(g['linear_probe_top1'])} | "
                         f"{fmt(g['knn_top1'])} | {g['n']} |")
    return "\n".join(lines)


def plot(groups: dict, base: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(group, key, log) for group, key, log in [("loss", None, False), ("l", "l", True), ("r", "r", True),
                                                         ("k", "k", True)]
              if any(g["n"] for g in groups.get(group, []))]  # a group not run or not finished: no panel
    if not panels:  # nothing finished yet: no plot, and no older one left to pass for this grid's
        png.unlink(missing_ok=True)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (group, key, log) in zip(axes[0], panels):
        rows = [g for g in groups.get(group, []) if g["n"]]
        xs = list(range(len(rows))) if key is None else [g["setting"][key] for g in rows]
        for metric, color in (("linear_probe_top1", "C0"), ("knn_top1", "C1")):
            mean = [g[metric]["mean"] for g in rows]
            err = [g[metric]["std"] or 0 for g in rows]
            if key is None:
                off = -0.2 if color == "C0" else 0.2
                ax.bar([x + off for x in xs], mean, 0.4, yerr=err, color=color, capsize=3, label=metric)
                ax.set_xticks(xs, [g["setting"]["kind"] for g in rows])
            else:
                ax.errorbar(xs, mean, yerr=err, marker="o", color=color, capsize=3, label=metric)
        if group == "r":
            rk = [g for g in groups.get("r_at_k5000", []) if g["n"]]
            if rk:
                ax.errorbar([g["setting"]["r"] for g in rk], [g["linear_probe_top1"]["mean"] for g in rk],
                            yerr=[g["linear_probe_top1"]["std"] or 0 for g in rk], marker="s", ls="--", color="C2",
                            capsize=3, label="linear probe, k=5000")
        for (name, b), ls in zip(base.items(), (":", "-.")):
            if b["linear_probe_top1"]["mean"] is not None:
                ax.axhline(b["linear_probe_top1"]["mean"], color="C0", ls=ls, lw=1, label=f"probe, {name}")
                ax.axhline(b["knn_top1"]["mean"], color="C1", ls=ls, lw=1, label=f"kNN, {name}")
        if key is None:  # bars from a floor near the data, so that point-sized gaps stay visible
            low = [g[m]["mean"] for g in rows for m in ("linear_probe_top1", "knn_top1")]
            low += [b[m]["mean"] for b in base.values() for m in ("linear_probe_top1", "knn_top1") if b[m]["mean"]]
            ax.set_ylim(bottom=max(0.0, min(low) - 5))
        if log:  # ticks at the settings run, not the log axis' decades
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_title({"loss": "loss kind", "l": "labels per image l", "r": "negative ratio r",
                      "k": "centers k"}[group])
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("MLCD ablations at small scale (Fashion-MNIST test, mean ± std over seeds)")
    fig.tight_layout()
    with fileio.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> dict:
    cfg = load_runner_config(CONFIG, argv, __doc__)  # ablate.groups too: the report knows only its groups
    a = cfg.ablate
    tuning_file = Path(a.run_dir) / "tuning.json"
    if a.report_only:  # what has finished, tuning included (a kind counts as tuned once all its tries are done)
        return report(a, *tune(a, None))
    check_settings(a)
    shards = shards_pattern(a)
    for k in sorted({setting(a, row, {})["k"] for _, row in grid_rows(a)}):
        labels_dir(a, k, shards)
    baselines(a, run=True)
    best, record = tune(a, shards)
    fileio.write_json(tuning_file, {"best": best, "tried": record})
    for seed in a.seeds:
        for group, row in grid_rows(a):
            train_and_eval(a, setting(a, row, best), seed, shards)
        report(a, best, record)
    return report(a, best, record)


if __name__ == "__main__":
    main()
