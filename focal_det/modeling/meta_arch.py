"""
FocalRetinaNet: RetinaNet (the paper's Sec 4) on detectron2's dense-detector machinery, with the
head taken from ``FOCAL_HEAD_REGISTRY`` and the classification loss from ``FOCAL_LOSS_REGISTRY``.

Where the paper (Detectron) and detectron2 differ, the difference is a config key:

============================  ==========================  ===================================
what (config key)             paper / Detectron           detectron2
============================  ==========================  ===================================
loss normaliser               # foreground anchors of     EMA of that count, momentum 0.9,
(FOCAL.LOSS.NORMALIZER_       this batch, >= 1 (0.0)      initial 100 (0.9)
MOMENTUM)
low-quality matches           best anchor of a box added  best anchor added whatever its IoU
(FOCAL.MATCHER.LOW_QUALITY_   only if IoU >= 0.4          ("detectron2")
MATCHES)                      ("detectron")
smooth-L1 beta (RETINANET.    0.11                        0.0 in Base-RetinaNet.yaml
SMOOTH_L1_LOSS_BETA)                                      (0.1 in detectron2's defaults)
============================  ==========================  ===================================

``configs/Base-RetinaNet.yaml`` sets detectron2's column (with it and ``"FocalLoss"`` the losses
equal detectron2's RetinaNet's), ``configs/Base-RetinaNet-Paper.yaml`` the paper's. Without a
YAML, ``add_focal_config`` gives NORMALIZER_MOMENTUM 0.0 (paper), LOW_QUALITY_MATCHES
"detectron2" and detectron2's default beta 0.1. Everything else (anchors, head, box coding,
inference) is the paper's and detectron2's alike.
"""
import math
from typing import Dict

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.backbone import build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.structures import Boxes
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..losses import build_classification_loss
from .heads import build_focal_head
from .inference import TopCandidatesInference
from .matcher import RetinaNetMatcher
from .speed_switches import apply_speed_options

__all__ = ["FocalRetinaNet", "NonFiniteLossError", "check_normalizer_momentum"]


# Initial value of detectron2's EMA normaliser (RetinaNet.losses: _ema_update(..., 100)).
_EMA_NORMALIZER_INIT = 100.0


class NonFiniteLossError(FloatingPointError):
    """
    A training loss became NaN or infinite. The facts: ``losses`` ({name: value} of the step;
    empty when the raiser did not know them) and ``iteration`` (None when unknown); the message
    says what to try. ``explained``: the Trainer's advice (checkpoint, commands) is in it.
    """

    def __init__(self, message, *, losses, iteration, explained=False):
        super().__init__(message)
        self.losses = dict(losses)
        self.iteration = iteration
        self.explained = explained

    @property
    def non_finite(self):
        """Names of the losses that are NaN or infinite."""
        return [k for k, v in self.losses.items() if not math.isfinite(v)]


