"""
The eager implementation of the fused losses (focal_det/losses/functional.py): chunking changes
nothing (chunk boundaries, a chunk of one row / one element), float16 / bfloat16 logits give
the float32 computation's bits, nothing logits-sized is allocated but the gradient, and
IMPL "auto": which implementation it picks, and the single warning when torch.compile fails.
Nothing here compiles (the compiled path: tests/test_losses_compiled.py).
"""
import warnings

import pytest
import torch
from test_losses import _closed_form, _dense_loss, _labels_case
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from focal_det.losses import functional as Fn
from focal_det.losses import per_anchor_ce_from_labels, sigmoid_loss_from_labels

LOSSES = {
    "FL": dict(loss="focal", alpha=0.25, gamma=2.0),
    "FL*": dict(loss="star", alpha=0.25, gamma=2.0, beta=1.0),
    "CE": dict(loss="focal", alpha=0.25, gamma=0.0),
}


def _fwd_bwd(fn, x, scale=1.0):
    x = x.clone().requires_grad_()
    loss = fn(x)
    (loss * scale).sum().backward()
    return loss.detach(), x.grad


def _all_outputs(x, labels, onehot, name):
    """Values and gradients of every eager entry point for one loss."""
    kw = LOSSES[name]
    out = {}
    for red in ("sum", "none"):
        out[f"labels_{red}"] = _fwd_bwd(
            lambda a: sigmoid_loss_from_labels(a, labels, reduction=red, impl="eager", **kw), x
        )
    for red in ("sum", "mean", "none"):
        out[f"dense_{red}"] = _fwd_bwd(lambda a: _dense_loss(name, a, onehot, 0.25, red), x)
    out["per_anchor_ce"] = (per_anchor_ce_from_labels(x, labels, impl="eager"), None)
    return out


@pytest.mark.parametrize("chunk", [1, 5, 3 * 7 + 2])
@pytest.mark.parametrize("name", list(LOSSES))
def test_chunking_changes_nothing(monkeypatch, name, chunk):
    # 53 rows x 7 classes: no chunk size divides them; chunk 1 and 5 (< K) give one row per chunk
    # from labels and one (or five) elements per chunk in the dense API
    x, labels, onehot = _labels_case(n=53, k=7, seed=2)
    ref = _all_outputs(x, labels, onehot, name)  # default chunk: everything in one chunk
    monkeypatch.setitem(Fn.EAGER_CHUNK_NUMEL, "cpu", chunk)
    got = _all_outputs(x, labels, onehot, name)
    for key, (val, grad) in ref.items():
        torch.testing.assert_close(got[key][0], val, rtol=1e-13, atol=0, msg=key)
        if grad is not None:
            torch.testing.assert_close(got[key][1], grad, rtol=1e-13, atol=0, msg=key)
    # and both are the closed form
    kw = LOSSES[name]
    kind = "star" if name == "FL*" else "fl"
    closed, closed_grad = _closed_form(x, onehot, 0.25, kw["gamma"], kind, kw.get("beta", 0.0))
    valid = labels >= 0
    torch.testing.assert_close(got["labels_none"][0][valid], closed[valid], rtol=1e-12, atol=0)
    torch.testing.assert_close(got["labels_none"][1][valid], closed_grad[valid], rtol=1e-12, atol=0)
    assert (got["labels_none"][1][~valid] == 0).all()
    torch.testing.assert_close(got["dense_none"][1], closed_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [1, 64, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_give_the_float32_computation(monkeypatch, dtype, chunk):
    # half logits are computed in float32: the same loss bits, the float32 gradient rounded once
    if chunk is not None:
        monkeypatch.setitem(Fn.EAGER_CHUNK_NUMEL, "cpu", chunk)
    x, labels, onehot = _labels_case(n=40, k=6, seed=3, dtype=dtype)
    for name, kw in LOSSES.items():
        l16, g16 = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="eager", **kw), x)
        l32, g32 = _fwd_bwd(
            lambda a: sigmoid_loss_from_labels(a, labels, impl="eager", **kw), x.float()
        )
        assert l16.dtype == torch.float32 and g16.dtype == dtype
        assert torch.equal(l16, l32) and torch.equal(g16, g32.to(dtype)), name
        d16, dg16 = _fwd_bwd(lambda a: _dense_loss(name, a, onehot, 0.25, "sum"), x)
        d32, dg32 = _fwd_bwd(lambda a: _dense_loss(name, a, onehot.float(), 0.25, "sum"), x.float())
        assert torch.equal(d16, d32) and torch.equal(dg16, dg32.to(dtype)), name


def test_retain_graph_second_backward_with_chunks(monkeypatch):
    monkeypatch.setitem(Fn.EAGER_CHUNK_NUMEL, "cpu", 10)
    x, labels, onehot = _labels_case(n=31, k=4, seed=4)
    x.requires_grad_()
    for loss in (sigmoid_loss_from_labels(x, labels, impl="eager", **LOSSES["FL"]),
                 _dense_loss("FL*", x, onehot, 0.25, "mean")):
        x.grad = None
        (2 * loss).backward(retain_graph=True)  # grad_out != 1: the in-place scaling
        first = x.grad.clone()
        x.grad = None
        (2 * loss).backward()  # buffer consumed: recomputed from the saved logits and targets
        assert torch.equal(x.grad, first)


