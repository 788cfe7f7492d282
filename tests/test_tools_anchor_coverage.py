"""
tools/anchor_coverage.py: per-box best-anchor IoU, level and positives, against answers worked
out by hand from the anchor grid (anchors centred at multiples of the stride, detectron2's
ANCHOR_GENERATOR.OFFSET 0) and against an independent numpy brute force of the anchor grid.
"""

import json
import os

import numpy as np
import pytest
import synthetic_detection  # noqa: I001  (tests/ helper, on sys.path under pytest)
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from repo_scripts import REPO, load_script  # noqa: I001  (tests/ helper)

ac = load_script(os.path.join("tools", "anchor_coverage.py"))

H, W = 128, 160  # synthetic images; divisible by 32: no padding, P3..P7 grids 16x20 ... 1x2
ONE_ANCHOR = "cov_one_anchor"  # dataset with hand-placed boxes
RANDOM = "cov_random_boxes"


def _box(x0, y0, x1, y1, **extra):
    return {"bbox": [x0, y0, x1, y1], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, **extra}


# One scenario per image, so that no two boxes compete for an anchor (except in image 5).
# Anchors of the A = 1 config: 32 px squares every 8 px on P3, 64 px every 16 px on P4, ...
HAND_BOXES = {
    # 0: exactly the P3 anchor centred at (48, 40). IoU 1; the 4 anchors 8 px away: 24*32 /
    # (2*32^2 - 24*32) = 0.6; diagonal ones 24^2 / (2*32^2 - 24^2) = 0.39; the P4 64 px anchor
    # around it 32^2 / 64^2 = 0.25. So 5 anchors >= 0.5. Plus a crowd and an empty box (dropped).
    0: [_box(32, 24, 64, 56), _box(100, 80, 150, 120, iscrowd=1), _box(120, 10, 120, 30)],
    # 1: exactly the P4 anchor centred at (96, 64): the same geometry at twice the size, 5.
    1: [_box(64, 32, 128, 96)],
    # 2: a P3-sized box 4 px right of an anchor centre: the anchors at x = 48 and 56 both give
    # 28*32 / (2*32^2 - 28*32) = 7/9; x = 40 / 64: 20*32 / (2048 - 640) = 0.45; one row up or
    # down: 28*24 / (2048 - 672) = 0.488. So best 7/9 and exactly 2 anchors >= 0.5.
    2: [_box(36, 24, 68, 56)],
    # 3: 8x8, too small: every 32 px anchor containing it has IoU 64 / 1024 = 1/16 -- those
    # centred at x in {40, 48, 56}, y in {32, 40, 48}: 9 tied best anchors, all promoted by
    # detectron2's rule (ties included), none by Detectron's (1/16 < 0.4) or "none".
    3: [_box(44, 36, 52, 44)],
    # 4: 22x22 centred on the (48, 40) anchor: 484 / 1024 = 0.4727, in the ignore band [0.4, 0.5)
    # and unique (the next anchor gives 19*22 / (1024 + 484 - 418) = 0.38): promoted by both
    # detectron2's and Detectron's rule, not by "none".
    4: [_box(37, 29, 59, 51)],
    # 5: the box of image 0 twice: each anchor goes to the box it overlaps most, the first on a
    # tie, so the duplicate gets no positive in any mode although its best IoU is 1.
    5: [_box(32, 24, 64, 56), _box(32, 24, 64, 56)],
}
P3_EXPECTED = {  # (image, annotation) -> (best IoU, level, anchors >= 0.5)
    (0, 0): (1.0, "p3", 5),
    (1, 0): (1.0, "p4", 5),
    (2, 0): (7 / 9, "p3", 2),
    (3, 0): (1 / 16, "p3", 0),
    (4, 0): (484 / 1024, "p3", 0),
    (5, 0): (1.0, "p3", 5),
    (5, 1): (1.0, "p3", 5),
}
# Positives assigned by the matcher, per low-quality mode.
POSITIVES = {
    "detectron2": {(0, 0): 5, (1, 0): 5, (2, 0): 2, (3, 0): 9, (4, 0): 1, (5, 0): 5, (5, 1): 0},
    "detectron": {(0, 0): 5, (1, 0): 5, (2, 0): 2, (3, 0): 0, (4, 0): 1, (5, 0): 5, (5, 1): 0},
    "none": {(0, 0): 5, (1, 0): 5, (2, 0): 2, (3, 0): 0, (4, 0): 0, (5, 0): 5, (5, 1): 0},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("anchor_coverage")
    records = synthetic_detection.write_images(str(root / "imgs"), num_images=6, size=(H, W))
    hand = []
    for r in records:
        r = dict(r, annotations=HAND_BOXES[r["image_id"]])
        if r["image_id"] == 1:  # no size in the dict: read from the file's header
            del r["height"], r["width"]
        hand.append(r)
    rng = np.random.default_rng(0)
    rand = []
    for r in records[:3]:
        annos = []
        for _ in range(6):
            w, h = rng.uniform(6, 90, size=2)
            x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
            annos.append(_box(float(x0), float(y0), float(x0 + w), float(y0 + h)))
        rand.append(dict(r, annotations=annos))
    for name, recs in ((ONE_ANCHOR, hand), (RANDOM, rand)):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda recs=recs: recs)
            MetadataCatalog.get(name).set(thing_classes=["box"])

    cfg = synthetic_detection.tiny_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (H, 200)  # "train" resize takes the smallest: no resize
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TEST = 2 * H  # "test": x2
    cfg.INPUT.MAX_SIZE_TEST = 1000
    cfg.DATASETS.TRAIN = (ONE_ANCHOR,)
    nine = root / "tiny_a9.yaml"  # 3 sizes x 3 aspect ratios from 32 px on P3
    nine.write_text(cfg.dump())
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32 * 2**i] for i in range(5)]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0]]
    one = root / "tiny_a1.yaml"  # one square anchor per location: hand-countable
    one.write_text(cfg.dump())
    return {"root": root, "a1": str(one), "a9": str(nine)}


