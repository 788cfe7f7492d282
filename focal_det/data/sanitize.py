"""
Data that is wrong in the usual ways gets a clear answer instead of a crash deep in a worker
or a silent NaN:

* ``load_dataset_dicts``: a registered dataset whose files are missing (no COCO folder, wrong
  ``DETECTRON2_DATASETS``) raises ``FileNotFoundError`` naming the path looked for, the layout
  detectron2 expects and the variable to set.
* ``drop_degenerate_boxes``: boxes with zero/negative size, non-finite coordinates, or lying
  entirely outside their image are dropped, with ONE warning counting them (per call), instead
  of an exception from ``Boxes``/the matcher or a NaN box-regression target. Images left with no
  boxes stay in the dataset when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is False: RetinaNet
  trains on them (every anchor is background, the box loss is 0).
* ``FileNamingMapper``: an image that cannot be read or decoded raises an error naming the file
  (PIL's "cannot identify image file <_io.BufferedReader ...>" or "image file is truncated"
  does not always); so does a 16-bit grayscale image, which detectron2's ``read_image`` would
  clip to 0/255 (:func:`read_image` reads it scaled to 8 bits instead: demo.py uses it).
* An annotation file that is not JSON (truncated download) is named with its dataset
  (:func:`naming_annotation_file`), instead of a bare ``JSONDecodeError``.
"""

import contextlib
import copy
import itertools
import json
import logging
import math
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = [
    "AnnotationFileError",
    "CorruptImageError",
    "UnsupportedImageError",
    "check_dataset_files",
    "FileNamingMapper",
    "drop_degenerate_boxes",
    "load_dataset_dicts",
    "missing_dataset_files_message",
    "check_image_depth",
    "naming_annotation_file",
    "read_image",
]

logger = logging.getLogger(__name__)

_COCO_LAYOUT = """\
  $DETECTRON2_DATASETS/coco/
    annotations/instances_{train,val}2017.json   (and/or instances_*2014.json, minival ...)
    {train,val}2017/                             (the image folders)"""


def missing_dataset_files_message(name, json_file=None, image_root=None):
    """The message for a registered dataset whose annotation file or image folder is absent."""
    root = os.environ.get("DETECTRON2_DATASETS")
    env = (
        f"DETECTRON2_DATASETS={root}"
        if root
        else "DETECTRON2_DATASETS is not set, so detectron2 looks under ./datasets"
    )
    missing = []
    if json_file and not os.path.isfile(json_file):
        missing.append(f"annotation file {os.path.abspath(json_file)}")
    if image_root and not os.path.isdir(image_root):
        missing.append(f"image folder {os.path.abspath(image_root)}")
    what = " and ".join(missing) if missing else "its files"
    return (
        f"Dataset '{name}': {what} not found ({env}). detectron2's builtin COCO datasets "
        f"expect this layout:\n{_COCO_LAYOUT}\nDownload COCO there, or set DETECTRON2_DATASETS "
        "to the folder that contains coco/, or register your own data with "
        "detectron2.data.datasets.register_coco_instances(name, {}, json_file, image_root)."
    )


def check_dataset_files(name):
    """
    Raise FileNotFoundError (missing_dataset_files_message) if ``name``'s files are absent.
    A dataset whose metadata says ``builds_on_load=True`` (the demo's) is skipped: its
    DatasetCatalog loader writes those files.
    """
    meta = MetadataCatalog.get(name)
    if meta.get("builds_on_load", False):
        return
    json_file = meta.get("json_file", None)
    image_root = meta.get("image_root", None)
    if (json_file and not os.path.isfile(json_file)) or (
        image_root and not os.path.isdir(image_root)
    ):
        raise FileNotFoundError(missing_dataset_files_message(name, json_file, image_root))


