"""
RetinaNet inference as one exportable graph: ``ExportableRetinaNet``, traced to TorchScript or
exported to ONNX by ``focal_det.export.exporters``.

Why not trace the model itself: the per-level candidate selection of detectron2's RetinaNet
(boolean indexing of the scores > 0.05, then ``topk(min(#passing, 1000))``) and of FocalRetinaNet
(``inference.decode_top_candidates``: a ``.item()`` bound, then the same top-k) has sizes that
depend on the scores. A trace (detectron2's ``TracingAdapter``, ``torch.onnx.export``) records
them as constants, so the graph fails at another image size, and in ONNX even at the traced one
(detectron2 issue 5431; ``TopK ... k argument [1001] should not be greater than specified axis
dim value [987]``); ``torch.export`` refuses them (a guard on data). Here the same detections are
computed with sizes that follow the input shape, and with data-dependent sizes only where
ONNX (``NonZero``, ``NonMaxSuppression``) and traces (``aten::index``, ``torchvision::nms``)
represent them:

1. pad the normalised image to the backbone's size divisibility (pad amounts from its shape);
2. backbone, head; anchors from the feature shapes (the model's own anchor generator);
3. per level, the top ``k = min(TOPK_CANDIDATES_TEST, Hi*Wi*A*K)`` logits (k from shapes), their
   sigmoid, the boxes of those k candidates (a model whose class scores are not the sigmoid of
   each logit, e.g. the softmax loss's, says so through ``sigmoid_class_scores()``: then its
   ``class_scores(logits)`` are computed for every anchor and the top k of those are taken);
4. all levels concatenated, the candidates with score > SCORE_THRESH_TEST kept (a mask);
5. per-class NMS as ONE ``torchvision.ops.nms`` (ONNX ``NonMaxSuppression``) of the boxes shifted
   by ``class * (max coordinate + 1)``: torchvision's batched_nms coordinate trick, with the
   maximum taken over all candidates of step 3 (never empty, unlike the kept set: the trick's
   own emptiness check and ``max()`` of a possibly empty set are what cannot be exported);
6. the first TEST.DETECTIONS_PER_IMAGE, boxes clipped to the image, empty boxes dropped: what
   detectron2's ``detector_postprocess`` does at scale 1.

Same detections as the eager model: the top-k of the scores above the threshold (detectron2) are
the scores above the threshold among the top-k (here), and the sigmoid is monotonic. What can
differ is only what float rounding decides: the order of exactly equal scores (as between any
two top-k implementations), an IoU within ~1e-6 of NMS_THRESH_TEST (the class offset moves box
coordinates by float32 rounding; with one class there is no offset), a score within one ulp of
the threshold (another runtime's sigmoid), and NaN logits (a diverged model).
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

__all__ = ["ExportableRetinaNet", "export_friendly_detections"]


def _num_candidates(n, topk: int):
    """``min(n, topk)`` that stays a function of the shape: ``n`` is a traced 0-dim tensor under
    ``torch.jit.trace``, a SymInt under ``torch.export``, an int eagerly."""
    if isinstance(n, Tensor):
        return n.clamp(max=topk)
    return torch.sym_min(n, topk)


def _pad_to_divisibility(x: Tensor, size_divisibility: int, square_size: int = 0) -> Tensor:
    """(C, H, W) -> (1, C, H', W'): zero padding at the bottom and right, as
    ``ImageList.from_tensors`` (whose shape arithmetic specialises an exported graph)."""
    h, w = x.shape[-2], x.shape[-1]
    if square_size > 0:
        pad_h, pad_w = square_size - h, square_size - w
    else:
        pad_h, pad_w = 0 * h, 0 * w
    if size_divisibility > 1:
        pad_h = pad_h + (-(h + pad_h)) % size_divisibility
        pad_w = pad_w + (-(w + pad_w)) % size_divisibility
    return F.pad(x, (0, pad_w, 0, pad_h))[None]


def export_friendly_detections(
    box2box_transform,
    anchors: List[Tensor],
    pred_logits: List[Tensor],
    pred_deltas: List[Tensor],
    image_size: Tuple,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    max_detections: int,
    logits: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Steps 3-6 of the module docstring for one image.

    Args:
        box2box_transform: the model's ``Box2BoxTransform``.
        anchors (list[Tensor]): per level (R_l, 4) XYXY anchors.
        pred_logits (list[Tensor]): per level (R_l, K) classification logits (``logits`` True:
            the scores are their sigmoid) or class probabilities (``logits`` False).
        pred_deltas (list[Tensor]): per level (R_l, 4) box deltas.
        image_size: (H, W) of the (unpadded) input, for clipping.

    Returns:
        boxes (R, 4) float32 XYXY, scores (R,) float32 descending, classes (R,) int64,
        R <= max_detections.
    """
    num_classes = pred_logits[0].shape[1]
    boxes_l, scores_l, classes_l = [], [], []
    for anchors_i, logits_i, deltas_i in zip(anchors, pred_logits, pred_deltas):
        flat = logits_i.flatten()
        top_logits, idx = flat.topk(_num_candidates(flat.shape[0], topk_candidates))
        anchor_idx = idx // num_classes
        boxes_l.append(box2box_transform.apply_deltas(deltas_i[anchor_idx], anchors_i[anchor_idx]))
        scores_l.append(top_logits.sigmoid() if logits else top_logits)
        classes_l.append(idx % num_classes)
    boxes, scores, classes = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(classes_l)

    offset_unit = boxes.max() + 1  # over every candidate: defined even when none passes
    keep = scores > score_thresh
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    shifted = boxes + (classes.to(boxes.dtype) * offset_unit)[:, None]
    keep = torchvision.ops.nms(shifted, scores, nms_thresh)[:max_detections]
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]

    h, w = image_size
    x1 = boxes[:, 0].clamp(min=0, max=w)
    y1 = boxes[:, 1].clamp(min=0, max=h)
    x2 = boxes[:, 2].clamp(min=0, max=w)
    y2 = boxes[:, 3].clamp(min=0, max=h)
    nonempty = (x2 - x1 > 0) & (y2 - y1 > 0)  # Boxes.nonempty(threshold=0.0)
    boxes = torch.stack((x1, y1, x2, y2), dim=1)
    return boxes[nonempty], scores[nonempty], classes[nonempty]


