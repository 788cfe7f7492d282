"""
Writing an ``ExportableRetinaNet`` as TorchScript (``model.ts``) or ONNX (``model.onnx``).

Which exporters work here (torch 2.14.1, torchvision 0.29.1, onnx 1.23.2, onnxscript 0.7.2,
onnxruntime 1.31.1), tested on ``ExportableRetinaNet`` at image sizes other than the sample's:

* TorchScript: ``torch.jit.trace`` of the module (deprecated in torch 2.14 with a FutureWarning,
  still working). Sizes under tracing are 0-dim tensors, so the padding, the anchors
  (detectron2's generator), k and the clipping bounds stay functions of the input; so no
  ``torch.jit.script`` (which would need every module of every backbone to be scriptable) is
  needed. Not used: ``torch.jit.freeze`` (Conv+BN folding: a little faster, but it moves the
  scores more than the unfrozen trace does) and
  ``torch.jit.optimize_for_inference`` (its module cannot be loaded back: ``required keyword
  attribute 'value' is undefined``).
* ONNX: ``torch.onnx.export(dynamo=True)`` (``torch.export`` with dynamic height and width, then
  onnxscript's translation; ``torchvision::nms`` becomes ``NonMaxSuppression``). Needs onnxscript.
  The legacy TorchScript-based exporter (``dynamo=False`` + ``dynamic_axes``) also gives a
  correct graph of this module, with a DeprecationWarning; it is not used.
* detectron2's ``TracingAdapter`` + ``torch.jit.trace`` of the model's own forward: runs at the
  traced size only; at another size it fails with ``selected index k out of range`` (the
  per-level k is a constant of the trace).
"""
import logging
import os
import warnings

import torch

from .graph import ExportableRetinaNet

__all__ = [
    "FORMATS",
    "compare_detections",
    "export_onnx",
    "export_retinanet",
    "export_torchscript",
    "file_name",
]

logger = logging.getLogger(__name__)

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "classes"]


def file_name(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {sorted(FORMATS)}.")
    return FORMATS[fmt]


def export_torchscript(module: ExportableRetinaNet, sample: torch.Tensor, path: str) -> str:
    """Trace ``module`` on ``sample`` (3, H, W) and save the TorchScript module to ``path``."""
    with torch.no_grad(), warnings.catch_warnings():
        # The deprecation notice, and TracerWarnings from detectron2's Boxes/ImageList asserts
        # (constant branches, true at every size; the exactness tests run other sizes).
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (sample,), check_trace=False)
    traced.save(path)
    return path


def export_onnx(
    module: ExportableRetinaNet, sample: torch.Tensor, path: str, opset_version=None
) -> str:
    """
    Export ``module`` to ONNX at ``path`` with ``torch.export`` (dynamic height and width) and
    onnxscript; the weights are stored inside the file.
    """
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as e:
        raise ImportError(
            "ONNX export needs onnx and onnxscript: pip install -e '.[export]' "
            "(pinned in requirements/constraints.txt)."
        ) from e
    dims = {"image": {1: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            module,
            (sample,),
            dynamo=True,
            dynamic_shapes=dims,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            opset_version=opset_version,
            verbose=False,
        )
    program.save(path, external_data=False)
    return path


def export_retinanet(model, sample: torch.Tensor, fmt: str, output_dir: str) -> str:
    """
    Export the eval-mode RetinaNet ``model`` (its inference on one image, see
    :class:`ExportableRetinaNet`) as ``output_dir/model.ts`` or ``output_dir/model.onnx``.

    Args:
        sample (Tensor): (3, H, W) float32 example input (INPUT.FORMAT, 0-255, test-resized).
    Returns:
        the path written.
    """
    path = os.path.join(output_dir, file_name(fmt))
    os.makedirs(output_dir, exist_ok=True)
    module = ExportableRetinaNet(model.eval()).eval()
    sample = sample.to(torch.float32)
    if fmt == "torchscript":
        return export_torchscript(module, sample, path)
    return export_onnx(module, sample, path)


def compare_detections(got, ref, box_atol=1e-3, score_atol=1e-5, score_rtol=1e-4) -> dict:
    """
    Compare two ``(boxes, scores, classes)`` results of the same image. Each detection of
    ``got`` is paired with an unpaired one of ``ref`` of its class whose score is within
    ``score_atol + score_rtol * score`` (so exact ties may come in either order), the closest
    box among those. The default tolerances are the project's for numerically neutral paths
    (tests/detection_asserts.py): a folded BatchNorm or a fused kernel sums in another order, and
    over the ~50 layers of a ResNet-50 that moves scores by a few 1e-5.

    Returns:
        {"count", "ref_count", "max_box_diff", "max_score_diff", "ok"}; ``ok``: the same count,
        every detection paired, boxes within ``box_atol`` px.
    """
    (gb, gs, gc), (rb, rs, rc) = got, ref
    out = {"count": len(gs), "ref_count": len(rs), "max_box_diff": 0.0, "max_score_diff": 0.0}
    if len(gs) != len(rs):
        return dict(out, max_box_diff=None, max_score_diff=None, ok=False)
    rs, rc = rs.float(), rc.to(torch.int64)
    free = torch.ones(len(rs), dtype=torch.bool)
    for box, score, cls in zip(gb.float(), gs.float(), gc.to(torch.int64)):
        close = (rs - score).abs() <= score_atol + score_rtol * score.abs()
        cand = (free & (rc == cls) & close).nonzero().flatten()
        if not len(cand):
            return dict(out, max_box_diff=None, max_score_diff=None, ok=False)
        diffs = (rb[cand].float() - box).abs().amax(dim=1)
        j = int(cand[diffs.argmin()])
        free[j] = False
        out["max_box_diff"] = max(out["max_box_diff"], float(diffs.min()))
        out["max_score_diff"] = max(out["max_score_diff"], float((rs[j] - score).abs()))
    return dict(out, ok=out["max_box_diff"] <= box_atol)
