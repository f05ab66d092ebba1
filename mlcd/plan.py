"""The capacity planner's model: what one GPU holds and how long the schedule takes, for a composed training
config. plan.py at the repo root is its command line (it composes the config and reads the measured loader rate,
files an installed package does not have).

Memory per rank = bytes of the tensors the code materialises (no allocator slack, CUDA context or NCCL buffers):
  backbone     fp32 weights P, fp32 gradients P, AdamW exp_avg + exp_avg_sq 2P, DDP's gradient buckets P (world > 1,
               gradient_as_bucket_view off) and, under bf16 autocast, a bf16 copy of every weight (the cast cache,
               saved for backward unless checkpointing discards it). train.sharding=fsdp: weights, gradients and
               moments are 1/W of that, no buckets, no autocast; instead FSDP all-gathers full parameters (bf16
               under precision=bf16): the root's (kept from forward to backward) and two blocks' (the one computing
               and the one prefetched), plus one block's full-size fp32 gradients before its reduce-scatter.
               Activations are counted as under autocast (FSDP's bf16 residual stream makes that an upper bound).
  activations  what autograd saves per block of mlcd/models/vit.py: two fp32 residual-stream tensors (autocast runs
               LayerNorm in fp32), the LayerNorm outputs fed to in_proj and fc1, q|k|v, the attention output (SDPA
               keeps no S x S matrix), fc1's and the activation's outputs (QuickGELU also its sigmoid), RoPE's
               rotated q and k; plus the input batch. Checkpointing keeps each block's input instead and recomputes
               one block at a time in backward. Backward adds the gradient of the MLP's hidden layer.
  centers      this rank's rows (contiguous block rule; rank 0 holds the most) in fp32, SparseRowAdamW's fp32
               exp_avg + exp_avg_sq and int64 row_step.
  loss         at B = global_batch_size / grad_accum rows (PartialFC gathers all ranks' embeddings): the fp32
               [B, n+1] buffer the fused log-sum-exp keeps for backward, the [B, n] cosines beside it (bf16 on GPU),
               the gathered and normalised embeddings and the sampled center rows (loss.kind=per_slot: one logits
               row per label slot, B*l rows, plus the [B, n] cosines they repeat). n = positives on this shard +
               r x the rest (loss.budget=ratio); positives for B*l labels spread uniformly over C classes:
               C (1 - (1 - 1/C)^(B l)) distinct in all, this shard's share of them. Real cluster labels are skewed
               (fewer distinct classes), so this is an upper bound.
  peak         persistent states (weights, moments, buckets, centers) + the largest of four phases: end of the
               forward, the loss, the backbone's backward, the optimizer update (see plan()).
Checked against the peak tensor memory of real CPU runs (fp32) in tests/test_plan.py; the bf16 sizes follow the same
accounting but have not been measured on a GPU yet.
Step time = hardware FLOPs / (world_size x peak bf16 FLOP/s x mfu). Model FLOPs (what MFU counts) = 3 x the ViT's
forward per image plus the loss GEMMs; hardware FLOPs add what checkpointing recomputes: every block's forward
once more in backward (4 x the blocks' forward instead of 3 x), so the same GPU takes longer per step and the MFU
it achieves is mfu x model / hardware FLOPs (both printed).
Loader: the GPUs consume global_batch_size / step time images/s; one rank's data.num_workers decoders feed
num_workers x loader_rate (0 workers: the training process decodes, counted as one). When that is less, the run is
loader-bound: step time and days become the loader's (compute-bound days printed beside) and a WARNING says by how
much. The default rate was measured on 500x375 JPEGs -> 224 px crops on a 2-core CPU; a 336 px crop costs more,
and a cluster's cores differ: measure yours (bench/data.py) and pass loader_rate=.
"""
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from mlcd.data.labels import resolve_num_classes

GIB = 2**30

