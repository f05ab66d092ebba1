"""Multinomial logistic regression on frozen features, CLIP's protocol (App. A.3), in PyTorch.

Objective (the mean form scikit-learn also minimises since 1.2):
    f(W, b) = mean_i CE(W x_i + b, y_i) + lam / 2 * ||W||^2        (bias not penalised)
so lam corresponds to scikit-learn's C = 1 / (lam * n). Solved full-batch with torch.optim.LBFGS
(strong-Wolfe line search) on whatever device holds the features; the loss and its gradient are
computed by hand in row chunks, so memory stays bounded (ImageNet-size feature sets) and no
autograd graph is built.

Features are standardised (z-score with the statistics of the set the classifier is fitted on).
Why: one lam grid then means the same thing for every backbone and feature (pixels in [0, 1],
CLS tokens with norm ~10, L2-normalised embeddings), and L-BFGS converges in far fewer iterations
on a well-conditioned problem. It is part of the classifier, so it is re-estimated on train+val
for the final fit and applied unchanged to the test features.

The L2 strength is chosen on a validation split by CLIP's parametric binary search: a coarse
sweep every 2 decades of a log grid with `steps_per_decade` points per decade, then the interval
around the best point is halved until neighbouring grid points are compared. Score = the dataset
metric on val, ties broken by the lower val cross-entropy (so clean separable data picks the
weakest penalty that still separates, and noisy few-sample data a stronger one).
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def top1_accuracy(pred, target) -> float:
    pred, target = np.asarray(pred), np.asarray(target)
    return float((pred == target).mean() * 100.0)


def mean_per_class_accuracy(pred, target) -> float:
    """Mean over the classes present in `target` of per-class recall (CLIP's 'mean per class')."""
    pred, target = np.asarray(pred), np.asarray(target)
    classes = np.unique(target)
    return float(np.mean([(pred[target == c] == c).mean() for c in classes]) * 100.0)


METRICS = {"top1": top1_accuracy, "mean_per_class": mean_per_class_accuracy}


def pick_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class LogReg:
    """A fitted probe: standardisation statistics plus the linear layer."""
    mean: torch.Tensor          # [D]
    std: torch.Tensor           # [D]
    weight: torch.Tensor        # [C, D]
    bias: torch.Tensor          # [C]
    lam: float
    n_iter: int = 0
    n_evals: int = 0
    info: dict = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, x, chunk: int = 65536) -> torch.Tensor:
        x = torch.as_tensor(x)
        dev = self.weight.device
        out = [((x[i:i + chunk].to(dev, torch.float32) - self.mean) / self.std) @ self.weight.T + self.bias
               for i in range(0, len(x), chunk)]
        return torch.cat(out) if out else torch.zeros(0, len(self.bias), device=dev)

    def predict(self, x) -> np.ndarray:
        return self.logits(x).argmax(1).cpu().numpy()


