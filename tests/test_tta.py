"""
Test-time augmentation (issue 17): FocalRetinaNetWithTTA with one augmentation at the test size
equals plain inference bit for bit; a flipped input's boxes map back exactly; the merge is a
per-class NMS with the detections limit; train_net's --eval-only with TEST.AUG.ENABLED and
benchmarks/tta_bench.py agree with each other and with plain evaluation, on a briefly trained
tiny model and a synthetic dataset.
"""
import json
import os

import numpy as np
import pytest
import synthetic_detection  # noqa: I001  (tests/ helper)
import torch
from detectron2.data.transforms import HFlipTransform
from detectron2.engine import default_argument_parser
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Boxes, Instances
from repo_scripts import QUICK, load_script  # noqa: I001  (tests/ helper)

from focal_det.engine import main as engine_main
from focal_det.export import resize_for_test
from focal_det.modeling import FocalRetinaNetWithTTA
from focal_det.modeling.test_time_augmentation import merge_detections

TEST_SIZE = (160, 224)  # INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST


def tiny_cfg():
    cfg = synthetic_detection.tiny_cfg(
        fpn_channels=16, smallest_anchor=16, pixel_std=[57.375, 57.120, 58.395]
    )
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = TEST_SIZE
    cfg.TEST.AUG.MIN_SIZES = (TEST_SIZE[0],)
    cfg.TEST.AUG.MAX_SIZE = TEST_SIZE[1]
    cfg.TEST.AUG.FLIP = False
    return cfg


@pytest.fixture(scope="module")
def model():
    return synthetic_detection.random_detector(tiny_cfg())


def loader_input(cfg, image_rgb):
    """What the test loader gives the model: the test-resized image and the original size."""
    h, w = image_rgb.shape[:2]
    return {"image": resize_for_test(cfg, image_rgb), "height": h, "width": w}


def rgb(h, w, seed):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def fields(inst):
    return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


def assert_equal(got, ref, min_count=20):
    assert len(got) == len(ref) >= min_count
    for g, r in zip(fields(got), fields(ref)):
        assert torch.equal(g, r)


def test_identity_augmentation_equals_plain_inference_exactly(model):
    cfg = tiny_cfg()
    tta = FocalRetinaNetWithTTA(cfg, model)
    for i, (h, w) in enumerate([(150, 190), (300, 260)]):  # resized to 160 x 203 / 185 x 160
        x = loader_input(cfg, rgb(h, w, seed=i))
        with torch.no_grad():
            ref = model([x])[0]["instances"]
            got = tta([x])[0]["instances"]
        assert got.image_size == ref.image_size == (h, w)
        assert_equal(got, ref)


def test_the_same_augmentation_twice_merges_back_to_plain_inference(model):
    """Every detection comes twice (IoU 1): the merging NMS removes exactly the copies."""
    cfg = tiny_cfg()
    cfg.TEST.AUG.MIN_SIZES = (TEST_SIZE[0], TEST_SIZE[0])
    x = loader_input(cfg, rgb(150, 190, seed=3))
    tta = FocalRetinaNetWithTTA(cfg, model)
    assert len(tta.tta_mapper(x)) == 2
    with torch.no_grad():
        assert_equal(tta([x])[0]["instances"], model([x])[0]["instances"])


def _flip_only_mapper(cfg):
    both = DatasetMapperTTA(min_sizes=[TEST_SIZE[0]], max_size=TEST_SIZE[1], flip=True)

    def mapper(d):
        augs = both(d)
        return [a for a in augs if any(isinstance(t, HFlipTransform)
                                       for t in a["transforms"].transforms)]  # fmt: skip

    return mapper


def test_flipped_image_boxes_map_back_exactly(model):
    """TTA that only flips, run on flip(I), shows the detector I itself (I is at the test size,
    so nothing is resized): its detections must be plain inference on I, mirrored."""
    cfg = tiny_cfg()
    image = rgb(*TEST_SIZE, seed=5)  # 160 x 224: the test resize keeps it as it is
    w = TEST_SIZE[1]
    tta = FocalRetinaNetWithTTA(cfg, model, tta_mapper=_flip_only_mapper(cfg))
    with torch.no_grad():
        ref = model([loader_input(cfg, image)])[0]["instances"]
        got = tta([loader_input(cfg, np.ascontiguousarray(image[:, ::-1]))])[0]["instances"]
    b = ref.pred_boxes.tensor
    mirrored = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    assert len(got) == len(ref) >= 20
    assert torch.equal(got.pred_boxes.tensor, mirrored)
    assert torch.equal(got.scores, ref.scores) and torch.equal(got.pred_classes, ref.pred_classes)
    # and the flip is not a no-op: the detections of flip(I) seen as is differ
    with torch.no_grad():
        seen_flipped = model([loader_input(cfg, np.ascontiguousarray(image[:, ::-1]))])
    assert not torch.equal(seen_flipped[0]["instances"].scores, ref.scores)


