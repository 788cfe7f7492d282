"""
A tiny synthetic detection dataset for engine tests: images of noise with solid rectangles of
3 colours (one class per colour), written as PNG files and registered in detectron2's
DatasetCatalog. Registration is per process, so distributed workers call it again.
"""
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

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
        Image.fromarray(img).save(path)
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
