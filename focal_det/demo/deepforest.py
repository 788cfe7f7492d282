"""
The demo dataset: tree crowns in aerial RGB images, built from the ``deepforest`` wheel on PyPI.

``deepforest`` (MIT; imagery from NEON, public domain) ships four annotated images in
``deepforest/data/`` with human-drawn crown boxes in Pascal VOC XML. We download its wheel
(hash-pinned, never installed), cut the two large crops into overlapping 400 px tiles, clip the
boxes to each tile, and write one COCO-format JSON per split. The split is by *source image*, so
no validation tile overlaps a training tile: validation is the whole 1249x1035 Yellowstone crop,
training is the other three images (the 2299x2472 Yellowstone crop, OSBS_029 and SOAP_061).

Single class "tree": OSBS and both Yellowstone crops label every crown "Tree"; only SOAP_061 splits
its 37 crowns into Dead (28) / Alive (9). Nine "Alive" boxes in one training image cannot teach a
health classifier, and there would be no val example of either; a crown is a crown, so all three
names map to "tree" (the class deepforest's own release model predicts).

Tree crowns are small (8-107 px, median ~40 px) and dense (hundreds per image): exactly the
foreground-background imbalance the focal loss addresses.

    python -m focal_det.demo --dataset-only   # build (or reuse) it; print what was written
"""

import fcntl
import io
import json
import logging
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image

from .wheels import fetch_pinned_wheel, read_wheel_member

__all__ = [
    "DEEPFOREST_SOURCES",
    "DEEPFOREST_SPLITS",
    "build_deepforest_trees",
    "deepforest_trees_root",
    "register_deepforest_trees",
    "tile_starts",
    "tile_boxes",
]

logger = logging.getLogger(__name__)

DEEPFOREST_WHEEL = (
    "deepforest",
    "1.5.2",
    "705f08a80f33514044010865f61eefe5037d5492055c47574d213db74bebdf25",
)
# Source image stem (deepforest/data/<stem>.png + .xml) -> split. Order fixes the image ids.
DEEPFOREST_SOURCES = {
    "2019_YELL_2_528000_4978000_image_crop2": "train",  # 2299x2472, 574 crowns
    "OSBS_029": "train",  # 400x400, 61 crowns
    "SOAP_061": "train",  # 400x400, 37 crowns (Dead/Alive)
    "2019_YELL_2_541000_4977000_image_crop": "val",  # 1249x1035, 279 crowns
}
# Registered dataset name -> split (a JSON file of the build).
DEEPFOREST_SPLITS = {
    "deepforest_trees_train": "train",
    "deepforest_trees_val": "val",
    "deepforest_trees_trainsub": "trainsub",
    "deepforest_trees_holdout": "holdout",
}
# Model selection never looks at val: settings are chosen by training on "trainsub" and
# evaluating on "holdout", two disjoint parts of the train split. The holdout is the bottom
# band (y >= 1776 px, about 28% of the height) of the large training crop: its tiles lie wholly
# inside the band, and trainsub keeps the train tiles that lie wholly above it (the tiles that
# straddle the line are in neither), so no holdout pixel is ever trained on.
HOLDOUT_SOURCE = "2019_YELL_2_528000_4978000_image_crop2"
HOLDOUT_FROM_Y = 1776
# Every VOC label in the wheel's files is a tree crown (see the module docstring).
LABEL_TO_CATEGORY = {"Tree": "tree", "Dead": "tree", "Alive": "tree"}
CATEGORIES = [{"id": 1, "name": "tree", "supercategory": "plant"}]

# Bump when the build's output changes for the same parameters: invalidates cached builds.
_BUILD_FORMAT = 3
_DEFAULT_PARAMS = {
    "tile_size": 400,  # the size of the two 400x400 images; ~40 px crowns stay ~40 px
    "min_overlap": 100,  # > the largest crown (107 px), so every crown is whole in some tile
    "min_visible": 0.4,  # keep a clipped crown if >= 40% of its area is in the tile ...
    "min_side": 6,  # ... and both clipped sides are >= 6 px; thinner strips are slivers
}


def deepforest_trees_root(root=None):
    """``<root>/deepforest_trees``; root defaults to $DETECTRON2_DATASETS, else ./datasets."""
    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    return Path(root) / "deepforest_trees"


def tile_starts(length, tile_size, min_overlap):
    """
    Offsets of the fewest evenly spaced tiles of ``tile_size`` that cover ``[0, length)`` with
    neighbours overlapping by at least ``min_overlap`` px. The first tile starts at 0, the last
    ends at ``length``; one tile at 0 if ``length <= tile_size``.
    """
    if length <= tile_size:
        return [0]
    n = math.ceil((length - tile_size) / (tile_size - min_overlap)) + 1
    return [int(round(v)) for v in np.linspace(0, length - tile_size, n)]


