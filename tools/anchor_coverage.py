#!/usr/bin/env python
"""
Anchor coverage: how well a RetinaNet config's anchors and matcher cover the ground-truth boxes
of a dataset, before any training. "Why does RetinaNet miss my small objects?" starts here.

For every ground-truth box of a registered detectron2 dataset (``--dataset``, default the
config's ``DATASETS.TRAIN[0]``), resized as the config resizes it, we report:

* the best IoU of any anchor with it, and that anchor's FPN level and shape;
* how many anchors have IoU >= the matcher's foreground threshold (0.5 in the paper);
* how many anchors the model's matcher actually assigns to it as foreground ("positives": an
  anchor goes to the box it overlaps most, and low-quality matches are added as the config says,
  ``MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES``), per level;
* whether it gets any positive, and whether it gets one only through the low-quality rule
  (every assigned anchor has IoU below the foreground threshold).

Nothing is re-implemented: the model is built from the config with detectron2's
``build_model`` (no weights are loaded; a MobileNetV2 backbone is built with random weights), and
the anchors come from ``model.anchor_generator`` on the feature maps ``model.backbone`` produces
for a zero image of the resized, padded size (``model.preprocess_image``), the IoUs from
detectron2's ``pairwise_iou``, the assignment from ``model.anchor_matcher`` -- the steps of
``RetinaNet.label_anchors``.

Resize (``--resize``): ``train`` (default) uses detectron2's ``ResizeShortestEdge`` to the
*smallest* of ``INPUT.MIN_SIZE_TRAIN`` (the lower end for ``"range"`` sampling), capped at
``INPUT.MAX_SIZE_TRAIN``: the scale at which the objects are smallest, the worst case for
coverage. ``test`` uses ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``. ``--min-size N`` replaces the
shortest-edge size and ``--max-size N`` the cap (run once per size to see each scale of a
multi-scale schedule). Other
augmentations (flips, crops) are not applied; each image is padded on its own (batch of 1), as
at test time. Boxes go through detectron2's ``transform_instance_annotations`` (clipped to the
image); crowd boxes and boxes left empty are dropped, as detectron2's ``DatasetMapper`` does.

Size buckets are by sqrt(area) of the resized box, in pixels: <16, 16-32, 32-64, 64-128, 128-256,
>=256 -- octaves that line up with the paper's anchor sizes (32 px on P3 ... 512 px on P7). COCO's
small / medium / large (area < 32^2, < 96^2 in original pixels) are not used: they do not follow
the resize, and the anchors do. "By level" groups the boxes by the FPN level of their best anchor
(the first one, lowest level first, on ties) and counts the positives assigned on each level.

Writes ``--output`` / anchor_coverage.json (settings, the anchors read from the model, the summary,
one row per box) and anchor_coverage.png (histogram of the best IoU; fraction of boxes with a
best anchor at IoU >= 0.5 / >= 0.75 and with a positive, by size; best IoU vs box size with the
anchor sizes; boxes and positives by level), and prints a table.

    python tools/anchor_coverage.py --config-file configs/demo/retinanet_mobilenet_v2_trees.yaml \\
        --dataset deepforest_trees_val --output output/anchor_coverage
"""

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

# The focal_det of this checkout (an editable install may point at another one).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("anchor_coverage")

# sqrt(area) bucket edges in resized pixels (see the module docstring).
SIZE_EDGES = (16, 32, 64, 128, 256)
# Best-anchor IoU levels reported besides the matcher's foreground threshold: COCO's AP50 / AP75.
IOU_LEVELS = (0.5, 0.75)


