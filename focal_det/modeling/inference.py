"""
The paper's inference (Sec 4, "Inference"), as detectron2's RetinaNet does it: per level, the
scores > 0.05 (``MODEL.RETINANET.SCORE_THRESH_TEST``), of those the top 1000
(``TOPK_CANDIDATES_TEST``), their boxes decoded; all levels merged, per-class NMS at 0.5,
``TEST.DETECTIONS_PER_IMAGE`` kept.

:func:`decode_top_candidates` is one level of it, run on the *logits*: the top-k of each level's
logits is found first, and the sigmoid and the threshold are applied to those k only, instead of
detectron2's sigmoid of all H*W*A*K logits, its comparison of all of them with the threshold and
the index list of every passing score. Same detections (tested against detectron2's): the top-k
of the scores above the threshold are the top-k scores that are above the threshold.
:class:`TopCandidatesInference` puts it into a detectron2 ``RetinaNet`` subclass.
"""
import math
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor

__all__ = ["TopCandidatesInference", "decode_top_candidates"]


def decode_top_candidates(
    box2box_transform,
    anchors: Boxes,
    pred_logits: Tensor,
    pred_deltas: Tensor,
    score_thresh: float,
    topk_candidates: int,
    image_size: Tuple[int, int],
) -> Instances:
    """
    One level of RetinaNet inference, equal to detectron2's
    ``DenseDetector._decode_per_level_predictions`` applied to ``pred_logits.sigmoid()``, but
    touching the R_l*K logits only with cheap passes (a max over classes, one comparison):

    1. The k-th largest of the per-anchor maxima is a lower bound of the k-th largest logit
       (those k maxima are k logits), so every top-k logit is >= it; so is every logit whose
       probability passes ``score_thresh`` (>= logit(score_thresh), less a rounding margin).
       Only the logits above the larger of the two bounds are gathered (typically ~k of them).
    2. The top-k of those, their sigmoid, then detectron2's ``> score_thresh`` on the
       probabilities: exactly detectron2's set, since the top-k of the passing scores are the
       top-k scores that pass (the sigmoid is monotonic).
    3. If two kept probabilities are equal (float32 saturation of different logits, e.g. a
       diverged model), detectron2's result depends on how its top-k orders ties; the level is
       then decoded with detectron2's own procedure, so the output is always identical.

    Args:
        box2box_transform: the model's ``Box2BoxTransform``.
        anchors (Boxes): (R_l, 4) anchors of this level.
        pred_logits (Tensor): (R_l, K) classification LOGITS (not probabilities).
        pred_deltas (Tensor): (R_l, 4) box deltas.
        score_thresh (float): keep probabilities > this.
        topk_candidates (int): keep at most this many (anchor, class) pairs.
        image_size: (H, W) for the returned Instances.

    Returns:
        Instances with ``pred_boxes``, ``scores`` (probabilities, descending), ``pred_classes``.
    """
    num_anchors, num_classes = pred_logits.shape
    k = min(topk_candidates, num_anchors * num_classes)
    cut = -math.inf
    if 0 < k <= num_anchors:
        row_max = pred_logits.detach().amax(dim=1)
        cut = row_max.topk(k, sorted=False).values.min().item()
        if math.isnan(cut):
            # NaN logits (a diverged model): detectron2's "> score_thresh" drops them, so rank
            # them below everything, then bound again.
            pred_logits = pred_logits.nan_to_num(nan=-math.inf, posinf=math.inf)
            row_max = pred_logits.amax(dim=1)
            cut = row_max.topk(k, sorted=False).values.min().item()
    if 0.0 < score_thresh < 1.0:
        # float32 rounding of the sigmoid can only move a probability by ~1 ulp: 1e-3 in logit
        # space is far more than enough, and the exact test on probabilities follows.
        cut = max(cut, math.log(score_thresh / (1.0 - score_thresh)) - 1e-3)
    if cut > -math.inf:
        anchor_idxs, classes_idxs = (pred_logits >= cut).nonzero(as_tuple=True)
        cand_logits = pred_logits[anchor_idxs, classes_idxs]
    else:  # fewer anchors than k and no threshold: every pair is a candidate
        flat = torch.arange(num_anchors * num_classes, device=pred_logits.device)
        anchor_idxs, classes_idxs = flat // num_classes, flat % num_classes
        cand_logits = pred_logits.reshape(-1).nan_to_num(nan=-math.inf, posinf=math.inf)
    # One more than k, to see a tie at the boundary.
    top_logits, order = cand_logits.topk(min(k + 1, cand_logits.numel()))  # sorted, descending
    probs = top_logits.sigmoid()
    scores, order = probs[:k], order[:k]
    keep = scores > score_thresh
    scores, order = scores[keep], order[keep]
    tie_inside = bool((scores[1:] == scores[:-1]).any())
    tie_at_k = (
        probs.numel() > k and bool(probs[k] > score_thresh) and bool(probs[k] == probs[k - 1])
    )
    if tie_inside or tie_at_k:
        # Equal probabilities (e.g. saturated at 1.0) from different logits: which of them
        # detectron2 keeps, and in which order, is whatever its top-k over the probabilities
        # returns. Reproduce that exactly with its own procedure (rare; costs the full pass).
        return _decode_like_detectron2(
            box2box_transform, anchors, pred_logits, pred_deltas, score_thresh,
            topk_candidates, image_size,
        )
    anchor_idxs, classes_idxs = anchor_idxs[order], classes_idxs[order]
    pred_boxes = box2box_transform.apply_deltas(
        pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs]
    )
    return Instances(
        image_size, pred_boxes=Boxes(pred_boxes), scores=scores, pred_classes=classes_idxs
    )


