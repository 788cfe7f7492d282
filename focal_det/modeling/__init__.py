from .anchor_generator import DetectronAnchorGenerator, detectron_cell_anchors  # noqa: F401
from .backbone import MobileNetV2, build_mobilenet_v2_fpn_backbone  # noqa: F401
from .heads import FOCAL_HEAD_REGISTRY, build_focal_head  # noqa: F401
from .meta_arch import FocalRetinaNet  # noqa: F401
