"""mlcd/partial_fc.py: world size 1 against the dense float64 reference (test_loss.reference_loss); sampling
invariants at r < 1; the sparse AdamW against torch.optim.AdamW row by row; reshard; and real torchrun (gloo)
runs at W = 2 and 3 (tests/dist_partial_fc_worker.py) against world size 1 and the reference, including a
DDP-wrapped linear backbone for the gradient-averaging convention."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_partial_fc_worker as worker
from mlcd.partial_fc import PartialFC, ShardSpec, build_partial_fc, sample_seed
from mlcd.train.checkpoint import reshard
from mlcd.train.optim import SparseRowAdamW
from test_loss import assert_close, reference_grads, reference_loss

ROOT = Path(__file__).resolve().parents[1]


def _pfc(C, D, ratio=1.0, kind="mlcd", margin_type="arcface", budget="ratio", rank=0, world=1, seed=3):
    return PartialFC(C, D, kind=kind, margin_type=margin_type, sample_ratio=ratio, budget=budget, seed=seed,
                     rank=rank, world_size=world)


def _random_labels(B, L, C, seed, pad=0.2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B, L), generator=g)
    return labels.masked_fill(torch.rand(B, L, generator=g) < pad, -1)


# ---- shard spec ------------------------------------------------------------------------------------------------
def test_shard_spec_blocks_cover_all_classes():
    for C, W in [(11, 3), (1_000_003, 3), (5, 8), (12, 4)]:
        spec = ShardSpec(C, W)
        starts, sizes = spec.to_dict()["starts"], spec.to_dict()["sizes"]
        assert sum(sizes) == C and max(sizes) - min(sizes) <= 1
        assert starts == [sum(sizes[:r]) for r in range(W)]
        assert ShardSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        ShardSpec.from_dict({"num_classes": 11, "world_size": 3, "starts": [0, 3, 7], "sizes": [3, 4, 4]})


# ---- world size 1 against the dense reference -------------------------------------------------------------------
@pytest.mark.parametrize("kind,margin_type", worker.LOSS_VARIANTS)
def test_world1_full_matches_dense_reference(kind, margin_type):
    inp = worker.case_inputs()
    pfc = worker.make_pfc(inp, kind, margin_type)
    emb = (inp["x"] @ inp["lin_w"].t() + inp["lin_b"]).requires_grad_()
    loss = pfc(emb, inp["labels"], step=0)
    loss.backward()
    assert pfc.weight.grad.is_sparse
    ref, re, rw = reference_grads(emb, inp["centers"], inp["labels"], kind=kind, margin_type=margin_type)
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1, abs(ref.item()))
    assert_close(emb.grad, re)
    assert_close(pfc.weight.grad.to_dense(), rw)
    assert torch.allclose(pfc.grad_sq_norm(), pfc.weight.grad.to_dense().pow(2).sum())


@pytest.mark.parametrize("kind", ["mlcd", "mlc", "single", "per_slot"])
def test_world1_sampled_matches_reference_on_sampled_classes(kind):
    """r < 1: the loss and gradients are the dense reference restricted to the sampled classes, i.e. negatives are
    exactly the sampled non-own classes (own positives masked, other samples' positives included)."""
    C, D = 40, 8
    g = torch.Generator().manual_seed(1)
    emb, centers = torch.randn(6, D, generator=g).requires_grad_(), torch.randn(C, D, generator=g)
    labels = _random_labels(6, 3, C, seed=2)
    pfc = _pfc(C, D, ratio=0.3, kind=kind)
    pfc.weight.data.copy_(centers)
    loss = pfc(emb, labels, step=4)
    loss.backward()
    index = pfc.last_index
    assert 0 < index.numel() < C
    e64, w64 = emb.detach().double().requires_grad_(), centers.double().requires_grad_()
    ref = reference_loss(e64, w64, labels, kind=kind, classes=index.tolist())
    re, rw = torch.autograd.grad(ref, [e64, w64])
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1, abs(ref.item()))
    assert_close(emb.grad, re)
    assert_close(pfc.weight.grad.to_dense(), rw)
    assert set(pfc.weight.grad.coalesce().indices()[0].tolist()) == set(index.tolist())


# ---- sampling invariants ----------------------------------------------------------------------------------------
def _round_half_up(x):
    return int(math.floor(x + 0.5))


