"""`python -m runners.ablate` end to end at a miniature size: tuning picks by held-out-train kNN, the grid reuses a
setting two groups share, the aggregate matches the per-run results, and a killed run resumes without redoing
finished work."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pytest import approx

from helpers import PROBE_SEARCH_SMALL as PROBE

ROOT = Path(__file__).resolve().parents[1]


def _argv(tmp):
    return [f"ablate.shards_dir={tmp}/shards", f"ablate.cluster_dir={tmp}/cluster", f"ablate.run_dir={tmp}/runs",
            f"ablate.results_dir={tmp}/results", "ablate.limit=300", "ablate.max_per_shard=100", "ablate.seeds=[0,1]",
            "ablate.cluster=[assign.topk=4,extract.batch_size=100,extract.num_workers=0,kmeans.niter=5]",
            "ablate.train=[train.total_steps=2,train.global_batch_size=16,optim.warmup_steps=1,train.ckpt_every=2,"
            "train.log_every=1,train.progress_bar=false,logging.wandb.mode=disabled,data.num_workers=0,"
            "data.shuffle_buffer=20]",
            f"ablate.eval=[limit_train=200,limit_test=100,num_workers=0,{PROBE}]",
            "ablate.tune.kinds=[mlcd]", "ablate.tune.lr=[1e-3]",
            "ablate.tune.margin=[0.1,0.3]",
            "ablate.tune.monitor=[monitor.every=2,monitor.queries=train,monitor.train_size=100,monitor.test_size=50]",
            "ablate.base={k: 8, l: 2, r: 0.5, lr: 2e-3, margin: 0.3}", "ablate.only_groups=[loss,k]",
            "ablate.groups.loss=[{kind: mlcd}]", "ablate.groups.k=[{k: 8},{k: 12}]"]


def test_single_label_rows_use_the_top1_label_and_untuned_kinds_the_base_lr_and_margin():
    from omegaconf import OmegaConf
    from runners import ablate
    a = OmegaConf.merge(OmegaConf.load(ablate.CONFIG), OmegaConf.from_dotlist(
        ["ablate.only_groups=[loss]", "ablate.groups.loss=[{kind: mlcd},{kind: single},{kind: single, l: 2}]"])).ablate
    rows = [row for _, row in ablate.grid_rows(a)]
    assert rows == [{"kind": "mlcd"}, {"kind": "single", "l": 1}, {"kind": "single", "l": 2}]  # an explicit l stays
    tuned = {"mlcd": {"lr": 1e-3, "margin": 0.1}}
    mlcd, single = (ablate.setting(a, r, tuned) for r in rows[:2])
    assert (mlcd["lr"], mlcd["margin"], mlcd["l"]) == (1e-3, 0.1, a.base.l)
    assert (single["lr"], single["margin"], single["l"]) == (a.base.lr, a.base.margin, 1)
    assert ablate.run_name(single) == f"k{a.base.k}/single,l=1,r={a.base.r},lr={a.base.lr:g},m={a.base.margin:g}"


def test_paper_directions_take_the_difference_and_its_standard_error_over_seeds():
    from runners import ablate

    def row(group, values, **setting):
        return {"setting": setting, "n": len(values), **{m: ablate.summary(values) for m in ablate.METRICS}}
    groups = {"l": [row("l", [70.0, 71.0, 72.0], l=1), row("l", [75.0, 76.0, 77.0], l=8),
                    row("l", [75.5, 76.5, 74.0], l=16)],
              "r": [row("r", [76.0], r=0.1), row("r", [60.0], r=1.0)], "loss": [row("loss", [], kind="mlcd")]}
    got = {d["claim"]: d for d in ablate.directions(groups)}
    assert set(got) == {"l 8 beats l 1", "l 8 beats l 16", "r 0.1 beats r 1.0"}  # rows without runs are left out
    se = np.sqrt(2 * 1.0 / 3)  # both l rows: std 1 over 3 seeds
    assert got["l 8 beats l 1"]["linear_probe_top1"] == {"diff": 5.0, "se": approx(se), "verdict": "holds"}
    assert got["l 8 beats l 1"]["paper"] == approx(3.8) and got["l 8 beats l 1"]["n"] == [3, 3]
    assert got["l 8 beats l 16"]["knn_top1"]["verdict"] == "within spread"
    assert got["r 0.1 beats r 1.0"]["knn_top1"] == {"diff": 16.0, "se": None, "verdict": None}  # one seed: no verdict
    reversed_ = ablate.compare(ablate.summary([1.0, 2.0, 3.0]), ablate.summary([9.0, 10.0, 11.0]))
    assert reversed_["verdict"] == "reversed"
    table = ablate.directions_markdown(list(got.values()))
    assert "| l 8 beats l 1 | +3.8, Table 5c | +5.00 ± 0.82: holds |" in table and "| +16.00 | 1/1 |" in table


def test_plot_with_no_finished_row_leaves_no_older_png_behind(tmp_path):
    from runners import ablate
    png = tmp_path / "ablation.png"
    png.write_bytes(b"an older grid's plot")
    ablate.plot({"loss": [{"setting": {"kind": "mlcd"}, "n": 0}]}, {}, png)
    assert not png.exists()


def _launch(tmp, log):
    return subprocess.Popen([sys.executable, "-m", "runners.ablate", *_argv(tmp)], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)


@pytest.mark.slow
def test_ablate_miniature_kill_and_resume(tmp_path):
    proc = _launch(tmp_path, tmp_path / "first.log")
    deadline = time.time() + 600
    while not list((tmp_path / "runs").glob("*/*/seed=*/result.json")):  # kill once the first run finished
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/*/seed=*/result.json")}

    proc = _launch(tmp_path, tmp_path / "second.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # finished runs were not redone

    tuning = json.loads((tmp_path / "runs" / "tuning.json").read_text())
    tried = tuning["tried"]["mlcd"]
    assert len(tried) == 2 and tuning["best"]["mlcd"]["margin"] == max(tried, key=lambda t: t["heldout_knn"])["margin"]
    assert set(tuning["best"]) == {"mlcd"}
    agg = json.loads((tmp_path / "results" / "ablation.json").read_text())
    assert agg["complete"]
    rows = {(g, r["setting"]["kind"], r["setting"]["k"]): r for g, rs in agg["groups"].items() for r in rs}
    assert set(rows) == {("loss", "mlcd", 8), ("k", "mlcd", 8), ("k", "mlcd", 12)}
    for row in rows.values():
        assert row["n"] == 2 and row["seeds"] == [0, 1]
        v = np.array(row["linear_probe_top1"]["values"])
        assert abs(row["linear_probe_top1"]["mean"] - v.mean()) < 1e-9
        assert abs(row["linear_probe_top1"]["std"] - v.std(ddof=1)) < 1e-9
    # the mlcd row of the loss group and the k = 8 row are one setting: trained once, reported twice
    assert rows[("loss", "mlcd", 8)]["linear_probe_top1"] == rows[("k", "mlcd", 8)]["linear_probe_top1"]
    assert (tmp_path / "results" / "ablation.png").stat().st_size > 0
    grid_table = (tmp_path / "results" / "ablation.md").read_text().split("\n\n")[0]
    assert len(grid_table.splitlines()) == 2 + 2 + 3  # header, baselines, rows
    base = agg["baselines"]
    assert base["random init ViT"]["n"] == 2 and base["raw pixels"]["n"] == 1
    pixels = json.loads((tmp_path / "runs/baselines/raw_pixels/seed=0/results.json").read_text())
    lp = [r for r in pixels["results"] if r["dataset"] == "fashion_mnist"][0]["metrics"]["lp_acc1"]
    assert abs(base["raw pixels"]["linear_probe_top1"]["mean"] - 100 * lp) < 1e-9
    assert base["raw pixels"]["linear_probe_top1"]["mean"] > 50  # a working probe on real pixels, 10 classes
    # a fresh checkout has no runs/: the committed ledger alone reproduces the aggregate
    ledger = json.loads((tmp_path / "results" / "ablation_runs.json").read_text())
    assert len(ledger) == len(list((tmp_path / "runs").glob("k*/*/seed=*/result.json")))
    import shutil
    shutil.rmtree(tmp_path / "runs")
    from runners import ablate
    ablate.main([*_argv(tmp_path), "ablate.report_only=true"])  # in this process: the command line is tested above
    again = json.loads((tmp_path / "results" / "ablation.json").read_text())
    assert again["groups"] == agg["groups"] and again["tuning"]["best"] == tuning["best"]
    # every k clustered the features extracted once
    assert (tmp_path / "cluster" / "cluster-k12" / "features").resolve() == (tmp_path / "cluster" / "features").resolve()


def test_budget_comparison_scores_each_claim_at_both_budgets_and_flags_a_changed_verdict():
    """bench/ablation_budget.py on the committed 200-step report: against itself every verdict is the same; the
    grid's own two findings are scored with the Welch SE computed here by hand; a long-budget report whose mlc rows
    beat mlcd flips that claim; a row with one seed leaves its claim pending, a group not run is "not run"."""
    import copy
    import importlib.util
    spec = importlib.util.spec_from_file_location("ablation_budget", ROOT / "bench" / "ablation_budget.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)

    short = json.loads((ROOT / "bench" / "results" / "ablation.json").read_text())
    rows = {r["claim"]: r for r in ab.side_by_side(short, short)}
    assert all(r[m]["same_verdict"] for r in rows.values() for m in ("linear_probe_top1", "knn_top1"))
    loss = {g["setting"]["kind"]: g for g in short["groups"]["loss"]}
    init, single = short["baselines"]["random init ViT"], loss["single"]
    for m in ("linear_probe_top1", "knn_top1"):
        a, b = np.array(init[m]["values"]), np.array(single[m]["values"])
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        got = rows["single-label ends below the random-init ViT"][m]["200_steps"]
        assert got["diff"] == approx(a.mean() - b.mean()) and got["se"] == approx(se) and got["verdict"] == "holds"
    assert "per-slot softmax (OneVision-Encoder) beats mlcd" in rows

    flipped = copy.deepcopy(short)
    mlc = next(g for g in flipped["groups"]["loss"] if g["setting"]["kind"] == "mlc")
    for m in ("linear_probe_top1", "knn_top1"):
        mlc[m]["values"] = [v + 10 for v in mlc[m]["values"]]
        mlc[m]["mean"] += 10
    got = {r["claim"]: r for r in ab.side_by_side(short, flipped)}["Eq. 5 (mlcd) beats Eq. 4 (mlc)"]
    assert got["linear_probe_top1"]["1050_steps"]["verdict"] == "reversed"
    assert got["linear_probe_top1"]["same_verdict"] is False
    # a row the long grid plans with one finished seed: pending there; a group it does not plan: "not run"
    partial = copy.deepcopy(short)
    per_slot = next(g for g in partial["groups"]["loss"] if g["setting"]["kind"] == "per_slot")
    per_slot["n"], per_slot["seeds"] = 1, per_slot["seeds"][:1]
    for m in ("linear_probe_top1", "knn_top1"):
        per_slot[m] = {"mean": per_slot[m]["values"][0], "std": None, "values": per_slot[m]["values"][:1]}
    del partial["groups"]["r"]
    rows = {r["claim"]: r for r in ab.side_by_side(short, partial)}
    got = rows["per-slot softmax (OneVision-Encoder) beats mlcd"]
    assert got["knn_top1"]["1050_steps"]["verdict"] is None and got["knn_top1"]["same_verdict"] is None
    assert rows["r 0.1 beats r 1.0"]["in_grid"] == {"200_steps": True, "1050_steps": False}
    table = ab.markdown(list(rows.values()))
    assert "| per-slot softmax (OneVision-Encoder) beats mlcd | " in table and "| pending |" in table
    assert "| r 0.1 beats r 1.0 | " in table and "| not run | - |" in table
