"""The evaluator of the Trainer, chosen by the config."""
from .coco import FocalCOCOEvaluator
from .streaming import StreamingCOCOEvaluator

__all__ = ["build_coco_evaluator"]


def build_coco_evaluator(cfg, dataset_name, output_folder=None):
    """
    Returns:
        the COCO evaluator for the bbox task of ``dataset_name``, gathering the detections of
        all workers, keeping at most ``TEST.DETECTIONS_PER_IMAGE`` per image, computing AP with
        ``TEST.COCO_EVAL_IMPL``: :class:`StreamingCOCOEvaluator` (bounded memory, the same
        numbers) when ``TEST.COCO_EVAL_CHUNK_IMAGES > 0``, else :class:`FocalCOCOEvaluator`.
    """
    kwargs = dict(
        tasks=("bbox",),
        distributed=True,
        output_dir=output_folder,
        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        impl=cfg.TEST.get("COCO_EVAL_IMPL", "pycocotools"),
    )
    chunk_images = cfg.TEST.get("COCO_EVAL_CHUNK_IMAGES", 0)
    if chunk_images > 0:
        return StreamingCOCOEvaluator(dataset_name, chunk_images=chunk_images, **kwargs)
    return FocalCOCOEvaluator(dataset_name, **kwargs)
