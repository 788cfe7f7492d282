"""
focal_det: Focal Loss for Dense Object Detection (RetinaNet) as a detectron2 plugin.

Importing this package registers, as a side effect:
  * the meta-architecture ``FocalRetinaNet`` in detectron2's ``META_ARCH_REGISTRY``;
  * ``DetectronAnchorGenerator`` (Detectron's anchors) in detectron2's
    ``ANCHOR_GENERATOR_REGISTRY``;
  * the heads in ``focal_det.modeling.FOCAL_HEAD_REGISTRY``;
  * the classification losses in ``focal_det.losses.FOCAL_LOSS_REGISTRY``;
  * the demo's ``build_mobilenet_v2_fpn_backbone`` in detectron2's ``BACKBONE_REGISTRY`` and its
    datasets ``deepforest_trees_*`` (``focal_det.demo``).

The layout and which module may import which: docs/architecture.md.
"""
__version__ = "0.1.0"

from . import (
    demo,  # noqa: E402,F401  (registers the demo's backbone and datasets)
    losses,  # noqa: E402,F401  (registers the losses)
    modeling,  # noqa: E402,F401  (registers the meta-architecture, heads, anchor generator)
)
from .config import add_focal_config  # noqa: E402,F401

__all__ = ["add_focal_config", "demo", "losses", "modeling", "__version__"]
