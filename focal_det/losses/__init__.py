from . import modules  # noqa: F401  (registers the losses)
from .base import ClassificationLossOutput, DenseClassificationLoss  # noqa: F401
from .build import FOCAL_LOSS_REGISTRY, build_classification_loss  # noqa: F401