class _LargeOutputs(TorchDispatchMode):
    """Records the storage of every op output with more than ``limit`` elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.storages = limit, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.limit:
                self.storages.setdefault(t.untyped_storage().data_ptr(), (str(func), t.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_nothing_logits_sized_is_allocated_but_the_gradient(monkeypatch, name, dtype):
    # (M, K) = (3000, 20) logits in chunks of 256 elements: every temporary is chunk-sized, or
    # (M,)-sized from the labels; the only tensor larger than (M,) is the returned gradient
    monkeypatch.setitem(Fn.EAGER_CHUNK_NUMEL, "cpu", 256)
    x, labels, onehot = _labels_case(n=3000, k=20, seed=5, dtype=dtype)
    x.requires_grad_()
    allowed = {x.untyped_storage().data_ptr(), onehot.untyped_storage().data_ptr()}
    for dense in (False, True):
        x.grad = None
        with _LargeOutputs(limit=x.shape[0]) as rec:
            if dense:
                loss = _dense_loss(name, x, onehot, 0.25, "sum")
            else:
                loss = sigmoid_loss_from_labels(x, labels, impl="eager", **LOSSES[name])
            loss.backward()
        new = {p: v for p, v in rec.storages.items() if p not in allowed}
        assert list(new) == [x.grad.untyped_storage().data_ptr()], (dense, new)
        assert x.grad.dtype == dtype
        with _LargeOutputs(limit=x.shape[0]) as rec:
            per_anchor_ce_from_labels(x.detach(), labels, impl="eager")
        assert not set(rec.storages) - allowed


def test_empty_and_classless_inputs():
    for M, K in ((0, 5), (4, 0)):
        x = torch.zeros(M, K, requires_grad=True)
        labels = torch.full((M,), 1)
        loss = sigmoid_loss_from_labels(x, labels, impl="eager")
        assert loss.item() == 0
        loss.backward()
        assert x.grad.shape == (M, K) and (x.grad == 0).all()
        assert per_anchor_ce_from_labels(x.detach(), labels, impl="eager").tolist() == [0.0] * M


# --- IMPL "auto" ------------------------------------------------------------------------------
@pytest.fixture
def compile_state(monkeypatch):
    """A process in which torch.compile has not been tried (restored afterwards)."""
    monkeypatch.setattr(Fn, "_compiled_cache", {})
    monkeypatch.setattr(Fn, "_compile_broken", None)
    return monkeypatch


def test_auto_compiles_only_large_float_tensors(compile_state):
    n = Fn.AUTO_COMPILE_MIN_NUMEL
    big = torch.empty(n // 8, 8)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert Fn._resolve_impl("auto", big.to(dtype)) == "compiled"
    assert Fn._resolve_impl("auto", big.double()) == "eager"  # float64: exact eager
    assert Fn._resolve_impl("auto", big[:-1]) == "eager"  # below the threshold
    assert Fn._resolve_impl("eager", big) == "eager"
    assert Fn._resolve_impl("compiled", big[:1]) == "compiled"  # asked for: any size
    assert Fn._resolve_impl("compiled", big[:0]) == "eager"  # nothing to compute
    with pytest.raises(ValueError, match="MODEL.FOCAL.LOSS.IMPL"):
        Fn._resolve_impl("fast", big)


def test_compile_failure_falls_back_to_eager_with_one_warning(compile_state):
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            calls.append(fn.__name__)
            raise RuntimeError("inductor exploded (test)")

        return run

    compile_state.setattr(torch, "compile", broken_compile)
    x, labels, onehot = _labels_case(n=Fn.AUTO_COMPILE_MIN_NUMEL // 8, k=8, seed=6,
                                     dtype=torch.float32)
    kw = LOSSES["FL"]
    ref = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="eager", **kw), x)
    # asked for explicitly, the failure is raised, not hidden
    with pytest.raises(RuntimeError, match="inductor exploded"):
        sigmoid_loss_from_labels(x, labels, impl="compiled", **kw)
    with pytest.warns(RuntimeWarning, match="inductor exploded") as record:
        got = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="auto", **kw), x)
    assert len(record) == 1
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])  # the eager result
    n_calls = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls are eager without a word
        got = _fwd_bwd(lambda a: sigmoid_loss_from_labels(a, labels, impl="auto", **kw), x)
        _fwd_bwd(lambda a: _dense_loss("CE", a, onehot, 0.25, "sum"), x)
        per_anchor_ce_from_labels(x, labels)
    assert torch.equal(got[1], ref[1]) and len(calls) == n_calls  # no compile attempted again
    assert Fn._compile_broken is not None and Fn._resolve_impl("auto", x) == "eager"
    with pytest.raises(RuntimeError, match="failed earlier"):
        sigmoid_loss_from_labels(x, labels, impl="compiled", **kw)