@pytest.mark.parametrize("budget_rule", ["ratio", "total"])
def test_sampling_invariants(budget_rule):
    C, W, D, ratio = 1003, 3, 4, 0.1
    labels = _random_labels(64, 8, C, seed=5)
    for rank in range(W):
        pfc = _pfc(C, D, ratio=ratio, budget=budget_rule, rank=rank, world=W)
        start, n = pfc.start, pfc.n_local
        index, pos_cols = pfc.sample(labels, step=11)
        owned = (labels >= start) & (labels < start + n)
        positives = set((labels[owned] - start).tolist())
        assert positives and positives <= set(index.tolist())                        # every owned positive kept
        assert torch.equal(index, index.unique()) and index.min() >= 0 and index.max() < n   # unique sorted in range
        want_neg = (_round_half_up(ratio * (n - len(positives))) if budget_rule == "ratio"
                    else max(0, _round_half_up(ratio * n) - len(positives)))
        assert index.numel() == len(positives) + want_neg
        assert torch.all(pos_cols[~owned] == -1) and torch.all(pos_cols[owned] >= 0)
        assert torch.equal(index[pos_cols[owned]], labels[owned] - start)             # remap is exact
        # remapped logits equal the original ones
        e = torch.nn.functional.normalize(torch.randn(64, D), dim=1)
        w = torch.nn.functional.normalize(pfc.weight.detach(), dim=1)
        sampled = e @ w[index].t()
        full = e @ w.t()
        rows = torch.arange(64)[:, None].expand_as(labels)
        assert torch.equal(sampled[rows[owned], pos_cols[owned]], full[rows[owned], labels[owned] - start])


