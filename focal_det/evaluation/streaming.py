"""
Bounded-memory COCO evaluation for large test sets (``TEST.COCO_EVAL_CHUNK_IMAGES > 0``).

detectron2's ``COCOEvaluator`` keeps every detection of every image as a Python dict for the
whole inference loop, pickles them all again to gather them on the main process, saves them to
``instances_predictions.pth`` and ``json.dumps`` them into one string before COCO evaluation;
pycocotools' ``evaluate`` then keeps its per-(image, category, area) results until
``accumulate``.

``StreamingCOCOEvaluator`` computes the same numbers (tests/test_reliability_eval.py) while:
  * keeping each image's detections as one float32 array (N, 6) [x, y, w, h, score, class]
    during inference, and gathering those arrays from all workers (``comm.gather``),
    concatenated on the main process in worker order;
  * writing ``coco_instances_results.json`` detection by detection (no giant string) and the
    compact arrays to ``instances_predictions.npz`` instead of a pickle of dicts;
  * running pycocotools' ``COCOeval.evaluate`` on chunks of ``chunk_images`` images (only that
    chunk's detections become Python dicts, and its IoU matrices are freed with it) and
    keeping, per (category, area range), only what ``COCOeval.accumulate`` reads, merged over
    images into a few arrays (bool matches instead of float64 gt ids, no id lists).
    pycocotools' own ``accumulate``/``summarize`` then run unchanged on those, so the numbers
    are pycocotools' exactly.

Memory of both, measured by ``benchmarks/eval_memory.py``: docs/reliability.md.
"""
import contextlib
import copy
import io
import json
import os
from collections import OrderedDict

import numpy as np
import torch
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .coco import FocalCOCOEvaluator

__all__ = ["StreamingCOCOEvaluator"]


class _FirstPerImage:
    """
    The detections of many images, concatenated, that pycocotools' ``accumulate`` can slice as
    it slices one image's entry: ``[0:m]`` / ``[:, 0:m]`` keep each image's first ``m``
    detections (``rank`` = index within its image), in the same order as concatenating the
    per-image slices would give.
    """

    def __init__(self, values, rank):
        self.values, self.rank = values, rank

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows, cols = key
            return self.values[rows][:, self.rank < cols.stop]
        return self.values[self.rank < key.stop]


class _PerCategoryArea:
    """Accumulates, for one (category, area range), what ``accumulate`` reads of each image."""

    def __init__(self):
        self.parts = {"dtScores": [], "rank": [], "dtMatches": [], "dtIgnore": [], "gtIgnore": []}

    def add(self, e):
        d = len(e["dtScores"])
        self.parts["dtScores"].append(np.asarray(e["dtScores"], dtype=np.float64))
        self.parts["rank"].append(np.arange(d, dtype=np.int32))
        # accumulate only tests dtMatches for truth: bool instead of float64 gt ids.
        self.parts["dtMatches"].append(np.asarray(e["dtMatches"]) != 0)  # (T, d)
        self.parts["dtIgnore"].append(np.asarray(e["dtIgnore"], dtype=bool))  # (T, d)
        self.parts["gtIgnore"].append(np.asarray(e["gtIgnore"], dtype=bool))

    def compact(self):
        # One array per chunk instead of one per image (numpy's ~100 B overhead per array).
        for k, v in self.parts.items():
            if len(v) > 1:
                self.parts[k] = [np.concatenate(v, axis=-1)]

    def as_eval_img(self):
        if not self.parts["dtScores"]:
            return None
        cat = {k: np.concatenate(v, axis=-1) for k, v in self.parts.items()}
        return {
            "dtScores": _FirstPerImage(cat["dtScores"], cat["rank"]),
            "dtMatches": _FirstPerImage(cat["dtMatches"], cat["rank"]),
            "dtIgnore": _FirstPerImage(cat["dtIgnore"], cat["rank"]),
            "gtIgnore": cat["gtIgnore"],
        }


