"""
Speed-ups of FocalRetinaNet that leave its numbers unchanged (to float rounding).

Where a RetinaNet R50-FPN training iteration spends its time on CPU (torch.profiler, one
800x1067 image, 2 threads; ``benchmarks/profile_train.py``, docs/benchmarks.md): 50-75 % in the
backward pass, almost all of it convolution backward, ~35 % in the backbone and head forward,
and in detectron2's RetinaNet ~5 % in the loss step (one-hot + fvcore's focal loss), which
focal_det's fused label-based loss removes. What is left to win is in the convolutions and the
elementwise passes around them:

* :func:`convert_to_channels_last` (``MODEL.FOCAL.CHANNELS_LAST``): oneDNN's convolutions, forward
  and above all backward, are faster on NHWC tensors than on NCHW ones on this CPU (measured:
  ``benchmarks/model_bench.py``, ``ours`` vs ``ours_fast``), since NCHW inputs are reordered to
  a blocked layout and back at every call. The head's
  (N, A*K, H, W) outputs then also turn into (N, H*W*A, K) with a free view instead of a copy.
* :func:`fold_frozen_bn_into_convs` (``MODEL.FOCAL.FOLD_FROZEN_BN``): a FrozenBN after a
  convolution is an affine map per output channel, so ``bn(conv(x, W, b)) = conv(x, W * s,
  b * s + t)``. Folding it into the (tiny) weight at each call removes two full passes over the
  activation in the forward pass and one in the backward pass, for each of the ~50 FrozenBN
  layers of a ResNet-50. The gradient with respect to W is unchanged (autograd goes through
  ``W * s``).
* :func:`compile_forward` (``MODEL.FOCAL.COMPILE_HEAD``): ``torch.compile`` of a module's forward,
  in place, so that parameter names (and checkpoints) do not change; if the compiler is missing
  or fails, a warning is printed and the eager forward is used.
* :func:`decode_top_candidates`: inference that takes the top-k of each level's *logits* before
  anything else and applies the sigmoid and the score threshold to those k only. detectron2
  applies the sigmoid to all H*W*A*K logits, compares all of them with the threshold and builds
  the (#passing, 2) index list of every passing score (millions for a confident model) before
  its top-k. Same detections: the top-k of the scores above the threshold are the top-k scores
  that are above the threshold.
"""
import logging
import math
import types
import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, batched_nms
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

__all__ = [
    "TopCandidatesInference",
    "apply_speed_options",
    "compile_forward",
    "convert_to_channels_last",
    "decode_top_candidates",
    "fold_frozen_bn_into_convs",
    "torch_compile_works",
]

logger = logging.getLogger(__name__)


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