# name: (memory in bytes as nvidia-smi reports it, dense bf16 tensor-core peak FLOP/s from NVIDIA's data sheets)
GPUS = {
    "a100-40gb": (40960 * 2**20, 312e12),
    "a100-80gb": (81920 * 2**20, 312e12),
    "h100": (81559 * 2**20, 989e12),    # SXM5 80 GB
    "h200": (143771 * 2**20, 989e12),   # SXM 141 GB, the H100's compute
    "cpu": (None, None),                # fp32, no step time: for checking the memory model against CPU runs
}
DEFAULT_NUM_LABELS = 8      # the paper's l (cluster.py's assign.topk default)
HEADROOM = 0.9              # a plan "fits" below 90% of the GPU: CUDA context, NCCL buffers, allocator slack
# images/s of one DataLoader worker, bench/results/data.json when copied (bench/data.py: webdataset shards of
# 500x375 q90 JPEGs -> RandomResizedCrop 224 bicubic + flip + normalize, best of 8 rounds on a shared 2-core x86 CPU,
# torch 2.14, Pillow 13). plan() uses it unless told a measured rate (plan.py passes the benchmark's file).
LOADER_RATE_MEASURED = 199.1
COPIED_RATE = (LOADER_RATE_MEASURED, "bench/data.py's measurement, as copied into mlcd/plan.py")


# ---------------------------------------------------------------------------------------------- the ViT
def _model(m) -> dict:
    m = dict(m)
    grid = m["image_size"] // m["patch_size"]
    return {**m, "grid": grid, "tokens": 1 + grid * grid}


def vit_params(model_cfg) -> int:
    """Parameter count of mlcd.models.vit.VisionTransformer from its config (tested against the built model)."""
    m = _model(model_cfg)
    w, f, p = m["width"], m["mlp_dim"], m["patch_size"]
    pos = m["tokens"] * w if m.get("pos_embed", "learned") == "learned" else (w // m["heads"]) // 2
    block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * f + f) + (f * w + w)
    proj = w * m["embed_dim"] if m.get("embed_dim") else 0
    return 3 * p * p * w + w + pos + 2 * w + m["layers"] * block + 2 * w + proj


def vit_forward_flops(model_cfg) -> int:
    """Forward FLOPs per image (a multiply-add = 2): patch embedding, per block q|k|v and output projections,
    attention scores QK^T and their product with V, the MLP; then the projection of the class token."""
    m = _model(model_cfg)
    s, w, f, p = m["tokens"], m["width"], m["mlp_dim"], m["patch_size"]
    patch = 2 * m["grid"] ** 2 * 3 * p * p * w
    block = 2 * s * w * 3 * w + 2 * s * w * w + 2 * 2 * s * s * w + 2 * 2 * s * w * f
    proj = 2 * w * m["embed_dim"] if m.get("embed_dim") else 0
    return patch + m["layers"] * block + proj


def vit_activation_bytes(model_cfg, batch: int, bf16: bool, checkpointing: bool) -> dict:
    """Activation memory of the ViT at this per-rank batch (see module docstring), in bytes:
    saved     what autograd holds at the end of the forward (the loss runs on top of it);
    backward  what the backbone's backward adds on top of `saved`: the block being recomputed (checkpointing)
              and the gradient of the widest tensor, the MLP's hidden layer (two for QuickGELU's backward)."""
    m = _model(model_cfg)
    s, w, f, h, img = m["tokens"], m["width"], m["mlp_dim"], m["heads"], m["image_size"]
    cb = 2 if bf16 else 4                   # matmul inputs/outputs: bf16 under autocast
    rb = 4                                  # residual stream: fp32 (autocast runs LayerNorm in fp32)
    quick = m.get("act") == "quick_gelu"
    stats = 2 * 2 * s * 4 + h * s * 4       # two LayerNorms' mean/rstd, attention log-sum-exp
    # RoPE2D (its angles are learned, so the rotation saves its inputs): per q and k an fp32 copy under autocast,
    # the fp32 rotate_half, and the rotated result SDPA keeps
    rope = 2 * w * ((4 if bf16 else 0) + 4 + cb) if m.get("pos_embed") == "rope2d" else 0
    block = s * (2 * w * rb + w * cb * (1 + 3 + 1 + 1) + f * cb * (3 if quick else 2) + rope) + stats
    # the bf16 copy of the images conv1 keeps, ln_pre's input and stats, the last residual (ln_post keeps a view)
    outside = (3 * img * img * cb if bf16 else 0) + s * w * cb + 2 * s * 4 + s * w * rb
    grad_work = s * f * cb * (2 if quick else 1)
    if checkpointing:
        saved, backward = m["layers"] * s * w * rb + outside, block - s * w * rb + grad_work
    else:
        saved, backward = m["layers"] * block + outside, grad_work
    return {"saved": batch * saved, "backward": batch * backward}


