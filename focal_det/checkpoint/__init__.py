"""
Checkpoints of focal_det: atomic, never of diverged weights, loaded without running code
(``SafeDetectionCheckpointer``); the Detectron (Caffe2) RetinaNet conversion, SHA-256 checks and
offline messages on top (``FocalCheckpointer``); whether loaded weights hold the model.
"""
from .checkpointer import (
    KNOWN_SHA256,
    FocalCheckpointer,
    WeightsUnavailableError,
    expected_cache_path,
)
from .detectron_names import detectron_to_focal_names, is_detectron_retinanet
from .missing_weights import MissingWeightsError, check_eval_weights, weights_problem
from .safe_checkpointer import (
    CheckpointFormatError,
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
)

__all__ = [
    "KNOWN_SHA256",
    "CheckpointFormatError",
    "FocalCheckpointer",
    "MissingWeightsError",
    "SafeDetectionCheckpointer",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "check_eval_weights",
    "detectron_to_focal_names",
    "expected_cache_path",
    "is_detectron_retinanet",
    "weights_problem",
]
