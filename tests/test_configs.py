"""
Every YAML under configs/ loads, builds, and states the paper's hyper-parameters.

The expected values below are the paper's tables and Sec 4 (docs/paper.md), written out here as the
paper writes them; the test reads the values from the merged config (never from file names).
Most rows only differ in loss / anchors / input size, so every config builds its loss and its
anchor generator; one full model per backbone (R-50, R-101, X-101-32x8d, the tiny quick one) is
built and run on a tiny image to keep the test fast on CPU.
"""
import glob
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data.detection_utils import build_augmentation
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import focal_det  # noqa: F401
from focal_det import add_focal_config
from focal_det.losses import build_classification_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
R101 = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
X101 = "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"
TRAINVAL35K = ("coco_2014_train", "coco_2014_valminusminival")
MINIVAL = ("coco_2014_minival",)
TEST_DEV = ("coco_2017_test-dev",)  # the test-dev split detectron2 registers

# ---- the paper's tables, row by row: (config file, the row's settings) ----
# Table 1a: alpha-balanced CE
TABLE_1A = {
    f"table1a/retinanet_R_50_FPN_600_ce_alpha{a}.yaml": dict(loss="BalancedCE", alpha=float(a))
    for a in ["0.10", "0.25", "0.50", "0.75", "0.90", "0.99", "0.999"]
}
# Table 1b: FL, gamma with its best alpha
TABLE_1B = {
    "table1b/retinanet_R_50_FPN_600_fl_gamma0.0_alpha0.75.yaml": dict(gamma=0.0, alpha=0.75),
    "table1b/retinanet_R_50_FPN_600_fl_gamma0.1_alpha0.75.yaml": dict(gamma=0.1, alpha=0.75),
    "table1b/retinanet_R_50_FPN_600_fl_gamma0.2_alpha0.75.yaml": dict(gamma=0.2, alpha=0.75),
    "table1b/retinanet_R_50_FPN_600_fl_gamma0.5_alpha0.50.yaml": dict(gamma=0.5, alpha=0.50),
    "table1b/retinanet_R_50_FPN_600_fl_gamma1.0_alpha0.25.yaml": dict(gamma=1.0, alpha=0.25),
    "table1b/retinanet_R_50_FPN_600_fl_gamma2.0_alpha0.25.yaml": dict(gamma=2.0, alpha=0.25),
    "table1b/retinanet_R_50_FPN_600_fl_gamma5.0_alpha0.25.yaml": dict(gamma=5.0, alpha=0.25),
}
for v in TABLE_1B.values():
    v["loss"] = "FocalLoss"
# Table 1c: #scales per octave x #aspect ratios (FL gamma 2, alpha .25)
TABLE_1C = {
    f"table1c/retinanet_R_50_FPN_600_anchors_{sc}sc_{ar}ar.yaml": dict(
        loss="FocalLoss", gamma=2.0, alpha=0.25, scales_per_octave=sc, aspect_ratios=ar
    )
    for sc, ar in [(1, 1), (2, 1), (3, 1), (1, 3), (2, 3), (3, 3), (4, 3)]
}
# Table 1d: OHEM (batch, nms, 1:3) vs FL, ResNet-101
TABLE_1D = {
    "table1d/retinanet_R_101_FPN_600_ohem_b128_nms0.7.yaml": dict(batch=128, nms=0.7, ratio=None),
    "table1d/retinanet_R_101_FPN_600_ohem_b256_nms0.7.yaml": dict(batch=256, nms=0.7, ratio=None),
    "table1d/retinanet_R_101_FPN_600_ohem_b512_nms0.7.yaml": dict(batch=512, nms=0.7, ratio=None),
    "table1d/retinanet_R_101_FPN_600_ohem_b128_nms0.5.yaml": dict(batch=128, nms=0.5, ratio=None),
    "table1d/retinanet_R_101_FPN_600_ohem_b256_nms0.5.yaml": dict(batch=256, nms=0.5, ratio=None),
    "table1d/retinanet_R_101_FPN_600_ohem_b512_nms0.5.yaml": dict(batch=512, nms=0.5, ratio=None),
    "table1d/retinanet_R_101_FPN_600_ohem13_b128_nms0.5.yaml": dict(batch=128, nms=0.5, ratio=3),
    "table1d/retinanet_R_101_FPN_600_ohem13_b256_nms0.5.yaml": dict(batch=256, nms=0.5, ratio=3),
    "table1d/retinanet_R_101_FPN_600_ohem13_b512_nms0.5.yaml": dict(batch=512, nms=0.5, ratio=3),
}
for v in TABLE_1D.values():
    v.update(loss="OHEM", depth=101)
