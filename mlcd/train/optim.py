"""Backbone AdamW with CLIP-style parameter groups, and the warm-up + cosine learning-rate schedule."""
import math

import torch

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