def size_bucket_names(edges: Sequence[float] = SIZE_EDGES) -> List[str]:
    """["<16", "16-32", ..., ">=256"] for the default edges."""
    names = [f"<{edges[0]:g}"]
    names += [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
    return names + [f">={edges[-1]:g}"]


def size_bucket_index(sqrt_area: np.ndarray, edges: Sequence[float] = SIZE_EDGES) -> np.ndarray:
    """Bucket of each box: i such that edges[i-1] <= sqrt_area < edges[i] (0 below edges[0])."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), sqrt_area, side="right")


# ------------------------------------------------------------------------------------ config
def setup_cfg(config_file: str, opts: Sequence[str]):
    """The config as training would read it, made cheap to build: no weights, no compile."""
    from detectron2.config import get_cfg

    from focal_det import add_focal_config
    from focal_det.config_check import merge_config_file, merge_config_list

    cfg = get_cfg()
    add_focal_config(cfg)
    merge_config_file(cfg, config_file)  # unknown keys / wrong types: a clear message
    merge_config_list(cfg, opts)
    # Only shapes are used: random backbone weights are enough, and nothing is downloaded.
    # (build_model never reads MODEL.WEIGHTS; the MobileNetV2 backbone reads its own key.)
    cfg.MODEL.MOBILENET.WEIGHTS = "none"
    cfg.MODEL.FOCAL.COMPILE_HEAD = False
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def resize_spec(
    cfg, mode: str, min_size: Optional[int] = None, max_size: Optional[int] = None
) -> Tuple[int, int]:
    """(shortest-edge size, max size) of ``--resize`` ``mode`` (see the module docstring)."""
    if mode == "train":
        short, longest = int(min(cfg.INPUT.MIN_SIZE_TRAIN)), int(cfg.INPUT.MAX_SIZE_TRAIN)
    elif mode == "test":
        short, longest = int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
    else:
        raise ValueError(f"--resize must be 'train' or 'test'; got {mode!r}")
    short = short if min_size is None else int(min_size)
    longest = longest if max_size is None else int(max_size)
    if short <= 0:
        raise ValueError(
            f"The shortest-edge size is {short} (INPUT.MIN_SIZE_{mode.upper()} or --min-size): "
            "it must be > 0 (detectron2's 0 means 'no resize', which anchor coverage does not "
            "model)."
        )
    if longest < short:
        logger.warning(
            f"The max size {longest} (INPUT.MAX_SIZE_{mode.upper()} or --max-size) is below the "
            f"shortest-edge size {short}: images are capped at {longest} px on their long side, "
            "so the short side ends below the size asked for. Pass --max-size too if that is "
            "not what you meant."
        )
    return short, longest


def foreground_threshold(matcher) -> float:
    """
    The IoU from which the matcher's label is foreground (1) up to 1.0, from detectron2's
    ``Matcher.thresholds`` ([-inf, t0, ..., inf]) and ``labels`` (one per interval).
    """
    thresholds, labels = list(matcher.thresholds), list(matcher.labels)
    if labels[-1] != 1:
        raise ValueError(
            f"The matcher's highest IoU interval has label {labels[-1]}, not 1 (foreground): "
            f"MODEL.RETINANET.IOU_LABELS={labels} with IOU_THRESHOLDS={thresholds[1:-1]}."
        )
    i = len(labels) - 1
    while i > 0 and labels[i - 1] == 1:
        i -= 1
    return float(thresholds[i])


# ------------------------------------------------------------------------------------ model
def build_coverage_model(cfg):
    """detectron2's ``build_model`` of the config, in eval mode, with the attributes we read."""
    from detectron2.modeling import build_model

    import focal_det  # noqa: F401  (registers FocalRetinaNet, the backbones, the datasets)

    model = build_model(cfg)
    model.eval()
    missing = [
        a
        for a in ("anchor_generator", "anchor_matcher", "backbone", "head_in_features")
        if not hasattr(model, a)
    ]
    if missing:
        raise SystemExit(
            f"{type(model).__name__} has no {', '.join(missing)}: anchor coverage needs a dense "
            "anchor-based detector (MODEL.META_ARCHITECTURE FocalRetinaNet or RetinaNet)."
        )
    return model


class AnchorGrid:
    """
    The model's anchors for an image of a given resized size, computed once per size: pad it as
    ``model.preprocess_image`` does, run ``model.backbone`` on zeros of that size to get the
    feature maps, and call ``model.anchor_generator`` on them.
    """

    def __init__(self, model):
        self.model = model
        self.level_names = list(model.head_in_features)
        self._cache: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor, List[int]]] = {}

    @torch.no_grad()
    def __call__(self, height: int, width: int):
        """
        Returns:
            anchors (Tensor): (R, 4) XYXY, all levels, in the order of ``label_anchors``.
            level (Tensor): (R,) int64, the level index of each anchor.
            counts (list[int]): anchors per level.
        """
        key = (int(height), int(width))
        if key not in self._cache:
            from detectron2.structures import Boxes

            m = self.model
            image = torch.zeros((3, height, width), dtype=torch.float32)
            images = m.preprocess_image([{"image": image}])
            features = m.backbone(images.tensor)
            anchors = m.anchor_generator([features[f] for f in m.head_in_features])
            counts = [len(a) for a in anchors]
            level = torch.repeat_interleave(
                torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64)
            ).to(m.device)
            self._cache[key] = (Boxes.cat(anchors).tensor, level, counts)
        return self._cache[key]