def test_positives_exceeding_the_budget():
    C, D = 50, 4
    labels = torch.arange(40).view(5, 8)                                               # 40 of 50 classes positive
    index, _ = _pfc(C, D, ratio=0.1, budget="total").sample(labels, 0)                 # budget 5 < 40 positives
    assert index.tolist() == list(range(40))
    index, _ = _pfc(C, D, ratio=0.1, budget="ratio").sample(labels, 0)                 # + round(0.1 * 10) = 1
    assert index.numel() == 41 and set(range(40)) <= set(index.tolist())
    emb = torch.randn(5, D, requires_grad=True)
    loss = _pfc(C, D, ratio=0.1, budget="total")(emb, labels, 0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()


def test_sampling_is_reproducible_and_differs_by_rank_and_step():
    C, W = 3000, 2
    labels = _random_labels(8, 4, C, seed=0)
    pfcs = [_pfc(C, 4, ratio=0.1, rank=r, world=W, seed=9) for r in range(W)]
    a, _ = pfcs[0].sample(labels, 7)
    b, _ = _pfc(C, 4, ratio=0.1, rank=0, world=W, seed=9).sample(labels, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, pfcs[0].sample(labels, 8)[0])
    assert not torch.equal(a, _pfc(C, 4, ratio=0.1, rank=0, world=W, seed=10).sample(labels, 7)[0])
    other, _ = pfcs[1].sample(labels, 7)                                  # same shard size, different stream
    assert a.numel() > 50 and len(set(a.tolist()) ^ set(other.tolist())) > a.numel()
    assert len({sample_seed(0, r, s) for r in range(4) for s in range(100)}) == 400


# ---- sparse optimizer -----------------------------------------------------------------------------------------
def test_sparse_adamw_untouched_rows_bit_identical_and_touched_rows_match_adamw():
    C, D, steps, micro = 60, 5, 4, 2
    opt_kw = dict(lr=0.01, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    pfc = _pfc(C, D, ratio=0.05, seed=1)
    opt = SparseRowAdamW(pfc.weight, **opt_kw)
    opt.chunk_elems = 3 * D                                               # several row chunks per step
    w0 = pfc.weight.detach().clone()
    # reference: one torch.optim.AdamW per row, stepped only when that row was touched, with the same gradient
    rows_ref = [torch.nn.Parameter(w0[i].clone()) for i in range(C)]
    opts_ref = [torch.optim.AdamW([p], **opt_kw) for p in rows_ref]
    touched_ever = set()
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        touched = set()
        for k in range(micro):                                            # gradient accumulation: union of rows
            labels = torch.randint(0, 25, (3, 2), generator=g)           # classes >= 25 only as sampled negatives
            pfc(torch.randn(3, D, generator=g), labels, step * micro + k).backward()
            touched |= set(pfc.last_index.tolist())
        grad = pfc.weight.grad.coalesce()
        assert set(grad.indices()[0].tolist()) == touched
        dense = grad.to_dense()
        assert torch.allclose(pfc.grad_sq_norm(), dense.pow(2).sum())    # duplicates across micro-steps summed
        for i in touched:
            rows_ref[i].grad = dense[i].clone()
            opts_ref[i].step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        touched_ever |= touched
    untouched = sorted(set(range(C)) - touched_ever)
    assert len(untouched) > 5 and len(touched_ever) > 5
    st = opt.state[pfc.weight]
    assert torch.equal(pfc.weight.detach()[untouched], w0[untouched])
    assert torch.all(st["exp_avg"][untouched] == 0) and torch.all(st["exp_avg_sq"][untouched] == 0)
    assert torch.all(st["row_step"][untouched] == 0)
    for i in sorted(touched_ever):
        assert torch.allclose(pfc.weight.detach()[i], rows_ref[i].detach(), rtol=1e-6, atol=1e-7), i
        assert torch.allclose(st["exp_avg_sq"][i], opts_ref[i].state[rows_ref[i]]["exp_avg_sq"], rtol=1e-6)
        assert st["row_step"][i] == int(opts_ref[i].state[rows_ref[i]]["step"])
    assert len(set(st["row_step"].tolist())) > 2                         # rows really have different step counts


def test_optimizer_is_scheduler_drivable_and_state_round_trips():
    pfc = _pfc(20, 4, ratio=0.5)
    opt = SparseRowAdamW(pfc.weight, lr=0.1, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    pfc(torch.randn(4, 4), torch.tensor([[1, 2], [3, -1], [5, 6], [7, 7]]), 0).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and opt.param_groups[0]["weight_decay"] == 0.05
    sd = {"shard": pfc.state_dict(), "optim": opt.state_dict()}
    pfc2 = _pfc(20, 4, ratio=0.5)
    opt2 = SparseRowAdamW(pfc2.weight, lr=1.0)
    pfc2.load_state_dict(sd["shard"])
    opt2.load_state_dict(sd["optim"])
    assert torch.equal(pfc2.weight, pfc.weight)
    for k, v in opt.state[pfc.weight].items():
        assert torch.equal(opt2.state[pfc2.weight][k], v) and opt2.state[pfc2.weight][k].dtype == v.dtype
    with pytest.raises(ValueError, match="center shard mismatch"):
        _pfc(20, 4, rank=1, world=2).load_state_dict(_pfc(20, 4, rank=0, world=2).state_dict())
    with pytest.raises(ValueError, match="exp_avg"):
        SparseRowAdamW(_pfc(21, 4).weight, lr=1.0).load_state_dict(sd["optim"])


def test_reshard_round_trip_exact():
    C, D = 17, 3
    states = []
    for r in range(2):
        pfc = _pfc(C, D, ratio=0.5, rank=r, world=2)
        opt = SparseRowAdamW(pfc.weight, lr=0.1)
        st = opt.state[pfc.weight]
        for key in ("exp_avg", "exp_avg_sq"):
            st[key].normal_()
        st["row_step"].random_(0, 100)
        states.append({"shard": pfc.state_dict(), "optim": opt.state_dict()})
    _check_reshard(states, C)


def _check_reshard(states, C):
    def full(sts):
        return {"weight": torch.cat([s["shard"]["weight"] for s in sts]),
                **{k: torch.cat([s["optim"]["state"][0][k] for s in sts]) for k in ("exp_avg", "exp_avg_sq",
                                                                                     "row_step")}}
    before = full(states)
    three = reshard(states, 3)
    assert [s["shard"]["weight"].shape[0] for s in three] == ShardSpec(C, 3).to_dict()["sizes"]
    one = reshard(three, 1)
    back = reshard(three, len(states))
    for k, v in before.items():
        assert torch.equal(full(three)[k], v) and torch.equal(full(one)[k], v), k
        for a, b in zip(back, states):
            src = a["shard"]["weight"] if k == "weight" else a["optim"]["state"][0][k]
            dst = b["shard"]["weight"] if k == "weight" else b["optim"]["state"][0][k]
            assert torch.equal(src, dst) and src.dtype == dst.dtype
    # the resharded states load into modules of the new world size
    for r, s in enumerate(three):
        pfc = _pfc(C, before["weight"].shape[1], rank=r, world=3)
        pfc.load_state_dict(s["shard"])
        SparseRowAdamW(pfc.weight, lr=0.1).load_state_dict(s["optim"])
    with pytest.raises(ValueError):
        reshard(states[::-1], 3)


def test_build_from_config():
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ROOT / "configs/train/loss/mlcd.yaml")
    pfc = build_partial_fc(cfg, 100, 8, seed=0)
    assert (pfc.kind, pfc.scale, pfc.margin, pfc.margin_type, pfc.sample_ratio) == ("mlcd", 64.0, 0.3, "arcface", 0.1)
    assert abs(pfc.weight.std().item() - 0.01) < 0.002
    with pytest.raises(ValueError):
        pfc(torch.randn(2, 8), torch.tensor([[1], [100]]), 0)


# ---- real multi-process runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 3])
def dist_run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"pfc_w{world}")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(ROOT / "tests" / "dist_partial_fc_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return world, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _world1(inp, labels, kind="mlcd", margin_type="arcface", ratio=1.0, step=0, num_classes=worker.C):
    """The same step in this process at world size 1 (no process group)."""
    pfc = worker.make_pfc(inp, kind, margin_type, ratio, num_classes)
    lin = torch.nn.Linear(worker.DIN, worker.D)
    lin.weight.data.copy_(inp["lin_w"])
    lin.bias.data.copy_(inp["lin_b"])
    emb = lin(inp["x"])
    emb.retain_grad()
    loss = pfc(emb, labels, step)
    loss.backward()
    return {"loss": loss.detach(), "emb_grad": emb.grad, "center_grad": pfc.weight.grad.to_dense(),
            "lin_w_grad": lin.weight.grad, "lin_b_grad": lin.bias.grad}


def _dense_backbone_reference(inp, labels, classes=None, **kw):
    x = inp["x"].double()
    lw, lb = inp["lin_w"].double().requires_grad_(), inp["lin_b"].double().requires_grad_()
    w = inp["centers"].double().requires_grad_()
    emb = x @ lw.t() + lb
    loss = reference_loss(emb, w, labels, classes=classes, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, [lw, lb, w]))


def _compare(world, ranks, key, w1, tol=1e-5):
    outs = [r[key] for r in ranks]
    for o in outs:
        assert torch.equal(o["loss"], outs[0]["loss"]), "loss differs between ranks"
        assert torch.allclose(o["lin_w_grad"], outs[0]["lin_w_grad"]), "DDP did not synchronise"
    assert abs(outs[0]["loss"].item() - w1["loss"].item()) <= tol * max(1, abs(w1["loss"].item()))
    emb_grad = torch.cat([o["emb_grad"] for o in outs])
    center_grad = torch.cat([o["center_grad"] for o in outs])
    for got, want in ((emb_grad, w1["emb_grad"]), (center_grad, w1["center_grad"]),
                      (outs[0]["lin_w_grad"], w1["lin_w_grad"]), (outs[0]["lin_b_grad"], w1["lin_b_grad"])):
        assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item())
    assert abs(sum(o["grad_sq_norm"] for o in outs) - w1["center_grad"].pow(2).sum()) <= 1e-4 * max(
        1.0, w1["center_grad"].pow(2).sum().item())


