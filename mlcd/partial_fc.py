"""PartialFC for multi-label MLCD: class centers sharded over ranks, negative classes sampled each step.

Data flow of one forward (every rank runs the same collectives in the same order, owned positives or not):

  1. all_gather of (b, l, input-is-bad) from every rank (one tiny collective): bad labels on any rank make every
     rank raise ValueError instead of leaving the others blocked in the next collective. The local batch is then
     padded to the largest b and l (embedding rows of zeros, labels -1: padded rows are invalid samples, out of
     the mean, zero gradient), so uneven local batches and label widths are supported.
  2. embeddings [b, D] -> [B, D] with ONE all_gather_into_tensor; labels [b, l] -> [B, l] with another.
  3. sampling on this rank's shard (`sample`): every class that is a positive of ANY sample of the global batch and
     lives here is kept; negatives are drawn uniformly without replacement from the other local classes with a
     per-rank generator seeded from (seed, rank, step). Budget rule (loss.budget):
        ratio (default): n_neg = round(r * (n_local - |P|))   -- r of the NON-positive local classes, matching the
                         paper's |Omega'_n| = r * |Omega_n|; all positives come on top, so r keeps its meaning
                         even when a large multi-label batch has more positives than r * n_local.
        total          : n_neg = max(0, round(r * n_local) - |P|)  -- insightface's fixed per-rank width including
                         the positives; positives only when they exceed it.
     round() is round-half-up. The sampled rows are a sorted index; labels are remapped into it by searchsorted.
  4. cosines of normalised embeddings and sampled centers (bf16 autocast GEMM on GPU), then the loss in fp32 with
     two fused [B, 2] all-reduces (mlcd/loss.py). The returned loss is the global-batch mean, identical on all ranks.

Backward and DDP: the embedding all-gather's backward is a reduce_scatter (SUM) of d(loss)/d(gathered embeddings),
so each rank receives the exact gradient of the GLOBAL loss w.r.t. its own local embeddings, summed over the
center shards. DDP then AVERAGES the backbone gradients over the W ranks, so with `ddp_average=True` (default) that
gradient is multiplied by W first: the backbone .grad after DDP's all-reduce equals d(global mean loss)/d(theta)
exactly. Use ddp_average=False if the backbone gradients are SUMMED across ranks instead (e.g. a hand-written
all-reduce without division).

Update semantics (sparse): the sampled rows are read (and L2-normalised) by `_NormalizedRows`, whose gradient is a
sparse COO tensor whose rows are exactly the rows sampled since the last zero_grad (the union over gradient-
accumulation micro-steps). `mlcd.train.optim.SparseRowAdamW` AdamW-updates only those rows, with a
per-row step count for bias correction, and leaves every other row and its moments bit-identical: no weight decay
or momentum drift on classes that were not sampled (unlike insightface PartialFC_V2's dense gradient).
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mlcd import dist as mdist
from mlcd.loss import KINDS, MARGIN, MARGIN_TYPES, SCALE, label_error, margin_lse, prepare_labels

BUDGETS = ("ratio", "total")


@dataclass(frozen=True)
class ShardSpec:
    """Contiguous class blocks: rank r holds C//W + (r < C%W) classes starting at C//W*r + min(r, C%W)."""

    num_classes: int
    world_size: int

    def n_local(self, rank: int) -> int:
        return self.num_classes // self.world_size + int(rank < self.num_classes % self.world_size)

    def start(self, rank: int) -> int:
        return self.num_classes // self.world_size * rank + min(rank, self.num_classes % self.world_size)

    def bounds(self, rank: int) -> tuple[int, int]:
        return self.start(rank), self.n_local(rank)

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "world_size": self.world_size,
                "starts": [self.start(r) for r in range(self.world_size)],
                "sizes": [self.n_local(r) for r in range(self.world_size)]}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardSpec":
        spec = cls(int(d["num_classes"]), int(d["world_size"]))
        if "starts" in d and (d["starts"] != spec.to_dict()["starts"] or d["sizes"] != spec.to_dict()["sizes"]):
            raise ValueError(f"shard table {d} does not follow the contiguous-block rule for C={spec.num_classes}, "
                             f"W={spec.world_size}")
        return spec