def anchor_description(model) -> List[Dict]:
    """Per level: name, stride, and the cell anchors' sizes (sqrt area) and aspect ratios (h/w)."""
    gen = model.anchor_generator
    out = []
    for name, stride, cell in zip(model.head_in_features, gen.strides, gen.cell_anchors):
        cell = cell.detach().cpu().double()
        w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
        out.append(
            {
                "level": name,
                "stride": int(stride),
                "anchor_sizes": sorted({round(float(s), 2) for s in (w * h).sqrt()}),
                "aspect_ratios": sorted({round(float(r), 3) for r in h / w}),
                "anchors_per_location": len(cell),
            }
        )
    return out


# ------------------------------------------------------------------------------------ data
def resized_instances(record: Dict, short: int, max_size: int):
    """
    The ground truth of one dataset dict as training sees it, resized.

    Returns:
        (height, width) after the resize; gt boxes (M, 4) float32 XYXY; their index in
        ``record["annotations"]`` (M,); the number of crowd boxes and of boxes left empty.
    """
    import detectron2.data.transforms as T
    from detectron2.data import detection_utils as utils

    h, w = record.get("height"), record.get("width")
    if h is None or w is None:
        from PIL import Image

        with Image.open(record["file_name"]) as im:  # reads the header only
            w, h = im.size
    newh, neww = T.ResizeShortestEdge.get_output_shape(h, w, short, max_size)
    transform = T.ResizeTransform(h, w, newh, neww)
    annos = record.get("annotations", [])
    # DatasetMapper's steps: drop crowd boxes, transform (and clip), build Instances, drop empty.
    keep = [i for i, a in enumerate(annos) if a.get("iscrowd", 0) == 0]
    resized = [
        utils.transform_instance_annotations(
            {k: annos[i][k] for k in ("bbox", "bbox_mode", "category_id")}, transform, (newh, neww)
        )
        for i in keep
    ]
    instances = utils.annotations_to_instances(resized, (newh, neww))
    instances, nonempty = utils.filter_empty_instances(instances, return_mask=True)
    index = torch.tensor(keep, dtype=torch.int64)[nonempty]
    num_empty = int((~nonempty).sum())
    return (newh, neww), instances.gt_boxes.tensor, index, len(annos) - len(keep), num_empty


@torch.no_grad()
def match_boxes(model, anchors: torch.Tensor, level: torch.Tensor, gt: torch.Tensor, fg: float):
    """
    Per-box coverage of one image, by the model's matcher.

    Args:
        anchors: (R, 4) anchors of the image; level: (R,) their level index.
        gt: (M, 4) ground-truth boxes, M >= 1; fg: the matcher's foreground threshold.

    Returns:
        dict of tensors with M rows: best_iou, best_anchor (index into anchors), num_above_fg
        (anchors with IoU >= fg to this box, whoever they are assigned to), positives_by_level
        (M, L) anchors assigned to this box as foreground, num_strong (those with IoU >= fg).
    """
    from detectron2.structures import Boxes, pairwise_iou

    num_levels = int(level.max()) + 1
    iou = pairwise_iou(Boxes(gt), Boxes(anchors))  # (M, R), as RetinaNet.label_anchors
    matched_idxs, anchor_labels = model.anchor_matcher(iou)
    best_iou, best_anchor = iou.max(dim=1)
    num_above_fg = (iou >= fg).sum(dim=1)
    pos = anchor_labels == 1
    box_of_pos = matched_idxs[pos]
    m = len(gt)
    positives_by_level = torch.bincount(
        box_of_pos * num_levels + level[pos], minlength=m * num_levels
    ).view(m, num_levels)
    iou_of_pos = iou[box_of_pos, pos.nonzero()[:, 0]]
    num_strong = torch.bincount(box_of_pos[iou_of_pos >= fg], minlength=m)
    return {
        "best_iou": best_iou,
        "best_anchor": best_anchor,
        "num_above_fg": num_above_fg,
        "positives_by_level": positives_by_level,
        "num_strong": num_strong,
    }


