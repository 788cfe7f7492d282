"""
The losses of the paper as pure functions, fused with the sigmoid and with the closed-form
gradients of Appendix B.

Notation (docs/paper.md, "Losses"): per anchor and class, ``x`` is the logit, ``y`` = +1 for the
positive class and -1 otherwise, ``x_t = y * x``, ``p_t = sigmoid(x_t)``, ``alpha_t`` = alpha for
positives and 1 - alpha for negatives (1 when alpha < 0, as in fvcore).

* FL  = alpha_t (1 - p_t)^gamma (-log p_t),
  dFL/dx = y alpha_t (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1)
* FL* = alpha_t (-log sigmoid(gamma x_t + beta)) / gamma,  dFL*/dx = y alpha_t (p*_t - 1)
* alpha-balanced CE = FL with gamma = 0 (the same code: "FL at gamma 0 is CE" holds bit for bit).

Two ways to give the targets:

* dense, drop-in compatible with ``fvcore.nn.sigmoid_focal_loss``: ``targets`` has the shape of
  ``inputs`` and holds 0 / 1 (a target is positive where it is > 0.5; soft targets are not
  supported, use fvcore for those);
* from labels (the detector's path): ``labels`` (M,) int64, a class in [0, K), K = background,
  -1 = ignored. The (M, K) one-hot target is never materialised: the comparison
  ``label == class`` happens inside the fused loop (compiled), or for the foreground anchors
  only, chunk by chunk (eager).

Every loss is a :class:`torch.autograd.Function`. Its forward pass produces the loss and, when
the logits require grad, the Appendix-B gradient d(loss)/dx (written once, in the logits' dtype:
the only logits-sized tensor it allocates, and the one autograd hands back). Its backward pass
is the chain rule in place in that buffer (skipped when grad_output is 1). Nothing else is
saved: no p_t, no one-hot, no intermediate. All arithmetic is done in float32, constants
included (float64 stays float64, for gradcheck and the closed-form tests).

Implementations (``impl``, config ``MODEL.FOCAL.LOSS.IMPL``), the same formulas, so the values
agree to float rounding (tested):

* ``"compiled"``: the kernels through ``torch.compile``, one fused loop over the logits. The
  fastest where a compiler works (C++ on CPU, Triton on GPU), but each new loss / parameters /
  dtype costs a compilation of seconds, and an error is raised if it fails.
* ``"eager"``: plain PyTorch ops on chunks of ``EAGER_CHUNK_NUMEL`` logits, in a few reused
  buffers (see "Eager implementation" below): no warm-up, any device and dtype, bounded
  temporaries; on CPU far faster than fvcore's function, not as fast as compiled
  (docs/benchmarks.md).
* ``"auto"`` (default): compiled for float16 / bfloat16 / float32 logits of at least
  ``AUTO_COMPILE_MIN_NUMEL`` elements, on any device, while torch.compile has not failed in this
  process; eager otherwise: float64 (tests, gradcheck: exact, never worth compiling), small
  tensors (the compilation and guards cost more than they save; the test suite never compiles
  unless it asks), empty tensors and TorchScript. A compile failure makes this process eager
  for good, with one RuntimeWarning.
"""
import math
import threading
import types
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
    "balanced_sigmoid_ce",
    "sigmoid_loss_from_labels",
    "per_anchor_ce_from_labels",
    "AUTO_COMPILE_MIN_NUMEL",
    "EAGER_CHUNK_NUMEL",
    "IMPLS",
]


IMPLS = ("auto", "compiled", "eager")
# Below this many elements the compiled kernel is not worth its guard checks (and the test
# suite, which uses small tensors, never triggers a compilation unless it asks for one).
AUTO_COMPILE_MIN_NUMEL = 1 << 16
_COMPILABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("none", "mean", "sum")


