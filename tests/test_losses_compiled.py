"""
The compiled (torch.compile) path of the fused losses gives the eager path's results and the
closed forms', and one compilation serves every anchor / class count. Few distinct kernels are
compiled on purpose (each costs seconds of C++ compilation on CI): FL / FL* / CE from labels
(float32, and float64 at alpha 0.999), OHEM's per-anchor CE, FL dense, FL bf16.
"""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss as fv_focal
from test_losses import _closed_form, _labels_case

from focal_det.losses import functional as Fn
from focal_det.losses import (
    per_anchor_ce_from_labels,
    sigmoid_focal_loss,
    sigmoid_loss_from_labels,
)


def _case(M, K, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 4 - 2).to(dtype)
    labels = torch.randint(-1, K + 1, (M,), generator=g)
    return x, labels


def _fwd_bwd(fn, x, scale=0.5):
    x = x.clone().requires_grad_()
    loss = fn(x)
    (loss * scale).backward()
    return loss.detach(), x.grad


pytestmark = pytest.mark.skipif(
    not hasattr(torch, "compile"), reason="torch.compile is not available"
)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss="focal", alpha=0.25, gamma=2.0),
        dict(loss="star", alpha=0.25, gamma=2.0, beta=1.0),
        dict(loss="focal", alpha=-1.0, gamma=0.0),
    ],
    ids=["FL", "FLstar", "CE"],
)
def test_compiled_equals_eager_from_labels_for_varying_sizes(kwargs):
    torch._dynamo.utils.counters.clear()
    # all above 4096 elements: inductor guards on numel <= 4096 (a different reduction plan),
    # which the "auto" threshold keeps production away from anyway
    for M, K, seed in [(600, 7, 0), (517, 11, 1), (64, 80, 2)]:
        x, labels = _case(M, K, seed)
        ref_l, ref_g = _fwd_bwd(
            lambda a: sigmoid_loss_from_labels(a, labels, impl="eager", **kwargs), x
        )
        l, g = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="compiled", **kwargs), x)
        torch.testing.assert_close(l, ref_l, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-7)
        # both are the float64 closed form, to float32 rounding
        valid = labels >= 0
        onehot = F.one_hot(labels.clamp(min=0), K + 1)[:, :K].double()
        kind = "star" if kwargs["loss"] == "star" else "fl"
        closed, closed_grad = _closed_form(
            x.double(), onehot, kwargs["alpha"], kwargs["gamma"], kind, kwargs.get("beta", 0.0)
        )
        torch.testing.assert_close(l.double(), closed[valid].sum(), rtol=1e-5, atol=0)
        closed_grad = torch.where(valid[:, None], closed_grad, 0.0) * 0.5
        for grad in (g, ref_g):
            torch.testing.assert_close(grad.double(), closed_grad, rtol=1e-4, atol=1e-7)
    # dynamic shapes: one graph for all three (M, K), not one per size
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss="focal", gamma=2.0),
        dict(loss="star", gamma=2.0, beta=1.0),
        dict(loss="focal", gamma=0.0),
    ],
    ids=["FL", "FLstar", "CE"],
)
def test_compiled_float64_equals_closed_form_at_alpha_0999(kwargs):
    # alpha_t in the compute dtype in the compiled kernels too (0.999 is not a float32 number)
    x, labels, onehot = _labels_case(n=200, k=6, seed=8)
    valid = labels >= 0
    kind = "star" if kwargs["loss"] == "star" else "fl"
    closed, closed_grad = _closed_form(x, onehot, 0.999, kwargs["gamma"], kind,
                                       kwargs.get("beta", 0.0))
    l, g = _fwd_bwd(
        lambda a: sigmoid_loss_from_labels(a, labels, alpha=0.999, impl="compiled", **kwargs),
        x, scale=1.0,
    )
    torch.testing.assert_close(l, closed[valid].sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(g[valid], closed_grad[valid], rtol=1e-12, atol=0)
    assert (g[~valid] == 0).all()


def test_compiled_per_anchor_ce_equals_eager_and_closed_form():
    # OHEM's ranking score (no gradient), 0 for ignored anchors
    x, labels, onehot = _labels_case(n=700, k=9, seed=9, dtype=torch.float32)
    compiled = per_anchor_ce_from_labels(x, labels, impl="compiled")
    eager = per_anchor_ce_from_labels(x, labels, impl="eager")
    closed = _closed_form(x.double(), onehot.double(), -1.0, 0.0)[0].sum(1)
    closed = closed.where(labels >= 0, torch.zeros(()))
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled.double(), closed, rtol=1e-5, atol=0)


