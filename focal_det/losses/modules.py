"""
The registered classification losses (config: ``MODEL.FOCAL.LOSS.NAME``). Each adapts one pure
function of :mod:`focal_det.losses.functional` to the contract of :mod:`focal_det.losses.base`:
``module(pred_logits (N, R, K), gt_labels (N, R), anchors (R, 4)) -> ClassificationLossOutput``.

Bad hyper-parameters fail when the model is built, with the config key to fix. The returned loss
is float32 for float16 / bfloat16 / float32 logits (float64 for float64 logits, for gradcheck).
"""
import math
from typing import Dict

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from torchvision.ops import box_iou

from .base import ClassificationLossOutput, DenseClassificationLoss
from .build import FOCAL_LOSS_REGISTRY
from .functional import IMPLS, per_anchor_ce_from_labels, sigmoid_loss_from_labels

__all__ = [
    "FocalLoss",
    "FocalLossStar",
    "BalancedCE",
    "OHEM",
    "select_ohem_anchors",
    "check_alpha",
    "check_gamma",
    "check_impl",
    "check_ohem_option",
    "check_star_gamma",
]


# The rules for the losses' config values, written once: the constructors call them, and so does
# focal_det.config_check before any work (for every loss's keys, whichever loss is selected).
def check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"MODEL.FOCAL.LOSS.IMPL={impl!r} must be one of {IMPLS}.")


def check_alpha(alpha):
    if alpha > 1:
        raise ValueError(
            f"MODEL.RETINANET.FOCAL_LOSS_ALPHA={alpha} must be in [0, 1] (weight of positives; "
            "negatives get 1 - alpha), or negative for no alpha weighting."
        )


def check_gamma(gamma):
    if not gamma >= 0:
        raise ValueError(
            f"MODEL.RETINANET.FOCAL_LOSS_GAMMA={gamma} must be >= 0: the focusing parameter "
            "(0 = cross-entropy; the paper uses 2)."
        )


