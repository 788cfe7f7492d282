"""
DetectronAnchorGenerator (focal_det/modeling/anchor_generator.py) against Detectron's anchors
and box coding, written out here from the formulas of Detectron's generate_anchors.py,
core/test_retinanet.py (_create_cell_anchors, the grid shift) and utils/boxes.py (bbox_transform,
bbox_transform_inv), in numpy float64, in Detectron's "+1" pixel convention.
"""
import glob
import math
import os

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator, build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from repo_scripts import REPO  # noqa: I001  (tests/ helper)

import focal_det  # noqa: F401
from focal_det.model_zoo import get_config
from focal_det.modeling import DetectronAnchorGenerator, detectron_cell_anchors

LEVELS = range(3, 8)  # P3 .. P7
RATIOS = (1.0, 2.0, 0.5)  # Detectron's RetinaNet configs list them in this order
DETECTRON_ZOO = sorted(
    os.path.relpath(p, os.path.join(REPO, "configs"))
    for p in glob.glob(os.path.join(REPO, "configs", "zoo", "Detectron", "*.yaml"))
)


# --- the reference: Detectron's steps, +1 convention ([x1, y1, x2, y2] covers pixels x1..x2) --
def _wh_centre(box):
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    return w, h, box[0] + 0.5 * (w - 1), box[1] + 0.5 * (h - 1)


def _box_around(w, h, cx, cy):
    hw, hh = 0.5 * (w - 1), 0.5 * (h - 1)
    return np.array([cx - hw, cy - hh, cx + hw, cy + hh])


def _detectron_anchor(stride, size, ratio):
    """One generate_anchors(stride, (size,), (ratio,)) box, inclusive pixel coordinates."""
    base = np.array([0.0, 0.0, stride - 1.0, stride - 1.0])  # pixels 0..stride-1
    w, h, cx, cy = _wh_centre(base)
    ws = np.round(np.sqrt(w * h / ratio))  # the ratio step, rounded to whole pixels
    hs = np.round(ws * ratio)
    w, h, cx, cy = _wh_centre(_box_around(ws, hs, cx, cy))
    scale = size / stride  # then the scale step
    return _box_around(w * scale, h * scale, cx, cy)


def _detectron_cell_anchors(level):
    """_create_cell_anchors of test_retinanet.py for one level: octaves outer, ratios inner."""
    stride = 2.0**level
    return np.stack([
        _detectron_anchor(stride, stride * 2 ** (octave / 3.0) * 4.0, ratio)  # ANCHOR_SCALE 4
        for octave in range(3) for ratio in RATIOS
    ])  # fmt: skip


def _continuous(boxes):
    """Detectron's inclusive [x1, y1, x2, y2] -> continuous [x1, y1, x2 + 1, y2 + 1]."""
    return boxes + np.array([0.0, 0.0, 1.0, 1.0])


def _detectron_generator():
    cfg = get_config("zoo/Detectron/retinanet_R-50-FPN_1x.yaml")
    shapes = [ShapeSpec(channels=256, stride=2**lvl) for lvl in LEVELS]
    return build_anchor_generator(cfg, shapes)


# --- the anchors --------------------------------------------------------------------------------
def test_cell_anchors_equal_detectrons_on_every_level():
    gen = _detectron_generator()
    assert isinstance(gen, DetectronAnchorGenerator)
    assert gen.offset == 0.0
    for i, level in enumerate(LEVELS):
        ref = torch.from_numpy(_continuous(_detectron_cell_anchors(level)))
        got = list(gen.cell_anchors)[i]
        assert got.shape == (9, 4) and got.dtype == torch.float32
        # Bit for bit: the same float64 arithmetic, rounded once to float32.
        assert torch.equal(got, ref.float()), (level, got, ref)
        # Centre (s - 1) / 2 in the +1 convention is s / 2 in continuous coordinates (exactly in
        # float64; float32 rounds the corners of the non-integer anchors).
        centres = (ref[:, :2] + ref[:, 2:]) / 2
        torch.testing.assert_close(centres, torch.full_like(centres, 2.0**level / 2))