def standardize_stats(x: torch.Tensor, chunk: int = 65536):
    """Per-dimension mean and std (float64 accumulation); constant dimensions get std 1."""
    n, d = x.shape
    s = torch.zeros(d, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(d, dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        c = x[i:i + chunk].double()
        s += c.sum(0)
        s2 += (c * c).sum(0)
    mean = s / n
    var = (s2 / n - mean * mean).clamp_min(0)
    std = var.sqrt()
    std[std < 1e-6 * max(float(std.max()), 1e-12)] = 1.0
    return mean.float(), std.float()


def _loss_and_grad(x, y, weight, bias, lam, chunk):
    """Mean CE + lam/2 ||W||^2 and its exact gradient, accumulated over row chunks."""
    n = len(x)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    gw = torch.zeros_like(weight)
    gb = torch.zeros_like(bias)
    for i in range(0, n, chunk):
        xc, yc = x[i:i + chunk], y[i:i + chunk]
        logits = torch.addmm(bias, xc, weight.T)
        logp = torch.log_softmax(logits, dim=1)
        loss -= logp.gather(1, yc[:, None]).sum(dtype=torch.float64)
        g = logp.exp_()                                     # softmax
        g[torch.arange(len(yc), device=g.device), yc] -= 1.0
        gw.addmm_(g.T, xc)
        gb += g.sum(0)
    loss = loss / n + 0.5 * lam * (weight.double() ** 2).sum()
    gw.div_(n).add_(weight, alpha=lam)
    gb.div_(n)
    return loss.float(), gw, gb


def fit_logreg(x, y, num_classes: int, lam: float, *, standardize: bool = True, max_iter: int = 1000,
               tol: float = 1e-4, history_size: int = 200, history_mem_gb: float = 2.0, device=None,
               init: LogReg | None = None, chunk: int = 65536, stats=None) -> LogReg:
    """Fit the probe by full-batch L-BFGS. Stops when max|grad| <= tol (scikit-learn's `tol` on
    the same mean-form objective), after max_iter iterations, or when the loss stops changing in
    float32. `init` warm-starts from another probe (the search's neighbouring lam); `stats` passes
    precomputed (mean, std).

    A long L-BFGS history pays off here: on 60k x 512 features it cuts the iterations ~3x against
    scipy's m=10 (bench/linear_probe.py). It costs 2 * history * (C * (D + 1)) floats, so it is
    capped at `history_mem_gb` (ImageNet: 1000 x 1025 params -> ~250 pairs at 2 GB)."""
    dev = pick_device(device) if not isinstance(device, torch.device) else device
    x = torch.as_tensor(x).to(dev, torch.float32)
    y = torch.as_tensor(y).to(dev, torch.int64)
    n, d = x.shape
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    if stats is None:
        stats = standardize_stats(x) if standardize else (torch.zeros(d, device=dev), torch.ones(d, device=dev))
    mean, std = stats
    if standardize:
        x = (x - mean) / std
    if init is not None:
        weight = init.weight.detach().clone().to(dev)
        bias = init.bias.detach().clone().to(dev)
    else:
        weight = torch.zeros(num_classes, d, device=dev)
        bias = torch.zeros(num_classes, device=dev)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    n_params = num_classes * (d + 1)
    history_size = max(5, min(history_size, int(history_mem_gb * 2**30 / (8 * n_params))))
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=tol, tolerance_change=1e-9, history_size=history_size,
                            line_search_fn="strong_wolfe")

    def closure():
        with torch.no_grad():
            loss, gw, gb = _loss_and_grad(x, y, weight, bias, lam, chunk)
        weight.grad, bias.grad = gw, gb
        return loss

    opt.step(closure)
    state = opt.state[opt.param_groups[0]["params"][0]]
    with torch.no_grad():
        final_loss, gw, gb = _loss_and_grad(x, y, weight, bias, lam, chunk)
        grad_max = float(torch.maximum(gw.abs().max(), gb.abs().max()))
    return LogReg(mean=mean, std=std, weight=weight.detach(), bias=bias.detach(), lam=float(lam),
                  n_iter=int(state.get("n_iter", 0)), n_evals=int(state.get("func_evals", 0)),
                  info={"loss": float(final_loss), "grad_max": grad_max})


def lam_grid(lo: float = -6, hi: float = 2, steps_per_decade: int = 8) -> np.ndarray:
    """Log-spaced L2 strengths 10**lo .. 10**hi (CLIP: 8 steps per decade)."""
    return np.logspace(lo, hi, int(round((hi - lo) * steps_per_decade)) + 1)


def search_lam(x_train, y_train, x_val, y_val, num_classes: int, metric: str = "top1", *,
               grid=None, coarse_every: int = 16, device=None, **fit_kw):
    """CLIP's parametric binary search for lam on a validation split.

    Returns (best_lam, history) with history = [{lam, score, val_loss, n_iter}] in evaluation order.
    """
    grid = lam_grid() if grid is None else np.asarray(grid)
    dev = pick_device(device) if not isinstance(device, torch.device) else device
    x_train = torch.as_tensor(x_train).to(dev, torch.float32)
    y_train = torch.as_tensor(y_train).to(dev, torch.int64)
    x_val = torch.as_tensor(x_val).to(dev, torch.float32)
    y_val_t = torch.as_tensor(y_val).to(dev, torch.int64)
    y_val_np = y_val_t.cpu().numpy()
    stats = standardize_stats(x_train) if fit_kw.get("standardize", True) else None
    score_fn = METRICS[metric]
    done: dict[int, dict] = {}
    fits: dict[int, LogReg] = {}

    def evaluate(idx_list):
        # Strong penalties first: they converge fast and warm-start the weaker ones.
        for i in sorted(set(idx_list) - set(done), reverse=True):
            near = min(fits, key=lambda j: abs(j - i)) if fits else None
            clf = fit_logreg(x_train, y_train, num_classes, float(grid[i]), device=dev, stats=stats,
                             init=fits.get(near), **fit_kw)
            fits[i] = clf
            logits = clf.logits(x_val)
            val_loss = float(F.cross_entropy(logits, y_val_t))
            done[i] = {"lam": float(grid[i]), "score": score_fn(logits.argmax(1).cpu().numpy(), y_val_np),
                       "val_loss": val_loss, "n_iter": clf.n_iter}

    def best():
        return max(done, key=lambda i: (done[i]["score"], -done[i]["val_loss"]))

    last = len(grid) - 1
    evaluate(list(range(0, last + 1, coarse_every)) + [last])
    step = coarse_every // 2
    while step >= 1:
        peak = best()
        evaluate([j for j in (peak - step, peak + step) if 0 <= j <= last])
        step //= 2
    order = list(done)
    return float(grid[best()]), [done[i] for i in order]
