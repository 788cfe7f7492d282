"""
Reliability of data (issue 8, item 2): missing COCO folders, degenerate boxes, images with no
boxes and corrupt image files each get a clear answer.
"""
import logging
import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.structures import BoxMode
from PIL import Image

from focal_det.data.sanitize import (
    CorruptImageError,
    FileNamingMapper,
    drop_degenerate_boxes,
    load_dataset_dicts,
)
from focal_det.engine import Trainer, setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick", "retinanet_tiny_quick.yaml")


def _ann(box, mode=BoxMode.XYXY_ABS, cls=0):
    return {"bbox": box, "bbox_mode": mode, "category_id": cls, "iscrowd": 0}


def test_degenerate_boxes_dropped_with_one_counting_warning(caplog):
    recs = [
        {"file_name": "a.png", "image_id": 0, "width": 100, "height": 80, "annotations": [
            _ann([10, 10, 50, 40]),                      # good
            _ann([10, 10, 10, 40]),                      # zero width
            _ann([30, 10, 20, 40]),                      # negative width
            _ann([120, 10, 150, 40]),                    # entirely right of the image
            _ann([-20, 10, 60, 40]),                     # partly outside: kept (clipped later)
        ]},
        {"file_name": "b.png", "image_id": 1, "width": 100, "height": 80, "annotations": [
            _ann([5, 5, 0, 10], mode=BoxMode.XYWH_ABS),  # zero width in XYWH
            _ann([5, 5, float("nan"), 10], mode=BoxMode.XYWH_ABS),
            _ann([5, 5, 10, 10], mode=BoxMode.XYWH_ABS),  # good
        ]},
        {"file_name": "c.png", "image_id": 2, "width": 100, "height": 80, "annotations": []},
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="focal_det.data.sanitize"):
        out = drop_degenerate_boxes(recs, "toy")
    warnings = [r for r in caplog.records if r.name == "focal_det.data.sanitize"]
    assert len(warnings) == 1
    assert "toy: dropped 5 degenerate box(es)" in warnings[0].getMessage()
    assert "from 2 image(s)" in warnings[0].getMessage()
    assert [a["bbox"] for a in out[0]["annotations"]] == [[10, 10, 50, 40], [-20, 10, 60, 40]]
    assert [a["bbox"] for a in out[1]["annotations"]] == [[5, 5, 10, 10]]
    assert out[2]["annotations"] == [] and len(out) == 3
    assert len(recs[0]["annotations"]) == 5  # input untouched


def test_missing_coco_folder_names_path_layout_and_variable(tmp_path):
    name = "reliability_missing_coco"
    if name not in DatasetCatalog.list():
        register_coco_instances(
            name, {}, str(tmp_path / "coco/annotations/instances_val2017.json"),
            str(tmp_path / "coco/val2017"),
        )  # fmt: skip
    with pytest.raises(FileNotFoundError) as e:
        load_dataset_dicts([name])
    msg = str(e.value)
    assert str(tmp_path / "coco/annotations/instances_val2017.json") in msg
    assert str(tmp_path / "coco/val2017") in msg
    assert "annotations/instances_{train,val}2017.json" in msg and "DETECTRON2_DATASETS" in msg

    # detectron2's builtin COCO names go through the same check (the test loader's path).
    cfg = setup(default_argument_parser().parse_args(["--config-file", QUICK]))
    if not os.path.isdir(MetadataCatalog.get("coco_2017_val_100").image_root):
        with pytest.raises(FileNotFoundError, match="coco/val2017.*DETECTRON2_DATASETS"):
            Trainer.build_test_loader(cfg, "coco_2017_val_100")


def _png(path, h=64, w=80):
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    return str(path)


def test_corrupt_image_names_the_file(tmp_path):
    cfg = setup(default_argument_parser().parse_args(["--config-file", QUICK]))
    mapper = FileNamingMapper(DatasetMapper(cfg, True))
    good = _png(tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good, "rb").read()[:60])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00not an image" * 10)
    rec = {"image_id": 3, "height": 64, "width": 80, "annotations": [_ann([1, 1, 30, 30])]}
    assert mapper(dict(rec, file_name=good))["image"].shape[0] == 3
    for bad in (truncated, garbage, tmp_path / "absent.png"):
        with pytest.raises(CorruptImageError, match=str(bad)):
            mapper(dict(rec, file_name=str(bad)))