def test_rounded_shapes_and_published_values():
    # The example: stride 8, size 32, ratio 0.5 -> round(sqrt(128)) = 11 x round(5.5) = 6
    # (half to even), times 4 = 44 x 24, where detectron2 has 45.25 x 22.63.
    box = detectron_cell_anchors(8, [32.0], [0.5])[0]
    assert (box[2] - box[0]).item() == 44 and (box[3] - box[1]).item() == 24
    d2 = DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[0.5]], strides=[8], offset=0.0)
    d2_box = list(d2.cell_anchors)[0][0]
    assert (d2_box[2] - d2_box[0]).item() == pytest.approx(45.2548, abs=1e-3)
    # Faster R-CNN's anchors, as listed in the header of Detectron's generate_anchors.py
    # (stride 16, sizes 128/256/512, ratios .5/1/2, ratio-major): Shaoqing Ren's MATLAB values,
    # 1-based pixel indices; Detectron's 0-based boxes are those minus 1.
    published = np.array([
        [-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
        [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
        [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360],
    ], dtype=np.float64)  # fmt: skip
    ours = np.concatenate([
        detectron_cell_anchors(16, [128.0, 256.0, 512.0], [r]).numpy() for r in (0.5, 1.0, 2.0)
    ])  # fmt: skip
    np.testing.assert_array_equal(ours, _continuous(published - 1))


@pytest.mark.parametrize("level", list(LEVELS))
def test_grid_anchors_equal_detectrons_at_grid_positions(level):
    gen = _detectron_generator()
    H, W = 5, 7
    feats = [torch.zeros(1, 1, H, W) if lvl == level else torch.zeros(1, 1, 1, 1) for lvl in LEVELS]
    anchors = gen(feats)[level - 3].tensor.reshape(H, W, 9, 4)
    stride = 2.0**level
    cell = _continuous(_detectron_cell_anchors(level))
    for x, y in [(0, 0), (1, 0), (0, 1), (6, 4), (3, 2)]:
        # test_retinanet.py: boxes = (x, y, x, y) * stride + cell_anchors[anchor_id]
        shift = np.array([x, y, x, y]) * stride
        err = np.abs(anchors[y, x].double().numpy() - (shift + cell))
        # float32 cell anchor + float32 shift: two roundings, each within half an ulp of its
        # operands' magnitude
        assert (err <= np.finfo(np.float32).eps * (np.abs(shift) + np.abs(cell))).all(), err


def test_detectron2_default_anchors_are_half_a_stride_off():
    # What the zoo configs had before: detectron2's anchors with OFFSET 0.0 (cell corner).
    cfg = get_config("zoo/Detectron/retinanet_R-50-FPN_1x.yaml")
    cfg.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
    d2 = build_anchor_generator(cfg, [ShapeSpec(channels=256, stride=2**lvl) for lvl in LEVELS])
    ours = _detectron_generator()
    for i, level in enumerate(LEVELS):
        shift = (list(ours.cell_anchors)[i][:, :2] + list(ours.cell_anchors)[i][:, 2:]) / 2 - (
            list(d2.cell_anchors)[i][:, :2] + list(d2.cell_anchors)[i][:, 2:]
        ) / 2
        torch.testing.assert_close(shift, torch.full_like(shift, 2.0**level / 2))


@pytest.mark.parametrize("rel", DETECTRON_ZOO)
def test_every_detectron_zoo_config_uses_detectrons_anchors(rel):
    cfg = get_config(rel)
    ag = cfg.MODEL.ANCHOR_GENERATOR
    assert ag.NAME == "DetectronAnchorGenerator" and ag.OFFSET == 0.0
    assert [list(r) for r in ag.ASPECT_RATIOS] == [list(RATIOS)]
    gen = build_anchor_generator(cfg, [ShapeSpec(channels=256, stride=2**lvl) for lvl in LEVELS])
    for i, level in enumerate(LEVELS):
        ref = torch.from_numpy(_continuous(_detectron_cell_anchors(level))).float()
        assert torch.equal(list(gen.cell_anchors)[i], ref), (rel, level)


def test_nonzero_offset_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="OFFSET 0.0"):
        DetectronAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[1.0]], strides=[8], offset=0.5)


