"""COCO evaluation for focal_det (pycocotools, or faster-coco-eval where it matches exactly)."""
from .build import build_coco_evaluator
from .coco import FocalCOCOEvaluator
from .streaming import StreamingCOCOEvaluator

__all__ = ["FocalCOCOEvaluator", "StreamingCOCOEvaluator", "build_coco_evaluator"]
