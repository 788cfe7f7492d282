"""
Name mapping between the paper's released Detectron (Caffe2) RetinaNet models and FocalRetinaNet.

Detectron stores a model as ``{"blobs": {name: ndarray}}`` with Caffe2 blob names. For
RetinaNet (``detectron/modeling/retinanet_heads.py``, ``FPN.py``, ``ResNet.py``):

================================  ==========================================================
Detectron blob                    FocalRetinaNet / detectron2 parameter
================================  ==========================================================
conv1_w                           backbone.bottom_up.stem.conv1.weight
res_conv1_bn_{s,b}                backbone.bottom_up.stem.conv1.norm.{weight,bias}
res{S}_{B}_branch2{a,b,c}_w       backbone.bottom_up.res{S}.{B}.conv{1,2,3}.weight
res{S}_{B}_branch2{a,b,c}_bn_s/b  backbone.bottom_up.res{S}.{B}.conv{1,2,3}.norm.weight/bias
res{S}_{B}_branch1_w (+ _bn_s/b)  backbone.bottom_up.res{S}.{B}.shortcut.weight (+ .norm.*)
fpn_inner_res5_2_sum_{w,b}        backbone.fpn_lateral5.{weight,bias}  (top level: no suffix)
fpn_inner_res4_5_sum_lateral_w/b  backbone.fpn_lateral4.{weight,bias}
fpn_res4_5_sum_{w,b}              backbone.fpn_output4.{weight,bias}
fpn_6_{w,b}, fpn_7_{w,b}          backbone.top_block.p6 / p7.{weight,bias}
retnet_cls_conv_n{i}_fpn3_{w,b}   head.cls_subnet.{2i}.{weight,bias}
retnet_bbox_conv_n{i}_fpn3_{w,b}  head.bbox_subnet.{2i}.{weight,bias}
retnet_cls_pred_fpn3_{w,b}        head.cls_score.{weight,bias}
retnet_bbox_pred_fpn3_{w,b}       head.bbox_pred.{weight,bias}
================================  ==========================================================

The head's parameters are shared across levels; Detectron names them after the finest level
(``fpn3``, RPN_MIN_LEVEL 3) and the other levels' convs reuse those blobs. Detectron's
AffineChannel is detectron2's FrozenBatchNorm2d with running mean 0 and variance 1, so exporting
folds any running statistics into the scale and bias. detectron2's own Caffe2 loader
(``c2_model_loading``) maps the backbone and FPN names but not ``retnet_*`` nor ``fpn_6/7``;
this module maps every blob explicitly, so a converted model loads without name heuristics.

Output layouts need no permutation: both order the K*A classification channels as (A, K) and
the 4*A box channels as (A, 4), with the A anchors ordered scale-major then aspect ratio as
listed in the config. Detectron's configs list the aspect ratios as (1.0, 2.0, 0.5), so a
converted model must use ``MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS [[1.0, 2.0, 0.5]]``
(``configs/zoo/Detectron/*.yaml`` do).
"""
import re
from typing import Dict

import numpy as np

__all__ = ["detectron_to_focal_names", "is_detectron_retinanet"]

_BRANCH2 = {"a": 1, "b": 2, "c": 3}
_PARAM = {"w": "weight", "b": "bias", "s": "weight"}

# (Detectron regex, function of the match -> our key). Order does not matter: anchored patterns.
_RULES = [
    (r"conv1_w", lambda m: "backbone.bottom_up.stem.conv1.weight"),
    (r"res_conv1_bn_([sb])", lambda m: f"backbone.bottom_up.stem.conv1.norm.{_PARAM[m[1]]}"),
    (
        r"res(\d)_(\d+)_branch2([abc])_w",
        lambda m: f"backbone.bottom_up.res{m[1]}.{m[2]}.conv{_BRANCH2[m[3]]}.weight",
    ),
    (
        r"res(\d)_(\d+)_branch2([abc])_bn_([sb])",
        lambda m: f"backbone.bottom_up.res{m[1]}.{m[2]}.conv{_BRANCH2[m[3]]}.norm.{_PARAM[m[4]]}",
    ),
    (r"res(\d)_(\d+)_branch1_w", lambda m: f"backbone.bottom_up.res{m[1]}.{m[2]}.shortcut.weight"),
    (
        r"res(\d)_(\d+)_branch1_bn_([sb])",
        lambda m: f"backbone.bottom_up.res{m[1]}.{m[2]}.shortcut.norm.{_PARAM[m[3]]}",
    ),
    (r"fpn_inner_res(\d)_\d+_sum(?:_lateral)?_([wb])", lambda m: f"backbone.fpn_lateral{m[1]}.{_PARAM[m[2]]}"),  # noqa: E501
    (r"fpn_res(\d)_\d+_sum_([wb])", lambda m: f"backbone.fpn_output{m[1]}.{_PARAM[m[2]]}"),
    (r"fpn_([67])_([wb])", lambda m: f"backbone.top_block.p{m[1]}.{_PARAM[m[2]]}"),
    (
        r"retnet_(cls|bbox)_conv_n(\d+)_fpn3_([wb])",
        lambda m: f"head.{m[1]}_subnet.{2 * int(m[2])}.{_PARAM[m[3]]}",
    ),
    (r"retnet_cls_pred_fpn3_([wb])", lambda m: f"head.cls_score.{_PARAM[m[1]]}"),
    (r"retnet_bbox_pred_fpn3_([wb])", lambda m: f"head.bbox_pred.{_PARAM[m[1]]}"),
]
_RULES = [(re.compile(p + r"$"), f) for p, f in _RULES]


def is_detectron_retinanet(blobs) -> bool:
    """Whether a Caffe2 blob dict is a Detectron RetinaNet (has the ``retnet_`` head)."""
    return any(k.startswith("retnet_") for k in blobs)


def detectron_to_focal_names(blobs: Dict[str, np.ndarray], bn_eps: float = 1e-5):
    """
    Rename Detectron RetinaNet blobs to FocalRetinaNet state-dict keys.

    Args:
        blobs: Detectron blob name -> array (``*_momentum`` solver blobs may be present).

    Returns:
        (state_dict, unused): converted ``{our key: array}`` (FrozenBN statistics set to mean 0,
        var ``1 - bn_eps`` so that the scale is exactly AffineChannel's), and the sorted blob
        names that are not model parameters of a ResNet-FPN RetinaNet (solver state, ...).
    """
    out, unused = {}, []
    for name, value in blobs.items():
        for pattern, to_key in _RULES:
            m = pattern.match(name)
            if m:
                key = to_key(m)
                if key in out:
                    raise ValueError(f"Two Detectron blobs map to {key}; second: {name}")
                out[key] = value
                break
        else:
            unused.append(name)
    # AffineChannel computes x * s + b. detectron2's FrozenBN computes
    # x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps)); missing statistics would be
    # filled with mean 0, var 1 (scale off by 1 / sqrt(1 + eps)). Var = 1 - eps makes it exact.
    for key in [k for k in out if k.endswith(".norm.weight")]:
        prefix = key[: -len("weight")]
        n = np.asarray(out[key]).shape[0]
        out.setdefault(prefix + "running_mean", np.zeros(n, dtype=np.float32))
        out.setdefault(prefix + "running_var", np.ones(n, dtype=np.float32) - np.float32(bn_eps))
    return out, sorted(unused)