# --- the box coding -----------------------------------------------------------------------------
def _detectron_bbox_transform(boxes, deltas, with_scale=False):
    """utils/boxes.py bbox_transform, weights (1, 1, 1, 1), in float64."""
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    clip = np.log(1000.0 / 16.0)  # BBOX_XFORM_CLIP
    dw, dh = np.minimum(deltas[:, 2], clip), np.minimum(deltas[:, 3], clip)
    pcx, pcy = deltas[:, 0] * w + cx, deltas[:, 1] * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    # x2 / y2 get the "- 1" of the +1 convention
    out = np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw - 1, pcy + 0.5 * ph - 1], 1)
    if not with_scale:
        return out
    # magnitude of the terms each coordinate is computed from (for float32 rounding bounds)
    scale = np.stack([np.abs(pcx) + pw, np.abs(pcy) + ph] * 2, 1) + np.abs(boxes)
    return out, scale


def _detectron_bbox_transform_inv(boxes, gt):
    """utils/boxes.py bbox_transform_inv (the training targets), weights (1, 1, 1, 1)."""
    w, h = boxes[:, 2] - boxes[:, 0] + 1.0, boxes[:, 3] - boxes[:, 1] + 1.0
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    gw, gh = gt[:, 2] - gt[:, 0] + 1.0, gt[:, 3] - gt[:, 1] + 1.0
    gcx, gcy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return np.stack([(gcx - cx) / w, (gcy - cy) / h, np.log(gw / w), np.log(gh / h)], 1)


def _field_of_anchors():
    """Every level's anchors at a few cells: ours (continuous, float32) and Detectron's."""
    gen = _detectron_generator()
    feats = [torch.zeros(1, 1, 4, 6) for _ in LEVELS]
    ours = torch.cat([a.tensor for a in gen(feats)])
    det = []
    for level in LEVELS:
        cell, s = _detectron_cell_anchors(level), 2.0**level
        for y in range(4):
            for x in range(6):
                det.append(cell + np.array([x, y, x, y]) * s)
    return ours, np.concatenate(det)


