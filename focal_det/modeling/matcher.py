"""
Anchor-to-box matching for RetinaNet, with the paper's (Detectron's) and detectron2's rules for
"low-quality" matches as a named choice (``MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES``).

The paper (Sec 4, "Training"): an anchor with IoU >= 0.5 to a box is foreground, IoU < 0.4 is
background, [0.4, 0.5) is ignored. Neither the paper's text nor a pure threshold rule guarantees
that every box gets an anchor; both code bases add the best anchor(s) of every box as foreground,
but differently:

* ``"detectron2"`` -- detectron2's ``Matcher(allow_low_quality_matches=True)``: the best anchors
  of every box (ties included) become foreground, whatever their IoU, even when it is below the
  background threshold. Quirk kept for exact compatibility: a box that overlaps no anchor at all
  (best IoU 0) makes every anchor with IoU 0 to it a "best" anchor.
* ``"detectron"`` -- Detectron's ``_get_retinanet_blobs`` (the paper's code): the best anchors
  are labelled foreground first, then every anchor whose IoU (its highest over all boxes) is
  below ``RETINANET.NEGATIVE_OVERLAP`` = 0.4 is overwritten as background. Net effect: a best
  anchor is added only if its IoU >= the background threshold, i.e. only anchors that the
  thresholds would have *ignored* are promoted.
* ``"none"`` -- no low-quality matches: only IoU >= the foreground threshold is foreground.

In all modes an added anchor is matched to the box it overlaps most (not necessarily the box it
is the best anchor of), as in both Detectron and detectron2.
"""
from typing import List

from detectron2.layers import nonzero_tuple
from detectron2.modeling.matcher import Matcher

__all__ = [
    "LOW_QUALITY_MATCH_MODES",
    "RetinaNetMatcher",
    "check_iou_thresholds",
    "check_low_quality_matches",
]

LOW_QUALITY_MATCH_MODES = ("detectron2", "detectron", "none")


# The matcher's config rules, written once: RetinaNetMatcher and focal_det.config_check call them.
def check_low_quality_matches(mode):
    if mode not in LOW_QUALITY_MATCH_MODES:
        raise ValueError(
            f"MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES={mode!r} is not one of "
            f"{list(LOW_QUALITY_MATCH_MODES)} (\"detectron2\": detectron2's "
            "allow_low_quality_matches; \"detectron\": the paper's Detectron rule; "
            "\"none\": thresholds only)."
        )


def check_iou_thresholds(thresholds, labels):
    """MODEL.RETINANET.IOU_THRESHOLDS / IOU_LABELS (detectron2's Matcher only asserts)."""
    thr, labels = list(thresholds), list(labels)
    if not thr or not all(0 < t <= 1 for t in thr) or thr != sorted(thr):
        raise ValueError(
            f"MODEL.RETINANET.IOU_THRESHOLDS={thr} must be increasing IoUs in (0, 1], "
            "background threshold first (the paper: [0.4, 0.5])."
        )
    if len(labels) != len(thr) + 1 or not all(lb in (-1, 0, 1) for lb in labels):
        raise ValueError(
            f"MODEL.RETINANET.IOU_LABELS={labels} must hold len(IOU_THRESHOLDS) + 1 = "
            f"{len(thr) + 1} labels from (-1, 0, 1) (the paper: [0, -1, 1])."
        )


class RetinaNetMatcher(Matcher):
    """
    detectron2's :class:`Matcher` with the low-quality-match rule chosen by name (see the module
    docstring). With ``low_quality_matches="detectron2"`` it is exactly detectron2's RetinaNet
    matcher.
    """

    def __init__(
        self, thresholds: List[float], labels: List[int], low_quality_matches: str = "detectron2"
    ):
        """
        Args:
            thresholds, labels: as detectron2's :class:`Matcher`, e.g. ``[0.4, 0.5]`` and
                ``[0, -1, 1]`` (background, ignored, foreground).
            low_quality_matches (str): one of ``"detectron2"``, ``"detectron"``, ``"none"``.
                For ``"detectron"`` a best anchor is added only if its IoU is at least
                ``thresholds[0]`` (the background threshold, 0.4 in the paper).
        """
        check_low_quality_matches(low_quality_matches)
        check_iou_thresholds(thresholds, labels)
        super().__init__(
            thresholds, labels, allow_low_quality_matches=low_quality_matches != "none"
        )
        self.low_quality_matches = low_quality_matches
        # self.thresholds is [-inf, t0, t1, ..., inf]: t0 is the background threshold.
        self.low_quality_min_iou = self.thresholds[1]

    def set_low_quality_matches_(self, match_labels, match_quality_matrix):
        """
        Args:
            match_labels (Tensor): (R,) int8 labels from the thresholds, modified in place.
            match_quality_matrix (Tensor): (M, R) IoU of M boxes and R anchors, M >= 1.
        """
        if self.low_quality_matches == "detectron2":
            super().set_low_quality_matches_(match_labels, match_quality_matrix)
            return
        # "detectron": the best anchors of each box (ties included) ...
        highest_quality_foreach_gt = match_quality_matrix.max(dim=1).values
        _, best_anchor_inds = nonzero_tuple(
            match_quality_matrix == highest_quality_foreach_gt[:, None]
        )
        # ... except those whose own highest IoU is under the background threshold: Detectron
        # labels them foreground, then overwrites every anchor below NEGATIVE_OVERLAP with
        # background, so they end up as background.
        anchor_iou = match_quality_matrix[:, best_anchor_inds].max(dim=0).values
        match_labels[best_anchor_inds[anchor_iou >= self.low_quality_min_iou]] = 1