def sample_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit generator seed from (seed, rank, step): reproducible on resume, uncorrelated across ranks and steps."""
    return mdist.derive_seed("pfc", int(seed), int(rank), int(step))


def budget(n_local: int, n_pos: int, ratio: float, rule: str) -> int:
    """How many negatives to sample on a shard (see module docstring)."""
    if rule == "ratio":
        return min(n_local - n_pos, int(math.floor(ratio * (n_local - n_pos) + 0.5)))
    return max(0, min(n_local, int(math.floor(ratio * n_local + 0.5))) - n_pos)


INIT_BLOCK = 65536  # rows per initialisation block


def init_rows(start: int, n: int, dim: int, seed: int, std: float = 0.01) -> torch.Tensor:
    """Rows [start, start + n) of the initial [C, D] center matrix, N(0, std^2). Row i depends on (seed, i) only,
    through fixed blocks of INIT_BLOCK rows each drawn from its own generator: every world size starts from the
    same matrix, and a rank draws only the blocks its rows fall in (never the whole matrix)."""
    out = torch.empty(n, dim)
    for block in range(start // INIT_BLOCK, (start + n - 1) // INIT_BLOCK + 1 if n else 0):
        lo = block * INIT_BLOCK
        g = torch.Generator().manual_seed(mdist.derive_seed("centers", int(seed), block))
        rows = torch.normal(0.0, std, (INIT_BLOCK, dim), generator=g)
        a, b = max(start, lo), min(start + n, lo + INIT_BLOCK)
        out[a - start:b - start] = rows[a - lo:b - lo]
    return out


def check_loss_settings(kind, margin_type, sample_ratio, budget, slots=None) -> None:
    """Refuse a bad loss setting with the key named (train.py calls this before any work)."""
    for key, value, allowed in (("kind", kind, KINDS), ("margin_type", margin_type, MARGIN_TYPES),
                                ("budget", budget, BUDGETS)):
        if value not in allowed:
            raise ValueError(f"loss.{key}={value!r}: must be one of {allowed}")
    if not 0 <= sample_ratio <= 1:
        raise ValueError(f"loss.sample_ratio={sample_ratio}: must be in [0, 1]")
    if slots is not None and (kind != "per_slot" or slots < 1):
        raise ValueError(f"loss.slots={slots}: a positive number of label slots, for loss kind per_slot only")


class _GatherRows(torch.autograd.Function):
    """all_gather_into_tensor forward; reduce_scatter(SUM) * grad_scale backward (see module docstring)."""

    @staticmethod
    def forward(ctx, x, world_size, grad_scale):
        ctx.grad_scale = grad_scale
        return _gather_plain(x, world_size)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed
        reduce_scatter(out, grad.contiguous(), op=dist.ReduceOp.SUM)
        if ctx.grad_scale != 1:
            out.mul_(ctx.grad_scale)
        return out, None, None


class _NormalizedRows(torch.autograd.Function):
    """weight[index] / ||weight[index]|| (as F.normalize) with a sparse COO gradient over the `index` rows only.

    One [k, D] copy is kept for backward (F.embedding + F.normalize keep two); `index` must be sorted and unique.
    """

    @staticmethod
    def forward(ctx, weight, index):
        rows = weight.index_select(0, index)
        inv = rows.norm(dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        out = rows.mul_(inv)
        ctx.save_for_backward(index, out, inv)
        ctx.shape = weight.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        index, out, inv = ctx.saved_tensors
        grad = torch.addcmul(grad, out, (grad * out).sum(1, keepdim=True), value=-1).mul_(inv)
        return torch.sparse_coo_tensor(index[None], grad, ctx.shape, is_coalesced=True, check_invariants=False), None


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, values) of a sparse row gradient with duplicate rows summed. One micro-step's gradient is already
    sorted and unique (autograd just drops the flag when it stores it), so coalesce()'s sort is skipped then."""
    rows = grad._indices()[0]
    if grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all()):
        return rows, grad._values()
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def _gather_plain(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """all_gather_into_tensor (renamed all_gather_single in recent torch) into one [W*b, ...] buffer."""
    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x.contiguous())
    return out


