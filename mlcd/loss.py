"""The MLCD loss (paper Eq. 5) and the paper's two baselines, over cosine logits that may be split across ranks.

Per sample, with positives P (its own labels, each counted once), negatives N (every other column present, which
includes the OTHER samples' positives), scale s and a margin phi on the positives only:

    mlcd    log(1 + sum_{i in P} exp(-s*phi(c_i))) + log(1 + sum_{j in N} exp(s*c_j))     Eq. 5
    mlc     log(1 + sum_{j in N} exp(s*c_j) * sum_{i in P} exp(-s*phi(c_i)))             Eq. 4 ("vanilla MLC")
    single  -log softmax(target) over all columns, target = the first label with the margin  (UNICOM / ArcFace CE)
    per_slot  the mean over the sample's labels t of `single` with target t; the OTHER positives stay in the
            denominator as negatives (OneVision-Encoder's multi-label PartialFC, the public baseline from the same
            group; computed by repeating each cosine row once per label slot)

    phi(c) = cos(theta + m) = c*cos(m) - sqrt(1 - c^2)*sin(m)   (arcface, default)   or   c - m   (cosface)

The loss is the mean over samples that have at least one valid label (per_slot: over valid label slots); all-padding
rows are left out of the mean.

Every log-sum-exp is computed in fp32 from a per-row shift M: M = max over its entries (the explicit zero logit is an
entry for mlcd), so nothing overflows at s = 64. When the columns are split over ranks (PartialFC), each rank holds
a slice of every row: the shifts are combined with ONE all-reduce(MAX) of a [B, 2] tensor and the sums with ONE
all-reduce(SUM) of a [B, 2] tensor (column 0: positive term, column 1: negative term; for `single`, column 0 carries
the target logit and column 1 the softmax sum). After that every gradient is local, so backward needs no
communication and no host sync.

ArcFace at c = +-1: the forward value uses the exact sqrt(max(1 - c^2, 0)); the gradient
phi'(c) = cos(m) + c*sin(m)/sqrt(1 - c^2) uses sqrt(max(1 - c^2, ARC_EPS)), so it stays finite (at most
cos(m) + sin(m)/sqrt(ARC_EPS) ~ 296 for m = 0.3) instead of the infinite slope that made fp16 ArcFace runs go NaN.
Cosines are clamped to [-1, 1] (rounding can leave |c| slightly above 1); the clamp is treated as the identity in
backward. No theta + m > pi fallback is applied, as in UNICOM.
"""
import math

import torch
import torch.distributed as dist

KINDS = ("mlcd", "mlc", "single", "per_slot")
MARGIN_TYPES = ("arcface", "cosface")
ARC_EPS = 1e-6
SCALE, MARGIN = 64.0, 0.3  # defaults: s from RICE §4.1 (same authors; the MLCD paper does not state it), m App. A.1.2


def label_error(labels, num_classes: int) -> str | None:
    """Why `labels` is not int64 [b, l] with entries in [0, num_classes) or -1 (padding); None when it is fine.

    Costs one host sync (a bool); it is what keeps a bad label from silently becoming a huge constant loss.
    """
    if not isinstance(labels, torch.Tensor):
        return f"labels must be a torch.Tensor, got {type(labels).__name__}"
    if labels.dtype != torch.int64:
        return f"labels must be int64 [batch, num_labels] with -1 padding, got dtype {labels.dtype}"
    if labels.ndim != 2:
        return f"labels must be 2-D [batch, num_labels] with -1 padding, got shape {tuple(labels.shape)}"
    bad = (labels < -1) | (labels >= num_classes)
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        return (f"invalid label {int(labels[row, col])} at [{row}, {col}] ({int(bad.sum())} invalid in total): "
                f"labels must be in [0, {num_classes}) or -1 for padding")
    return None


def check_labels(labels, num_classes: int) -> None:
    """Raise ValueError (naming the offending value and position) unless `labels` is valid; see label_error."""
    msg = label_error(labels, num_classes)
    if msg is not None:
        raise ValueError(msg)


def dedupe_labels(labels: torch.Tensor) -> torch.Tensor:
    """Replace repeats of a label within a row by -1, keeping the first occurrence (order is kept)."""
    same = labels[:, :, None] == labels[:, None, :]                     # [B, l, l]
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)                # j < i
    dup = (same & earlier).any(-1) & (labels >= 0)
    return labels.masked_fill(dup, -1)


def margin(c: torch.Tensor, m: float, margin_type: str) -> torch.Tensor:
    """phi(c): the margined positive cosine."""
    if margin_type == "cosface":
        return c - m
    return c * math.cos(m) - (1 - c * c).clamp_min(0).sqrt() * math.sin(m)


