"""
The README's main job (``make demo``): a RetinaNet trained with the focal loss on real images,
on a CPU, in minutes, evaluated with COCO AP, with pictures of what it detects.

    python -m focal_det.demo [--config-file FILE] [--output-dir DIR] [KEY VALUE ...]
    python -m focal_det.demo --dataset-only   # only build (or reuse) the dataset

1. builds (or reuses) the tree-crown dataset from the ``deepforest`` wheel on PyPI
   (``focal_det.demo.deepforest``: 66 train tiles / 16 val tiles of 400 px, split by source
   image; and the trainsub / holdout splits the recipe was chosen on);
2. trains ``configs/demo/retinanet_mobilenet_v2_trees.yaml`` (FocalRetinaNet, FL gamma 2 alpha .25,
   ImageNet MobileNetV2-FPN P2-P6 with anchors 16-406 px at 4x each stride; 800 iterations of 16
   random 200 px crops, resized by 0.64 like the test tiles) with ``train_net.py``'s Trainer
   (focal_det.engine): detectron2's log with iteration, losses and ETA, TensorBoard events,
   ``metrics.json``;
3. evaluates the val split with the COCO evaluator (progress logged);
4. writes ``demo_results.json`` (AP, AP50, ..., dataset sizes, times) and, in ``val_predictions/``,
   PNGs of val tiles with the ground truth (left) beside the predictions (right).

Trailing ``KEY VALUE`` pairs override the config (e.g. ``SOLVER.MAX_ITER 50``). Measured on 2 CPU
threads: box AP50 46.1, AP 14.3 on val in about 5 minutes (docs/demo.md, with the command).
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor, default_argument_parser
from detectron2.structures import BoxMode
from detectron2.utils.visualizer import Visualizer

from ..engine import Trainer, setup
from ..model_zoo import get_config_file
from .deepforest import build_deepforest_trees, register_deepforest_trees

__all__ = ["ModelPredictor", "run_demo", "draw_boxes", "side_by_side", "main", "DEFAULT_CONFIG"]

logger = logging.getLogger("focal_det.demo")

# Through the model zoo, which also finds the configs of a non-editable install.
DEFAULT_CONFIG = get_config_file("demo/retinanet_mobilenet_v2_trees.yaml")
GT_COLOR = (0.1, 0.9, 0.1)  # green: ground truth
PRED_COLOR = (1.0, 0.2, 0.6)  # magenta: predictions


def _say(msg):
    print(f"[demo] {msg}", flush=True)


def draw_boxes(image_rgb, boxes, color, caption, scores=None):
    """
    Draw XYXY ``boxes`` (M, 4) on an (H, W, 3) uint8 RGB image with detectron2's Visualizer,
    with ``caption`` in a band above the image. Returns an (H + band, W, 3) uint8 RGB image.
    Scores, if given, are written in each box's corner when there are few boxes.
    """
    vis = Visualizer(image_rgb, scale=1.0)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = None
    if scores is not None and len(boxes) <= 30:  # more than that is unreadable on 400 px
        labels = [f"{s:.2f}" for s in scores]
    if len(boxes):
        vis.overlay_instances(boxes=boxes, labels=labels, assigned_colors=[color] * len(boxes))
    out = vis.get_output().get_image()
    band = np.full((28, out.shape[1], 3), 255, np.uint8)
    cv2.putText(band, caption, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, out], axis=0)


def side_by_side(*images, gap=8):
    """Concatenate same-height RGB images left to right with a white gap."""
    h = max(im.shape[0] for im in images)
    parts = []
    for i, im in enumerate(images):
        if im.shape[0] < h:
            im = np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)), constant_values=255)
        parts.append(im)
        if i < len(images) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


class ModelPredictor(DefaultPredictor):
    """
    detectron2's ``DefaultPredictor`` (its ``__call__``: a BGR image, the test resize,
    ``INPUT.FORMAT``, no_grad) around a model already built and loaded: the one just trained, or
    the one demo.py loaded with focal_det's checkpointer. (``DefaultPredictor.__init__`` would
    build another model and load ``MODEL.WEIGHTS`` with detectron2's checkpointer.)
    """

    def __init__(self, cfg, model):
        self.cfg, self.model, self.input_format = cfg, model, cfg.INPUT.FORMAT
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)


def write_val_pictures(model, cfg, dataset_name, out_dir, num, score_thresh):
    """PNG per val tile: ground truth (left) beside predictions with score >= thresh (right)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    predictor = ModelPredictor(cfg, model.eval())
    written = []
    for d in DatasetCatalog.get(dataset_name)[:num]:
        img = read_image(d["file_name"], format="RGB")
        gt = np.array(
            [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in d["annotations"]
            ],
            np.float32,
        ).reshape(-1, 4)
        inst = predictor(img[:, :, ::-1])["instances"].to("cpu")
        keep = inst.scores >= score_thresh
        left = draw_boxes(img, gt, GT_COLOR, f"ground truth: {len(gt)} crowns")
        right = draw_boxes(
            img,
            inst.pred_boxes.tensor[keep].numpy(),
            PRED_COLOR,
            f"predicted: {int(keep.sum())} (score >= {score_thresh})",
            scores=inst.scores[keep].tolist(),
        )
        path = out_dir / (Path(d["file_name"]).stem + ".png")
        cv2.imwrite(str(path), side_by_side(left, right)[:, :, ::-1])
        written.append(path)
    model.train(was_training)
    return written