def _decode_like_detectron2(
    box2box_transform, anchors, pred_logits, pred_deltas, score_thresh, topk_candidates,
    image_size,
) -> Instances:
    """detectron2's ``DenseDetector._decode_per_level_predictions`` on ``sigmoid(logits)``."""
    pred_scores = pred_logits.sigmoid()
    keep_idxs = pred_scores > score_thresh
    pred_scores = pred_scores[keep_idxs]
    topk_idxs = torch.nonzero(keep_idxs)
    num_topk = min(topk_idxs.shape[0], topk_candidates)
    pred_scores, idxs = pred_scores.topk(num_topk)
    anchor_idxs, classes_idxs = topk_idxs[idxs].unbind(dim=1)
    pred_boxes = box2box_transform.apply_deltas(
        pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs]
    )
    return Instances(
        image_size, pred_boxes=Boxes(pred_boxes), scores=pred_scores, pred_classes=classes_idxs
    )


class TopCandidatesInference:
    """
    Mixin for a detectron2 ``RetinaNet`` (sub)class: its ``forward_inference`` runs
    :func:`decode_top_candidates` on the logits instead of detectron2's sigmoid-everything
    decoding. Same detections (tested against detectron2's). ``inference_single_image`` and
    ``_decode_per_level_predictions`` are left as detectron2 defines them (they take
    probabilities), for callers that use them directly.

    Two hooks say what the head's logits are (defaults: detectron2's K sigmoid logits):
    ``logits_per_anchor()`` and ``class_scores(logits)``, with ``sigmoid_class_scores()``
    telling whether the scores are the elementwise sigmoid of K logits, which the logit fast
    path needs (it ranks logits: the sigmoid is monotone in each). Otherwise each image is
    decoded by detectron2's own ``inference_single_image`` on ``class_scores(logits)``.
    """

    def logits_per_anchor(self) -> int:
        """Classification logits per anchor in the head's output."""
        return self.num_classes

    def sigmoid_class_scores(self) -> bool:
        """Whether the per-class scores are the sigmoid of each of K logits."""
        return True

    def class_scores(self, logits: Tensor) -> Tensor:
        """(R, logits_per_anchor) logits -> (R, K) per-class probabilities."""
        return logits.sigmoid()

    def _split_dense_predictions(self, predictions: List[List[Tensor]]):
        """detectron2's ``_transpose_dense_predictions`` with a check of the logit count."""
        L = self.logits_per_anchor()
        A = self.anchor_generator.num_cell_anchors[0]
        channels = predictions[0][0].shape[1]
        if channels != A * L:
            raise ValueError(
                f"The head outputs {channels} classification channels per location, but the "
                f"loss reads {L} logits for each of the {A} cell anchors ({A * L}). Build the "
                "head for the loss (build_focal_head(..., num_classes=loss.num_logits))."
            )
        return self._transpose_dense_predictions(predictions, [L, 4])

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ):
        pred_logits, pred_anchor_deltas = self._split_dense_predictions(predictions)
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            deltas = [deltas_l[img_idx] for deltas_l in pred_anchor_deltas]
            if not self.sigmoid_class_scores():
                scores = [self.class_scores(logits_l[img_idx]) for logits_l in pred_logits]
                results.append(self.inference_single_image(anchors, scores, deltas, image_size))
                continue
            per_level = [
                decode_top_candidates(
                    self.box2box_transform,
                    anchors_l,
                    logits_l[img_idx],
                    deltas_l,
                    self.test_score_thresh,
                    self.test_topk_candidates,
                    image_size,
                )
                for anchors_l, logits_l, deltas_l in zip(anchors, pred_logits, deltas)
            ]
            pred = Instances.cat(per_level)
            keep = batched_nms(  # per-class NMS, as detectron2
                pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
            )
            results.append(pred[keep[: self.max_detections_per_image]])
        return results