def margin_grad(c: torch.Tensor, m: float, margin_type: str) -> torch.Tensor:
    """phi'(c), finite at c = +-1 (see module docstring)."""
    if margin_type == "cosface":
        return torch.ones_like(c)
    return math.cos(m) + c * math.sin(m) / (1 - c * c).clamp_min(ARC_EPS).sqrt()


def _all_reduce(t: torch.Tensor, op, distributed: bool) -> torch.Tensor:
    if distributed:
        dist.all_reduce(t, op=op)
    return t


class _MarginLSE(torch.autograd.Function):
    """The loss from this rank's cosine slice; see the module docstring. Saves one [B, n] fp32 buffer for backward
    and turns it into the gradient in place, so the graph supports a single backward (no retain_graph reuse)."""

    @staticmethod
    def forward(ctx, cos, pos_cols, valid, kind, scale, m, margin_type, distributed):
        B, n = cos.shape
        has = pos_cols >= 0                                             # [B, l] label present in this slice
        col = torch.where(has, pos_cols, n)                             # column n is a dummy that absorbs the rest
        # buf[:, :n] = s*c (later exp, then the gradient); the dummy column lets scatters skip absent labels.
        buf = cos.new_empty((B, n + 1), dtype=torch.float32)
        buf[:, :n] = cos
        buf[:, :n].clamp_(-1, 1)
        c_pos = buf.gather(1, col).clamp_(-1, 1)                        # [B, l]; garbage where not `has`
        c_pos = torch.where(has, c_pos, 0.0)
        z_pos = scale * margin(c_pos, m, margin_type)                   # margined positive logits
        buf[:, :n].mul_(scale)
        neg_inf = torch.full_like(z_pos, -math.inf)
        buf[:, n] = -math.inf
        if kind == "single":                                            # the target column holds its margined logit
            buf.scatter_(1, col, torch.where(has, z_pos, neg_inf))
            zp = torch.zeros_like(z_pos)
        else:                                                           # own positives leave the negative term
            buf.scatter_(1, col, neg_inf)
            zp = torch.where(has, -z_pos, neg_inf)                      # positive-term entries are -s*phi(c)

        floor = 0.0 if kind == "mlcd" else -math.inf                   # mlcd: the zero logit is an entry
        M = torch.stack([zp.amax(1) if kind != "single" else torch.zeros(B, device=cos.device),
                         buf.amax(1)], 1).clamp_min(floor)              # [B, 2]
        _all_reduce(M, dist.ReduceOp.MAX, distributed)
        M = torch.where(torch.isfinite(M), M, 0.0)                      # rows with no entries anywhere
        ep = (zp - M[:, :1]).exp_()                                     # [B, l]
        buf.sub_(M[:, 1:]).exp_()                                       # [B, n+1] (dummy column -> 0)
        if kind == "single":
            S = torch.stack([torch.where(has, z_pos, 0.0).sum(1), buf.sum(1)], 1)
        else:
            S = torch.stack([ep.sum(1), buf.sum(1)], 1)
        _all_reduce(S, dist.ReduceOp.SUM, distributed)

        if kind == "mlcd":
            S = S + torch.exp(-M)                                       # the explicit zero logit
            per_sample = (S.log() + M).sum(1)
            coef = torch.ones_like(S)                                   # dL/d(lse) of each term
        elif kind == "mlc":
            lse = S.log() + M                                           # -inf when a term has no entries
            t = lse.sum(1)
            per_sample = torch.nn.functional.softplus(t)
            coef = torch.sigmoid(t)[:, None].expand(B, 2)
        else:
            per_sample = S[:, 1].log() + M[:, 1] - S[:, 0]
            coef = torch.ones_like(S)
        n_valid = valid.sum().clamp_min(1)
        loss = torch.where(valid, per_sample, 0.0).sum() / n_valid

        ctx.save_for_backward(buf, ep, c_pos, has, col, S, M, coef, valid, n_valid)
        ctx.cfg = (kind, scale, m, margin_type, n, cos.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        buf, ep, c_pos, has, col, S, M, coef, valid, n_valid = ctx.saved_tensors
        kind, scale, m, margin_type, n, dtype = ctx.cfg
        w = torch.where(valid, grad_loss / n_valid, 0.0)                # d(loss)/d(per-sample loss)
        dphi = scale * margin_grad(c_pos, m, margin_type)               # d(s*phi)/dc
        Sn = S[:, 1].clamp_min(torch.finfo(S.dtype).tiny)
        grad = buf.mul_((scale * w * coef[:, 1] / Sn)[:, None])         # negatives (single: all columns)
        if kind == "single":
            p_t = torch.exp(scale * margin(c_pos, m, margin_type) - M[:, 1:]) / Sn[:, None]  # softmax at the target
            g_t = (p_t - 1) * dphi * w[:, None]                         # replaces s*p_t*w written above
            grad.scatter_(1, col, torch.where(has, g_t, 0.0))
        else:
            Sp = S[:, 0].clamp_min(torch.finfo(S.dtype).tiny)
            g_p = -dphi * ep * (w * coef[:, 0] / Sp)[:, None]           # d(-s*phi)/dc = -dphi
            grad.scatter_add_(1, col, torch.where(has, g_p, 0.0))
        return grad[:, :n].to(dtype), None, None, None, None, None, None, None


def margin_lse(cos, pos_cols, valid, kind="mlcd", scale=SCALE, m=MARGIN, margin_type="arcface", distributed=False):
    """The loss from cosines [B, n] of this rank's columns.

    pos_cols: int64 [B, l], the column in `cos` of each of the sample's positives, -1 where the label is padding, a
    duplicate or held by another rank. valid: bool [B], the sample has a label (the same on every rank).
    distributed: the rows are split by column over the default process group (two [B, 2] all-reduces).
    """
    if kind not in KINDS:
        raise ValueError(f"loss kind must be one of {KINDS}, got {kind!r}")
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}")
    if kind == "per_slot":  # one `single` row per (sample, label slot); valid is per slot [B, l] here
        slots = pos_cols.shape[1]
        cos, pos_cols, valid = cos.repeat_interleave(slots, 0), pos_cols.reshape(-1, 1), valid.reshape(-1)
        kind = "single"
    return _MarginLSE.apply(cos, pos_cols, valid, kind, float(scale), float(m), margin_type, distributed)