def _run(argv):
    args = ac.build_parser().parse_args(argv)
    return ac.run(args)


def _by_key(rows):
    return {(r["image_id"], r["annotation_index"]): r for r in rows}


@pytest.mark.parametrize("mode", ["detectron2", "detectron", "none"])
def test_hand_placed_boxes_give_the_hand_computed_coverage(files, mode):
    rows, summary, meta = _run(
        ["--config-file", files["a1"], "MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES", mode]
    )
    assert meta["dataset"] == ONE_ANCHOR and meta["low_quality_matches"] == mode
    assert (meta["min_size"], meta["max_size"]) == (H, 1000)
    assert (meta["crowd_boxes_dropped"], meta["empty_boxes_dropped"]) == (1, 1)
    assert meta["foreground_threshold"] == 0.5 and meta["background_threshold"] == 0.4
    assert [lv["anchor_sizes"] for lv in meta["levels"]] == [[32.0 * 2**i] for i in range(5)]
    got = _by_key(rows)
    assert set(got) == set(P3_EXPECTED)
    for key, (best, level, above) in P3_EXPECTED.items():
        r = got[key]
        assert r["best_iou"] == pytest.approx(best, abs=1e-5), key
        assert r["best_level"] == level and r["num_anchors_iou_ge_fg"] == above, key
        npos = POSITIVES[mode][key]
        assert r["num_positive"] == npos and r["has_positive"] == (npos > 0), (key, r)
        assert sum(r["num_positive_by_level"].values()) == npos
        # the positives of a box lie on its best level here (other levels' IoUs are < 0.4)
        assert r["num_positive_by_level"][level] == npos
        assert r["low_quality_only"] == (npos > 0 and above == 0), key
    assert got[(0, 0)]["best_anchor_xyxy"] == [32, 24, 64, 56]
    assert got[(1, 0)]["best_anchor_xyxy"] == [64, 32, 128, 96]

    # Summary: 7 boxes; 32-64 px bucket = boxes 0, 2, 5, 5' (sqrt area 32); <16: the 8 px one,
    # 16-32: the 22 px one; 64-128: the 64 px one.
    by_size = {s["bucket"]: s for s in summary["by_size"]}
    assert [s["num_boxes"] for s in summary["by_size"]] == [1, 1, 4, 1, 0, 0]
    assert by_size["32-64"]["frac_best_iou_ge_0.75"] == 1.0  # 1, 7/9, 1, 1
    assert by_size["32-64"]["frac_with_positive"] == 0.75  # the duplicate has none
    assert by_size["<16"]["frac_best_iou_ge_0.5"] == 0.0
    assert by_size["<16"]["frac_low_quality_only"] == (1.0 if mode == "detectron2" else 0.0)
    assert by_size["16-32"]["frac_with_positive"] == (0.0 if mode == "none" else 1.0)
    assert by_size[">=256"]["mean_best_iou"] is None
    overall = summary["overall"]
    assert overall["num_boxes"] == 7
    assert overall["frac_best_iou_ge_0.5"] == pytest.approx(5 / 7, abs=1e-4)
    assert overall["mean_best_iou"] == pytest.approx(
        np.mean([v[0] for v in P3_EXPECTED.values()]), abs=1e-4
    )
    by_level = {lv["level"]: lv for lv in summary["by_level"]}
    assert by_level["p3"]["boxes_best_here"] == 6 and by_level["p4"]["boxes_best_here"] == 1
    assert by_level["p3"]["positive_anchors"] == sum(POSITIVES[mode].values()) - 5
    assert by_level["p4"]["positive_anchors"] == 5
    # 16x20 + 8x10 + 4x5 + 2x3 + 1x2 locations, one anchor each, for every image
    assert [lv["anchors_per_image"] for lv in summary["by_level"]] == [320, 80, 20, 6, 2]


