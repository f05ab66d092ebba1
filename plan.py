"""Capacity planner: what one GPU holds and how long the schedule takes, for a training config, before renting GPUs.

    python plan.py experiment=laion400m_vitl14 world_size=80 train.global_batch_size=32800 [gpu=h100] [--json]

Reads the same config tree as train.py (any train.py override works; a key the config lacks is refused, as
train.py refuses it: +key=value adds one). Planner options: world_size (required), gpu (a key of mlcd.plan.GPUS; cpu =
fp32 without a step time), mfu (fraction of the GPU's peak sustained on the FLOPs it runs, recompute included, default
0.4), num_labels (l when neither data.num_labels nor the labels manifest gives it; else the paper's 8), loader_rate
(images/s one DataLoader worker decodes and augments; default the measured rate in bench/results/data.json),
out (also write the plan as JSON there), --json (print JSON instead of the table), -h/--help (this text).

"""
import difflib
import json
import re
import sys
from pathlib import Path

import mlcd.plan
from mlcd.plan import COPIED_RATE, format_table, loader_warning, plan

ROOT = Path(__file__).resolve().parent
CONFIG_DIR = ROOT / "configs" / "train"
LOADER_BENCH = ROOT / "bench" / "results" / "data.json"
PLAN_KEYS = ("world_size", "gpu", "mfu", "num_labels", "loader_rate", "out")


def load_config(overrides=()):
    """The train.py config for these overrides (hydra's compose API: the same defaults, groups and grammar).
    Hydra's errors become a ValueError naming the override, so a misspelled key or planner option is one clear line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        try:
            return compose(config_name="train", overrides=list(overrides))
        except HydraException as e:
            unknown = re.match(r"Could not override '([^']+)'", str(e))
            if not unknown:
                raise ValueError(str(e)) from None
            key = unknown.group(1)
            arg = next((a for a in overrides if a.partition("=")[0] == key), key)
            close = difflib.get_close_matches(key, PLAN_KEYS, n=1)
            raise ValueError(f"{arg}: {key!r} is neither a planner option ({', '.join(PLAN_KEYS)}) nor a key of "
                             "the train config; " + (f"did you mean {close[0]}=?" if close else
                                                     f"+{arg} would add it to the config")) from None


def loader_rate_per_worker() -> tuple[float, str]:
    """(images/s of one DataLoader worker, where it came from): the data benchmark's measurement, else its copy."""
    try:
        rate = float(json.loads(LOADER_BENCH.read_text())["images_per_s_best"]["loader_1_worker"])
        return rate, "bench/results/data.json"
    except (OSError, ValueError, KeyError, TypeError):
        return COPIED_RATE


def parse_args(argv):
    """Split planner options (PLAN_KEYS, --json, -h/--help) from train.py's hydra overrides; load_config refuses the
    overrides whose key the config lacks."""
    opts, overrides = {"json": False}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            return {"help": True}, []
        if arg == "--json":
            opts["json"] = True
        elif arg.startswith("-") and not eq:
            raise ValueError(f"unknown flag {arg}: the planner takes --json and -h/--help (see --help)")
        elif eq and key in PLAN_KEYS:
            opts[key] = value
        else:
            overrides.append(arg)
    if "world_size" not in opts:
        raise ValueError("world_size=N is required: the number of GPUs (ranks) the run will use")
    for key, cast in (("world_size", int), ("mfu", float), ("num_labels", int), ("loader_rate", float)):
        if key in opts:
            try:
                opts[key] = cast(opts[key])
            except ValueError:
                raise ValueError(f"{key}={opts[key]!r} is not a {cast.__name__}") from None
    return opts, overrides


def main(argv=None):
    opts, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.get("help"):
        print(__doc__ + mlcd.plan.__doc__)
        return None
    p = plan(load_config(overrides), opts["world_size"], opts.get("gpu", "a100-80gb"), opts.get("mfu", 0.4),
             opts.get("num_labels"), opts.get("loader_rate"), measured_rate=loader_rate_per_worker())
    if opts.get("out"):
        Path(opts["out"]).write_text(json.dumps(p, indent=2) + "\n")
    print(json.dumps(p, indent=2) if opts["json"] else format_table(p))
    if opts["json"] and p["loader"] and p["loader"]["bound"]:
        print(loader_warning(p).strip(), file=sys.stderr)     # the JSON holds it too; a terminal should still see it
    return p


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"plan.py: {e}")
