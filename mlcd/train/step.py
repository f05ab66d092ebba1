"""One optimizer step of MLCD training: what the loop runs and what bench/train.py times."""
import math
from dataclasses import dataclass

import torch

from mlcd import dist
from mlcd.train.sharding import gradient_sync, is_sharded, local_grad


@dataclass
class StepResult:
    loss: float          # global-batch mean loss (identical on every rank)
    grad_norm: float     # global norm over the backbone and all center shards, before clipping
    applied: bool        # False: non-finite loss or gradient, every rank skipped the update together


def global_grad_norm(backbone: torch.nn.Module, pfc) -> torch.Tensor:
    """||g|| over the backbone and ALL center shards: the parts split over ranks (center shards, FSDP gradient
    shards) are summed over ranks; DDP gradients are already identical on every rank and added once."""
    params = [p for p in backbone.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=pfc.weight.device)
    sq += pfc.grad_sq_norm().float()
    for p in params:
        if is_sharded(p):
            sq += local_grad(p).detach().float().pow(2).sum().to(sq.device)
    dist.all_reduce_sum(sq)
    for p in params:
        if not is_sharded(p):
            sq += p.grad.detach().float().pow(2).sum().to(sq.device)
    return sq.sqrt()


def train_step(model, pfc, backbone_opt, center_opt, micro_batches, step: int, grad_accum: int,
               clip_grad: float, autocast) -> StepResult:
    """Forward/backward over `grad_accum` micro-batches (gradients sync on the last only), clip on the global norm,
    step both optimizers, or skip the update on every rank together when the loss or gradient is not finite.

    model: the backbone as sharding.wrap_backbone returns it (DDP, FSDP or plain). micro_batches: an iterator of
    (images, labels) on the device. step: the optimizer step; micro-step i of it seeds PartialFC's negative sample
    with step * grad_accum + i, so a resumed run draws the same negatives."""
    device = pfc.weight.device
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        images, labels = next(micro_batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        last = micro == grad_accum - 1
        with gradient_sync(model, enabled=last):
            with autocast:
                embeddings = model(images).embedding
            loss = pfc(embeddings.float(), labels, step * grad_accum + micro) / grad_accum
            loss.backward()
        loss_sum += loss.detach()

    grad_norm = global_grad_norm(model, pfc)
    loss_value = float(loss_sum)
    applied = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
    if applied:
        if clip_grad and clip_grad > 0:
            coef = torch.clamp(clip_grad / (grad_norm + 1e-6), max=1.0)
            for p in list(model.parameters()) + list(pfc.parameters()):
                if p.grad is not None:
                    local_grad(p).mul_(coef.to(p.grad.device))
        backbone_opt.step()
        center_opt.step()
    backbone_opt.zero_grad(set_to_none=True)
    center_opt.zero_grad(set_to_none=True)
    return StepResult(loss_value, float(grad_norm), applied)
