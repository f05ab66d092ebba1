"""PartialFC step time and peak memory, next to a floor and to the dense step a user would write, in one run.

Variants at each class count C (world size 1, a batch of B D-dim embeddings with l labels each):
  partialfc r   what trains: mlcd.train.step.train_step over PartialFC (sampled columns, sparse row gradient),
                SparseRowAdamW, the global grad norm and clipping; the backbone is a learned [B, D] table.
  dense r=1     the obvious alternative (insightface's full FC): full [B, C] cosine logits over a dense
                nn.Parameter, the same loss (mlcd.loss.dense_margin_loss), clip_grad_norm_, torch.optim.AdamW.
  dense r<1     insightface PartialFC_V2-style: sampled columns gathered by weight[index], so the gradient is a
                dense [C, D] tensor and AdamW moves every row.
  gemm r        the floor: the three GEMMs of the sampled columns at the same shapes (cos = E W_s^T,
                dE = G W_s, dW_s = G^T E); fp32 on CPU, bf16 on GPU (as PartialFC's autocast).

Every timed step runs in a fresh process (forked from a server that imported torch once): peak memory is that
variant's own (CPU: peak RSS minus the RSS at start; GPU: max_memory_allocated) and the state is allocated and
touched before the clock starts, as in a run past its first step. Rounds are interleaved (odd rounds in reverse
order) so a drifting load on a shared machine hits every variant alike. Reported: median, min and max step time over
the rounds and each one's ratio to the floor at its r. Writes bench/results/partial_fc.json. Target: at the largest
C, PartialFC at r = 0.1 takes at most 0.25x the step time of PartialFC at r = 1.0.

    python bench/partial_fc.py            # C = 100k and 1M, D 512, batch 512, 8 labels, 3 rounds
    python bench/partial_fc.py --quick    # C = 10k, batch 128: checks the script (under a minute)
"""
import argparse
import contextlib
import itertools
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlcd import fileio  # noqa: E402
from mlcd.loss import dense_margin_loss, margin_lse, prepare_labels  # noqa: E402
from mlcd.partial_fc import PartialFC, budget  # noqa: E402
from mlcd.train.optim import SparseRowAdamW  # noqa: E402
from mlcd.train.step import train_step  # noqa: E402

OPT = dict(lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)  # configs/train/optim: the paper's AdamW
CLIP = 1.0                                                            # configs/train/train.yaml train.clip_grad


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Table(torch.nn.Module):
    """Stands in for the backbone: its output embeddings are a learned [B, D] table."""

    def __init__(self, emb: torch.Tensor):
        super().__init__()
        self.emb = torch.nn.Parameter(emb)

    def forward(self, images):
        return SimpleNamespace(embedding=self.emb)


def build_partialfc(C, r, D, emb, labels):
    pfc = PartialFC(C, D, sample_ratio=r, seed=0).to(emb.device)
    table = Table(emb)
    center_opt, backbone_opt = SparseRowAdamW(pfc.weight, **OPT), torch.optim.AdamW(table.parameters(), **OPT)
    for state in center_opt.state[pfc.weight].values():
        state.zero_()                                                  # resident, as after the first step
    batches = itertools.repeat((torch.empty(0), labels))

    def step(i):
        loss = train_step(table, pfc, backbone_opt, center_opt, batches, i, 1, CLIP, contextlib.nullcontext()).loss
        return loss, pfc.last_index.numel()
    return step


def build_dense(C, r, D, emb, labels):
    pfc = PartialFC(C, D, sample_ratio=r, seed=0).to(emb.device)     # the same initial centers; its sampler at r<1
    weight, table = pfc.weight, Table(emb)                             # a plain dense nn.Parameter from here on
    params = [table.emb, weight]
    opt = torch.optim.AdamW(params, **OPT)
    for p in params:                                                   # one step on zero gradients at lr 0: the
        p.grad = torch.zeros_like(p)                                   # moments exist and are resident, as after
    opt.param_groups[0]["lr"] = 0.0                                    # the first step; the weights do not move
    opt.step()
    opt.param_groups[0]["lr"] = OPT["lr"]
    opt.zero_grad(set_to_none=True)

    def step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=weight.is_cuda):   # as PartialFC's cosines
            if r >= 1:
                loss, cols = dense_margin_loss(table.emb, weight, labels), C
            else:
                lab, valid = prepare_labels(labels, "mlcd")
                index, pos_cols = pfc.sample(lab, i)
                cos = F.linear(F.normalize(table.emb, dim=1), F.normalize(weight[index], dim=1))
                loss, cols = margin_lse(cos, pos_cols, valid), index.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), cols
    return step