def _box_xyxy(ann):
    mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
    box = ann["bbox"]
    if mode == BoxMode.XYXY_ABS:
        return [float(x) for x in box]
    if mode == BoxMode.XYWH_ABS:
        x, y, w, h = (float(v) for v in box)
        return [x, y, x + w, y + h]
    return None  # relative or rotated modes: not ours to judge


def _is_degenerate(ann, width, height):
    box = ann.get("bbox")
    if box is None or len(box) != 4:
        return True
    xyxy = _box_xyxy(ann)
    if xyxy is None:
        return False
    if not all(math.isfinite(v) for v in xyxy):
        return True
    x0, y0, x1, y1 = xyxy
    if x1 <= x0 or y1 <= y0:
        return True
    if width is not None and height is not None:
        # Area left inside the image after the clipping the mapper does: none -> nothing to learn.
        if min(x1, width) <= max(x0, 0.0) or min(y1, height) <= max(y0, 0.0):
            return True
    return False


def drop_degenerate_boxes(dataset_dicts, dataset_name="dataset"):
    """
    Remove annotations whose box has zero/negative size, non-finite coordinates, or lies
    entirely outside the image (using the record's ``width``/``height``). Boxes partly outside
    are kept (the mapper clips them). Logs one warning with the counts.

    Returns:
        list[dict]: new records (the input is not modified); records with no box left are kept.
    """
    out = []
    dropped, images = 0, 0
    for rec in dataset_dicts:
        annos = rec.get("annotations")
        if not annos:
            out.append(rec)
            continue
        w, h = rec.get("width"), rec.get("height")
        keep = [a for a in annos if not _is_degenerate(a, w, h)]
        if len(keep) != len(annos):
            dropped += len(annos) - len(keep)
            images += 1
            rec = copy.copy(rec)
            rec["annotations"] = keep
        out.append(rec)
    if dropped:
        logger.warning(
            f"{dataset_name}: dropped {dropped} degenerate box(es) (zero/negative size, "
            f"non-finite, or entirely outside the image) from {images} image(s)."
        )
    return out


class AnnotationFileError(ValueError):
    """A dataset's annotation file exists but cannot be parsed."""


@contextlib.contextmanager
def naming_annotation_file(name):
    """Turn a ``JSONDecodeError`` while loading dataset ``name`` into one naming its file."""
    try:
        yield
    except json.JSONDecodeError as e:
        json_file = MetadataCatalog.get(name).get("json_file", "(no json_file in its metadata)")
        raise AnnotationFileError(
            f"Dataset '{name}': its annotation file {json_file} is not valid JSON ({e}). Is it "
            "a truncated download, or not a COCO json at all? Download or export it again."
        ) from e


def load_dataset_dicts(names, *, filter_empty=True):
    """
    detectron2's ``get_detection_dataset_dicts`` for detection datasets, with a clear error for
    missing files and degenerate boxes dropped (before empty images are filtered).
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("No dataset given: set DATASETS.TRAIN (e.g. ('coco_2017_train',)).")
    registered = set(DatasetCatalog.keys())
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise KeyError(
            f"Dataset(s) {unknown} are not registered in detectron2's DatasetCatalog. "
            f"Registered: {sorted(registered)}"
        )
    per_dataset = []
    for name in names:
        check_dataset_files(name)
        try:
            with naming_annotation_file(name):
                dicts = DatasetCatalog.get(name)
        except (FileNotFoundError, OSError) as e:
            meta = MetadataCatalog.get(name)
            raise FileNotFoundError(
                missing_dataset_files_message(
                    name, meta.get("json_file", None), meta.get("image_root", None)
                )
                + f"\n(original error: {e})"
            ) from e
        if not len(dicts):
            raise ValueError(f"Dataset '{name}' is empty.")
        per_dataset.append(drop_degenerate_boxes(dicts, name))
    dicts = list(itertools.chain.from_iterable(per_dataset))
    if filter_empty and "annotations" in dicts[0]:
        dicts = filter_images_with_only_crowd_annotations(dicts)
        if not dicts:
            raise ValueError(
                f"No image of {names} has a (non-degenerate, non-crowd) box; set "
                "DATALOADER.FILTER_EMPTY_ANNOTATIONS False to train on them anyway."
            )
    return dicts


class CorruptImageError(RuntimeError):
    """An image file could not be read or decoded."""


class UnsupportedImageError(CorruptImageError):
    """An image file that decodes, but not into something detectron2's reader handles right."""