# ---------------------------------------------------------------------------------------------- the classifier
def shard_rows(num_classes: int, world_size: int, rank: int = 0) -> int:
    """Rows of rank `rank` under the contiguous-block rule (mlcd.partial_fc.ShardSpec)."""
    return num_classes // world_size + int(rank < num_classes % world_size)


def expected_positives(num_classes: int, n_local: int, labels_per_step: int) -> float:
    """Expected distinct classes of this shard hit by `labels_per_step` labels drawn uniformly over all classes."""
    hit = -math.expm1(labels_per_step * math.log1p(-1.0 / num_classes))   # 1 - (1 - 1/C)^(B l)
    return n_local * hit


def sampled_columns(n_local: int, positives: float, ratio: float, rule: str) -> float:
    """Columns of this rank's logits: mlcd.partial_fc.budget applied to the expected positive count."""
    if ratio >= 1 and rule == "ratio":
        return float(n_local)
    if rule == "ratio":
        return positives + min(n_local - positives, math.floor(ratio * (n_local - positives) + 0.5))
    return max(positives, min(n_local, math.floor(ratio * n_local + 0.5)))


# ---------------------------------------------------------------------------------------------- config
def _labels_manifest(cfg) -> dict:
    path = Path(str(cfg.data.labels_dir)) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def resolve_num_labels(cfg, num_labels=None) -> tuple[int, str]:
    """(l, where it came from): data.num_labels, the labels manifest, the planner's num_labels, else the paper's 8."""
    if cfg.data.get("num_labels"):
        return int(cfg.data.num_labels), "data.num_labels"
    topk = _labels_manifest(cfg).get("settings", {}).get("topk")
    if topk:
        return int(topk), f"{cfg.data.labels_dir}/manifest.json"
    if num_labels is not None:
        return int(num_labels), "num_labels"
    return DEFAULT_NUM_LABELS, "assumed: the paper's; set num_labels=..."


