from detectron2.modeling.meta_arch.retinanet import RetinaNetHead as _D2RetinaNetHead
from detectron2.utils.registry import Registry

FOCAL_HEAD_REGISTRY = Registry("FOCAL_HEAD")
FOCAL_HEAD_REGISTRY.__doc__ = """
Registry for dense heads of FocalRetinaNet. A registered class is called with
``(cfg, input_shape: List[ShapeSpec])`` and returns an nn.Module whose forward maps a list of
per-level features to ``(logits, box_deltas)``: lists of (N, A*K, Hi, Wi) and (N, A*4, Hi, Wi).
"""


@FOCAL_HEAD_REGISTRY.register()
class RetinaNetHead(_D2RetinaNetHead):
    """The paper's head (Sec 4), parameter-compatible with detectron2's RetinaNetHead."""


def build_focal_head(cfg, input_shape):
    name = cfg.MODEL.FOCAL.HEAD_NAME
    if name not in FOCAL_HEAD_REGISTRY:
        raise KeyError(
            f"MODEL.FOCAL.HEAD_NAME={name!r} is not a registered head. "
            f"Registered: {sorted(k for k, _ in FOCAL_HEAD_REGISTRY)}"
        )
    return FOCAL_HEAD_REGISTRY.get(name)(cfg, input_shape)
