"""
focal_det.modeling.inference and .speed_switches: every speed-up gives detectron2's numbers
(to float rounding).
References are detectron2's own modules / methods run on copies of the same weights.
"""
import copy
import warnings

import pytest
import torch
from detection_asserts import assert_same_detections  # noqa: I001  (tests/ helper)
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import build_resnet_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes

from focal_det.modeling import inference, speed_switches


def _frozen_bn_resnet(seed=0):
    """A narrow ResNet-50 (bottleneck width 4) with FrozenBN of random, non-trivial stats."""
    torch.manual_seed(seed)
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # everything trainable: gradients reach every conv
    model = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c) + 0.5)
            m.bias.copy_(torch.randn(c) * 0.1)
            m.running_mean.copy_(torch.randn(c) * 0.1)
            m.running_var.copy_(torch.rand(c) + 0.5)
    return model


def _assert_close_to_scale(a, b, rel=1e-4):
    """float32 results of differently ordered sums: equal to ``rel`` x the tensor's scale."""
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item() + 1e-6, (err, b.abs().max().item())


def _outputs_and_grads(model, x):
    out = model(x)
    loss = sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values())
    grads = torch.autograd.grad(loss, [p for p in model.parameters()] + [x])
    return out, grads


@pytest.mark.parametrize("channels_last", [False, True])
def test_fold_frozen_bn_equals_detectron2_frozen_bn(channels_last):
    ref = _frozen_bn_resnet()
    fast = copy.deepcopy(ref)
    n = speed_switches.fold_frozen_bn_into_convs(fast)
    assert n == sum(isinstance(m, FrozenBatchNorm2d) for m in ref.modules()) > 0
    if channels_last:
        speed_switches.convert_to_channels_last(fast)
    # The folded model keeps the parameter/buffer names: checkpoints stay interchangeable.
    assert list(fast.state_dict()) == list(ref.state_dict())

    # float32: what runs in training, equal to rounding.
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    out_ref, _ = _outputs_and_grads(ref, x)
    out_fast, _ = _outputs_and_grads(fast, x)
    for k in out_ref:
        _assert_close_to_scale(out_fast[k], out_ref[k])
        assert out_fast[k].is_contiguous(memory_format=torch.channels_last) == channels_last
    # float64: the fold is exact algebra, so values AND gradients agree to ~1e-12.
    ref64, fast64, x64 = ref.double(), fast.double(), x.detach().double().requires_grad_()
    out_ref, g_ref = _outputs_and_grads(ref64, x64)
    out_fast, g_fast = _outputs_and_grads(fast64, x64)
    for k in out_ref:
        torch.testing.assert_close(out_fast[k], out_ref[k], rtol=1e-10, atol=1e-10)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    ref, fast = ref.float(), fast.float()

    # Without autograd (inference), detectron2's FrozenBN takes its other branch.
    with torch.no_grad():
        for k, v in fast(x).items():
            _assert_close_to_scale(v, ref(x)[k])


def test_folding_follows_changed_statistics():
    """The fold happens at call time, so a checkpoint loaded afterwards is honoured."""
    ref = _frozen_bn_resnet(seed=1)
    fast = _frozen_bn_resnet(seed=2)
    speed_switches.fold_frozen_bn_into_convs(fast)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_close_to_scale(fast(x)["res5"], ref(x)["res5"])


class _D2Decoder:
    """Just what detectron2's ``_decode_per_level_predictions`` reads from ``self``."""

    def __init__(self):
        self.box2box_transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))

    decode = RetinaNet._decode_per_level_predictions


@pytest.mark.parametrize(
    "bias, topk",
    [
        (-2.9, 50),  # many pass the 0.05 threshold: top-k decides
        (-4.5, 1000),  # a few pass: the threshold decides
        (-20.0, 1000),  # none pass: empty result
        (-2.9, 10**6),  # k larger than R*K
    ],
)
def test_decode_top_candidates_equals_detectron2(bias, topk):
    torch.manual_seed(0)
    R, K = 300, 7
    logits = torch.randn(R, K) + bias
    deltas = torch.randn(R, 4) * 0.2
    xy = torch.rand(R, 2) * 200
    anchors = Boxes(torch.cat([xy, xy + 16 + torch.rand(R, 2) * 64], dim=1))
    d2 = _D2Decoder()
    ref = d2.decode(anchors, logits.sigmoid(), deltas, 0.05, topk, (300, 400))
    ours = inference.decode_top_candidates(
        d2.box2box_transform, anchors, logits, deltas, 0.05, topk, (300, 400)
    )
    assert len(ours) == len(ref)
    if bias == -20.0:
        assert len(ours) == 0
    torch.testing.assert_close(ours.scores, ref.scores)
    torch.testing.assert_close(ours.pred_classes, ref.pred_classes)
    torch.testing.assert_close(ours.pred_boxes.tensor, ref.pred_boxes.tensor)


def test_compile_forward_falls_back_when_compile_is_unusable(monkeypatch):
    monkeypatch.setitem(speed_switches._COMPILE_PROBE, "cpu", (False, "no C++ compiler (test)"))
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    expected = conv(x)
    speed_switches.compile_forward(conv)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        torch.testing.assert_close(conv(x), expected)
    torch.testing.assert_close(conv(x), expected)