def compile_forward(module: nn.Module, **compile_kwargs) -> None:
    """
    Replace ``module.forward`` by its ``torch.compile``-d version, in place (parameter names
    and ``state_dict`` keys are unchanged, unlike wrapping the module in ``torch.compile``).
    At the first call, on the device of the first tensor argument, compilation is probed; if it
    is unavailable there, or fails on the first call, a warning is given once and the eager
    forward runs from then on.
    """
    eager = module.forward
    compiled = torch.compile(eager, **compile_kwargs)
    state = {"use": None}  # None: undecided; then True (compiled) / False (eager)
    name = type(module).__name__

    def _fallback(why):
        state["use"] = False
        warnings.warn(
            f"torch.compile of {name} is not usable ({why}); running it eagerly.",
            RuntimeWarning,
            stacklevel=3,
        )

    def forward(*args, **kwargs):
        if state["use"] is None:
            flat = [a for a in args if isinstance(a, Tensor)] + [
                t for a in args if isinstance(a, (list, tuple)) for t in a
                if isinstance(t, Tensor)
            ]
            device = flat[0].device.type if flat else "cpu"
            ok, why = torch_compile_works(device)
            if ok:
                state["use"] = True
            else:
                _fallback(why)
        if state["use"]:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # compiler failure on these inputs: eager for good
                _fallback(f"{type(e).__name__}: {e}")
        return eager(*args, **kwargs)

    module.forward = forward


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
def decode_top_candidates(
    box2box_transform,
    anchors: Boxes,
    pred_logits: Tensor,
    pred_deltas: Tensor,
    score_thresh: float,
    topk_candidates: int,
    image_size: Tuple[int, int],
) -> Instances:
    """
    One level of RetinaNet inference, equal to detectron2's
    ``DenseDetector._decode_per_level_predictions`` applied to ``pred_logits.sigmoid()``, but
    touching the R_l*K logits only with cheap passes (a max over classes, one comparison):

    1. The k-th largest of the per-anchor maxima is a lower bound of the k-th largest logit
       (those k maxima are k logits), so every top-k logit is >= it; so is every logit whose
       probability passes ``score_thresh`` (>= logit(score_thresh), less a rounding margin).
       Only the logits above the larger of the two bounds are gathered (typically ~k of them).
    2. The top-k of those, their sigmoid, then detectron2's ``> score_thresh`` on the
       probabilities: exactly detectron2's set, since the top-k of the passing scores are the
       top-k scores that pass (the sigmoid is monotonic).
    3. If two kept probabilities are equal (float32 saturation of different logits, e.g. a
       diverged model), detectron2's result depends on how its top-k orders ties; the level is
       then decoded with detectron2's own procedure, so the output is always identical.

    Args:
        box2box_transform: the model's ``Box2BoxTransform``.
        anchors (Boxes): (R_l, 4) anchors of this level.
        pred_logits (Tensor): (R_l, K) classification LOGITS (not probabilities).
        pred_deltas (Tensor): (R_l, 4) box deltas.
        score_thresh (float): keep probabilities > this.
        topk_candidates (int): keep at most this many (anchor, class) pairs.
        image_size: (H, W) for the returned Instances.

    Returns:
        Instances with ``pred_boxes``, ``scores`` (probabilities, descending), ``pred_classes``.
    """
    num_anchors, num_classes = pred_logits.shape
    k = min(topk_candidates, num_anchors * num_classes)
    cut = -math.inf
    if 0 < k <= num_anchors:
        row_max = pred_logits.detach().amax(dim=1)
        cut = row_max.topk(k, sorted=False).values.min().item()
        if math.isnan(cut):
            # NaN logits (a diverged model): detectron2's "> score_thresh" drops them, so rank
            # them below everything, then bound again.
            pred_logits = pred_logits.nan_to_num(nan=-math.inf, posinf=math.inf)
            row_max = pred_logits.amax(dim=1)
            cut = row_max.topk(k, sorted=False).values.min().item()
    if 0.0 < score_thresh < 1.0:
        # float32 rounding of the sigmoid can only move a probability by ~1 ulp: 1e-3 in logit
        # space is far more than enough, and the exact test on probabilities follows.
        cut = max(cut, math.log(score_thresh / (1.0 - score_thresh)) - 1e-3)
    if cut > -math.inf:
        anchor_idxs, classes_idxs = (pred_logits >= cut).nonzero(as_tuple=True)
        cand_logits = pred_logits[anchor_idxs, classes_idxs]
    else:  # fewer anchors than k and no threshold: every pair is a candidate
        flat = torch.arange(num_anchors * num_classes, device=pred_logits.device)
        anchor_idxs, classes_idxs = flat // num_classes, flat % num_classes
        cand_logits = pred_logits.reshape(-1).nan_to_num(nan=-math.inf, posinf=math.inf)
    # One more than k, to see a tie at the boundary.
    top_logits, order = cand_logits.topk(min(k + 1, cand_logits.numel()))  # sorted, descending
    probs = top_logits.sigmoid()
    scores, order = probs[:k], order[:k]
    keep = scores > score_thresh
    scores, order = scores[keep], order[keep]
    tie_inside = bool((scores[1:] == scores[:-1]).any())
    tie_at_k = (
        probs.numel() > k and bool(probs[k] > score_thresh) and bool(probs[k] == probs[k - 1])
    )
    if tie_inside or tie_at_k:
        # Equal probabilities (e.g. saturated at 1.0) from different logits: which of them
        # detectron2 keeps, and in which order, is whatever its top-k over the probabilities
        # returns. Reproduce that exactly with its own procedure (rare; costs the full pass).
        return _decode_like_detectron2(
            box2box_transform, anchors, pred_logits, pred_deltas, score_thresh,
            topk_candidates, image_size,
        )
    anchor_idxs, classes_idxs = anchor_idxs[order], classes_idxs[order]
    pred_boxes = box2box_transform.apply_deltas(
        pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs]
    )
    return Instances(
        image_size, pred_boxes=Boxes(pred_boxes), scores=scores, pred_classes=classes_idxs
    )


