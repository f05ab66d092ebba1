"""Do the ablation grid's verdicts survive a 5x budget? Claim by claim, the 200-step grid (bench/results/ablation.json,
200 x 128 on one process) beside the same comparisons at the demo's budget (bench/results/ablation_5x.json, 1,050 x
256 on 2 ranks: bench/ablate_5x.sh). Writes bench/results/ablation_budget.{json,md}.

    python bench/ablation_budget.py [--short F] [--long F] [--out PREFIX]

The claims: the paper's directions both grids measure (runners.ablate.PAPER_DIRECTIONS) plus two of the grid's own
findings: per-slot softmax beats mlcd, and single-label ends below the random-init ViT. Each is the difference of
means ± its standard error over seeds; "holds" is more than 2 SE in the claim's direction, "reversed" more than 2 SE
against it (runners.stats.compare). A claim one budget cannot score yet (a row with fewer than 2 seeds, or missing)
is "pending"; `complete` is true once every claim is scored at both budgets.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlcd import fileio  # noqa: E402
from runners.ablate import directions  # noqa: E402
from runners.stats import METRICS, compare  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _row(report: dict, group: str, **want):
    rows = [g for g in report.get("groups", {}).get(group, [])
            if g["n"] and all(g["setting"].get(k) == v for k, v in want.items())]
    return rows[0] if rows else None


def claims(report: dict) -> dict:
    """{claim: {metric: {diff, se, verdict}}} of one grid report."""
    out = {r["claim"]: {m: r[m] for m in METRICS} for r in directions(report.get("groups", {}))}
    mlcd, per_slot, single = (_row(report, "loss", kind=k) for k in ("mlcd", "per_slot", "single"))
    init = report.get("baselines", {}).get("random init ViT")
    if per_slot and mlcd:
        out["per-slot softmax (OneVision-Encoder) beats mlcd"] = {m: compare(per_slot[m], mlcd[m]) for m in METRICS}
    if single and init and init["n"]:
        out["single-label ends below the random-init ViT"] = {m: compare(init[m], single[m]) for m in METRICS}
    return out


def side_by_side(short: dict, long: dict) -> list[dict]:
    """One row per claim either budget scores: both budgets' cells and whether the verdict is the same."""
    a, b = claims(short), claims(long)
    rows = []
    for claim in list(a) + [c for c in b if c not in a]:
        row = {"claim": claim}
        for m in METRICS:
            x, y = a.get(claim, {}).get(m), b.get(claim, {}).get(m)
            vx, vy = (c["verdict"] if c else None for c in (x, y))
            row[m] = {"200_steps": x, "1050_steps": y,
                      "same_verdict": None if vx is None or vy is None else vx == vy}
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(c):
        if c is None or c["verdict"] is None:
            return "pending"
        return f"{c['diff']:+.2f} ± {c['se']:.2f}: {c['verdict']}"

    def same(s):
        return "pending" if s is None else ("yes" if s else "**no**")

    lines = ["| claim | probe, 200 steps | probe, 1,050 steps | same? | kNN, 200 steps | kNN, 1,050 steps | same? |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p, k = r["linear_probe_top1"], r["knn_top1"]
        lines.append(f"| {r['claim']} | {cell(p['200_steps'])} | {cell(p['1050_steps'])} | {same(p['same_verdict'])} | "
                     f"{cell(k['200_steps'])} | {cell(k['1050_steps'])} | {same(k['same_verdict'])} |")
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
    complete = all(r[m]["same_verdict"] is not None for r in rows for m in METRICS)
    out = {"bench": "ablation_budget", "what": __doc__.split("\n\n")[0], "complete": complete,
           "short": str(a.short.name), "long": str(a.long.name), "claims": rows}
    fileio.write_json(a.out.with_suffix(".json"), out)
    fileio.write_text(a.out.with_suffix(".md"), markdown(rows))
    print(markdown(rows), end="")
    return out


if __name__ == "__main__":
    main()
