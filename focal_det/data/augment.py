"""
Training augmentations beyond detectron2's resize + horizontal flip, for imagery without an
"up" (aerial and satellite tiles, microscopy): vertical flips, rotations by multiples of 90
degrees and photometric jitter, all detectron2 ``Augmentation`` objects, selected by the
``INPUT.EXTRA_AUG`` keys (focal_det/config.py; all off by default, so the paper's configs keep
"horizontal flip is the only augmentation"). ``build_train_augmentations(cfg)`` is what
``Trainer.build_train_loader`` hands to detectron2's ``DatasetMapper``.
"""
from typing import List

import numpy as np
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

__all__ = ["RandomRot90", "Rot90Transform", "build_train_augmentations"]


class Rot90Transform(T.Transform):
    """
    Rotate by ``k`` x 90 degrees counter-clockwise (as ``np.rot90``), exactly: pixels are moved,
    not resampled, and boxes stay axis-aligned with the same extent (detectron2's
    ``RotationTransform`` resamples with ``cv2.warpAffine`` and rounds the expanded canvas).
    """

    def __init__(self, k: int, h: int, w: int):
        super().__init__()
        self._set_attributes(locals())
        self.k = k % 4

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img, self.k))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        # One counter-clockwise quarter turn of a W-wide image, in continuous pixel coordinates:
        # (x, y) -> (y, W - x); the image is then W x H (height x width swap).
        coords = np.asarray(coords, dtype=np.float64).copy()
        w, h = self.w, self.h
        for _ in range(self.k):
            coords = np.stack([coords[:, 1], w - coords[:, 0]], axis=1)
            w, h = h, w
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def inverse(self) -> T.Transform:
        h, w = (self.h, self.w) if self.k % 2 == 0 else (self.w, self.h)
        return Rot90Transform(-self.k, h, w)


class RandomRot90(T.Augmentation):
    """Rotate by 0, 90, 180 or 270 degrees, uniformly at random."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        k = int(np.random.randint(4))
        return T.NoOpTransform() if k == 0 else Rot90Transform(k, h, w)


def build_train_augmentations(cfg) -> List[T.Augmentation]:
    """
    detectron2's training augmentations, as its ``DatasetMapper`` builds them (``INPUT.CROP``,
    ResizeShortestEdge, ``INPUT.RANDOM_FLIP``), followed by those ``INPUT.EXTRA_AUG`` turns on:
    a vertical flip, a random quarter turn, and brightness / contrast / saturation factors drawn
    from ``[1 - x, 1 + x]``.
    """
    extra = cfg.INPUT.EXTRA_AUG
    augs = list(DatasetMapper.from_config(cfg, is_train=True)["augmentations"])
    if extra.VERTICAL_FLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=False, vertical=True))
    if extra.ROTATE_90:
        augs.append(RandomRot90())
    for key, aug in (
        ("BRIGHTNESS", T.RandomBrightness),
        ("CONTRAST", T.RandomContrast),
        ("SATURATION", T.RandomSaturation),
    ):
        x = float(getattr(extra, key))
        if not 0.0 <= x < 1.0:
            raise ValueError(
                f"INPUT.EXTRA_AUG.{key}={x} must be in [0, 1): the factor is drawn from "
                f"[1 - {key.lower()}, 1 + {key.lower()}] (0 = off)."
            )
        if x > 0:
            augs.append(aug(1.0 - x, 1.0 + x))
    return augs
