"""
Detectron's softmax focal loss (focal_det/losses/softmax.py): values and gradient against a
float64 closed form written here from the formula (p = exp(x) / sum exp(x), p_t = p[label],
SFL = -alpha_t (1 - p_t)^gamma log p_t), against autograd through plain PyTorch ops and
F.cross_entropy (gamma 0), gradcheck, saturation, ignored and background labels, and the
registered module's side of the loss contract (K + 1 logits, prior bias, softmax scores).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

import focal_det
from focal_det.losses import SoftmaxFocalLoss, build_classification_loss
from focal_det.losses import softmax_focal_loss_from_labels as sfl

K = 5


def _case(M=60, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K + 1, generator=g) * scale).to(dtype)
    labels = torch.randint(-1, K + 1, (M,), generator=g)  # -1 ignored, K background
    labels[:3] = torch.tensor([-1, K, 0])  # each kind at least once
    return x, labels


def _closed_form(x, labels, alpha, gamma):
    """Per-anchor loss (M,) and gradient (M, K + 1), float64, from the formulas."""
    e = torch.exp(x - x.max(1, keepdim=True).values)
    p = e / e.sum(1, keepdim=True)
    t = labels.clamp(min=0)
    p_t = p[torch.arange(len(t)), t]
    if alpha < 0:
        a_t = torch.ones_like(p_t)
    else:
        # alpha_t in float64 (torch.where of Python floats would round it to float32)
        fg, bg = torch.tensor(alpha, dtype=x.dtype), torch.tensor(1 - alpha, dtype=x.dtype)
        a_t = torch.where(t == K, bg, fg)
    loss = -a_t * (1 - p_t) ** gamma * torch.log(p_t)
    # dL/dx_j = alpha_t (gamma p_t log p_t (1 - p_t)^(gamma - 1) - (1 - p_t)^gamma) (delta_tj - p_j)
    g = a_t * (gamma * p_t * torch.log(p_t) * (1 - p_t) ** (gamma - 1) - (1 - p_t) ** gamma)
    onehot = F.one_hot(t, K + 1).to(x.dtype)
    grad = g[:, None] * (onehot - p)
    valid = labels >= 0
    return torch.where(valid, loss, 0.0), torch.where(valid[:, None], grad, 0.0)


@pytest.mark.parametrize("alpha", [0.25, 0.75, 0.999, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_values_and_gradient_equal_the_float64_closed_form(alpha, gamma):
    x, labels = _case()
    x.requires_grad_()
    loss = sfl(x, labels, alpha=alpha, gamma=gamma, reduction="none")
    ref, ref_grad = _closed_form(x.detach(), labels, alpha, gamma)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    loss.sum().backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-10, atol=1e-13)
    # the sum reduction is the sum
    torch.testing.assert_close(sfl(x.detach(), labels, alpha=alpha, gamma=gamma), ref.sum(),
                               rtol=1e-12, atol=1e-13)  # fmt: skip


def test_gradient_equals_autograd_through_plain_ops_and_gamma0_is_cross_entropy():
    x, labels = _case(seed=1)
    valid = labels >= 0
    xa = x.clone().requires_grad_()
    logp = torch.log_softmax(xa, 1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    a_t = torch.where(labels == K, 0.75, 0.25).double()
    (-(a_t * (1 - logp.exp()) ** 2 * logp)[valid]).sum().backward()
    xb = x.clone().requires_grad_()
    sfl(xb, labels, alpha=0.25, gamma=2.0).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-13)
    # gamma 0, no alpha: softmax cross-entropy
    ce = F.cross_entropy(x, labels, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(sfl(x, labels, alpha=-1, gamma=0.0), ce, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, labels = _case(M=12, seed=2)
    for gamma in (0.0, 0.5, 2.0):
        for reduction in ("sum", "none"):
            assert torch.autograd.gradcheck(
                lambda a, g=gamma, r=reduction: sfl(a, labels, alpha=0.25, gamma=g, reduction=r),
                (x.clone().requires_grad_(),),
            )


def test_ignored_anchors_and_background_label():
    x, labels = _case(seed=3)
    x.requires_grad_()
    loss = sfl(x, labels, alpha=0.25, gamma=2.0, reduction="none")
    loss.sum().backward()
    ignored = labels == -1
    assert (loss[ignored] == 0).all() and (x.grad[ignored] == 0).all()
    assert (loss[~ignored] > 0).all() and (x.grad[~ignored] != 0).any(1).all()
    # background: the LAST logit's probability, weighted 1 - alpha
    i = int(torch.nonzero(labels == K)[0])
    p_bg = torch.softmax(x.detach()[i], 0)[K].item()
    assert loss[i].item() == pytest.approx(-0.75 * (1 - p_bg) ** 2 * math.log(p_bg), rel=1e-12)
    with pytest.raises(ValueError, match="K \\+ 1 logits|label 6"):
        sfl(x.detach(), torch.full_like(labels, K + 1))


@pytest.mark.parametrize("dtype,margin", [(torch.float32, 60.0), (torch.float64, 800.0)])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_saturated_and_hopeless_anchors_stay_finite(dtype, margin, gamma):
    # p_t rounds to exactly 1 (right, confident) or log p_t ~ -margin (wrong, confident)
    x = torch.zeros(4, K + 1, dtype=dtype)
    x[0, 2] = x[1, K] = margin  # right
    x[2, 0] = x[3, 1] = margin  # wrong: labels 2 and K
    labels = torch.tensor([2, K, 2, K])
    x.requires_grad_()
    loss = sfl(x, labels, alpha=0.25, gamma=gamma, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert loss[0].item() == 0.0 and (x.grad[:2] == 0).all()
    assert loss[2].item() == pytest.approx(0.25 * margin, rel=1e-5)  # -log p_t = margin
    assert x.grad[2, 2].item() == pytest.approx(-0.25, rel=1e-5)  # d/dx_t = -alpha_t


def test_float32_and_bfloat16_logits():
    x, labels = _case(seed=4)
    ref = sfl(x, labels)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 3e-2)):
        xd = x.to(dtype).requires_grad_()
        out = sfl(xd, labels)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        out.backward()
        assert xd.grad.dtype == dtype


def _cfg(**over):
    cfg = get_cfg()
    focal_det.add_focal_config(cfg)
    cfg.MODEL.FOCAL.LOSS.NAME = "SoftmaxFocalLoss"
    cfg.MODEL.RETINANET.NUM_CLASSES = K
    for k, v in over.items():
        cfg.MODEL.RETINANET[k] = v
    return cfg


def test_registered_module_and_its_side_of_the_contract():
    loss = build_classification_loss(_cfg())
    assert isinstance(loss, SoftmaxFocalLoss) and (loss.alpha, loss.gamma) == (0.25, 2.0)
    assert loss.num_logits == K + 1 and loss.sigmoid_scores is False
    x, labels = _case(M=20, dtype=torch.float32, seed=5)
    out = loss(x[None], labels[None], torch.zeros(20, 4))
    assert out.normalizer is None and out.box_mask is None  # normalised like FL
    torch.testing.assert_close(out.loss, sfl(x, labels, alpha=0.25, gamma=2.0))
    # scores: the softmax probabilities of the K classes (the background's dropped)
    scores = loss.class_scores(x)
    torch.testing.assert_close(scores, torch.softmax(x, 1)[:, :K])
    assert (scores.sum(1) < 1).all()
    # Detectron's prior: background 1 - pi, each class pi / K
    p = torch.softmax(loss.prior_bias(0.01), 0)
    torch.testing.assert_close(p, torch.tensor([0.01 / K] * K + [0.99], dtype=torch.float64))


def test_bad_config_fails_at_build_naming_the_key():
    with pytest.raises(ValueError, match=r"MODEL\.RETINANET\.FOCAL_LOSS_GAMMA"):
        build_classification_loss(_cfg(FOCAL_LOSS_GAMMA=-1.0))
    with pytest.raises(ValueError, match=r"MODEL\.RETINANET\.FOCAL_LOSS_ALPHA"):
        build_classification_loss(_cfg(FOCAL_LOSS_ALPHA=1.5))