@pytest.mark.slow
def test_distributed_matches_world1_and_dense_reference(dist_run):
    world, ranks = dist_run
    inp = worker.case_inputs()
    for kind, margin_type in worker.LOSS_VARIANTS:                        # A: r = 1, uneven batches, DDP backbone
        key = f"A/{kind}/{margin_type}"
        w1 = _world1(inp, inp["labels"], kind, margin_type)
        _compare(world, ranks, key, w1)
        loss, g_lw, g_lb, g_w = _dense_backbone_reference(inp, inp["labels"], kind=kind, margin_type=margin_type)
        assert abs(ranks[0][key]["loss"].item() - loss.item()) <= 1e-5 * max(1, loss.abs().item())
        assert_close(ranks[0][key]["lin_w_grad"], g_lw)                  # DDP averaging convention end to end
        assert_close(ranks[0][key]["lin_b_grad"], g_lb)
        assert_close(torch.cat([r[key]["center_grad"] for r in ranks]), g_w)
    # B: ranks >= 1 own no positive (classes 0..3 all live on rank 0), same collectives, same answer
    _compare(world, ranks, "B", _world1(inp, inp["labels_low"]))
    assert all(r["B"]["start"] >= 4 for r in ranks[1:])
    # F: 2 classes; at W = 3 the last rank holds none and still takes part in every collective
    _compare(world, ranks, "F", _world1(inp, inp["labels_low"].clamp(max=1), num_classes=2))
    assert world == 2 or ranks[-1]["F"]["center_grad"].shape[0] == 0


