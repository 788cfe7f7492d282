"""
The contract between a registered classification loss and ``FocalRetinaNet``.

The meta-architecture calls every loss the same way and never branches on its name::

    out = loss_module(pred_logits, gt_labels, anchors)

Args:
    pred_logits (Tensor): (N, R, K) logits of all anchors of all levels, any float dtype.
    gt_labels (Tensor): (N, R) int64 per-anchor labels: a class in [0, K), K = background,
        -1 = ignored. No (anchors x K) one-hot tensor is ever built from it.
    anchors (Tensor): (R, 4) anchor boxes, XYXY, shared by the N images (OHEM runs NMS on them).

Returns :class:`ClassificationLossOutput`:
    loss: float32 scalar, the SUM of the loss terms the module counts (not normalised).
    normalizer: ``None`` to let the meta-architecture divide by its foreground-anchor
        normaliser (the paper's rule); otherwise the number to divide both the classification
        and the box loss by (OHEM: the number of selected anchors).
    box_mask: ``None`` for "box loss over all foreground anchors"; otherwise an (N, R) bool mask
        of the anchors whose box regression counts (OHEM: the selected foreground anchors).
    stats: scalars the meta-architecture writes to detectron2's EventStorage.
"""
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

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(
        self, pred_logits: torch.Tensor, gt_labels: torch.Tensor, anchors: torch.Tensor
    ) -> ClassificationLossOutput:
        raise NotImplementedError