def collect_coverage(
    model, dataset_dicts: Sequence[Dict], short: int, max_size: int, log_period_s: float = 10.0
):
    """
    Run :func:`match_boxes` over every image of ``dataset_dicts``.

    Returns:
        rows (list[dict], one per kept box) and counts (dict: images, crowd / empty boxes dropped,
        anchors per level summed over the images).
    """
    from detectron2.utils.logger import log_every_n_seconds

    grid = AnchorGrid(model)
    names = grid.level_names
    fg = foreground_threshold(model.anchor_matcher)
    rows: List[Dict] = []
    counts = {"images": 0, "crowd_dropped": 0, "empty_dropped": 0}
    anchors_per_level = np.zeros(len(names), dtype=np.int64)
    start = time.perf_counter()
    total = len(dataset_dicts)
    for i, record in enumerate(dataset_dicts):
        (h, w), gt, index, n_crowd, n_empty = resized_instances(record, short, max_size)
        counts["images"] += 1
        counts["crowd_dropped"] += n_crowd
        counts["empty_dropped"] += n_empty
        anchors, level, per_level = grid(h, w)
        anchors_per_level += np.asarray(per_level)
        if len(gt):
            gt = gt.to(anchors.device)
            res = {k: v.cpu() for k, v in match_boxes(model, anchors, level, gt, fg).items()}
            best_boxes = anchors[res["best_anchor"].to(anchors.device)].cpu()
            best_level = level[res["best_anchor"].to(level.device)].cpu()
            annos = record["annotations"]
            gt_boxes = gt.cpu().tolist()
            for j in range(len(gt)):
                box = gt_boxes[j]
                bw, bh = box[2] - box[0], box[3] - box[1]
                pbl = res["positives_by_level"][j].tolist()
                num_pos = int(sum(pbl))
                rows.append(
                    {
                        "image_id": record.get("image_id", i),
                        "annotation_index": int(index[j]),
                        "category_id": annos[int(index[j])].get("category_id"),
                        "box_xyxy": [round(v, 2) for v in box],
                        "width": round(bw, 2),
                        "height": round(bh, 2),
                        "sqrt_area": round(float(np.sqrt(bw * bh)), 3),
                        "best_iou": round(float(res["best_iou"][j]), 5),
                        "best_level": names[int(best_level[j])],
                        "best_anchor_xyxy": [round(v, 2) for v in best_boxes[j].tolist()],
                        "num_anchors_iou_ge_fg": int(res["num_above_fg"][j]),
                        "num_positive": num_pos,
                        "num_positive_by_level": dict(zip(names, pbl)),
                        "has_positive": num_pos > 0,
                        "low_quality_only": num_pos > 0 and int(res["num_strong"][j]) == 0,
                    }
                )
        log_every_n_seconds(
            logging.INFO,
            f"{i + 1}/{total} images, {len(rows)} boxes "
            f"({(i + 1) / max(time.perf_counter() - start, 1e-9):.1f} images/s)",
            n=log_period_s,
            name=logger.name,
        )
    counts["anchors_per_level"] = dict(zip(names, anchors_per_level.tolist()))
    return rows, counts


# ------------------------------------------------------------------------------------ summary
def group_stats(rows: Sequence[Dict]) -> Dict:
    """Coverage numbers of a group of box rows (None where the group is empty)."""
    n = len(rows)
    out: Dict = {"num_boxes": n}
    best = np.array([r["best_iou"] for r in rows], dtype=np.float64)
    has_pos = np.array([r["has_positive"] for r in rows], dtype=bool)
    lq = np.array([r["low_quality_only"] for r in rows], dtype=bool)
    npos = np.array([r["num_positive"] for r in rows], dtype=np.float64)

    def frac(mask):
        return round(float(mask.mean()), 4) if n else None

    out["mean_best_iou"] = round(float(best.mean()), 4) if n else None
    out["median_best_iou"] = round(float(np.median(best)), 4) if n else None
    for t in IOU_LEVELS:
        out[f"frac_best_iou_ge_{t:g}"] = frac(best >= t)
    out["frac_with_positive"] = frac(has_pos)
    out["frac_low_quality_only"] = frac(lq)
    out["frac_no_positive"] = frac(~has_pos)
    out["mean_num_positive"] = round(float(npos.mean()), 3) if n else None
    return out


