"""The runners' command line (runners.kit.load_runner_config, shared by runners.demo, runners.ablate and runners.rounds):
--help / -h prints the usage and the default settings and does no work; a misspelled key, an argument that is not
key=value, or a key below a value is refused before any work, naming it and the valid keys; valid overrides merge.
Nothing here trains: every refused call fails while reading the command line."""
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runners.kit import load_runner_config

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("demo", "ablate", "rounds")
# a runner's output dirs, pointed under the test's tmp dir so that a run that started anyway would show there
OUT_KEYS = {"demo": ("data_dir", "run_dir"), "ablate": ("shards_dir", "cluster_dir", "run_dir", "results_dir"),
            "rounds": ("root", "shards_dir")}
TYPO = {"demo": ("demo.limt=100", "demo.limit"), "ablate": ("ablate.seed=[0]", "ablate.seeds"),
        "rounds": ("rounds.num_round=2", "rounds.num_rounds")}


def _outs(runner: str, tmp: Path) -> list[str]:
    return [f"{runner}.{k}={tmp / 'out' / k}" for k in OUT_KEYS[runner]]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_defaults_and_does_nothing(runner, flag, tmp_path, monkeypatch, capsys):
    mod = importlib.import_module(f"runners.{runner}")
    monkeypatch.chdir(tmp_path)  # the defaults' relative output dirs (data/..., runs/...) would appear here
    with pytest.raises(SystemExit) as e:
        mod.main([*_outs(runner, tmp_path), flag])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert mod.__doc__.strip().splitlines()[0] in out and f"python -m runners.{runner} --help" in out
    defaults = OmegaConf.load(mod.CONFIG)[runner]
    assert f"{runner}:\n" in out and all(f"  {key}:" in out for key in defaults)  # the default settings, as YAML
    assert OmegaConf.create(out[out.index(f"{runner}:\n"):]) == OmegaConf.load(mod.CONFIG)
    assert list(tmp_path.iterdir()) == []  # nothing made: no data/, runs/, nor the overridden out dirs


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_help_as_a_command_exits_0_at_once(runner, tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", f"runners.{runner}", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.time() - t0 < 30
    assert f"python -m runners.{runner} [{runner}.key=value ...]" in proc.stdout and f"\n{runner}:\n" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("runner", RUNNERS)
def test_misspelled_key_is_refused_before_any_work(runner, tmp_path, monkeypatch):
    mod = importlib.import_module(f"runners.{runner}")
    typo, meant = TYPO[runner]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        mod.main([*_outs(runner, tmp_path), typo])
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and f"unknown setting '{typo.split('=')[0]}'" in msg
    assert f"did you mean {meant}?" in msg
    section = OmegaConf.load(mod.CONFIG)[runner]
    assert f"The keys of {runner} are: {', '.join(section)}" in msg  # every valid key of the section, in order
    assert list(tmp_path.iterdir()) == []  # refused before any work: no out dir was made


STAGE_LISTS = {"demo": ("demo.train_overrides", "demo.cluster_overrides"), "ablate": ("ablate.train", "ablate.cluster"),
               "rounds": ("rounds.train", "rounds.cluster")}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("stage, bad, why", [("train", "train.precision=fp16", "train.precision=fp16 is not supported"),
                                             ("cluster", "kmeans.niter=0", "kmeans.niter=0: must be an integer >= 1")])
def test_a_stage_setting_the_stage_would_refuse_is_refused_before_any_work(runner, stage, bad, why, tmp_path,
                                                                           monkeypatch):
    """Each runner puts the configs it composes through the stages' own validators (mlcd.validate) first."""
    mod = importlib.import_module(f"runners.{runner}")
    key = STAGE_LISTS[runner][stage == "cluster"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        mod.main([*_outs(runner, tmp_path), f"{key}=[{bad}]"])
    assert f"{runner}: {stage}.py would refuse this setting: {why}" in str(e.value.code)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_misspelled_key_as_a_command_exits_nonzero_naming_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runners.demo", *_outs("demo", tmp_path), "demo.limt=100"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "unknown setting 'demo.limt'" in proc.stderr and "limit" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, match", [
    (["--cfg"], r"'--cfg' is not a key=value override"),
    (["demo.limit"], r"'demo.limit' is not a key=value override"),
    (["=3"], r"'=3' is not a key=value override"),
    (["demo..limit=3"], r"'demo..limit=3' is not a key=value override"),
    (["demoo.limit=1"], r"unknown setting 'demoo.limit'.*The top-level keys are: demo"),
    (["demo.limit.x=1"], r"demo.limit is a value, not a section"),
    (["demo.train_overrides.0=a"], r"demo.train_overrides is a list, not a section"),
    (["demo=5"], r"'demo=5': demo is a section \(keys: data_dir, "),
    (["demo.limit=[1"], r"'demo.limit=\[1' does not parse"),
])
def test_other_bad_arguments_are_refused_naming_them(argv, match, tmp_path, monkeypatch):
    from runners import demo
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=match):
        demo.main([*_outs("demo", tmp_path), *argv])
    assert list(tmp_path.iterdir()) == []


def test_a_mapping_value_with_an_unknown_key_is_refused():
    from runners import ablate
    with pytest.raises(SystemExit, match=r"unknown setting 'ablate.base.kk' in 'ablate.base=\{kk: 1\}' \(did you mean "
                                         r"ablate.base.k\?\). The keys of ablate.base are: k, l, r, lr, margin"):
        load_runner_config(ablate.CONFIG, ["ablate.base={kk: 1}"], ablate.__doc__)
    with pytest.raises(SystemExit, match=r"unknown setting 'ablate.groups.mine'.*The keys of ablate.groups are: loss"):
        load_runner_config(ablate.CONFIG, ["ablate.groups.mine=[{l: 3}]"], ablate.__doc__)


def test_valid_overrides_merge():
    from runners import ablate, demo, rounds
    cfg = load_runner_config(demo.CONFIG, ["demo.limit=100", "demo.train_overrides=[train.total_steps=4]"], demo.__doc__)
    assert cfg.demo.limit == 100 and list(cfg.demo.train_overrides) == ["train.total_steps=4"]
    assert cfg.demo.max_per_shard == OmegaConf.load(demo.CONFIG).demo.max_per_shard  # the rest: the defaults
    cfg = load_runner_config(ablate.CONFIG, [
        "ablate.base={k: 8, l: 2}", "ablate.only_groups=[k]", "ablate.groups.k=[{k: 100, l: 16}]",
        "ablate.tune.lr=[1e-3]", "ablate.seeds=[0]"], ablate.__doc__)
    a = cfg.ablate
    assert OmegaConf.to_container(a.base) == {"k": 8, "l": 2, "r": 0.1, "lr": 2.0e-3, "margin": 0.3}  # merged in
    assert list(a.only_groups) == ["k"] and OmegaConf.to_container(a.groups.k) == [{"k": 100, "l": 16}]
    assert list(a.tune.lr) == [1e-3] and list(a.seeds) == [0] and list(a.groups) == ["loss", "l", "r", "k", "r_at_k5000"]
    cfg = load_runner_config(rounds.CONFIG, ["rounds.num_rounds=5", "rounds.init_from=runs/demo"], rounds.__doc__)
    assert cfg.rounds.num_rounds == 5 and cfg.rounds.init_from == "runs/demo"
    assert not OmegaConf.is_struct(cfg)  # the runners' code gets the config as OmegaConf.merge gave it before
    assert load_runner_config(demo.CONFIG, [], demo.__doc__) == OmegaConf.load(demo.CONFIG)  # no argument: defaults
