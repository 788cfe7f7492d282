"""
Tests of focal_det.losses: closed forms (docs/paper.md, Appendix B) in float64, fvcore equality in
float32, stability, label-based == one-hot, the registered modules and OHEM's selection.
All tensors are small; the compiled path is exercised in tests/test_losses_compiled.py only.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from fvcore.nn import sigmoid_focal_loss as fv_focal
from fvcore.nn import sigmoid_focal_loss_star as fv_focal_star

import focal_det
from focal_det.losses import (
    balanced_sigmoid_ce,
    build_classification_loss,
    per_anchor_ce_from_labels,
    select_ohem_anchors,
    sigmoid_focal_loss,
    sigmoid_focal_loss_star,
    sigmoid_loss_from_labels,
)


def _data(n=40, k=5, dtype=torch.float64, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, k, generator=g) * scale).to(dtype)
    t = (torch.rand(n, k, generator=g) < 0.3).to(dtype)
    return x, t


# --- closed forms, written straight from docs/paper.md --------------------------------------------
def _closed_form(x, t, alpha, gamma, kind="fl", beta=0.0):
    """
    FL / FL* and their Appendix-B gradients in x's dtype. p_t, 1 - p_t and log p_t are each
    taken from one sigmoid / logsigmoid of x_t (no 1 - p cancellation), and alpha_t is built in
    x's dtype, so that in float64 this is a reference to ~1e-15.
    """
    y = 2 * t - 1
    x_t = y * x
    a_t = torch.ones_like(x)
    if alpha >= 0:
        a_t = torch.full_like(x, alpha).where(t > 0.5, torch.full_like(x, 1 - alpha))
    if kind == "fl":
        p_t, one_minus_p_t, log_p_t = torch.sigmoid(x_t), torch.sigmoid(-x_t), F.logsigmoid(x_t)
        loss = -a_t * one_minus_p_t**gamma * log_p_t
        grad = a_t * y * one_minus_p_t**gamma * (gamma * p_t * log_p_t - one_minus_p_t)
    else:  # FL*: p*_t = sigmoid(gamma x_t + beta)
        s = gamma * x_t + beta
        loss = -a_t * F.logsigmoid(s) / gamma
        grad = -a_t * y * torch.sigmoid(-s)  # y (p*_t - 1)
    return loss, grad


@pytest.mark.parametrize("alpha", [0.25, 0.75, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_focal_matches_closed_form_values_and_appendix_b_gradient(alpha, gamma):
    x, t = _data(scale=3.0)
    x.requires_grad_()
    loss = sigmoid_focal_loss(x, t, alpha, gamma, "none")
    ref, ref_grad = _closed_form(x.detach(), t, alpha, gamma)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    loss.sum().backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0), (1.0, -0.5)])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_focal_star_matches_closed_form(gamma, beta, alpha):
    x, t = _data(scale=3.0, seed=1)
    x.requires_grad_()
    loss = sigmoid_focal_loss_star(x, t, gamma, beta, alpha, "none")
    ref, ref_grad = _closed_form(x.detach(), t, alpha, gamma, "star", beta)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    loss.sum().backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.25, 0.9, -1.0])
def test_balanced_ce_closed_form_and_plain_ce(alpha):
    x, t = _data(seed=2)
    x.requires_grad_()
    loss = balanced_sigmoid_ce(x, t, alpha, "sum")
    ref, ref_grad = _closed_form(x.detach(), t, alpha, 0.0)
    torch.testing.assert_close(loss, ref.sum(), rtol=1e-10, atol=0)
    loss.backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-9, atol=1e-12)
    if alpha < 0:  # alpha < 0: unweighted, i.e. PyTorch's BCE with logits
        bce = F.binary_cross_entropy_with_logits(x.detach(), t, reduction="sum")
        torch.testing.assert_close(loss.detach(), bce, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 1.0), (0.5, 0.5)])
def test_focal_equals_fvcore_float32(alpha, gamma, reduction):
    x, t = _data(n=200, k=9, dtype=torch.float32, scale=5.0, seed=3)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = sigmoid_focal_loss(x1, t, alpha, gamma, reduction)
    ref = fv_focal(x2, t, alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-6)
    (ours.sum()).backward()
    (ref.sum()).backward()
    # fvcore differentiates (1 - p_t)^gamma through autograd: NaN where 1 - p_t underflows to 0
    # and gamma < 1. Ours is the closed form, finite everywhere.
    assert torch.isfinite(x1.grad).all()
    ok = torch.isfinite(x2.grad)
    assert ok.float().mean() > 0.99
    torch.testing.assert_close(x1.grad[ok], x2.grad[ok], rtol=1e-4, atol=1e-6)


def test_focal_star_beta0_equals_fvcore():
    x, t = _data(n=100, k=4, dtype=torch.float32, seed=4)
    for alpha, gamma in [(-1.0, 1.0), (0.25, 2.0)]:
        ours = sigmoid_focal_loss_star(x, t, gamma, 0.0, alpha, "none")
        torch.testing.assert_close(ours, fv_focal_star(x, t, alpha, gamma, "none"))


def test_gamma_zero_is_ce_exactly():
    x, t = _data(dtype=torch.float32, seed=5)
    for alpha in (0.25, -1.0):
        fl = sigmoid_focal_loss(x, t, alpha, 0.0, "none")
        ce = balanced_sigmoid_ce(x, t, alpha, "none")
        assert torch.equal(fl, ce)
    # float64 reference: float32 BCE-with-logits loses relative precision on tiny losses
    bce = F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(x, t, -1.0, 0.0).double(), bce, rtol=1e-6, atol=0)


def test_figure1_ratios():
    # p_t = 0.9 -> FL(gamma 2) is 100x less than CE; p_t ~ 0.968 -> ~1000x.
    for p_t, ratio in [(0.9, 100.0), (1 - 1 / math.sqrt(1000), 1000.0)]:
        x = torch.tensor([math.log(p_t / (1 - p_t))], dtype=torch.float64)
        t = torch.ones_like(x)
        ce = balanced_sigmoid_ce(x, t, -1.0)
        fl = sigmoid_focal_loss(x, t, -1.0, 2.0)
        torch.testing.assert_close(ce / fl, torch.tensor([ratio], dtype=torch.float64))
    assert abs((1 - 1 / math.sqrt(1000)) - 0.968) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["fl", "star", "ce"])
def test_extreme_logits_are_finite(dtype, which):
    x = torch.tensor([[1e4, -1e4, 1e4, -1e4, 0.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]], dtype=dtype)
    if which == "fl":
        loss = sigmoid_focal_loss(x, t, 0.25, 2.0, "none")
    elif which == "star":
        loss = sigmoid_focal_loss_star(x, t, 2.0, 1.0, 0.25, "none")
    else:
        loss = balanced_sigmoid_ce(x, t, 0.25, "none")
    loss.float().sum().backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype  # fvcore's dtypes
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    # confidently right: ~0 loss; confidently wrong: loss ~ alpha_t * |x| (times 1/gamma for FL*)
    assert loss[0, 0].item() == 0 and loss[0, 3].item() == 0
    assert loss[0, 1].float().item() > 100 and loss[0, 2].float().item() > 100


def test_label_based_equals_one_hot_and_ignores():
    g = torch.Generator().manual_seed(6)
    N, R, K = 2, 30, 6
    x = torch.randn(N, R, K, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(-1, K + 1, (N, R), generator=g)
    valid = labels >= 0
    onehot = F.one_hot(labels.clamp(min=0), K + 1)[..., :K].to(x.dtype)
    cases = [
        (dict(loss="focal", alpha=0.25, gamma=2.0),
         lambda a, b: sigmoid_focal_loss(a, b, 0.25, 2.0, "sum")),
        (dict(loss="focal", alpha=-1.0, gamma=0.0),
         lambda a, b: balanced_sigmoid_ce(a, b, -1.0, "sum")),
        (dict(loss="star", alpha=0.25, gamma=2.0, beta=1.0),
         lambda a, b: sigmoid_focal_loss_star(a, b, 2.0, 1.0, 0.25, "sum")),
    ]
    for kwargs, ref_fn in cases:
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = sigmoid_loss_from_labels(x1, labels, **kwargs)
        ref = ref_fn(x2[valid], onehot[valid])
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
        assert (x1.grad[~valid] == 0).all()  # ignored anchors: no loss, no gradient


def test_ignored_labels_contribute_nothing():
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    labels = torch.tensor([[0, 3, -1, 2]])
    base = sigmoid_loss_from_labels(x, labels)
    x2 = x.clone()
    x2[0, 2] = 1e3  # the ignored anchor's logits do not matter
    assert sigmoid_loss_from_labels(x2, labels) == base
    per_elem = sigmoid_loss_from_labels(x, labels, reduction="none")
    assert (per_elem[0, 2] == 0).all()
    all_ignored = sigmoid_loss_from_labels(x, torch.full_like(labels, -1))
    assert all_ignored.item() == 0


@pytest.mark.parametrize("fn", ["fl", "star", "ce", "labels"])
def test_empty_inputs_give_zero_loss_with_gradient(fn):
    x = torch.zeros(0, 80, requires_grad=True)
    t = torch.zeros(0, 80)
    if fn == "fl":
        loss = sigmoid_focal_loss(x, t, reduction="sum")
    elif fn == "star":
        loss = sigmoid_focal_loss_star(x, t, 2.0, 1.0, reduction="sum")
    elif fn == "ce":
        loss = balanced_sigmoid_ce(x, t, 0.25, reduction="sum")
    else:
        loss = sigmoid_loss_from_labels(x, torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_second_backward_with_retain_graph_recomputes_same_gradient():
    x, t = _data(seed=13)
    x.requires_grad_()
    labels = torch.arange(x.shape[0]) % 7 - 1  # -1 (ignored) .. 5 (background)
    for loss in (sigmoid_focal_loss(x, t, 0.25, 2.0, "mean"),
                 sigmoid_loss_from_labels(x, labels, alpha=0.25, gamma=2.0)):
        x.grad = None
        (3 * loss).backward(retain_graph=True)  # grad_out != 1: the in-place scaling path
        first = x.grad.clone()
        x.grad = None
        (3 * loss).backward()  # buffer consumed: recomputed from the saved inputs
        torch.testing.assert_close(x.grad, first, rtol=1e-12, atol=1e-15)


def test_no_grad_inputs_skip_the_gradient():
    x, t = _data(seed=14)
    loss = sigmoid_focal_loss(x, t, 0.25, 2.0, "sum")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _closed_form(x, t, 0.25, 2.0)[0].sum())


def test_gradcheck_float64_every_loss():
    x, t = _data(n=6, k=3, seed=7)
    x.requires_grad_()
    labels = torch.tensor([0, 3, -1, 2, 1, 3])
    checks = [
        lambda a: sigmoid_focal_loss(a, t, 0.25, 2.0, "none"),
        lambda a: sigmoid_focal_loss(a, t, -1, 0.5, "mean"),
        lambda a: sigmoid_focal_loss_star(a, t, 2.0, 1.0, 0.25, "sum"),
        lambda a: balanced_sigmoid_ce(a, t, 0.75, "none"),
        lambda a: sigmoid_loss_from_labels(a, labels, loss="focal", alpha=0.25, gamma=2.0),
        lambda a: sigmoid_loss_from_labels(a, labels, loss="star", gamma=4.0, beta=0.0,
                                           reduction="none"),
        lambda a: sigmoid_loss_from_labels(a, labels, loss="focal", alpha=-1, gamma=0.0),
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (x,))


# --- float64 equals the closed form to 1e-12 for any alpha (alpha_t in the compute dtype) ------
_LABEL_LOSSES = {
    "FL": dict(loss="focal", gamma=2.0),
    "FL*": dict(loss="star", gamma=2.0, beta=1.0),
    "CE": dict(loss="focal", gamma=0.0),
}


def _dense_loss(name, x, t, alpha, reduction="none"):
    if name == "FL":
        return sigmoid_focal_loss(x, t, alpha, 2.0, reduction)
    if name == "FL*":
        return sigmoid_focal_loss_star(x, t, 2.0, 1.0, alpha, reduction)
    return balanced_sigmoid_ce(x, t, alpha, reduction)


def _labels_case(n=300, k=7, scale=4.0, seed=0, dtype=torch.float64):
    """Logits and labels with ignored (-1), every class, and background (k) anchors."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, k, generator=g) * scale).to(dtype)
    labels = torch.randint(-1, k + 1, (n,), generator=g)
    onehot = F.one_hot(labels.clamp(min=0), k + 1)[:, :k].to(dtype)
    return x, labels, onehot