def summarize(rows: Sequence[Dict], counts: Dict, levels: Sequence[Dict]) -> Dict:
    """Overall, by size bucket and by FPN level (see the module docstring)."""
    names = size_bucket_names()
    bucket = size_bucket_index(np.array([r["sqrt_area"] for r in rows], dtype=np.float64))
    edges = (0.0,) + tuple(float(e) for e in SIZE_EDGES) + (None,)
    by_size = []
    for b, name in enumerate(names):
        group = [r for r, k in zip(rows, bucket) if k == b]
        by_size.append({"bucket": name, "lo": edges[b], "hi": edges[b + 1], **group_stats(group)})
    by_level = []
    for lv in levels:
        name = lv["level"]
        group = [r for r in rows if r["best_level"] == name]
        by_level.append(
            {
                **lv,
                "anchors_per_image": round(counts["anchors_per_level"][name] / counts["images"], 1)
                if counts["images"]
                else None,
                "positive_anchors": int(sum(r["num_positive_by_level"][name] for r in rows)),
                **{
                    ("boxes_best_here" if k == "num_boxes" else k): v
                    for k, v in group_stats(group).items()
                },
            }
        )
    return {"overall": group_stats(rows), "by_size": by_size, "by_level": by_level}


def format_table(summary: Dict, fg: float) -> str:
    """The summary as plain-text tables (by size, by level, overall)."""

    def pct(v):
        return "   -" if v is None else f"{100 * v:4.0f}"

    head = (
        f"{'':>9} {'boxes':>6} {'meanIoU':>7} {'>=0.5':>5} {'>=0.75':>6} "
        f"{'pos':>4} {'LQonly':>6} {'nopos':>5} {'pos/box':>7}"
    )

    def line(label, s, n):
        miou = "      -" if s["mean_best_iou"] is None else f"{s['mean_best_iou']:7.3f}"
        mpos = "      -" if s["mean_num_positive"] is None else f"{s['mean_num_positive']:7.1f}"
        return (
            f"{label:>9} {n:>6} {miou} {pct(s['frac_best_iou_ge_0.5']):>5} "
            f"{pct(s['frac_best_iou_ge_0.75']):>6} {pct(s['frac_with_positive']):>4} "
            f"{pct(s['frac_low_quality_only']):>6} {pct(s['frac_no_positive']):>5} {mpos}"
        )

    out = [
        "Best-anchor IoU and positives (% of boxes): >=0.5 / >=0.75 = best anchor's IoU; pos = "
        f"gets a positive anchor from the matcher (IoU >= {fg:g} or low-quality), LQonly = only "
        "through the low-quality rule.",
        "by sqrt(area), resized px:",
        head,
    ]
    out += [line(s["bucket"], s, s["num_boxes"]) for s in summary["by_size"]]
    out += ["by FPN level of the best anchor:", head + f" {'stride':>6} {'anchor sizes':<22}"]
    for s in summary["by_level"]:
        sizes = "/".join(f"{v:g}" for v in s["anchor_sizes"])
        out.append(line(s["level"], s, s["boxes_best_here"]) + f" {s['stride']:>6} {sizes:<22}")
    out += [line("all", summary["overall"], summary["overall"]["num_boxes"])]
    return "\n".join(x.rstrip() for x in out)