def test_multi_scale_flip_detections_come_from_the_augmented_inputs(model):
    cfg = tiny_cfg()
    cfg.TEST.AUG.MIN_SIZES = (128, 160, 192)
    cfg.TEST.AUG.MAX_SIZE = 1000
    cfg.TEST.AUG.FLIP = True
    cfg.TEST.DETECTIONS_PER_IMAGE = 50
    x = loader_input(cfg, rgb(150, 190, seed=7))
    tta = FocalRetinaNetWithTTA(cfg, model)
    augs = tta.tta_mapper(x)
    assert len(augs) == 6 and {a["image"].shape[1] for a in augs} == {128, 160, 192}
    with torch.no_grad():
        per_aug = [tta.augmented_detections(a) for a in augs]
        got = tta([x])[0]["instances"]
    for p in per_aug:  # as the merged set is after the merging NMS
        p.pred_boxes.clip((150, 190))
    union = torch.cat([torch.cat([p.pred_boxes.tensor, p.scores[:, None]], 1) for p in per_aug])
    assert len(got) == 50 < len(union)
    rows = torch.cat([got.pred_boxes.tensor, got.scores[:, None]], 1)
    assert all((union == r).all(dim=1).any() for r in rows)  # each one is an augmented detection
    assert (got.pred_boxes.tensor[:, 2] <= 190).all() and (got.pred_boxes.tensor >= 0).all()
    assert torch.equal(got.scores, got.scores.sort(descending=True).values)


def test_merge_is_per_class_nms_with_the_limit():
    def inst(boxes, scores, classes):
        boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        return Instances((100, 100), pred_boxes=boxes, scores=torch.tensor(scores),
                         pred_classes=torch.tensor(classes))  # fmt: skip

    a = inst([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.5], [0, 1])
    # IoU with a's first box: 0.81 (suppressed, same class), 0.81 in class 1 (kept), 0.33 (kept)
    b = inst([[0, 0, 10, 8.1], [0, 0, 10, 8.1], [0, 0, 10, 3.3]], [0.8, 0.7, 0.6], [0, 1, 0])
    out = merge_detections([a, b], (100, 100), nms_thresh=0.5, max_dets=10)
    assert out.scores.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.5])
    assert out.pred_classes.tolist() == [0, 1, 0, 1]
    assert len(merge_detections([a, b], (100, 100), 0.5, max_dets=2)) == 2


def test_non_retinanet_is_refused():
    with pytest.raises(TypeError, match="GeneralizedRCNNWithTTA"):
        FocalRetinaNetWithTTA(tiny_cfg(), torch.nn.Linear(2, 2))


# ------------------------------------------------ train_net --eval-only + benchmarks/tta_bench


def _args(tmp, *extra, eval_only=False):
    opts = [
        "DATASETS.TRAIN", "('fdet_tta_synth_train',)",
        "DATASETS.TEST", "('fdet_tta_synth_test',)",
        "MODEL.RETINANET.NUM_CLASSES", "3",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",  # briefly trained: low scores
        "OUTPUT_DIR", os.path.join(tmp, "out"),
        "SEED", "0",
        *extra,
    ]  # fmt: skip
    argv = ["--config-file", QUICK] + (["--eval-only"] if eval_only else [])
    return default_argument_parser().parse_args(argv + opts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 10 iterations on 4 synthetic images (4 more to test on)."""
    tmp = str(tmp_path_factory.mktemp("tta"))
    synthetic_detection.register("fdet_tta_synth_train", os.path.join(tmp, "train"), 4)
    synthetic_detection.register("fdet_tta_synth_test", os.path.join(tmp, "test"), 4)
    engine_main(_args(tmp, "SOLVER.MAX_ITER", "10"))
    return tmp, os.path.join(tmp, "out", "model_final.pth")


def test_eval_only_with_tta_and_the_tta_benchmark_agree(trained, tmp_path):
    tmp, weights = trained
    same = ["TEST.AUG.MIN_SIZES", "(160,)", "TEST.AUG.FLIP", "False"]  # the test size
    res = engine_main(_args(tmp, "MODEL.WEIGHTS", weights, "TEST.AUG.ENABLED", "True", *same,
                            eval_only=True))  # fmt: skip
    assert set(res) == {"bbox", "bbox_TTA"}
    assert res["bbox"]["AP50"] > 0  # trained: something is found
    # identity augmentation: the same detections, so the same AP
    assert res["bbox_TTA"] == pytest.approx(res["bbox"], nan_ok=True, rel=0, abs=0)
    assert os.path.isfile(os.path.join(tmp, "out", "inference_TTA", "coco_instances_results.json"))

    bench = load_script("benchmarks/tta_bench.py")
    aug = ["TEST.AUG.MIN_SIZES", "(128, 192)", "TEST.AUG.FLIP", "True"]
    argv = ["--config-file", QUICK, "--weights", weights, "--dataset", "fdet_tta_synth_test",
            "--threads", "1", "--json", str(tmp_path / "tta.json"), "--doc",
            str(tmp_path / "doc.md"), "MODEL.RETINANET.NUM_CLASSES", "3",
            "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", *aug]  # fmt: skip
    result = bench.main(argv)
    tta_res = engine_main(_args(tmp, "MODEL.WEIGHTS", weights, "TEST.AUG.ENABLED", "True", *aug,
                                eval_only=True))  # fmt: skip
    plain, tta = result["results"]["plain"], result["results"]["tta"]
    for k, v in res["bbox"].items():
        assert plain["bbox"][k] == pytest.approx(v, nan_ok=True), k
    for k, v in tta_res["bbox_TTA"].items():
        assert tta["bbox"][k] == pytest.approx(v, nan_ok=True), k
    assert tta["bbox"]["AP"] != plain["bbox"]["AP"]  # 4 augmented inputs: other detections
    assert 0 < plain["s_per_image"] < tta["s_per_image"]
    assert json.loads((tmp_path / "tta.json").read_text())["tta"]["min_sizes"] == [128, 192]
    doc = (tmp_path / "doc.md").read_text()
    assert "<!-- BEGIN tta_bench -->" in doc and "benchmarks/tta_bench.py --config-file" in doc
    assert f"| tta | {tta['bbox']['AP']:.1f} |" in doc