class ExportableRetinaNet(nn.Module):
    """
    Inference of a RetinaNet (``FocalRetinaNet`` or detectron2's ``RetinaNet``) on ONE image, as
    a graph that traces and exports with shapes that follow the input (module docstring). Shares
    the model's parameters.

    ``forward(image)``:
        image (Tensor): (3, H, W) float32, channels in the config's ``INPUT.FORMAT``, 0-255,
            any H and W, already resized as the config's test resize would
            (``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``).
        Returns ``(boxes, scores, classes)``: (R, 4) float32 XYXY in that image's pixels, (R,)
        float32, (R,) int64, R <= ``TEST.DETECTIONS_PER_IMAGE``: the eager model's detections
        for ``[{"image": image}]``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        compiled = getattr(model, "speed_options", {}).get("compile_head", False)
        if compiled:
            raise ValueError(
                "The model's head is torch.compile-d (MODEL.FOCAL.COMPILE_HEAD True); a "
                "compiled forward cannot be traced or exported. Build it with "
                "MODEL.FOCAL.COMPILE_HEAD False (the same numbers)."
            )
        self.model = model

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.model
        x = (image - m.pixel_mean) / m.pixel_std
        constraints = getattr(m.backbone, "padding_constraints", {}) or {}
        x = _pad_to_divisibility(
            x,
            constraints.get("size_divisibility", m.backbone.size_divisibility),
            constraints.get("square_size", 0),
        )
        features = m.backbone(x)
        features = [features[f] for f in m.head_in_features]
        predictions = m.head(features)
        if hasattr(m, "_split_dense_predictions"):  # FocalRetinaNet: the loss's logit count
            logits, deltas = m._split_dense_predictions(predictions)
        else:  # detectron2's RetinaNet: K sigmoid logits
            logits, deltas = m._transpose_dense_predictions(predictions, [m.num_classes, 4])
        logits = [x[0] for x in logits]
        sigmoid = m.sigmoid_class_scores() if hasattr(m, "sigmoid_class_scores") else True
        if not sigmoid:  # e.g. the softmax loss's K + 1 logits -> K class probabilities
            logits = [m.class_scores(x) for x in logits]
        anchors = [getattr(a, "tensor", a) for a in m.anchor_generator(features)]
        return export_friendly_detections(
            m.box2box_transform,
            anchors,
            logits,
            [x[0] for x in deltas],
            (image.shape[-2], image.shape[-1]),
            m.test_score_thresh,
            m.test_topk_candidates,
            m.test_nms_thresh,
            m.max_detections_per_image,
            logits=sigmoid,
        )
