"""
FocalRetinaNet (issue 4): detectron2 compatibility, normaliser, matcher modes, every loss through
the same forward, inference, mixed precision, robustness. Tiny models on tiny images (CPU).
"""
import copy

import numpy as np
import pytest
import torch
from detectron2.modeling import RetinaNet, build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from synthetic_detection import tiny_cfg as _tiny_cfg

import focal_det.modeling.meta_arch as meta_arch_module
from focal_det.losses import ClassificationLossOutput, DenseClassificationLoss
from focal_det.modeling import FocalRetinaNet, NonFiniteLossError
from focal_det.modeling.matcher import RetinaNetMatcher

NUM_CLASSES = 3


def tiny_cfg(meta_arch="FocalRetinaNet"):
    """FPN 16 channels, anchors from 16 px, unit-scale inputs for random weights."""
    return _tiny_cfg(
        meta_arch,
        fpn_channels=16,
        smallest_anchor=16,
        num_classes=NUM_CLASSES,
        pixel_std=[57.375, 57.120, 58.395],
    )


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def make_batch(seed=0, specs=(((64, 96), 2), ((80, 64), 1))):
    """Images of the given (H, W) with `n` random boxes each (n = 0: no annotations)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for (h, w), n in specs:
        img = torch.rand(3, h, w, generator=g) * 255
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        batch.append({"image": img, "instances": inst})
    return batch


def perturb_head_(model, seed=0):
    """Random head weights (default init gives ~0.01 scores: no detections at 0.05)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------- 1. weight compatibility


def test_from_config_builds_only_the_registered_head(monkeypatch):
    import detectron2.modeling.meta_arch.retinanet as d2_retinanet

    def no_d2_head(*args, **kwargs):
        raise AssertionError("FocalRetinaNet.from_config built detectron2's head")

    # RetinaNet.from_config instantiates the module-level RetinaNetHead; ours must not.
    monkeypatch.setattr(d2_retinanet, "RetinaNetHead", no_d2_head)
    model = build(tiny_cfg())
    assert isinstance(model, FocalRetinaNet)
    assert type(model.head).__module__ == "focal_det.modeling.heads"


def test_detectron2_state_dict_loads_strictly_and_gives_identical_detections():
    d2 = build(tiny_cfg("RetinaNet"), seed=1)
    assert type(d2) is RetinaNet
    perturb_head_(d2)
    ours = build(tiny_cfg(), seed=2)
    # ours adds only the EMA normaliser's state, which a detectron2 state dict may lack
    assert set(ours.state_dict()) == set(d2.state_dict()) | {"_extra_state"}
    ours.load_state_dict(d2.state_dict(), strict=True)
    d2.eval()
    ours.eval()
    batch = [{k: v for k, v in x.items() if k == "image"} for x in make_batch(seed=3)]
    batch[1]["height"], batch[1]["width"] = 120, 96  # resized output, as in evaluation
    with torch.no_grad():
        ref = d2(batch)
        out = ours(batch)
    for r, o in zip(ref, out):
        r, o = r["instances"], o["instances"]
        assert 0 < len(o) <= 100, "the test needs detections to compare"
        assert o.image_size == r.image_size
        assert torch.equal(o.pred_boxes.tensor, r.pred_boxes.tensor)
        assert torch.equal(o.scores, r.scores)
        assert torch.equal(o.pred_classes, r.pred_classes)


def test_default_head_is_the_papers():
    cfg = tiny_cfg()
    cfg.MODEL.RETINANET.NUM_CONVS = 4  # the paper's (and detectron2's default)
    head = build(cfg).head
    num_anchors, channels = 9, cfg.MODEL.FPN.OUT_CHANNELS
    for subnet in (head.cls_subnet, head.bbox_subnet):
        kinds = [type(m).__name__ for m in subnet]
        assert kinds == ["Conv2d", "ReLU"] * 4
        assert all(m.kernel_size == (3, 3) and m.out_channels == channels for m in subnet[::2])
    # separate parameters for the two subnets
    assert head.cls_subnet[0].weight.data_ptr() != head.bbox_subnet[0].weight.data_ptr()
    assert head.cls_score.kernel_size == (3, 3)
    assert head.cls_score.out_channels == num_anchors * NUM_CLASSES
    assert head.bbox_pred.out_channels == num_anchors * 4  # class-agnostic boxes
    # prior pi = 0.01: b = -log((1 - pi) / pi), every anchor starts at confidence pi
    torch.testing.assert_close(
        torch.sigmoid(head.cls_score.bias), torch.full((num_anchors * NUM_CLASSES,), 0.01)
    )
    assert head.cls_subnet[0].weight.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("loss_name", ["FocalLoss", "OHEM"])
