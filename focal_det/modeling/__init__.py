from .heads import FOCAL_HEAD_REGISTRY, build_focal_head  # noqa: F401
from .meta_arch import FocalRetinaNet  # noqa: F401
