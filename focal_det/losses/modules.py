"""
The registered classification losses (config: ``MODEL.FOCAL.LOSS.NAME``). Each adapts one pure
function of :mod:`focal_det.losses.functional` to the contract of :mod:`focal_det.losses.base`:
``module(pred_logits (N, R, K), gt_labels (N, R), anchors (R, 4)) -> ClassificationLossOutput``.

Bad hyper-parameters fail when the model is built, with the config key to fix. The returned loss
is float32 for float16 / bfloat16 / float32 logits (float64 for float64 logits, for gradcheck).
"""
from typing import Dict

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms

from .base import ClassificationLossOutput, DenseClassificationLoss
from .build import FOCAL_LOSS_REGISTRY
from .functional import IMPLS, per_anchor_ce_from_labels, sigmoid_loss_from_labels

__all__ = ["FocalLoss", "FocalLossStar", "BalancedCE", "OHEM", "select_ohem_anchors"]


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"MODEL.FOCAL.LOSS.IMPL={impl!r} must be one of {IMPLS}.")


def _check_alpha(alpha, key="MODEL.RETINANET.FOCAL_LOSS_ALPHA"):
    if alpha > 1:
        raise ValueError(
            f"{key}={alpha} must be in [0, 1] (weight of positives; negatives get 1 - alpha), "
            "or negative for no alpha weighting."
        )


@FOCAL_LOSS_REGISTRY.register()
class FocalLoss(DenseClassificationLoss):
    """
    FL (Sec 3.2) summed over all non-ignored anchors and classes; the meta-architecture divides
    by its foreground-anchor normaliser (``normalizer=None``).
    """

    @configurable
    def __init__(self, *, num_classes: int, alpha: float, gamma: float, impl: str = "auto"):
        super().__init__(num_classes)
        if gamma < 0:
            raise ValueError(
                f"MODEL.RETINANET.FOCAL_LOSS_GAMMA={gamma} is negative; the focusing parameter "
                "must be >= 0 (0 = alpha-balanced CE, the paper uses 2)."
            )
        _check_alpha(alpha)
        _check_impl(impl)
        self.alpha, self.gamma, self.impl = float(alpha), float(gamma), impl

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
            "impl": cfg.MODEL.FOCAL.LOSS.IMPL,
        }

    def forward(self, pred_logits, gt_labels, anchors):
        loss = sigmoid_loss_from_labels(
            pred_logits, gt_labels, loss="focal", alpha=self.alpha, gamma=self.gamma,
            impl=self.impl,
        )
        return ClassificationLossOutput(loss=loss)

    def extra_repr(self):
        return f"alpha={self.alpha}, gamma={self.gamma}, impl={self.impl}"


@FOCAL_LOSS_REGISTRY.register()
class FocalLossStar(DenseClassificationLoss):
    """
    FL* (Appendix A): ``-log(sigmoid(gamma x_t + beta)) / gamma``, alpha_t-weighted with
    ``MODEL.RETINANET.FOCAL_LOSS_ALPHA`` like FL; gamma / beta from
    ``MODEL.FOCAL.LOSS.STAR_GAMMA / STAR_BETA``. Normalised like FL.
    """

    @configurable
    def __init__(
        self, *, num_classes: int, alpha: float, gamma: float, beta: float, impl: str = "auto"
    ):
        super().__init__(num_classes)
        if not gamma > 0:
            raise ValueError(
                f"MODEL.FOCAL.LOSS.STAR_GAMMA={gamma} must be > 0: FL* divides by it "
                "(Table 3 uses 2.0 with STAR_BETA=1.0, or 4.0 with STAR_BETA=0.0)."
            )
        _check_alpha(alpha)
        _check_impl(impl)
        self.alpha, self.gamma, self.beta, self.impl = float(alpha), float(gamma), float(beta), impl

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
            "gamma": cfg.MODEL.FOCAL.LOSS.STAR_GAMMA,
            "beta": cfg.MODEL.FOCAL.LOSS.STAR_BETA,
            "impl": cfg.MODEL.FOCAL.LOSS.IMPL,
        }

    def forward(self, pred_logits, gt_labels, anchors):
        loss = sigmoid_loss_from_labels(
            pred_logits, gt_labels, loss="star", alpha=self.alpha, gamma=self.gamma,
            beta=self.beta, impl=self.impl,
        )
        return ClassificationLossOutput(loss=loss)

    def extra_repr(self):
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, impl={self.impl}"


