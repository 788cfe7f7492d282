"""
Bounded-memory COCO evaluation for large test sets.

detectron2's ``COCOEvaluator`` keeps every detection of every image as a Python dict (about half
a kilobyte each: 100 detections x 5000 images = 500k dicts) for the whole inference loop, pickles
them all again to gather them on the main process, ``torch.save``-s them to
``instances_predictions.pth`` and ``json.dumps`` them into one string before COCO evaluation.

``StreamingCOCOEvaluator`` computes the same numbers (tests/test_reliability_eval.py) while:
  * keeping each image's detections as one float32 array (N, 6) [x, y, w, h, score, class]
    (24 bytes per detection) during inference;
  * gathering those compact arrays from all workers (``comm.gather``), concatenated on the main
    process in worker order;
  * writing ``coco_instances_results.json`` detection by detection (no giant string) and the
    compact arrays to ``instances_predictions.npz`` instead of a pickle of dicts.
Only COCO's own evaluation (pycocotools ``loadRes``/``COCOeval``) still needs per-detection
Python objects; they are built once, at evaluation time, and freed right after.
Measured by ``benchmarks/eval_memory.py`` (README "Reliability").
"""
import copy
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


class StreamingCOCOEvaluator(FocalCOCOEvaluator):
    """:class:`FocalCOCOEvaluator` (bbox) with compact storage and gathering (module docstring)."""

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
