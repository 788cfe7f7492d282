"""
focal_det.evaluation: faster-coco-eval against pycocotools (the reference), the evaluator end to
end with both implementations, and test-dev style datasets (no annotations -> results JSON).
"""
import contextlib
import copy
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from focal_det.evaluation import FocalCOCOEvaluator, StreamingCOCOEvaluator
from focal_det.evaluation.coco import evaluate_with_faster_coco_eval

pytest.importorskip("faster_coco_eval")


def random_coco(seed, n_img=40, n_cat=5):
    """GT with small/medium/large boxes and crowd regions; detections = jittered GT, wrong
    classes, false positives, tied scores (rounded to 2 decimals)."""
    rng = np.random.RandomState(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_img + 1):
        W, H = 640, 480
        images.append({"id": i, "width": W, "height": H, "file_name": f"{i}.jpg"})
        for _ in range(rng.randint(0, 8)):
            s = float(np.exp(rng.uniform(np.log(8), np.log(300))))
            w, h = s * rng.uniform(0.5, 1.5), s * rng.uniform(0.5, 1.5)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            c = int(rng.randint(1, n_cat + 1))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c,
                         "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": int(rng.rand() < 0.05)})  # fmt: skip
            for _ in range(rng.randint(0, 3)):
                j = rng.normal(0, 0.15, 4) * [w, h, w, h]
                cls = c if rng.rand() < 0.85 else int(rng.randint(1, n_cat + 1))
                dets.append({"image_id": i, "category_id": cls,
                             "bbox": [x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3])],
                             "score": float(np.round(rng.rand(), 2))})  # fmt: skip
        for _ in range(rng.randint(0, 6)):
            w, h = rng.uniform(5, 200), rng.uniform(5, 200)
            dets.append({"image_id": i, "category_id": int(rng.randint(1, n_cat + 1)),
                         "bbox": [rng.uniform(0, W - w), rng.uniform(0, H - h), w, h],
                         "score": float(np.round(rng.rand(), 2))})  # fmt: skip
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_cat + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


