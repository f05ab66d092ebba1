"""Running a pipeline stage as the command line a user could paste: what `make demo`, `make ablate` and
`make rounds` (runners.demo, runners.ablate, runners.rounds) are made of, and how those runners read their command line
(`load_runner_config`)."""
import difflib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlcd import fileio

REPO = Path(__file__).resolve().parents[1]
HELP = ("--help", "-h")


def load_runner_config(config_path: Path, argv: list[str] | None, usage: str) -> DictConfig:
    """A runner's settings: the YAML at `config_path` with the `key=value` overrides of `argv` (sys.argv[1:] when
    None) merged in, before any work is done.
    --help / -h anywhere: prints `usage` (the runner's docstring) and the default settings, and exits 0.
    Refused (SystemExit naming the argument, exit 1): an argument that is not key=value; a key that is not in the
    config (the message lists the keys of its section, the config being struct); a key below a value or a list
    (`demo.limit.x=1`, `ablate.seeds.0=1`: give the whole value); a section set to a non-mapping (`demo=5`); a value
    that does not parse."""
    config_path = Path(config_path)
    who = config_path.stem
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = OmegaConf.load(config_path)
    shown = config_path.relative_to(REPO) if config_path.is_relative_to(REPO) else config_path
    if any(a in HELP for a in argv):
        print(f"{usage.strip()}\n\nSettings (the defaults, from {shown}, where each is explained; override any as "
              f"key=value):\n\n{OmegaConf.to_yaml(defaults, resolve=True)}", end="")
        raise SystemExit(0)
    tree = OmegaConf.to_container(defaults)
    see = f"(see python -m runners.{who} --help)"
    overrides = []
    for arg in argv:
        key, eq, _ = arg.partition("=")
        if not eq or not key or "" in key.split("."):
            raise SystemExit(f"{who}: {arg!r} is not a key=value override {see}")
        try:
            one = OmegaConf.from_dotlist([arg])
            value = OmegaConf.select(one, key)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise SystemExit(f"{who}: {arg!r} does not parse: {' '.join(str(e).split())}") from None
        _check_key(tree, key, value, arg, who, see)
        overrides.append((arg, one))
    OmegaConf.set_struct(defaults, True)  # a key not in the config is an error, not a new setting
    cfg = defaults
    for arg, one in overrides:  # one at a time, so an error names its argument
        try:
            cfg = OmegaConf.merge(cfg, one)
        except OmegaConfBaseException as e:  # e.g. a mapping value with a key not in the config: ablate.base={kk: 1}
            full = getattr(e, "full_key", "") or ""
            section = full.rpartition(".")[0]
            node = OmegaConf.select(defaults, section) if section else defaults
            if isinstance(node, DictConfig) and full:
                raise SystemExit(_unknown(who, full, arg, section, list(node), see)) from None
            raise SystemExit(f"{who}: {arg!r}: {' '.join(str(e).split())} {see}") from None
    OmegaConf.set_struct(cfg, False)  # the runners' own code reads the settings as before
    return cfg


def _unknown(who, key, arg, section, valid, see) -> str:
    close = difflib.get_close_matches(key.rpartition(".")[2], [str(k) for k in valid], n=1)
    hint = f" (did you mean {'.'.join(filter(None, (section, close[0])))}?)" if close else ""
    where = f"The keys of {section}" if section else "The top-level keys"
    return f"{who}: unknown setting {key!r} in {arg!r}{hint}. {where} are: {', '.join(map(str, valid))} {see}"


def _check_key(tree, key: str, value, arg: str, who: str, see: str) -> None:
    """`key` names a setting of the config `tree` (plain containers); a section is given a mapping."""
    node, path = tree, []
    for part in key.split("."):
        here = ".".join(path)
        if not isinstance(node, dict):
            kind = "a list" if isinstance(node, list) else "a value"
            raise SystemExit(f"{who}: {arg!r}: {here} is {kind}, not a section: set it whole, {here}=... {see}")
        if part not in node:
            raise SystemExit(_unknown(who, key, arg, here, list(node), see))
        node = node[part]
        path.append(part)
    if isinstance(node, dict) and not isinstance(value, DictConfig):
        raise SystemExit(f"{who}: {arg!r}: {key} is a section (keys: {', '.join(map(str, node))}): set its keys "
                         f"({key}.KEY=value) or give a mapping ({key}={{KEY: value}}) {see}")


def show(cmd: list[str]) -> str:
    """The command line to paste into a shell; hydra's quoted values ('...' inside) go in double quotes."""
    def q(a):
        return a if shlex.quote(a) == a else f'"{a}"' if not set('"$`\\!') & set(a) else shlex.quote(a)
    return " ".join(q(a) for a in cmd)


def hydra_overrides(prefix: str, mapping: dict) -> list[str]:
    """`prefix.key=value` hydra overrides setting each key of `mapping`: strings quoted, None as null, nested
    mappings and lists in hydra's {k: v} / [a, b] syntax."""
    def value(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "'" + str(v).replace("'", "\\'") + "'"
    return [f"{prefix}.{k}={value(v)}" for k, v in mapping.items()]


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


def launch(script: str, nproc: int) -> list[str]:
    """The command that runs `script` on `nproc` local ranks: torchrun (--standalone), or plain python for one."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*(torchrun if nproc > 1 else [sys.executable]), script]


def compose(stage: str, overrides=()) -> DictConfig:
    """The config `<stage>.py` (train | cluster) will run with these overrides: hydra's compose over configs/<stage>,
    the same defaults, groups and grammar; nothing runs."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs" / stage), version_base=None):
        return hydra_compose(stage, overrides=list(overrides))


def check_stage(who: str, stage: str, overrides, world: int = 1) -> DictConfig:
    """The stage's own validator (mlcd.validate) on a config this runner composed, before any work: a bad setting
    in the last cell of a grid is refused now, not after hours. The stage's inputs may not exist yet (the stage
    before makes them), so only the settings are judged. Returns the composed config."""
    import torch
    from hydra.errors import HydraException

    from mlcd import validate

    try:
        cfg = compose(stage, overrides)
        if stage == "train":
            validate.check_train_config(cfg, world, torch.device("cpu"), inputs=False)
        else:
            validate.check_cluster_config(cfg)
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        raise SystemExit(f"{who}: {stage}.py would refuse this setting: {' '.join(str(e).split())}\n"
                         f"  {stage}.py {show(list(overrides))}") from None
    return cfg


def fmnist_shards(shard_dir, max_per_shard: int, limit, who: str, log: Path | None = None):
    """(brace pattern, tar paths, {cmd, seconds} or None) of Fashion-MNIST train as shards in `shard_dir`, made when
    missing: the writer's manifest, written last, says they are complete. The third item is the run, when it ran."""
    sd = Path(shard_dir)
    ran = None
    if not (sd / "manifest.json").exists():
        cmd = [sys.executable, "-m", "mlcd.data.make_shards", "--source", "fashion_mnist", "--split", "train",
               "--out", str(sd), "--prefix", "fmnist-train", "--max-per-shard", str(max_per_shard),
               *(["--limit", str(limit)] if limit else [])]
        ran = {"cmd": show(cmd), "seconds": run_stage(cmd, who, log)}
    names = [s["name"] for s in json.loads((sd / "manifest.json").read_text())["shards"]]
    return f"{sd}/fmnist-train-{{000000..{len(names) - 1:06d}}}.tar", [sd / n for n in names], ran


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
