"""Run an entry script with each unit of work slowed down, so that a test's kill -9 lands mid-run on any machine.

    python tests/slow_launch.py SECONDS train.py [overrides ...]      (also under torchrun)
    python tests/slow_launch.py SECONDS cluster.py [overrides ...]

Test-only: the production code has no delay hooks. This wraps the functions that finish a unit of work (a
training step; a shard's features; a shard's labels) with a sleep after them, then runs the script as __main__.
"""
import functools
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def slowed(fn, seconds: float):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        time.sleep(seconds)
        return out
    return wrapper


if __name__ == "__main__":
    seconds, script = float(sys.argv[1]), str(ROOT / sys.argv[2])
    if script.endswith("train.py"):
        import mlcd.train.loop as loop
        loop.train_step = slowed(loop.train_step, seconds)
    else:
        import mlcd.cluster.extract as extract
        import mlcd.data.labels as labels
        extract.write_features = slowed(extract.write_features, seconds)
        labels.write_shard_labels = slowed(labels.write_shard_labels, seconds)
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
