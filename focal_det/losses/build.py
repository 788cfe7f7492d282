from detectron2.utils.registry import Registry

from ..utils.registry import get_registered

FOCAL_LOSS_REGISTRY = Registry("FOCAL_LOSS")
FOCAL_LOSS_REGISTRY.__doc__ = """
Registry for dense classification losses (FL, FL*, alpha-balanced CE, OHEM, softmax FL).
A registered class is called with ``cfg`` and returns an ``nn.Module``.
"""


def build_classification_loss(cfg):
    """The loss named by ``MODEL.FOCAL.LOSS.NAME``, built from ``cfg``."""
    loss = get_registered(FOCAL_LOSS_REGISTRY, "MODEL.FOCAL.LOSS.NAME", cfg.MODEL.FOCAL.LOSS.NAME)
    return loss(cfg)
