"""
Detectron's softmax focal loss (``RETINANET.SOFTMAX: True``, the ``SoftmaxFocalLoss`` op of
Detectron's Caffe2 modules), as a pure function and a registered loss.

Per anchor, with K + 1 logits ``x`` (K classes and background) and label t:

* p = softmax(x), p_t = p[t] (t = K: the background),
* SFL = -alpha_t (1 - p_t)^gamma log(p_t), alpha_t = alpha for a class, 1 - alpha for the
  background (1 when alpha < 0),
* dSFL/dx_j = alpha_t (gamma p_t log(p_t) (1 - p_t)^(gamma - 1) - (1 - p_t)^gamma)
  (delta_tj - p_j).

Only the true class's probability enters the loss (FL on a categorical distribution); the
sigmoid FL of the paper sums K binary terms instead. Detectron's op normalises the sum by the
foreground count like its sigmoid op; its labels put the background at 0 and the classes at
1..K, ours at K and 0..K-1, so our background logit is the last of each anchor's K + 1.
Detectron computes ``log(max(p_t, FLT_MIN))`` from a float32 softmax, which caps an anchor's loss
at 87.3; here log p_t comes from ``log_softmax``: the same value wherever p_t > FLT_MIN, and
finite beyond.
"""
import math

import torch
from detectron2.config import configurable

from .base import ClassificationLossOutput, DenseClassificationLoss
from .build import FOCAL_LOSS_REGISTRY
from .modules import check_alpha, check_gamma

__all__ = ["SoftmaxFocalLoss", "softmax_focal_loss_from_labels"]


class _SoftmaxFocalLoss(torch.autograd.Function):
    """
    Forward: the per-anchor loss and, when the logits need it, the closed-form gradient (module
    docstring), in the compute dtype (float32; float64 stays float64). Backward: that gradient
    times grad_output. Nothing of the softmax graph is kept.
    """

    @staticmethod
    def forward(ctx, x, labels, alpha, gamma):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        logp = torch.log_softmax(x.to(cdt), dim=1)  # (M, K + 1)
        valid = labels >= 0
        t = labels.clamp(min=0)
        logp_t = logp.gather(1, t[:, None]).squeeze(1)
        q = -torch.expm1(logp_t)  # 1 - p_t, accurate when p_t is close to 1
        zero = torch.zeros((), dtype=cdt, device=x.device)
        if alpha >= 0:
            # in the compute dtype: a float32 alpha_t would be off by ~1e-8 for float64 inputs
            fg = torch.tensor(alpha, dtype=cdt, device=x.device)
            bg = torch.tensor(1.0 - alpha, dtype=cdt, device=x.device)
            alpha_t = torch.where(t == x.shape[1] - 1, bg, fg)
        else:
            alpha_t = torch.ones_like(q)
        w = q.pow(gamma) if gamma != 0 else torch.ones_like(q)
        loss = torch.where(valid, alpha_t * w * -logp_t, zero)
        ctx.grad = None
        if ctx.needs_input_grad[0]:
            # g = alpha_t (gamma p_t log p_t q^(gamma - 1) - q^gamma)
            #   = alpha_t q^gamma (gamma p_t r - 1), r = log p_t / q, which tends to -1 as q -> 0
            # (p_t saturated at 1), where the first form is 0 * inf for gamma < 1.
            r = torch.where(q > 0, logp_t / q, -torch.ones_like(q))
            g = torch.where(valid, alpha_t * w * (gamma * logp_t.exp() * r - 1), zero)
            grad = logp.exp_().mul_(-g[:, None])  # -g p_j  (logp's buffer is reused)
            grad.scatter_add_(1, t[:, None], g[:, None])  # + g at j = t
            ctx.grad = grad.to(x.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.grad * grad_out[:, None].to(ctx.grad.dtype), None, None, None


def softmax_focal_loss_from_labels(
    pred_logits: torch.Tensor,
    gt_labels: torch.Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """
    Detectron's softmax focal loss from integer labels (module docstring).

    Args:
        pred_logits: (..., K + 1) logits, any float dtype; the last of each row is the
            background's.
        gt_labels: (...) int64 labels: a class in [0, K), K for background, -1 for ignored
            (no loss, no gradient).
        alpha: weight of the classes in [0, 1], 1 - alpha for the background; < 0: none.
        gamma: focusing parameter >= 0 (0: softmax cross-entropy).
        reduction: "sum" (a scalar) or "none" ((...) per anchor, 0 for ignored ones). The loss
            is float32 (float64 for float64 logits); the gradient has the logits' dtype.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction={reduction!r} must be 'sum' or 'none'.")
    if gamma < 0:
        raise ValueError(f"gamma={gamma} must be >= 0 for the focal loss.")
    if gt_labels.shape != pred_logits.shape[:-1]:
        raise ValueError(
            f"gt_labels {tuple(gt_labels.shape)} must match pred_logits {tuple(pred_logits.shape)} "
            "without its last (K + 1 logits) dimension."
        )
    C = pred_logits.shape[-1]
    labels = gt_labels.reshape(-1).to(torch.int64)
    if labels.numel() and int(labels.max()) >= C:
        raise ValueError(
            f"gt_labels has label {int(labels.max())} but pred_logits has {C} = K + 1 logits "
            f"(labels must be in [0, {C - 1}], {C - 1} = background, or -1)."
        )
    loss = _SoftmaxFocalLoss.apply(pred_logits.reshape(-1, C), labels, float(alpha), float(gamma))
    return loss.sum() if reduction == "sum" else loss.reshape(gt_labels.shape)


@FOCAL_LOSS_REGISTRY.register()
class SoftmaxFocalLoss(DenseClassificationLoss):
    """
    Detectron's softmax focal loss (module docstring), alpha / gamma from
    ``MODEL.RETINANET.FOCAL_LOSS_ALPHA / FOCAL_LOSS_GAMMA``, summed over the non-ignored anchors
    and normalised like FL (``normalizer=None``).

    The head predicts K + 1 logits per anchor, the background's last. Initialisation is
    Detectron's (``get_retinanet_bias_init`` with ``RETINANET.SOFTMAX``): background bias
    log(K (1 - pi) / pi), class biases 0, so every anchor starts at background probability
    1 - pi and pi / K per class. Inference uses the softmax probabilities of the K classes (as
    Detectron's test_retinanet.py drops the background column), with the paper's threshold,
    top-k and NMS.
    """

    sigmoid_scores = False

    @configurable
    def __init__(self, *, num_classes: int, alpha: float, gamma: float):
        super().__init__(num_classes)
        check_gamma(gamma)
        check_alpha(alpha)
        self.alpha, self.gamma = float(alpha), float(gamma)

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
        }

    @property
    def num_logits(self) -> int:
        return self.num_classes + 1

    def prior_bias(self, prior_prob: float) -> torch.Tensor:
        bias = torch.zeros(self.num_logits, dtype=torch.float64)
        bias[-1] = math.log(self.num_classes * (1 - prior_prob) / prior_prob)
        return bias

    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)[..., : self.num_classes]

    def forward(self, pred_logits, gt_labels, anchors):
        loss = softmax_focal_loss_from_labels(
            pred_logits, gt_labels, alpha=self.alpha, gamma=self.gamma
        )
        return ClassificationLossOutput(loss=loss)

    def extra_repr(self):
        return f"alpha={self.alpha}, gamma={self.gamma}"