# ---------------------------------------------------------------------------------------------- the plan
def plan(cfg, world_size: int, gpu: str = "a100-80gb", mfu: float = 0.4, num_labels=None,
         loader_rate=None, measured_rate: tuple[float, str] = COPIED_RATE) -> dict:
    """Per-rank memory (bytes), FLOPs and schedule time for a composed train config; see the module docstring.
    loader_rate is the user's images/s per worker (it also judges data.decode=gpu); measured_rate, (rate, source),
    stands in when it is not given: the package cannot read the benchmark's file, so plan.py passes it."""
    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu!r}: must be one of {sorted(GPUS)}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: must be a positive integer (the number of GPUs)")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu!r}: must be in (0, 1]")
    if loader_rate is not None and not loader_rate > 0:
        raise ValueError(f"loader_rate={loader_rate!r}: must be > 0 (images/s per DataLoader worker)")
    t, loss, model_cfg = cfg.train, cfg.loss, OmegaConf.to_container(cfg.model, resolve=True)
    G, accum = int(t.global_batch_size), int(t.grad_accum)
    if G % (world_size * accum):
        unit = world_size * accum
        fits = [w for w in (8, 16, 32, 40, 64, 80, 128, 256) if G % (w * accum) == 0]
        raise ValueError(f"train.global_batch_size={G} is not divisible by world_size={world_size} x "
                         f"train.grad_accum={accum}, so train.py would refuse it: set train.global_batch_size to a "
                         f"multiple of {unit} (e.g. {math.ceil(G / unit) * unit}) or use world_size in {fits}")
    precision = str(t.precision)
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision={precision!r}: must be auto, fp32 or bf16")
    bf16 = (precision == "bf16") or (precision == "auto" and gpu != "cpu")
    b, B = G // (world_size * accum), G // accum                        # per-rank micro-batch, global loss rows
    C = resolve_num_classes(cfg.get("num_classes"), cfg.data.labels_dir)
    D = int(model_cfg.get("embed_dim") or model_cfg["width"])
    kind = str(loss.get("kind", "mlcd"))
    l, l_source = resolve_num_labels(cfg, num_labels)
    l_used = 1 if kind == "single" else min(l, int(loss.get("slots") or l)) if kind == "per_slot" else l
    copies = l_used if kind == "per_slot" else 1                        # per_slot: one logits row per label slot
    ratio, rule = float(loss.get("sample_ratio", 0.1)), str(loss.get("budget", "ratio"))

    P = vit_params(model_cfg)
    fsdp = str(t.get("sharding", "ddp")) == "fsdp"
    if fsdp and world_size < 2:
        raise ValueError("train.sharding=fsdp needs world_size >= 2 (train.py refuses it on one process)")
    P_root = vit_params({**model_cfg, "layers": 0})                     # what FSDP's root group gathers
    P_block = (P - P_root) // int(model_cfg["layers"])
    P_held = -(-P // world_size) if fsdp else P                         # parameters this rank holds
    pb = 2 if bf16 else 4                                               # bytes of an all-gathered FSDP parameter
    n_local = shard_rows(C, world_size)
    positives = expected_positives(C, n_local, B * l_used)
    n = sampled_columns(n_local, positives, ratio, rule)
    cb = 2 if bf16 else 4
    ckpt = bool(t.grad_checkpointing)
    img = int(model_cfg["image_size"])

    acts = {k: vit_activation_bytes(model_cfg, b, bf16, k) for k in (False, True)}
    mem = {
        "params": 4 * P_held,
        "grads": 4 * P_held,
        "ddp_buckets": 4 * P if world_size > 1 and not fsdp else 0,
        "adamw_moments": 8 * P_held,
        "bf16_weight_copies": 2 * P if bf16 and not fsdp else 0,
        "fsdp_gathered": pb * (P_root + 2 * P_block) if fsdp else 0,
        "fsdp_block_grads": 4 * P_block if fsdp else 0,
        "input_batch": b * 3 * img * img * 4,
        "activations_no_ckpt": sum(acts[False].values()),
        "activations_ckpt": sum(acts[True].values()),
        "centers": 4 * n_local * D,
        "center_moments": 8 * n_local * D,
        "center_row_step": 8 * n_local,
        "logits_fp32": round(4 * B * copies * (n + 1)),
        "logits_cos": round(cb * B * n * (1 + copies if copies > 1 else 1)),
        "loss_embeddings": B * D * (8 + (cb if bf16 else 0)) + round(n * D * (8 + (cb if bf16 else 0))),
    }
    mem["activations"] = mem["activations_ckpt" if ckpt else "activations_no_ckpt"]
    mem["loss_buffers"] = mem["logits_fp32"] + mem["logits_cos"] + mem["loss_embeddings"]
    mem["persistent"] = (mem["params"] + mem["adamw_moments"] + mem["ddp_buckets"] + mem["centers"]
                         + mem["center_moments"] + mem["center_row_step"])
    # The transient part peaks in one of four phases; accumulated gradients sit under all but the update.
    # Under checkpointing autocast's weight copies are not saved, so they are gone once the forward ends.
    held = mem["input_batch"] + acts[ckpt]["saved"] + (mem["grads"] if accum > 1 else 0)
    kept_copies = 0 if ckpt else mem["bf16_weight_copies"]
    gathered = mem["fsdp_gathered"]
    phases = {"forward_end": held + mem["bf16_weight_copies"] + gathered,
              "loss": held + kept_copies + mem["loss_buffers"] + pb * P_root * fsdp,
              "backbone_backward": held + kept_copies + acts[ckpt]["backward"] + gathered + mem["fsdp_block_grads"],
              "update": mem["grads"]}
    peak_phase = max(phases, key=phases.get)
    mem["peak"] = mem["persistent"] + phases[peak_phase]

    fwd = vit_forward_flops(model_cfg)
    # checkpointing recomputes each block's forward in backward (vit.py checkpoints blocks, not the patch embedding)
    recompute = fwd - vit_forward_flops({**model_cfg, "layers": 0}) if ckpt else 0
    loss_flops = 3 * 2 * B * n * D                                      # per rank: cosines fwd + two GEMMs bwd
    step_flops = 3 * fwd * G + world_size * loss_flops * accum          # model FLOPs
    hw_flops = step_flops + recompute * G
    capacity, peak_flops = GPUS[gpu]
    step_s = hw_flops / (world_size * peak_flops * mfu) if peak_flops else None
    time = loader = None
    if step_s is not None:
        steps = int(t.total_steps)
        time = {"compute_step_s": step_s, "compute_days": step_s * steps / 86400,
                "achieved_mfu": mfu * step_flops / hw_flops}
        gpu_decode = str(cfg.data.get("decode", "cpu")) == "gpu" and not loader_rate
        if gpu_decode:  # the GPU decodes: its rate is measured by make gpu-check, not known here
            time["loader_note"] = ("data.decode=gpu: the loader's rate is the GPU decoder's, not measured here; "
                                   "make gpu-check measures it, pass it as loader_rate=")
        elif str(cfg.data.get("source", "shards")) != "synthetic":     # synthetic batches decode nothing
            rate, rate_source = (float(loader_rate), "loader_rate") if loader_rate else measured_rate
            workers = int(cfg.data.num_workers)
            needed, fed = G / world_size / step_s, max(workers, 1) * rate
            loader = {"num_workers": workers, "rate_per_worker": rate, "rate_source": rate_source,
                      "needed_per_gpu": needed, "available_per_gpu": fed, "factor": needed / fed,
                      "bound": needed > fed, "workers_needed": math.ceil(needed / rate)}
            time["loader_step_s"] = G / world_size / fed
            time["loader_days"] = time["loader_step_s"] * steps / 86400
        time["step_s"] = max(step_s, time.get("loader_step_s", 0))
        time["days"] = time["step_s"] * steps / 86400
        time["images_per_s"] = G / time["step_s"]
    out = {
        "config": {"model": model_cfg.get("name"), "run_name": cfg.get("run_name"), "world_size": world_size,
                   "gpu": gpu, "mfu": mfu, "precision": "bf16" if bf16 else "fp32", "grad_checkpointing": ckpt,
                   "sharding": "fsdp" if fsdp else "ddp",
                   "global_batch_size": G, "grad_accum": accum, "per_rank_batch": b, "loss_rows": B,
                   "num_classes": C, "embed_dim": D, "num_labels": l, "num_labels_source": l_source,
                   "loss_kind": kind, "sample_ratio": ratio, "budget": rule, "total_steps": int(t.total_steps)},
        "backbone_params": P,
        "shard": {"rows": n_local, "positives": positives, "negatives": n - positives, "columns": n,
                  "logits_shape": [B * copies, round(n)]},
        "memory_bytes": mem,
        "peak_phase": peak_phase,
        "flops": {"forward_per_image": fwd, "train_per_image": 3 * fwd, "recompute_per_image": recompute,
                  "loss_per_rank_step": loss_flops * accum, "per_step": step_flops, "hardware_per_step": hw_flops},
        "time": time,
        "loader": loader,
        "gpu_memory_bytes": capacity,
    }
    if capacity is None:
        out["verdict"] = f"peak {mem['peak'] / GIB:.2f} GiB per rank (no GPU to compare against)"
    else:
        ok = mem["peak"] <= HEADROOM * capacity
        out["fits"] = ok
        out["verdict"] = (f"{'FITS' if ok else 'DOES NOT FIT'}: peak {mem['peak'] / GIB:.1f} GiB of "
                          f"{capacity / GIB:.0f} GiB on {gpu} ({100 * mem['peak'] / capacity:.0f}%; "
                          f"{int(HEADROOM * 100)}% usable)")
        if not ok and not ckpt:
            out["verdict"] += "; try train.grad_checkpointing=true"
    return out


def format_table(p: dict) -> str:
    """The plan as aligned lines for a terminal."""
    c, m, s = p["config"], p["memory_bytes"], p["shard"]
    ckpt = c["grad_checkpointing"]

    def row(label, key, note=""):
        return f"    {label:<36}{m[key] / GIB:9.2f} GiB{note}"

    lines = [
        f"plan: {c['run_name']} ({c['model']}) on {c['world_size']} x {c['gpu']}, {c['precision']}; batch "
        f"{c['global_batch_size']:,} = {c['per_rank_batch']} per rank x {c['world_size']}"
        + (f" x {c['grad_accum']} micro-steps" if c["grad_accum"] > 1 else ""),
        f"  {c['num_classes']:,} classes (dim {c['embed_dim']}), l = {c['num_labels']} ({c['num_labels_source']}), "
        f"loss {c['loss_kind']}, r = {c['sample_ratio']} ({c['budget']})",
        f"  backbone: {p['backbone_params'] / 1e6:.2f}M parameters, train.sharding={c['sharding']}"
        + (f" (this rank holds 1/{c['world_size']})" if c["sharding"] == "fsdp" else ""),
        row("parameters (fp32)", "params"),
        row("gradients (fp32)", "grads"),
        row("DDP gradient buckets (fp32)", "ddp_buckets"),
        row("AdamW moments (2 x fp32)", "adamw_moments"),
        row("bf16 weight copies (autocast)", "bf16_weight_copies"),
        row("FSDP all-gathered (root + 2 blocks)", "fsdp_gathered"),
        row("FSDP one block's fp32 gradients", "fsdp_block_grads"),
        row("input batch (fp32)", "input_batch"),
        row("activations, no checkpointing", "activations_no_ckpt", "" if ckpt else "  <- configured"),
        row("activations, checkpointing", "activations_ckpt", "  <- configured" if ckpt else ""),
        f"  class centers: {s['rows']:,} rows on rank 0",
        row("centers (fp32)", "centers"),
        row("exp_avg + exp_avg_sq (fp32)", "center_moments"),
        row("row_step (int64)", "center_row_step"),
        f"  loss: logits {s['logits_shape'][0]:,} x {s['columns']:,.0f} "
        f"(~{s['positives']:,.0f} positives + {s['negatives']:,.0f} sampled negatives)",
        row("logits buffer (fp32)", "logits_fp32"),
        row(f"cosines ({c['precision']})", "logits_cos"),
        row("embeddings + sampled centers", "loss_embeddings"),
        row("persistent states", "persistent"),
        row("PEAK per GPU", "peak", f"  (during: {p['peak_phase'].replace('_', ' ')})"),
        f"  compute: {p['flops']['forward_per_image'] / 1e9:.2f} GFLOP forward per image, "
        f"{p['flops']['per_step'] / 1e15:.2f} PFLOP per step",
    ]
    f = p["flops"]
    if f["recompute_per_image"]:
        lines[-1] += (f" of model FLOPs; {f['hardware_per_step'] / 1e15:.2f} PFLOP run with checkpointing's recompute "
                      f"(+{f['recompute_per_image'] / 1e9:.2f} GFLOP per image)")
    tm, ld = p["time"], p["loader"]
    if tm:
        lines.append(f"  compute-bound at mfu={c['mfu']} of peak over the FLOPs run (MFU on model FLOPs "
                     f"{tm['achieved_mfu']:.1%}): "
                     f"{tm['compute_step_s']:.2f} s/step, {c['global_batch_size'] / tm['compute_step_s']:,.0f} img/s "
                     f"({c['global_batch_size'] / tm['compute_step_s'] / c['world_size']:,.0f} per GPU for the loader "
                     f"to feed); {c['total_steps']:,} steps = {tm['compute_days']:.1f} days")
    if ld:
        lines.append(f"  loader: {ld['num_workers']} workers x {ld['rate_per_worker']:.0f} img/s ({ld['rate_source']}) "
                     f"= {ld['available_per_gpu']:,.0f} img/s per GPU for the {ld['needed_per_gpu']:,.0f} needed "
                     f"({ld['available_per_gpu'] / ld['needed_per_gpu']:.2f}x)")
        if ld["bound"]:
            lines.append(loader_warning(p))
        lines.append(f"  days: {tm['days']:.1f}, {'loader' if ld['bound'] else 'compute'}-bound (compute-bound "
                     f"{tm['compute_days']:.1f}, loader-bound {tm['loader_days']:.1f})")
    if tm and tm.get("loader_note"):
        lines.append(f"  loader: {tm['loader_note']}")
    lines.append(f"  verdict: {p['verdict']}")
    return "\n".join(lines)


def loader_warning(p: dict) -> str:
    """The loader-bound line: by how much, the days it costs, and the workers that would lift it."""
    c, tm, ld = p["config"], p["time"], p["loader"]
    return (f"  WARNING: loader-bound by {ld['factor']:.1f}x: data.num_workers={ld['num_workers']} feed "
            f"{ld['available_per_gpu']:,.0f} of the {ld['needed_per_gpu']:,.0f} img/s per GPU the compute needs, so "
            f"{c['total_steps']:,} steps take {tm['loader_days']:.1f} days, not {tm['compute_days']:.1f}; it takes "
            f"data.num_workers={ld['workers_needed']} at this rate (CPU cores per GPU allowing; measure yours with "
            f"bench/data.py and pass loader_rate=), or data.decode=gpu to decode on the GPU")


if __name__ == "__main__":
    raise SystemExit("the capacity planner runs as `python plan.py ...` from the repository root (it composes configs/train)")
