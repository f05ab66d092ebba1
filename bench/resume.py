"""Resume memory at C = 1M: a checkpoint saved at world size 2 is resumed at 3 and at 1 (torchrun, gloo, CPU).

Each resuming rank reads only the rows it will hold (mlcd.train.checkpoint.load_center_shard: the overlapping old
shards are memory-mapped and sliced). Reported per rank: the bytes of the state it holds (weights, both AdamW
moments, row steps) next to its peak RSS growth while loading, and the same for the previous code path (every
rank loads every shard, then re-splits: load_center_states + reshard), measured in a separate process. The two
paths must give bitwise the same state (sha256 per rank).

    python bench/resume.py [--classes 1000000] [--dim 384] [--keep]      -> bench/results/resume.json
"""
import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlcd import dist, fileio  # noqa: E402
from mlcd.train import checkpoint  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS


def digest(state: dict) -> dict:
    opt = state["optim"]["state"][0]
    tensors = {"weight": state["shard"]["weight"], **{k: opt[k] for k in ("exp_avg", "exp_avg_sq", "row_step")}}
    return {"sha256": hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors.values())).hexdigest(),
            "held_mb": sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20,
            "rows": int(tensors["weight"].shape[0])}


def worker_save(args) -> None:
    """Rank r of W = 2 saves a checkpoint whose rows and moments are distinct and deterministic."""
    from mlcd.models import build_model
    from mlcd.partial_fc import PartialFC
    from mlcd.train.optim import SparseRowAdamW, build_backbone_optimizer
    from omegaconf import OmegaConf

    dist.init()
    model_cfg = OmegaConf.load(ROOT / "configs" / "train" / "model" / "vit_tiny.yaml")
    model = build_model(model_cfg)
    pfc = PartialFC(args.classes, args.dim, seed=0)
    center_opt = SparseRowAdamW(pfc.weight, lr=1e-3)
    st = center_opt.state[pfc.weight]
    with torch.no_grad():
        st["exp_avg"].copy_(pfc.weight * 0.5)
        st["exp_avg_sq"].copy_(pfc.weight.square())
        st["row_step"].copy_(torch.arange(pfc.start, pfc.start + pfc.n_local))
    manifest = {"num_classes": args.classes, "embed_dim": args.dim, "shards": pfc.shard_spec.to_dict(),
                "model": OmegaConf.to_container(model_cfg)}
    checkpoint.save(args.dir, 1, model, build_backbone_optimizer(model, OmegaConf.create(
        {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.98], "eps": 1e-6})), pfc, center_opt,
        {"counters": {}}, manifest, keep_last=1)
    dist.cleanup()


def worker_load(args) -> None:
    """Each rank of the new world size: peak RSS growth of reading its own rows."""
    dist.init()
    ckpt = checkpoint.find_checkpoint(args.dir)
    manifest = checkpoint.read_manifest(ckpt)
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    state = checkpoint.load_center_shard(ckpt, manifest, dist.rank(), dist.world_size())
    seconds, peak = time.perf_counter() - t0, rss_mb("VmHWM") - before  # before digest() copies the bytes
    row = {"rank": dist.rank(), **digest(state), "peak_rss_growth_mb": peak, "seconds": round(seconds, 2)}
    fileio.write_json(Path(args.out) / f"rank{dist.rank()}.json", row)
    dist.cleanup()


def old_path(args) -> None:
    """The previous resume: one process loads every shard and re-splits (what each rank used to do)."""
    ckpt = checkpoint.find_checkpoint(args.dir)
    manifest = checkpoint.read_manifest(ckpt)
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    states = checkpoint.reshard(checkpoint.load_center_states(ckpt, manifest["world_size"]), args.world)
    seconds, peak = time.perf_counter() - t0, rss_mb("VmHWM") - before
    fileio.write_json(Path(args.out) / "old.json", {
        "peak_rss_growth_mb": peak, "seconds": round(seconds, 2), "ranks": [digest(s) for s in states]})


def torchrun(nproc: int, *argv) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__, *argv]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--worker", choices=["save", "load", "old"])
    ap.add_argument("--dir")
    ap.add_argument("--out")
    ap.add_argument("--world", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (temp dir) afterwards")
    args = ap.parse_args()
    if args.worker:
        {"save": worker_save, "load": worker_load, "old": old_path}[args.worker](args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="mlcd-resume-bench-"))
    ckpt_root = tmp / "checkpoints"
    size = ["--classes", str(args.classes), "--dim", str(args.dim)]
    torchrun(2, "--worker", "save", "--dir", str(ckpt_root), *size)
    saved_mb = sum(p.stat().st_size for p in ckpt_root.rglob("centers-rank*.pt")) / 2**20
    result = {"bench": "resume", "what": __doc__.split("\n\n")[0], "classes": args.classes, "dim": args.dim,
              "saved_world_size": 2, "center_files_mb": saved_mb,
              "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
              "resumes": {}}
    for world in (3, 1):
        out = tmp / f"w{world}"
        out.mkdir()
        torchrun(world, "--worker", "load", "--dir", str(ckpt_root), "--out", str(out), *size)
        subprocess.run([sys.executable, __file__, "--worker", "old", "--dir", str(ckpt_root), "--out", str(out),
                        "--world", str(world), *size], check=True)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
        old = json.loads((out / "old.json").read_text())
        for r, row in enumerate(ranks):
            row["bitwise_equal_to_old_reshard"] = row["sha256"] == old["ranks"][r]["sha256"]
            row["peak_growth_over_held"] = row["peak_rss_growth_mb"] / max(row["held_mb"], 1e-9)
        result["resumes"][f"2->{world}"] = {
            "ranks": ranks, "old_path_peak_rss_growth_mb_per_rank": old["peak_rss_growth_mb"],
            "old_path_seconds": old["seconds"],
            "target": "each rank's peak growth <= its held state + the overlapping old shards' bytes",
            "met": all(row["bitwise_equal_to_old_reshard"] and row["peak_rss_growth_mb"] <= 2.05 * row["held_mb"] + 64
                       for row in ranks)}
    if not args.keep:
        import shutil
        shutil.rmtree(tmp)
    out = ROOT / "bench" / "results" / "resume.json"
    fileio.write_json(out, result)
    for name, r in result["resumes"].items():
        for row in r["ranks"]:
            print(f"{name} rank {row['rank']}: holds {row['held_mb']:.0f} MB ({row['rows']} rows), peak RSS growth "
                  f"{row['peak_rss_growth_mb']:.0f} MB; old path {r['old_path_peak_rss_growth_mb_per_rank']:.0f} MB; "
                  f"bitwise equal {row['bitwise_equal_to_old_reshard']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