def test_compile_forward_falls_back_when_first_call_fails(monkeypatch):
    monkeypatch.setitem(speed_switches._COMPILE_PROBE, "cpu", (True, ""))

    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("inductor exploded (test)")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    conv = torch.nn.Conv2d(3, 4, 3)
    keys = list(conv.state_dict())
    x = torch.randn(1, 3, 8, 8)
    expected = conv(x)
    speed_switches.compile_forward(conv)
    with pytest.warns(RuntimeWarning, match="inductor exploded"):
        torch.testing.assert_close(conv(x), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later calls are plain eager
        torch.testing.assert_close(conv(x), expected)
    assert list(conv.state_dict()) == keys


def _tiny_retinanet_cfg():
    from synthetic_detection import tiny_cfg

    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # what fold_frozen_bn_into_convs acts on
    cfg.MODEL.RETINANET.NUM_CLASSES = 5
    return cfg


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_inference_equals_detectron2_retinanet(channels_last):
    """detectron2's RetinaNet vs the same weights with every inference speed-up applied."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    ref = build_model(_tiny_retinanet_cfg()).eval()
    with torch.no_grad():
        # Confident enough that thousands of (anchor, class) pairs pass the 0.05 threshold
        # and the per-level top-k and NMS do real work.
        ref.head.cls_score.bias.fill_(-1.5)
    fast_cls = type("FastRetinaNet", (inference.TopCandidatesInference, RetinaNet), {})
    fast = fast_cls(**RetinaNet.from_config(_tiny_retinanet_cfg())).eval()
    fast.load_state_dict(ref.state_dict())
    speed_switches.apply_speed_options(fast, channels_last=channels_last, fold_frozen_bn=True)
    inputs = [{"image": torch.rand(3, 96, 128) * 255}, {"image": torch.rand(3, 80, 120) * 255}]
    with torch.no_grad():
        out_ref = ref(inputs)
        out_fast = fast(inputs)
    assert_same_detections(out_fast, out_ref, more_than=20)


def test_decode_many_candidates_above_threshold_is_exact():
    """The bound of step 1 (k-th largest per-anchor max) with most pairs above threshold."""
    torch.manual_seed(1)
    R, K = 5000, 20
    logits = torch.randn(R, K) * 2  # ~half of the pairs pass 0.05: top-k decides
    deltas = torch.randn(R, 4) * 0.2
    xy = torch.rand(R, 2) * 500
    anchors = Boxes(torch.cat([xy, xy + 32], dim=1))
    d2 = _D2Decoder()
    ref = d2.decode(anchors, logits.sigmoid(), deltas, 0.05, 1000, (600, 600))
    ours = inference.decode_top_candidates(
        d2.box2box_transform, anchors, logits, deltas, 0.05, 1000, (600, 600)
    )
    assert len(ours) == len(ref) == 1000
    assert torch.equal(ours.scores, ref.scores)  # same scores in the same (descending) order

    # Equal probabilities (float32 ties near 1) may come in either order: compare as sets.
    def rows(inst):
        return sorted(
            zip(inst.scores.tolist(), inst.pred_classes.tolist(),
                map(tuple, inst.pred_boxes.tensor.tolist()))
        )

    assert rows(ours) == rows(ref)


def test_decode_with_nan_logits_drops_them_like_detectron2():
    torch.manual_seed(2)
    R, K = 400, 5
    logits = torch.randn(R, K) * 3
    logits[::3, 1] = float("nan")
    logits[5, 2] = float("inf")
    deltas = torch.randn(R, 4) * 0.2
    xy = torch.rand(R, 2) * 300
    anchors = Boxes(torch.cat([xy, xy + 32], dim=1))
    d2 = _D2Decoder()
    for topk in (50, 10**4):
        ref = d2.decode(anchors, logits.sigmoid(), deltas, 0.05, topk, (400, 400))
        ours = inference.decode_top_candidates(
            d2.box2box_transform, anchors, logits, deltas, 0.05, topk, (400, 400)
        )
        assert len(ours) == len(ref) > 0
        assert not ours.scores.isnan().any()
        assert sorted(ours.scores.tolist()) == sorted(ref.scores.tolist())


@pytest.mark.parametrize("topk", [50, 10**4])
def test_decode_saturated_scores_is_identical_to_detectron2(topk):
    """Logits so large that many probabilities are exactly 1.0: ties resolved as detectron2."""
    torch.manual_seed(3)
    R, K = 300, 6
    logits = torch.randn(R, K) * 200
    deltas = torch.randn(R, 4) * 0.2
    xy = torch.rand(R, 2) * 300
    anchors = Boxes(torch.cat([xy, xy + 32], dim=1))
    d2 = _D2Decoder()
    ref = d2.decode(anchors, logits.sigmoid(), deltas, 0.05, topk, (400, 400))
    ours = inference.decode_top_candidates(
        d2.box2box_transform, anchors, logits, deltas, 0.05, topk, (400, 400)
    )
    assert (ref.scores == 1.0).sum() > 10
    assert torch.equal(ours.scores, ref.scores)
    assert torch.equal(ours.pred_classes, ref.pred_classes)
    assert torch.equal(ours.pred_boxes.tensor, ref.pred_boxes.tensor)
