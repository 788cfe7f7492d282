"""
The Detectron (Caffe2) RetinaNet converter: a randomly initialised FocalRetinaNet is written as a
Detectron-named pickle (tests/detectron_blobs.py) and loaded back into a differently initialised
model through FocalCheckpointer; the outputs must be identical.
"""
import logging
import pickle

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron_blobs import detectron_blobs  # noqa: I001  (tests/ helper)

import focal_det  # noqa: F401
from focal_det.checkpoint import FocalCheckpointer, detectron_to_focal_names
from focal_det.model_zoo import get_config

CFG = "zoo/Detectron/retinanet_R-50-FPN_1x.yaml"


def _model(seed):
    cfg = get_config(CFG)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # keep boxes of a random model
    torch.manual_seed(seed)
    model = build_model(cfg)
    # Random AffineChannel-like norms and head biases, so that every blob matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g)
                        if "norm.weight" in name else 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _outputs(model, image):
    with torch.no_grad():
        feats = model.backbone(image[None])
        logits, deltas = model.head([feats[f] for f in model.head_in_features])
        dets = model([{"image": image, "height": image.shape[1], "width": image.shape[2]}])
    return logits, deltas, dets[0]["instances"]


@pytest.fixture(scope="module")
def random_model_and_pickle(tmp_path_factory):
    model = _model(seed=1)
    blobs = detectron_blobs(model.state_dict())
    # What a Detectron model_final.pkl holds: {"blobs": ..., "cfg": yaml}, with momentum blobs.
    blobs_with_solver = dict(blobs)
    blobs_with_solver["retnet_cls_pred_fpn3_w_momentum"] = np.zeros(1, dtype=np.float32)
    path = str(tmp_path_factory.mktemp("c2") / "model_final.pkl")
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs_with_solver, "cfg": "MODEL:\n  TYPE: retinanet\n"}, f)
    return model, blobs, path


def test_detectron_blob_names(random_model_and_pickle):
    _, blobs, _ = random_model_and_pickle
    # Names as Detectron's ResNet.py / FPN.py / retinanet_heads.py create them.
    for name in [
        "conv1_w", "res_conv1_bn_s", "res_conv1_bn_b",
        "res2_0_branch2a_w", "res2_0_branch2a_bn_s", "res2_0_branch1_w", "res2_0_branch1_bn_b",
        "res5_2_branch2c_w", "res4_5_branch2b_bn_s",
        "fpn_inner_res5_2_sum_w", "fpn_inner_res4_5_sum_lateral_w",
        "fpn_inner_res3_3_sum_lateral_b", "fpn_res5_2_sum_w", "fpn_res3_3_sum_b",
        "fpn_6_w", "fpn_6_b", "fpn_7_w", "fpn_7_b",
        "retnet_cls_conv_n0_fpn3_w", "retnet_cls_conv_n3_fpn3_b", "retnet_bbox_conv_n2_fpn3_w",
        "retnet_cls_pred_fpn3_w", "retnet_cls_pred_fpn3_b", "retnet_bbox_pred_fpn3_b",
    ]:  # fmt: skip
        assert name in blobs, name
    # 53 convs (1 stem + 16 blocks x 3 + 4 shortcuts) x (w, bn_s, bn_b); FPN 3 lateral +
    # 3 output + P6 + P7 convs x (w, b); head 8 tower convs + 2 predictors x (w, b).
    assert len(blobs) == 53 * 3 + 8 * 2 + 10 * 2
    assert not any(k.startswith("fpn_inner_res2") for k in blobs)  # P2 is not used
    assert blobs["retnet_cls_pred_fpn3_w"].shape == (80 * 9, 256, 3, 3)  # K*A, (A, K) order
    assert blobs["retnet_bbox_pred_fpn3_w"].shape == (4 * 9, 256, 3, 3)
    assert blobs["fpn_6_w"].shape == (256, 2048, 3, 3)  # P6 from C5


def test_names_round_trip(random_model_and_pickle):
    model, blobs, _ = random_model_and_pickle
    state, unused = detectron_to_focal_names(blobs)
    assert unused == []
    params = dict(model.named_parameters())
    assert set(params) <= set(state)
    for k, p in params.items():
        np.testing.assert_array_equal(state[k], p.detach().numpy(), err_msg=k)


def test_detectron_pickle_loads_with_identical_outputs(random_model_and_pickle, caplog):
    model, _, path = random_model_and_pickle
    other = _model(seed=2)
    image = torch.rand(3, 96, 128) * 255
    ref = _outputs(model, image)
    assert not torch.equal(ref[0][0], _outputs(other, image)[0][0])  # differently initialised
    with caplog.at_level(logging.WARNING):
        FocalCheckpointer(other).load(path)
    assert "retnet_" not in caplog.text  # every head blob was mapped (momentum is dropped)
    got = _outputs(other, image)
    for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
        assert torch.equal(a, b)
    assert len(ref[2]) > 0
    assert torch.equal(ref[2].pred_boxes.tensor, got[2].pred_boxes.tensor)
    assert torch.equal(ref[2].scores, got[2].scores)
    assert torch.equal(ref[2].pred_classes, got[2].pred_classes)


def test_backbone_mapping_agrees_with_detectron2_c2_loader(random_model_and_pickle):
    # Independent reference for the ResNet + FPN names: detectron2's own Caffe2 loader
    # (name heuristics). It fills the same backbone/FPN parameters from the pickle as our
    # converter, and nothing of the RetinaNet head (which is why the converter exists).
    from detectron2.checkpoint import DetectionCheckpointer

    model, _, path = random_model_and_pickle
    d2_loaded = _model(seed=3)
    before = {k: v.clone() for k, v in d2_loaded.state_dict().items()}
    DetectionCheckpointer(d2_loaded).load(path)
    after = d2_loaded.state_dict()
    ref = model.state_dict()
    # conv weights, FPN weights/biases and the FrozenBN (AffineChannel) scales/offsets
    backbone = [
        k for k in ref
        if k.startswith("backbone.") and not k.startswith("backbone.top_block.")
        and k.endswith((".weight", ".bias"))
    ]  # fmt: skip
    assert len(backbone) == 53 * 3 + 12
    for k in backbone:
        assert torch.equal(after[k], ref[k]), k
    for k, _ in model.named_parameters():
        if k.startswith("head."):
            assert torch.equal(after[k], before[k]), f"detectron2's loader filled {k}"
