"""The GPU check a user runs on a CUDA machine before a long job: `make gpu-check` (about 5 minutes on one GPU).

    1. bf16_step      one training step (ViT-B/16 + MLCD loss over PartialFC) in bf16 vs fp32 from the same
                      weights and batch: loss and gradient agreement
    2. attention      SDPA's flash and memory-efficient kernels vs the math kernel, learned position embedding
                      and RoPE2D blocks (the bigG path)
    3. faiss          FAISS k-means and top-k assignment on GPU vs CPU on the same data: objective, label agreement
    4. features       frozen features under bf16 autocast (eval_linear_probe.py, cluster.py) vs fp32; the linear
                      probe fitted on GPU vs CPU
    5. trainer        train.py on the GPU (synthetic data): auto precision = bf16, peak memory, a checkpoint with the
                      CUDA RNG state, resumed to the same losses as an uninterrupted run; with 2+ GPUs also DDP vs
                      FSDP2 over NCCL on 2 ranks
    6. throughput     bench/train.py: vit_b16 at 224, 1M classes, r = 0.1: images/s and MFU
    7. decode         data.decode=gpu vs cpu on LAION-sized JPEGs (500x375) at 224: images/s per GPU of the device
                      decoder (nvJPEG + crop/resize/flip/normalise on the GPU), of one PIL worker and of data.num_workers
                      of them, both loaders end to end, beside the trainer's ViT-B/32 step at the paper's per-GPU
                      batch (410); same-box pixel agreement with the CPU path; bad/odd images (cut, garbage, PNG, CMYK,
                      progressive) skipped and counted alike on both paths. Runs only on CUDA (or when named in --only)

Writes bench/results/gpu_check.json and prints one line per check; exits 1 if a check fails. Without CUDA it says
so and exits 0. `--smoke` runs the same code at toy sizes on the CPU (no thresholds, no FAISS GPU): what the test
suite runs so this script keeps working on machines that have no GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlcd import fileio  # noqa: E402
from mlcd.models import build_model  # noqa: E402
from mlcd.partial_fc import build_partial_fc  # noqa: E402

# Pass thresholds on the GPU (bf16 has 8 mantissa bits: relative errors near 2^-8 per op, partly averaging out).
LOSS_RTOL = 0.02          # bf16 vs fp32 loss
GRAD_COSINE = 0.99        # bf16 vs fp32 gradient direction, whole backbone and the sampled centers
ATTN_ATOL = 2e-2          # fused kernel vs math kernel, both bf16, outputs of unit scale
FEATURE_COSINE = 0.995    # bf16 vs fp32 features, per image (minimum)
KMEANS_OBJ_RTOL = 0.01    # GPU vs CPU k-means objective (different float summation orders)
ASSIGN_AGREE = 0.999      # GPU vs CPU top-1 center of each point
PROBE_ATOL = 0.5          # GPU vs CPU linear-probe top-1, in points
DECODE_MEAN_ABS = 0.03    # decode=gpu vs cpu, same boxes: mean |diff| in normalised units (one grey level ~ 0.015):
                          #   nvJPEG's IDCT/upsampling and the float resize differ from libjpeg-turbo + PIL by ~1 level
CUDA_ONLY = {"decode"}    # skipped without CUDA unless named in --only (then it runs on the CPU, as tests do)


def _cfg(group: str, name: str):
    return OmegaConf.load(ROOT / "configs" / "train" / group / f"{name}.yaml")


def _tiny_model_cfg():
    cfg = _cfg("model", "vit_tiny")
    cfg.update(width=64, layers=2, heads=4, mlp_dim=128, embed_dim=32)
    return cfg


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# ---------------------------------------------------------------------------------------------- 1. bf16 step
def check_bf16_step(device, smoke: bool) -> dict:
    model_cfg = _tiny_model_cfg() if smoke else _cfg("model", "vit_b16")
    num_classes, batch = (1000, 16) if smoke else (100_000, 64)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    pfc = build_partial_fc(_cfg("loss", "mlcd"), num_classes, model.embed_dim, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, model.image_size, model.image_size, generator=g).to(device)
    labels = torch.randint(0, num_classes, (batch, 8), generator=g).to(device)

    def step(bf16: bool):
        model.zero_grad(set_to_none=True)
        pfc.zero_grad(set_to_none=True)
        pfc.bf16_cosines = bf16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            embeddings = model(images).embedding
        loss = pfc(embeddings.float(), labels, step=0)  # the same sampled negatives: seeded by step
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        center_grad = pfc.weight.grad
        return float(loss.detach()), grads, (center_grad.to_dense() if center_grad.is_sparse else center_grad).float()

    loss32, g32, c32 = step(False)
    loss16, g16, c16 = step(True)
    out = {"model": model_cfg.name, "num_classes": num_classes, "batch": batch, "loss_fp32": loss32,
           "loss_bf16": loss16, "loss_rel_diff": abs(loss16 - loss32) / abs(loss32),
           "backbone_grad_cosine": _cosine(g16, g32), "center_grad_cosine": _cosine(c16, c32),
           "grad_norm_ratio": float(g16.norm() / g32.norm())}
    out["ok"] = (out["loss_rel_diff"] <= LOSS_RTOL and out["backbone_grad_cosine"] >= GRAD_COSINE
                 and out["center_grad_cosine"] >= GRAD_COSINE)
    return out


# ---------------------------------------------------------------------------------------------- 2. attention
def check_attention(device, smoke: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mlcd.models.vit import rope2d_angles

    width, heads, grid = (64, 4, 4) if smoke else (1664, 16, 16)  # bigG's width and heads at 224 px
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model({**OmegaConf.to_container(_tiny_model_cfg()), "width": width, "heads": heads,
                         "mlp_dim": 4 * width, "layers": 1, "pos_embed": "rope2d", "patch_size": 4,
                         "image_size": 4 * grid}).to(device)
    attn = model.blocks[0].attn.to(dtype)
    x = torch.randn(8, 1 + grid * grid, width, device=device, dtype=dtype)
    angles = rope2d_angles(grid, grid, width // heads, model.class_pos_emb.detach()).to(device)
    angles = torch.cat([angles, angles], dim=-1)
    rope = (angles.cos(), angles.sin())
    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    out, ok = {"width": width, "heads": heads, "tokens": 1 + grid * grid, "dtype": str(dtype)}, True
    for pos, r in (("learned", None), ("rope2d", rope)):
        with torch.no_grad(), sdpa_kernel([backends["math"]]):
            ref = attn(x, r).float()
        for name in ("flash", "efficient"):
            try:
                with torch.no_grad(), sdpa_kernel([backends[name]]):
                    got = attn(x, r).float()
            except RuntimeError as e:  # a kernel this GPU/dtype does not have: reported, not a failure
                out[f"{pos}_{name}"] = f"unavailable: {str(e).splitlines()[0][:120]}"
                continue
            diff = float((got - ref).abs().max())
            out[f"{pos}_{name}_max_abs_diff"] = diff
            ok = ok and diff <= ATTN_ATOL
        with torch.no_grad():  # what training runs: the default kernel choice
            out[f"{pos}_default_max_abs_diff"] = float((attn(x, r).float() - ref).abs().max())
    out["ok"] = ok
    return out


# ---------------------------------------------------------------------------------------------- 3. faiss
def check_faiss(device, smoke: bool) -> dict:
    import faiss

    from mlcd.cluster.assign import build_index, topk
    from mlcd.cluster.kmeans import train_kmeans

    n, d, k = (4000, 32, 40) if smoke else (200_000, 512, 4096)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    gpus = faiss.get_num_gpus()
    out = {"n": n, "d": d, "k": k, "faiss_gpus": gpus, "faiss_version": faiss.__version__}
    if gpus == 0 and not smoke:  # a CUDA machine whose FAISS sees no GPU: a CPU-only faiss is installed
        out.update(ok=False, note="FAISS sees no GPU: install faiss-gpu (requirements.txt)")
        return out
    other = gpus > 0  # smoke without a GPU: both sides on the CPU, so the comparison code still runs
    runs = {}
    for gpu in (False, other):
        t0 = time.time()
        centers, rep = train_kmeans(x, k, niter=10, seed=1234, gpu=gpu)
        runs[gpu] = (centers, rep["iterations"][-1]["obj"], time.time() - t0)
    obj_cpu, obj_gpu = runs[False][1], runs[other][1]
    centers = runs[False][0]  # assignment: the same centers searched on CPU and GPU
    ids_cpu = topk(build_index(centers, gpu=False), x, 8)[0]
    ids_gpu = topk(build_index(centers, gpu=other, device=0 if other else None), x, 8)[0]
    out.update(kmeans_obj_cpu=obj_cpu, kmeans_obj_gpu=obj_gpu, kmeans_obj_rel_diff=abs(obj_gpu - obj_cpu) / obj_cpu,
               kmeans_s_cpu=runs[False][2], kmeans_s_gpu=runs[other][2],
               assign_top1_agreement=float(np.mean(ids_cpu[:, 0] == ids_gpu[:, 0])),
               assign_top8_set_agreement=float(np.mean(np.sort(ids_cpu, 1) == np.sort(ids_gpu, 1))))
    out["ok"] = out["kmeans_obj_rel_diff"] <= KMEANS_OBJ_RTOL and out["assign_top1_agreement"] >= ASSIGN_AGREE
    return out


# ---------------------------------------------------------------------------------------------- 4. features + probe
def check_features_and_probe(device, smoke: bool) -> dict:
    from mlcd.eval.linear_probe import fit_logreg, top1_accuracy
    from mlcd.models.backbones import build_backbone

    model_cfg = _tiny_model_cfg() if smoke else _cfg("model", "vit_b16")
    backbone = build_backbone({"type": "random", "model": model_cfg, "seed": 0}, feature="pooled")
    model = backbone.model.to(device)                       # eval() already; the feature closure uses this module
    images = torch.randn(64, 3, model.image_size, model.image_size, device=device)
    amp = backbone(images)                                  # bf16 autocast on CUDA: what eval and extract run
    with torch.no_grad():
        fp32 = model(images).pooled.float()
    per_image = F.cosine_similarity(amp, fp32, dim=1)
    # the probe: separable-ish random data, fitted on the GPU and on the CPU
    rng = np.random.default_rng(0)
    n, dim, classes = (600, 16, 4) if smoke else (20_000, 768, 100)
    means = rng.standard_normal((classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    xs = torch.from_numpy(means[y] + 2 * rng.standard_normal((n, dim)).astype(np.float32))
    ys = torch.from_numpy(y)
    half = n // 2
    acc = {}
    for dev in ("cpu", device.type):
        probe = fit_logreg(xs[:half], ys[:half], classes, 1e-4, device=dev)
        acc[dev] = 100 * top1_accuracy(probe.predict(xs[half:]), ys[half:].numpy())
    out = {"model": model_cfg.name, "feature_cosine_min": float(per_image.min()),
           "feature_cosine_mean": float(per_image.mean()), "probe_top1_cpu": acc["cpu"],
           "probe_top1_device": acc[device.type]}
    out["ok"] = out["feature_cosine_min"] >= FEATURE_COSINE and abs(acc["cpu"] - acc[device.type]) <= PROBE_ATOL
    return out


# ---------------------------------------------------------------------------------------------- 5. the trainer
def check_trainer(device, smoke: bool) -> dict:
    args = ["data.source=synthetic", "num_classes=1000", "data.num_labels=8", "train.progress_bar=false",
            "train.log_every=1", "train.ckpt_every=3", "optim.warmup_steps=1", "optim.min_lr_ratio=1.0",
            "logging.wandb.mode=disabled", "seed=1"]
    args += (["model.width=64", "model.layers=2", "model.heads=4", "model.mlp_dim=128", "model.embed_dim=32",
              "train.global_batch_size=16"] if smoke else ["model=vit_b16", "train.global_batch_size=64"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def train(out_dir, steps, ranks=1, *extra):
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                  if ranks > 1 else [sys.executable])
        cmd = [*launch, str(ROOT / "train.py"), f"out_dir={out_dir}", f"train.total_steps={steps}", *args, *extra]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise RuntimeError(f"train.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]

    with tempfile.TemporaryDirectory() as tmp:
        whole = train(f"{tmp}/whole", 6)
        train(f"{tmp}/resumed", 3)
        resumed = train(f"{tmp}/resumed", 6)
        config = OmegaConf.load(f"{tmp}/whole/config.yaml")
        rng = torch.load(f"{tmp}/whole/checkpoints/step-00000006/rng-rank00000.pt", weights_only=True)
        # two GPUs: NCCL, DDP and FSDP2 (bf16 params, fp32 reduce) on the same global batches
        multi = {kind: [r["loss"] for r in train(f"{tmp}/{kind}", 6, 2, f"train.sharding={kind}")]
                 for kind in ("ddp", "fsdp")} if device.type == "cuda" and torch.cuda.device_count() >= 2 else None
    losses, again = [r["loss"] for r in whole], [r["loss"] for r in resumed]
    out = {"losses": losses, "resumed_losses": again, "peak_mem_mb": whole[-1]["peak_mem_mb"],
           "precision": config.train.precision, "cuda_rng_saved": rng.get("cuda") is not None,
           "resume_exact": losses == again}
    # bf16 kernels are not all deterministic run to run; exact equality is reported, closeness is required
    out["resume_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(again, losses))
    out["ok"] = (out["resume_max_rel_diff"] <= 1e-3 and all(np.isfinite(losses))
                 and (device.type != "cuda" or out["cuda_rng_saved"]))
    if multi:  # DDP autocasts over fp32 weights (LayerNorm in fp32), FSDP runs bf16 weights: close, not equal
        out.update(ddp_losses=multi["ddp"], fsdp_losses=multi["fsdp"], fsdp_vs_ddp_max_rel_diff=max(
            abs(a - b) / abs(b) for a, b in zip(multi["fsdp"], multi["ddp"])))
        out["ok"] = out["ok"] and out["fsdp_vs_ddp_max_rel_diff"] <= LOSS_RTOL
    else:
        out["two_gpus"] = "skipped: DDP/FSDP over NCCL needs 2 GPUs"
    return out


# ---------------------------------------------------------------------------------------------- 6. throughput
def check_throughput(device, smoke: bool) -> dict:
    steps = ["--steps", "2", "--warmup", "1", "--batch", "8"] if smoke else ["--steps", "10", "--batch", "256"]
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "train.json"
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), *steps, "--out", str(out_json)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise RuntimeError(f"bench/train.py failed:\n{r.stderr[-2000:]}")
        result = json.loads(out_json.read_text())
    result["ok"] = True  # a measurement, not a pass/fail check
    return result


# ---------------------------------------------------------------------------------------------- 7. decode
def _odd_images() -> dict:
    """Images a decoder may treat differently: key -> bytes. Both paths must skip or keep the same ones."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)

    def enc(img, **kw):
        buf = io.BytesIO()
        img.save(buf, **kw)
        return buf.getvalue()
    good = enc(Image.fromarray(arr), format="JPEG", quality=90)
    return {"good": good, "gray": enc(Image.fromarray(arr[..., 0]), format="JPEG"),
            "progressive": enc(Image.fromarray(arr), format="JPEG", progressive=True),
            "cmyk": enc(Image.fromarray(arr).convert("CMYK"), format="JPEG"),
            "png": enc(Image.fromarray(arr), format="PNG"), "webp": enc(Image.fromarray(arr), format="WEBP"),
            "cut": good[: len(good) // 2], "cut_with_end": good[: len(good) // 2] + b"\xff\xd9",
            "scan_garbage": good[:len(good) // 2] + bytes(200) + good[-2:],
            "garbage": b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), "empty": b""}


def check_decode(device, smoke: bool) -> dict:
    import importlib.util
    import io
    import random

    import webdataset as wds
    from PIL import Image

    from mlcd.data.device_decode import DeviceDecoder, pack
    from mlcd.data.labels import write_shard_labels
    from mlcd.data.tars import iter_samples
    from mlcd.data.loader import make_train_loader
    from mlcd.data.make_shards import shards_from_folder
    from mlcd.data.transforms import TrainTransform, to_normalized_tensor
    from mlcd.train.optim import build_backbone_optimizer, build_center_optimizer
    from mlcd.train.step import train_step

    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "bench" / "data.py")
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    n, batch, size = (24, 8, 64) if smoke else (1024, 410, 224)  # 410 = 32,800 / 80 GPUs (paper Table 10, §4.1)
    workers = 0 if smoke else min(int(_cfg("data", "default").num_workers), os.cpu_count() or 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, reps):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps

    out = {"images": n, "batch": batch, "out_size": size, "src_size": [500, 375], "workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = bench_data.make_images(tmp / "imgs", n)
        datas = [p.read_bytes() for p in paths]
        transform = TrainTransform(size)
        # same boxes: the device path vs PIL (decode=cpu's decoder and resize) on one batch
        rng = random.Random(0)
        items = []
        for d in datas[:batch]:
            with Image.open(io.BytesIO(d)) as img:
                items.append((d, transform.params(img.width, img.height, rng)))
        enc = pack(items, [np.zeros(1, np.int64)] * len(items), [""] * len(items), [""] * len(items), shared=False)
        decoder = DeviceDecoder(size, device)
        got, failed = decoder(enc)
        ref = []
        for d, (left, top, w, h, flip) in items:
            img = Image.open(io.BytesIO(d)).convert("RGB").resize((size, size), Image.BICUBIC,
                                                                  box=(left, top, left + w, top + h))
            ref.append(to_normalized_tensor(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img))
        diff = (got.float().cpu() - torch.stack(ref)).abs()
        out.update(same_box_mean_abs_diff=float(diff.mean()), same_box_p99_abs_diff=float(diff.flatten().kthvalue(
            int(0.99 * diff.numel())).values), same_box_max_abs_diff=float(diff.max()), same_box_failed=len(failed))
        # throughput per GPU: the device decoder alone (main process), one PIL worker, the trainer's step
        t_decode = timed(lambda: decoder(enc), 2 if smoke else 10)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
        rng = random.Random(1)
        t0 = time.perf_counter()
        for d in datas[:batch]:
            with Image.open(io.BytesIO(d)) as img:
                transform(img.convert("RGB"), rng)
        per_worker = batch / (time.perf_counter() - t0)
        torch.set_num_threads(threads)
        out.update(gpu_path_decoder_images_per_s=batch / t_decode, cpu_path_images_per_s_per_worker=per_worker,
                   cpu_path_images_per_s_all_workers=per_worker * max(workers, 1))
        model_cfg = _tiny_model_cfg() if smoke else _cfg("model", "vit_b32")
        model_cfg.image_size = size
        num_classes = 1000 if smoke else 12_500  # 1M classes over 80 GPUs: one rank's centers
        torch.manual_seed(0)
        model = build_model(model_cfg).to(device)
        pfc = build_partial_fc(_cfg("loss", "mlcd"), num_classes, model.embed_dim, seed=0).to(device)
        opts = build_backbone_optimizer(model, _cfg("optim", "adamw")), build_center_optimizer(pfc, _cfg("optim", "adamw"))
        labels = torch.randint(0, num_classes, (batch, 8), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        counter = iter(range(10**6))
        t_step = timed(lambda: train_step(model, pfc, *opts, iter([(got, labels)]), next(counter), 1, 1.0, autocast),
                       2 if smoke else 10)
        del model, pfc, opts
        out.update(train_step_images_per_s=batch / t_step, train_step_seconds=t_step, decode_seconds=t_decode,
                   gpu_path_decode_plus_step_images_per_s=batch / (t_decode + t_step),
                   cpu_path_feeds_fraction_of_step=min(per_worker * max(workers, 1) * t_step / batch, 1.0))
        # both loaders end to end over shards (workers read the tars; decode=gpu decodes here, on the GPU)
        m = shards_from_folder(tmp / "imgs", tmp / "shards", prefix="d", max_per_shard=max(n // 8, 1))
        urls = [str(tmp / "shards" / r["name"]) for r in m["shards"]]
        for u in urls:
            keys = [r["__key__"] for r in iter_samples(u, None)]
            write_shard_labels(tmp / "labels", Path(u).stem, keys, np.zeros((len(keys), 8), np.int32),
                               np.ones((len(keys), 8), np.float32))
        for decode in ("cpu", "gpu"):
            loader = make_train_loader(urls, str(tmp / "labels"), batch_size=batch, num_workers=workers,
                                       image_size=size, seed=0, resampled=False, shuffle_buffer=256, decode=decode,
                                       device=device)
            t0, seen = time.perf_counter(), 0
            for x, _ in loader:
                seen += len(x)
            sync()
            out[f"loader_{decode}_images_per_s"] = seen / (time.perf_counter() - t0)
        # odd and broken images: skipped or kept alike on both paths
        odd = _odd_images()
        with wds.TarWriter(str(tmp / "odd.tar")) as sink:
            for key, data in odd.items():
                sink.write({"__key__": key, "jpg": data})
        write_shard_labels(tmp / "odd_labels", "odd", list(odd), np.arange(len(odd))[:, None].astype(np.int32),
                           np.ones((len(odd), 1), np.float32))
        kept, bad = {}, {}
        for decode in ("cpu", "gpu"):
            loader = make_train_loader(str(tmp / "odd.tar"), str(tmp / "odd_labels"), batch_size=4, num_workers=0,
                                       image_size=size, seed=0, resampled=False, decode=decode, device=device)
            kept[decode] = sorted(list(odd)[int(i)] for _, y in loader for i in y[:, 0])
            bad[decode] = loader.skip_counts()["bad_image"]
        out.update(odd_kept_cpu=kept["cpu"], odd_kept_gpu=kept["gpu"], odd_bad_image=bad, decoder_stats=decoder.stats)
    lead = ("gpu_path_decoder_images_per_s", "cpu_path_images_per_s_all_workers", "train_step_images_per_s",
            "gpu_path_decode_plus_step_images_per_s", "same_box_mean_abs_diff")  # the summary line's figures
    out = {**{k: out[k] for k in lead}, **out}
    out["ok"] = (out["same_box_mean_abs_diff"] <= DECODE_MEAN_ABS and not out["same_box_failed"]
                 and kept["cpu"] == kept["gpu"] and bad["cpu"] == bad["gpu"] and bad["cpu"] + len(kept["cpu"]) == len(odd))
    return out


CHECKS = {"bf16_step": check_bf16_step, "attention": check_attention, "faiss": check_faiss,
          "features": check_features_and_probe, "trainer": check_trainer, "throughput": check_throughput,
          "decode": check_decode}


def _summary(name: str, r: dict) -> str:
    keys = [k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("ok", "seconds")][:5]
    figures = ", ".join(f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in keys)
    return f"  {'PASS' if r.get('ok') else 'FAIL'}  {name:<11} {r.get('seconds', 0):6.1f} s  {figures}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (tests); no thresholds")
    ap.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run only these checks")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check. "
              "Run it on the GPU machine; `--smoke` exercises the script on the CPU.")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
               "torch": torch.__version__, "smoke": args.smoke, "checks": {}}
    print(f"gpu-check on {results['device']}, torch {torch.__version__}")
    for name in args.only or CHECKS:
        if name in CUDA_ONLY and device.type != "cuda" and not args.only:
            print(f"  SKIP  {name:<11} needs CUDA (`--smoke --only {name}` runs it on the CPU)", flush=True)
            continue
        t0 = time.time()
        try:
            r = CHECKS[name](device, args.smoke)
        except Exception as e:  # one broken check must not hide the others' results
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        r["seconds"] = time.time() - t0
        if args.smoke:
            r["ok"] = "error" not in r  # toy sizes on the CPU: the script runs, the thresholds do not apply
        results["checks"][name] = r
        print(_summary(name, r) + (f"  {r['error'][:300]}" if "error" in r else ""), flush=True)
    results["ok"] = all(r["ok"] for r in results["checks"].values())
    fileio.write_json(args.out, results)
    print(f"{'all checks passed' if results['ok'] else 'SOME CHECKS FAILED'}; wrote {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
