"""
`make demo` end to end at CI size (dataset subset, 128 px, 3 iterations, a 32-channel head), and
the inference command demo.py on its checkpoint.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from focal_det.demo import register_deepforest_trees
from focal_det.demo.job import run_demo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402  (the top-level inference command)

pytestmark = pytest.mark.slow  # make demo end to end (-m "not slow" skips it locally)

SUBSET = {"SOAP_061": "train", "OSBS_029": "val"}  # one 400 px tile each: fast
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "32",  # GroupNorm's 32 groups
    "MODEL.RETINANET.NUM_CONVS", "1",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "1",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.STEPS", "(2,)",
    "SOLVER.WARMUP_ITERS", "1",
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",  # 3 iterations: scores are still ~0.01
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    try:
        summary = run_demo(
            output_dir=str(out / "output"),
            opts=TINY,
            datasets_root=str(out / "datasets"),
            sources=SUBSET,
            num_vis=4,
        )
        yield out, summary
    finally:
        register_deepforest_trees()  # back to the default registration


def test_demo_writes_metrics_log_events_pictures(demo_run):
    out, summary = demo_run
    run = out / "output"
    saved = json.loads((run / "demo_results.json").read_text())
    assert saved["bbox"] == pytest.approx(summary["bbox"], nan_ok=True)
    for key in ("AP", "AP50", "AP75"):
        assert 0.0 <= saved["bbox"][key] <= 100.0
    counts = saved["dataset"]["counts"]
    assert (counts["train"], counts["val"]) == (
        {"images": 1, "boxes": 37},
        {"images": 1, "boxes": 61},
    )
    assert saved["max_iter"] == 3
    log = (run / "log.txt").read_text()
    assert "Starting training from iteration 0" in log and "eta:" in log and "loss_cls" in log
    assert "Evaluation results for bbox" in log
    assert list(run.glob("events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    assert any("loss_cls" in m for m in metrics)
    assert (run / "model_final.pth").is_file() and (run / "config.yaml").is_file()
    pics = sorted((run / "val_predictions").glob("*.png"))
    assert [p.name for p in pics] == ["OSBS_029_x0_y0.png"]
    w, h = Image.open(pics[0]).size
    assert (w, h) == (400 + 8 + 400, 28 + 400)  # GT | gap | predictions, under a caption band


def test_demo_ap_matches_pycocotools_on_the_written_detections(demo_run):
    """The AP the demo reports = pycocotools' COCOeval of the detections it wrote."""
    out, summary = demo_run
    dets_file = out / "output" / "inference" / "coco_instances_results.json"
    if not dets_file.is_file():
        pytest.skip("the evaluator did not write coco_instances_results.json")
    gt = COCO(str(out / "datasets" / "deepforest_trees" / "annotations" / "val.json"))
    dets = json.loads(dets_file.read_text())
    if not dets:
        assert summary["bbox"]["AP"] == 0.0
        return
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert summary["bbox"]["AP"] == pytest.approx(100 * max(ev.stats[0], 0), abs=1e-6)
    assert summary["bbox"]["AP50"] == pytest.approx(100 * max(ev.stats[1], 0), abs=1e-6)


def test_demo_py_writes_pictures_and_json_equal_to_default_predictor(demo_run, tmp_path):
    out, _ = demo_run
    images = out / "datasets" / "deepforest_trees" / "images"
    weights = out / "output" / "model_final.pth"
    opts = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]  # an untrained model's scores are low
    result = demo.run(
        weights, [str(images), str(images / "*.png")], tmp_path / "det", threshold=0.0, opts=opts
    )
    # a folder and a glob naming the same two tiles: each image once
    assert [Path(r["file"]).name for r in result["images"]] == [
        "OSBS_029_x0_y0.png",
        "SOAP_061_x0_y0.png",
    ]
    saved = json.loads((tmp_path / "det" / "detections.json").read_text())
    assert saved["images"] == json.loads(json.dumps(result["images"]))
    model, cfg = demo.load_model(weights, opts=opts)
    predictor = DefaultPredictor(cfg)  # detectron2's own inference path (BGR in, format-aware)
    for r in result["images"]:
        assert Path(r["picture"]).is_file()
        assert Image.open(r["picture"]).size == (400, 28 + 400)
        dets = r["detections"]
        assert 0 < len(dets) <= cfg.TEST.DETECTIONS_PER_IMAGE
        boxes = np.array([d["bbox_xyxy"] for d in dets])
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= r["width"]).all()
        assert all(d["category"] == "tree" and d["category_id"] == 0 for d in dets)
        bgr = np.asarray(Image.open(r["file"]).convert("RGB"))[:, :, ::-1]
        ref = predictor(bgr)["instances"].to("cpu")
        assert len(ref) == len(dets)
        torch.testing.assert_close(
            torch.tensor([d["score"] for d in dets]), ref.scores, atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(boxes, dtype=torch.float32), ref.pred_boxes.tensor, atol=0.01, rtol=0
        )


def test_demo_py_explains_bad_inputs(demo_run, tmp_path):
    out, _ = demo_run
    weights = out / "output" / "model_final.pth"
    with pytest.raises(FileNotFoundError, match="no such file"):
        demo.run(weights, [str(tmp_path / "missing.png")], tmp_path / "det")
    with pytest.raises(FileNotFoundError, match="matches no image"):
        demo.run(weights, [str(tmp_path / "*.png")], tmp_path / "det")
    with pytest.raises(FileNotFoundError, match="make demo"):
        demo.run(tmp_path / "none.pth", [str(tmp_path)], tmp_path / "det")
