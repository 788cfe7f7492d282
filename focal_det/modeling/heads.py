"""
Dense heads of FocalRetinaNet, chosen by name (``MODEL.FOCAL.HEAD_NAME``) from
``FOCAL_HEAD_REGISTRY``.
"""
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead as _D2RetinaNetHead
from detectron2.utils.registry import Registry

from ..utils.registry import get_registered

__all__ = ["FOCAL_HEAD_REGISTRY", "RetinaNetHead", "build_focal_head", "check_anchors_per_level"]

FOCAL_HEAD_REGISTRY = Registry("FOCAL_HEAD")
FOCAL_HEAD_REGISTRY.__doc__ = """
Registry for dense heads of FocalRetinaNet. A registered class is called with
``(cfg, input_shape: List[ShapeSpec], **overrides)`` and returns an nn.Module whose forward maps a
list of per-level features to ``(logits, box_deltas)``: lists of (N, A*L, Hi, Wi) and
(N, A*4, Hi, Wi). ``overrides`` are what the classification loss decides (see
``build_focal_head``): ``num_classes`` = L logits per anchor and ``cls_prior_bias``.
"""


def check_anchors_per_level(counts: Dict[str, int]):
    """
    ``counts``: cell anchors per location of each feature level. RetinaNetHead's output convs
    serve every level, so the counts must be equal (ValueError naming them otherwise).
    """
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"The anchor config gives {counts} cell anchors per level (sizes x aspect ratios), "
            "but RetinaNetHead shares its output convs across levels, so every level needs the "
            "same number of anchors per location: give every level the same number of "
            "MODEL.ANCHOR_GENERATOR.SIZES and ASPECT_RATIOS (the paper: 3 scales x 3 ratios)."
        )


@FOCAL_HEAD_REGISTRY.register()
class RetinaNetHead(_D2RetinaNetHead):
    """
    The paper's head (Sec 4, Fig 3): a classification subnet and a box subnet with the same
    structure and separate parameters, shared across pyramid levels. Each is
    ``MODEL.RETINANET.NUM_CONVS`` (4) x (3x3 conv with C = FPN channels, ReLU) followed by a 3x3
    output conv: K*A sigmoid logits for classes, 4*A class-agnostic box deltas. Weights are
    initialised N(0, 0.01), biases 0, except the classification bias
    ``-log((1 - pi) / pi)`` with ``pi = MODEL.RETINANET.PRIOR_PROB`` (0.01), so that every anchor
    starts with foreground confidence ~pi (the "prior" of Sec 3.3).

    It *is* detectron2's ``RetinaNetHead`` (same parameter names and initialisation), so
    detectron2's RetinaNet checkpoints load strictly into FocalRetinaNet. Two additions: a clear
    error, instead of an assert, when the anchor generator gives levels different numbers of
    cell anchors (one output conv serves all levels, so A must be the same everywhere); and
    ``cls_prior_bias``, the initial bias of each anchor's logits when the loss's are not K
    sigmoids at pi (the softmax loss: K + 1 logits, background and classes biased apart).
    """

    @configurable
    def __init__(self, *, cls_prior_bias: Optional[Sequence[float]] = None, **kwargs):
        """
        Args:
            cls_prior_bias: (num_classes,) initial bias of the logits of every cell anchor (the
                loss's ``prior_bias``); None keeps detectron2's -log((1 - pi) / pi) everywhere.
            kwargs: detectron2's ``RetinaNetHead`` arguments (``num_classes`` = logits per
                anchor).
        """
        super().__init__(**kwargs)
        if cls_prior_bias is not None:
            bias = torch.as_tensor(cls_prior_bias, dtype=torch.float64)
            num_logits = kwargs["num_classes"]
            if bias.shape != (num_logits,):
                raise ValueError(
                    f"cls_prior_bias has shape {tuple(bias.shape)}; the head predicts "
                    f"{num_logits} logits per anchor, so it needs ({num_logits},)."
                )
            with torch.no_grad():
                # channel a * L + k is logit k of cell anchor a (detectron2's layout)
                self.cls_score.bias.copy_(bias.repeat(kwargs["num_anchors"]))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        num_anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        names = list(cfg.MODEL.RETINANET.IN_FEATURES)
        if len(names) != len(num_anchors):
            names = [f"level {i}" for i in range(len(num_anchors))]
        check_anchors_per_level(dict(zip(names, num_anchors)))
        return super().from_config(cfg, input_shape)


def build_focal_head(cfg, input_shape: List[ShapeSpec], **overrides):
    """
    Build the head named by ``cfg.MODEL.FOCAL.HEAD_NAME`` for the given per-level feature shapes.

    Args:
        overrides: constructor arguments that the classification loss decides, passed on to the
            registered head (detectron2's ``@configurable`` puts them over the config's):
            ``num_classes`` = the loss's ``num_logits`` and ``cls_prior_bias`` = its
            ``prior_bias(MODEL.RETINANET.PRIOR_PROB)`` (``focal_det/losses/base.py``).
    """
    head = get_registered(FOCAL_HEAD_REGISTRY, "MODEL.FOCAL.HEAD_NAME", cfg.MODEL.FOCAL.HEAD_NAME)
    return head(cfg, input_shape, **overrides)