def test_images_without_boxes_train(tmp_path):
    name = "reliability_empty_images"
    recs = [
        {"file_name": _png(tmp_path / "empty.png", 128, 160), "image_id": 0, "height": 128,
         "width": 160, "annotations": []},
        {"file_name": _png(tmp_path / "degenerate.png", 128, 160), "image_id": 1, "height": 128,
         "width": 160, "annotations": [_ann([40, 40, 40, 90]), _ann([200, 10, 260, 60])]},
    ]  # fmt: skip
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: recs)
        MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    args = default_argument_parser().parse_args([
        "--config-file", QUICK,
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()",
        "MODEL.RETINANET.NUM_CLASSES", "3", "OUTPUT_DIR", str(tmp_path / "out"),
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
        "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
    ])  # fmt: skip
    trainer = Trainer(setup(args))
    trainer.train()
    hist = trainer.storage.history("loss_cls").values()
    assert len(hist) == 2 and all(math.isfinite(v) and v > 0 for v, _ in hist)
    assert all(v == 0 for v, _ in trainer.storage.history("loss_box_reg").values())
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


# ---- issue 15 ---------------------------------------------------------------------------------
def _gray16(path, h=64, w=80):
    """A 16-bit grayscale PNG whose values span 0..65535; returns the array written."""
    values = (np.arange(h * w, dtype=np.int64).reshape(h, w) * 65535 // (h * w - 1))
    values = values.astype(np.uint16)
    Image.fromarray(values).save(path)
    return values


def test_16bit_png_is_refused_in_training_with_the_file_named(tmp_path):
    from detectron2.data.detection_utils import read_image as d2_read_image

    from focal_det.data.sanitize import UnsupportedImageError

    path = tmp_path / "gray16.png"
    values = _gray16(path)
    # The fault: detectron2's reader clips every value above 255 (nearly all of them).
    clipped = d2_read_image(str(path), format="RGB")
    assert (clipped == 255).mean() > 0.99
    cfg = setup(default_argument_parser().parse_args(["--config-file", QUICK]))
    mapper = FileNamingMapper(DatasetMapper(cfg, True))
    rec = {"file_name": str(path), "image_id": 5, "height": 64, "width": 80,
           "annotations": [_ann([1, 1, 30, 30])]}  # fmt: skip
    with pytest.raises(UnsupportedImageError) as e:
        mapper(rec)
    msg = str(e.value)
    assert str(path) in msg and "I;16" in msg and "Convert it to 8 bits" in msg
    assert values.max() == 65535


def test_read_image_scales_16bit_to_8bit(tmp_path):
    import cv2

    from focal_det.data.sanitize import read_image

    gray = _gray16(tmp_path / "gray16.png")
    out = read_image(str(tmp_path / "gray16.png"), format="RGB")
    assert out.dtype == np.uint8 and out.shape == (64, 80, 3)
    for c in range(3):  # the reference: the 16-bit values' top byte
        np.testing.assert_array_equal(out[:, :, c], (gray >> 8).astype(np.uint8))
    assert read_image(str(tmp_path / "gray16.png"), format="L").shape == (64, 80, 1)
    # 16-bit RGB: PIL itself reduces it to its top byte; read_image agrees.
    rgb = np.stack([gray, gray[::-1], gray[:, ::-1]], -1)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[:, :, ::-1])
    np.testing.assert_array_equal(
        read_image(str(tmp_path / "rgb16.png"), format="RGB"), (rgb >> 8).astype(np.uint8)
    )
    # 8-bit images: detectron2's reader, unchanged.
    eight = _png(tmp_path / "eight.png")
    from detectron2.data.detection_utils import read_image as d2_read_image

    np.testing.assert_array_equal(read_image(eight, "BGR"), d2_read_image(eight, "BGR"))


def test_annotation_file_that_is_not_json_is_named(tmp_path):
    from focal_det.data.sanitize import AnnotationFileError

    gt = tmp_path / "instances.json"
    gt.write_text('{"images": [{"id": 1, "file_name": "a.png", "height": 10, "wid')  # truncated
    (tmp_path / "img").mkdir()
    name = "reliability_truncated_json"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(gt), str(tmp_path / "img"))
    with pytest.raises(AnnotationFileError) as e:
        load_dataset_dicts([name])
    assert f"Dataset '{name}': its annotation file {gt} is not valid JSON" in str(e.value)
    assert "truncated download" in str(e.value)
    cfg = setup(default_argument_parser().parse_args(["--config-file", QUICK]))
    with pytest.raises(AnnotationFileError, match=str(gt)):  # the test set's path as well
        Trainer.build_test_loader(cfg, name)
