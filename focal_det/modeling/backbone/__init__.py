from .mobilenet import MobileNetV2, build_mobilenet_v2_fpn_backbone  # noqa: F401
