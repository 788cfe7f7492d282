"""
Inference backends for the exported files (``demo.py --backend``, ``benchmarks/export_bench.py``).

A *runner* maps one image tensor (3, H, W) float32 (INPUT.FORMAT, 0-255, test-resized) to
``(boxes (R, 4), scores (R,), classes (R,) int64)`` torch tensors in that input's pixels:

* :class:`TorchScriptRunner`: ``torch.jit.load`` of ``model.ts``;
* :class:`OnnxRuntimeRunner`: an onnxruntime CPU session of ``model.onnx``;
* :class:`EagerRunner`: the PyTorch model itself (``model([{"image": image}])``).

:func:`detect` runs a runner on an RGB image and returns detectron2 ``Instances`` in the
original image's pixels, as the eager model returns them for ``{"image", "height", "width"}``;
:func:`resize_for_test` makes a runner's input from an image.
"""
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor

__all__ = [
    "BACKENDS",
    "EagerRunner",
    "OnnxRuntimeRunner",
    "TorchScriptRunner",
    "detect",
    "load_runner",
    "resize_for_test",
]

BACKENDS = ("pytorch", "torchscript", "onnxruntime")
Detections = Tuple[Tensor, Tensor, Tensor]


class EagerRunner:
    """The eager model (FocalRetinaNet or detectron2's RetinaNet) behind the runner interface."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Detections:
        inst = self.model([{"image": image}])[0]["instances"].to("cpu")
        return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


class TorchScriptRunner:
    """A ``model.ts`` written by ``tools/export_model.py --format torchscript``."""

    def __init__(self, path: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            self.module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Detections:
        return self.module(image.to(torch.float32))


class OnnxRuntimeRunner:
    """
    A ``model.onnx`` written by ``tools/export_model.py --format onnx``, in an onnxruntime
    session on the CPU with all graph optimisations (constant folding, Conv+BN/ReLU fusion,
    NCHWc layouts). ``num_threads``: intra-op threads (None: onnxruntime's default, one per
    core).
    """

    def __init__(self, path: str, num_threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(
                "--backend onnxruntime needs onnxruntime: pip install -e '.[export]'"
            ) from e
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, image: Tensor) -> Detections:
        x = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
        boxes, scores, classes = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes)


def load_runner(backend: str, weights: str, num_threads: Optional[int] = None):
    """The runner of an exported file: ``backend`` "torchscript" or "onnxruntime"."""
    if backend == "torchscript":
        return TorchScriptRunner(weights)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(weights, num_threads=num_threads)
    raise ValueError(
        f"backend {backend!r}: exported files run with 'torchscript' (model.ts) or "
        f"'onnxruntime' (model.onnx); 'pytorch' takes a checkpoint (.pth)."
    )


def resize_for_test(cfg, image_rgb: np.ndarray) -> Tensor:
    """
    The model input for one (H, W, 3) uint8 RGB image: (3, H', W') uint8 in ``INPUT.FORMAT``,
    resized as detectron2's test loader does (``ResizeShortestEdge(MIN_SIZE_TEST,
    MAX_SIZE_TEST)``; MIN_SIZE_TEST 0 = no resize).
    """
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    img = image_rgb if cfg.INPUT.FORMAT == "RGB" else image_rgb[:, :, ::-1]
    if cfg.INPUT.MIN_SIZE_TEST > 0:
        img = aug.get_transform(img).apply_image(img)
    return torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))


def detect(runner, cfg, image_rgb: np.ndarray) -> Instances:
    """
    Detect on one (H, W, 3) uint8 RGB image with ``runner``: the input is resized as the
    config's test loader does, and the detections are mapped back to the image's pixels with
    detectron2's ``detector_postprocess`` (scaled, clipped, empty boxes dropped).
    """
    h, w = image_rgb.shape[:2]
    image = resize_for_test(cfg, image_rgb).to(torch.float32)
    boxes, scores, classes = runner(image)
    inst = Instances(
        tuple(image.shape[-2:]), pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes
    )
    return detector_postprocess(inst, h, w)
