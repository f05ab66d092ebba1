"""Runs and sweeps: each job of a hydra multirun gets its own directory, and a run directory remembers the settings
it was started with, so that `train.resume=auto` never continues a run under other settings.

    python train.py -m seed=0,1,2 loss.sample_ratio=0.1,1.0
        -> runs/demo/seed=0,loss.sample_ratio=0.1/  runs/demo/seed=0,loss.sample_ratio=1.0/  ...

A job's directory is ${out_dir}/<the swept overrides with this job's values>: only the keys given as sweeps on the
command line name it (fixed overrides, often long paths, do not), so the same sweep run again finds its runs.
"""
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

FINGERPRINT = "fingerprint.json"
# Settings a resumed run may change: how long it runs, how it logs and saves, how it is launched.
MAY_CHANGE = ("out_dir", "run_name", "train.total_steps", "train.resume", "train.progress_bar", "train.log_every",
              "train.ckpt_every", "train.keep_last", "train.compile", "train.grad_checkpointing", "train.sharding",
              "train.max_nonfinite_in_row", "train.init_from", "train.init_centers", "data.num_workers",
              "logging.", "monitor.")


def swept_keys(argv: list[str]) -> list[str]:
    """The keys given as sweeps (a,b / range / choice / glob) among command-line overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()]


def job_dir_name() -> str:
    """This multirun job's directory name: its values of the swept keys (resolver `mlcd_job_dir`)."""
    from hydra.core.hydra_config import HydraConfig

    swept = set(swept_keys(sys.argv[1:]))
    parts = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(parts).replace("/", "_") or "job"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mlcd_job_dir"):
        OmegaConf.register_new_resolver("mlcd_job_dir", job_dir_name)


def job_out_dir(cfg) -> str:
    """out_dir for this job: hydra's job directory in a multirun (${out_dir}/<swept values>), else cfg.out_dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().runtime.output_dir
    return cfg.out_dir


def flatten(cfg) -> dict:
    """The resolved config as flat dotted key -> value."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node
    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def fingerprint(cfg) -> dict:
    """The resolved config as flat key -> value, without the settings a resume may change."""
    return {k: v for k, v in flatten(cfg).items() if not any(k == m or (m.endswith(".") and k.startswith(m))
                                                             for m in MAY_CHANGE)}


def check_same_settings(run_dir, cfg) -> None:
    """Before resuming into `run_dir`: its recorded settings must equal this config's (MAY_CHANGE aside)."""
    path = Path(run_dir) / FINGERPRINT
    if not path.exists():
        return
    from mlcd.validate import refuse_other_settings
    refuse_other_settings(json.loads(path.read_text()), json.loads(json.dumps(fingerprint(cfg))), f"run {run_dir}",
                          "Resume it with its own settings, give this run another out_dir, or start it over with "
                          "train.resume=none.")
