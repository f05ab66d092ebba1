"""Running a pipeline stage as the command line a user could paste: what `make demo`, `make ablate` and
`make rounds` (mlcd.demo, mlcd.ablate, mlcd.rounds) are made of."""
import json
import shlex
import subprocess
import time
from pathlib import Path

from mlcd import fileio

REPO = Path(__file__).resolve().parents[1]


def show(cmd: list[str]) -> str:
    """The command line to paste into a shell; hydra's quoted values ('...' inside) go in double quotes."""
    def q(a):
        return a if shlex.quote(a) == a else f'"{a}"' if not set('"$`\\!') & set(a) else shlex.quote(a)
    return " ".join(q(a) for a in cmd)


def run_stage(cmd: list[str], who: str, log: Path | None = None) -> float:
    """Run one stage from the repository root, printing its command line first. Output goes to the console, or is
    appended to `log`. Returns its seconds; a failure exits naming the stage (and showing the log's tail)."""
    print(f"$ {show(cmd)}", flush=True)
    t0 = time.time()
    if log is None:
        proc = subprocess.run(cmd, cwd=REPO)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]) if log else ""
        raise SystemExit(f"{tail}\n{who}: stage failed (exit {proc.returncode})"
                         f"{f', log {log}' if log else ''}: {show(cmd)}")
    return round(time.time() - t0, 1)


def load_marker(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_once(marker: Path, cmd: list[str], who: str, extra=lambda: {}) -> dict:
    """Run `cmd` unless `marker` says it finished; the marker (command, seconds, `extra()`) is written after, so a
    killed pipeline re-run skips what finished. The stage's output goes to the marker's .log."""
    done = load_marker(marker)
    if done is None:
        seconds = run_stage(cmd, who, marker.with_suffix(".log"))
        done = {"cmd": show(cmd), "seconds": seconds, **extra()}
        fileio.write_json(marker, done)
    return done