def tile_boxes(boxes, tile, min_visible, min_side):
    """
    Clip XYXY ``boxes`` (M, 4) to ``tile`` = (x0, y0, x1, y1) and shift them into its frame.

    Returns:
        (K, 4) float array of kept boxes in tile coordinates, and the (K,) indices into ``boxes``.
        A box is kept if at least ``min_visible`` of its area lies in the tile and both clipped
        sides are at least ``min_side`` px.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = tile
    clipped = np.stack(
        [
            boxes[:, 0].clip(x0, x1),
            boxes[:, 1].clip(y0, y1),
            boxes[:, 2].clip(x0, x1),
            boxes[:, 3].clip(y0, y1),
        ],
        axis=1,
    )
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (w >= min_side) & (h >= min_side) & (w * h >= min_visible * area)
    idx = np.nonzero(keep)[0]
    return clipped[idx] - np.array([x0, y0, x0, y0], dtype=np.float64), idx


def _parse_voc(xml_bytes, stem):
    """(width, height, (M, 4) XYXY boxes, [label names]) of one Pascal VOC file."""
    root = ET.fromstring(xml_bytes)
    size = root.find("size")
    width, height = int(size.find("width").text), int(size.find("height").text)
    boxes, labels = [], []
    for obj in root.findall("object"):
        name = obj.find("name").text
        if name not in LABEL_TO_CATEGORY:
            raise ValueError(
                f"{stem}.xml has a box labelled {name!r}; known labels: "
                f"{sorted(LABEL_TO_CATEGORY)}. Add it to LABEL_TO_CATEGORY in {__file__}."
            )
        bb = obj.find("bndbox")
        boxes.append([float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(name)
    return width, height, np.array(boxes, dtype=np.float64).reshape(-1, 4), labels


def _holdout_splits(train):
    """
    {"trainsub": ..., "holdout": ...}: the COCO dicts of the train split's tiles above and
    inside the holdout band (see HOLDOUT_FROM_Y). Image and annotation ids are kept, so the
    tiles are the same files as in "train".
    """
    def band(im):
        if im["source_image"] != HOLDOUT_SOURCE:
            return "trainsub"
        y0, y1 = im["source_xyxy"][1], im["source_xyxy"][3]
        if y0 >= HOLDOUT_FROM_Y:
            return "holdout"
        return "trainsub" if y1 <= HOLDOUT_FROM_Y else None  # straddles the line: neither

    out = {}
    for split in ("trainsub", "holdout"):
        images = [im for im in train["images"] if band(im) == split]
        ids = {im["id"] for im in images}
        anns = [a for a in train["annotations"] if a["image_id"] in ids]
        out[split] = {"images": images, "annotations": anns, "categories": CATEGORIES}
    return out


def _build(out_dir, wheel, sources, params):
    """Write images/ and annotations/{split}.json under out_dir; return per-split counts."""
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True)
    (out_dir / "annotations").mkdir()
    splits = sorted(set(sources.values()))
    coco = {s: {"images": [], "annotations": [], "categories": CATEGORIES} for s in splits}
    image_id = ann_id = 0
    for stem, split in sources.items():
        width, height, boxes, _ = _parse_voc(
            read_wheel_member(wheel, f"deepforest/data/{stem}.xml"), stem
        )
        image = Image.open(io.BytesIO(read_wheel_member(wheel, f"deepforest/data/{stem}.png")))
        image = image.convert("RGB")
        if image.size != (width, height):
            raise ValueError(f"{stem}.png is {image.size}, but its XML says {(width, height)}")
        # VOC boxes here are pixel-edge coordinates in [0, W] x [0, H]; a few touch the border.
        boxes = boxes.clip(0, [width, height, width, height])
        size = params["tile_size"]
        for y0 in tile_starts(height, size, params["min_overlap"]):
            for x0 in tile_starts(width, size, params["min_overlap"]):
                x1, y1 = min(x0 + size, width), min(y0 + size, height)
                tile_xyxy, _ = tile_boxes(
                    boxes, (x0, y0, x1, y1), params["min_visible"], params["min_side"]
                )
                image_id += 1
                file_name = f"{stem}_x{x0}_y{y0}.png"
                # Uncompressed PNG (same pixels): much faster to decode, and the demo's loader
                # decodes 16 tiles per iteration in the training process.
                image.crop((x0, y0, x1, y1)).save(img_dir / file_name, compress_level=0)
                coco[split]["images"].append(
                    {
                        "id": image_id,
                        "file_name": file_name,
                        "width": x1 - x0,
                        "height": y1 - y0,
                        # Provenance, so anyone can check the split is by source image.
                        "source_image": stem,
                        "source_xyxy": [x0, y0, x1, y1],
                    }
                )
                for b in tile_xyxy:
                    ann_id += 1
                    w, h = float(b[2] - b[0]), float(b[3] - b[1])
                    coco[split]["annotations"].append(
                        {
                            "id": ann_id,
                            "image_id": image_id,
                            "category_id": 1,
                            "bbox": [float(b[0]), float(b[1]), w, h],
                            "area": w * h,
                            "iscrowd": 0,
                        }
                    )
    if "train" in coco:
        coco.update(_holdout_splits(coco["train"]))
    counts = {}
    for split, data in coco.items():
        with open(out_dir / "annotations" / f"{split}.json", "w") as f:
            json.dump(data, f, sort_keys=True)
        counts[split] = {"images": len(data["images"]), "boxes": len(data["annotations"])}
    return counts


def build_deepforest_trees(root=None, sources=None, force=False, **params):
    """
    Build (or reuse) the tiled COCO-format dataset under ``deepforest_trees_root(root)``.

    Args:
        root: datasets folder (default $DETECTRON2_DATASETS, else ./datasets).
        sources: {image stem: split}; default DEEPFOREST_SOURCES (tests pass a subset).
        force: rebuild even if a build with the same parameters exists.
        params: overrides of tile_size / min_overlap / min_visible / min_side.

    Returns:
        dict with "root" (Path), "counts" ({split: {"images": n, "boxes": m}}) and "reused".
        The build is deterministic; it is cached by its parameters and the wheel's hash, and a
        lock makes concurrent callers wait for one build.
    """
    unknown = set(params) - set(_DEFAULT_PARAMS)
    if unknown:
        raise TypeError(
            f"Unknown build parameters {sorted(unknown)}; known: {sorted(_DEFAULT_PARAMS)}"
        )
    sources = dict(DEEPFOREST_SOURCES if sources is None else sources)
    for stem in sources:
        if stem not in DEEPFOREST_SOURCES:
            raise ValueError(f"Unknown source image {stem!r}; known: {list(DEEPFOREST_SOURCES)}")
    if set(sources.values()) - {"train", "val"}:
        raise ValueError(f"splits must be 'train' or 'val', got {sorted(set(sources.values()))}")
    params = {**_DEFAULT_PARAMS, **params}
    if not 0 <= params["min_overlap"] < params["tile_size"]:
        raise ValueError(f"need 0 <= min_overlap < tile_size, got {params}")
    name, version, sha256 = DEEPFOREST_WHEEL
    key = {"format": _BUILD_FORMAT, "wheel_sha256": sha256, "sources": sources, "params": params}

    out_dir = deepforest_trees_root(root)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    info_file = out_dir / "build_info.json"
    with open(out_dir.parent / ".deepforest_trees.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and info_file.is_file():
            info = json.loads(info_file.read_text())
            if info.get("key") == key:
                return {"root": out_dir, "counts": info["counts"], "reused": True}
        wheel = fetch_pinned_wheel(name, version, sha256)
        logger.info(f"Building the deepforest tree-crown dataset in {out_dir} from {wheel.name}")
        # Build next to the target and swap it in, so a crash never leaves half a dataset.
        tmp = Path(tempfile.mkdtemp(prefix=".deepforest_trees.", dir=out_dir.parent))
        try:
            counts = _build(tmp, wheel, sources, params)
            (tmp / "build_info.json").write_text(
                json.dumps({"key": key, "counts": counts}, indent=1)
            )
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for split, c in counts.items():
        logger.info(f"deepforest_trees_{split}: {c['images']} tiles, {c['boxes']} boxes")
    return {"root": out_dir, "counts": counts, "reused": False}


def _load_split(name, root, sources, params):
    out_dir = build_deepforest_trees(root, sources, **params)["root"]
    split = DEEPFOREST_SPLITS[name]
    return load_coco_json(
        str(out_dir / "annotations" / f"{split}.json"), str(out_dir / "images"), name
    )


def register_deepforest_trees(root=None, sources=None, **params):
    """
    Register ``deepforest_trees_train`` / ``deepforest_trees_val`` in DatasetCatalog and
    MetadataCatalog. The same as detectron2's ``register_coco_instances`` (COCO JSON, metadata
    with json_file / image_root / evaluator_type="coco"), except that the loader builds the
    dataset first if it is not there yet, so ``train_net.py`` works on a fresh clone.
    Re-registering (e.g. with another root) replaces the entries. ``sources`` and ``params``
    are passed to :func:`build_deepforest_trees` (tests register a small subset).
    """
    out_dir = deepforest_trees_root(root)
    root = str(out_dir.parent)  # resolved now: the catalog entries must not move with the env
    for name, split in DEEPFOREST_SPLITS.items():
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda name=name: _load_split(name, root, sources, params))
        MetadataCatalog.get(name).set(
            json_file=str(out_dir / "annotations" / f"{split}.json"),
            image_root=str(out_dir / "images"),
            evaluator_type="coco",
            thing_classes=[c["name"] for c in CATEGORIES],
            builds_on_load=True,  # focal_det.data.sanitize.check_dataset_files: not missing
        )