# ------------------------------------------------------------------------------------ figure
def build_figure(rows: Sequence[Dict], summary: Dict, meta: Dict):
    """
    The 4-panel figure; returns the matplotlib Figure. Axes, in order: best-IoU histogram,
    coverage by size bucket (bars labelled "best IoU >= 0.5", "best IoU >= 0.75", "has a
    positive"), best IoU vs sqrt(area), boxes and positives by level.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax_hist, ax_size, ax_scatter, ax_level = axes.ravel()
    best = np.array([r["best_iou"] for r in rows], dtype=np.float64)
    sqrt_area = np.array([r["sqrt_area"] for r in rows], dtype=np.float64)
    fg, bg = meta["foreground_threshold"], meta["background_threshold"]

    ax_hist.hist(best, bins=np.linspace(0, 1, 41), color="tab:blue", label="boxes")
    for x, style, label in ((bg, ":", f"background < {bg:g}"), (fg, "--", f"foreground >= {fg:g}")):
        ax_hist.axvline(x, color="k", linestyle=style, label=label)
    ax_hist.axvline(0.75, color="tab:red", linestyle="--", label="0.75")
    ax_hist.set_xlabel("IoU of the best anchor")
    ax_hist.set_ylabel("ground-truth boxes")
    ax_hist.set_title(f"best-anchor IoU of {len(rows)} boxes", fontsize=10)
    ax_hist.legend(fontsize=8)

    by_size = summary["by_size"]
    x = np.arange(len(by_size))
    series = (
        ("frac_best_iou_ge_0.5", "best IoU >= 0.5", "tab:blue"),
        ("frac_best_iou_ge_0.75", "best IoU >= 0.75", "tab:red"),
        ("frac_with_positive", "has a positive", "tab:green"),
    )
    for k, (key, label, colour) in enumerate(series):
        heights = [np.nan if s[key] is None else s[key] for s in by_size]
        ax_size.bar(x + (k - 1) * 0.27, heights, width=0.27, label=label, color=colour)
    ax_size.set_xticks(x, [f"{s['bucket']}\nn={s['num_boxes']}" for s in by_size], fontsize=8)
    ax_size.set_xlabel("box sqrt(area), resized px")
    ax_size.set_ylabel("fraction of boxes")
    ax_size.set_ylim(0, 1.2)
    ax_size.set_title("coverage by box size", fontsize=10)
    ax_size.legend(fontsize=8, loc="upper center", ncol=3)

    ax_scatter.scatter(sqrt_area, best, s=4, alpha=0.4, rasterized=True)
    for lv in summary["by_level"]:
        for s in lv["anchor_sizes"]:
            ax_scatter.axvline(s, color="0.8", linewidth=0.8, zorder=0)
    ax_scatter.axhline(fg, color="k", linestyle="--", linewidth=0.8)
    ax_scatter.set_xscale("log", base=2)
    ticks = [2.0**k for k in range(2, 12)]
    ax_scatter.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax_scatter.minorticks_off()
    anchor_sizes = [s for lv in summary["by_level"] for s in lv["anchor_sizes"]]
    lo = min([*sqrt_area[sqrt_area > 0], *anchor_sizes]) / 1.25
    ax_scatter.set_xlim(lo, max([*sqrt_area, *anchor_sizes]) * 1.25)
    ax_scatter.set_ylim(0, 1.02)
    ax_scatter.set_xlabel("box sqrt(area), resized px (grey: anchor sizes)")
    ax_scatter.set_ylabel("IoU of the best anchor")
    ax_scatter.set_title("best IoU vs box size", fontsize=10)

    levels = summary["by_level"]
    xl = np.arange(len(levels))
    for dx, key, label, colour in (
        (-0.2, "boxes_best_here", "boxes whose best anchor is here", "tab:blue"),
        (0.2, "positive_anchors", "positive anchors assigned here", "tab:green"),
    ):
        ax_level.bar(xl + dx, [lv[key] for lv in levels], width=0.4, label=label, color=colour)
    ax_level.set_xticks(
        xl,
        [f"{lv['level']} (s{lv['stride']})\n{lv['anchors_per_image']:g}/img" for lv in levels],
        fontsize=8,
    )
    ax_level.set_yscale("symlog", linthresh=1)  # boxes and positives differ by 10-100x
    ax_level.set_ylabel("count (whole dataset)")
    ax_level.set_title("by FPN level (anchors per image under the name)", fontsize=10)
    ax_level.legend(fontsize=8)

    fig.suptitle(
        f"anchor coverage: {os.path.basename(meta['config_file'])} on {meta['dataset']}, "
        f"{meta['resize']} resize (short side {meta['min_size']}, max {meta['max_size']}), "
        f"low-quality matches: {meta['low_quality_matches']}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def write_outputs(rows, summary, meta, output_dir: str, dpi: int = 110) -> List[str]:
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "anchor_coverage.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "summary": summary, "boxes": list(rows)}, f, indent=1)
    import matplotlib.pyplot as plt

    fig = build_figure(rows, summary, meta)
    png_path = os.path.join(output_dir, "anchor_coverage.png")
    fig.savefig(png_path, dpi=dpi)
    plt.close(fig)
    return [json_path, png_path]


# ------------------------------------------------------------------------------------ CLI
def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="the model's config (YAML)")
    p.add_argument(
        "--dataset",
        default=None,
        help="registered detectron2 dataset (default: the config's DATASETS.TRAIN[0])",
    )
    p.add_argument(
        "--resize",
        default="train",
        choices=("train", "test"),
        help="train: smallest INPUT.MIN_SIZE_TRAIN, MAX_SIZE_TRAIN (default); "
        "test: MIN_SIZE_TEST, MAX_SIZE_TEST",
    )
    p.add_argument("--min-size", type=int, default=None, help="override the shortest-edge size")
    p.add_argument("--max-size", type=int, default=None, help="override the longest-edge cap")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images")
    p.add_argument("--log-period", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--output", default="output/anchor_coverage", help="output folder")
    p.add_argument(
        "opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs (e.g. MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES "
        "none)",
    )
    return p


def load_dataset(name: str, max_images: Optional[int] = None) -> List[Dict]:
    from detectron2.data import DatasetCatalog

    import focal_det  # noqa: F401  (registers deepforest_trees_train / _val)

    if name not in DatasetCatalog.list():
        raise SystemExit(
            f"Dataset {name!r} is not registered in detectron2's DatasetCatalog. Registered "
            f"names include: {sorted(DatasetCatalog.list())[:20]} ... Register yours with "
            "DatasetCatalog.register (or detectron2.data.datasets.register_coco_instances)."
        )
    dicts = DatasetCatalog.get(name)
    return dicts[:max_images] if max_images is not None else dicts


def run(args) -> Tuple[List[Dict], Dict, Dict]:
    """Everything but the output: rows, summary, meta."""
    cfg = setup_cfg(args.config_file, args.opts)
    dataset = args.dataset or (cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else None)
    if not dataset:
        raise SystemExit("No --dataset given and the config has no DATASETS.TRAIN")
    short, max_size = resize_spec(cfg, args.resize, args.min_size, args.max_size)
    model = build_coverage_model(cfg)
    dicts = load_dataset(dataset, args.max_images)
    logger.info(
        f"{dataset}: {len(dicts)} images, shortest edge -> {short} px (max {max_size}); "
        f"matcher {type(model.anchor_matcher).__name__}"
    )
    rows, counts = collect_coverage(model, dicts, short, max_size, args.log_period)
    levels = anchor_description(model)
    summary = summarize(rows, counts, levels)
    matcher = model.anchor_matcher
    meta = {
        "config_file": args.config_file,
        "opts": list(args.opts),
        "dataset": dataset,
        "resize": args.resize,
        "min_size": short,
        "max_size": max_size,
        "num_images": counts["images"],
        "num_boxes": len(rows),
        "crowd_boxes_dropped": counts["crowd_dropped"],
        "empty_boxes_dropped": counts["empty_dropped"],
        "matcher": type(matcher).__name__,
        "iou_thresholds": [float(t) for t in matcher.thresholds[1:-1]],
        "iou_labels": list(matcher.labels),
        "foreground_threshold": foreground_threshold(matcher),
        "background_threshold": float(matcher.thresholds[1]),
        # FocalRetinaNet's RetinaNetMatcher names its rule; detectron2's Matcher has a flag.
        "low_quality_matches": getattr(
            matcher,
            "low_quality_matches",
            "detectron2" if matcher.allow_low_quality_matches else "none",
        ),
        "size_buckets_sqrt_area_px": size_bucket_names(),
        "levels": levels,
        "command": " ".join(["tools/anchor_coverage.py"] + list(getattr(args, "argv", []))),
    }
    return rows, summary, meta


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    logger.setLevel(logging.INFO)
    if args.max_images is not None and args.max_images < 1:
        raise SystemExit(f"--max-images must be >= 1; got {args.max_images}")
    try:
        rows, summary, meta = run(args)
    except ValueError as e:  # bad thresholds / sizes: the message says which key
        raise SystemExit(str(e)) from e
    if not rows:
        logger.warning("The dataset has no ground-truth boxes: nothing to cover.")
    print(
        f"{meta['dataset']} ({meta['num_images']} images, {meta['num_boxes']} boxes), "
        f"{meta['resize']} resize to {meta['min_size']} px (max {meta['max_size']}), "
        f"IoU thresholds {meta['iou_thresholds']}, low-quality matches "
        f"{meta['low_quality_matches']!r}"
    )
    print(format_table(summary, meta["foreground_threshold"]))
    for p in write_outputs(rows, summary, meta, args.output):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