def check_star_gamma(gamma):
    if not gamma > 0:
        raise ValueError(
            f"MODEL.FOCAL.LOSS.STAR_GAMMA={gamma} must be > 0: FL* divides by it "
            "(Table 3 uses 2.0 with STAR_BETA=1.0, or 4.0 with STAR_BETA=0.0)."
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
        check_gamma(gamma)
        check_alpha(alpha)
        check_impl(impl)
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
        check_star_gamma(gamma)
        check_alpha(alpha)
        check_impl(impl)
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
        check_alpha(alpha)
        check_impl(impl)
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


# Values of the OHEM options (MODEL.FOCAL.OHEM.*); see OHEM's docstring.
OHEM_NMS_GROUPS = ("all", "label")
OHEM_BOX_LOSS = ("foreground", "selected")
OHEM_NORMALIZER = ("foreground", "selected")


def check_ohem_option(key, value):
    """The rule of ``MODEL.FOCAL.OHEM.<key>`` (ValueError naming the key otherwise)."""
    if key == "BATCH_SIZE_PER_IMAGE" and not value > 0:
        raise ValueError(
            f"MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE={value} must be > 0: the anchors kept per "
            "image (the paper uses 128, 256 or 512)."
        )
    if key == "POSITIVE_FRACTION" and not (value == -1 or 0 <= value <= 1):
        raise ValueError(
            f"MODEL.FOCAL.OHEM.POSITIVE_FRACTION={value} must be in [0, 1] (0.25 = the paper's "
            "'OHEM 1:3') or -1 for no ratio."
        )
    if key == "NMS_THRESH" and not 0 < value <= 1:
        raise ValueError(
            f"MODEL.FOCAL.OHEM.NMS_THRESH={value} must be an IoU in (0, 1] (the paper uses 0.5 "
            "or 0.7; 1.0 disables suppression)."
        )
    allowed = {"NMS_GROUPS": OHEM_NMS_GROUPS, "BOX_LOSS": OHEM_BOX_LOSS,
               "NORMALIZER": OHEM_NORMALIZER}.get(key)  # fmt: skip
    if allowed is not None and value not in allowed:
        raise ValueError(
            f"MODEL.FOCAL.OHEM.{key}={value!r} must be one of {allowed} (the first is the "
            "paper's reading; see focal_det.losses.OHEM)."
        )


@torch.no_grad()
def _nms_prefix(boxes, scores, groups, iou_thresh, t, extra=None):
    """
    Greedy NMS over the ``t`` highest-scored boxes (and the boxes ``extra``), returning exactly
    the survivors that NMS over all boxes has among them.

    Why it is exact (one group, distinct scores): greedy NMS visits the boxes in decreasing score
    and keeps a box iff no box kept before it overlaps it above ``iou_thresh``. So the decision
    for a box depends only on the decisions for the higher-scored boxes that overlap it. Call a
    set of boxes *closed* if it holds, with each of its boxes, every higher-scored box overlapping
    it. NMS over a closed set visits, before each of its boxes, the same overlapping boxes as NMS
    over all boxes, with (by induction on the visiting order) the same decisions: it keeps
    exactly the boxes of the set that NMS over all boxes keeps. The top-t boxes form a closed set
    (every higher-scored box is in it), and so does the union of two closed sets, e.g. the top t
    and :func:`_nms_upstream`'s. Every box outside the top t scores lower than every box in it,
    so the first k survivors in the top t are the first k survivors of NMS over all boxes. With
    several groups (``batched_nms``), a box only meets the boxes of its own group, and "overlap"
    above reads "overlap, same group": the argument is unchanged. (Boxes of equal score are
    visited in the NMS implementation's order, here as over all boxes.)

    Returns:
        (kept, in_top): indices into ``boxes`` of the survivors, in decreasing score, and a bool
        mask over ``boxes`` of the top-t ones.
    """
    in_top = torch.zeros_like(scores, dtype=torch.bool)
    in_top[torch.topk(scores, t).indices] = True
    cand = torch.nonzero(in_top if extra is None else in_top.index_fill(0, extra, True))
    cand = cand.squeeze(1)
    kept = cand[batched_nms(boxes[cand].float(), scores[cand].float(), groups[cand], iou_thresh)]
    return kept, in_top


@torch.no_grad()
def _nms_upstream(boxes, scores, groups, iou_thresh, seeds, chunk=32):
    """
    The closed set (see :func:`_nms_prefix`) generated by ``seeds``: the seeds, every box of their
    group that scores at least as high as one of them and overlaps it above ``iou_thresh``, then
    the same for those, until nothing is added. NMS over it decides every seed exactly, without
    visiting the (many) boxes that cannot reach a seed, e.g. the easy negatives far from every
    object that outscore a low-loss positive.

    The frontier is compared in chunks of ``chunk`` boxes of similar area and position (sorted by
    area bin, row, x) with the boxes that can reach them: IoU > t needs areas within a factor
    1 / t and boxes that overlap the chunk's bounding box. The IoU test has a margin of 1e-4 below
    ``iou_thresh``: a few more boxes than needed (each with its own upstream boxes) leave the set
    closed, while float differences from the NMS kernel's IoU cannot drop a needed one.

    Returns:
        indices into ``boxes`` of the set, in increasing index order.
    """
    t = max(iou_thresh - 1e-4, 0.0)
    x1, y1, x2, y2 = boxes.float().unbind(1)
    area = ((x2 - x1) * (y2 - y1)).clamp(min=1e-6)
    # sort key: area bin (an octave), row (one box side high), then x
    band = torch.floor(torch.log2(area))
    row = torch.floor((y1 + y2) / (2 * torch.exp2(band / 2)))
    cx = (x1 + x2) - (x1 + x2).min()
    key = ((band - band.min()) * (row.max() + 1) + row).double() * float(cx.max() + 1) + cx
    member = torch.zeros_like(scores, dtype=torch.bool)
    member[seeds] = True
    frontier = seeds
    while frontier.numel():
        frontier = frontier[torch.argsort(key[frontier])]
        found = []
        for c in frontier.split(chunk):
            a = area[c]
            near = (
                ~member & (scores >= scores[c].min())
                & (area > t * a.min()) & (t * area < a.max())
                & (x1 < x2[c].max()) & (x2 > x1[c].min())
                & (y1 < y2[c].max()) & (y2 > y1[c].min())
            )  # fmt: skip
            near = torch.nonzero(near).squeeze(1)
            if near.numel() == 0:
                continue
            reach = (
                (box_iou(boxes[c].float(), boxes[near].float()) > t)
                & (scores[near][None] >= scores[c][:, None])
                & (groups[near][None] == groups[c][:, None])
            )  # fmt: skip
            new = near[reach.any(0)]
            member[new] = True
            found.append(new)
        frontier = torch.cat(found) if found else seeds.new_zeros(0)
    return torch.nonzero(member).squeeze(1)


def _negatives_for(num_pos: int, positive_fraction: float) -> float:
    """Negatives allowed for ``num_pos`` positives at positive share f: (1 - f) / f each."""
    if positive_fraction == 0:
        return math.inf
    # + 1e-9: (1 - f) / f is 3.0 exactly for f = 1/4, but may round just below an integer
    return math.floor(num_pos * (1 - positive_fraction) / positive_fraction + 1e-9)


def _select_one_image(boxes, scores, is_pos, groups, B, nms_thresh, positive_fraction):
    """
    The minibatch of one image (indices into its boxes); see :func:`select_ohem_anchors`.

    NMS runs over a prefix of the highest-loss anchors that grows x4 from max(4 B, 64) until
    the minibatch is known (``_nms_prefix``): with no ratio, once B anchors survive. With a ratio,
    the number of positive survivors decides how many negatives are taken; if the prefix holds
    too few of them while positives lie beyond it, every positive is decided at once by adding
    their closed set (``_nms_upstream``) to the prefix, instead of growing it past the
    lowest-loss positive, which can be behind nearly every one of the ~10^5 anchors.
    """
    n = scores.numel()
    if n == 0:
        return scores.new_zeros(0, dtype=torch.int64)
    with_ratio = positive_fraction >= 0
    pos_quota = math.floor(B * positive_fraction) if with_ratio else 0
    t, extra = min(n, max(4 * B, 64)), None
    while True:
        kept, in_top = _nms_prefix(boxes, scores, groups, nms_thresh, t, extra)
        if not with_ratio:
            if kept.numel() >= B or t == n:
                return kept[:B]
        else:
            kept_is_pos = is_pos[kept]
            pos_kept = int(kept_is_pos.sum())
            # every positive decided: in the prefix, or in the closed set of all positives
            all_pos_decided = extra is not None or bool(in_top[is_pos].all())
            if pos_kept >= pos_quota or all_pos_decided:
                n_pos = min(pos_kept, pos_quota)
                n_neg = min(B - n_pos, _negatives_for(n_pos, positive_fraction))
                # the first n_neg negative survivors overall are those of the prefix
                if int((~kept_is_pos & in_top[kept]).sum()) >= n_neg or t == n:
                    return torch.cat([kept[kept_is_pos][:n_pos], kept[~kept_is_pos][:n_neg]])
            else:
                positives = torch.nonzero(is_pos).squeeze(1)
                extra = _nms_upstream(boxes, scores, groups, nms_thresh, positives)
                continue  # same prefix, now with every positive decided
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
    nms_groups: str = "all",
) -> torch.Tensor:
    """
    The OHEM minibatch of each image (the rule of :class:`OHEM`'s docstring).

    Args:
        scores: (N, R) per-anchor loss (the ranking score).
        gt_labels: (N, R) int64, K = background, -1 = ignored (never selected, not in the NMS).
        anchors: (R, 4) XYXY boxes, shared by the N images.
        num_classes: K.
        batch_size_per_image: B.
        nms_thresh: IoU above which a lower-loss anchor is suppressed.
        positive_fraction: -1 for no ratio: the B highest-loss survivors. f in [0, 1]:
            min(#positive survivors, floor(f B)) positives, and (1 - f) / f negatives per
            positive (3 for f = 1/4, "OHEM 1:3"), at most B anchors in all.
        nms_groups: "all" (one NMS over every anchor) or "label" (per gt label).
    Returns:
        (N, R) bool: the selected anchors.
    """
    if nms_groups not in OHEM_NMS_GROUPS:
        raise ValueError(f"nms_groups={nms_groups!r} must be one of {OHEM_NMS_GROUPS}.")
    selected = torch.zeros_like(gt_labels, dtype=torch.bool)
    for i in range(gt_labels.shape[0]):
        valid = torch.nonzero(gt_labels[i] >= 0).squeeze(1)
        labels = gt_labels[i, valid]
        groups = labels if nms_groups == "label" else torch.zeros_like(labels)
        chosen = _select_one_image(
            anchors[valid], scores[i, valid], labels != num_classes, groups,
            batch_size_per_image, nms_thresh, positive_fraction,
        )
        selected[i, valid[chosen]] = True
    return selected


