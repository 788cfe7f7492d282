"""
Deployment of RetinaNet: export to TorchScript / ONNX with shapes that follow the input
(``graph``, ``exporters``) and the runtimes that run the exported files (``backends``).
See docs/deployment.md.
"""
from .backends import (  # noqa: F401
    BACKENDS,
    EagerRunner,
    OnnxRuntimeRunner,
    TorchScriptRunner,
    detect,
    load_runner,
    resize_for_test,
)
from .exporters import FORMATS, export_onnx, export_retinanet, export_torchscript  # noqa: F401
from .graph import ExportableRetinaNet, export_friendly_detections  # noqa: F401