@FOCAL_LOSS_REGISTRY.register()
class BalancedCE(DenseClassificationLoss):
    """
    alpha-balanced sigmoid CE (Sec 3.1, Table 1a) over all anchors, alpha from
    ``MODEL.RETINANET.FOCAL_LOSS_ALPHA`` (< 0: plain CE). It is FL with gamma = 0; the focusing
    parameter ``FOCAL_LOSS_GAMMA`` is not read. Normalised like FL.
    """

    @configurable
    def __init__(self, *, num_classes: int, alpha: float, impl: str = "auto"):
        super().__init__(num_classes)
        _check_alpha(alpha)
        _check_impl(impl)
        self.alpha, self.impl = float(alpha), impl

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
            "impl": cfg.MODEL.FOCAL.LOSS.IMPL,
        }

    def forward(self, pred_logits, gt_labels, anchors):
        loss = sigmoid_loss_from_labels(
            pred_logits, gt_labels, loss="focal", alpha=self.alpha, gamma=0.0, impl=self.impl
        )
        return ClassificationLossOutput(loss=loss)

    def extra_repr(self):
        return f"alpha={self.alpha}, impl={self.impl}"


@torch.no_grad()
def _nms_prefix(boxes, scores, idxs, iou_thresh, needed):
    """
    Greedy NMS over the highest-scored anchors only, exact for the first ``needed`` survivors.

    Greedy NMS visits boxes in decreasing score, and a box can only be suppressed by a
    higher-scored survivor; so the survivors of NMS over the top-T boxes are exactly the
    survivors of NMS over all boxes that score in the top T. We grow T (x4) until ``needed``
    boxes survive or all boxes are in, which avoids an O(R^2) NMS over ~10^5 anchors per image.

    Returns indices into ``boxes``, in decreasing score, at most ``needed`` of them.
    """
    n = scores.numel()
    if n == 0 or needed <= 0:
        return scores.new_zeros(0, dtype=torch.int64)
    t = min(n, max(4 * needed, 64))
    while True:
        top = torch.topk(scores, t).indices
        keep = batched_nms(boxes[top].float(), scores[top].float(), idxs[top], iou_thresh)
        if keep.numel() >= needed or t == n:
            return top[keep[:needed]]
        t = min(n, 4 * t)


@torch.no_grad()
def select_ohem_anchors(
    scores: torch.Tensor,
    gt_labels: torch.Tensor,
    anchors: torch.Tensor,
    num_classes: int,
    batch_size_per_image: int,
    nms_thresh: float,
    positive_fraction: float,
) -> torch.Tensor:
    """
    Args:
        scores: (N, R) per-anchor loss (the ranking score).
        gt_labels: (N, R) int64, K = background, -1 = ignored (never selected).
        anchors: (R, 4) XYXY boxes, shared by the N images.
        positive_fraction: -1 for no ratio, else the cap on the positive share of the batch.
    Returns:
        (N, R) bool: the selected anchors, ``batch_size_per_image`` per image when at least that
        many anchors survive NMS.
    """
    N, R = gt_labels.shape
    B = batch_size_per_image
    selected = torch.zeros_like(gt_labels, dtype=torch.bool)
    for i in range(N):
        labels, s = gt_labels[i], scores[i]
        pos_idx = torch.nonzero((labels >= 0) & (labels != num_classes)).squeeze(1)
        neg_idx = torch.nonzero(labels == num_classes).squeeze(1)
        # Positives and negatives are suppressed separately (batched_nms by gt class, background
        # its own group); see OHEM's docstring for why.
        kept_pos = pos_idx[
            _nms_prefix(anchors[pos_idx], s[pos_idx], labels[pos_idx], nms_thresh, B)
        ]
        if positive_fraction >= 0:
            num_pos = min(kept_pos.numel(), int(B * positive_fraction))
            kept_pos = kept_pos[:num_pos]
            num_neg = B - num_pos
        else:
            num_neg = B
        kept_neg = neg_idx[
            _nms_prefix(anchors[neg_idx], s[neg_idx], labels[neg_idx], nms_thresh, num_neg)
        ]
        if positive_fraction < 0:
            # No ratio: the B highest-loss survivors, whichever their label.
            cand = torch.cat([kept_pos, kept_neg])
            cand = cand[torch.topk(s[cand], min(B, cand.numel())).indices]
        else:
            cand = torch.cat([kept_pos, kept_neg])
        selected[i, cand] = True
    return selected


