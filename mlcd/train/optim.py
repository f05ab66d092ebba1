"""The optimizers and the schedule: backbone AdamW with CLIP-style parameter groups, a row-sparse AdamW for the
class centers, and the warm-up + cosine learning rate."""
import math

import torch

from mlcd.partial_fc import sparse_rows

# Tokens and position parameters are not weights of a linear map: decaying them only hurts.
_NO_DECAY_NAMES = ("class_embedding", "positional_embedding", "position_embedding", "class_pos_emb")


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Two groups: matrices decay; norms, biases, class/position tokens do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(t in name for t in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_backbone_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


class SparseRowAdamW(torch.optim.Optimizer):
    """AdamW for a center shard whose gradient is a sparse COO tensor: only the rows present in the gradient
    (sampled since the last step) are updated -- decoupled weight decay, moments and a per-row step count for bias
    correction, exactly torch.optim.AdamW's formula applied to each such row as if it had been stepped alone.
    Rows absent from the gradient, and their moments and step counts, are not touched. State (exp_avg, exp_avg_sq:
    [n, D]; row_step: int64 [n]) is allocated up front so a checkpoint always holds it."""

    chunk_elems = 2**24  # rows are updated in chunks of this many elements: bounded temporaries at 1M x 512

    def __init__(self, weight: torch.Tensor, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__([weight], dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps))
        self.state[weight] = {"exp_avg": torch.zeros_like(weight, memory_format=torch.contiguous_format),
                              "exp_avg_sq": torch.zeros_like(weight, memory_format=torch.contiguous_format),
                              "row_step": torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise TypeError("SparseRowAdamW expects the sparse row gradient produced by PartialFC.forward")
                all_rows, all_grads = sparse_rows(p.grad)
                st = self.state[p]
                row_step, state = st["row_step"], (p, st["exp_avg"], st["exp_avg_sq"])
                chunk = max(1, self.chunk_elems // max(1, p.shape[1]))
                # gathered w, m, v and the denominator, reused by every chunk (fresh CPU memory costs page faults)
                work = p.new_empty((4, min(chunk, all_rows.numel()), p.shape[1]))
                for i in range(0, all_rows.numel(), chunk):
                    rows, grad = all_rows[i:i + chunk], all_grads[i:i + chunk]
                    # rows are sorted and unique: a run of consecutive rows (every chunk at r = 1) is updated in
                    # place through views; other rows are gathered, updated and written back.
                    k, (first, last) = rows.numel(), rows[[0, -1]].tolist()
                    run = last - first + 1 == k
                    if run:
                        t, (w, m, v) = row_step[first:first + k], (x[first:first + k] for x in state)
                    else:
                        t = row_step.index_select(0, rows)
                        w, m, v = (torch.index_select(x, 0, rows, out=buf[:k]) for x, buf in zip(state, work))
                    t.add_(1)
                    w.mul_(1 - lr * wd)
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    td = t.double()[:, None]                               # exact per-row bias correction
                    step_size = (lr / (1 - beta1 ** td)).to(grad.dtype)
                    bc2_sqrt = (1 - beta2 ** td).sqrt().to(grad.dtype)
                    denom = torch.sqrt(v, out=work[3, :k]).div_(bc2_sqrt).add_(eps)
                    w.sub_(torch.div(m, denom, out=denom).mul_(step_size))  # w -= m / denom * step_size
                    if not run:
                        for x, new in zip((row_step, *state), (t, w, m, v)):
                            x.index_copy_(0, rows, new)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        p = self.param_groups[0]["params"][0]
        st = state_dict["state"].get(0, {})
        for key, shape in (("exp_avg", tuple(p.shape)), ("exp_avg_sq", tuple(p.shape)), ("row_step", (p.shape[0],))):
            if key not in st or tuple(st[key].shape) != shape:
                raise ValueError(f"center optimizer state: {key} is "
                                 f"{tuple(st[key].shape) if key in st else 'missing'}, expected {shape}")
        row_step = st["row_step"].to(device=p.device, dtype=torch.int64)
        super().load_state_dict(state_dict)
        self.state[p]["row_step"] = row_step                           # keep int64 (the base class casts to float)


def build_center_optimizer(pfc, optim_cfg) -> SparseRowAdamW:
    """The centers share the backbone's betas/eps; their LR is lr * centers_lr_mult, their weight decay their own."""
    opt = SparseRowAdamW(pfc.weight, lr=optim_cfg.lr, weight_decay=optim_cfg.centers_weight_decay,
                         betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    for group in opt.param_groups:
        group["lr_mult"] = optim_cfg.centers_lr_mult
    return opt


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up from base_lr/warmup (never 0, never the full LR at step 0) then cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR, keeping each group's own multiplier (`lr_mult`, default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
