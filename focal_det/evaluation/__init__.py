"""COCO evaluation for focal_det (pycocotools, or faster-coco-eval where it matches exactly)."""
from .coco import FocalCOCOEvaluator, build_coco_evaluator

__all__ = ["FocalCOCOEvaluator", "build_coco_evaluator"]