def check_normalizer_momentum(momentum: float):
    """``MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM`` must be in [0, 1) (ValueError otherwise)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(
            f"MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM={momentum} must be in [0, 1): 0.0 = this "
            "batch's foreground count (paper), 0.9 = detectron2's EMA."
        )


@META_ARCH_REGISTRY.register()
class FocalRetinaNet(TopCandidatesInference, RetinaNet):
    """
    RetinaNet whose classification loss is any registered dense loss (FL, FL*, alpha-balanced
    CE, OHEM, softmax FL). Training, for N images and R anchors (all levels, R = sum Hi*Wi*A):

    1. ``label_anchors``: IoU matching with ``RetinaNetMatcher`` -> labels (N, R) int64 in
       {-1 = ignore, 0..K-1, K = background} and matched boxes (N, R, 4).
    2. ``losses``: ``cls_loss(logits (N, R, L), labels (N, R), anchors (R, 4))`` -- the same call
       for every loss, never a branch on its name (contract: ``focal_det/losses/base.py``) --
       plus smooth-L1 (or GIoU, ...) box regression over the foreground anchors, or over the
       subset the loss module selects (``box_mask``, e.g. OHEM's). Both are divided by the
       foreground-anchor normaliser, unless the loss module returns its own.
    3. A non-finite loss raises :class:`NonFiniteLossError` with the iteration and the losses.

    The loss also decides the head's logits per anchor (K sigmoid logits; K + 1 for the softmax
    loss), their initial bias and how they turn into class scores (``losses/base.py``).

    Inference is detectron2's, which is the paper's: per level, keep scores > 0.05, then the
    top 1000; decode those boxes only; merge levels; per-class NMS at 0.5; keep
    ``TEST.DETECTIONS_PER_IMAGE``. For sigmoid scores it runs on the logits
    (``inference.TopCandidatesInference``): the sigmoid is applied to the top candidates only,
    with detectron2's detections; other scores (softmax) go through detectron2's own decoding.

    Speed switches (``speed_switches.apply_speed_options``), numerically neutral: MODEL.FOCAL.
    CHANNELS_LAST, FOLD_FROZEN_BN and COMPILE_HEAD (falls back to eager with a warning).
    """

    @configurable
    def __init__(
        self,
        *,
        cls_loss: nn.Module,
        normalizer_momentum: float = 0.0,
        normalizer_all_reduce: bool = False,
        channels_last: bool = False,
        fold_frozen_bn: bool = False,
        compile_head: bool = False,
        **kwargs,
    ):
        """
        Args:
            cls_loss (nn.Module): a dense classification loss following the contract of
                :class:`focal_det.losses.DenseClassificationLoss`.
            normalizer_momentum (float): in [0, 1). 0: divide the losses by this batch's number
                of foreground anchors (at least 1), as the paper. m > 0: by an EMA
                ``n <- m * n + (1 - m) * max(num_fg, 1)`` starting at 100 (detectron2: 0.9).
            normalizer_all_reduce (bool): use the mean foreground count over all workers
                instead of this worker's, so that with DDP's gradient averaging the loss is
                normalised by the global count. Off in the paper (each GPU used its own).
            channels_last, fold_frozen_bn, compile_head (bool): the speed switches of
                :func:`focal_det.modeling.speed_switches.apply_speed_options` (same numbers).
            kwargs: the arguments of detectron2's :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        # detectron2's loss parameters (its defaults here): the loss module holds the real ones.
        del self.focal_loss_alpha, self.focal_loss_gamma
        check_normalizer_momentum(normalizer_momentum)
        self.cls_loss = cls_loss
        # What the head's logits are is the loss's (focal_det/losses/base.py); fixed with the
        # head, which was built for it.
        self._logits_per_anchor = cls_loss.num_logits
        self._sigmoid_class_scores = cls_loss.sigmoid_scores
        self.normalizer_momentum = normalizer_momentum
        self.normalizer_all_reduce = normalizer_all_reduce
        self.speed_options = dict(
            channels_last=channels_last, fold_frozen_bn=fold_frozen_bn, compile_head=compile_head
        )
        apply_speed_options(self, **self.speed_options)

    @classmethod
    def from_config(cls, cfg):
        # Written out rather than taken from RetinaNet.from_config, which would build (and
        # initialise) detectron2's head only for it to be replaced by the registry's.
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        feature_shapes = [backbone_shape[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        cls_loss = build_classification_loss(cfg)
        # The loss decides how many logits per anchor the head predicts and their initial bias.
        head = build_focal_head(
            cfg,
            feature_shapes,
            num_classes=cls_loss.num_logits,
            cls_prior_bias=cls_loss.prior_bias(cfg.MODEL.RETINANET.PRIOR_PROB),
        )
        return {
            "backbone": backbone,
            "head": head,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS),
            "anchor_matcher": RetinaNetMatcher(
                cfg.MODEL.RETINANET.IOU_THRESHOLDS,
                cfg.MODEL.RETINANET.IOU_LABELS,
                low_quality_matches=cfg.MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES,
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "head_in_features": cfg.MODEL.RETINANET.IN_FEATURES,
            # Loss parameters (alpha / gamma are the loss module's, from its own from_config).
            "cls_loss": cls_loss,
            "normalizer_momentum": cfg.MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM,
            "normalizer_all_reduce": cfg.MODEL.FOCAL.LOSS.NORMALIZER_ALL_REDUCE,
            "channels_last": cfg.MODEL.FOCAL.CHANNELS_LAST,
            "fold_frozen_bn": cfg.MODEL.FOCAL.FOLD_FROZEN_BN,
            "compile_head": cfg.MODEL.FOCAL.COMPILE_HEAD,
            "smooth_l1_beta": cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA,
            "box_reg_loss_type": cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE,
            # Inference parameters:
            "test_score_thresh": cfg.MODEL.RETINANET.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.RETINANET.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            # Vis parameters
            "vis_period": cfg.VIS_PERIOD,
            "input_format": cfg.INPUT.FORMAT,
        }

    def logits_per_anchor(self) -> int:
        return self._logits_per_anchor

    def sigmoid_class_scores(self) -> bool:
        return self._sigmoid_class_scores

    def class_scores(self, logits: Tensor) -> Tensor:
        return self.cls_loss.class_scores(logits)

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_anchor_deltas = self._split_dense_predictions(predictions)
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        losses = self.losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        self._check_losses_finite(losses)
        return losses

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Args:
            anchors (list[Boxes]): #lvl anchors, level i has (Hi*Wi*A, 4).
            pred_logits (list[Tensor]): #lvl tensors of (N, Hi*Wi*A, L), any float dtype, L =
                the loss's ``num_logits`` (K for the sigmoid losses).
            gt_labels (list[Tensor]): N tensors of (R,) int64 from :meth:`label_anchors`.
            pred_anchor_deltas (list[Tensor]): #lvl tensors of (N, Hi*Wi*A, 4).
            gt_boxes (list[Tensor]): N tensors of (R, 4), the matched box of each anchor.

        Returns:
            dict[str, Tensor]: float32 scalars "loss_cls" and "loss_box_reg".
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        storage = get_event_storage()
        storage.put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        # Computed (EMA advanced, all-reduce done) every iteration even when the loss module
        # brings its own normaliser: the EMA then means the same thing whatever the loss, and
        # every worker joins the collective.
        fg_normalizer = self.foreground_normalizer(num_pos_anchors)

        # The losses are sums over ~100k anchors x K classes: under AMP they are computed in
        # float32 (the loss module receives the half logits and upcasts internally, so no
        # float32 copy of the (N, R, K) logits is made here).
        with torch.autocast(device_type=pred_logits[0].device.type, enabled=False):
            out = self.cls_loss(cat(pred_logits, dim=1), gt_labels, Boxes.cat(anchors).tensor)
            box_mask = pos_mask if out.box_mask is None else self._check_box_mask(out, pos_mask)
            loss_box_reg = _dense_box_regression_loss(
                anchors,
                self.box2box_transform,
                [x.float() for x in pred_anchor_deltas],
                gt_boxes,
                box_mask,
                box_reg_loss_type=self.box_reg_loss_type,
                smooth_l1_beta=self.smooth_l1_beta,
            )
        for name, value in out.stats.items():
            storage.put_scalar(name, value)

        normalizer = fg_normalizer if out.normalizer is None else max(float(out.normalizer), 1.0)
        return {
            "loss_cls": out.loss.float() / normalizer,
            "loss_box_reg": loss_box_reg.float() / normalizer,
        }

    def _check_box_mask(self, out, pos_mask: Tensor) -> Tensor:
        """The loss module's box mask, restricted to the foreground (box targets exist there)."""
        mask = out.box_mask
        if mask.dtype != torch.bool or mask.shape != pos_mask.shape:
            # An integer mask would silently index anchors by value instead of selecting them.
            raise TypeError(
                f"{type(self.cls_loss).__name__} returned box_mask of dtype {mask.dtype} and "
                f"shape {tuple(mask.shape)}; the contract (focal_det/losses/base.py) needs a bool "
                f"(N, R) = {tuple(pos_mask.shape)} mask."
            )
        return mask & pos_mask

    def foreground_normalizer(self, num_pos_anchors: int) -> float:
        """
        The number the losses are divided by (the paper: "normalized by the number of anchors
        assigned to a ground-truth box"), see ``normalizer_momentum`` / ``_all_reduce``.

        Args:
            num_pos_anchors (int): foreground anchors of this worker's batch.
        """
        num_pos = float(num_pos_anchors)
        if self.normalizer_all_reduce and comm.get_world_size() > 1:
            t = torch.tensor([num_pos], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            num_pos = t.item() / comm.get_world_size()
        if self.normalizer_momentum == 0.0:
            # Stateless: nothing per-worker goes into the checkpoint (see get_extra_state).
            return max(num_pos, 1.0)
        # detectron2's `self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)`:
        # same attribute, same arithmetic, so the two models' normalisers evolve identically.
        return self._ema_update(
            "loss_normalizer", max(num_pos, 1.0), _EMA_NORMALIZER_INIT, self.normalizer_momentum
        )

    # The EMA normaliser (momentum > 0) is training state: it goes into the checkpoint (as the
    # module's "_extra_state", a float64 scalar tensor, which detectron2's checkpointer and
    # weights_only loading accept) so that --resume continues it exactly. detectron2 keeps it
    # as a plain attribute, so its RetinaNet restarts the EMA at 100 on resume. With several
    # workers and no all-reduce each worker has its own EMA; the checkpoint holds rank 0's.
    # With momentum 0 it stays at its initial value (nothing to resume).
    def get_extra_state(self) -> Tensor:
        value = getattr(self, "loss_normalizer", _EMA_NORMALIZER_INIT)
        return torch.tensor(value, dtype=torch.float64)

    def set_extra_state(self, state: Tensor):
        self.loss_normalizer = float(state)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs
        )
        # detectron2's RetinaNet checkpoints have no extra state and must still load strictly:
        # the normaliser then keeps its current value (100 for a new model, as detectron2).
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    def _check_losses_finite(self, losses: Dict[str, Tensor]):
        """
        Raise :class:`NonFiniteLossError` if a loss is NaN or inf. detectron2's trainer checks
        too, but only every ``gather_metric_period`` iterations, on the main process, and with no
        hint; failing here stops before the optimizer step writes NaN into the weights.
        """
        values = torch.stack([v.detach().float() for v in losses.values()])
        if bool(torch.isfinite(values).all()):
            return
        try:
            iteration = get_event_storage().iter
            where = f"at iteration {iteration}"
        except AssertionError:  # no EventStorage: called outside a trainer
            iteration, where = None, "(no EventStorage, iteration unknown)"
        losses = dict(zip(losses, values.tolist()))
        described = ", ".join(f"{k}={v:.6g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"FocalRetinaNet: non-finite loss {where}: {described}. The usual cause is a learning "
            "rate too high for the batch size: the paper's SOLVER.BASE_LR=0.01 is for "
            "SOLVER.IMS_PER_BATCH=16 -- scale it linearly with the batch (linear scaling rule, "
            "e.g. 0.00125 for 2 images) and keep SOLVER.WARMUP_ITERS. Other causes: a "
            "randomly initialised backbone with FrozenBN (use MODEL.RESNETS.NORM='BN' or 'GN'), "
            "or corrupt annotations (degenerate boxes).",
            losses=losses,
            iteration=iteration,
        )