def _decode_like_detectron2(
    box2box_transform, anchors, pred_logits, pred_deltas, score_thresh, topk_candidates,
    image_size,
) -> Instances:
    """detectron2's ``DenseDetector._decode_per_level_predictions`` on ``sigmoid(logits)``."""
    pred_scores = pred_logits.sigmoid()
    keep_idxs = pred_scores > score_thresh
    pred_scores = pred_scores[keep_idxs]
    topk_idxs = torch.nonzero(keep_idxs)
    num_topk = min(topk_idxs.shape[0], topk_candidates)
    pred_scores, idxs = pred_scores.topk(num_topk)
    anchor_idxs, classes_idxs = topk_idxs[idxs].unbind(dim=1)
    pred_boxes = box2box_transform.apply_deltas(
        pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs]
    )
    return Instances(
        image_size, pred_boxes=Boxes(pred_boxes), scores=pred_scores, pred_classes=classes_idxs
    )


class TopCandidatesInference:
    """
    Mixin for a detectron2 ``RetinaNet`` (sub)class: its ``forward_inference`` runs
    :func:`decode_top_candidates` on the logits instead of detectron2's sigmoid-everything
    decoding. Same detections (tested against detectron2's). ``inference_single_image`` and
    ``_decode_per_level_predictions`` are left as detectron2 defines them (they take
    probabilities), for callers that use them directly.

    Two hooks say what the head's logits are (defaults: detectron2's K sigmoid logits):
    ``logits_per_anchor()`` and ``class_scores(logits)``, with ``sigmoid_class_scores()``
    telling whether the scores are the elementwise sigmoid of K logits, which the logit fast
    path needs (it ranks logits: the sigmoid is monotone in each). Otherwise each image is
    decoded by detectron2's own ``inference_single_image`` on ``class_scores(logits)``.
    """

    def logits_per_anchor(self) -> int:
        """Classification logits per anchor in the head's output."""
        return self.num_classes

    def sigmoid_class_scores(self) -> bool:
        """Whether the per-class scores are the sigmoid of each of K logits."""
        return True

    def class_scores(self, logits: Tensor) -> Tensor:
        """(R, logits_per_anchor) logits -> (R, K) per-class probabilities."""
        return logits.sigmoid()

    def _split_dense_predictions(self, predictions: List[List[Tensor]]):
        """detectron2's ``_transpose_dense_predictions`` with a check of the logit count."""
        L = self.logits_per_anchor()
        A = self.anchor_generator.num_cell_anchors[0]
        channels = predictions[0][0].shape[1]
        if channels != A * L:
            raise ValueError(
                f"The head outputs {channels} classification channels per location, but the "
                f"loss reads {L} logits for each of the {A} cell anchors ({A * L}). Build the "
                "head for the loss (build_focal_head(..., num_classes=loss.num_logits))."
            )
        return self._transpose_dense_predictions(predictions, [L, 4])

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ):
        pred_logits, pred_anchor_deltas = self._split_dense_predictions(predictions)
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            deltas = [deltas_l[img_idx] for deltas_l in pred_anchor_deltas]
            if not self.sigmoid_class_scores():
                scores = [self.class_scores(logits_l[img_idx]) for logits_l in pred_logits]
                results.append(self.inference_single_image(anchors, scores, deltas, image_size))
                continue
            per_level = [
                decode_top_candidates(
                    self.box2box_transform,
                    anchors_l,
                    logits_l[img_idx],
                    deltas_l,
                    self.test_score_thresh,
                    self.test_topk_candidates,
                    image_size,
                )
                for anchors_l, logits_l, deltas_l in zip(anchors, pred_logits, deltas)
            ]
            pred = Instances.cat(per_level)
            keep = batched_nms(  # per-class NMS, as detectron2
                pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
            )
            results.append(pred[keep[: self.max_detections_per_image]])
        return results


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