def test_detectron_decoding_equals_box2boxtransform_on_continuous_anchors():
    """
    What is equal: with the anchors in continuous coordinates (Detectron's + [0, 0, 1, 1]),
    detectron2's Box2BoxTransform (widths x2 - x1, decoded x2 = cx + w / 2) gives Detectron's
    bbox_transform boxes (widths x2 - x1 + 1, decoded x2 = cx + w / 2 - 1) as x1, y1 unchanged
    and x2, y2 + 1, i.e. the same boxes in continuous coordinates, including the clip of dw / dh
    at log(1000 / 16) (detectron2's scale_clamp), and the same training targets (encoding) for
    a ground-truth box given as Detectron's inclusive [x1, y1, x2, y2] -> ours + [0, 0, 1, 1].
    The identity is exact in real arithmetic; detectron2 decodes in float32, so the numbers
    agree to float32 rounding (a few ulps of the box's magnitude), and bit for bit where every
    intermediate is exactly representable. What is not equal: anything
    that scales boxes in the +1 convention (Detectron's resizing of ground truth and its
    division of detections by the image scale): see MODEL_ZOO.md.
    """
    ours, det = _field_of_anchors()
    R = ours.shape[0]
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(R, 4, generator=g, dtype=torch.float64) * 0.5
    deltas[::7, 2] = 6.0  # beyond the clip, log(1000 / 16) = 4.135
    deltas[3::11, 3] = 9.0
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))  # FocalRetinaNet's, BBOX_REG_WEIGHTS
    assert b2b.scale_clamp == np.log(1000.0 / 16.0)
    got = b2b.apply_deltas(deltas.float(), ours).double().numpy()
    ref, scale = _detectron_bbox_transform(det, deltas.numpy(), with_scale=True)
    # float32 decoding: a few roundings, each within an ulp of the terms' magnitude
    err = np.abs(got - _continuous(ref))
    assert (err <= 4 * np.finfo(np.float32).eps * scale).all(), (err / scale).max()
    assert (deltas[:, 2:] > np.log(1000 / 16)).sum() > 10  # the clip was exercised

    # Encoding: Detectron's targets for inclusive ground truth = detectron2's for continuous.
    gt_inclusive = det + deltas.numpy()[:, [0, 1, 0, 1]] * 20 + np.array([0, 0, 30, 30])
    targets = b2b.get_deltas(ours.double(), torch.from_numpy(_continuous(gt_inclusive)))
    np.testing.assert_allclose(
        targets.numpy(), _detectron_bbox_transform_inv(det, gt_inclusive), rtol=1e-5, atol=1e-5
    )

    # Bit for bit where float32 is exact: integer square anchors, dyadic deltas, dw = dh = 0.
    square = ours[1::9][:40]  # octave 0, ratio 1: integer corners
    assert torch.equal(square, square.round())
    dyadic = torch.zeros(len(square), 4)
    dyadic[:, 0] = torch.arange(len(square)) % 5 * 0.125 - 0.25
    dyadic[:, 1] = torch.arange(len(square)) % 3 * 0.0625
    got = b2b.apply_deltas(dyadic, square).double().numpy()
    ref = _detectron_bbox_transform(square.double().numpy() - [0, 0, 1, 1], dyadic.double().numpy())
    np.testing.assert_array_equal(got, _continuous(ref))


def test_plus_one_iou_equals_continuous_iou():
    # Detectron's matching (roi_data/retinanet.py, utils/cython_bbox) uses +1 areas on inclusive
    # boxes: the same IoU as the continuous one (detectron2's pairwise_iou, which computes in
    # float32; torchvision's box_iou in float64) on the continuous boxes.
    from detectron2.structures import Boxes, pairwise_iou
    from torchvision.ops import box_iou

    _, det = _field_of_anchors()
    gt = np.array([[10.0, 20.0, 80.0, 60.0], [100.0, 5.0, 180.0, 150.0]])  # inclusive
    iw = np.maximum(
        np.minimum(det[:, None, 2], gt[None, :, 2]) - np.maximum(det[:, None, 0], gt[None, :, 0])
        + 1, 0
    )  # fmt: skip
    ih = np.maximum(
        np.minimum(det[:, None, 3], gt[None, :, 3]) - np.maximum(det[:, None, 1], gt[None, :, 1])
        + 1, 0
    )  # fmt: skip
    area = lambda b: (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # noqa: E731
    inter = iw * ih
    ref = inter / (area(det)[:, None] + area(gt)[None, :] - inter)
    a, b = torch.from_numpy(_continuous(det)), torch.from_numpy(_continuous(gt))
    np.testing.assert_allclose(box_iou(a, b).numpy(), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pairwise_iou(Boxes(a), Boxes(b)).numpy(), ref, atol=1e-6)
    assert ref.max() > 0.5  # some anchors match


def test_detectron_anchor_model_builds_with_the_zoo_config():
    # The converted models run with these anchors: FocalRetinaNet's generator is ours.
    from detectron2.modeling import build_model

    cfg = get_config("zoo/Detectron/retinanet_R-50-FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18  # keep it small: only the anchor generator matters here
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    assert isinstance(model.anchor_generator, DetectronAnchorGenerator)
    assert math.isclose(model.box2box_transform.scale_clamp, math.log(1000 / 16))
