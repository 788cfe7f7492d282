"""
The extra training augmentations (focal_det/data/augment.py, INPUT.EXTRA_AUG): exact quarter
turns, the list handed to detectron2's DatasetMapper, and boxes that still cover their objects
after the mapper has flipped, rotated and recoloured the image.
"""
import numpy as np
import pytest
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from focal_det.data.augment import RandomRot90, Rot90Transform, build_train_augmentations
from tests.synthetic_detection import tiny_cfg, write_images


def _filled(h, w, boxes):
    img = np.zeros((h, w, 3), np.uint8)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = 255
    return img


def _extent(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("k", [0, 1, 2, 3, -1, 5])
def test_quarter_turn_moves_boxes_with_their_pixels(k):
    h, w, box = 30, 50, [20, 5, 41, 12]
    t = Rot90Transform(k, h, w)
    img = t.apply_image(_filled(h, w, [box]))
    assert img.shape[:2] == ((w, h) if k % 2 else (h, w))
    # the box the transform computes is the extent of the rotated white pixels
    assert t.apply_box(np.array([box], float))[0].tolist() == _extent(img[:, :, 0])
    # inverse() undoes image and boxes exactly
    inv = t.inverse()
    assert np.array_equal(inv.apply_image(img), _filled(h, w, [box]))
    assert inv.apply_box(t.apply_box(np.array([box], float)))[0].tolist() == box


def test_half_turn_equals_detectron2_horizontal_then_vertical_flip():
    rng = np.random.RandomState(0)
    img = rng.randint(0, 255, (24, 36, 3)).astype(np.uint8)
    boxes = np.array([[1.5, 2.0, 10.0, 20.5], [0, 0, 36, 24]])
    flips = T.TransformList([T.HFlipTransform(36), T.VFlipTransform(24)])
    t = Rot90Transform(2, 24, 36)
    assert np.array_equal(t.apply_image(img), flips.apply_image(img))
    np.testing.assert_allclose(t.apply_box(boxes), flips.apply_box(boxes))


def test_default_config_keeps_detectron2s_augmentations_only():
    cfg = tiny_cfg()
    augs = build_train_augmentations(cfg)
    assert [type(a) for a in augs] == [T.ResizeShortestEdge, T.RandomFlip]
    cfg.INPUT.EXTRA_AUG.VERTICAL_FLIP = True
    cfg.INPUT.EXTRA_AUG.ROTATE_90 = True
    cfg.INPUT.EXTRA_AUG.BRIGHTNESS = 0.2
    cfg.INPUT.EXTRA_AUG.SATURATION = 0.1
    augs = build_train_augmentations(cfg)
    assert [type(a) for a in augs] == [
        T.ResizeShortestEdge, T.RandomFlip, T.RandomFlip, RandomRot90, T.RandomBrightness,
        T.RandomSaturation,
    ]
    assert augs[2].vertical and not augs[2].horizontal
    assert (augs[4].intensity_min, augs[4].intensity_max) == (0.8, 1.2)
    cfg.INPUT.CROP.ENABLED = True  # detectron2's crop stays first, as its DatasetMapper puts it
    assert type(build_train_augmentations(cfg)[0]) is T.RandomCrop


def test_bad_jitter_is_refused_with_the_key():
    cfg = tiny_cfg()
    cfg.INPUT.EXTRA_AUG.CONTRAST = 1.5
    with pytest.raises(ValueError, match=r"INPUT.EXTRA_AUG.CONTRAST=1.5 must be in \[0, 1\)"):
        build_train_augmentations(cfg)


def test_mapper_boxes_cover_their_rectangles_after_every_augmentation(tmp_path):
    """
    End to end through detectron2's DatasetMapper: the synthetic images are noise (< 80) with
    solid rectangles; whatever flip / quarter turn / colour factor was drawn, every output box
    must lie on rectangle pixels.
    """
    records = write_images(str(tmp_path), num_images=3, size=(96, 128))
    cfg = tiny_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.EXTRA_AUG.VERTICAL_FLIP = True
    cfg.INPUT.EXTRA_AUG.ROTATE_90 = True
    cfg.INPUT.EXTRA_AUG.BRIGHTNESS = 0.1
    mapper = DatasetMapper(cfg, True, augmentations=build_train_augmentations(cfg))
    shapes = set()
    np.random.seed(0)
    for _ in range(12):
        for rec in records:
            out = mapper(dict(rec))
            img = out["image"].permute(1, 2, 0).numpy()
            shapes.add(img.shape[:2])
            solid = img.max(axis=2) > 150  # rectangles are one channel at 255 (x 0.9 at worst)
            for x0, y0, x1, y1 in out["instances"].gt_boxes.tensor.round().int().tolist():
                assert solid[y0:y1, x0:x1].mean() > 0.9
    assert shapes == {(96, 128), (128, 96)}  # quarter turns happened, and none happened