@FOCAL_LOSS_REGISTRY.register()
class OHEM(DenseClassificationLoss):
    """
    Online hard example mining baseline (Sec 5.1, Table 1d), with plain sigmoid CE.

    The paper: "in OHEM each example is scored by its loss, non-maximum suppression (nms) is then
    applied, and a minibatch is constructed with the highest-loss examples"; "OHEM 1:3": "after
    applying nms to all examples, the minibatch is constructed to enforce a 1:3 ratio between
    positives and negatives". Per image:

    1. Every non-ignored anchor is scored by its CE loss summed over the K classes (no gradient).
    2. One greedy NMS over the anchors' boxes with that loss as the score, IoU threshold
       ``MODEL.FOCAL.OHEM.NMS_THRESH``, over all examples together (``NMS_GROUPS "all"``).
    3. The minibatch: the ``BATCH_SIZE_PER_IMAGE`` (B) highest-loss survivors; or, with
       ``POSITIVE_FRACTION`` f >= 0 (0.25 = "OHEM 1:3"), the min(P, floor(f B)) highest-loss of
       the P positive survivors and (1 - f) / f highest-loss negative survivors per positive
       taken (3 for f = 1/4), at most B in all.
    4. The loss: plain CE (alpha < 0, gamma 0: the paper's OHEM uses no alpha) summed over the
       minibatch. Box loss and normaliser: ``BOX_LOSS`` / ``NORMALIZER`` below.

    The choices, and why (the paper is short; Detectron never released OHEM for RetinaNet):

    * ``NMS_GROUPS "all"`` (default): one class-agnostic NMS over positives and negatives, as
      "after applying nms to all examples" says, and as OHEM's origin (Shrivastava et al. 2016)
      runs NMS over all RoIs whatever their label: overlapping examples have correlated losses,
      and NMS keeps one of them. A high-loss negative next to an object therefore suppresses
      an overlapping positive. ``"label"``: NMS per gt label (background one group, each class
      one group), so a negative never suppresses a positive (this project's earlier reading).
    * Short supply under "OHEM 1:3" follows SSD, where the variant comes from: SSD keeps all
      positives and "the top [negatives] so that the ratio between the negatives and positives
      is at most 3:1". With
      at least B/4 positive survivors the minibatch is B/4 + 3B/4; with P < B/4 it is P + 3P:
      the ratio is kept, the batch is smaller. The variant exists "to help ensure each
      minibatch has enough positives"; filling the batch with negatives instead (detectron2's
      subsample_labels rule) would turn it back into plain OHEM exactly on the images with few
      objects, where negatives dominate most. An image where no positive survives contributes
      nothing to the classification loss (as in SSD).
    * ``BOX_LOSS "foreground"`` and ``NORMALIZER "foreground"`` (defaults): RetinaNet's box loss
      over all foreground anchors, and both losses divided by the meta-architecture's
      foreground-anchor normaliser (``normalizer=None``, ``box_mask=None``). The paper presents
      OHEM as another way of weighting the *classification* examples ("Like the focal loss, OHEM
      puts more emphasis on misclassified examples, but unlike FL, OHEM completely discards easy
      examples"), compared with FL with everything else held fixed, as every part of Table 1
      changes one thing (Table 1a's CE keeps FL's normaliser and box loss). The paper's own
      numbers agree: its OHEM rows have AP75 / AP50 = 0.69-0.73 (best row 35.1 / 50.3), as FL's
      38.7 / 54.9 = 0.70, so they localise like FL. With the alternative below (box loss over
      the few selected positives, divided by the number of selected anchors) every one of our
      demo-scale OHEM runs had AP75 0 (docs/reproduction.md).
    * ``BOX_LOSS "selected"`` / ``NORMALIZER "selected"``: OHEM's origin in Fast R-CNN, where the
      minibatch of hard RoIs carries both losses and both are averaged over the minibatch
      (Fast R-CNN's mean over its R RoIs): box regression over the selected foreground anchors
      only, both losses divided by the number of selected anchors (N B when enough survive).
    * The ranking score is the CE only: OHEM ranks a RoI by its classification plus box loss,
      but the classification-loss contract has no box predictions, and negatives (the bulk of
      the selection) have no box loss anyway.
    * Boxes for NMS: the anchors themselves, not the regressed boxes ("nms over the anchors'
      boxes"): the selection does not depend on the (early, noisy) box head and needs no
      decoding. The NMS is computed exactly on a top-scored prefix, plus, for "OHEM 1:3" when
      positives are short, the anchors that can reach a positive (``_nms_prefix``,
      ``_nms_upstream``).
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        batch_size_per_image: int,
        nms_thresh: float,
        positive_fraction: float,
        nms_groups: str = "all",
        box_loss: str = "foreground",
        normalizer: str = "foreground",
        impl: str = "auto",
    ):
        super().__init__(num_classes)
        for key, value in (
            ("BATCH_SIZE_PER_IMAGE", batch_size_per_image),
            ("POSITIVE_FRACTION", positive_fraction),
            ("NMS_THRESH", nms_thresh),
            ("NMS_GROUPS", nms_groups),
            ("BOX_LOSS", box_loss),
            ("NORMALIZER", normalizer),
        ):
            check_ohem_option(key, value)
        check_impl(impl)
        self.batch_size_per_image = int(batch_size_per_image)
        self.nms_thresh = float(nms_thresh)
        self.positive_fraction = float(positive_fraction)
        self.nms_groups, self.box_loss, self.normalizer = nms_groups, box_loss, normalizer
        self.impl = impl

    @classmethod
    def from_config(cls, cfg):
        o = cfg.MODEL.FOCAL.OHEM
        return {
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "batch_size_per_image": o.BATCH_SIZE_PER_IMAGE,
            "nms_thresh": o.NMS_THRESH,
            "positive_fraction": o.POSITIVE_FRACTION,
            "nms_groups": o.NMS_GROUPS,
            "box_loss": o.BOX_LOSS,
            "normalizer": o.NORMALIZER,
            "impl": cfg.MODEL.FOCAL.LOSS.IMPL,
        }

    def forward(self, pred_logits, gt_labels, anchors):
        scores = per_anchor_ce_from_labels(pred_logits.detach(), gt_labels, impl=self.impl)
        selected = select_ohem_anchors(
            scores, gt_labels, anchors, self.num_classes, self.batch_size_per_image,
            self.nms_thresh, self.positive_fraction, self.nms_groups,
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
            loss=loss,
            normalizer=float(max(num_sel, 1)) if self.normalizer == "selected" else None,
            box_mask=fg if self.box_loss == "selected" else None,
            stats=stats,
        )

    def extra_repr(self):
        return (
            f"batch_size_per_image={self.batch_size_per_image}, nms_thresh={self.nms_thresh}, "
            f"positive_fraction={self.positive_fraction}, nms_groups={self.nms_groups}, "
            f"box_loss={self.box_loss}, normalizer={self.normalizer}, impl={self.impl}"
        )
