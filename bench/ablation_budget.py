"""Do the ablation grid's verdicts survive a 5x budget? Claim by claim, the 200-step grid (bench/results/ablation.json,
200 x 128 on one process) beside the same comparisons at the demo's budget (bench/results/ablation_5x.json, 1,050 x
256 on 2 ranks: bench/ablate_5x.sh). Writes bench/results/ablation_budget.{json,md}.

    python bench/ablation_budget.py [--short F] [--long F] [--out PREFIX]

The claims: the paper's directions (runners.ablate.PAPER_DIRECTIONS) plus two of the grid's own findings: per-slot
softmax beats mlcd, and single-label ends below the random-init ViT. Each is the difference of means ± its standard
error over seeds; "holds" is more than 2 SE in the claim's direction, "reversed" more than 2 SE against it
(runners.stats.compare). A claim whose rows a grid plans but has not finished at 2 seeds is "pending" there; one
whose rows a grid does not plan (the 5x grid runs loss kind, l 8 vs 16 and k 100 vs 1000 only) is "not run".
`complete` is true once both grids have every seed and every claim both plan is scored at both budgets.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlcd import fileio  # noqa: E402
from runners.ablate import PAPER_DIRECTIONS, directions, find_row  # noqa: E402
from runners.stats import METRICS, compare  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


PER_SLOT = "per-slot softmax (OneVision-Encoder) beats mlcd"
BELOW_INIT = "single-label ends below the random-init ViT"


def claims(report: dict) -> dict:
    """{claim: {metric: {diff, se, verdict} or None}} for every claim whose two rows this grid plans; None while a
    row has no finished seed. A claim the grid does not plan is absent."""
    groups = report.get("groups", {})
    scored = {r["claim"]: {m: r[m] for m in METRICS} for r in directions(groups)}
    out = {}
    for claim, (ga, wa), (gb, wb), *_ in PAPER_DIRECTIONS:
        if find_row(groups, ga, wa, finished=False) and find_row(groups, gb, wb, finished=False):
            out[claim] = scored.get(claim, dict.fromkeys(METRICS))
    mlcd, per_slot, single = (find_row(groups, "loss", {"kind": k}, finished=False)
                              for k in ("mlcd", "per_slot", "single"))
    init = report.get("baselines", {}).get("random init ViT")
    if per_slot and mlcd:
        done = per_slot["n"] and mlcd["n"]
        out[PER_SLOT] = {m: compare(per_slot[m], mlcd[m]) if done else None for m in METRICS}
    if single and init:
        done = single["n"] and init["n"]
        out[BELOW_INIT] = {m: compare(init[m], single[m]) if done else None for m in METRICS}
    return out


def side_by_side(short: dict, long: dict) -> list[dict]:
    """One row per claim either budget plans: both budgets' cells (None: pending), whether each grid runs the
    claim at all, and whether the verdict is the same (None until both are scored)."""
    a, b = claims(short), claims(long)
    rows = []
    for claim in list(a) + [c for c in b if c not in a]:
        row = {"claim": claim, "in_grid": {"200_steps": claim in a, "1050_steps": claim in b}}
        for m in METRICS:
            x, y = a.get(claim, {}).get(m), b.get(claim, {}).get(m)
            vx, vy = (c["verdict"] if c else None for c in (x, y))
            row[m] = {"200_steps": x, "1050_steps": y,
                      "same_verdict": None if vx is None or vy is None else vx == vy}
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(c, planned):
        if not planned:
            return "not run"
        if c is None:
            return "pending"
        if c["verdict"] is None:
            return f"{c['diff']:+.2f}, pending (< 2 seeds)"
        return f"{c['diff']:+.2f} ± {c['se']:.2f}: {c['verdict']}"

    def same(r, m):
        if not all(r["in_grid"].values()):
            return "-"
        s = r[m]["same_verdict"]
        return "pending" if s is None else ("yes" if s else "**no**")

    lines = ["| claim | probe, 200 steps | probe, 1,050 steps | same? | kNN, 200 steps | kNN, 1,050 steps | same? |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["in_grid"]
        cells = [f"{cell(r[m]['200_steps'], g['200_steps'])} | {cell(r[m]['1050_steps'], g['1050_steps'])} | "
                 f"{same(r, m)}" for m in ("linear_probe_top1", "knn_top1")]
        lines.append(f"| {r['claim']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=Path, default=RESULTS / "ablation.json")
    ap.add_argument("--long", type=Path, default=RESULTS / "ablation_5x.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "ablation_budget", help="writes OUT.json and OUT.md")
    a = ap.parse_args(argv)
    reports = []
    for path in (a.short, a.long):
        if not path.exists():
            raise SystemExit(f"{path} is missing: runners.ablate writes it (`python -m runners.ablate "
                             "ablate.report_only=true` with the grid's settings rebuilds it from the ledger)")
        reports.append(json.loads(path.read_text()))
    rows = side_by_side(*reports)
    complete = all(r.get("complete") for r in reports) and all(  # every seed of both grids, every shared claim scored
        r[m]["same_verdict"] is not None for r in rows if all(r["in_grid"].values()) for m in METRICS)
    out = {"bench": "ablation_budget", "what": __doc__.split("\n\n")[0], "complete": complete,
           "short": str(a.short.name), "long": str(a.long.name), "claims": rows}
    fileio.write_json(a.out.with_suffix(".json"), out)
    fileio.write_text(a.out.with_suffix(".md"), markdown(rows))
    print(markdown(rows), end="")
    return out


if __name__ == "__main__":
    main()
