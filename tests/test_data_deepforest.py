"""
The demo dataset built from the deepforest wheel: tiling, clipping, the split, COCO JSON and its
registration. Builds a subset (the 1249x1035 val crop and OSBS_029) into a temporary folder; the
wheel is downloaded from PyPI once and cached in .cache/wheels.
"""

import json
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from PIL import Image
from pycocotools.coco import COCO

from focal_det.demo import deepforest as df
from focal_det.demo import wheels

SUBSET = {"OSBS_029": "train", "2019_YELL_2_541000_4977000_image_crop": "val"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    return df.build_deepforest_trees(root, sources=SUBSET)


def _voc_boxes(stem):
    """Boxes of the wheel's XML, parsed here independently of the builder."""
    wheel = wheels.fetch_pinned_wheel(*df.DEEPFOREST_WHEEL)
    root = ET.fromstring(wheels.read_wheel_member(wheel, f"deepforest/data/{stem}.xml"))
    return np.array(
        [
            [float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            for o in root.iter("object")
        ]
    )


def _load(built, split):
    with open(built["root"] / "annotations" / f"{split}.json") as f:
        return json.load(f)


@pytest.mark.parametrize(
    "length,size,overlap",
    [(1249, 400, 100), (2472, 400, 100), (400, 400, 100), (401, 400, 0), (900, 300, 50)],
)
def test_tile_starts_cover_with_overlap(length, size, overlap):
    starts = df.tile_starts(length, size, overlap)
    assert starts[0] == 0 and starts[-1] + min(size, length) == length
    gaps = np.diff(starts)
    assert (size - gaps >= overlap).all()  # neighbours overlap by at least min_overlap
    # fewest tiles: one tile fewer could not keep that overlap
    n = len(starts)
    assert n == 1 or (n - 2) * (size - overlap) + size < length


def test_tile_boxes_clips_and_drops_slivers():
    boxes = [[10, 10, 50, 50], [90, 10, 130, 50], [97, 60, 140, 100], [-5, 60, 30, 100]]
    kept, idx = df.tile_boxes(boxes, (0, 0, 100, 100), min_visible=0.4, min_side=6)
    # box 1: 10 of 40 px visible (25% < 40%) -> dropped; box 2: 3 px wide strip -> dropped;
    # box 3 (already partly outside the source): clipped to x >= 0
    assert idx.tolist() == [0, 3]
    np.testing.assert_allclose(kept, [[10, 10, 50, 50], [0, 60, 30, 100]])
    kept, _ = df.tile_boxes(boxes[:1], (5, 8, 105, 108), 0.4, 6)
    np.testing.assert_allclose(kept, [[5, 2, 45, 42]])  # in the tile's frame


def test_build_reports_counts_and_boxes_lie_in_images(built):
    assert set(built["counts"]) == {"train", "val", "trainsub", "holdout"}
    for split in ("train", "val"):
        data = _load(built, split)
        assert built["counts"][split] == {
            "images": len(data["images"]),
            "boxes": len(data["annotations"]),
        }
        assert data["categories"] == [{"id": 1, "name": "tree", "supercategory": "plant"}]
        images = {im["id"]: im for im in data["images"]}
        for ann in data["annotations"]:
            im = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert ann["category_id"] == 1 and ann["iscrowd"] == 0
            assert w >= 6 and h >= 6 and x >= 0 and y >= 0
            assert x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
        for im in images.values():
            assert Image.open(built["root"] / "images" / im["file_name"]).size == (
                im["width"],
                im["height"],
            )
    # val crop 1249x1035 -> 4 x 4 tiles of 400 px; OSBS_029 (400x400) -> one tile
    assert built["counts"]["val"]["images"] == 16 and built["counts"]["train"]["images"] == 1


def test_holdout_is_a_band_of_the_large_train_crop_never_overlapping_trainsub():
    """Known answer on made-up tiles: which tiles go to trainsub, holdout, or neither."""
    y = df.HOLDOUT_FROM_Y
    tiles = [
        (df.HOLDOUT_SOURCE, [0, 0, 400, 400]),  # far above the band -> trainsub
        (df.HOLDOUT_SOURCE, [0, y - 400, 400, y]),  # ends on the line -> trainsub
        (df.HOLDOUT_SOURCE, [300, y - 100, 700, y + 300]),  # straddles -> neither
        (df.HOLDOUT_SOURCE, [0, y, 400, y + 400]),  # starts on the line -> holdout
        ("OSBS_029", [0, y, 400, y + 400]),  # another source image -> trainsub
    ]
    train = {
        "images": [
            {"id": i + 1, "source_image": src, "source_xyxy": xyxy}
            for i, (src, xyxy) in enumerate(tiles)
        ],
        "annotations": [{"id": 10 + i, "image_id": i + 1} for i in range(len(tiles))],
    }
    out = df._holdout_splits(train)
    assert [im["id"] for im in out["trainsub"]["images"]] == [1, 2, 5]
    assert [im["id"] for im in out["holdout"]["images"]] == [4]
    assert [a["id"] for a in out["holdout"]["annotations"]] == [13]
    assert [a["id"] for a in out["trainsub"]["annotations"]] == [10, 11, 14]
    # and with the default tiling the band is whole 400 px rows of the 2472 px high crop
    starts = df.tile_starts(2472, 400, 100)
    assert y in starts and (2472 - y) >= 400


def test_ids_unique_and_splits_disjoint_by_source(built):
    train, val = _load(built, "train"), _load(built, "val")
    image_ids = [im["id"] for d in (train, val) for im in d["images"]]
    ann_ids = [a["id"] for d in (train, val) for a in d["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)
    sources = {
        split: {im["source_image"] for im in d["images"]}
        for split, d in [("train", train), ("val", val)]
    }
    assert sources == {"train": {"OSBS_029"}, "val": {"2019_YELL_2_541000_4977000_image_crop"}}
    # pycocotools reads our JSON: an independent check of the format and the image-annotation links
    coco = COCO(str(built["root"] / "annotations" / "val.json"))
    assert sum(len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()) == len(val["annotations"])


def test_every_whole_crown_is_in_its_tiles_unchanged(built):
    """Each XML box lying entirely inside a tile appears in that tile, shifted, exactly once."""
    stem = "2019_YELL_2_541000_4977000_image_crop"
    src = _voc_boxes(stem)
    assert len(src) == 279
    val = _load(built, "val")
    for im in val["images"]:
        x0, y0, x1, y1 = im["source_xyxy"]
        inside = src[(src[:, 0] >= x0) & (src[:, 1] >= y0) & (src[:, 2] <= x1) & (src[:, 3] <= y1)]
        anns = [a["bbox"] for a in val["annotations"] if a["image_id"] == im["id"]]
        got = {
            (round(x + x0, 3), round(y + y0, 3), round(x + w + x0, 3), round(y + h + y0, 3))
            for x, y, w, h in anns
        }
        want = {tuple(round(v, 3) for v in b) for b in inside}
        assert want <= got
        assert len(got) >= len(want)
    # with 117 px overlap > the largest crown, every crown is whole in at least one tile
    covered = np.zeros(len(src), bool)
    for im in val["images"]:
        x0, y0, x1, y1 = im["source_xyxy"]
        covered |= (src[:, 0] >= x0) & (src[:, 1] >= y0) & (src[:, 2] <= x1) & (src[:, 3] <= y1)
    assert covered.all()


def test_build_is_cached_and_deterministic(built, tmp_path):
    again = df.build_deepforest_trees(built["root"].parent, sources=SUBSET)
    assert again["reused"] and again["counts"] == built["counts"]
    fresh = df.build_deepforest_trees(tmp_path, sources={"OSBS_029": "train"})
    assert not fresh["reused"]
    a = (built["root"] / "annotations" / "train.json").read_text()
    b = (fresh["root"] / "annotations" / "train.json").read_text()
    assert a == b  # same source, same ids, same bytes
    changed = df.build_deepforest_trees(tmp_path, sources={"OSBS_029": "train"}, min_side=20)
    assert (
        not changed["reused"]
        and changed["counts"]["train"]["boxes"] < fresh["counts"]["train"]["boxes"]
    )


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="Unknown source image"):
        df.build_deepforest_trees(tmp_path, sources={"nope": "train"})
    with pytest.raises(TypeError, match="tile_size"):
        df.build_deepforest_trees(tmp_path, tile=3)
    with pytest.raises(ValueError, match="min_overlap"):
        df.build_deepforest_trees(tmp_path, min_overlap=400)


def test_registered_split_loads_through_detectron2_mapper(built):
    try:
        df.register_deepforest_trees(built["root"].parent, sources=SUBSET)
        dicts = DatasetCatalog.get("deepforest_trees_val")
        meta = MetadataCatalog.get("deepforest_trees_val")
        assert meta.thing_classes == ["tree"] and meta.evaluator_type == "coco"
        assert len(dicts) == 16
        cfg = get_cfg()
        cfg.INPUT.FORMAT = "RGB"
        cfg.INPUT.MIN_SIZE_TRAIN = (200,)
        cfg.INPUT.MAX_SIZE_TRAIN = 200
        mapper = DatasetMapper(cfg, is_train=True)
        out = mapper(dicts[0])
        assert out["image"].shape == (3, 200, 200) and out["image"].dtype == torch.uint8
        inst = out["instances"]
        assert len(inst) == len(dicts[0]["annotations"]) > 0
        assert (inst.gt_classes == 0).all()
        b = inst.gt_boxes.tensor
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 200).all() and (b[:, 2:] > b[:, :2]).all()
    finally:
        df.register_deepforest_trees()  # back to the default registration


def test_train_net_loads_the_splits_from_an_empty_datasets_folder(tmp_path):
    """train_net.py's loaders (missing-file check included) build the dataset on first use."""
    from focal_det.data.sanitize import load_dataset_dicts

    try:
        df.register_deepforest_trees(tmp_path, sources={"OSBS_029": "train"})
        assert not (tmp_path / "deepforest_trees").exists()
        dicts = load_dataset_dicts(["deepforest_trees_train"], filter_empty=False)
        assert len(dicts) == 1 and (tmp_path / "deepforest_trees" / "build_info.json").is_file()
    finally:
        df.register_deepforest_trees()  # back to the default registration


def test_wheel_hash_mismatch_is_refused(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):  # "downloads" a file that is not the pinned release
        dest = cmd[cmd.index("-d") + 1]
        with open(f"{dest}/deepforest-1.5.2-py3-none-any.whl", "wb") as f:
            f.write(b"not the release")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(wheels.subprocess, "run", fake_pip)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        wheels.fetch_pinned_wheel(*df.DEEPFOREST_WHEEL, cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.whl"))