def prepare_labels(labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels used by the loss, valid samples or, for per_slot, valid slots): duplicates dropped; `single` keeps
    the first label only."""
    labels = labels[:, :1] if kind == "single" else dedupe_labels(labels)
    return labels, (labels >= 0) if kind == "per_slot" else (labels >= 0).any(1)


def dense_margin_loss(embeddings, centers, labels, kind="mlcd", scale=SCALE, m=MARGIN, margin_type="arcface"):
    """Single process, all classes present: L2-normalise, cosine logits, then the loss. For small problems and tests."""
    check_labels(labels, centers.shape[0])
    labels, valid = prepare_labels(labels, kind)
    e = torch.nn.functional.normalize(embeddings.float(), dim=1)
    w = torch.nn.functional.normalize(centers.float(), dim=1)
    return margin_lse(e @ w.t(), labels, valid, kind, scale, m, margin_type)


def reference_loss(emb, centers, labels, kind="mlcd", s=SCALE, m=MARGIN, margin_type="arcface", classes=None):
    """The paper's equations written out in plain autograd, one sample at a time: the oracle the fused
    `_MarginLSE` is tested against (call it in float64; plain sums of exponentials, no shift, e^64 fits).

    classes: the class ids present in the classifier (default all, e.g. PartialFC's sampled columns); a sample's
    negatives are the present classes that are not among its own labels.
    """
    e = emb / emb.norm(dim=1, keepdim=True)
    w = centers / centers.norm(dim=1, keepdim=True)
    cos = e @ w.t()
    present = list(range(centers.shape[0])) if classes is None else sorted(int(c) for c in classes)

    def phi(c):
        return torch.cos(torch.acos(c) + m) if margin_type == "arcface" else c - m

    def softmax_ce(row, t):                                             # margin on the target t only
        others = s * row[[j for j in present if j != t]]
        return torch.log(torch.exp(s * phi(row[t])) + torch.exp(others).sum()) - s * phi(row[t])

    losses = []
    for row, labs in zip(cos, labels.tolist()):
        own = [x for x in ([labs[0]] if kind == "single" else sorted(set(labs))) if x >= 0]
        if not own:
            continue                                                    # no label: out of the mean
        pos = s * phi(row[own])                                         # s * phi(c_i), i in P
        neg = s * row[[j for j in present if j not in own]]             # s * c_j, j in N
        if kind == "mlcd":                                              # Eq. 5
            losses.append(torch.log(1 + torch.exp(-pos).sum()) + torch.log(1 + torch.exp(neg).sum()))
        elif kind == "mlc":                                             # Eq. 4
            losses.append(torch.log(1 + torch.exp(neg).sum() * torch.exp(-pos).sum()))
        elif kind == "single":
            losses.append(softmax_ce(row, own[0]))
        else:                                                           # per_slot: one softmax per label,
            losses.extend(softmax_ce(row, t) for t in own)              # the other labels among its negatives
    if not losses:
        return (emb.sum() + centers.sum()) * 0
    return torch.stack(losses).mean()
