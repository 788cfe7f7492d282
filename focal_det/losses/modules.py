"""
Registered classification losses. PLACEHOLDER implementations (eager, via fvcore) that fix the
contract; the loss-library issue replaces them with the fused, label-based versions.
"""
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss

from .base import ClassificationLossOutput, DenseClassificationLoss
from .build import FOCAL_LOSS_REGISTRY


@FOCAL_LOSS_REGISTRY.register()
class FocalLoss(DenseClassificationLoss):
    def __init__(self, cfg):
        super().__init__(cfg.MODEL.RETINANET.NUM_CLASSES)
        self.alpha = cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA
        self.gamma = cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA

    def forward(self, pred_logits, gt_labels, anchors):
        valid = gt_labels >= 0
        target = F.one_hot(gt_labels[valid], self.num_classes + 1)[:, :-1]
        loss = sigmoid_focal_loss(
            pred_logits[valid].float(), target.float(), self.alpha, self.gamma, "sum"
        )
        return ClassificationLossOutput(loss=loss)