def build_gemm(C, r, D, emb, labels):
    lab, _ = prepare_labels(labels, "mlcd")
    n_pos = torch.unique(lab[lab >= 0]).numel()
    k = C if r >= 1 else n_pos + budget(C, n_pos, r, "ratio")       # PartialFC.sample's column count
    dtype = torch.bfloat16 if emb.device.type == "cuda" else torch.float32
    g = torch.Generator(device=emb.device).manual_seed(2)
    E = emb.to(dtype)
    W = torch.rand(k, D, generator=g, device=emb.device, dtype=dtype)
    G = torch.rand(emb.shape[0], k, generator=g, device=emb.device, dtype=dtype)
    torch.mm(E, W[:256].t())                                           # BLAS threads started off the clock

    def step(i):
        torch.mm(E, W.t())                                             # forward cos = E W_s^T
        torch.mm(G, W)                                                 # backward dE = G W_s
        torch.mm(G.t(), E)                                             # backward dW_s = G^T E
        return None, k
    return step


BUILD = {"partialfc": build_partialfc, "dense": build_dense, "gemm": build_gemm}


def run_one(job: dict) -> dict:
    """One variant in this fresh process: build it (untimed), then time one step."""
    t_enter = time.time()
    device = torch.device(job["device"])
    cuda = device.type == "cuda"
    base_rss = _rss_mb()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(job["batch"], job["dim"], generator=g).to(device)
    labels = torch.randint(0, job["classes"], (job["batch"], job["labels"]), generator=g).to(device)
    step = BUILD[job["variant"]](job["classes"], job["r"], job["dim"], emb, labels)
    setup_rss, setup_s = _rss_mb(), time.time() - t_enter
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss, cols = step(job["step"])
    if cuda:
        torch.cuda.synchronize()
    out = {"step_s": time.perf_counter() - t0, "loss": loss, "sampled_columns": cols, "setup_s": setup_s,
           "start_latency_s": t_enter - job["submitted"]}
    if cuda:
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = _rss_mb() - base_rss
        out["state_rss_mb"] = setup_rss - base_rss                   # weights + optimizer state + inputs
    return out


