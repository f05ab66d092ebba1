"""The training step's behaviour is pinned: 20 steps of the demo config (vit_tiny, mlcd loss, r = 0.1) on
real Fashion-MNIST shards give exactly the recorded loss sequence and final weights.

Any refactor of the loop, the step, the loss or the optimizers must keep this bit for bit. The golden file
records the CPU kernel family it was made on (torch.backends.cpu.get_cpu_capability()): a CPU with other
vector kernels rounds reductions differently, and then the check falls back to a 1e-5 relative tolerance.
Regenerate (only for an intended change of behaviour) with: python tests/test_golden_step.py
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import _write_dataset  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "demo_20_steps.json"
OVERRIDES = {"train.total_steps": 20, "train.global_batch_size": 32, "train.ckpt_every": 10, "data.segment_steps": 10,
             "train.log_every": 1,
             "train.progress_bar": False, "data.num_workers": 0, "data.shuffle_buffer": 64, "num_classes": 23,
             "logging.wandb.mode": "disabled", "seed": 5}


def run_demo_steps(data_dir: Path, out_dir: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from mlcd.models.loading import find_checkpoint, load_backbone_weights
    from mlcd.train.loop import train

    shards, labels_dir = _write_dataset(data_dir)
    args = {**OVERRIDES, "data.train_shards": shards, "data.labels_dir": labels_dir, "out_dir": str(out_dir)}
    with initialize_config_dir(str(ROOT / "configs" / "train"), version_base=None):
        cfg = compose("train", overrides=[f"{k}='{v}'" if "{" in str(v) else f"{k}={v}" for k, v in args.items()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_backbone_weights(find_checkpoint(out_dir))
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
            "backbone_sha256": digest}


def test_demo_20_steps_match_golden(tmp_path):
    want = json.loads(GOLDEN.read_text())
    got = run_demo_steps(tmp_path / "data", tmp_path / "run")
    assert len(got["losses"]) == 20
    if got["cpu_capability"] == want["cpu_capability"]:
        assert got["losses"] == want["losses"]
        assert got["grad_norms"] == want["grad_norms"]
        assert got["backbone_sha256"] == want["backbone_sha256"]
    else:  # other vector kernels: same math, different rounding
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norms"], want["grad_norms"], rtol=1e-4)


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo_steps(Path(tmp) / "data", Path(tmp) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