TABLE_1D["table1d/retinanet_R_101_FPN_600_fl_gamma2.0_alpha0.25.yaml"] = dict(
    loss="FocalLoss", gamma=2.0, alpha=0.25, depth=101
)
# Table 1e: depth x scale, test-dev
TABLE_1E = {
    f"table1e/retinanet_R_{d}_FPN_{s}.yaml": dict(
        loss="FocalLoss", gamma=2.0, alpha=0.25, depth=d, scale=s, test=TEST_DEV
    )
    for d in (50, 101)
    for s in (400, 500, 600, 700, 800)
}
# Table 2: 800 px, scale jitter, 1.5x schedule, test-dev
TABLE_2 = {
    "table2/retinanet_R_101_FPN_800_jitter_1.5x.yaml": dict(depth=101),
    "table2/retinanet_X_101_32x8d_FPN_800_jitter_1.5x.yaml": dict(depth=101, groups=32, width=8),
}
for v in TABLE_2.values():
    v.update(loss="FocalLoss", gamma=2.0, alpha=0.25, scale=800, jitter=True, schedule=1.5,
             test=TEST_DEV)  # fmt: skip
# Table 3: CE, FL, FL*
TABLE_3 = {
    "table3/retinanet_R_50_FPN_600_ce_alpha0.75.yaml": dict(loss="BalancedCE", alpha=0.75),
    "table3/retinanet_R_50_FPN_600_fl_gamma2.0_alpha0.25.yaml": dict(
        loss="FocalLoss", gamma=2.0, alpha=0.25
    ),
    "table3/retinanet_R_50_FPN_600_flstar_gamma2.0_beta1.0.yaml": dict(
        loss="FocalLossStar", star_gamma=2.0, star_beta=1.0
    ),
    "table3/retinanet_R_50_FPN_600_flstar_gamma4.0_beta0.0.yaml": dict(
        loss="FocalLossStar", star_gamma=4.0, star_beta=0.0
    ),
}
OTHER = {
    "retinanet_R101_FPN_800.yaml": dict(loss="FocalLoss", gamma=2.0, alpha=0.25, depth=101,
                                        scale=800),  # fmt: skip
}
PAPER_ROWS = {**TABLE_1A, **TABLE_1B, **TABLE_1C, **TABLE_1D, **TABLE_1E, **TABLE_2, **TABLE_3,
              **OTHER}  # fmt: skip
# Row counts of the paper's tables.
assert (len(TABLE_1A), len(TABLE_1B), len(TABLE_1C), len(TABLE_1D), len(TABLE_1E)) == (
    7, 7, 7, 10, 10
)
assert (len(TABLE_2), len(TABLE_3) + 1) == (2, 5)  # Table 3's CE/FL rows + 2 FL* (+ the header)

# Configs that are not paper rows: bases, CPU-sized quick configs, the demo's configs, and the
# zoo configs of already-trained detectron2 / Detectron models (tests/test_model_zoo.py).
NOT_PAPER = {"Base-RetinaNet.yaml", "Base-RetinaNet-Paper.yaml"}


def _all_yamls():
    return sorted(
        os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"),
                                                       recursive=True)  # fmt: skip
    )


def load(rel):
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, rel))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_every_config_the_docs_and_scripts_name_exists():
    # train_net.py's docstring once named a Table 1b config by a name no file had.
    import re

    files = ["README.md", "MODEL_ZOO.md", "train_net.py", "demo.py"] + sorted(
        os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
    )
    named = set()
    for f in files:
        text = open(os.path.join(REPO, f)).read()
        for path in re.findall(r"(?<![\w./])configs/[\w./-]+\.yaml", text):
            if "..." not in path and not path.endswith("/x.yaml"):  # examples, not names
                named.add((f, path))
    assert len(named) > 20, named
    missing = sorted((f, p) for f, p in named if not os.path.isfile(os.path.join(REPO, p)))
    assert not missing, missing


def test_every_paper_config_exists_and_every_config_is_known():
    yamls = set(_all_yamls())
    missing = sorted(set(PAPER_ROWS) - yamls)
    assert not missing, f"paper rows without a config: {missing}"
    unknown = sorted(
        y for y in yamls
        if y not in PAPER_ROWS and y not in NOT_PAPER
        and not y.startswith(("quick/", "demo/", "zoo/"))
    )  # fmt: skip
    assert not unknown, f"configs not checked against the paper by this test: {unknown}"


