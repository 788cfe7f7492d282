"""
Test-time augmentation for RetinaNet: ``FocalRetinaNetWithTTA``, the dense-detector counterpart
of detectron2's ``GeneralizedRCNNWithTTA`` (which asserts that the model is an R-CNN).

Per image: detectron2's ``DatasetMapperTTA`` makes the augmented inputs (``TEST.AUG.MIN_SIZES``
short sides, capped at ``TEST.AUG.MAX_SIZE``, each also horizontally flipped if
``TEST.AUG.FLIP``); the detector runs on each, its boxes are mapped back to the original image,
and all of them are merged by per-class NMS at ``MODEL.RETINANET.NMS_THRESH_TEST`` (the paper's
0.5), keeping the ``TEST.DETECTIONS_PER_IMAGE`` best.

Mapping back: each augmented input's detections are taken before detectron2's
``detector_postprocess`` (unclipped, in the augmented image's pixels), scaled to the original
size exactly as ``detector_postprocess`` scales them, and un-flipped (``x -> W - x``); the merged
set then goes through ``detector_postprocess`` at scale 1 (clip, drop empty boxes). So the merging
NMS sees the boxes the detector's own NMS saw (clipping first would change their IoUs), and one
augmentation at the test size without flip gives plain inference's detections bit for bit (up to
an IoU within float rounding of the NMS threshold). Each augmented image runs alone: a batch
would pad the smaller ones, and a dense detector's detections depend on the padding (more
anchors, different borders).
"""
import copy
from typing import Dict, List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import HFlipTransform, NoOpTransform, ResizeTransform
from detectron2.layers import batched_nms
from detectron2.modeling import RetinaNet
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["FocalRetinaNetWithTTA", "check_tta_min_sizes", "merge_detections"]


def check_tta_min_sizes(min_sizes, min_size_test):
    """``TEST.AUG.MIN_SIZES``: short sides > 0, at least one (ValueError otherwise)."""
    if not min_sizes or min(min_sizes) <= 0:
        raise ValueError(
            f"TEST.AUG.MIN_SIZES={tuple(min_sizes)} must list short sides > 0 for test-time "
            f"augmentation, e.g. ({min_size_test},) = the test size."
        )


def merge_detections(instances: List[Instances], image_size, nms_thresh: float, max_dets: int):
    """
    Union of ``instances`` (all in the same image's pixels), per-class NMS at ``nms_thresh``,
    the ``max_dets`` highest scores. Ties keep their input order (a stable sort first, and the
    NMS survivors taken in that order), so merging one set of NMS'ed detections returns it.
    """
    boxes = torch.cat([x.pred_boxes.tensor for x in instances])
    scores = torch.cat([x.scores for x in instances])
    classes = torch.cat([x.pred_classes for x in instances])
    order = scores.sort(descending=True, stable=True).indices
    keep = batched_nms(boxes[order], scores[order], classes[order], nms_thresh)
    keep = order[keep.sort().values[:max_dets]]
    return Instances(
        image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep], pred_classes=classes[keep]
    )


class FocalRetinaNetWithTTA(nn.Module):
    """
    A RetinaNet (``FocalRetinaNet`` or detectron2's) with test-time augmentation. Called like the
    model in inference: a list of dicts with "image" (the test loader's, (C, H, W) uint8 in
    INPUT.FORMAT) or "file_name", and "height"/"width" (the original size); returns
    [{"instances": Instances}] in original pixels.
    """

    @configurable
    def __init__(self, model, *, tta_mapper, nms_thresh: float, max_detections_per_image: int):
        """
        Args:
            model: the detector; a DistributedDataParallel is unwrapped.
            tta_mapper (callable): dataset dict -> list of augmented dataset dicts, each with
                "image" and "transforms" (detectron2's ``DatasetMapperTTA`` by default).
                Resizes and horizontal flips are supported.
            nms_thresh (float): IoU of the per-class NMS that merges the augmentations.
            max_detections_per_image (int): detections kept after merging.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, RetinaNet):
            raise TypeError(
                f"FocalRetinaNetWithTTA wraps a RetinaNet (FocalRetinaNet or detectron2's), got "
                f"{type(model).__name__}; R-CNNs have detectron2's GeneralizedRCNNWithTTA."
            )
        self.model = model
        self.tta_mapper = tta_mapper
        self.nms_thresh = nms_thresh
        self.max_detections_per_image = max_detections_per_image

    @classmethod
    def from_config(cls, cfg, model, tta_mapper=None):
        check_tta_min_sizes(cfg.TEST.AUG.MIN_SIZES, cfg.INPUT.MIN_SIZE_TEST)
        return {
            "model": model,
            "tta_mapper": tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg),
            "nms_thresh": cfg.MODEL.RETINANET.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    def forward(self, batched_inputs: List[Dict]):
        return [{"instances": self._inference_one_image(self._read(x))} for x in batched_inputs]

    def _read(self, dataset_dict):
        d = copy.copy(dataset_dict)
        if "image" not in d:
            image = read_image(d["file_name"], self.model.input_format)
            d["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        d.setdefault("height", d["image"].shape[1])
        d.setdefault("width", d["image"].shape[2])
        return d

    def _inference_one_image(self, dataset_dict) -> Instances:
        h, w = dataset_dict["height"], dataset_dict["width"]
        per_aug = [self.augmented_detections(d) for d in self.tta_mapper(dataset_dict)]
        merged = merge_detections(per_aug, (h, w), self.nms_thresh, self.max_detections_per_image)
        return detector_postprocess(merged, h, w)  # scale 1: clip, drop empty boxes

    @torch.no_grad()
    def augmented_detections(self, aug_dict) -> Instances:
        """
        Detections of one augmented input (a ``tta_mapper`` output dict, with "transforms"),
        before clipping, in the original image's pixels.
        """
        h, w = aug_dict["height"], aug_dict["width"]
        flipped = False
        for t in aug_dict["transforms"].transforms:
            if isinstance(t, HFlipTransform):
                flipped = not flipped
            elif not isinstance(t, (ResizeTransform, NoOpTransform)):
                raise NotImplementedError(
                    f"FocalRetinaNetWithTTA maps boxes back through resizes and horizontal flips; "
                    f"the TTA mapper applied a {type(t).__name__}."
                )
        m = self.model
        # DenseDetector.forward in inference, without its detector_postprocess.
        images = m.preprocess_image([{"image": aug_dict["image"]}])
        features = m.backbone(images.tensor)
        features = [features[f] for f in m.head_in_features]
        raw = m.forward_inference(images, features, m.head(features))[0]
        aug_h, aug_w = raw.image_size
        boxes = raw.pred_boxes.clone()
        boxes.scale(w / aug_w, h / aug_h)  # the arithmetic of detector_postprocess
        if flipped:
            b = boxes.tensor
            boxes = Boxes(torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1))
        return Instances((h, w), pred_boxes=boxes, scores=raw.scores,
                         pred_classes=raw.pred_classes)  # fmt: skip