# Single-channel PIL modes deeper than 8 bits. detectron2's read_image converts them with PIL's
# convert("RGB"), which clips every value above 255: a 16-bit image comes out nearly binary.
# (16-bit RGB/RGBA PNGs are fine: PIL itself opens them as 8-bit "RGB"/"RGBA".)
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_DEEP_MODES = _16BIT_MODES + ("I", "F")
_NEVER_DEEP = (".jpg", ".jpeg")  # baseline JPEG is 8-bit: no header to peek at


def _is_16bit(image):
    # A PNG has no 32-bit grayscale: mode "I" from a PNG (older Pillow) is 16-bit data.
    return image.mode in _16BIT_MODES or (image.mode == "I" and image.format == "PNG")


def _deep_image_message(file_name, mode):
    return (
        f"'{file_name}' is a single-channel image with more than 8 bits per pixel (PIL mode "
        f"{mode}), which detectron2's read_image (used by the train/test mappers) would clip to "
        "0..255, binarising it."
    )


def check_image_depth(file_name):
    """
    Raise :class:`UnsupportedImageError` if ``file_name`` is a 16/32-bit single-channel image
    (only its header is read).
    """
    if file_name.lower().endswith(_NEVER_DEEP):
        return
    with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
        mode = image.mode
    if mode in _DEEP_MODES:
        raise UnsupportedImageError(
            _deep_image_message(file_name, mode) + " Convert it to 8 bits first, e.g. "
            "`PIL.Image.fromarray(focal_det.data.sanitize.read_image(path, 'L')[..., 0])"
            ".save(new_path)` (scales 16 bits to 8, as demo.py reads such images), and point the "
            "annotations at the converted file."
        )


def read_image(file_name, format="RGB"):
    """
    detectron2's ``read_image``, except that a 16-bit grayscale image (PNG, TIFF) is scaled to
    8 bits (``value >> 8``, as PIL reduces 16-bit RGB PNGs) instead of clipped to 0/255.

    Returns:
        np.ndarray: (H, W, C) uint8 in ``format``.

    Raises:
        UnsupportedImageError: for 32-bit integer or float images, whose range is unknown.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        if image.mode not in _DEEP_MODES:
            image.close()
            return d2_utils.read_image(file_name, format=format)
        if not _is_16bit(image):
            raise UnsupportedImageError(
                _deep_image_message(file_name, image.mode) + " Its value range is unknown: "
                "convert it to an 8-bit image first."
            )
        image = d2_utils._apply_exif_orientation(image)
        gray = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return d2_utils.convert_PIL_to_numpy(Image.fromarray(gray.astype(np.uint8), "L"), format)


class FileNamingMapper:
    """
    Wrap a dataset mapper so that any failure to read/decode/transform an image raises an
    error that names the file, and a 16-bit grayscale image is refused
    (:func:`check_image_depth`) rather than clipped. The wrapped mapper's result is returned
    unchanged.
    """

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        try:
            if "file_name" in dataset_dict:
                check_image_depth(dataset_dict["file_name"])
            return self.mapper(dataset_dict)
        except CorruptImageError:
            raise
        except Exception as e:
            name = dataset_dict.get("file_name", "<no file_name>")
            raise CorruptImageError(
                f"Could not load image '{name}' (image_id={dataset_dict.get('image_id')}): "
                f"{type(e).__name__}: {e}. Check that the file exists and is a complete "
                "image; remove it from the annotations or replace it."
            ) from e
