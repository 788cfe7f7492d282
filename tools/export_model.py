#!/usr/bin/env python
"""
Export a trained focal_det RetinaNet to TorchScript or ONNX (detectron2's tools/deploy/
export_model.py conventions), as a graph whose shapes follow the input (docs/deployment.md).

    python tools/export_model.py --config-file output/demo/config.yaml --format onnx \\
        --output exported/ MODEL.WEIGHTS output/demo/model_final.pth

Writes OUTPUT/model.onnx (or OUTPUT/model.ts) and OUTPUT/config.yaml (the config used, which
demo.py reads next to --weights), then checks the exported graph against the eager model on the
sample and on a second, differently sized image.

What the exported graph takes and returns:
  input   image (3, H, W) float32, channels in the config's INPUT.FORMAT, pixel values 0-255,
          any H and W, ALREADY RESIZED as the config's test resize would
          (ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST), e.g.
          focal_det.export.resize_for_test). No batch dimension.
  output  boxes (R, 4) float32 XYXY in that input's pixels (clipped to it), scores (R,) float32
          (descending), classes (R,) int64; R <= TEST.DETECTIONS_PER_IMAGE. Scale the boxes by
          original / resized size to get the original image's pixels (demo.py does).

--sample-image: an image to trace with (default: random noise of the config's test size). The
graph does not depend on it; the check after export uses it.
"""
import argparse
import logging
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

# The focal_det of this checkout (an editable install may point at another one).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import focal_det  # noqa: E402,F401  (registers FocalRetinaNet, the backbones)
from focal_det.engine import Trainer, load_config  # noqa: E402
from focal_det.export import (  # noqa: E402
    EagerRunner,
    export_retinanet,
    load_runner,
    resize_for_test,
)
from focal_det.export.exporters import FORMATS, compare_detections  # noqa: E402

logger = logging.getLogger("focal_det.export")


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--sample-image", default=None, help="image to export with (optional)")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the exported-vs-eager comparison"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (MODEL.WEIGHTS)"
    )
    return parser


def setup_cfg(args):
    """The checked config of the export: CPU, no torch.compile, the checkpoint's weights only."""
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.FOCAL.COMPILE_HEAD:
        logger.warning("MODEL.FOCAL.COMPILE_HEAD: off for export (a compiled head cannot be "
                       "traced; same numbers).")
        cfg.MODEL.FOCAL.COMPILE_HEAD = False
    if cfg.MODEL.WEIGHTS:
        # The checkpoint holds every weight: no ImageNet file needed to build the backbone.
        cfg.MODEL.MOBILENET.WEIGHTS = "none"
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights.")
    cfg.freeze()
    return cfg


def sample_input(cfg, path=None, seed=0):
    """(3, H, W) float32 test-resized input from ``path``, or random noise of a 480x640 image."""
    if path:
        image = read_image(path, format="RGB")
    else:
        image = np.random.RandomState(seed).randint(0, 256, (480, 640, 3), dtype=np.uint8)
    return resize_for_test(cfg, image).to(torch.float32)


def check_export(model, path, fmt, sample):
    """Exported vs eager on ``sample`` and on it resized to another, non-/32 shape."""
    runner = load_runner("torchscript" if fmt == "torchscript" else "onnxruntime", path)
    eager = EagerRunner(model)
    h, w = sample.shape[-2:]
    other = F.interpolate(sample[None], size=(max(h * 3 // 4 + 5, 8), max(w - 19, 8)),
                          mode="bilinear", align_corners=False)[0].round()
    results = []
    for image in (sample, other):
        res = compare_detections(runner(image), eager(image))
        res["size"] = tuple(image.shape[-2:])
        results.append(res)
    return results


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="focal_det")
    setup_logger()
    cfg = setup_cfg(args)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        Trainer.build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    sample = sample_input(cfg, args.sample_image)
    logger.info(f"Exporting {type(model).__name__} to {args.format} with a "
                f"{tuple(sample.shape)} sample (INPUT.FORMAT {cfg.INPUT.FORMAT}) ...")
    path = export_retinanet(model, sample, args.format, args.output)
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    logger.info(f"Wrote {path} and {os.path.join(args.output, 'config.yaml')}")
    if args.no_check:
        return path
    ok = True
    for r in check_export(model, path, args.format, sample):
        logger.info(
            f"check at {r['size'][0]}x{r['size'][1]}: {r['count']} detections exported, "
            f"{r['ref_count']} eager; max |box diff| {r['max_box_diff']} px, max |score diff| "
            f"{r['max_score_diff']}"
        )
        ok &= r["ok"]
    if not ok:
        logger.error("The exported graph does not give the eager model's detections (above).")
        sys.exit(1)
    return path


if __name__ == "__main__":
    main()
