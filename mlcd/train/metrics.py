"""Rank 0's record of a run: metrics.jsonl (one JSON row per log step), the console lines in train.log, and wandb."""
import json
import resource
import uuid
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mlcd import dist, fileio


class MetricsLog:
    """Rank 0's record of the run: metrics.jsonl (truncated to the resume step so a resumed run has no duplicate
    rows), the console lines in train.log, and wandb."""

    def __init__(self, run_dir: Path, cfg, resume_step: int, wandb_mode: str):
        self.path, self.text_log = run_dir / "metrics.jsonl", run_dir / "train.log"
        self.wandb = None
        if not dist.is_main():
            return
        if self.path.exists():
            rows = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            fileio.write_text(self.path, "".join(r + "\n" for r in rows))  # a crash here keeps the old history
        if wandb_mode != "disabled":
            import wandb
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            fileio.write_text(id_file, run_id)
            self.wandb = wandb.init(project=cfg.logging.wandb.project, name=cfg.run_name, id=run_id,
                                    resume="allow", dir=str(run_dir), mode=wandb_mode,
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, row: dict) -> None:
        if not dist.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def say(self, line: str, bar=None) -> None:
        """A console line (through the progress bar when there is one), also appended to train.log."""
        if not dist.is_main():
            return
        (bar.write if bar is not None else print)(line)
        with open(self.text_log, "a") as f:
            f.write(line + "\n")

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
