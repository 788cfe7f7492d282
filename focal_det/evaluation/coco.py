"""
COCO bbox evaluation.

``FocalCOCOEvaluator`` is detectron2's ``COCOEvaluator`` (detections gathered from all workers,
``coco_instances_results.json`` written to the output folder, AP / APs / APm / APl and
per-category AP) with:
  * a choice of AP implementation (``TEST.COCO_EVAL_IMPL``): "pycocotools", the official API, or
    "faster-coco-eval", a C++ port that gives the same numbers (tests/test_evaluation.py: equal to
    float64 rounding, < 1e-15 absolute, on random detection sets).
    detectron2's own fast evaluator needs the compiled ``detectron2._C`` that the registry wheel
    lacks, so it is never used here;
  * a clear message for test sets without annotations (COCO test-dev): no AP is computed
    locally; the results JSON is what the evaluation server takes;
  * a warning for ground-truth boxes that are NaN or empty: COCO counts them as missed.
"""
import itertools
import json
import logging
import math
import os

from detectron2.evaluation import COCOEvaluator
from detectron2.utils.file_io import PathManager

__all__ = ["COCO_EVAL_IMPLS", "FocalCOCOEvaluator", "check_coco_eval_impl"]

logger = logging.getLogger(__name__)

COCO_EVAL_IMPLS = ("pycocotools", "faster-coco-eval")


def _import_faster_coco_eval():
    try:
        import faster_coco_eval
    except ImportError as e:
        raise ImportError(
            "TEST.COCO_EVAL_IMPL='faster-coco-eval' needs the faster-coco-eval package: "
            "`pip install -c requirements/constraints.txt faster-coco-eval` (or `make setup`), "
            "or set TEST.COCO_EVAL_IMPL 'pycocotools'."
        ) from e
    return faster_coco_eval


def check_coco_eval_impl(impl, max_dets_per_image=None, tasks=None):
    """
    The rules of ``TEST.COCO_EVAL_IMPL``, written once: FocalCOCOEvaluator applies them, and
    focal_det.config_check before any work (the evaluator is built only after training).
    Raises ValueError, or ImportError when faster-coco-eval is asked for but not installed.
    """
    if impl not in COCO_EVAL_IMPLS:
        raise ValueError(f"TEST.COCO_EVAL_IMPL={impl!r} must be one of {COCO_EVAL_IMPLS}.")
    if impl != "faster-coco-eval":
        return
    _import_faster_coco_eval()
    if tasks is not None and set(tasks) != {"bbox"}:
        raise ValueError(
            f"TEST.COCO_EVAL_IMPL='faster-coco-eval' is wired for bbox AP only; got "
            f"tasks={tasks}. Use 'pycocotools'."
        )
    if max_dets_per_image not in (None, 100):
        raise ValueError(
            f"TEST.COCO_EVAL_IMPL='faster-coco-eval' reports AP at 100 detections per image (its "
            f"summary is COCO's); got TEST.DETECTIONS_PER_IMAGE={max_dets_per_image}. Use "
            "'pycocotools' for other limits."
        )


def evaluate_with_faster_coco_eval(gt_json_file, coco_results, iou_type="bbox", img_ids=None,
                                   max_dets_per_image=(1, 10, 100)):  # fmt: skip
    """
    COCO evaluation of ``coco_results`` (list of COCO-format detection dicts; modified in place
    by ``loadRes`` as pycocotools does) against the annotations in ``gt_json_file`` with
    faster-coco-eval.

    Returns:
        a finished ``COCOeval_faster``: ``.stats`` (12 summary numbers as pycocotools) and
        ``.eval["precision"]`` of shape (T iou thresholds, R recall thresholds, K categories,
        A area ranges, M max-dets), as pycocotools' ``COCOeval``.
    """
    fce = _import_faster_coco_eval()
    coco_gt = fce.COCO(gt_json_file)
    coco_dt = coco_gt.loadRes(coco_results)
    coco_eval = fce.COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=logger.info)
    coco_eval.params.maxDets = list(max_dets_per_image)
    if img_ids is not None:
        coco_eval.params.imgIds = img_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


class FocalCOCOEvaluator(COCOEvaluator):
    """
    detectron2's COCOEvaluator with ``impl`` in :data:`COCO_EVAL_IMPLS` (see module docstring).
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image=None, impl="pycocotools", **kwargs):  # fmt: skip
        check_coco_eval_impl(impl, max_dets_per_image, tasks)
        kwargs["use_fast_impl"] = False  # detectron2's needs detectron2._C
        self._dataset_name = dataset_name
        self._impl = impl
        super().__init__(
            dataset_name, tasks, distributed, output_dir,
            max_dets_per_image=max_dets_per_image, **kwargs,
        )  # fmt: skip
        if self._do_evaluation:
            self._warn_unusable_ground_truth()

    def _warn_unusable_ground_truth(self):
        # The train loader drops such boxes (focal_det.data.sanitize); COCO evaluation reads the
        # annotation file itself, where a NaN / empty box can never be matched: a missed object.
        bad, images = 0, set()
        for ann in self._coco_api.dataset.get("annotations", []):
            box = ann.get("bbox") or []
            ok = len(box) == 4 and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in box
            ) and box[2] > 0 and box[3] > 0  # fmt: skip
            if not ok:
                bad += 1
                images.add(ann.get("image_id"))
        if bad:
            logger.warning(
                f"{self._dataset_name}: {bad} ground-truth box(es) in {len(images)} image(s) of "
                f"{self._metadata.get('json_file', 'its annotations')} are non-finite or empty. "
                "COCO evaluation cannot match them, so each counts as a missed object and "
                "lowers AP / recall: fix or remove them in the annotation file."
            )

    def _eval_predictions(self, predictions, img_ids=None):
        if self._impl == "pycocotools":
            super()._eval_predictions(predictions, img_ids=img_ids)
        else:
            self._eval_predictions_faster(predictions, img_ids=img_ids)
        if not self._do_evaluation:
            self._say_results_are_for_the_server()

    def _say_results_are_for_the_server(self):
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

    def _eval_predictions_faster(self, predictions, img_ids=None):
        coco_results = list(itertools.chain(*[x["instances"] for x in predictions]))
        # Contiguous training ids -> the dataset's category ids, as COCOEvaluator does.
        if hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            to_dataset = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
            for result in coco_results:
                result["category_id"] = to_dataset[result["category_id"]]
        if self._output_dir:
            file_path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info("Saving results to {}".format(file_path))
            with PathManager.open(file_path, "w") as f:
                f.write(json.dumps(coco_results))
        if not self._do_evaluation:
            return
        self._logger.info("Evaluating predictions with faster-coco-eval ...")
        coco_eval = (
            evaluate_with_faster_coco_eval(
                PathManager.get_local_path(self._metadata.json_file),
                coco_results,
                "bbox",
                img_ids=img_ids,
                max_dets_per_image=self._max_dets_per_image,
            )
            if len(coco_results) > 0
            else None  # as detectron2: the COCO API does not handle empty results
        )
        self._results["bbox"] = self._derive_coco_results(
            coco_eval, "bbox", class_names=self._metadata.get("thing_classes")
        )