def test_test_resize_doubles_the_boxes_onto_the_next_level(files):
    rows, summary, meta = _run(["--config-file", files["a1"], "--resize", "test"])
    assert (meta["min_size"], meta["max_size"]) == (2 * H, 1000)
    r = _by_key(rows)[(0, 0)]
    # (32, 24, 64, 56) x2 = the 64 px P4 anchor centred at (96, 80): the P4 geometry of image 1
    assert r["box_xyxy"] == [64, 48, 128, 112] and r["best_level"] == "p4"
    assert r["best_iou"] == pytest.approx(1.0) and r["num_positive"] == 5
    assert _by_key(rows)[(2, 0)]["best_iou"] == pytest.approx(7 / 9, abs=1e-5)
    # --min-size overrides the shortest edge of the chosen mode
    _, _, meta = _run(["--config-file", files["a1"], "--resize", "test", "--min-size", "64"])
    assert (meta["min_size"], meta["max_size"]) == (64, 1000)
    # ... and --max-size the cap: 128x160 -> short side 256 would be 256x320, capped to 240 long
    rows, _, meta = _run(["--config-file", files["a1"], "--min-size", "256", "--max-size", "240"])
    assert (meta["min_size"], meta["max_size"]) == (256, 240)
    assert _by_key(rows)[(0, 0)]["box_xyxy"] == [48, 36, 96, 84]  # x1.5


