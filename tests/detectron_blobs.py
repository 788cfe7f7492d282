"""
A FocalRetinaNet (ResNet-FPN, norm-free head, FrozenBN as Detectron's AffineChannel) state dict
written with the blob names of the paper's Detectron RetinaNet: the test fixture from which the
converter's tests make Detectron ``model_final.pkl`` files. A tests/ helper (the package only
reads Detectron files, it never writes them).
"""
import re

import numpy as np

_BRANCH2 = {1: "a", 2: "b", 3: "c"}


def detectron_blobs(state_dict, bn_eps=1e-5):
    """
    state dict -> {Detectron blob name: numpy array}. Buffers without a Detectron counterpart
    (pixel mean/std, anchors, FrozenBN statistics) are skipped; the statistics must be those a
    converted AffineChannel has (mean 0, var 1 - eps), so that the scale and bias are exact.
    """
    sd = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
    last_block, levels = {}, set()
    for k in sd:
        m = re.match(r"backbone\.bottom_up\.res(\d)\.(\d+)\.", k)
        if m:
            last_block[m[1]] = max(last_block.get(m[1], 0), int(m[2]))
        m = re.match(r"backbone\.fpn_lateral(\d)\.", k)
        if m:
            levels.add(int(m[1]))
    top = max(levels)
    blobs = {}

    def norm(prefix, c2_prefix):
        w = sd[prefix + ".weight"]
        affine_var = (np.ones_like(w) - np.float32(bn_eps)).astype(w.dtype)
        assert not sd[prefix + ".running_mean"].any(), prefix
        assert np.array_equal(sd[prefix + ".running_var"], affine_var), prefix
        blobs[c2_prefix + "_s"], blobs[c2_prefix + "_b"] = w, sd[prefix + ".bias"]

    for k, v in sd.items():
        p = "w" if k.endswith(".weight") else "b" if k.endswith(".bias") else None
        res = re.match(r"backbone\.bottom_up\.res(\d)\.(\d+)\.(conv(\d)|shortcut)\.weight$", k)
        if k == "backbone.bottom_up.stem.conv1.weight":
            blobs["conv1_w"] = v
            norm("backbone.bottom_up.stem.conv1.norm", "res_conv1_bn")
        elif res:
            branch = "branch1" if res[3] == "shortcut" else "branch2" + _BRANCH2[int(res[4])]
            name = f"res{res[1]}_{res[2]}_{branch}"
            blobs[name + "_w"] = v
            norm(k[: -len(".weight")] + ".norm", name + "_bn")
        elif m := re.match(r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)$", k):
            sum_blob = f"res{m[2]}_{last_block[m[2]]}_sum"
            if m[1] == "lateral":
                suffix = "" if int(m[2]) == top else "_lateral"
                blobs[f"fpn_inner_{sum_blob}{suffix}_{p}"] = v
            else:
                blobs[f"fpn_{sum_blob}_{p}"] = v
        elif m := re.match(r"backbone\.top_block\.p([67])\.(weight|bias)$", k):
            blobs[f"fpn_{m[1]}_{p}"] = v
        elif m := re.match(r"head\.(cls|bbox)_subnet\.(\d+)\.(weight|bias)$", k):
            blobs[f"retnet_{m[1]}_conv_n{int(m[2]) // 2}_fpn3_{p}"] = v
        elif m := re.match(r"head\.(cls_score|bbox_pred)\.(weight|bias)$", k):
            blobs[f"retnet_{'cls' if m[1] == 'cls_score' else 'bbox'}_pred_fpn3_{p}"] = v
    return blobs