def _coco_dt_for(coco_gt, anns):
    """pycocotools' ``loadRes`` for bbox results, also for an empty list (loadRes asserts)."""
    if anns:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(anns)
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                  "categories": copy.deepcopy(coco_gt.dataset["categories"])}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def chunked_coco_bbox_eval(coco_gt, results_for_images, img_ids=None,
                           max_dets_per_image=(1, 10, 100), chunk_images=100):  # fmt: skip
    """
    pycocotools' bbox evaluation, run ``chunk_images`` images at a time.

    Args:
        coco_gt: pycocotools ``COCO`` ground truth.
        results_for_images (callable): list of image ids -> list of COCO result dicts (dataset
            category ids) for those images.
        img_ids: images to evaluate (default: all of ``coco_gt``).

    Returns:
        a pycocotools ``COCOeval`` after ``accumulate`` and ``summarize`` (``.stats``,
        ``.eval["precision"]``), equal to evaluating everything at once.
    """
    from detectron2.evaluation.coco_evaluation import COCOevalMaxDets
    from pycocotools.cocoeval import COCOeval

    # detectron2's choice: its COCOevalMaxDets summarises AP at a custom detections limit.
    cls = COCOeval if list(max_dets_per_image)[2] == 100 else COCOevalMaxDets
    full = cls(coco_gt, iouType="bbox")
    p = full.params
    p.maxDets = list(max_dets_per_image)
    if img_ids is not None:
        p.imgIds = img_ids
    p.imgIds = [int(i) for i in np.unique(p.imgIds)]  # as COCOeval.evaluate orders them
    num_cats, num_areas, num_imgs = len(p.catIds), len(p.areaRng), len(p.imgIds)
    merged = [_PerCategoryArea() for _ in range(num_cats * num_areas)]
    for start in range(0, num_imgs, chunk_images):
        chunk = p.imgIds[start : start + chunk_images]
        ev = COCOeval(coco_gt, _coco_dt_for(coco_gt, results_for_images(chunk)), "bbox")
        ev.params = copy.deepcopy(p)
        ev.params.imgIds = chunk
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
        n = len(chunk)
        for ka, acc in enumerate(merged):  # evalImgs is ordered category, area, image
            for e in ev.evalImgs[ka * n : (ka + 1) * n]:
                if e is not None:
                    acc.add(e)
            acc.compact()
        del ev
    # accumulate() concatenates the entries of all images of a (category, area) in image order
    # and slices each to maxDet first; one merged entry per (category, area), at the first
    # image's slot, gives it the same arrays.
    eval_imgs = [None] * (num_cats * num_areas * num_imgs)
    for ka, acc in enumerate(merged):
        eval_imgs[ka * num_imgs] = acc.as_eval_img()
    del merged
    full.evalImgs = eval_imgs
    full._paramsEval = copy.deepcopy(p)
    full.accumulate()
    full.summarize()
    return full