class PartialFC(torch.nn.Module):
    """This rank's block of the [C, D] class-center matrix and the sampled margin loss over the global batch."""

    def __init__(self, num_classes: int, embed_dim: int, kind: str = "mlcd", scale: float = SCALE,
                 margin: float = MARGIN, margin_type: str = "arcface", sample_ratio: float = 0.1,
                 budget: str = "ratio", seed: int = 0, ddp_average: bool = True, slots: int | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        check_loss_settings(kind, margin_type, sample_ratio, budget, slots)
        self.slots = slots  # per_slot: keep this many random labels of each sample per step (None: all)
        self.kind, self.scale, self.margin, self.margin_type = kind, float(scale), float(margin), margin_type
        self.sample_ratio, self.budget, self.seed, self.ddp_average = float(sample_ratio), budget, int(seed), ddp_average
        # rank/world_size overrides build one shard of a larger world in a single process (tests, offline tools);
        # forward() then refuses to run without a matching process group.
        self.rank = mdist.rank() if rank is None else rank
        self.shard_spec = ShardSpec(num_classes, mdist.world_size() if world_size is None else world_size)
        self.start, self.n_local = self.shard_spec.bounds(self.rank)
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.weight = torch.nn.Parameter(init_rows(self.start, self.n_local, embed_dim, seed))
        self.last_index = None  # the sampled local rows of the last forward (for logging/tests)
        # the [B, n] cosine GEMM in bf16 (fp32 accumulate; the margin and log-sum-exp stay fp32): None = on CUDA.
        # The trainer sets it from train.precision, so precision=fp32 on a GPU is fp32 throughout.
        self.bf16_cosines: bool | None = None

    def extra_repr(self) -> str:
        return (f"classes {self.start}..{self.start + self.n_local} of {self.num_classes}, rank {self.rank}/"
                f"{self.shard_spec.world_size}, dim {self.embed_dim}, kind={self.kind}, s={self.scale}, "
                f"m={self.margin} ({self.margin_type}), r={self.sample_ratio} ({self.budget})")

    # ---- sampling -------------------------------------------------------------------------------------------
    def sample(self, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, pos_cols) for global labels [B, l]: the sorted local rows used this step, and each label's column
        in that index (-1: padding or held by another rank)."""
        start, n = self.start, self.n_local
        device = self.weight.device
        owned = (labels >= start) & (labels < start + n)
        local = torch.where(owned, labels - start, 0)
        if (self.sample_ratio >= 1 and self.budget == "ratio") or n == 0:
            index = torch.arange(n, device=device)
            return index, torch.where(owned, local, -1)
        positives = torch.unique(local[owned])                          # sorted
        n_neg = budget(n, positives.numel(), self.sample_ratio, self.budget)
        gen = torch.Generator(device=device)
        gen.manual_seed(sample_seed(self.seed, self.rank, step))
        score = torch.rand(n, generator=gen, device=device)             # top-k of iid uniforms = uniform subset
        score[positives] = 2.0                                          # above every draw: always kept
        index = score.topk(positives.numel() + n_neg, sorted=False).indices.sort().values
        return index, torch.where(owned, torch.searchsorted(index, local), -1)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        """Global-batch mean loss (the same value on every rank). `step` seeds the negative sample."""
        error = label_error(labels, self.num_classes)
        if error is None and (embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim
                              or embeddings.shape[0] != labels.shape[0]):
            error = (f"embeddings must be [batch, {self.embed_dim}] matching labels {tuple(labels.shape)}, "
                     f"got {tuple(embeddings.shape)}")
        world = self.shard_spec.world_size
        if world == 1 and error is not None:
            raise ValueError(error)
        if world > 1:
            if not (mdist.is_dist() and dist.get_world_size() == world and dist.get_rank() == self.rank):
                raise RuntimeError(f"PartialFC was built for rank {self.rank} of {world} but the process group is "
                                   f"{'absent' if not mdist.is_dist() else f'rank {dist.get_rank()} of {dist.get_world_size()}'}")
            # (b, l, bad) from every rank: a bad input on one rank makes EVERY rank raise here, none hangs later.
            b, l = labels.shape if error is None else (0, 0)
            info = _gather_plain(torch.tensor([[b, l, int(error is not None)]], device=self.weight.device), world)
            if bool(info[:, 2].any()):
                bad_ranks = info[:, 2].nonzero().flatten().tolist()
                raise ValueError(f"rank {self.rank}: {error}" if error is not None else
                                 f"invalid PartialFC input on rank(s) {bad_ranks} (see that rank's error)")
            b_max, l_max = info[:, :2].amax(0).tolist()
            labels = F.pad(labels, (0, l_max - l, 0, b_max - b), value=-1)
            embeddings = F.pad(embeddings, (0, 0, 0, b_max - b))
            embeddings = _GatherRows.apply(embeddings, world, float(world) if self.ddp_average else 1.0)
            labels = _gather_plain(labels, world)
        if self.slots is not None and self.slots < labels.shape[1]:  # the same draw on every rank: global labels
            gen = torch.Generator(device=labels.device).manual_seed(mdist.derive_seed("slots", self.seed, int(step)))
            keep = torch.rand(labels.shape, generator=gen, device=labels.device).argsort(1)[:, :self.slots]
            labels = labels.gather(1, keep)
        labels, valid = prepare_labels(labels, self.kind)
        index, pos_cols = self.sample(labels, step)
        self.last_index = index

        centers = _NormalizedRows.apply(self.weight, index)
        embeddings = F.normalize(embeddings.float(), dim=1)
        use_bf16 = embeddings.device.type == "cuda" if self.bf16_cosines is None else self.bf16_cosines
        with torch.autocast(embeddings.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            cos = F.linear(embeddings, centers)
        return margin_lse(cos, pos_cols, valid, self.kind, self.scale, self.margin, self.margin_type,
                          distributed=world > 1)

    # ---- clipping, checkpoints ---------------------------------------------------------------------
    def grad_sq_norm(self) -> torch.Tensor:
        """Squared norm of this shard's gradient (all-reduce SUM it with the others' for a global clip norm)."""
        g = self.weight.grad
        if g is None:
            return torch.zeros((), device=self.weight.device)
        values = sparse_rows(g)[1] if g.is_sparse else g
        return values.float().pow(2).sum()

    def get_extra_state(self) -> dict:
        return {"num_classes": self.num_classes, "world_size": self.shard_spec.world_size, "rank": self.rank,
                "start": self.start, "n_local": self.n_local}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"center shard mismatch: the state is {state} but this module is {mine}; "
                             "use mlcd.train.checkpoint.reshard to change the world size")


def build_partial_fc(loss_cfg, num_classes: int, embed_dim: int, seed: int) -> PartialFC:
    """From a configs/train/loss/*.yaml mapping."""
    get = loss_cfg.get
    return PartialFC(num_classes, embed_dim, kind=get("kind", "mlcd"), scale=get("scale", SCALE),
                     margin=get("margin", MARGIN), margin_type=get("margin_type", "arcface"),
                     sample_ratio=get("sample_ratio", 0.1), budget=get("budget", "ratio"), seed=seed,
                     ddp_average=get("ddp_average", True), slots=get("slots", None))
