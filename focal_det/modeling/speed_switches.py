"""
Speed switches of FocalRetinaNet (``MODEL.FOCAL.CHANNELS_LAST``, ``FOLD_FROZEN_BN``,
``COMPILE_HEAD``): the same function to float rounding, less time and memory. Measured in
docs/benchmarks.md (``benchmarks/model_bench.py``).

* :func:`convert_to_channels_last`: oneDNN's convolutions, forward and above all backward, are
  faster on NHWC tensors than on NCHW ones, which it reorders to a blocked layout and back at
  every call; the head's (N, A*K, H, W) outputs then turn into (N, H*W*A, K) with a free view.
* :func:`fold_frozen_bn_into_convs`: a FrozenBN after a convolution is an affine map per output
  channel, so ``bn(conv(x, W, b)) = conv(x, W * s, b * s + t)``. Folding it into the (tiny)
  weight at each call removes two full passes over the activation forward and one backward; the
  gradient with respect to W is unchanged (autograd goes through ``W * s``).
* :func:`compile_forward`: ``torch.compile`` of a module's forward, in place, so that parameter
  names (and checkpoints) do not change; if the compiler is missing or fails, a warning is given
  and the eager forward is used.
"""
import types
import warnings
from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import Tensor, nn

__all__ = [
    "apply_speed_options",
    "compile_forward",
    "convert_to_channels_last",
    "fold_frozen_bn_into_convs",
    "torch_compile_works",
]


# ---------------------------------------------------------------------------------------------
# channels-last
# ---------------------------------------------------------------------------------------------
def convert_to_channels_last(module: nn.Module) -> nn.Module:
    """
    Store the 4-D parameters of ``module`` (its convolutions' weights) in channels-last (NHWC)
    order, in place. Convolutions whose weight is channels-last produce channels-last outputs
    from any input, so the whole network then runs NHWC without converting the images.
    Values, names and shapes of the parameters are unchanged; only strides differ.
    """
    return module.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# FrozenBN folding
# ---------------------------------------------------------------------------------------------
def _conv_frozen_bn_forward(self: Conv2d, x: Tensor) -> Tensor:
    """``Conv2d.forward`` with its FrozenBN folded into the weight and bias (see module doc)."""
    bn = self.norm
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
    shift = bn.bias - bn.running_mean * scale
    weight = self.weight * scale.to(self.weight.dtype).reshape(-1, 1, 1, 1)
    if self.weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = shift if self.bias is None else self.bias * scale + shift
    x = F.conv2d(x, weight, bias.to(weight.dtype), self.stride, self.padding, self.dilation,
                 self.groups)
    if self.activation is not None:
        x = self.activation(x)
    return x


def fold_frozen_bn_into_convs(module: nn.Module) -> int:
    """
    In every detectron2 ``Conv2d`` of ``module`` whose ``norm`` is a ``FrozenBatchNorm2d``, fold
    the norm into the convolution at call time (the modules, their parameters, buffers and
    state-dict keys stay as they are, so checkpoints load unchanged and the BN statistics can
    still be changed afterwards). Returns the number of convolutions changed.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d):
            m.forward = types.MethodType(_conv_frozen_bn_forward, m)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# torch.compile with a fallback
# ---------------------------------------------------------------------------------------------
_COMPILE_PROBE: dict = {}


def torch_compile_works(device: str = "cpu") -> Tuple[bool, str]:
    """
    Whether ``torch.compile`` can build a forward and a backward kernel on ``device`` here (it
    needs a C++ compiler on CPU, Triton on GPU). Probed once per device with a tiny function;
    returns (ok, reason).
    """
    if device in _COMPILE_PROBE:
        return _COMPILE_PROBE[device]
    if not hasattr(torch, "compile"):
        result = (False, f"torch {torch.__version__} has no torch.compile")
    else:
        try:
            fn = torch.compile(lambda t: torch.relu(t * 2.0).sum(), fullgraph=True)
            x = torch.randn(8, device=device, requires_grad=True)
            fn(x).backward()
            result = (True, "")
        except Exception as e:  # any compiler/toolchain failure means "use eager"
            result = (False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    _COMPILE_PROBE[device] = result
    return result


class _CompiledForward:
    """
    The ``forward`` that :func:`compile_forward` gives a module: ``torch.compile`` of the
    module's own forward *function*, called with the module as ``self``. Bound to the module as
    a method, so a ``deepcopy`` of the module (EMA, TTA) calls it with the copy and runs the
    copy's parameters.
    """

    def __init__(self, eager, name, compile_kwargs):
        self.eager = eager
        self.compiled = torch.compile(eager, **compile_kwargs)
        self.name = name
        self.use = None  # None: undecided; then True (compiled) / False (eager)

    def _fallback(self, why):
        self.use = False
        warnings.warn(
            f"torch.compile of {self.name} is not usable ({why}); running it eagerly.",
            RuntimeWarning,
            stacklevel=4,
        )

    def __call__(self, module, *args, **kwargs):
        if self.use is None:
            flat = [a for a in args if isinstance(a, Tensor)] + [
                t for a in args if isinstance(a, (list, tuple)) for t in a
                if isinstance(t, Tensor)
            ]
            device = flat[0].device.type if flat else "cpu"
            ok, why = torch_compile_works(device)
            if ok:
                self.use = True
            else:
                self._fallback(why)
        if self.use:
            try:
                return self.compiled(module, *args, **kwargs)
            except Exception as e:  # compiler failure on these inputs: eager for good
                self._fallback(f"{type(e).__name__}: {e}")
        return self.eager(module, *args, **kwargs)


def compile_forward(module: nn.Module, **compile_kwargs) -> None:
    """
    Replace ``module.forward`` by its ``torch.compile``-d version, in place (parameter names
    and ``state_dict`` keys are unchanged, unlike wrapping the module in ``torch.compile``).
    At the first call, on the device of the first tensor argument, compilation is probed; if it
    is unavailable there, or fails on the first call, a warning is given once and the eager
    forward runs from then on.
    """
    # The function behind the bound forward (an instance's own override too), without its self.
    eager = getattr(module.forward, "__func__", type(module).forward)
    module.forward = types.MethodType(
        _CompiledForward(eager, type(module).__name__, compile_kwargs), module
    )


def apply_speed_options(
    model: nn.Module,
    *,
    channels_last: bool = False,
    fold_frozen_bn: bool = False,
    compile_head: bool = False,
) -> nn.Module:
    """
    Apply the numerically neutral speed-ups to a RetinaNet-like ``model`` (with ``backbone`` and
    ``head`` attributes), in place; see the module docstring. Call it after the parameters are
    on their final device: a later ``.to(device)`` keeps the channels-last strides.
    """
    if fold_frozen_bn:
        fold_frozen_bn_into_convs(model)
    if channels_last:
        convert_to_channels_last(model.backbone)
        convert_to_channels_last(model.head)
    if compile_head:
        compile_forward(model.head)
    return model
