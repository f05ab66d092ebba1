"""Multinomial logistic regression on frozen features, CLIP's protocol (App. A.3), in PyTorch.

Objective (the mean form scikit-learn also minimises since 1.2):
    f(W, b) = mean_i CE(W x_i + b, y_i) + lam / 2 * ||W||^2        (bias not penalised)
so lam corresponds to scikit-learn's C = 1 / (lam * n). Solved full-batch by L-BFGS (our own loop,
preconditioned by the feature covariance: see `_preconditioner`) on whatever device holds the
features; the loss and its gradient are computed by hand in row chunks, so memory stays bounded
(ImageNet-size feature sets) and no autograd graph is built. It runs to convergence: max|grad| at
1e-6 of its value at W = 0, or until float32 cannot lower f any more, and warns if max_iter stops it
first. Only public torch API is used (the line search is ours); torch.optim.LBFGS on the same objective
(solver="torch") is the comparison bench/linear_probe.py measures.

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
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def top1_accuracy(pred, target) -> float:
    """Fraction of correct predictions (CLIP_benchmark's acc1, in [0, 1])."""
    pred, target = np.asarray(pred), np.asarray(target)
    return float((pred == target).mean())


def mean_per_class_accuracy(pred, target) -> float:
    """Mean over the classes present in `target` of per-class recall, in [0, 1] (CLIP's 'mean per class';
    CLIP_benchmark's mean_per_class_recall = scikit-learn's balanced_accuracy_score)."""
    pred, target = np.asarray(pred), np.asarray(target)
    classes = np.unique(target)
    return float(np.mean([(pred[target == c] == c).mean() for c in classes]))


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
    """Mean CE + lam/2 ||W||^2 (float64) and its exact gradient, accumulated over row chunks.

    Per row, CE = (top - z_y) + log1p(rest) with rest = the softmax denominator's sum over the non-top
    classes. Why: log(1 + rest) in float32 loses every rest below 6e-8, and on (nearly) separable data
    most rows are like that: the objective then had a float32 floor ~1e-4 of its value at lam 1e-5,
    too coarse for the line search to make progress. For the same reason p_y - 1 at the top class is
    formed as -rest / (1 + rest), not 1 / (1 + rest) - 1."""
    n = len(x)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    gw = torch.zeros_like(weight)
    gb = torch.zeros_like(bias)
    for i in range(0, n, chunk):
        xc, yc = x[i:i + chunk, :], y[i:i + chunk, None]
        # logits, turned into the softmax in place (torch's log_softmax costs 2x this on 10-wide rows on CPU)
        g = torch.addmm(bias, xc, weight.T)
        top, arg = g.max(1, keepdim=True)
        loss += (top - g.gather(1, yc)).sum(dtype=torch.float64)
        g.sub_(top).exp_().scatter_(1, arg, 0.0)
        rest = g.sum(1, keepdim=True)
        loss += torch.log1p(rest).sum(dtype=torch.float64)
        hit = arg == yc
        g.div_(1 + rest).scatter_(1, arg, torch.where(hit, -rest, 1.0) / (1 + rest))   # softmax, -1 at y = top
        g.scatter_add_(1, yc, torch.where(hit, 0.0, -1.0))                              # -1 at y != top
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
    Hessian about I: fewer L-BFGS iterations to convergence (bench/linear_probe.py measures how many).
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


def _wolfe_step(fun, z, d, f: float, gtd: float, t: float, c1: float = 1e-4, c2: float = 0.9, max_evals: int = 20):
    """A step t along d meeting the weak Wolfe conditions: doubling, then bisection (Lewis & Overton 2013).

    Armijo (enough decrease) caps t; the curvature condition g(t).d >= c2 g.d floors it, so a step that is
    too short is lengthened. Why: short steps give curvature pairs too small to use (a warm start on a flat
    objective crawled for 1000 iterations), and a Wolfe step always has s.y > 0. With a memory, t = 1 passes
    almost always: one evaluation per iteration. Returns (t, fun's output at t, evaluations, ok); ok False:
    no Wolfe step within max_evals, i.e. f is at its round-off floor (t, output = the best lower point seen,
    or 0, None)."""
    lo, hi, best = 0.0, math.inf, (0.0, None)
    for k in range(1, max_evals + 1):
        out = fun(z + t * d)
        if not out[0] <= f + c1 * t * gtd:            # too long (a NaN/inf loss fails too)
            hi = t
        elif float(torch.dot(out[1], d)) < c2 * gtd:  # lower, but the slope is still steep: too short
            lo, best = t, (t, out)
        else:
            return t, out, k, True
        t = 2 * t if hi == math.inf else (lo + hi) / 2
    return (*best, k, False)


def _lbfgs(fun, z, *, max_iter: int, history_size: int, gtol: float, start=None):
    """Minimise a smooth convex function by L-BFGS (compact memory) until max|grad| <= gtol.

    fun(z) -> (loss float, grad like z); `start` = fun(z) when already known. Returns
    (z, loss, grad, n_iter, n_evals, stop) with stop "converged" | "max_iter" | "round_off" (the line search
    found no usable step: f is as low as its float32 evaluation can tell)."""
    f, g = start if start is not None else fun(z)
    evals, memory = int(start is None), _Memory(history_size)
    for it in range(max_iter + 1):
        if float(g.abs().max()) <= gtol:
            return z, f, g, it, evals, "converged"
        if it == max_iter:
            break
        d = memory.direction(g)
        gtd = float(torch.dot(g, d))
        if not gtd < 0:                             # not a descent direction (round-off): restart
            memory = _Memory(history_size)
            d, gtd = -g, -float(torch.dot(g, g))
        t0 = 1.0 if memory.s is not None else min(1.0, 1.0 / float(g.abs().sum()))
        t, out, k, ok = _wolfe_step(fun, z, d, f, gtd, t0)
        evals += k
        if out is not None:
            s, y = t * d, out[1] - g
            if float(torch.dot(y, s)) > 1e-10 * float(s.norm() * y.norm()):
                memory.push(s, y)
            z, (f, g) = z + s, out
        if not ok:
            return z, f, g, it + 1, evals, "round_off"
    return z, f, g, max_iter, evals, "max_iter"


def _torch_lbfgs(fun, z, *, max_iter: int, history_size: int, gtol: float, start=None):
    """The same minimisation by torch.optim.LBFGS (strong-Wolfe line search, two-loop recursion): the
    reference our solver is benchmarked against (bench/linear_probe.py). Same return value as `_lbfgs`."""
    param = torch.nn.Parameter(z.clone())
    opt = torch.optim.LBFGS([param], lr=1, max_iter=max_iter, max_eval=20 * max_iter, tolerance_grad=gtol,
                            tolerance_change=0.0, history_size=history_size, line_search_fn="strong_wolfe")

    def closure():
        f, param.grad = fun(param.detach())
        return torch.tensor(f, dtype=torch.float64)
    opt.step(closure)
    state = opt.state[param]
    z = param.detach().clone()
    f, g = fun(z)
    n_iter = state.get("n_iter", 0)
    stop = "converged" if float(g.abs().max()) <= gtol else ("max_iter" if n_iter >= max_iter else "round_off")
    return z, f, g, n_iter, state.get("func_evals", 0) + 1, stop


SOLVERS = {"ours": _lbfgs, "torch": _torch_lbfgs}


def fit_logreg(x, y, num_classes: int, lam: float, *, standardize: bool = True, max_iter: int = 3000,
               tol: float = 1e-6, history_size: int = 200, history_mem_gb: float = 2.0, device=None,
               init: LogReg | None = None, chunk: int = 65536, stats=None, precondition: bool = True,
               eig=None, solver: str = "ours") -> LogReg:
    """Fit the probe by full-batch L-BFGS until max|grad| <= tol * max|grad at W = 0, b = 0| (the gradient in
    the optimised, preconditioned variables). Why relative: an absolute tol (scikit-learn's 1e-4) stops far
    above the optimum when lam is small. Warns when max_iter stops it first.
    `init` warm-starts from another probe (the search's neighbouring lam); `stats` passes precomputed
    (mean, std), `eig` a precomputed `curvature`; solver "torch" runs torch.optim.LBFGS instead (the bench's
    comparison).

    A long history pays off on ill-conditioned features (small lam): far fewer iterations than a short one. It costs
    2 * history * (C * (D + 1)) floats, so it is capped at `history_mem_gb` (ImageNet: 1000 x 1025
    params -> ~250 pairs at 2 GB)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
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
    split = num_classes * d
    n_params = num_classes * (d + 1)
    history_size = max(5, min(history_size, int(history_mem_gb * 2**30 / (8 * n_params))))

    def fun(z):
        w = z[:split].view(num_classes, d) @ p
        loss, gw, gb = _loss_and_grad(x, y, w, z[split:], lam, chunk)
        return float(loss), torch.cat([(gw @ p.T).reshape(-1), gb])

    zero = torch.zeros(n_params, device=dev)
    start = fun(zero)
    gtol = tol * float(start[1].abs().max())
    if init is not None:    # optimise z = [W~, b] with W = W~ P: start from W~ = W P^-1
        w_tilde = torch.linalg.solve(p, init.weight.to(dev).T).T
        z0, start = torch.cat([w_tilde.reshape(-1), init.bias.to(dev)]).contiguous(), None
    else:
        z0 = zero
    z, f, g, n_iter, n_evals, stop = SOLVERS[solver](fun, z0, max_iter=max_iter, history_size=history_size,
                                                     gtol=gtol, start=start)
    grad_rel = float(g.abs().max()) / max(gtol / tol, 1e-30)
    if stop == "max_iter":
        warnings.warn(f"fit_logreg (lam {lam:.3g}) stopped at max_iter={max_iter} with max|grad| at "
                      f"{grad_rel:.1e} of its start, above tol {tol:g}: the objective may be above its optimum; "
                      "raise probe.max_iter", RuntimeWarning, stacklevel=2)
    weight = z[:split].view(num_classes, d) @ p
    info = {"loss": f, "grad_max": float(g.abs().max()), "grad_rel": grad_rel, "stop": stop}
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