def test_sigmoid_losses_give_detectron2s_head_initialisation_bit_for_bit(loss_name):
    # The head is built for the loss (its logits per anchor and prior bias): for the sigmoid
    # losses that is detectron2's RetinaNetHead, initialised identically from the same seed.
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NAME = loss_name
    ref = build(tiny_cfg("RetinaNet"), seed=4).head.state_dict()
    got = build(cfg, seed=4).head.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


# ---------------------------------------------------------------- 2. normaliser


def _train_pair(momentum, iters, lr):
    """Run detectron2's RetinaNet and ours from the same weights on the same batches."""
    d2 = build(tiny_cfg("RetinaNet"), seed=1)
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NAME = "FocalLoss"
    cfg.MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM = momentum
    ours = build(cfg, seed=2)
    ours.load_state_dict(d2.state_dict(), strict=True)
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (d2, ours)]
    history = []
    for it in range(iters):
        # batches differ in box count, so the number of foreground anchors (and EMA) changes
        batch = make_batch(seed=10 + it, specs=(((64, 96), 1 + it), ((80, 64), it % 2)))
        step = []
        for model, opt in zip((d2, ours), opts):
            with EventStorage(it) as storage:
                losses = model(copy.deepcopy(batch))
                num_pos = storage.latest()["num_pos_anchors"][0] * len(batch)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            step.append({k: v.detach() for k, v in losses.items()})
        history.append((step[0], step[1], num_pos))
    return d2, ours, history


def test_momentum_0_9_reproduces_detectron2_losses_over_iterations():
    d2, ours, history = _train_pair(momentum=0.9, iters=4, lr=0.01)
    for ref, got, _ in history:
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
    assert ours.loss_normalizer == pytest.approx(d2.loss_normalizer, rel=1e-12)
    assert ours.loss_normalizer != 100.0  # the EMA did move


def test_momentum_0_normalises_by_this_batch_foreground_count():
    # lr 0: both models keep the same weights, only the normalisers differ.
    _, ours, history = _train_pair(momentum=0.0, iters=3, lr=0.0)
    ema = 100.0
    for ref, got, num_pos in history:
        ema = 0.9 * ema + 0.1 * max(num_pos, 1)  # detectron2's normaliser
        for k in ref:
            torch.testing.assert_close(got[k] * max(num_pos, 1), ref[k] * ema, rtol=1e-4, atol=1e-5)
    # stateless: nothing per-worker is left for the checkpoint
    assert not hasattr(ours, "loss_normalizer")
    assert ours.get_extra_state().item() == 100.0


