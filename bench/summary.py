"""Markdown summary of bench/results/*.json (run by `make bench`): each bench's targets and headline figures.

Each bench JSON states its own `target` and whether it was met (`met` / `target_met`), per section
where it has several; this prints those plus the numeric figures whose names say what they measure.
"""
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
HEADLINE = ("speed", "ratio", "recall", "per_s", "qps", "seconds", "s_per_iter", "accuracy", "objective", "mfu")


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        yield prefix, obj


def summarize(results_dir=RESULTS) -> str:
    lines = ["| bench | what | value |", "|---|---|---|"]
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text())
        for key, value in _flatten(data):
            leaf = key.rsplit(".", 1)[-1]
            if leaf in ("target", "met", "target_met") or any(h in leaf for h in HEADLINE):
                if isinstance(value, float):
                    value = f"{value:.4g}"
                lines.append(f"| {path.stem} | {key} | {value} |")
    return "\n".join(lines) + "\n"


def main():
    text = summarize()
    out = RESULTS / "SUMMARY.md"
    out.write_text(text)
    sys.stdout.write(text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
