"""
The CPU demo of ``make demo`` (``python -m focal_det.demo``): RetinaNet with the focal loss on the
deepforest tree crowns, on an ImageNet MobileNetV2-FPN. Nothing of the paper's code depends on it.

Importing it (``import focal_det`` does) registers the MobileNetV2-FPN backbone in detectron2's
``BACKBONE_REGISTRY`` and the datasets ``deepforest_trees_{train,val,trainsub,holdout}``, built
on first use from the ``deepforest`` wheel on PyPI.
"""
from . import mobilenet  # noqa: F401  (registers build_mobilenet_v2_fpn_backbone)
from .deepforest import (  # noqa: F401
    DEEPFOREST_SPLITS,
    build_deepforest_trees,
    deepforest_trees_root,
    register_deepforest_trees,
)

register_deepforest_trees()
