"""mlcd/loss.py: the fused loss against the float64 plain-autograd reference of the paper's equations (Eq. 3, 4, 5)
(mlcd.loss.reference_loss):
loss value and gradients w.r.t. embeddings and centers, both margin forms, padding, duplicates, all-padding rows,
batch size 1; finite gradients at cos = +-1; label validation."""
import math

import pytest
import torch

from mlcd.loss import dense_margin_loss, dedupe_labels, reference_loss

VARIANTS = [(k, mt) for k in ("mlcd", "mlc", "single", "per_slot") for mt in ("arcface", "cosface")]


def reference_grads(emb, centers, labels, **kw):
    e64 = emb.detach().double().requires_grad_()
    w64 = centers.detach().double().requires_grad_()
    loss = reference_loss(e64, w64, labels, **kw)
    ge, gw = torch.autograd.grad(loss, [e64, w64])
    return loss.detach(), ge, gw


def assert_close(actual, expected, rel=2e-5):
    """fp32 vs float64: |a - e| <= rel * max|e| (+ a tiny floor), elementwise."""
    expected = expected.double()
    tol = rel * max(expected.abs().max().item(), 1e-3)
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


def _data(B=6, C=13, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(C, D, generator=g)


LABELS = torch.tensor([[1, 2, -1, -1], [3, 3, 4, 3], [-1, -1, -1, -1], [0, 12, 5, 9], [7, -1, 7, -1],
                       [12, 11, 10, 6]])


@pytest.mark.parametrize("kind,margin_type", VARIANTS)
@pytest.mark.parametrize("scale", [64.0, 8.0])
def test_matches_dense_reference(kind, margin_type, scale):
    emb, centers = _data()
    emb.requires_grad_()
    centers.requires_grad_()
    loss = dense_margin_loss(emb, centers, LABELS, kind, scale, 0.3, margin_type)
    ge, gw = torch.autograd.grad(loss, [emb, centers])
    ref, re, rw = reference_grads(emb, centers, LABELS, kind=kind, s=scale, margin_type=margin_type)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert_close(ge, re)
    assert_close(gw, rw)


@pytest.mark.parametrize("kind,margin_type", VARIANTS)
def test_batch_one_and_single_label_column(kind, margin_type):
    emb, centers = _data(B=1)
    for labels in (torch.tensor([[4, -1, 4]]), torch.tensor([[6]])):
        e, w = emb.clone().requires_grad_(), centers.clone().requires_grad_()
        loss = dense_margin_loss(e, w, labels, kind, 64.0, 0.3, margin_type)
        ge, gw = torch.autograd.grad(loss, [e, w])
        ref, re, rw = reference_grads(emb, centers, labels, kind=kind, margin_type=margin_type)
        assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
        assert_close(ge, re)
        assert_close(gw, rw)


def test_all_padding_batch_gives_zero_loss_and_zero_grads():
    emb, centers = _data(B=3)
    emb.requires_grad_()
    loss = dense_margin_loss(emb, centers, torch.full((3, 2), -1), "mlcd")
    (g,) = torch.autograd.grad(loss, [emb])
    assert loss.item() == 0.0 and torch.all(g == 0)


def test_padding_rows_do_not_change_the_mean():
    emb, centers = _data()
    keep = (LABELS >= 0).any(1)
    a = dense_margin_loss(emb, centers, LABELS, "mlcd")
    b = dense_margin_loss(emb[keep], centers, LABELS[keep], "mlcd")
    assert torch.allclose(a, b, rtol=1e-6)


def test_own_positives_are_not_negatives_but_other_samples_positives_are():
    """Two samples, disjoint labels: moving sample 1's positive center only changes sample 0's NEGATIVE term."""
    emb, centers = _data(B=2, C=5)
    labels = torch.tensor([[0, 1], [2, -1]])
    centers.requires_grad_()
    loss = dense_margin_loss(emb, centers, labels, "mlcd", 64.0, 0.0, "cosface")
    (gw,) = torch.autograd.grad(loss, [centers])
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    w = torch.nn.functional.normalize(centers.detach().double(), dim=1)
    cos = 64 * (e @ w.t())
    # sample 0: negatives {2, 3, 4}; sample 1: negatives {0, 1, 3, 4}
    want = (torch.log1p(torch.exp(-cos[0, [0, 1]]).sum()) + torch.log1p(torch.exp(cos[0, [2, 3, 4]]).sum())
            + torch.log1p(torch.exp(-cos[1, [2]]).sum()) + torch.log1p(torch.exp(cos[1, [0, 1, 3, 4]]).sum())) / 2
    assert abs(loss.item() - want.item()) < 1e-4 * abs(want.item())
    assert gw[2].abs().sum() > 0


@pytest.mark.parametrize("kind", ["mlcd", "mlc", "single"])
def test_arcface_finite_at_cos_plus_minus_one(kind):
    """Embeddings exactly on (and opposite to) their positive centers: finite loss and gradients."""
    centers = torch.eye(4, 8)
    emb = torch.stack([centers[0], -centers[1], centers[2] * 3]).requires_grad_()
    w = centers.clone().requires_grad_()
    labels = torch.tensor([[0, 3], [1, -1], [2, 2]])
    loss = dense_margin_loss(emb, w, labels, kind, 64.0, 0.3, "arcface")
    ge, gw = torch.autograd.grad(loss, [emb, w])
    assert torch.isfinite(loss) and torch.isfinite(ge).all() and torch.isfinite(gw).all()
    # the forward value is exact at cos = 1: phi(1) = cos(m)
    one = dense_margin_loss(torch.eye(1, 8), torch.eye(2, 8), torch.tensor([[0]]), "mlcd", 64.0, 0.3)
    assert abs(one.item() - (math.log1p(math.exp(-64 * math.cos(0.3))) + math.log1p(math.exp(0.0)))) < 1e-5


def test_dedupe_keeps_order_and_first_occurrence():
    got = dedupe_labels(torch.tensor([[5, 3, 5, -1, 3], [-1, -1, 2, 2, 2]]))
    assert got.tolist() == [[5, 3, -1, -1, -1], [-1, -1, 2, -1, -1]]


@pytest.mark.parametrize("labels,needle", [
    (torch.tensor([[0, 1], [2, 13]]), "invalid label 13 at [1, 1]"),
    (torch.tensor([[0, -2], [2, 3]]), "invalid label -2 at [0, 1]"),
    (torch.tensor([[0.0, 1.0]]), "dtype torch.float32"),
    (torch.tensor([[0, 1]], dtype=torch.int32), "dtype torch.int32"),
    (torch.tensor([0, 1]), "shape (2,)"),
])
def test_invalid_labels_raise(labels, needle):
    emb, centers = _data(B=labels.shape[0] if labels.ndim else 1)
    with pytest.raises(ValueError) as err:
        dense_margin_loss(emb, centers, labels)
    assert needle in str(err.value)
