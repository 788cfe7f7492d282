"""
The paper's detector: ``FocalRetinaNet`` (registered in detectron2's ``META_ARCH_REGISTRY``), its
heads (``FOCAL_HEAD_REGISTRY``), matcher, Detectron's anchors, inference, test-time augmentation
and the numerically neutral speed switches.
"""
from .anchor_generator import DetectronAnchorGenerator, detectron_cell_anchors  # noqa: F401
from .heads import FOCAL_HEAD_REGISTRY, build_focal_head  # noqa: F401
from .meta_arch import FocalRetinaNet, NonFiniteLossError  # noqa: F401
from .test_time_augmentation import FocalRetinaNetWithTTA  # noqa: F401