# ---------------------------------------------------------------------------------------------
# Elementwise math of the compiled implementation. ``pos`` is a bool tensor broadcastable to
# ``x``: True where the target is the positive class.
# ---------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log1p(e: torch.Tensor) -> torch.Tensor:
    """
    log(1 + e), accurate to a few ulps, from one log: with u = fl(1 + e), log(u) * e / (u - 1)
    cancels the rounding of 1 + e (Goldberg's trick; u == 1 means e is below the ulp of 1, where
    log1p(e) = e). Written out because the vectorised CPU log1p that torch.compile emits is many
    times slower than log: it dominated the fused loss.
    """
    u = 1.0 + e
    return torch.where(u == 1.0, e, torch.log(u) * (e / (u - 1.0)))


def _pt_parts(x: torch.Tensor, pos: torch.Tensor):
    """
    Stable pieces of the binary sigmoid loss, from one exp and one log1p.

    Returns (ce, p_t, q) with ce = -log p_t and q = 1 - p_t, all finite for any finite x.
    """
    z = torch.where(pos, x, -x)  # x_t
    e = torch.exp(-x.abs())  # in (0, 1]: no overflow whatever |x|
    r = 1.0 / (1.0 + e)  # sigmoid(|x|)
    er = e * r  # sigmoid(-|x|), computed without the cancellation of 1 - sigmoid(|x|)
    nonneg = z >= 0
    p_t = torch.where(nonneg, r, er)
    q = torch.where(nonneg, er, r)
    ce = torch.clamp(-z, min=0.0) + _log1p(e)  # softplus(-x_t) = -log p_t
    return ce, p_t, q


def _alpha_t(pos: torch.Tensor, alpha: float, like: torch.Tensor):
    # 0-dim tensors of the compute dtype: torch.where of two Python floats would give float32,
    # i.e. alpha rounded to float32 even in a float64 loss (5e-8 relative off at alpha 0.999).
    return torch.where(pos, like.new_full((), alpha), like.new_full((), 1.0 - alpha))


def _focal_value(x, pos, alpha: float, gamma: float):
    ce, _, q = _pt_parts(x, pos)
    loss = ce if gamma == 0 else ce * q.pow(gamma)
    return loss if alpha < 0 else loss * _alpha_t(pos, alpha, loss)


def _focal_grad(x, pos, alpha: float, gamma: float):
    # Appendix B: y (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1) = -y q^gamma (gamma p_t ce + q)
    ce, p_t, q = _pt_parts(x, pos)
    if gamma == 0:
        g = q  # dCE/dx = y (p_t - 1)
    else:
        g = q.pow(gamma) * (gamma * p_t * ce + q)
    g = torch.where(pos, -g, g)
    return g if alpha < 0 else g * _alpha_t(pos, alpha, g)


def _star_value(x, pos, alpha: float, gamma: float, beta: float):
    z = torch.where(pos, x, -x)
    s = gamma * z + beta  # x*_t; FL* = softplus(-x*_t) / gamma
    loss = (torch.clamp(-s, min=0.0) + _log1p(torch.exp(-s.abs()))) / gamma
    return loss if alpha < 0 else loss * _alpha_t(pos, alpha, loss)


def _star_grad(x, pos, alpha: float, gamma: float, beta: float):
    # Appendix B: dFL*/dx = y (p*_t - 1) = -y sigmoid(-x*_t)
    z = torch.where(pos, x, -x)
    s = gamma * z + beta
    e = torch.exp(-s.abs())
    r = 1.0 / (1.0 + e)
    q = torch.where(s >= 0, e * r, r)  # 1 - p*_t
    g = torch.where(pos, -q, q)
    return g if alpha < 0 else g * _alpha_t(pos, alpha, g)


def _value(kind, x, pos, alpha, gamma, beta):
    if kind == "focal":
        return _focal_value(x, pos, alpha, gamma)
    return _star_value(x, pos, alpha, gamma, beta)


def _grad(kind, x, pos, alpha, gamma, beta):
    if kind == "focal":
        return _focal_grad(x, pos, alpha, gamma)
    return _star_grad(x, pos, alpha, gamma, beta)


