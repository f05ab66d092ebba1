"""Run by tests/test_partial_fc.py under `torchrun --nproc_per_node=W` (gloo, CPU): one launch checks several
things and writes what each rank saw to OUT/rank{r}.pt; the test compares it with world size 1 and a dense
float64 reference. Inputs are built by `case_inputs`, which the test imports too.

Cases: A (r = 1, four loss variants, DDP-wrapped linear backbone, uneven local batches and label widths),
B (no positives on some ranks), F (2 classes: at W = 3 one rank holds no class at all), C (r < 1 sampled), D (a few sparse-AdamW steps, then state dicts for reshard),
E (an invalid label on one rank: every rank must raise, none may hang).
"""
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from mlcd import dist
from mlcd.partial_fc import PartialFC, ShardSpec
from mlcd.train.optim import SparseRowAdamW

C, D, DIN = 11, 6, 5          # 11 classes: not divisible by 2 or 3
LOSS_VARIANTS = [("mlcd", "arcface"), ("mlcd", "cosface"), ("mlc", "arcface"), ("single", "arcface"),
                 ("per_slot", "arcface"), ("per_slot", "cosface")]
LABELS = [[0, 5, -1], [3, 3, 9], [-1, -1, -1], [10, 2, 7], [6, -1, 6], [1, 4, 8], [2, -1, -1]]
LABELS_LOW = [[0, 1, -1], [3, 3, 2], [-1, -1, -1], [1, 2, 0], [3, -1, 3], [0, -1, -1], [2, 1, -1]]  # all < 4
OPT = dict(lr=0.05, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)


def case_inputs(seed: int = 0):
    """Global inputs shared by the worker and the test: X [7, DIN], linear weight/bias, centers [C, D]."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(7, DIN, generator=g), "lin_w": torch.randn(D, DIN, generator=g) * 0.5,
            "lin_b": torch.randn(D, generator=g) * 0.1, "centers": torch.randn(C, D, generator=g),
            "labels": torch.tensor(LABELS), "labels_low": torch.tensor(LABELS_LOW)}


def local_rows(world: int, rank: int) -> slice:
    """Uneven local batches: 7 samples split 4/3 or 3/2/2."""
    start, n = ShardSpec(7, world).bounds(rank)
    return slice(start, start + n)


def make_pfc(inp, kind="mlcd", margin_type="arcface", ratio=1.0, num_classes=C) -> PartialFC:
    pfc = PartialFC(num_classes, D, kind=kind, margin_type=margin_type, sample_ratio=ratio, seed=7)
    with torch.no_grad():
        pfc.weight.copy_(inp["centers"][pfc.start:pfc.start + pfc.n_local])
    return pfc


def make_backbone(inp):
    lin = torch.nn.Linear(DIN, D)
    with torch.no_grad():
        lin.weight.copy_(inp["lin_w"])
        lin.bias.copy_(inp["lin_b"])
    return lin, DDP(lin)


def one_step(inp, pfc, labels, rank, world, step=0, extra_col=False):
    lin, ddp = make_backbone(inp)
    rows = local_rows(world, rank)
    local_labels = labels[rows]
    if extra_col and rank == 0:  # a wider label tensor on one rank: padded to the widest
        local_labels = torch.cat([local_labels, torch.full((local_labels.shape[0], 1), -1)], 1)
    emb = ddp(inp["x"][rows])
    emb.retain_grad()
    loss = pfc(emb, local_labels, step)
    loss.backward()
    return {"loss": loss.detach(), "emb_grad": emb.grad / world, "lin_w_grad": lin.weight.grad.clone(),
            "lin_b_grad": lin.bias.grad.clone(), "center_grad": pfc.weight.grad.to_dense(),
            "grad_sq_norm": pfc.grad_sq_norm(), "index": pfc.last_index.clone(), "start": pfc.start}


def main(out_dir: str):
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    inp = case_inputs()
    res = {}
    for kind, margin_type in LOSS_VARIANTS:                                      # A
        res[f"A/{kind}/{margin_type}"] = one_step(inp, make_pfc(inp, kind, margin_type), inp["labels"], rank, world,
                                                  extra_col=True)
    res["B"] = one_step(inp, make_pfc(inp), inp["labels_low"], rank, world)       # B: ranks >= 1 own no positive
    res["F"] = one_step(inp, make_pfc(inp, num_classes=2), inp["labels_low"].clamp(max=1), rank, world)  # F
    res["C"] = one_step(inp, make_pfc(inp, ratio=0.5), inp["labels_low"], rank, world, step=5)   # C

    for ratio in (1.0, 0.5):                                                      # D
        pfc = make_pfc(inp, ratio=ratio)
        opt = SparseRowAdamW(pfc.weight, **OPT)
        lin, ddp = make_backbone(inp)
        for step in range(3):
            labels = inp["labels" if ratio == 1 else "labels_low"].roll(step, 0)[local_rows(world, rank)]
            pfc(ddp(inp["x"][local_rows(world, rank)]), labels, step).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        res[f"D/{ratio}"] = {"shard": pfc.state_dict(), "optim": opt.state_dict()}

    pfc = make_pfc(inp)                                                           # E
    labels = inp["labels"][local_rows(world, rank)].clone()
    if rank == world - 1:
        labels[1, 2] = C
    try:
        pfc(inp["x"][local_rows(world, rank)] @ inp["lin_w"].t(), labels, 0)
        res["E"] = "no error"
    except ValueError as e:
        res["E"] = str(e)
    dist.barrier()  # still in step: every rank raised at the same collective

    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
