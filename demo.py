#!/usr/bin/env python
"""
Detect objects with a trained focal_det checkpoint: images in, pictures with boxes and a JSON of
detections out.

    python demo.py --weights output/demo/model_final.pth --input photo.png --output out/
    python demo.py --weights output/demo/model_final.pth --input 'tiles/*.png' more/ --output out/
    # an exported model (tools/export_model.py; docs/deployment.md): same detections
    python demo.py --backend onnxruntime --weights exported/model.onnx --input tiles/ --output out/
    python demo.py --backend torchscript --weights exported/model.ts --input tiles/ --output out/

``--input`` takes image files, folders (their .png/.jpg/.jpeg/.tif/.tiff/.bmp files) and glob
patterns. The config defaults to the ``config.yaml`` that training (or the export tool) saved
next to ``--weights``.
Images are processed at the config's test size (the demo config: longest side 256 px, the 0.64
scale of its 400 px tiles at NEON's 10 cm/pixel; its anchors are 16-406 px at that size, for
crowns of ~8-100 px; keep the scale for larger images, e.g. INPUT.MIN_SIZE_TEST 640
INPUT.MAX_SIZE_TEST 640 for 1000 px tiles). The demo model's measured val AP: docs/demo.md.
Writes ``<output>/<image name>.png`` (detections with score >= --confidence-threshold drawn) and
``<output>/detections.json``. An image that cannot be read is skipped with a warning (listed
under "skipped" in the JSON); 16-bit grayscale images are scaled to 8 bits.
"""

import argparse
import glob
import json
import logging
import sys
from pathlib import Path

import cv2
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import focal_det  # noqa: F401  (registers FocalRetinaNet, the MobileNetV2-FPN, the datasets)
from focal_det import add_focal_config
from focal_det.checkpoint import CheckpointFormatError, MissingWeightsError, check_eval_weights
from focal_det.config_check import ConfigError, merge_config_file, merge_config_list
from focal_det.data.sanitize import read_image
from focal_det.demo.job import PRED_COLOR, ModelPredictor, draw_boxes
from focal_det.engine import Trainer

logger = logging.getLogger("focal_det.demo")

BACKENDS = ("pytorch", "torchscript", "onnxruntime")
WEIGHT_SUFFIXES = {"pytorch": (".pth", ".pkl"), "torchscript": (".ts",), "onnxruntime": (".onnx",)}

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def expand_inputs(inputs):
    """Image paths named by files, folders and glob patterns, in order, without duplicates."""
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found = [p]
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
        else:
            raise FileNotFoundError(f"--input {item!r}: no such file, folder or glob pattern")
        if not found:
            raise FileNotFoundError(
                f"--input {item!r} matches no image ({sorted(IMAGE_EXTENSIONS)})"
            )
        paths += [f for f in found if f not in paths]
    return paths


def load_config(weights, config_file=None, opts=()):
    """The config of ``config_file`` (default: config.yaml beside ``weights``) + ``opts``, read
    with the checked, safe merges of focal_det.config_check (not frozen)."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"--weights {weights}: no such checkpoint (train one with `make demo`)"
        )
    if config_file is None:
        config_file = weights.parent / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"No config.yaml next to {weights}; pass the training config with --config-file"
            )
    cfg = get_cfg()
    add_focal_config(cfg)
    # Checked and safe: a config.yaml from a shared model folder is data, never code.
    merge_config_file(cfg, str(config_file))
    merge_config_list(cfg, list(opts))
    return cfg


def load_model(weights, config_file=None, opts=()):
    """Build the model of ``config_file`` (default: config.yaml beside ``weights``) and load it."""
    cfg = load_config(weights, config_file, opts)
    # The checkpoint holds every weight: no ImageNet file needed to build the backbone.
    cfg.MODEL.MOBILENET.WEIGHTS = "none"
    cfg.MODEL.WEIGHTS = str(weights)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    model = build_model(cfg)
    checkpointer = Trainer.build_checkpointer(cfg, model)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    check_eval_weights(cfg, model, checkpointer, "demo.py")  # not another model's / empty weights
    model.eval()
    return model, cfg


def load_detector(backend, weights, config_file=None, opts=()):
    """
    Returns ``(detect, cfg)``: ``detect(image_rgb)`` gives CPU Instances in the image's pixels.
    ``backend`` "pytorch" takes a checkpoint; "torchscript" / "onnxruntime" the model.ts /
    model.onnx of tools/export_model.py (the same detections, docs/deployment.md).
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {BACKENDS}")
    if Path(weights).suffix.lower() not in WEIGHT_SUFFIXES[backend]:
        raise ValueError(
            f"--backend {backend} takes a {' or '.join(WEIGHT_SUFFIXES[backend])} file, got "
            f"--weights {weights}. A checkpoint (.pth) runs with --backend pytorch; export it "
            "with tools/export_model.py for torchscript (model.ts) or onnxruntime (model.onnx)."
        )
    if backend == "pytorch":
        model, cfg = load_model(weights, config_file, opts)
        predictor = ModelPredictor(cfg, model)  # detectron2's DefaultPredictor takes BGR
        return (lambda img: predictor(img[:, :, ::-1])["instances"].to("cpu")), cfg
    from focal_det.export import detect, load_runner

    cfg = load_config(weights, config_file, opts)
    cfg.freeze()
    runner = load_runner(backend, str(weights))
    return (lambda img: detect(runner, cfg, img)), cfg


