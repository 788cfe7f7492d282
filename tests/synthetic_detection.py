"""
A tiny synthetic detection dataset for engine tests: images of noise with solid rectangles of
3 colours (one class per colour), written as PNG files and registered in detectron2's
DatasetCatalog. Registration is per process, so distributed workers call it again.
"""
import os

import numpy as np
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from focal_det import add_focal_config

CLASSES = ["red", "green", "blue"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def write_images(root, num_images=6, size=(128, 160), seed=0):
    """Write ``num_images`` PNGs under ``root``; returns the list of detectron2 dataset dicts."""
    rng = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)
    h, w = size
    records = []
    for i in range(num_images):
        img = rng.randint(0, 80, size=(h, w, 3)).astype(np.uint8)
        annos = []
        for _ in range(2):
            cls = int(rng.randint(len(CLASSES)))
            bw, bh = int(rng.randint(30, 70)), int(rng.randint(30, 70))
            x0, y0 = int(rng.randint(0, w - bw)), int(rng.randint(0, h - bh))
            img[y0 : y0 + bh, x0 : x0 + bw] = COLOURS[cls]
            annos.append(
                {
                    "bbox": [x0, y0, x0 + bw, y0 + bh],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": cls,
                    "iscrowd": 0,
                }
            )
        path = os.path.join(root, f"{i:04d}.png")
        # Atomic: spawned ranks of a distributed test write the same files while others read.
        tmp = f"{path}.{os.getpid()}.tmp"
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, path)
        records.append(
            {"file_name": path, "image_id": i, "height": h, "width": w, "annotations": annos}
        )
    return records


def register(name, root, num_images=6):
    """Register ``name`` (idempotent) with images written under ``root``."""
    if name in DatasetCatalog.list():
        return
    records = write_images(root, num_images=num_images)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=list(CLASSES))


def tiny_cfg(
    meta_arch="FocalRetinaNet", fpn_channels=32, smallest_anchor=32, num_classes=3, pixel_std=None
):
    """
    A tiny from-scratch config for tests: ResNet-18-ish with BN (random init with FrozenBN NaNs)
    and 64-ch res2, FPN ``fpn_channels`` wide, 1 conv per subnet, 3 scales x 3 ratios of anchors
    from ``smallest_anchor`` px on P3, ``num_classes`` classes.
    """
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = meta_arch
    cfg.MODEL.DEVICE = "cpu"
    if pixel_std is not None:
        cfg.MODEL.PIXEL_STD = list(pixel_std)
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = fpn_channels
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [
        [x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in [smallest_anchor * 2**i for i in range(5)]
    ]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    return cfg


def random_detector(cfg, seed=0, head_std=0.05):
    """
    ``build_model(cfg)`` in eval mode with random weights and the head's weights redrawn from
    N(0, head_std): the prior-probability init scores every anchor ~0.01 (nothing over the 0.05
    threshold); this gives hundreds of candidates per image with varied scores.
    """
    import torch
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * head_std)
    return model.eval()