@pytest.mark.parametrize("alpha", [0.999, 0.9, 0.25, 0.01, 0.0, 1.0, -1.0])
@pytest.mark.parametrize("name", list(_LABEL_LOSSES))
def test_float64_equals_closed_form_to_1e12_for_any_alpha(name, alpha):
    # alpha = 0.999 is not a float32 number: an alpha_t rounded to float32 is 5e-8 off
    kw = _LABEL_LOSSES[name]
    x, labels, onehot = _labels_case()
    valid = labels >= 0
    kind = "star" if name == "FL*" else "fl"
    ref, ref_grad = _closed_form(x, onehot, alpha, kw["gamma"], kind, kw.get("beta", 0.0))

    xd = x.clone().requires_grad_()
    dense = _dense_loss(name, xd, onehot, alpha)
    torch.testing.assert_close(dense, ref, rtol=1e-12, atol=0)
    dense.sum().backward()
    torch.testing.assert_close(xd.grad, ref_grad, rtol=1e-12, atol=0)

    xl = x.clone().requires_grad_()
    per = sigmoid_loss_from_labels(xl, labels, alpha=alpha, reduction="none", **kw)
    torch.testing.assert_close(per[valid], ref[valid], rtol=1e-12, atol=0)
    assert (per[~valid] == 0).all()
    total = sigmoid_loss_from_labels(xl, labels, alpha=alpha, **kw)
    torch.testing.assert_close(total, ref[valid].sum(), rtol=1e-12, atol=0)
    total.backward()
    torch.testing.assert_close(xl.grad[valid], ref_grad[valid], rtol=1e-12, atol=0)
    assert (xl.grad[~valid] == 0).all()


