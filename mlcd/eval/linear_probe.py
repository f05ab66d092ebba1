"""Multinomial logistic regression on frozen features, CLIP's protocol (App. A.3), in PyTorch.

Objective (the mean form scikit-learn also minimises since 1.2):
    f(W, b) = mean_i CE(W x_i + b, y_i) + lam / 2 * ||W||^2        (bias not penalised)
so lam corresponds to scikit-learn's C = 1 / (lam * n). Solved full-batch by L-BFGS (our own loop,
preconditioned by the feature covariance: see `_preconditioner`) on whatever device holds the
features; the loss and its gradient are computed by hand in row chunks, so memory stays bounded
(ImageNet-size feature sets) and no autograd graph is built.

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
from torch.optim.lbfgs import _strong_wolfe  # torch's own line search for LBFGS (pinned torch)


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
    """Mean CE + lam/2 ||W||^2 (float64) and its exact gradient, accumulated over row chunks."""
    n = len(x)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    gw = torch.zeros_like(weight)
    gb = torch.zeros_like(bias)
    for i in range(0, n, chunk):
        xc, yc = x[i:i + chunk, :], y[i:i + chunk, None]
        # logits, turned into the softmax in place (torch's log_softmax costs 2x this on 10-wide rows on CPU)
        g = torch.addmm(bias, xc, weight.T)
        loss -= g.gather(1, yc).sum(dtype=torch.float64)
        top = g.amax(1, keepdim=True)
        g.sub_(top).exp_()
        total = g.sum(1, keepdim=True)
        loss += (total.log() + top).sum(dtype=torch.float64)
        g.div_(total).scatter_add_(1, yc, g.new_full(yc.shape, -1.0))   # softmax - onehot(y)
        gw.addmm_(g.T, xc)
        gb += g.sum(0)
    loss = loss / n + 0.5 * lam * (weight.double() ** 2).sum()
    gw.div_(n).add_(weight, alpha=lam)
    gb.div_(n)
    return loss, gw, gb


def curvature(x: torch.Tensor, max_rows: int = 16384):
    """Eigen-decomposition (eigenvalues, eigenvectors) of the feature second moment x^T x / n, from at most
    `max_rows` evenly strided rows (a preconditioner needs no more); float64, on x's device."""
    xs = x[::max(1, -(-len(x) // max_rows))]
    return torch.linalg.eigh((xs.T @ xs).double() / len(xs))


def _preconditioner(eig, lam: float, scale: float = 0.1) -> torch.Tensor:
    """P = (scale * S + lam I)^(-1/2) for the second moment S = V diag(e) V^T.

    Why: the objective's Hessian in W is about A (x) S + lam I, with A the softmax curvature
    (eigenvalues in [0, 1/2]; `scale` stands in for it). Optimising over W~ with W = W~ P makes that
    Hessian about I: 1.7x fewer L-BFGS iterations on bench/linear_probe.py's features (74 vs 129), 2.6x on the demo's
    ViT features (lam 1e-6: 147 vs 387).
    The objective and its optimum are unchanged: it is only a change of variables."""
    e, v = eig
    p = (v * (scale * e.clamp_min(0) + lam).rsqrt()) @ v.T
    return (p / p.diagonal().mean()).float()    # the overall scale is L-BFGS's job (gamma)


class _Memory:
    """L-BFGS curvature pairs in the compact form (Byrd, Nocedal & Schnabel 1994): H g from a few
    matrix products over the stacked pairs, where the two-loop recursion costs ~8 small ops per pair
    (200 pairs: ~1600 Python-level ops per iteration, more than the loss itself on small probes)."""

    def __init__(self, size: int):
        self.size, self.s, self.y = size, None, None

    def push(self, s: torch.Tensor, y: torch.Tensor) -> None:
        if self.s is None:
            self.s, self.y = s.new_zeros(0, len(s)), y.new_zeros(0, len(y))
            self.sy = self.yy = torch.zeros(0, 0, dtype=torch.float64, device=s.device)
        self.s, self.y = torch.cat([self.s, s[None]]), torch.cat([self.y, y[None]])

        def grow(m, col, row):  # m [k-1, k-1] -> [k, k] with a new last column and row (sharing the corner)
            return torch.cat([torch.cat([m, col[:-1, None]], 1), row[None]])
        self.sy = grow(self.sy, (self.s @ y).double(), (self.y @ s).double())   # sy[i, j] = s_i . y_j
        self.yy = grow(self.yy, *[(self.y @ y).double()] * 2)
        if len(self.s) > self.size:
            self.s, self.y, self.sy, self.yy = self.s[1:], self.y[1:], self.sy[1:, 1:], self.yy[1:, 1:]

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """-H g with H0 = gamma I, gamma = s.y / y.y of the newest pair (plain -g when empty)."""
        if self.s is None:
            return -g
        gamma = self.sy[-1, -1] / self.yy[-1, -1]
        r = torch.triu(self.sy)                                           # R_ij = s_i.y_j, i <= j
        a, b = (self.s @ g).double(), (self.y @ g).double()
        u = torch.linalg.solve_triangular(r, a[:, None], upper=True)[:, 0]
        w = torch.diag(torch.diagonal(self.sy)) + gamma * self.yy
        p = torch.linalg.solve_triangular(r.T, (w @ u - gamma * b)[:, None], upper=False)[:, 0]
        hg = gamma * g.double() + p.to(g.dtype) @ self.s - (gamma * u).to(g.dtype) @ self.y
        return -hg.to(g.dtype)


def _lbfgs(fun, z, *, max_iter: int, history_size: int, tol_change: float = 1e-10):
    """Minimise a smooth convex function by L-BFGS.

    fun(z) -> (loss float, grad like z, converged bool, info). Line search: while the memory is empty
    (first step, restarts) torch's strong-Wolfe search, which also *lengthens* a step that is too short:
    a warm start from the neighbouring lam on a flat objective otherwise makes steps so short that their
    curvature pairs are unusable, and crawls (seen: 1000 iterations). With a memory the step is scaled
    by it and t = 1 is accepted almost always, so plain Armijo backtracking costs one evaluation per
    iteration. Returns (z, n_iter, n_evals, info of z)."""
    f, g, done, info = fun(z)
    evals, it = 1, 0
    memory = _Memory(history_size)
    while not done and it < max_iter:
        it += 1
        d = memory.direction(g)
        gtd = float(torch.dot(g, d))
        if not gtd < 0:                             # not a descent direction (round-off): restart
            memory = _Memory(history_size)
            d, gtd = -g, -float(torch.dot(g, g))
        if memory.s is None:
            seen = {}

            def along(z0, step, direction):
                seen[float(step)] = out = fun(z0 + step * direction)
                return out[0], out[1]

            f_new, g_new, t, n_ls = _strong_wolfe(along, z, min(1.0, 1.0 / float(g.abs().sum())), d, f, g, gtd)
            t, evals = float(t), evals + n_ls
            _, _, done, info_new = seen[t] if t in seen else fun(z + t * d)
        else:
            t = 1.0
            for _ in range(40):
                f_new, g_new, done, info_new = fun(z + t * d)
                evals += 1
                if f_new <= f + 1e-4 * t * gtd:     # Armijo (a NaN/inf loss fails it too)
                    break
                t *= 0.5
        if not f_new < f:
            break                                   # no decrease possible in float32: converged
        s, y = t * d, g_new - g
        if float(torch.dot(y, s)) > 1e-10:
            memory.push(s, y)
        z = z + s
        converged_change = abs(f - f_new) <= tol_change * max(1.0, abs(f))
        f, g, info = f_new, g_new, info_new
        if converged_change:
            break
    return z, it, evals, info


def fit_logreg(x, y, num_classes: int, lam: float, *, standardize: bool = True, max_iter: int = 1000,
               tol: float = 1e-4, history_size: int = 200, history_mem_gb: float = 2.0, device=None,
               init: LogReg | None = None, chunk: int = 65536, stats=None, precondition: bool = True,
               eig=None) -> LogReg:
    """Fit the probe by full-batch L-BFGS. Stops when max|grad| <= tol (scikit-learn's `tol` on
    the same mean-form objective, measured on W and b themselves), after max_iter iterations, or when
    the loss stops changing in float32. `init` warm-starts from another probe (the search's
    neighbouring lam); `stats` passes precomputed (mean, std), `eig` a precomputed `curvature`.

    A long history pays off: on the demo's 20k x 128 ViT features (lam 1e-6), 64 pairs needed 3x the
    iterations of 200 (442 vs 136, measured with backtracking-only line search). It costs
    2 * history * (C * (D + 1)) floats, so it is capped at `history_mem_gb` (ImageNet: 1000 x 1025
    params -> ~250 pairs at 2 GB)."""
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
    if precondition:
        p = _preconditioner(curvature(x) if eig is None else eig, lam)
    else:
        p = torch.eye(d, device=dev)
    weight = init.weight.to(dev) if init is not None else torch.zeros(num_classes, d, device=dev)
    bias = init.bias.to(dev) if init is not None else torch.zeros(num_classes, device=dev)
    # Optimise z = [W~, b] with W = W~ P; start from W~ = W P^-1.
    w_tilde = torch.linalg.solve(p, weight.T).T if init is not None else weight
    z0 = torch.cat([w_tilde.reshape(-1), bias]).contiguous()
    split = num_classes * d
    n_params = num_classes * (d + 1)
    history_size = max(5, min(history_size, int(history_mem_gb * 2**30 / (8 * n_params))))

    def fun(z):
        w = z[:split].view(num_classes, d) @ p
        loss, gw, gb = _loss_and_grad(x, y, w, z[split:], lam, chunk)
        grad_max = float(torch.maximum(gw.abs().max(), gb.abs().max()))
        info = {"loss": float(loss), "grad_max": grad_max}
        return float(loss), torch.cat([(gw @ p.T).reshape(-1), gb]), grad_max <= tol, info

    z, n_iter, n_evals, info = _lbfgs(fun, z0, max_iter=max_iter, history_size=history_size)
    weight = z[:split].view(num_classes, d) @ p
    return LogReg(mean=mean, std=std, weight=weight, bias=z[split:].clone(), lam=float(lam),
                  n_iter=n_iter, n_evals=n_evals, info=info)


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
    eig = None
    if fit_kw.get("precondition", True):    # one eigen-decomposition serves every lam
        eig = curvature(x_train if stats is None else (x_train - stats[0]) / stats[1])
    score_fn = METRICS[metric]
    done: dict[int, dict] = {}
    fits: dict[int, LogReg] = {}

    def evaluate(idx_list):
        # Strong penalties first: they converge fast and warm-start the weaker ones.
        for i in sorted(set(idx_list) - set(done), reverse=True):
            near = min(fits, key=lambda j: abs(j - i)) if fits else None
            clf = fit_logreg(x_train, y_train, num_classes, float(grid[i]), device=dev, stats=stats,
                             eig=eig, init=fits.get(near), **fit_kw)
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