@FOCAL_LOSS_REGISTRY.register()
class OHEM(DenseClassificationLoss):
    """
    Online hard example mining baseline (Sec 5.1, Table 1d), with plain sigmoid CE.

    1. Every non-ignored anchor is scored by its CE loss summed over the K classes (no gradient).
    2. Per image, NMS over the anchors' boxes with that loss as the score, IoU threshold
       ``MODEL.FOCAL.OHEM.NMS_THRESH``, then the ``BATCH_SIZE_PER_IMAGE`` (B) highest-loss
       survivors form the minibatch. With ``POSITIVE_FRACTION`` = f >= 0 (0.25 = "OHEM 1:3"), at
       most floor(f B) positives are taken and negatives fill the rest, so the batch stays at B.
    3. The loss is plain CE (alpha < 0, gamma 0: the paper's OHEM uses no alpha) summed over the
       selected anchors; both the CE and the box loss are divided by the number of selected
       anchors; the box loss counts the selected foreground anchors only.

    Choices where the paper is silent, and why:

    * Boxes for NMS: the anchors themselves, not the regressed boxes. The paper says "NMS over
      the anchors' boxes"; anchors are fixed, so the selection does not depend on the (early,
      noisy) box head, and it needs no decoding.
    * NMS groups: ``batched_nms`` with the gt label as the group (background one group, each
      class one group), i.e. a negative never suppresses a positive. Hard negatives cluster around
      objects, next to the positive anchors; with one class-agnostic NMS they would remove the
      very positives the 1:3 ratio asks for. It also makes the per-group NMS exactly computable on
      a top-scored prefix (see ``_nms_prefix``), which keeps OHEM cheap at ~10^5 anchors.
    * Normaliser: the number of selected anchors (N * B when enough anchors survive), as Fast
      R-CNN-style OHEM averages its loss over the minibatch; normalising by foreground anchors
      (FL's rule) would make the CE of 128 anchors weigh as much as FL over all ~10^5.
    * Short supply: an image with fewer than B surviving anchors contributes what it has; with
      a ratio, missing positives are replaced by negatives (as detectron2's subsample_labels).
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        batch_size_per_image: int,
        nms_thresh: float,
        positive_fraction: float,
        impl: str = "auto",
    ):
        super().__init__(num_classes)
        if batch_size_per_image <= 0:
            raise ValueError(
                f"MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE={batch_size_per_image} must be a positive "
                "number of anchors per image (the paper uses 128, 256 or 512)."
            )
        if not (positive_fraction == -1 or 0 <= positive_fraction <= 1):
            raise ValueError(
                f"MODEL.FOCAL.OHEM.POSITIVE_FRACTION={positive_fraction} must be in [0, 1] "
                "(0.25 = the paper's 'OHEM 1:3') or -1 for no ratio."
            )
        if not 0 < nms_thresh <= 1:
            raise ValueError(
                f"MODEL.FOCAL.OHEM.NMS_THRESH={nms_thresh} must be an IoU in (0, 1] "
                "(the paper uses 0.5 or 0.7; 1.0 disables suppression)."
            )
        _check_impl(impl)
        self.batch_size_per_image = int(batch_size_per_image)
        self.nms_thresh = float(nms_thresh)
        self.positive_fraction = float(positive_fraction)
        self.impl = impl

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "batch_size_per_image": cfg.MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE,
            "nms_thresh": cfg.MODEL.FOCAL.OHEM.NMS_THRESH,
            "positive_fraction": cfg.MODEL.FOCAL.OHEM.POSITIVE_FRACTION,
            "impl": cfg.MODEL.FOCAL.LOSS.IMPL,
        }

    def forward(self, pred_logits, gt_labels, anchors):
        scores = per_anchor_ce_from_labels(pred_logits.detach(), gt_labels, impl=self.impl)
        selected = select_ohem_anchors(
            scores, gt_labels, anchors, self.num_classes, self.batch_size_per_image,
            self.nms_thresh, self.positive_fraction,
        )
        sel_labels = torch.where(selected, gt_labels, torch.full_like(gt_labels, -1))
        loss = sigmoid_loss_from_labels(
            pred_logits, sel_labels, loss="focal", alpha=-1.0, gamma=0.0, impl=self.impl
        )
        fg = selected & (gt_labels != self.num_classes)
        num_sel = int(selected.sum())
        num_pos = int(fg.sum())
        stats: Dict[str, float] = {
            "ohem_num_selected": num_sel / max(len(gt_labels), 1),
            "ohem_num_pos_selected": num_pos / max(len(gt_labels), 1),
        }
        return ClassificationLossOutput(
            loss=loss, normalizer=float(max(num_sel, 1)), box_mask=fg, stats=stats
        )

    def extra_repr(self):
        return (
            f"batch_size_per_image={self.batch_size_per_image}, nms_thresh={self.nms_thresh}, "
            f"positive_fraction={self.positive_fraction}, impl={self.impl}"
        )