# ---------------------------------------------------------------------------------------------
# Kernels of the compiled implementation, written so that torch.compile turns each into a
# single loop (run eagerly, each op would be a pass over, and an allocation of, (M, K) floats).
#
# The forward kernel (of either implementation) computes the loss AND, when the logits require
# grad, the Appendix-B gradient d(loss)/dx in the same pass (sharing exp / log / the division);
# the backward pass is then only the chain-rule scaling by grad_output, done in place in that
# buffer. Peak memory is the same as recomputing in backward (one logits-sized gradient either
# way: it is the buffer autograd hands back), and the transcendental arithmetic, which bounds the
# CPU time, is done once instead of twice. A second backward through the same graph
# (retain_graph=True) finds the buffer consumed and reruns the forward kernel on the saved
# logits and targets (same bits).
# ---------------------------------------------------------------------------------------------
def _dense_pos(targets):
    return targets > 0.5


def _label_pos_valid(labels, num_classes: int, device):
    # (M, 1) == (1, K) broadcasts inside the kernel: no (M, K) one-hot in memory when compiled.
    # The comparison is done on float32 (exact for K < 2^24): the compiled CPU loop then compares
    # one float vector instead of two int64 vectors per 16 logits (a faster forward).
    lab = labels.to(torch.float32).unsqueeze(1)
    classes = torch.arange(num_classes, device=device, dtype=torch.float32)
    return lab == classes, lab >= 0


def _reduce(loss, reduction):
    if reduction == "none":
        return loss
    if reduction == "anchor":  # per-anchor sum over classes (OHEM's ranking score)
        return loss.sum(1)
    return loss.sum() if reduction == "sum" else loss.mean()


def _dense_forward(x, targets, kind, alpha, gamma, beta, reduction, with_grad):
    xc = x.to(_compute_dtype(x))
    pos = _dense_pos(targets)
    loss = _reduce(_value(kind, xc, pos, alpha, gamma, beta), reduction)
    if not with_grad:
        return loss, None
    g = _grad(kind, xc, pos, alpha, gamma, beta)
    if reduction == "mean":
        g = g / x.numel()
    return loss, g.to(x.dtype)


def _label_forward(x, labels, kind, alpha, gamma, beta, reduction, with_grad):
    xc = x.to(_compute_dtype(x))
    pos, valid = _label_pos_valid(labels, x.shape[1], x.device)
    loss = torch.where(valid, _value(kind, xc, pos, alpha, gamma, beta), 0.0)
    loss = _reduce(loss, reduction)
    if not with_grad:
        return loss, None
    g = torch.where(valid, _grad(kind, xc, pos, alpha, gamma, beta), 0.0)
    return loss, g.to(x.dtype)


_KERNELS = {"dense": _dense_forward, "label": _label_forward}


# ---------------------------------------------------------------------------------------------
# Eager implementation: the same closed forms, chunk by chunk, in reused buffers.
#
# Plain PyTorch runs one op at a time, each a pass over its operands; on full (anchors x K)
# tensors every pass goes to DRAM and every intermediate is a logits-sized allocation (the
# kernels above run eagerly would make ~20 of them). Here the logits are processed in chunks of
# EAGER_CHUNK_NUMEL elements whose intermediates live in a few cache-sized buffers, reused by
# every chunk (ops with out= and in place): the only logits-sized allocations are the gradient
# and, for reduction "none", the loss.
#
# From labels, every row is first computed as background (all K targets negative), so the bulk
# of the work has no label comparison and no select; the foreground rows (~0.1% of the anchors)
# are then recomputed with their class and overwritten, and the ignored rows zeroed.
#
# Each term is written as a negative target's, at u = -x_t (x for a negative, -x for a positive):
#   FL:  l = sigmoid(u)^gamma softplus(u),  dl/du = sigmoid(u)^gamma (gamma sigmoid(-u)
#        softplus(u) + sigmoid(u))   [Appendix B: 1 - p_t = sigmoid(u), -log p_t = softplus(u)]
#   FL*: l = softplus(gamma u - beta) / gamma,  dl/du = sigmoid(gamma u - beta)
# times alpha_t, and d/dx = -y d/du. On CPU the vectorised log1p and exp of PyTorch are much
# slower than log and exp2: log1p(e) is taken from one log (_softplus_into) and, in float32,
# exp(z) as exp2(z log2 e).
# ---------------------------------------------------------------------------------------------
# Elements per chunk, by device type. CPU: the chunk's buffers stay in the cache, and each op
# is still large enough to be split over the threads. Elsewhere (GPU) chunks are larger, to
# amortise kernel launches; the temporaries stay bounded either way.
EAGER_CHUNK_NUMEL = {"cpu": 1 << 18, "default": 1 << 22}