@pytest.mark.slow
def test_distributed_sampled_matches_reference_on_sampled_classes(dist_run):
    world, ranks = dist_run
    inp = worker.case_inputs()
    classes = torch.cat([r["C"]["index"] + r["C"]["start"] for r in ranks])
    owned = set(inp["labels_low"][inp["labels_low"] >= 0].tolist())
    assert owned <= set(classes.tolist()) and len(classes) < worker.C
    loss, g_lw, _, g_w = _dense_backbone_reference(inp, inp["labels_low"], classes=classes.tolist())
    assert abs(ranks[0]["C"]["loss"].item() - loss.item()) <= 1e-5 * max(1, loss.abs().item())
    assert_close(ranks[0]["C"]["lin_w_grad"], g_lw)
    assert_close(torch.cat([r["C"]["center_grad"] for r in ranks]), g_w)


@pytest.mark.slow
def test_distributed_optimizer_steps_and_reshard(dist_run):
    world, ranks = dist_run
    inp = worker.case_inputs()
    # r = 1: three sparse-AdamW steps at world W give the world-1 weights and moments
    pfc = worker.make_pfc(inp)
    opt = SparseRowAdamW(pfc.weight, **worker.OPT)
    lin = torch.nn.Linear(worker.DIN, worker.D)
    lin.weight.data.copy_(inp["lin_w"])
    lin.bias.data.copy_(inp["lin_b"])
    for step in range(3):
        pfc(lin(inp["x"]), inp["labels"].roll(step, 0), step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    states = [r["D/1.0"] for r in ranks]
    got = torch.cat([s["shard"]["weight"] for s in states])
    assert (got - pfc.weight.detach()).abs().max() < 1e-5
    got_v = torch.cat([s["optim"]["state"][0]["exp_avg"] for s in states])
    assert torch.allclose(got_v, opt.state[pfc.weight]["exp_avg"], rtol=1e-4, atol=1e-6)
    # r = 0.5: real sampled training states, resharded W -> 3 -> 1 and back, exactly
    sampled = [r["D/0.5"] for r in ranks]
    steps = torch.cat([s["optim"]["state"][0]["row_step"] for s in sampled])
    assert steps.min() < 3 and steps.max() == 3                          # some rows were not sampled every step
    _check_reshard(sampled, worker.C)


@pytest.mark.slow
def test_distributed_bad_label_raises_on_every_rank(dist_run):
    world, ranks = dist_run
    assert f"rank {world - 1}: invalid label {worker.C} at [1, 2]" in ranks[-1]["E"]
    for r in ranks[:-1]:
        assert f"invalid PartialFC input on rank(s) [{world - 1}]" in r["E"]


def test_per_slot_keeps_k_random_slots_per_step():
    """loss.slots = 2 of 4 labels: the loss is the reference per-slot loss on the 2 labels drawn for that step, and
    another step draws other slots."""
    from mlcd.dist import derive_seed
    C, D, B = 13, 8, 6
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(B, D, generator=g), torch.stack([torch.randperm(C, generator=g)[:4] for _ in range(B)])
    pfc = PartialFC(C, D, kind="per_slot", slots=2, sample_ratio=1.0, seed=5)
    losses = []
    for step in (0, 1):
        keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(derive_seed("slots", 5, step)))
        kept = labels.gather(1, keep.argsort(1)[:, :2])
        ref = reference_loss(emb.double(), pfc.weight.detach().double(), kept, kind="per_slot")
        losses.append(pfc(emb, labels, step).item())
        assert abs(losses[-1] - ref.item()) <= 1e-5 * abs(ref.item())
    assert losses[0] != losses[1]
    with pytest.raises(ValueError, match="loss.slots"):
        PartialFC(C, D, kind="mlcd", slots=2)