def test_per_anchor_ce_equals_closed_form():
    # OHEM's ranking score: plain CE summed over the classes, 0 for ignored anchors
    x, labels, onehot = _labels_case(seed=1)
    ref = _closed_form(x, onehot, -1.0, 0.0)[0].sum(1).where(labels >= 0, torch.zeros(()))
    torch.testing.assert_close(per_anchor_ce_from_labels(x, labels), ref, rtol=1e-12, atol=0)
    scores = per_anchor_ce_from_labels(x.float(), labels)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref.float(), rtol=2e-6, atol=0)


# --- registered modules ----------------------------------------------------------------------
def _cfg(name, **over):
    cfg = get_cfg()
    focal_det.add_focal_config(cfg)
    cfg.MODEL.FOCAL.LOSS.NAME = name
    cfg.MODEL.RETINANET.NUM_CLASSES = 5
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def _anchors(R, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(R, 2, generator=g) * 200
    wh = 10 + torch.rand(R, 2, generator=g) * 40
    return torch.cat([xy, xy + wh], 1)


def test_registered_modules_match_functional():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 20, 5, generator=g)
    labels = torch.randint(-1, 6, (2, 20), generator=g)
    anchors = _anchors(20)
    expect = {
        "FocalLoss": sigmoid_loss_from_labels(x, labels, alpha=0.25, gamma=2.0),
        "FocalLossStar": sigmoid_loss_from_labels(x, labels, loss="star", alpha=0.25,
                                                  gamma=2.0, beta=1.0),
        "BalancedCE": sigmoid_loss_from_labels(x, labels, alpha=0.25, gamma=0.0),
    }
    for name, ref in expect.items():
        out = build_classification_loss(_cfg(name))(x, labels, anchors)
        assert out.normalizer is None and out.box_mask is None
        assert out.loss.dtype == torch.float32
        torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("FocalLoss", "MODEL.RETINANET.FOCAL_LOSS_GAMMA", -1.0),
        ("FocalLoss", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", 1.5),
        ("FocalLossStar", "MODEL.FOCAL.LOSS.STAR_GAMMA", 0.0),
        ("FocalLossStar", "MODEL.FOCAL.LOSS.STAR_GAMMA", -2.0),
        ("OHEM", "MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE", 0),
        ("OHEM", "MODEL.FOCAL.OHEM.POSITIVE_FRACTION", 1.5),
        ("OHEM", "MODEL.FOCAL.OHEM.POSITIVE_FRACTION", -0.5),
        ("OHEM", "MODEL.FOCAL.OHEM.NMS_THRESH", 0.0),
        ("FocalLoss", "MODEL.FOCAL.LOSS.IMPL", "fast"),
    ],
)
def test_bad_config_fails_at_build_naming_the_key(name, key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_classification_loss(_cfg(name, **{key: value}))


def test_valid_edge_configs_build():
    build_classification_loss(_cfg("OHEM", **{"MODEL.FOCAL.OHEM.POSITIVE_FRACTION": 0.0}))
    build_classification_loss(_cfg("OHEM", **{"MODEL.FOCAL.OHEM.POSITIVE_FRACTION": 1.0}))
    build_classification_loss(_cfg("FocalLoss", **{"MODEL.RETINANET.FOCAL_LOSS_GAMMA": 0.0}))


def test_unknown_name_lists_all_registered():
    with pytest.raises(KeyError) as e:
        build_classification_loss(_cfg("Hinge"))
    for name in ("FocalLoss", "FocalLossStar", "BalancedCE", "OHEM", "Hinge"):
        assert name in str(e.value)


# --- OHEM ------------------------------------------------------------------------------------
def _ohem_case(N=2, R=400, K=5, pos_every=4, seed=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, R, K, generator=g) * 2
    labels = torch.full((N, R), K)
    labels[:, ::pos_every] = torch.randint(0, K, (N, R // pos_every), generator=g)
    labels[:, 1::17] = -1
    return x, labels, _anchors(R, seed)


def _ohem_cfg(**over):
    return _cfg("OHEM", **{f"MODEL.FOCAL.OHEM.{k}": v for k, v in over.items()})


def _plain_ce(x, labels, K=5):
    """Per-anchor sigmoid CE summed over classes, from a one-hot (0 for ignored anchors)."""
    scores = F.binary_cross_entropy_with_logits(
        x.detach(), F.one_hot(labels.clamp(min=0), K + 1)[..., :K].float(), reduction="none"
    ).sum(-1)
    scores[labels < 0] = 0
    return scores


@pytest.mark.parametrize("B", [16, 32])
def test_ohem_picks_exactly_B_per_image_no_ratio(B):
    x, labels, anchors = _ohem_case()
    cfg = _ohem_cfg(BATCH_SIZE_PER_IMAGE=B, NMS_THRESH=0.7)
    out = build_classification_loss(cfg)(x.requires_grad_(), labels, anchors)
    # defaults: RetinaNet's box loss over all foreground anchors and its normaliser
    assert out.normalizer is None and out.box_mask is None
    assert out.stats["ohem_num_selected"] == B
    # the loss is plain CE over exactly the selected anchors (NMS over all examples)
    scores = _plain_ce(x, labels)
    selected = select_ohem_anchors(scores, labels, anchors, 5, B, 0.7, -1.0)
    assert selected.sum(1).tolist() == [B, B]
    assert not (selected & (labels < 0)).any()
    torch.testing.assert_close(out.loss, scores[selected].sum(), rtol=1e-5, atol=1e-4)
    out.loss.backward()
    assert (x.grad[~selected] == 0).all() and (x.grad[selected] != 0).any(-1).all()


def test_ohem_box_loss_and_normalizer_options():
    x, labels, anchors = _ohem_case()
    B = 16
    outs = {}
    for box, norm in [("foreground", "foreground"), ("selected", "selected"),
                      ("selected", "foreground"), ("foreground", "selected")]:  # fmt: skip
        cfg = _ohem_cfg(BATCH_SIZE_PER_IMAGE=B, BOX_LOSS=box, NORMALIZER=norm)
        outs[box, norm] = out = build_classification_loss(cfg)(x, labels, anchors)
        # the selection and the CE sum do not depend on these options
        torch.testing.assert_close(out.loss, outs["foreground", "foreground"].loss)
        # "selected": the number of selected anchors, N * B; "foreground": the meta-arch's
        assert out.normalizer == (2.0 * B if norm == "selected" else None)
    selected = select_ohem_anchors(_plain_ce(x, labels), labels, anchors, 5, B, 0.7, -1.0)
    box_mask = outs["selected", "selected"].box_mask
    assert box_mask.dtype == torch.bool
    assert torch.equal(box_mask, selected & (labels >= 0) & (labels != 5))
    assert 0 < box_mask.sum() < ((labels >= 0) & (labels != 5)).sum()  # a strict subset
    assert outs["foreground", "selected"].box_mask is None
    with pytest.raises(ValueError, match=r"MODEL\.FOCAL\.OHEM\.BOX_LOSS"):
        build_classification_loss(_ohem_cfg(BOX_LOSS="all"))
    with pytest.raises(ValueError, match=r"MODEL\.FOCAL\.OHEM\.NORMALIZER"):
        build_classification_loss(_ohem_cfg(NORMALIZER="batch"))
    with pytest.raises(ValueError, match=r"MODEL\.FOCAL\.OHEM\.NMS_GROUPS"):
        build_classification_loss(_ohem_cfg(NMS_GROUPS="class"))


def _reference_ohem(scores, labels, anchors, K, B, thresh, frac, groups, loop=True):
    """
    Brute force, written from OHEM's docstring: one full greedy NMS per image (a plain loop over
    the anchors in decreasing loss; ``loop=False``: torchvision's NMS over all of them), then
    the minibatch rule.
    """
    from torchvision.ops import batched_nms, box_iou

    out = torch.zeros_like(labels, dtype=torch.bool)
    for i in range(labels.shape[0]):
        lab, s = labels[i], scores[i]
        idx = torch.nonzero(lab >= 0).squeeze(1)
        idx = idx[torch.argsort(s[idx], descending=True)]
        if loop:
            iou = box_iou(anchors[idx], anchors[idx])
            same_group = torch.ones_like(iou, dtype=torch.bool)
            if groups == "label":
                same_group = lab[idx][:, None] == lab[idx][None, :]
            keep = []
            for j in range(len(idx)):
                if not any(iou[k, j] > thresh and same_group[k, j] for k in keep):
                    keep.append(j)
            keep = idx[keep]
        else:
            g = lab[idx] if groups == "label" else torch.zeros_like(idx)
            keep = idx[batched_nms(anchors[idx], s[idx], g, thresh)]
        pos, neg = keep[lab[keep] != K], keep[lab[keep] == K]
        if frac < 0:
            chosen = keep[:B]
        else:
            npos = min(len(pos), int(B * frac))
            nneg = min(B - npos, len(neg), round(npos * (1 - frac) / frac) if frac > 0 else B)
            chosen = torch.cat([pos[:npos], neg[:nneg]])
        out[i, chosen] = True
    return out


@pytest.mark.parametrize("groups", ["all", "label"])
@pytest.mark.parametrize("frac", [-1.0, 0.25, 0.0])
@pytest.mark.parametrize("thresh,pos_every", [(0.5, 4), (0.7, 4), (0.5, 60)])
def test_ohem_selection_equals_brute_force_nms(groups, frac, thresh, pos_every):
    # pos_every 60: 5 positives per image, fewer than B / 4 (the short-supply rule)
    x, labels, anchors = _ohem_case(R=300, pos_every=pos_every, seed=10)
    scores = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    ours = select_ohem_anchors(scores, labels, anchors, 5, 24, thresh, frac, groups)
    ref = _reference_ohem(scores, labels, anchors, 5, 24, thresh, frac, groups)
    assert torch.equal(ours, ref)
    assert ours.any()


def test_high_loss_negative_suppresses_overlapping_positive_only_under_nms_over_all():
    # Anchor 0 is a positive, anchor 1 a negative with a higher loss overlapping it (IoU 0.82);
    # anchors 2-5 are far apart from everything.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]]
                           + [[40.0 * k, 40.0, 40.0 * k + 10, 50.0] for k in range(4)])
    labels = torch.tensor([[2, 5, 5, 5, 1, 5]])
    scores = torch.tensor([[3.0, 4.0, 0.5, 0.4, 0.3, 0.2]])
    K, B = 5, 4
    by_all = select_ohem_anchors(scores, labels, anchors, K, B, 0.5, -1.0, "all")
    by_label = select_ohem_anchors(scores, labels, anchors, K, B, 0.5, -1.0, "label")
    assert by_all[0].tolist() == [False, True, True, True, True, False]  # positive 0 suppressed
    assert by_label[0].tolist() == [True, True, True, True, False, False]  # both kept
    # the module's default is NMS over all examples
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, K, generator=g)
    x[0, 1, 0] = 8.0  # anchor 1: a confident wrong class, the highest loss
    ohem = build_classification_loss(_ohem_cfg(BATCH_SIZE_PER_IMAGE=B, NMS_THRESH=0.5))
    assert ohem.nms_groups == "all"
    scores = _plain_ce(x, labels)
    assert scores[0, 1] > scores[0, 0]
    expect = select_ohem_anchors(scores, labels, anchors, K, B, 0.5, -1.0, "all")
    assert not expect[0, 0] and expect[0, 1]
    torch.testing.assert_close(ohem(x, labels, anchors).loss, scores[expect].sum())


def test_ohem_one_to_three_with_plenty_of_positives():
    x, labels, anchors = _ohem_case(R=800, pos_every=2, seed=11)  # plenty of positives
    B = 32
    cfg = _ohem_cfg(BATCH_SIZE_PER_IMAGE=B, POSITIVE_FRACTION=0.25, NMS_THRESH=0.5,
                    BOX_LOSS="selected")  # fmt: skip
    out = build_classification_loss(cfg)(x, labels, anchors)
    assert out.stats["ohem_num_selected"] == B
    assert out.stats["ohem_num_pos_selected"] == B // 4  # exactly 1:3
    assert out.box_mask.sum(1).tolist() == [B // 4, B // 4]
    # without the ratio, high-loss positives are not capped
    cfg.MODEL.FOCAL.OHEM.POSITIVE_FRACTION = -1.0
    x_hard = x.clone()
    x_hard[labels != 5] -= 20  # make every positive a very hard example
    out = build_classification_loss(cfg)(x_hard, labels, anchors)
    assert out.stats["ohem_num_pos_selected"] > B // 4


@pytest.mark.parametrize("groups", ["all", "label"])
def test_ohem_one_to_three_with_few_positives_keeps_the_ratio(groups):
    x, labels, anchors = _ohem_case(R=400, pos_every=100, seed=12)  # 4 positives per image
    B = 40
    cfg = _ohem_cfg(BATCH_SIZE_PER_IMAGE=B, POSITIVE_FRACTION=0.25, NMS_THRESH=1.0,
                    NMS_GROUPS=groups, BOX_LOSS="selected")  # fmt: skip
    out = build_classification_loss(cfg)(x, labels, anchors)
    # 4 positives (< B / 4 = 10): 4 + 3 x 4 negatives, the ratio kept, the batch smaller than B
    assert out.stats["ohem_num_pos_selected"] == 4
    assert out.stats["ohem_num_selected"] == 16
    assert out.box_mask.sum(1).tolist() == [4, 4]
    # the 12 negatives are the highest-loss ones (NMS at 1.0 suppresses nothing)
    scores = _plain_ce(x, labels)
    sel = select_ohem_anchors(scores, labels, anchors, 5, B, 1.0, 0.25, groups)
    for i in range(2):
        neg = labels[i] == 5
        top = torch.topk(scores[i].masked_fill(~neg, -1), 12).indices
        assert torch.equal(torch.nonzero(sel[i] & neg).squeeze(1), top.sort().values)
    # an image without positives contributes no example; the other one 4 + 12
    labels[0][labels[0] != -1] = 5
    out = build_classification_loss(cfg)(x, labels, anchors)
    assert out.stats["ohem_num_selected"] == 16 / 2


@pytest.mark.parametrize("pos_every", [4, 250])
def test_ohem_nms_on_a_prefix_stays_exact_without_visiting_every_anchor(monkeypatch, pos_every):
    # ~5000 anchors, 1:3. pos_every 4: plenty of positives, the prefix suffices. pos_every 250:
    # 20 positives spread over the loss ranking (fewer than B / 4 survive): every positive is
    # decided through its closed set (_nms_upstream) instead of an NMS over every anchor.
    import focal_det.losses.modules as modules

    x, labels, anchors = _ohem_case(N=1, R=5000, pos_every=pos_every, seed=13)
    scores = _plain_ce(x, labels)
    sizes = []
    real = modules.batched_nms
    monkeypatch.setattr(modules, "batched_nms", lambda b, *a: sizes.append(len(b)) or real(b, *a))
    ours = select_ohem_anchors(scores, labels, anchors, 5, 64, 0.5, 0.25)
    assert max(sizes) < (labels >= 0).sum() / 2
    ref = _reference_ohem(scores, labels, anchors, 5, 64, 0.5, 0.25, "all", loop=False)
    assert torch.equal(ours, ref)
    if pos_every == 250:
        assert 0 < (ours & (labels != 5)).sum() < 16  # short supply: P + 3P
        assert (ours & (labels == 5)).sum() == 3 * (ours & (labels != 5)).sum()


@pytest.mark.parametrize("groups", ["all", "label"])
def test_nms_upstream_set_is_closed_and_decides_its_boxes_exactly(groups):
    from torchvision.ops import batched_nms, box_iou

    from focal_det.losses.modules import _nms_upstream

    g = torch.Generator().manual_seed(14)
    xy = torch.rand(600, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(600, 2, generator=g) * 30], 1)
    scores = torch.rand(600, generator=g)
    labels = torch.randint(0, 3, (600,), generator=g)
    grp = labels if groups == "label" else torch.zeros_like(labels)
    seeds = torch.randperm(600, generator=g)[:10]
    closed = _nms_upstream(boxes, scores, grp, 0.5, seeds)
    member = torch.zeros(600, dtype=torch.bool)
    member[closed] = True
    assert member[seeds].all() and 10 < member.sum() < 600
    # closed: every higher-scored box of the same group overlapping a member is a member
    reach = (box_iou(boxes, boxes) > 0.5) & (scores[:, None] > scores[None, :])
    reach &= grp[:, None] == grp[None, :]  # reach[i, j]: box i can suppress box j
    assert not (reach[:, member] & ~member[:, None]).any()
    # NMS over the set keeps exactly the members that NMS over all boxes keeps
    full = torch.zeros(600, dtype=torch.bool)
    full[batched_nms(boxes, scores, grp, 0.5)] = True
    sub = torch.zeros(600, dtype=torch.bool)
    sub[closed[batched_nms(boxes[closed], scores[closed], grp[closed], 0.5)]] = True
    assert torch.equal(sub, full & member)


def test_gradcheck_float64_modules_including_ohem():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 30, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(-1, 6, (2, 30), generator=g)
    anchors = _anchors(30, 15)
    for name in ("FocalLoss", "FocalLossStar", "BalancedCE", "OHEM"):
        cfg = _cfg(name, **{"MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE": 8,
                            "MODEL.FOCAL.OHEM.POSITIVE_FRACTION": 0.25})
        module = build_classification_loss(cfg)
        # (the OHEM selection is piecewise constant in x: gradcheck's tiny steps do not move it)
        assert torch.autograd.gradcheck(
            lambda a, m=module: m(a, labels, anchors).loss, (x.clone().requires_grad_(),)
        )