def _chunk_numel(device: torch.device) -> int:
    return max(1, EAGER_CHUNK_NUMEL.get(device.type, EAGER_CHUNK_NUMEL["default"]))


class _Scratch:
    """Named flat buffers of ``numel`` elements, allocated on first use, reused by every chunk."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel, self.dtype, self.device = numel, dtype, device
        self._bufs: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}

    def __call__(self, name: str, shape, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        key = (name, dtype or self.dtype)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(self.numel, dtype=key[1], device=self.device)
        return buf[: math.prod(shape)].view(shape)


def _scale_(t: torch.Tensor, w) -> torch.Tensor:
    return t if isinstance(w, float) and w == 1.0 else t.mul_(w)


_NEG_LOG2_E = -1.0 / math.log(2.0)


def _softplus_into(v, s):
    """softplus(v) = max(v, 0) + log1p(exp(-|v|)) in s("sp"); uses s("t0".."t2")."""
    shape = v.shape
    e = torch.abs(v, out=s("t0", shape))
    if e.dtype == torch.float64:
        e.neg_().exp_()
    else:  # 2^(-|v| log2 e): a few ulps for |v| < 10 (30 at 80), and exp2 is faster on CPU
        e.mul_(_NEG_LOG2_E).exp2_()
    u = torch.add(e, 1.0, out=s("t1", shape))
    c = torch.sub(u, 1.0, out=s("t2", shape)).sub_(e)  # the rounding error of 1 + e (exact)
    # log1p(e) = log(u) - c / u to first order; c instead of c / u adds c e / u, under half an
    # ulp of log1p(e) since |c| <= ulp(1) / 2
    log1p = torch.log(u, out=e).sub_(c)
    return torch.clamp(v, min=0.0, out=s("sp", shape)).add_(log1p)


def _negative_form(kind, v, gamma, beta, wl, wg, loss, grad, s):
    """
    ``loss`` = wl * l(v) and ``grad`` = wg * dl/du(v) (skipped when None), l the loss of a
    negative target at u = v (see above); wl, wg: floats or tensors broadcastable to v.
    """
    shape = v.shape
    if kind == "star":
        v = torch.mul(v, gamma, out=s("t3", shape)).sub_(beta)  # gamma u - beta
    sp = _softplus_into(v, s)
    if kind == "star":
        _scale_(torch.div(sp, gamma, out=loss), wl)
        if grad is not None:
            _scale_(torch.sigmoid(v, out=grad), wg)
        return
    q = torch.sigmoid(v, out=s("t0", shape))  # 1 - p_t
    if gamma == 0:  # CE
        torch.mul(sp, wl, out=loss)
        if grad is not None:
            torch.mul(q, wg, out=grad)
        return
    # (1 - p_t)^gamma, times the weight when the loss and the gradient share it (one pass less)
    if gamma == 2:
        qg = torch.mul(q, q, out=s("t1", shape))
    else:
        qg = torch.pow(q, gamma, out=s("t1", shape))
    if isinstance(wl, float) and isinstance(wg, float) and wl == wg:
        _scale_(qg, wl)
        wl = wg = 1.0
    _scale_(torch.mul(qg, sp, out=loss), wl)
    if grad is not None:
        # p_t = 1 - (1 - p_t): where that cancels (u >> 0) it is multiplied by -log p_t ~ u and
        # added to 1 - p_t ~ 1, so the gradient keeps a relative error under gamma u ulps.
        p = torch.mul(q, -1.0, out=s("t2", shape)).add_(1.0)
        t = torch.addcmul(q, p, sp, value=gamma, out=p)  # gamma p_t (-log p_t) + 1 - p_t
        _scale_(torch.mul(qg, t, out=grad), wg)


def _signed_weights(pos, alpha, grad_scale, s):
    """alpha_t and -y alpha_t * grad_scale for a (chunk) bool target mask, in the compute dtype."""
    def c(val):
        return torch.full((), val, dtype=s.dtype, device=s.device)

    if alpha < 0:
        wl = 1.0
        wg = torch.where(pos, c(-grad_scale), c(grad_scale), out=s("wg", pos.shape))
    else:
        wl = torch.where(pos, c(alpha), c(1.0 - alpha), out=s("wl", pos.shape))
        wg = torch.where(
            pos, c(-alpha * grad_scale), c((1.0 - alpha) * grad_scale), out=s("wg", pos.shape)
        )
    return wl, wg


def _eager_block(x, pos, kind, alpha, gamma, beta, grad_scale, loss, grad, s):
    """
    Loss and d(loss)/dx of one chunk ``x`` into ``loss`` / ``grad`` (compute dtype; grad may be
    None). ``pos``: bool mask of the positive targets, or None when all targets are negative.
    """
    if x.dtype != s.dtype:  # float16 / bfloat16 logits: computed in float32
        x = s("x", x.shape).copy_(x)
    if pos is None:
        w = 1.0 if alpha < 0 else 1.0 - alpha
        _negative_form(kind, x, gamma, beta, w, w * grad_scale, loss, grad, s)
        return
    u = torch.where(pos, torch.neg(x, out=s("u", x.shape)), x, out=s("u", x.shape))  # -x_t
    wl, wg = _signed_weights(pos, alpha, grad_scale, s)
    _negative_form(kind, u, gamma, beta, wl, wg, loss, grad, s)


def _eager_dense_forward(x, targets, kind, alpha, gamma, beta, reduction, with_grad):
    """
    The dense kernel's contract (``_dense_forward``), over chunks of the flattened logits (a
    non-contiguous input is flattened by one copy).
    """
    cdt = _compute_dtype(x)
    xf, tf = x.reshape(-1), targets.reshape(-1)
    n = xf.numel()
    grad = torch.empty(n, dtype=x.dtype, device=x.device) if with_grad else None
    out = torch.empty(n, dtype=cdt, device=x.device) if reduction == "none" else None
    grad_scale = 1.0 / n if reduction == "mean" else 1.0
    chunk = _chunk_numel(x.device)
    s = _Scratch(min(chunk, n), cdt, x.device)
    partial = []
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        pos = torch.gt(tf[a:b], 0.5, out=s("pos", (b - a,), torch.bool))
        loss = out[a:b] if out is not None else s("loss", (b - a,))
        g = None
        if grad is not None:
            g = grad[a:b] if grad.dtype == cdt else s("grad", (b - a,))
        _eager_block(xf[a:b], pos, kind, alpha, gamma, beta, grad_scale, loss, g, s)
        if grad is not None and grad.dtype != cdt:
            grad[a:b].copy_(g)
        if out is None:
            partial.append(loss.sum())
    if grad is not None:
        grad = grad.view(x.shape)
    if out is not None:
        return out.view(x.shape), grad
    total = torch.stack(partial).sum() if partial else torch.zeros((), dtype=cdt, device=x.device)
    return (total / n if reduction == "mean" else total), grad


def _eager_label_forward(x, labels, kind, alpha, gamma, beta, reduction, with_grad):
    """The label kernel's contract (``_label_forward``): background first, then the fg rows."""
    M, K = x.shape
    cdt = _compute_dtype(x)
    grad = torch.empty((M, K), dtype=x.dtype, device=x.device) if with_grad else None
    if reduction == "none":
        out = torch.empty((M, K), dtype=cdt, device=x.device)
    else:
        out = torch.empty(M, dtype=cdt, device=x.device)  # per-anchor sums
    if M and K:
        rows = max(1, _chunk_numel(x.device) // K)
        s = _Scratch(min(rows, M) * K, cdt, x.device)

        # 1. every row as background: all K targets negative
        for a in range(0, M, rows):
            b = min(M, a + rows)
            loss = out[a:b] if reduction == "none" else s("loss", (b - a, K))
            g = None
            if grad is not None:
                g = grad[a:b] if grad.dtype == cdt else s("grad", (b - a, K))
            _eager_block(x[a:b], None, kind, alpha, gamma, beta, 1.0, loss, g, s)
            if reduction != "none":
                torch.sum(loss, 1, out=out[a:b])
            if grad is not None and grad.dtype != cdt:
                grad[a:b].copy_(g)
        # 2. the foreground rows again, with their positive class
        fg = torch.nonzero((labels >= 0) & (labels < K)).squeeze(1)
        classes = torch.arange(K, device=x.device)
        for a in range(0, fg.numel(), rows):
            idx = fg[a : a + rows]
            n = idx.numel()
            pos = torch.eq(labels[idx].unsqueeze(1), classes, out=s("pos", (n, K), torch.bool))
            loss = s("loss", (n, K))
            g = s("grad", (n, K)) if grad is not None else None
            _eager_block(x[idx], pos, kind, alpha, gamma, beta, 1.0, loss, g, s)
            if reduction == "none":
                out.index_copy_(0, idx, loss)
            else:
                out.index_copy_(0, idx, loss.sum(1))
            if grad is not None:
                grad.index_copy_(0, idx, g.to(grad.dtype))
        # 3. ignored rows: no loss, no gradient
        ignored = torch.nonzero(labels < 0).squeeze(1)
        if ignored.numel():
            out.index_fill_(0, ignored, 0.0)
            if grad is not None:
                grad.index_fill_(0, ignored, 0.0)
    else:
        out.zero_()
        if grad is not None:
            grad.zero_()
    if reduction == "none" or reduction == "anchor":
        return out, grad
    return out.sum(), grad


_EAGER = {"dense": _eager_dense_forward, "label": _eager_label_forward}

_compiled_cache: Dict[Tuple, Callable] = {}
_compiled_lock = threading.Lock()
_compile_broken: Optional[str] = None


def _get_compiled(mode: str, kind, alpha, gamma, beta, reduction, with_grad):
    """
    One compiled kernel per (target mode, loss, parameters, reduction, with_grad). The loss
    parameters are baked in as constants (gamma = 2 becomes a multiply instead of a pow); the
    tensor sizes are dynamic, so one compilation serves every anchor count and class count.
    """
    key = (mode, kind, alpha, gamma, beta, reduction, with_grad)
    fn = _compiled_cache.get(key)
    if fn is None:
        with _compiled_lock:
            fn = _compiled_cache.get(key)
            if fn is None:
                base = _KERNELS[mode]

                def kernel(x, t):
                    return base(x, t, kind, alpha, gamma, beta, reduction, with_grad)

                # Dynamo counts recompilations per code object, and every closure made here
                # shares one: a process that uses several losses/parameters would exhaust the
                # recompile limit (8) and fail. A fresh code object per key gives each kernel
                # its own compilation cache.
                name = f"focal_kernel_{len(_compiled_cache)}"
                kernel = types.FunctionType(
                    kernel.__code__.replace(co_name=name),
                    kernel.__globals__,
                    name,
                    kernel.__defaults__,
                    kernel.__closure__,
                )
                fn = torch.compile(kernel, dynamic=True, fullgraph=True)
                _compiled_cache[key] = fn
    return fn


def _resolve_impl(impl: str, x: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(
            f"impl={impl!r} is not one of {IMPLS} (config key MODEL.FOCAL.LOSS.IMPL)."
        )
    if impl == "eager" or x.numel() == 0:
        return "eager"  # size-0 tensors would each cost a specialised compilation
    if impl == "compiled":
        if _compile_broken is not None:
            raise RuntimeError(
                "MODEL.FOCAL.LOSS.IMPL='compiled' but torch.compile failed earlier in this "
                f"process ({_compile_broken}); use 'auto' or 'eager'."
            )
        return "compiled"
    # auto
    if (
        _compile_broken is None
        and x.dtype in _COMPILABLE_DTYPES
        and x.numel() >= AUTO_COMPILE_MIN_NUMEL
        and not torch.jit.is_scripting()
    ):
        return "compiled"
    return "eager"


def _run(impl, strict, mode, kind, alpha, gamma, beta, reduction, with_grad, x, t):
    """Run the forward kernel; returns ((loss, grad or None), the implementation that ran)."""
    global _compile_broken
    if impl == "compiled":
        try:
            fn = _get_compiled(mode, kind, alpha, gamma, beta, reduction, with_grad)
            return fn(x, t), "compiled"
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            if strict:  # the user asked for "compiled": say so rather than fall back
                raise
            with _compiled_lock:
                if _compile_broken is None:  # warn once; later calls resolve to eager directly
                    first = str(e).splitlines()[0] if str(e) else ""
                    _compile_broken = f"{type(e).__name__}: {first}"
                    warnings.warn(
                        f"torch.compile of the fused focal loss failed ({_compile_broken}); "
                        "using the eager implementation from now on "
                        "(MODEL.FOCAL.LOSS.IMPL 'eager' skips the attempt).",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    return _EAGER[mode](x, t, kind, alpha, gamma, beta, reduction, with_grad), "eager"


class _FusedSigmoidLoss(torch.autograd.Function):
    """
    Forward: the loss, and the Appendix-B gradient when the logits need one, in one pass.
    Backward: that gradient times grad_output, in place (see the kernels' comment).
    Saved: the logits and targets (references, no copy) for a possible second backward.
    """

    @staticmethod
    def forward(ctx, x, t, mode, kind, alpha, gamma, beta, reduction, impl):
        strict = impl == "compiled"
        impl = _resolve_impl(impl, x)
        with_grad = bool(ctx.needs_input_grad[0])
        (out, grad), impl = _run(
            impl, strict, mode, kind, alpha, gamma, beta, reduction, with_grad, x, t
        )
        ctx.save_for_backward(x, t)
        ctx.grad = grad
        ctx.params = (mode, kind, alpha, gamma, beta, reduction, impl, strict)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mode, kind, alpha, gamma, beta, reduction, impl, strict = ctx.params
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # consumed by an earlier backward (retain_graph=True): recompute
            x, t = ctx.saved_tensors
            (_, grad), _ = _run(impl, strict, mode, kind, alpha, gamma, beta, reduction, True, x, t)
        # d(loss)/dx was computed in forward; apply the chain rule in place (a no-op skipped
        # for the common loss.backward() on CPU, where checking the value costs no sync).
        if not (grad_out.numel() == 1 and grad_out.device.type == "cpu" and grad_out.item() == 1):
            grad.mul_(grad_out)
        return grad, None, None, None, None, None, None, None, None


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {_REDUCTIONS}.")


def _dense(inputs, targets, kind, alpha, gamma, beta, reduction, impl):
    _check_reduction(reduction)
    if inputs.shape != targets.shape:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have the same "
            "shape (targets are 0/1 floats; for integer labels use sigmoid_loss_from_labels)."
        )
    return _FusedSigmoidLoss.apply(
        inputs, targets, "dense", kind, float(alpha), float(gamma), float(beta), reduction, impl
    )


# ---------------------------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------------------------
def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = -1,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """
    FL (Sec 3.2), drop-in for ``fvcore.nn.sigmoid_focal_loss`` (same signature and values).

    Args:
        inputs: (*) logits, any float dtype.
        targets: (*) same shape, 0/1 (float or bool): 1 for the positive class.
        alpha: weight of positives in [0, 1]; negatives get 1 - alpha. < 0: no weighting.
            The default is fvcore's (-1, no weighting), so that replacing fvcore's call by this
            one changes nothing; the paper's RetinaNet passes 0.25 (torchvision's default).
        gamma: focusing parameter >= 0 (0 gives alpha-balanced CE).
        reduction: "none" (per element), "mean" or "sum". The loss is float32 (float64 for
            float64 inputs) whatever the input dtype, as fvcore's (a float16 sum of 10^7 terms
            would overflow); the gradient has the dtype of ``inputs``.
        impl: "auto" / "compiled" / "eager" (see the module docstring).
    """
    if gamma < 0:
        raise ValueError(f"gamma={gamma} must be >= 0 for the focal loss.")
    return _dense(inputs, targets, "focal", alpha, gamma, 0.0, reduction, impl)


def sigmoid_focal_loss_star(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    gamma: float,
    beta: float,
    alpha: float = -1,
    reduction: str = "none",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """
    FL* (Appendix A): ``-log(sigmoid(gamma * x_t + beta)) / gamma``, alpha_t-weighted when
    ``alpha >= 0``. Unlike fvcore's version (which has no beta), both parameters are free;
    with ``beta = 0`` it equals fvcore's ``sigmoid_focal_loss_star(inputs, targets, alpha, gamma)``.

    Args: as :func:`sigmoid_focal_loss`; ``gamma > 0`` (steepness), ``beta`` (shift).
    """
    if not gamma > 0:
        raise ValueError(f"gamma={gamma} must be > 0 for FL* (it divides the loss).")
    return _dense(inputs, targets, "star", alpha, gamma, beta, reduction, impl)


def balanced_sigmoid_ce(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    reduction: str = "none",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """
    alpha-balanced sigmoid CE (Sec 3.1): ``-alpha_t log(p_t)``; plain CE when ``alpha < 0``.
    It is FL with gamma = 0, computed by the same code.

    Args: as :func:`sigmoid_focal_loss`.
    """
    return _dense(inputs, targets, "focal", alpha, 0.0, 0.0, reduction, impl)


def sigmoid_loss_from_labels(
    pred_logits: torch.Tensor,
    gt_labels: torch.Tensor,
    *,
    loss: str = "focal",
    alpha: float = 0.25,
    gamma: float = 2.0,
    beta: float = 0.0,
    reduction: str = "sum",
    impl: str = "auto",
) -> torch.Tensor:
    """
    The detector's entry point: a sigmoid loss from integer labels, never building a one-hot.

    Args:
        pred_logits: (..., K) logits, any float dtype (e.g. (N, R, K)).
        gt_labels: (...) int64 labels matching the leading dims: a class in [0, K), K for
            background (all K targets negative), -1 for ignored (contributes nothing, no gradient).
        loss: "focal" (FL; gamma = 0 is alpha-balanced CE, and alpha < 0 plain CE) or "star" (FL*).
        alpha, gamma, beta: the loss parameters (beta only for FL*).
        reduction: "sum" (float32 scalar, float64 for float64 logits), or "none" ((..., K),
            zero for ignored anchors, float32 / float64 likewise).
        impl: "auto" / "compiled" / "eager".
    """
    if loss not in ("focal", "star"):
        raise ValueError(f"loss={loss!r} must be 'focal' or 'star'.")
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction={reduction!r} must be 'sum' or 'none' for label inputs.")
    if gt_labels.shape != pred_logits.shape[:-1]:
        raise ValueError(
            f"gt_labels {tuple(gt_labels.shape)} must match pred_logits {tuple(pred_logits.shape)} "
            "without its last (class) dimension."
        )
    if loss == "focal" and gamma < 0:
        raise ValueError(f"gamma={gamma} must be >= 0 for the focal loss.")
    if loss == "star" and not gamma > 0:
        raise ValueError(f"gamma={gamma} must be > 0 for FL*.")
    K = pred_logits.shape[-1]
    x = pred_logits.reshape(gt_labels.numel(), K)  # (not -1: K may be 0)
    labels = gt_labels.reshape(-1).to(torch.int64)
    out = _FusedSigmoidLoss.apply(
        x, labels, "label", loss, float(alpha), float(gamma), float(beta), reduction, impl
    )
    return out.reshape(pred_logits.shape) if reduction == "none" else out


@torch.no_grad()
def per_anchor_ce_from_labels(
    pred_logits: torch.Tensor, gt_labels: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    """
    (..., K) logits, (...) labels -> (...) plain sigmoid CE summed over the K classes, float32
    (float64 for float64 logits; 0 for ignored anchors). No gradient: OHEM uses it only to rank
    anchors.
    """
    K = pred_logits.shape[-1]
    x = pred_logits.reshape(gt_labels.numel(), K)  # (not -1: K may be 0)
    labels = gt_labels.reshape(-1).to(torch.int64)
    strict = impl == "compiled"
    (out, _), _ = _run(
        _resolve_impl(impl, x), strict, "label", "focal", -1.0, 0.0, 0.0, "anchor", False, x, labels
    )
    return out.reshape(gt_labels.shape)
