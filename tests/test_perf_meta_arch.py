"""
FocalRetinaNet's speed switches (MODEL.FOCAL.CHANNELS_LAST / FOLD_FROZEN_BN / COMPILE_HEAD) and
its logits-based inference: same losses, gradients and detections as without them and as
detectron2's RetinaNet, same checkpoint keys, and a clean fallback when torch.compile is not
usable. Numerical equality only; speed is measured by benchmarks/model_bench.py.
"""
import copy
import warnings

import pytest
import torch
from detection_asserts import assert_same_detections  # noqa: I001  (tests/ helper)
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from synthetic_detection import tiny_cfg

from focal_det.modeling import speed_switches

SWITCHES = ["MODEL.FOCAL.CHANNELS_LAST", True, "MODEL.FOCAL.FOLD_FROZEN_BN", True]


def _cfg(meta="FocalRetinaNet", opts=()):
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = meta
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # what FOLD_FROZEN_BN acts on (R18-ish: stays finite)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # gradients reach every conv
    cfg.MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM = 0.9  # detectron2's, to compare with it
    cfg.merge_from_list(list(opts))
    return cfg


def _build(cfg, seed=0):
    """Random weights, FrozenBN scaled down so that activations stay O(1) (no saturation)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.fill_(0.3)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    out = []
    for h, w in [(128, 160), (96, 128)]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 90.0], [40.0, 8.0, 120.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        out.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return out


def _losses_and_grads(model, batch):
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params)
    return {k: v.detach() for k, v in losses.items()}, grads


def test_speed_switches_keep_losses_gradients_and_checkpoint_keys():
    plain = _build(_cfg())
    fast = _build(_cfg(opts=SWITCHES), seed=1)
    assert fast.speed_options == {
        "channels_last": True, "fold_frozen_bn": True, "compile_head": False
    }
    assert list(fast.state_dict()) == list(plain.state_dict())
    fast.load_state_dict(plain.state_dict(), strict=True)
    assert fast.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last)

    ref_losses, ref_grads = _losses_and_grads(plain, _batch())
    losses, grads = _losses_and_grads(fast, _batch())
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        err = (g - r).abs().max().item()
        assert err <= 1e-3 * r.abs().max().item() + 1e-7, err


def test_speed_switches_and_fast_inference_match_detectron2_detections():
    d2 = _build(_cfg("RetinaNet"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random head: scores spread over (0, 1), many above 0.05
        for p in d2.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    fast = _build(_cfg(opts=SWITCHES), seed=1)
    fast.load_state_dict(d2.state_dict(), strict=True)
    images = [{"image": b["image"]} for b in _batch()]
    d2.eval()
    fast.eval()
    with torch.no_grad():
        ref, out = d2(images), fast(images)
    assert_same_detections(out, ref, more_than=0)


def test_compile_head_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setitem(speed_switches._COMPILE_PROBE, "cpu", (False, "no compiler here (test)"))
    model = _build(_cfg(opts=["MODEL.FOCAL.COMPILE_HEAD", True]))
    ref = _build(_cfg())
    model.load_state_dict(ref.state_dict())
    assert list(model.state_dict()) == list(ref.state_dict())
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        losses, _ = _losses_and_grads(model, _batch())
    ref_losses, _ = _losses_and_grads(ref, _batch())
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k])


@pytest.mark.parametrize("compiler_works", [True, False])
def test_a_deepcopy_of_a_compiled_head_model_runs_its_own_parameters(monkeypatch, compiler_works):
    # EMA and TTA deep-copy the model: the copy's head, compiled or fallen back to eager, must
    # compute with the copy's weights, not the original's.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager"))
    why = "" if compiler_works else "no compiler here (test)"
    monkeypatch.setitem(speed_switches._COMPILE_PROBE, "cpu", (compiler_works, why))
    model = _build(_cfg(opts=["MODEL.FOCAL.COMPILE_HEAD", True])).eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.head.parameters():
            p.mul_(-1.5)
        features = model.backbone(_batch()[0]["image"][None].float())
        features = [features[f] for f in model.head_in_features]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning
            outputs = {"model": model.head(features), "twin": twin.head(features)}
        for name, m in (("model", model), ("twin", twin)):
            expected = type(m.head).forward(m.head, features)  # the eager head of that model
            for got, ref in zip(outputs[name][0] + outputs[name][1], expected[0] + expected[1]):
                torch.testing.assert_close(got, ref)
    assert not torch.allclose(outputs["twin"][0][0], outputs["model"][0][0])