class StreamingCOCOEvaluator(FocalCOCOEvaluator):
    """:class:`FocalCOCOEvaluator` (bbox) with compact storage and gathering (module docstring)."""

    def __init__(self, *args, chunk_images=100, **kwargs):
        super().__init__(*args, **kwargs)
        self._chunk_images = chunk_images

    def reset(self):
        super().reset()
        self._image_ids = []  # one int per processed image
        self._dets = []  # one float32 (N_i, 6) array per processed image

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            inst = out["instances"].to(self._cpu_device)
            boxes = inst.pred_boxes.tensor.to(torch.float32)
            # Same float32 arithmetic as detectron2's instances_to_coco_json.
            boxes = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
            arr = torch.cat(
                [boxes, inst.scores.to(torch.float32)[:, None],
                 inst.pred_classes.to(torch.float32)[:, None]], dim=1,
            ).numpy()  # fmt: skip
            self._image_ids.append(int(inp["image_id"]))
            self._dets.append(np.ascontiguousarray(arr, dtype=np.float32))

    def _gather(self):
        local = (
            np.asarray(self._image_ids, dtype=np.int64),
            np.asarray([len(d) for d in self._dets], dtype=np.int64),
            np.concatenate(self._dets) if self._dets else np.zeros((0, 6), np.float32),
        )
        if not self._distributed:
            return [local]
        comm.synchronize()
        return comm.gather(local, dst=0)

    def _coco_results(self, image_ids, counts, dets):
        to_dataset = None
        if hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            to_dataset = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
        per_det_ids = np.repeat(image_ids, counts)
        boxes = dets[:, :4].tolist()
        scores = dets[:, 4].tolist()
        classes = dets[:, 5].astype(np.int64).tolist()
        for img_id, box, score, cls in zip(per_det_ids.tolist(), boxes, scores, classes):
            yield {
                "image_id": img_id,
                "category_id": to_dataset[cls] if to_dataset is not None else cls,
                "bbox": box,
                "score": score,
            }

    def _write_json(self, results_iter, path):
        with PathManager.open(path, "w") as f:
            f.write("[")
            for i, r in enumerate(results_iter):
                f.write(("," if i else "") + json.dumps(r))
            f.write("]")

    def evaluate(self, img_ids=None):
        gathered = self._gather()
        if not comm.is_main_process() and self._distributed:
            return {}
        image_ids = np.concatenate([g[0] for g in gathered])
        counts = np.concatenate([g[1] for g in gathered])
        dets = np.concatenate([g[2] for g in gathered])
        del gathered
        if len(image_ids) == 0:
            self._logger.warning("[StreamingCOCOEvaluator] Did not receive valid predictions.")
            return {}
        self._results = OrderedDict()
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(
                os.path.join(self._output_dir, "instances_predictions.npz"), "wb"
            ) as f:
                np.savez(f, image_ids=image_ids, counts=counts, dets=dets)
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info(f"Saving results to {path}")
            self._write_json(self._coco_results(image_ids, counts, dets), path)
        if not self._do_evaluation:  # a test set without annotations: the JSON is the result
            self._say_results_are_for_the_server()
            return copy.deepcopy(self._results)
        if self._impl == "pycocotools":
            self._eval_chunked(image_ids, counts, dets, img_ids)
            return copy.deepcopy(self._results)
        # COCO's API needs dicts: build them once, in the layout _eval_predictions expects, with
        # the category ids still contiguous (it maps them), and let it skip its own JSON dump.
        per_image, start = [], 0
        for img_id, n in zip(image_ids.tolist(), counts.tolist()):
            rows = dets[start : start + n]
            start += n
            per_image.append({
                "image_id": img_id,
                "instances": [
                    {"image_id": img_id, "category_id": int(c), "bbox": b, "score": s}
                    for b, s, c in zip(rows[:, :4].tolist(), rows[:, 4].tolist(),
                                       rows[:, 5].astype(np.int64).tolist())
                ],
            })  # fmt: skip
        output_dir, self._output_dir = self._output_dir, None
        try:
            self._eval_predictions(per_image, img_ids=img_ids)
        finally:
            self._output_dir = output_dir
        return copy.deepcopy(self._results)

    def _eval_chunked(self, image_ids, counts, dets, img_ids):
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        rows_of = {}
        for img_id, st, n in zip(image_ids.tolist(), starts.tolist(), counts.tolist()):
            rows_of.setdefault(img_id, []).append((st, n))

        def results_for_images(chunk):
            ids, cnts, parts = [], [], []
            for img_id in chunk:
                for st, n in rows_of.get(img_id, ()):
                    ids.append(img_id)
                    cnts.append(n)
                    parts.append(dets[st : st + n])
            if not parts:
                return []
            return list(self._coco_results(np.asarray(ids, np.int64), np.asarray(cnts, np.int64),
                                           np.concatenate(parts)))

        self._logger.info(f"Evaluating predictions in chunks of {self._chunk_images} images ...")
        # As detectron2: no detection at all -> no COCOeval (the COCO API cannot handle it).
        coco_eval = None if len(dets) == 0 else chunked_coco_bbox_eval(
            self._coco_api, results_for_images, img_ids=img_ids,
            max_dets_per_image=self._max_dets_per_image, chunk_images=self._chunk_images,
        )  # fmt: skip
        self._results["bbox"] = self._derive_coco_results(
            coco_eval, "bbox", class_names=self._metadata.get("thing_classes")
        )
