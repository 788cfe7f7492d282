from detectron2.utils.registry import Registry

FOCAL_LOSS_REGISTRY = Registry("FOCAL_LOSS")
FOCAL_LOSS_REGISTRY.__doc__ = """
Registry for dense classification losses (FL, FL*, alpha-balanced CE, OHEM, softmax FL).
A registered class is called with ``cfg`` and returns an ``nn.Module``.
"""


def build_classification_loss(cfg):
    name = cfg.MODEL.FOCAL.LOSS.NAME
    if name not in FOCAL_LOSS_REGISTRY:
        raise KeyError(
            f"MODEL.FOCAL.LOSS.NAME={name!r} is not a registered loss. "
            f"Registered: {sorted(k for k, _ in FOCAL_LOSS_REGISTRY)}"
        )
    return FOCAL_LOSS_REGISTRY.get(name)(cfg)