def _reference_anchors(height, width, sizes, ratios, strides):
    """An independent anchor grid: centres at multiples of the stride, w = s / sqrt(r)."""
    out, level = [], []
    for lv, (stride, lv_sizes) in enumerate(zip(strides, sizes)):
        gh, gw = -(-height // stride), -(-width // stride)
        ys, xs = np.meshgrid(np.arange(gh) * stride, np.arange(gw) * stride, indexing="ij")
        cell = []
        for s in lv_sizes:
            for r in ratios:
                w = s / np.sqrt(r)
                cell.append([-w / 2, -r * w / 2, w / 2, r * w / 2])
        cell = np.array(cell)
        centres = np.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
        out.append((centres + cell[None]).reshape(-1, 4))
        level += [lv] * len(out[-1])
    return np.concatenate(out), np.array(level)


def _iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_random_boxes_match_a_brute_force_grid_and_the_models_label_anchors(files):
    from detectron2.structures import Boxes, Instances

    rows, summary, meta = _run(["--config-file", files["a9"], "--dataset", RANDOM])
    assert len(rows) == 18 and meta["levels"][0]["anchors_per_location"] == 9
    cfg = ac.setup_cfg(files["a9"], [])
    anchors, level = _reference_anchors(
        H, W, cfg.MODEL.ANCHOR_GENERATOR.SIZES, [0.5, 1.0, 2.0], [8, 16, 32, 64, 128]
    )
    model = ac.build_coverage_model(cfg)
    for rec in DatasetCatalog.get(RANDOM):
        gt = np.array([a["bbox"] for a in rec["annotations"]], dtype=np.float64)
        iou = _iou(gt, anchors)
        mine = [r for r in rows if r["image_id"] == rec["image_id"]]
        for j, r in enumerate(mine):
            assert r["best_iou"] == pytest.approx(iou[j].max(), abs=1e-5)
            assert r["best_level"] == f"p{3 + level[iou[j].argmax()]}"
            assert r["num_anchors_iou_ge_fg"] == int((iou[j] >= 0.5).sum())
        # the tool's positives are those of the model's own label_anchors (detectron2's path)
        inst = Instances((H, W))
        inst.gt_boxes = Boxes(torch.tensor(gt, dtype=torch.float32))
        inst.gt_classes = torch.zeros(len(gt), dtype=torch.int64)
        feats = model.backbone(torch.zeros(1, 3, H, W))
        labels, _ = model.label_anchors(
            model.anchor_generator([feats[f] for f in model.head_in_features]), [inst]
        )
        assert sum(r["num_positive"] for r in mine) == int((labels[0] == 0).sum())
    assert summary["overall"]["num_boxes"] == 18


def test_paper_config_with_a_synthetic_dataset(files, capsys):
    # configs/table1b FL gamma 2: R-50-FPN, 600 px, the paper's anchors and Detectron's rule.
    # A 150x200 image resized x4: (8, 6, 16, 14) -> the 32 px P3 anchor at (48, 40); a 2x2 box
    # -> 8x8, best IoU 1/16 < 0.4: no positive under Detectron's rule.
    name = "cov_paper_scale"
    if name not in DatasetCatalog.list():
        rec = dict(synthetic_detection.write_images(str(files["root"] / "paper"), 1, (150, 200))[0])
        rec["annotations"] = [_box(8, 6, 16, 14), _box(60, 70, 62, 72)]
        DatasetCatalog.register(name, lambda: [rec])
    cfg_file = os.path.join(
        REPO, "configs/table1b", "retinanet_R_50_FPN_600_fl_gamma2.0_alpha0.25.yaml"
    )
    out = files["root"] / "paper_out"
    assert ac.main(["--config-file", cfg_file, "--dataset", name, "--output", str(out)]) == 0
    data = json.loads((out / "anchor_coverage.json").read_text())
    meta, (a, b) = data["meta"], data["boxes"]
    assert meta["low_quality_matches"] == "detectron"
    assert (meta["min_size"], meta["max_size"]) == (600, 1000)
    assert meta["levels"][0]["anchor_sizes"] == [32.0, 40.32, 50.8]
    assert a["box_xyxy"] == [32, 24, 64, 56] and a["best_level"] == "p3"
    assert a["best_iou"] == pytest.approx(1.0) and a["has_positive"]
    assert b["best_iou"] == pytest.approx(1 / 16) and not b["has_positive"]
    assert "p3" in capsys.readouterr().out


def test_outputs_and_the_figure_show_the_numbers(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert ac.main(["--config-file", files["a1"], "--output", str(out)]) == 0
    data = json.loads((out / "anchor_coverage.json").read_text())
    assert os.path.getsize(out / "anchor_coverage.png") > 10_000
    assert len(data["boxes"]) == data["meta"]["num_boxes"] == 7
    printed = capsys.readouterr().out
    assert "wrote" in printed and "32-64" in printed
    # the table line of the 32-64 bucket: 4 boxes, 100% >= 0.5 and >= 0.75, 75% with a positive
    line = next(x for x in printed.splitlines() if x.strip().startswith("32-64"))
    assert line.split()[1:7] == ["4", "0.944", "100", "100", "75", "0"]

    fig = ac.build_figure(data["boxes"], data["summary"], data["meta"])
    ax_hist, ax_size, ax_scatter, ax_level = fig.axes
    assert sum(p.get_height() for p in ax_hist.patches) == 7
    bars = {c.get_label(): [p.get_height() for p in c] for c in ax_size.containers}
    for key, label in (
        ("frac_best_iou_ge_0.5", "best IoU >= 0.5"),
        ("frac_best_iou_ge_0.75", "best IoU >= 0.75"),
        ("frac_with_positive", "has a positive"),
    ):
        want = [np.nan if s[key] is None else s[key] for s in data["summary"]["by_size"]]
        np.testing.assert_allclose(bars[label], want)
    scatter = ax_scatter.collections[0].get_offsets()
    np.testing.assert_allclose(
        sorted(scatter[:, 1]), sorted(r["best_iou"] for r in data["boxes"]), atol=1e-6
    )
    levels = [c for c in ax_level.containers]
    assert [p.get_height() for p in levels[0]] == [6, 1, 0, 0, 0]
    assert [p.get_height() for p in levels[1]] == [22, 5, 0, 0, 0]  # detectron2 rule: 5+2+9+1+5


def test_bad_input_is_explained(files, tmp_path):
    with pytest.raises(SystemExit, match="not registered"):
        ac.main(["--config-file", files["a1"], "--dataset", "nope_xyz", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="must be > 0"):
        ac.main(["--config-file", files["a1"], "--min-size", "0", "--output", str(tmp_path)])