def test_ema_normalizer_is_checkpointed_for_exact_resume(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM = 0.9
    model = build(cfg)
    with EventStorage(0):
        for it in range(2):
            model(make_batch(seed=20 + it))
    assert model.loss_normalizer != 100.0
    DetectionCheckpointer(model, str(tmp_path)).save("ckpt")
    fresh = build(cfg, seed=1)
    assert not hasattr(fresh, "loss_normalizer")
    DetectionCheckpointer(fresh).load(str(tmp_path / "ckpt.pth"))
    assert fresh.loss_normalizer == model.loss_normalizer  # bit-exact float64 round trip
    state = torch.load(tmp_path / "ckpt.pth", weights_only=True)["model"]["_extra_state"]
    assert state.dtype == torch.float64
    # the next iteration gives the same losses as the uninterrupted model
    batch = make_batch(seed=30)
    with EventStorage(2):
        ref = model(copy.deepcopy(batch))
        got = fresh(copy.deepcopy(batch))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_normalizer_all_reduce_uses_mean_count_over_workers(monkeypatch):
    model = build(tiny_cfg())
    assert model.foreground_normalizer(10) == 10.0
    model.normalizer_all_reduce = True
    monkeypatch.setattr(meta_arch_module.comm, "get_world_size", lambda: 2)

    def fake_all_reduce(t):  # the other worker has 30 foreground anchors
        t += 30

    monkeypatch.setattr(meta_arch_module.dist, "all_reduce", fake_all_reduce)
    assert model.foreground_normalizer(10) == 20.0
    assert model.foreground_normalizer(0) == 15.0
    model.normalizer_momentum = 0.9
    assert model.foreground_normalizer(10) == pytest.approx(0.9 * 100 + 0.1 * 20)


def _all_reduce_worker(rank, tmp, model):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        value = model.foreground_normalizer([10, 31][rank])
        (tmp / f"rank{rank}").write_text(repr(value))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_normalizer_all_reduce_with_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NORMALIZER_ALL_REDUCE = True
    model = build_model(cfg)
    # fork: the workers inherit the imported modules and the model (spawn re-imports: slow)
    mp.start_processes(
        _all_reduce_worker, args=(tmp_path, model), nprocs=2, start_method="fork"
    )
    # mean of 10 and 31 foreground anchors, on both workers
    assert [float((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [20.5, 20.5]


def test_bad_normalizer_momentum_is_rejected():
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM = 1.0
    with pytest.raises(ValueError, match="NORMALIZER_MOMENTUM"):
        build_model(cfg)


# ---------------------------------------------------------------- 3. matcher modes


def _match(mode, iou):
    matcher = RetinaNetMatcher([0.4, 0.5], [0, -1, 1], low_quality_matches=mode)
    matches, labels = matcher(torch.tensor(iou, dtype=torch.float32))
    return matches.tolist(), labels.tolist()


# 3 boxes x 6 anchors. Box 0's best anchor is already foreground (0.6); box 1's best (0.42) is in
# the ignored band; box 2's best anchors tie at 0.3, below the background threshold.
IOU_A = [
    [0.60, 0.45, 0.10, 0.00, 0.00, 0.00],
    [0.00, 0.10, 0.42, 0.20, 0.00, 0.00],
    [0.00, 0.00, 0.00, 0.10, 0.30, 0.30],
]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("detectron2", [1, -1, 1, 0, 1, 1]),  # every best anchor, whatever its IoU (ties too)
        ("detectron", [1, -1, 1, 0, 0, 0]),  # only if IoU >= 0.4
        ("none", [1, -1, -1, 0, 0, 0]),  # thresholds only
    ],
)
def test_matcher_modes_on_hand_built_iou(mode, expected):
    matches, labels = _match(mode, IOU_A)
    assert labels == expected
    assert matches == [0, 0, 1, 1, 2, 2]


def test_detectron_mode_uses_the_anchor_highest_iou_over_all_boxes():
    # Anchor 0 is box 1's best anchor (0.38 < 0.4) but overlaps box 0 at 0.41: Detectron keeps
    # it foreground, matched to box 0. At 0.39 it becomes background.
    assert _match("detectron", [[0.41, 0.5], [0.38, 0.0]]) == ([0, 0], [1, 1])
    assert _match("detectron", [[0.39, 0.5], [0.38, 0.0]]) == ([0, 0], [0, 1])
    assert _match("detectron2", [[0.39, 0.5], [0.38, 0.0]]) == ([0, 0], [1, 1])
    assert _match("none", [[0.41, 0.5], [0.38, 0.0]]) == ([0, 0], [-1, 1])


def _detectron_reference_labels(iou):
    """Detectron's roi_data/retinanet.py _get_retinanet_blobs labelling, in numpy (1 = fg)."""
    anchor_by_gt_overlap = iou.T  # (R, M)
    labels = np.full(anchor_by_gt_overlap.shape[0], -1)
    anchor_to_gt_max = anchor_by_gt_overlap.max(axis=1)
    gt_to_anchor_max = anchor_by_gt_overlap.max(axis=0)
    anchors_with_max_overlap = np.where(anchor_by_gt_overlap == gt_to_anchor_max)[0]
    labels[anchors_with_max_overlap] = 1
    labels[anchor_to_gt_max >= 0.5] = 1
    labels[anchor_to_gt_max < 0.4] = 0
    return labels.tolist()


@pytest.mark.parametrize("seed", range(5))
def test_detectron_mode_equals_detectron_reference_on_random_boxes(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(300, 2, generator=g) * 60
    anchors = Boxes(torch.cat([xy, xy + 4 + torch.rand(300, 2, generator=g) * 30], dim=1))
    gxy = torch.rand(5, 2, generator=g) * 60
    boxes = Boxes(torch.cat([gxy, gxy + 2 + torch.rand(5, 2, generator=g) * 40], dim=1))
    iou = pairwise_iou(boxes, anchors)
    iou = torch.round(iou * 20) / 20  # quantise: create ties like a regular anchor grid does
    _, labels = _match("detectron", iou.tolist())
    assert labels == _detectron_reference_labels(iou.numpy())
    assert set(labels) >= {0, 1}


def test_model_uses_configured_matcher_and_rejects_unknown_mode():
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES = "detectron"
    model = build_model(cfg)
    assert isinstance(model.anchor_matcher, RetinaNetMatcher)
    assert model.anchor_matcher.low_quality_matches == "detectron"
    cfg.MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES = "paper"
    with pytest.raises(ValueError, match="detectron2.*detectron.*none"):
        build_model(cfg)


# ---------------------------------------------------------------- 4. every loss trains


@pytest.mark.parametrize(
    "loss_name", ["FocalLoss", "FocalLossStar", "BalancedCE", "OHEM", "SoftmaxFocalLoss"]
)
def test_each_loss_trains_end_to_end(loss_name):
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NAME = loss_name
    cfg.MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE = 64
    model = build(cfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = make_batch(seed=5)
    totals, stats = [], {}
    model.cls_loss.register_forward_hook(lambda module, args, out: stats.update(out.stats))
    with EventStorage(0) as storage:
        for _ in range(5):
            losses = model(copy.deepcopy(batch))
            # the loss module's statistics (OHEM: anchors / positives selected) are logged
            for k, v in stats.items():
                assert storage.latest()[k][0] == pytest.approx(float(v))
            total = sum(losses.values())
            assert torch.isfinite(total)
            opt.zero_grad()
            total.backward()
            opt.step()
            totals.append(total.item())
            storage.step()
        assert storage.latest()["num_pos_anchors"][0] > 0
    assert totals[-1] < totals[0], totals
    if loss_name == "OHEM":
        assert stats, "OHEM reports how many anchors it selected"


def test_ohem_box_loss_is_retinanets_by_default_and_the_minibatchs_as_an_option():
    fl_model = build(tiny_cfg())
    batch = make_batch(seed=5)
    with EventStorage(0) as storage:
        fl = fl_model(copy.deepcopy(batch))
        num_fg = storage.latest()["num_pos_anchors"][0] * len(batch)
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NAME = "OHEM"
    cfg.MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.FOCAL.OHEM.POSITIVE_FRACTION = 0.25
    ohem = build(cfg)
    ohem.load_state_dict(fl_model.state_dict())
    with EventStorage(0):
        default = ohem(copy.deepcopy(batch))
    # BOX_LOSS / NORMALIZER "foreground": exactly RetinaNet's box loss
    assert torch.equal(default["loss_box_reg"], fl["loss_box_reg"])
    ohem.cls_loss.box_loss = ohem.cls_loss.normalizer = "selected"
    with EventStorage(0) as storage:
        minibatch = ohem(copy.deepcopy(batch))
        num_sel = storage.latest()["ohem_num_selected"][0] * len(batch)
        num_pos_sel = storage.latest()["ohem_num_pos_selected"][0] * len(batch)
    assert 0 < num_pos_sel < num_fg
    # a sum over a subset of the foreground anchors, divided by the minibatch size
    assert 0 < minibatch["loss_box_reg"] * num_sel < fl["loss_box_reg"] * num_fg
    torch.testing.assert_close(minibatch["loss_cls"] * num_sel, default["loss_cls"] * num_fg)


class RecordingLoss(DenseClassificationLoss):
    """A loss that returns its own normaliser, box mask and stats, and records its inputs."""

    def __init__(self, normalizer=None, box_mask_fn=None):
        super().__init__(NUM_CLASSES)
        self.normalizer, self.box_mask_fn, self.seen = normalizer, box_mask_fn, None

    def forward(self, pred_logits, gt_labels, anchors):
        self.seen = (pred_logits, gt_labels, anchors)
        valid = (gt_labels >= 0).float()
        loss = (pred_logits.float().sigmoid().sum(-1) * valid).sum()
        box_mask = None if self.box_mask_fn is None else self.box_mask_fn(gt_labels)
        return ClassificationLossOutput(
            loss=loss, normalizer=self.normalizer, box_mask=box_mask, stats={"my_stat": 42.0}
        )


def test_loss_contract_inputs_normalizer_box_mask_and_stats():
    cfg = tiny_cfg()
    batch = make_batch(seed=6)
    base = build(cfg)
    with EventStorage(0) as storage:
        ref = base(copy.deepcopy(batch))
        num_pos = storage.latest()["num_pos_anchors"][0] * len(batch)
    assert num_pos > 0

    # normaliser None -> the meta-arch's foreground count; stats reach EventStorage.
    loss = RecordingLoss()
    model = FocalRetinaNet(cfg, cls_loss=loss)  # @configurable: explicit args override cfg
    model.load_state_dict(base.state_dict())
    with EventStorage(0) as storage:
        out = model(copy.deepcopy(batch))
        assert storage.latest()["my_stat"][0] == 42.0
        assert storage.latest()["num_pos_anchors"][0] * len(batch) == num_pos
    logits, labels, anchors = loss.seen
    R = anchors.shape[0]
    assert logits.shape == (2, R, NUM_CLASSES) and labels.shape == (2, R)
    assert labels.dtype == torch.int64 and anchors.shape == (R, 4)
    assert int(((labels >= 0) & (labels < NUM_CLASSES)).sum()) == num_pos
    torch.testing.assert_close(out["loss_box_reg"], ref["loss_box_reg"])
    expected = (logits.sigmoid().sum(-1) * (labels >= 0)).sum() / num_pos
    torch.testing.assert_close(out["loss_cls"], expected)

    # the module's own normaliser divides both losses; an empty box mask zeroes the box loss.
    no_box = lambda lab: torch.zeros_like(lab, dtype=torch.bool)  # noqa: E731
    model.cls_loss = RecordingLoss(normalizer=7.0, box_mask_fn=no_box)
    with EventStorage(0):
        out = model(copy.deepcopy(batch))
    torch.testing.assert_close(out["loss_cls"], expected * num_pos / 7.0)
    assert out["loss_box_reg"].item() == 0.0
    # a box mask of all anchors is intersected with the foreground: same as no mask.
    model.cls_loss = RecordingLoss(box_mask_fn=lambda lab: torch.ones_like(lab, dtype=torch.bool))
    with EventStorage(0):
        out = model(copy.deepcopy(batch))
    torch.testing.assert_close(out["loss_box_reg"], ref["loss_box_reg"])
    # an integer mask would index anchors by value: refused with the contract named.
    model.cls_loss = RecordingLoss(box_mask_fn=torch.zeros_like)
    with EventStorage(0), pytest.raises(TypeError, match="bool"):
        model(copy.deepcopy(batch))


# ---------------------------------------------------------------- 5. inference


def test_inference_single_image_follows_the_paper():
    model = build(tiny_cfg())
    model.test_topk_candidates = 2  # the paper's 1000, scaled to the example
    model.max_detections_per_image = 3
    a = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]
    b = [[1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]]  # b[0] overlaps a[0] (IoU 0.82)
    anchors = [Boxes(torch.tensor(a)), Boxes(torch.tensor(b))]
    scores = [
        torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [0.04, 0.0, 0.3]]),
        torch.tensor([[0.7, 0.0, 0.0], [0.0, 0.06, 0.0]]),
    ]
    deltas = [torch.zeros(3, 4), torch.zeros(2, 4)]
    with torch.no_grad():
        res = model.inference_single_image(anchors, scores, deltas, (64, 64))
    # level 0: 0.04 is under 0.05; of (0.9, 0.8, 0.3) the top-2 survive. Level 1: 0.7 (class 0)
    # is suppressed by 0.9 (class 0, IoU 0.82 > 0.5); 0.8 (class 1) on the same box as 0.9 is
    # kept: NMS is per class.
    assert res.scores.tolist() == pytest.approx([0.9, 0.8, 0.06])
    assert res.pred_classes.tolist() == [0, 1, 1]
    assert res.pred_boxes.tensor.tolist() == [a[0], a[1], b[1]]
    model.max_detections_per_image = 2
    with torch.no_grad():
        assert len(model.inference_single_image(anchors, scores, deltas, (64, 64))) == 2


def test_inference_any_image_size_and_no_detections():
    model = build(tiny_cfg())
    perturb_head_(model)
    model.eval()
    sizes = [(17, 23), (40, 200), (97, 64)]
    batch = [{"image": torch.rand(3, h, w) * 255} for h, w in sizes]
    batch[2]["height"], batch[2]["width"] = 194, 128
    with torch.no_grad():
        out = model(batch)
    expected_sizes = [(17, 23), (40, 200), (194, 128)]
    for o, (h, w) in zip(out, expected_sizes):
        inst = o["instances"]
        assert inst.image_size == (h, w) and len(inst) > 0
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()
        assert (inst.scores > 0.05).all()
    model.test_score_thresh = 1.0  # no score passes: empty results with all fields
    with torch.no_grad():
        out = model(batch)
    for o in out:
        inst = o["instances"]
        assert len(inst) == 0
        assert inst.pred_boxes.tensor.shape == (0, 4) and inst.scores.shape == (0,)
        assert inst.pred_classes.shape == (0,)


def _softmax_model(seed=0):
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NAME = "SoftmaxFocalLoss"
    return build(cfg, seed)


def test_softmax_loss_head_has_k_plus_1_logits_with_detectrons_prior():
    model = _softmax_model()
    L = NUM_CLASSES + 1
    assert model.head.cls_score.out_channels == 9 * L
    # Detectron's softmax init: every anchor at background 1 - pi, pi / K per class
    p = model.head.cls_score.bias.detach().double().reshape(9, L).softmax(1)
    want = torch.tensor([0.01 / NUM_CLASSES] * NUM_CLASSES + [0.99], dtype=torch.float64)
    torch.testing.assert_close(p, want.expand(9, L), rtol=1e-6, atol=1e-8)
    # a head built for other logits than the loss reads is a clear error, not a silent reshape
    from focal_det.losses import SoftmaxFocalLoss

    mismatched = FocalRetinaNet(tiny_cfg(), cls_loss=SoftmaxFocalLoss(num_classes=3, alpha=0.25,
                                                                      gamma=2.0))  # fmt: skip
    with EventStorage(0), pytest.raises(ValueError, match="classification channels"):
        mismatched(make_batch(seed=1))


def test_softmax_inference_ranks_the_softmax_probabilities_of_the_k_classes():
    model = _softmax_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    # no NMS (IoU > 1 never happens), no top-k cap: every (anchor, class) pair above 0.3
    model.test_nms_thresh, model.test_topk_candidates, model.test_score_thresh = 1.0, 10**6, 0.3
    model.max_detections_per_image = 10**6
    images = model.preprocess_image([{"image": torch.rand(3, 64, 96) * 255}])
    with torch.no_grad():
        feats = model.backbone(images.tensor)
        feats = [feats[f] for f in model.head_in_features]
        logits, deltas = model.head(feats)
        got = model.forward_inference(images, feats, [logits, deltas])[0]
        # the reference, from the head's raw outputs: (A * (K + 1), H, W) per level
        L, scores, classes, boxes = NUM_CLASSES + 1, [], [], []
        for lg, dl, an in zip(logits, deltas, model.anchor_generator(feats)):
            H, W = lg.shape[-2:]
            lg = lg.view(9, L, H, W).permute(2, 3, 0, 1).reshape(-1, L)  # (H W A, K + 1)
            dl = dl.view(9, 4, H, W).permute(2, 3, 0, 1).reshape(-1, 4)
            p = torch.softmax(lg.double(), 1)[:, :NUM_CLASSES]  # the background is the last
            a, c = torch.nonzero(p > 0.3, as_tuple=True)
            scores.append(p[a, c])
            classes.append(c)
            boxes.append(model.box2box_transform.apply_deltas(dl[a], an.tensor[a]))
    scores, classes, boxes = torch.cat(scores), torch.cat(classes), torch.cat(boxes)
    assert 20 < len(got) == len(scores)
    assert (got.scores[1:] <= got.scores[:-1]).all()  # ranked by score

    def by_class_and_box(c, b):  # one (anchor, class) pair per detection: a unique key
        order = torch.arange(len(c))
        for key in (b[:, 3], b[:, 2], b[:, 1], b[:, 0], c.double()):
            order = order[torch.sort(key[order], stable=True).indices]
        return order

    i = by_class_and_box(got.pred_classes, got.pred_boxes.tensor)
    j = by_class_and_box(classes, boxes)
    assert torch.equal(got.pred_classes[i], classes[j])
    torch.testing.assert_close(got.pred_boxes.tensor[i], boxes[j])
    torch.testing.assert_close(got.scores[i].double(), scores[j], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 6. mixed precision


def test_cpu_autocast_bfloat16_training_computes_losses_in_float32():
    model = build(tiny_cfg())
    batch = make_batch(seed=7)
    with EventStorage(0):
        ref = model(copy.deepcopy(batch))
        seen = {}

        class Spy(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, logits, labels, anchors):
                seen["dtype"] = logits.dtype
                seen["autocast"] = torch.is_autocast_enabled("cpu")
                return self.inner(logits, labels, anchors)

        model.cls_loss = Spy(model.cls_loss)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(copy.deepcopy(batch))
    assert seen == {"dtype": torch.bfloat16, "autocast": False}
    for k in ref:
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k])
        torch.testing.assert_close(out[k], ref[k], rtol=0.1, atol=1e-3)
    sum(out.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- 7. robustness


@pytest.mark.parametrize("loss_name", ["FocalLoss", "OHEM"])
def test_images_without_annotations_train(loss_name):
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NAME = loss_name
    model = build(cfg)
    for specs in ((((64, 64), 0), ((64, 80), 0)), (((64, 64), 0), ((64, 80), 2))):
        model.zero_grad()
        with EventStorage(0) as storage:
            losses = model(make_batch(seed=8, specs=specs))
            num_pos = storage.latest()["num_pos_anchors"][0]
        for k, v in losses.items():
            assert torch.isfinite(v), (k, v)
        assert losses["loss_cls"] > 0
        if num_pos == 0:
            assert losses["loss_box_reg"].item() == 0.0
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_non_finite_loss_raises_with_iteration_names_and_hint():
    model = build(tiny_cfg())
    with torch.no_grad():
        model.head.cls_score.bias.fill_(float("nan"))
    with EventStorage(start_iter=7):
        with pytest.raises(NonFiniteLossError) as err:
            model(make_batch(seed=9))
    assert err.value.iteration == 7 and err.value.non_finite == ["loss_cls"]
    assert set(err.value.losses) == {"loss_cls", "loss_box_reg"}
    msg = str(err.value)
    assert "iteration 7" in msg
    assert "loss_cls=nan" in msg and "loss_box_reg=" in msg
    assert "BASE_LR=0.01" in msg and "IMS_PER_BATCH=16" in msg


def test_unknown_head_name_lists_registered_heads():
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.HEAD_NAME = "NoSuchHead"
    with pytest.raises(KeyError, match="NoSuchHead.*RetinaNetHead"):
        build_model(cfg)


def test_unknown_loss_name_fails_at_model_build():
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NAME = "NoSuchLoss"
    with pytest.raises(KeyError, match="NoSuchLoss.*FocalLoss"):
        build_model(cfg)


def test_anchor_count_differing_across_levels_is_a_clear_error():
    cfg = tiny_cfg()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16, 20], [32], [64], [128], [256]]
    with pytest.raises(ValueError, match="same number of anchors per location"):
        build_model(cfg)
