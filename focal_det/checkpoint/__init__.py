"""Checkpoint loading for focal_det: Detectron (Caffe2) RetinaNet conversion, safe loading."""
from .checkpointer import (
    KNOWN_SHA256,
    FocalCheckpointer,
    WeightsUnavailableError,
    expected_cache_path,
)
from .detectron_names import (
    detectron_to_focal_names,
    focal_to_detectron_names,
    is_detectron_retinanet,
)

__all__ = [
    "KNOWN_SHA256",
    "FocalCheckpointer",
    "WeightsUnavailableError",
    "detectron_to_focal_names",
    "expected_cache_path",
    "focal_to_detectron_names",
    "is_detectron_retinanet",
]