@pytest.mark.parametrize("seed", range(6))
def test_faster_coco_eval_matches_pycocotools(seed, tmp_path):
    gt, dets = random_coco(seed)
    gt_file = str(tmp_path / "gt.json")
    with open(gt_file, "w") as f:
        json.dump(gt, f)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_file)
        ref = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    fast = evaluate_with_faster_coco_eval(gt_file, copy.deepcopy(dets))
    # The 12 summary numbers and the full precision / recall tables agree up to float64
    # rounding of the precision envelope (observed <= 3e-17; pycocotools is numpy, this is C++).
    np.testing.assert_allclose(fast.stats[:12], ref.stats, rtol=0, atol=1e-15)
    assert ref.eval["precision"].shape == fast.eval["precision"].shape
    np.testing.assert_allclose(fast.eval["precision"], ref.eval["precision"], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(fast.eval["recall"], ref.eval["recall"])
    # The numbers anyone reads (AP in %, 3 decimals as detectron2 prints) are identical.
    assert [f"{100 * v:.3f}" for v in fast.stats[:12]] == [f"{100 * v:.3f}" for v in ref.stats]
    assert ref.stats[0] > 0.05  # a non-trivial set


def _register(name, gt, with_annotations=True):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    by_img = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        by_img[a["image_id"]].append(
            {"bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS,
             "category_id": a["category_id"] - 1, "iscrowd": a["iscrowd"]}  # fmt: skip
        )
    records = [
        {"file_name": im["file_name"], "image_id": im["id"], "height": im["height"],
         "width": im["width"], **({"annotations": by_img[im["id"]]} if with_annotations else {})}
        for im in gt["images"]
    ]  # fmt: skip
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(
        thing_classes=[c["name"] for c in gt["categories"]],
        thing_dataset_id_to_contiguous_id={c["id"]: c["id"] - 1 for c in gt["categories"]},
    )


def _run(evaluator, gt, dets):
    evaluator.reset()
    for im in gt["images"]:
        mine = [d for d in dets if d["image_id"] == im["id"]]
        inst = Instances((im["height"], im["width"]))
        xywh = torch.tensor([d["bbox"] for d in mine], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(BoxMode.convert(xywh, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        inst.scores = torch.tensor([d["score"] for d in mine], dtype=torch.float32)
        inst.pred_classes = torch.tensor([d["category_id"] - 1 for d in mine], dtype=torch.int64)
        evaluator.process([{"image_id": im["id"]}], [{"instances": inst}])
    return evaluator.evaluate()


def test_evaluator_same_results_with_both_impls(tmp_path):
    gt, dets = random_coco(7, n_img=20)
    _register("fdet_eval_synth", gt)
    res = {}
    for impl in ("pycocotools", "faster-coco-eval"):
        out = str(tmp_path / impl)
        ev = FocalCOCOEvaluator("fdet_eval_synth", tasks=("bbox",), distributed=False,
                                output_dir=out, impl=impl)  # fmt: skip
        res[impl] = _run(ev, gt, dets)["bbox"]
        with open(os.path.join(out, "coco_instances_results.json")) as f:
            res[impl + "_json"] = json.load(f)
    ref, fast = res["pycocotools"], res["faster-coco-eval"]
    assert ref.keys() == fast.keys() and "AP-c1" in ref and "APl" in ref
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], abs=1e-12, nan_ok=True), k
    assert res["pycocotools_json"] == res["faster-coco-eval_json"]
    # Dataset category ids (1-based here) are restored in the written results.
    assert {d["category_id"] for d in res["pycocotools_json"]} <= {1, 2, 3, 4, 5}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("impl", ["pycocotools", "faster-coco-eval"])
def test_test_dev_writes_results_json_and_says_so(tmp_path, caplog, impl, streaming):
    gt, dets = random_coco(3, n_img=5)
    _register("fdet_eval_testdev", gt, with_annotations=False)
    # A test-dev style annotation file: images and categories only.
    gt_file = str(tmp_path / "image_info.json")
    with open(gt_file, "w") as f:
        json.dump({"images": gt["images"], "categories": gt["categories"]}, f)
    MetadataCatalog.get("fdet_eval_testdev").set(json_file=gt_file)
    out = str(tmp_path / "out")
    kw = dict(tasks=("bbox",), distributed=False, output_dir=out, impl=impl)
    if streaming:
        ev = StreamingCOCOEvaluator("fdet_eval_testdev", chunk_images=2, **kw)
    else:
        ev = FocalCOCOEvaluator("fdet_eval_testdev", **kw)
    with caplog.at_level(logging.WARNING, logger="focal_det.evaluation.coco"):
        res = _run(ev, gt, dets)
    assert "bbox" not in res  # no AP without annotations
    path = os.path.join(out, "coco_instances_results.json")
    with open(path) as f:
        written = json.load(f)
    assert len(written) == len(dets)
    # The log names the file it wrote (the streaming evaluator used to say "nothing written").
    assert "evaluation server" in caplog.text and path in caplog.text
    assert "nothing written" not in caplog.text


def test_bad_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="COCO_EVAL_IMPL"):
        FocalCOCOEvaluator("coco_2017_val", impl="detectron2-fast")


def test_build_coco_evaluator_reads_the_config(tmp_path):
    from detectron2.config import get_cfg

    from focal_det import add_focal_config
    from focal_det.engine import Trainer

    gt, _ = random_coco(1, n_img=3)
    _register("fdet_eval_cfg", gt)
    cfg = get_cfg()
    add_focal_config(cfg)
    assert cfg.TEST.COCO_EVAL_IMPL == "pycocotools"  # the official API by default
    cfg.TEST.COCO_EVAL_IMPL = "faster-coco-eval"
    cfg.OUTPUT_DIR = str(tmp_path)
    ev = Trainer.build_evaluator(cfg, "fdet_eval_cfg")
    assert isinstance(ev, FocalCOCOEvaluator) and ev._impl == "faster-coco-eval"
    assert ev._output_dir == os.path.join(str(tmp_path), "inference")
