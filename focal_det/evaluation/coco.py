"""
COCO bbox evaluation.

``FocalCOCOEvaluator`` is detectron2's ``COCOEvaluator`` (results gathered from all workers,
``coco_instances_results.json`` written to the output folder) that says so loudly for test sets
without annotations (COCO test-dev: the JSON is what the evaluation server takes).
"""
import logging
import os

from detectron2.evaluation import COCOEvaluator

__all__ = ["FocalCOCOEvaluator", "build_coco_evaluator"]

logger = logging.getLogger(__name__)


class FocalCOCOEvaluator(COCOEvaluator):
    def __init__(self, dataset_name, *args, **kwargs):
        self._dataset_name = dataset_name
        super().__init__(dataset_name, *args, **kwargs)

    def _eval_predictions(self, predictions, img_ids=None):
        super()._eval_predictions(predictions, img_ids=img_ids)
        if not self._do_evaluation:
            path = (
                os.path.join(self._output_dir, "coco_instances_results.json")
                if self._output_dir
                else "(no output folder given: nothing written)"
            )
            logger.warning(
                "%s has no annotations (a test set such as COCO test-dev): no AP computed here. "
                "The detections in COCO results format are in %s; zip it and submit it to the "
                "COCO evaluation server.",
                self._dataset_name,
                path,
            )


def build_coco_evaluator(cfg, dataset_name, output_folder=None):
    """
    Returns:
        FocalCOCOEvaluator for the bbox task of ``dataset_name``, gathering the detections of
        all workers, keeping at most ``TEST.DETECTIONS_PER_IMAGE`` per image.
    """
    return FocalCOCOEvaluator(
        dataset_name,
        tasks=("bbox",),
        distributed=True,
        output_dir=output_folder,
        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        use_fast_impl=False,
    )