def run_demo(
    config_file=DEFAULT_CONFIG,
    output_dir="output/demo",
    opts=(),
    datasets_root=None,
    sources=None,
    num_vis=16,
    vis_thresh=0.3,
    resume=False,
):
    """
    The whole job (see the module docstring). ``datasets_root`` / ``sources`` select where the
    dataset is built and from which source images (tests use a small subset). ``resume``
    continues an interrupted run from ``<output_dir>/last_checkpoint`` (detectron2's --resume).

    Returns:
        the dict written to ``<output_dir>/demo_results.json``.
    """
    t_start = time.perf_counter()
    _say("1/4 dataset: deepforest tree crowns (PyPI wheel deepforest==1.5.2, hash-pinned)")
    if datasets_root is not None or sources is not None:
        register_deepforest_trees(datasets_root, sources)
    built = build_deepforest_trees(datasets_root, sources)
    for split, c in built["counts"].items():
        _say(
            f"    deepforest_trees_{split}: {c['images']} tiles, {c['boxes']} boxes "
            f"({built['root']})"
        )

    args = default_argument_parser().parse_args(
        ["--config-file", str(config_file), *opts, "OUTPUT_DIR", str(output_dir)]
    )
    cfg = setup(args)  # train_net.py's setup: config, logging to OUTPUT_DIR/log.txt, seed
    _say(
        f"2/4 training {cfg.MODEL.META_ARCHITECTURE} ({cfg.MODEL.FOCAL.LOSS.NAME}, gamma "
        f"{cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA}, alpha {cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA}) on "
        f"{cfg.MODEL.BACKBONE.NAME} for {cfg.SOLVER.MAX_ITER} iterations of "
        f"{cfg.SOLVER.IMS_PER_BATCH} images, {torch.get_num_threads()} CPU threads; "
        f"log every 20 iterations (losses, ETA)"
    )
    if cfg.MODEL.BACKBONE.NAME == "build_mobilenet_v2_fpn_backbone" and not cfg.MODEL.WEIGHTS:
        _say(
            "    (detectron2 will say 'Initializing model from scratch': that is the head and "
            "FPN; the MobileNetV2 is ImageNet-pretrained, from MODEL.MOBILENET.WEIGHTS)"
        )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    if not resume:
        _say(
            f"    checkpoints every {cfg.SOLVER.CHECKPOINT_PERIOD} iterations; if interrupted, "
            f"continue with: make demo DEMO_ARGS='--resume'"
        )
    t_train = time.perf_counter()
    _say(
        f"3/4 evaluation on {', '.join(cfg.DATASETS.TEST)} with the COCO evaluator follows training"
    )
    results = trainer.train()
    t_done = time.perf_counter()
    if not results or "bbox" not in results:
        raise RuntimeError(
            "Training finished without COCO results; TEST.EVAL_PERIOD must be >= 0 and "
            "DATASETS.TEST must name the val split."
        )

    _say(f"4/4 pictures of {min(num_vis, len(DatasetCatalog.get(cfg.DATASETS.TEST[0])))} val tiles")
    pictures = write_val_pictures(
        trainer.model,
        cfg,
        cfg.DATASETS.TEST[0],
        Path(output_dir) / "val_predictions",
        num_vis,
        vis_thresh,
    )
    summary = {
        "bbox": results["bbox"],
        "dataset": {
            "name": "deepforest tree crowns (deepforest==1.5.2 wheel)",
            "train": cfg.DATASETS.TRAIN,
            "test": cfg.DATASETS.TEST,
            "counts": built["counts"],
        },
        "config_file": str(config_file),
        "opts": list(opts),
        "max_iter": cfg.SOLVER.MAX_ITER,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "threads": torch.get_num_threads(),
        "seconds": {
            "setup_and_dataset": round(t_train - t_start, 1),
            "train_and_eval": round(t_done - t_train, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "model_final": str(Path(output_dir) / "model_final.pth"),
        "val_pictures": [str(p) for p in pictures],
    }
    with open(Path(output_dir) / "demo_results.json", "w") as f:
        json.dump(summary, f, indent=1)
    bbox = results["bbox"]
    if not bbox["AP"] == bbox["AP"]:  # NaN: COCOEvaluator got no detection at all
        _say(
            f"WARNING: no detection scored >= MODEL.RETINANET.SCORE_THRESH_TEST "
            f"({cfg.MODEL.RETINANET.SCORE_THRESH_TEST}): the detector has not learned yet; "
            "train longer (SOLVER.MAX_ITER) or with a larger SOLVER.BASE_LR"
        )
    _say(
        f"done in {summary['seconds']['total'] / 60:.1f} min: box AP50 {bbox['AP50']:.1f}, "
        f"AP {bbox['AP']:.1f}, AP75 {bbox['AP75']:.1f} on {cfg.DATASETS.TEST[0]}"
    )
    _say(
        f"outputs in {output_dir}/: demo_results.json, metrics.json, log.txt, "
        "events.out.tfevents.*,"
    )
    _say("    model_final.pth, inference/, val_predictions/*.png (ground truth | predictions)")
    _say(f"    TensorBoard: tensorboard --logdir {output_dir}")
    _say(
        f"    detect on your own images: python demo.py --weights {output_dir}/model_final.pth "
        f"--input 'path/to/*.png' --output {output_dir}/detections"
    )
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m focal_det.demo",
        description="make demo: train + evaluate RetinaNet (focal loss) on deepforest tree crowns",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="demo config (YAML)")
    parser.add_argument("--output-dir", default="output/demo", help="where everything is written")
    parser.add_argument(
        "--datasets-root", default=None, help="default: $DETECTRON2_DATASETS or ./datasets"
    )
    parser.add_argument("--num-vis", type=int, default=16, help="val tiles to draw")
    parser.add_argument(
        "--vis-thresh", type=float, default=0.3, help="score threshold of the pictures"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from OUTPUT_DIR/last_checkpoint",
    )
    parser.add_argument(
        "--dataset-only", action="store_true", help="build (or reuse) the dataset, print it, stop"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    if args.dataset_only:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        out = build_deepforest_trees(args.datasets_root)
        how = "cached" if out["reused"] else "built"
        print(f"deepforest tree crowns in {out['root']} ({how}):")
        for split, c in out["counts"].items():
            print(f"  deepforest_trees_{split:8s}  {c['images']:4d} tiles  {c['boxes']:5d} boxes")
        return 0
    run_demo(
        args.config_file,
        args.output_dir,
        args.opts,
        datasets_root=args.datasets_root,
        num_vis=args.num_vis,
        vis_thresh=args.vis_thresh,
        resume=args.resume,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