def run(weights, inputs, output, config_file=None, threshold=0.3, opts=(), backend="pytorch"):
    """Detect on every input image; write pictures and detections.json. Returns the JSON dict."""
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(
            f"--output {output} is a file: give a folder (created if missing) for the pictures "
            "and detections.json"
        )
    detect, cfg = load_detector(backend, weights, config_file, opts)
    paths = expand_inputs(inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = (
        MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None)
        if cfg.DATASETS.TEST
        else None
    )
    result = {"weights": str(weights), "score_threshold": threshold, "images": [], "skipped": []}
    used = set()
    for path in paths:
        try:
            img = read_image(str(path), format="RGB")
        except Exception as e:  # one bad file must not cost the detections of the others
            logger.warning(f"Skipping {path}: it could not be read ({type(e).__name__}: {e})")
            result["skipped"].append({"file": str(path), "error": f"{type(e).__name__}: {e}"})
            continue
        inst = detect(img)
        keep = inst.scores >= threshold
        boxes, scores = inst.pred_boxes.tensor[keep], inst.scores[keep]
        classes = inst.pred_classes[keep]
        name = path.stem
        while name in used:  # same file name in two folders
            name += "_"
        used.add(name)
        picture = out_dir / f"{name}.png"
        drawn = draw_boxes(
            img,
            boxes.numpy(),
            PRED_COLOR,
            f"{path.name}: {len(boxes)} detections",
            scores=scores.tolist(),
        )
        cv2.imwrite(str(picture), drawn[:, :, ::-1])
        dets = []
        for b, s, c in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
            det = {"bbox_xyxy": [round(v, 2) for v in b], "score": round(s, 4), "category_id": c}
            if names:
                det["category"] = names[c]
            dets.append(det)
        result["images"].append(
            {
                "file": str(path),
                "picture": str(picture),
                "height": img.shape[0],
                "width": img.shape[1],
                "detections": dets,
            }
        )
        print(f"{path}: {len(dets)} detections -> {picture}", flush=True)
    with open(out_dir / "detections.json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out_dir / 'detections.json'}")
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable image(s): see the warnings above")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="checkpoint (output/demo/model_final.pth), or model.ts / model.onnx of "
        "tools/export_model.py with --backend torchscript / onnxruntime",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="pytorch")
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders, globs")
    parser.add_argument("--output", required=True, help="folder for pictures + detections.json")
    parser.add_argument("--config-file", default=None, help="default: config.yaml beside --weights")
    parser.add_argument("--confidence-threshold", type=float, default=0.3)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    setup_logger(name="focal_det")  # its warnings (skipped images) formatted as detectron2's
    try:
        result = run(
            args.weights,
            args.input,
            args.output,
            args.config_file,
            args.confidence_threshold,
            args.opts,
            args.backend,
        )
    except (FileNotFoundError, NotADirectoryError, ConfigError, ValueError, MissingWeightsError,
            CheckpointFormatError) as e:  # fmt: skip  (ValueError: --backend vs --weights)
        parser.error(str(e))
    return 0 if result["images"] or not result["skipped"] else 1  # 1: no image was readable


if __name__ == "__main__":
    sys.exit(main())