def test_compiled_second_backward_with_retain_graph_and_empty_inputs():
    x, labels = _case(600, 7, 10)
    x.requires_grad_()
    loss = sigmoid_loss_from_labels(x, labels, alpha=0.25, gamma=2.0, impl="compiled")
    (3 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    (3 * loss).backward()  # buffer consumed: the compiled kernel reruns on the saved inputs
    assert torch.equal(x.grad, first)
    empty = torch.zeros(0, 7, requires_grad=True)
    loss = sigmoid_loss_from_labels(empty, labels[:0], impl="compiled")  # nothing to compile
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == (0, 7)


def test_compiled_dense_drop_in_equals_fvcore_and_eager():
    g = torch.Generator().manual_seed(3)
    for M in (200, 333):
        x = torch.randn(M, 9, generator=g) * 5
        t = (torch.rand(M, 9, generator=g) < 0.2).float()
        ours_l, ours_g = _fwd_bwd(
            lambda a: sigmoid_focal_loss(a, t, 0.25, 2.0, "sum", impl="compiled"), x
        )
        eager_l, eager_g = _fwd_bwd(
            lambda a: sigmoid_focal_loss(a, t, 0.25, 2.0, "sum", impl="eager"), x
        )
        fv_l, fv_g = _fwd_bwd(lambda a: fv_focal(a, t, 0.25, 2.0, "sum"), x)
        torch.testing.assert_close(ours_l, eager_l, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_g, eager_g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours_l, fv_l, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_g, fv_g, rtol=1e-4, atol=1e-6)


def test_compiled_bfloat16_extreme_logits_finite_and_equal_to_eager():
    x, labels = _case(256, 8, 4, torch.bfloat16)
    x[::3, 0] = 1e4
    x[1::3, 1] = -1e4
    kw = dict(loss="focal", alpha=0.25, gamma=2.0)
    l, g = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="compiled", **kw), x)
    ref_l, ref_g = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="eager", **kw), x)
    assert g.dtype == torch.bfloat16 and l.dtype == torch.float32
    assert torch.isfinite(l) and torch.isfinite(g).all()
    torch.testing.assert_close(l, ref_l, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g.float(), ref_g.float(), rtol=1e-2, atol=1e-6)


def test_auto_uses_the_same_values_above_and_below_the_threshold():
    # auto compiles only from AUTO_COMPILE_MIN_NUMEL elements; the answer must not change.
    M = Fn.AUTO_COMPILE_MIN_NUMEL // 80 + 1
    x, labels = _case(M, 80, 5)
    kw = dict(loss="focal", alpha=0.25, gamma=2.0)
    auto_l, auto_g = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="auto", **kw), x)
    ref_l, ref_g = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="eager", **kw), x)
    torch.testing.assert_close(auto_l, ref_l, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(auto_g, ref_g, rtol=1e-5, atol=1e-7)
    assert Fn._resolve_impl("auto", x) == ("compiled" if Fn._compile_broken is None else "eager")
    assert Fn._resolve_impl("auto", x[:10]) == "eager"
    assert Fn._resolve_impl("auto", x.double()) == "eager"


def test_unknown_impl_is_rejected():
    x, labels = _case(10, 3, 6)
    with pytest.raises(ValueError, match="MODEL.FOCAL.LOSS.IMPL"):
        sigmoid_loss_from_labels(x, labels, impl="triton")


def test_default_alpha_is_fvcores():
    x, labels = _case(50, 4, 7)
    t = (torch.rand(50, 4) < 0.3).float()
    torch.testing.assert_close(sigmoid_focal_loss(x, t), fv_focal(x, t))