def test_initial_centers_do_not_depend_on_the_world_size():
    """Row i of the initial matrix is the same whichever rank of whichever world size holds it."""
    from mlcd.partial_fc import INIT_BLOCK
    C, D = INIT_BLOCK + 77, 4  # crosses a block boundary
    whole = _pfc(C, D, world=1).weight.detach()
    for world in (2, 3, 7):
        parts = [_pfc(C, D, rank=r, world=world).weight.detach() for r in range(world)]
        assert torch.equal(torch.cat(parts), whole), world
    assert not torch.equal(_pfc(C, D, seed=4).weight, whole)  # and it does depend on the seed
    assert abs(whole.std().item() - 0.01) < 1e-4


@torch.no_grad()
def _sparse_adamw_step_reference(opt):
    """SparseRowAdamW.step as first written (advanced-index gather and scatter): the step must match it bit for bit."""
    from mlcd.partial_fc import sparse_rows
    for group in opt.param_groups:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            all_rows, all_grads = sparse_rows(p.grad)
            st = opt.state[p]
            chunk = max(1, opt.chunk_elems // max(1, p.shape[1]))
            for i in range(0, all_rows.numel(), chunk):
                rows, grad = all_rows[i:i + chunk], all_grads[i:i + chunk]
                t = st["row_step"][rows] + 1
                st["row_step"][rows] = t
                w = p[rows].mul_(1 - lr * wd)
                m = st["exp_avg"][rows].lerp_(grad, 1 - beta1)
                v = st["exp_avg_sq"][rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                t = t.double()[:, None]
                step_size = (lr / (1 - beta1 ** t)).to(grad.dtype)
                bc2_sqrt = (1 - beta2 ** t).sqrt().to(grad.dtype)
                w.sub_(m / (v.sqrt() / bc2_sqrt).add_(eps) * step_size)
                st["exp_avg"][rows] = m
                st["exp_avg_sq"][rows] = v
                p[rows] = w


@pytest.mark.parametrize("D,chunk_rows", [(37, 5), (64, 1000)])
def test_sparse_adamw_bit_identical_to_the_reference_step(D, chunk_rows):
    """Random sparse gradients summed over micro-steps (rows repeat across them, so the gradient is uncoalesced),
    scattered rows, runs of consecutive rows (all rows, as at r = 1) and an empty gradient: weights, both moments and
    row_step equal the reference step's exactly after every step."""
    n, micro = 300, 3
    g = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(n, D, generator=g) * 0.01) for _ in range(2)]
    weights[1].data.copy_(weights[0].data)
    opts = [SparseRowAdamW(w, lr=0.01, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6) for w in weights]
    for opt in opts:
        opt.chunk_elems = chunk_rows * D
    for step in range(8):
        grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, D), (n, D))
        for _ in range(micro if step != 5 else 0):
            if step in (2, 6):                                     # every row: each chunk is a run
                rows = torch.arange(n)
            elif step == 4:                                        # a run of consecutive rows, then scattered ones
                rows = torch.cat([torch.arange(40, 40 + min(3 * chunk_rows, 150)), torch.arange(200, n, 7)])
            else:
                rows = torch.randperm(n, generator=g)[:int(torch.randint(1, n // 3, (1,), generator=g))].sort().values
            vals = torch.randn(rows.numel(), D, generator=g) * 10.0 ** float(torch.randint(-4, 1, (1,), generator=g))
            grad = grad + torch.sparse_coo_tensor(rows[None], vals, (n, D))
        for opt, w in zip(opts, weights):
            opt.param_groups[0]["lr"] = 0.01 * 0.7 ** step
            w.grad = grad.clone()
        opts[0].step()
        _sparse_adamw_step_reference(opts[1])
        for key in ("exp_avg", "exp_avg_sq", "row_step"):
            assert torch.equal(opts[0].state[weights[0]][key], opts[1].state[weights[1]][key]), (step, key)
        assert torch.equal(weights[0], weights[1]), step
    assert len(set(opts[0].state[weights[0]]["row_step"].tolist())) > 3    # rows really have different step counts