@pytest.mark.parametrize("rel", _all_yamls())
def test_config_loads_and_builds_loss_and_anchors(rel):
    cfg = load(rel)
    loss = build_classification_loss(cfg)
    strides = [8, 16, 32, 64, 128][: len(cfg.MODEL.ANCHOR_GENERATOR.SIZES)]
    ag = build_anchor_generator(cfg, [ShapeSpec(channels=8, stride=s) for s in strides])
    assert len(set(ag.num_cell_anchors)) == 1
    assert isinstance(loss, torch.nn.Module)


def _sizes_and_ratios(anchors):
    """sqrt(area) and h/w of (A, 4) XYXY cell anchors."""
    w = anchors[:, 2] - anchors[:, 0]
    h = anchors[:, 3] - anchors[:, 1]
    return (w * h).sqrt(), h / w


@pytest.mark.parametrize("rel", sorted(PAPER_ROWS))
def test_paper_row_hyper_parameters(rel):
    row = PAPER_ROWS[rel]
    cfg = load(rel)
    m, s, inp = cfg.MODEL, cfg.SOLVER, cfg.INPUT

    # Sec 4 architecture: FocalRetinaNet on ResNet-FPN P3-P7, C = 256, 4 convs per subnet.
    assert m.META_ARCHITECTURE == "FocalRetinaNet"
    assert m.BACKBONE.NAME == "build_retinanet_resnet_fpn_backbone"
    assert m.RESNETS.DEPTH == row.get("depth", 50)
    assert (m.RESNETS.NUM_GROUPS, m.RESNETS.WIDTH_PER_GROUP) == (
        row.get("groups", 1), row.get("width", 64)
    )
    assert m.WEIGHTS == {50: R50, 101: X101 if row.get("groups") else R101}[row.get("depth", 50)]
    assert m.FPN.OUT_CHANNELS == 256 and list(m.RETINANET.IN_FEATURES) == [
        "p3", "p4", "p5", "p6", "p7"
    ]  # fmt: skip
    assert m.RETINANET.NUM_CONVS == 4 and m.RETINANET.NUM_CLASSES == 80
    assert m.RETINANET.PRIOR_PROB == 0.01
    # Assignment: >= 0.5 foreground, < 0.4 background, between ignored.
    assert list(m.RETINANET.IOU_THRESHOLDS) == [0.4, 0.5]
    assert list(m.RETINANET.IOU_LABELS) == [0, -1, 1]
    # Inference: 0.05 threshold, 1000 per level, NMS 0.5, 100 detections.
    assert m.RETINANET.SCORE_THRESH_TEST == 0.05
    assert m.RETINANET.TOPK_CANDIDATES_TEST == 1000
    assert m.RETINANET.NMS_THRESH_TEST == 0.5
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    # The paper's (Detectron's) loss normaliser and matcher.
    assert m.FOCAL.LOSS.NORMALIZER_MOMENTUM == 0.0
    assert m.FOCAL.MATCHER.LOW_QUALITY_MATCHES == "detectron"
    assert m.RETINANET.SMOOTH_L1_LOSS_BETA == 0.11

    # Optimisation: 16 images, LR 0.01 / 10 at 60k, 80k of 90k (x1.5 for Table 2).
    k = row.get("schedule", 1.0)
    assert s.IMS_PER_BATCH == 16 and s.BASE_LR == 0.01
    assert s.MOMENTUM == 0.9 and s.WEIGHT_DECAY == 1e-4
    assert s.MAX_ITER == 90000 * k and tuple(s.STEPS) == (60000 * k, 80000 * k)
    # Not in the paper: Detectron's defaults (its released code), which the paper base adopts.
    assert (s.WARMUP_ITERS, s.WARMUP_METHOD) == (500, "linear")
    assert s.WARMUP_FACTOR == pytest.approx(1 / 3)
    assert (s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS) == (2.0, 0.0)
    assert cfg.DATASETS.TRAIN == TRAINVAL35K
    assert cfg.DATASETS.TEST == row.get("test", MINIVAL)

    # Input: 600 px (Table 1) or the row's scale, max size at the 800:1333 ratio; flip only.
    scale = row.get("scale", 600)
    max_size = {400: 667, 500: 833, 600: 1000, 700: 1167, 800: 1333}[scale]
    assert (inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST) == (scale, max_size)
    if row.get("jitter"):
        assert tuple(inp.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
        assert inp.MIN_SIZE_TRAIN_SAMPLING == "choice"
    else:
        assert tuple(inp.MIN_SIZE_TRAIN) == (scale,)
    assert inp.MAX_SIZE_TRAIN == max_size
    augs = build_augmentation(cfg, is_train=True)
    assert [type(a).__name__ for a in augs] == ["ResizeShortestEdge", "RandomFlip"]
    assert augs[1].horizontal and not cfg.INPUT.CROP.ENABLED

    # Loss: read back from the built module, not only from the config.
    loss = build_classification_loss(cfg)
    assert type(loss).__name__ == row["loss"]
    if row["loss"] in ("FocalLoss", "BalancedCE"):
        assert loss.alpha == pytest.approx(row["alpha"])
    if row["loss"] == "FocalLoss":
        assert loss.gamma == pytest.approx(row["gamma"])
    if row["loss"] == "FocalLossStar":
        assert (loss.gamma, loss.beta) == (row["star_gamma"], row["star_beta"])
        assert loss.alpha == 0.25
    if row["loss"] == "OHEM":
        assert loss.batch_size_per_image == row["batch"]
        assert loss.nms_thresh == pytest.approx(row["nms"])
        # "OHEM 1:3" = 1 positive per 3 negatives: positive fraction 1/4.
        expected_fraction = 1 / (1 + row["ratio"]) if row["ratio"] else -1.0
        assert loss.positive_fraction == pytest.approx(expected_fraction)
        # Sec 5.1: "after applying nms to all examples": one NMS over positives and negatives.
        assert loss.nms_groups == "all"
        # Compared with FL everything else fixed: RetinaNet's box loss and normaliser.
        assert (loss.box_loss, loss.normalizer) == ("foreground", "foreground")

    # Anchors: areas 32^2..512^2 on P3..P7 (strides 8..128), #scales per octave x ratios.
    sc, ar = row.get("scales_per_octave", 3), row.get("aspect_ratios", 3)
    ag = build_anchor_generator(
        cfg, [ShapeSpec(channels=256, stride=2**i) for i in range(3, 8)]
    )
    assert list(ag.num_cell_anchors) == [sc * ar] * 5
    for level, cell in enumerate(ag.cell_anchors):
        sizes, ratios = _sizes_and_ratios(cell)
        want_sizes = sorted(32 * 2**level * 2 ** (i / sc) for i in range(sc))
        want_ratios = [1.0] if ar == 1 else [0.5, 1.0, 2.0]
        got_sizes = sorted({round(x, 3) for x in sizes.tolist()})
        assert got_sizes == pytest.approx(want_sizes, abs=1e-3)  # anchors are float32
        got_ratios = sorted({round(x, 4) for x in ratios.tolist()})
        assert got_ratios == pytest.approx(want_ratios, rel=1e-3)
    if (sc, ar) == (3, 3):
        # A = 9 anchors covering 32..813 px (Sec 4)
        assert math.isclose(512 * 2 ** (2 / 3), 812.749, rel_tol=1e-6)


# One full model per backbone, run on a tiny image (train-mode loss and inference).
FULL_BUILD = [
    "table1b/retinanet_R_50_FPN_600_fl_gamma2.0_alpha0.25.yaml",
    "table1d/retinanet_R_101_FPN_600_ohem_b128_nms0.5.yaml",
    "table2/retinanet_X_101_32x8d_FPN_800_jitter_1.5x.yaml",
] + [y for y in _all_yamls() if y.startswith("quick/")]  # tiny: every loss end to end


@pytest.mark.parametrize("rel", FULL_BUILD)
def test_full_model_builds_and_runs_on_a_tiny_image(rel):
    cfg = load(rel)
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.head
    # K logits per anchor (K + 1 for the softmax focal loss: the loss says how many)
    num_logits = build_classification_loss(cfg).num_logits
    assert num_logits == cfg.MODEL.RETINANET.NUM_CLASSES + (
        cfg.MODEL.FOCAL.LOSS.NAME == "SoftmaxFocalLoss"
    )
    assert head.cls_score.out_channels == num_logits * 9
    assert head.bbox_pred.out_channels == 4 * 9
    assert len(head.cls_subnet) == 2 * cfg.MODEL.RETINANET.NUM_CONVS  # conv, ReLU pairs
    img = torch.rand(3, 64, 96) * 255
    inst = Instances((64, 96))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 48.0, 40.0]]))
    inst.gt_classes = torch.tensor([1])
    with EventStorage():
        losses = model([{"image": img, "instances": inst}])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([{"image": img, "height": 64, "width": 96}])
    assert len(out[0]["instances"]) <= cfg.TEST.DETECTIONS_PER_IMAGE
