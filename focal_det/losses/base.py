"""
The contract between a registered classification loss and ``FocalRetinaNet``.

The meta-architecture calls every loss the same way and never branches on its name::

    out = loss_module(pred_logits, gt_labels, anchors)

Args:
    pred_logits (Tensor): (N, R, L) logits of all anchors of all levels, any float dtype, with
        L = ``loss_module.num_logits`` per anchor (K for the sigmoid losses).
    gt_labels (Tensor): (N, R) int64 per-anchor labels: a class in [0, K), K = background,
        -1 = ignored. No (anchors x K) one-hot tensor is ever built from it.
    anchors (Tensor): (R, 4) anchor boxes, XYXY, shared by the N images (OHEM runs NMS on them).

Returns :class:`ClassificationLossOutput`:
    loss: float32 scalar, the SUM of the loss terms the module counts (not normalised).
    normalizer: ``None`` to let the meta-architecture divide by its foreground-anchor
        normaliser (the paper's rule); otherwise the number to divide both the classification
        and the box loss by (e.g. OHEM's number of selected anchors).
    box_mask: ``None`` for "box loss over all foreground anchors"; otherwise an (N, R) bool mask
        of the anchors whose box regression counts (e.g. OHEM's selected foreground anchors).
    stats: scalars the meta-architecture writes to detectron2's EventStorage.

The loss also says what the classification head predicts and what its logits mean, so that
the head and inference follow the loss without the meta-architecture knowing which it is:

* ``num_logits``: logits per anchor the head outputs (default K: one sigmoid per class; the
  softmax loss needs K + 1);
* ``prior_bias(prior_prob)``: the (num_logits,) bias of the head's last classification conv at
  initialisation, such that every anchor starts with foreground confidence ~pi (Sec 3.3;
  default: -log((1 - pi) / pi) for each of the K sigmoid logits);
* ``class_scores(logits)``: (..., num_logits) logits -> (..., K) per-class probabilities used
  at inference (default: the sigmoid of each logit);
* ``sigmoid_scores``: True when ``class_scores`` is that elementwise sigmoid of K logits; then
  inference ranks the logits and applies the sigmoid to the top candidates only
  (``inference.decode_top_candidates``, detectron2's detections). A loss whose scores are
  anything else sets it False, and inference ranks ``class_scores(logits)``.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["ClassificationLossOutput", "DenseClassificationLoss"]


@dataclass
class ClassificationLossOutput:
    loss: torch.Tensor
    normalizer: Optional[float] = None
    box_mask: Optional[torch.Tensor] = None
    stats: Dict[str, float] = field(default_factory=dict)


class DenseClassificationLoss(nn.Module):
    """Base class of the registered classification losses (see the module docstring)."""

    #: ``class_scores`` is the sigmoid of each of the K logits (see the module docstring).
    sigmoid_scores: bool = True

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    @property
    def num_logits(self) -> int:
        """Logits per anchor the classification head must output: K (one sigmoid per class)."""
        return self.num_classes

    def prior_bias(self, prior_prob: float) -> torch.Tensor:
        """(num_logits,) float64 initial bias: every sigmoid at ``prior_prob`` (Sec 3.3)."""
        return torch.full(
            (self.num_logits,), -math.log((1 - prior_prob) / prior_prob), dtype=torch.float64
        )

    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., num_logits) logits -> (..., K) per-class probabilities: the sigmoid."""
        return logits.sigmoid()

    def forward(
        self, pred_logits: torch.Tensor, gt_labels: torch.Tensor, anchors: torch.Tensor
    ) -> ClassificationLossOutput:
        raise NotImplementedError