def _stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs} if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--ratio", type=float, default=0.1, help="the sampled ratio (r = 1.0 always runs too)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--num-labels", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="timed repeats of every variant, interleaved")
    ap.add_argument("--variants", nargs="+", default=list(BUILD), choices=list(BUILD))
    ap.add_argument("--quick", action="store_true", help="C = 10k, batch 128: checks the script")
    ap.add_argument("--out", default=None, help="default bench/results/partial_fc.json (_quick.json with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.classes, args.batch = [10_000], 128
    out = Path(args.out or ROOT / "bench/results" / ("partial_fc_quick.json" if args.quick else "partial_fc.json"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rs = sorted({args.ratio, 1.0})
    jobs = [(c, v, r) for c in args.classes for v in args.variants for r in rs]
    runs = {job: [] for job in jobs}

    # Fresh processes forked from a server that imported torch (and torch._dynamo, which optimizers import) once.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch", "torch._dynamo", "mlcd.partial_fc", "mlcd.train.step"])
    t_start, load_start = time.time(), os.getloadavg()
    for rnd in range(args.rounds):
        for c, v, r in jobs if rnd % 2 == 0 else jobs[::-1]:
            job = dict(classes=c, variant=v, r=r, dim=args.dim, batch=args.batch, labels=args.num_labels,
                       step=rnd, device=device, submitted=time.time())
            try:
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # exits once the process is gone (memory free)
                    res = pool.submit(run_one, job).result()
            except BrokenProcessPool:                                  # e.g. killed for memory: note it, go on
                res = {"error": "the process died (out of memory?)"}
            except Exception as e:                                     # e.g. CUDA out of memory
                res = {"error": f"{type(e).__name__}: {e}"}
            runs[(c, v, r)].append(res)
            mem = res.get("peak_rss_mb", res.get("peak_mem_mb"))
            print(f"round {rnd + 1}/{args.rounds}  C={c} {v} r={r}: " + (res["error"] if "error" in res else
                  f"{res['step_s']:.3f} s, {res['sampled_columns']} columns, peak {mem:.0f} MB "
                  f"(set-up {res['setup_s']:.1f} s, start {res['start_latency_s']:.1f} s)"), flush=True)

    def median_s(c, v, r):
        ok = [x["step_s"] for x in runs.get((c, v, r), []) if "error" not in x]
        return statistics.median(ok) if ok else None

    results = []
    for (c, v, r), rounds in runs.items():
        ok = [x for x in rounds if "error" not in x]
        entry = {"num_classes": c, "variant": v, "r": r, "step_s": _stats([x["step_s"] for x in ok]),
                 "sampled_columns": [x["sampled_columns"] for x in ok], "loss": [x["loss"] for x in ok],
                 "errors": [x["error"] for x in rounds if "error" in x]}
        for key in ("peak_rss_mb", "state_rss_mb", "peak_mem_mb", "setup_s", "start_latency_s"):
            if ok and key in ok[0]:
                entry[key] = _stats([x[key] for x in ok])
        mlcd_loss = [x["loss"] for x in runs.get((c, "partialfc", r), []) if "error" not in x]
        if v == "dense" and ok and len(mlcd_loss) == len(ok):           # same centers, same sample: same loss
            entry["loss_max_abs_diff_vs_partialfc"] = max(abs(a - b) for a, b in zip(entry["loss"], mlcd_loss))
        floor = median_s(c, "gemm", r)
        if v != "gemm" and ok and floor:
            entry["x_floor"] = entry["step_s"]["median"] / floor       # how many floors this step costs
        results.append(entry)

    c_max, r = max(args.classes), args.ratio
    sampled, full = median_s(c_max, "partialfc", r), median_s(c_max, "partialfc", 1.0)
    dense = median_s(c_max, "dense", 1.0)
    ratio = sampled / full if sampled and full else None
    paired = [a["step_s"] / b["step_s"] for a, b in zip(runs.get((c_max, "partialfc", r), []),
                                                         runs.get((c_max, "partialfc", 1.0), []))
              if "error" not in a and "error" not in b]                # the two measured in the same round
    report = {
        "bench": "partial_fc",
        "what": "one training step, world size 1, each variant timed in a fresh process; see the variants",
        "variants": {
            "partialfc": "mlcd.train.step.train_step: PartialFC forward + backward, global grad norm + clip, "
                         "SparseRowAdamW (sampled rows only); backbone = a learned [B, D] embedding table",
            "dense": "r=1: full [B, C] logits over a dense nn.Parameter (mlcd.loss.dense_margin_loss), "
                     "clip_grad_norm_, torch.optim.AdamW; r<1: PartialFC_V2-style weight[index], dense gradient",
            "gemm": "floor: cos = E W_s^T, dE = G W_s, dW_s = G^T E at the sampled shapes "
                    f"({'bf16' if device == 'cuda' else 'fp32'})"},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch_threads": torch.get_num_threads(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "sizes": {"classes": args.classes, "ratios": rs, "dim": args.dim, "global_batch": args.batch,
                  "labels_per_sample": args.num_labels, "timed_rounds": args.rounds, "warmup_steps": 0,
                  "state": "allocated and touched before timing"},
        "total_s": time.time() - t_start,
        "results": results,
        "at_max_classes": {"classes": c_max, "partialfc_sampled_s": sampled, "partialfc_full_s": full,
                           "dense_full_s": dense,
                           "speedup_sampled_vs_dense_full": dense / sampled if dense and sampled else None,
                           "time_ratio_sampled_over_full_per_round": paired},
        "target": f"at C={c_max}, step time(partialfc r={r}) <= 0.25 x step time(partialfc r=1.0)",
        f"time_ratio_r{r}_over_r1.0": ratio,
        "target_met": ratio is not None and ratio <= 0.25,
    }
    fileio.write_json(out, report)
    print(f"wrote {out} in {report['total_s']:.0f} s: at C={c_max}, partialfc r={r} / r=1.0 step time = {ratio}")


if __name__ == "__main__":
    main()
