"""
FocalRetinaNet: RetinaNet (Sec 4) with the classification loss taken from FOCAL_LOSS_REGISTRY.
SKELETON: the meta-architecture issue completes it (normaliser options, matcher options, ...).
"""
import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage

from ..losses import build_classification_loss
from .heads import build_focal_head

__all__ = ["FocalRetinaNet"]


@META_ARCH_REGISTRY.register()
class FocalRetinaNet(RetinaNet):
    @configurable
    def __init__(self, *, cls_loss, **kwargs):
        super().__init__(**kwargs)
        self.cls_loss = cls_loss

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        shapes = ret["backbone"].output_shape()
        feature_shapes = [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        ret["head"] = build_focal_head(cfg, feature_shapes)
        ret["cls_loss"] = build_classification_loss(cfg)
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        out = self.cls_loss(cat(pred_logits, dim=1), gt_labels, Boxes.cat(anchors).tensor)
        normalizer = out.normalizer if out.normalizer is not None else max(num_pos_anchors, 1)
        box_mask = pos_mask if out.box_mask is None else out.box_mask & pos_mask
        loss_box_reg = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            box_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_cls": out.loss / normalizer, "loss_box_reg": loss_box_reg / normalizer}
