from . import modules, softmax  # noqa: F401  (registers the losses)
from .base import ClassificationLossOutput, DenseClassificationLoss  # noqa: F401
from .build import FOCAL_LOSS_REGISTRY, build_classification_loss  # noqa: F401
from .functional import (  # noqa: F401
    balanced_sigmoid_ce,
    per_anchor_ce_from_labels,
    sigmoid_focal_loss,
    sigmoid_focal_loss_star,
    sigmoid_loss_from_labels,
)
from .modules import OHEM, BalancedCE, FocalLoss, FocalLossStar, select_ohem_anchors  # noqa: F401
from .softmax import SoftmaxFocalLoss, softmax_focal_loss_from_labels  # noqa: F401
