#!/usr/bin/env python
"""
Figure 4 of the paper: the cumulative distribution of the normalised loss of positive and
negative anchors of a trained model, re-scored for several gammas.

The model (``--config-file`` + ``--weights``) is run over the images of a registered detectron2
dataset (``--dataset``; the demo's ``deepforest_trees_val``, COCO's ``coco_2014_minival``, ...),
resized to the model's test scale, no flip. Each anchor is labelled by the model's own
``label_anchors`` (its matcher: foreground, background, ignored). For every foreground and
background anchor we compute its classification loss summed over the K classes, once for each
gamma of ``--gammas`` (FL; gamma = 0 is CE), with ``focal_det.losses.sigmoid_loss_from_labels``.

Memory is bounded: the per-anchor losses are kept in two streaming reservoirs (Algorithm R,
uniform without replacement over everything seen) of at most ``--max-positives`` and
``--max-negatives`` anchors. The paper used ~10^5 positive and ~10^7 negative windows.

As in the paper, for each gamma and each group the kept losses are sorted ascending, normalised
to sum to one, and their cumulative sum is plotted against the fraction of anchors.

Writes to ``--output-dir``: loss_cdf.png, loss_cdf.csv (the curves on a grid of fractions),
loss_cdf.json (counts, settings, and the share of the loss carried by the hardest 1%/10%/20%).

    python tools/loss_cdf.py --config-file configs/demo/....yaml \\
        --weights output/demo/model_final.pth --dataset deepforest_trees_val
"""

import argparse
import csv
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

# The focal_det of this checkout (an editable install may point at another one).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_GAMMAS = (0.0, 0.5, 1.0, 2.0)
logger = logging.getLogger("loss_cdf")


class Reservoir:
    """
    A uniform random sample without replacement of at most ``capacity`` rows from a stream
    (Vitter's Algorithm R, vectorised per batch). Memory: ``capacity x dim`` float32.

    After any sequence of :meth:`add` calls, every row seen so far is in :meth:`values` with
    probability ``min(1, capacity / num_seen)``.
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"Reservoir capacity must be >= 1; got {capacity}")
        self.capacity = int(capacity)
        self.buffer = np.empty((self.capacity, dim), dtype=np.float32)
        self.num_seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray) -> None:
        """rows: (M, dim) array; appended to the stream in order."""
        rows = np.asarray(rows, dtype=np.float32)
        m = len(rows)
        if m == 0:
            return
        # Fill phase: the first `capacity` rows of the stream are all kept.
        k = max(0, min(m, self.capacity - self.num_seen))
        if k:
            self.buffer[self.num_seen : self.num_seen + k] = rows[:k]
        rest = rows[k:]
        if len(rest):
            # Row with 0-based stream index i replaces slot j ~ U{0..i} if j < capacity.
            idx = self.num_seen + k + np.arange(len(rest), dtype=np.int64)
            j = self._rng.integers(0, idx + 1)
            keep = j < self.capacity
            j, rest = j[keep], rest[keep]
            if len(j):
                # Sequential semantics: when a slot is hit twice in this batch, the later row wins.
                _, last_rev = np.unique(j[::-1], return_index=True)
                sel = len(j) - 1 - last_rev
                self.buffer[j[sel]] = rest[sel]
        self.num_seen += m

    def values(self) -> np.ndarray:
        """(min(num_seen, capacity), dim) array of the kept rows."""
        return self.buffer[: min(self.num_seen, self.capacity)]


def per_anchor_losses(
    logits: torch.Tensor, labels: torch.Tensor, gammas: Sequence[float], alpha: float, impl: str
) -> torch.Tensor:
    """
    Args:
        logits: (R, K) classification logits of R anchors.
        labels: (R,) int64, a class in [0, K), K = background (no ignored anchors here).
        gammas: G focusing parameters.
        alpha: alpha_t weighting (< 0: none).
    Returns:
        (R, G) float32: FL_gamma summed over the K classes of each anchor, for each gamma.
    """
    from focal_det.losses import sigmoid_loss_from_labels

    cols = []
    for g in gammas:
        elem = sigmoid_loss_from_labels(
            logits, labels, loss="focal", alpha=alpha, gamma=float(g), reduction="none", impl=impl
        )
        cols.append(elem.float().sum(dim=-1))
    return torch.stack(cols, dim=1)


def _sigmoid_logits_problem(model):
    """Why ``model``'s logits are not Figure 4's (K sigmoid logits per anchor), or None."""
    if getattr(model, "sigmoid_class_scores", lambda: True)():
        return None
    loss = type(getattr(model, "cls_loss", None)).__name__
    return (
        f"{type(model).__name__} was built with the classification loss {loss}, whose class "
        "scores are not the sigmoid of K logits per anchor (SoftmaxFocalLoss: a softmax over "
        "K + 1). loss_cdf re-scores each anchor's K sigmoid logits with FL (the paper's "
        "Figure 4): use a model trained with a sigmoid loss (MODEL.FOCAL.LOSS.NAME FocalLoss, "
        "FocalLossStar, BalancedCE or OHEM)."
    )


@torch.no_grad()
def collect_anchor_losses(
    model,
    data_loader,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    alpha: float = -1.0,
    max_positives: int = 100_000,
    max_negatives: int = 1_000_000,
    max_images: Optional[int] = None,
    seed: int = 0,
    impl: str = "eager",
    log_period_s: float = 10.0,
):
    """
    Run ``model`` (a detectron2 dense detector with ``label_anchors``, e.g. FocalRetinaNet) over
    ``data_loader`` (batches of dataset dicts with "image" and "instances") and collect the
    per-anchor classification losses of foreground and background anchors.

    Returns:
        dict with "positives" (P, G) and "negatives" (Q, G) float32 arrays (reservoir samples),
        "num_positive_seen", "num_negative_seen", "num_ignored_seen", "num_images".
    """
    problem = _sigmoid_logits_problem(model)
    if problem:
        raise ValueError(problem)
    was_training = model.training
    model.eval()
    pos_res = Reservoir(max_positives, len(gammas), seed=seed)
    neg_res = Reservoir(max_negatives, len(gammas), seed=seed + 1)
    num_ignored = 0
    num_images = 0
    total = max_images
    if total is None:
        try:
            total = len(data_loader.dataset)
        except (AttributeError, TypeError):
            total = None
    start = last_log = time.perf_counter()
    try:
        for batch in data_loader:
            if max_images is not None and num_images >= max_images:
                break
            if max_images is not None:
                batch = batch[: max_images - num_images]
            for d in batch:
                if "instances" not in d:
                    raise ValueError(
                        "The dataset's dicts carry no 'instances': loss_cdf needs ground-truth "
                        "boxes (use a dataset with annotations and a mapper with is_train=True)."
                    )
            images = model.preprocess_image(batch)
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            pred_logits, _ = model._transpose_dense_predictions(
                model.head(features), [model.num_classes, 4]
            )
            anchors = model.anchor_generator(features)
            gt_instances = [d["instances"].to(model.device) for d in batch]
            gt_labels, _ = model.label_anchors(anchors, gt_instances)
            logits = torch.cat(pred_logits, dim=1)  # (N, R, K)
            for i, labels in enumerate(gt_labels):
                valid = labels >= 0
                num_ignored += int((~valid).sum())
                losses = per_anchor_losses(logits[i][valid], labels[valid], gammas, alpha, impl)
                is_pos = labels[valid] != model.num_classes
                pos_res.add(losses[is_pos].cpu().numpy())
                neg_res.add(losses[~is_pos].cpu().numpy())
                num_images += 1
            now = time.perf_counter()
            if now - last_log >= log_period_s:
                last_log = now
                rate = num_images / (now - start)
                eta = f", ETA {(total - num_images) / rate:.0f}s" if total else ""
                logger.info(
                    f"{num_images}/{total or '?'} images ({rate:.2f} img/s{eta}); "
                    f"{pos_res.num_seen} positive, {neg_res.num_seen} negative anchors seen"
                )
    finally:
        model.train(was_training)
    logger.info(
        f"done: {num_images} images in {time.perf_counter() - start:.1f}s; "
        f"{pos_res.num_seen} positive, {neg_res.num_seen} negative anchors"
    )
    return {
        "positives": pos_res.values().copy(),
        "negatives": neg_res.values().copy(),
        "num_positive_seen": pos_res.num_seen,
        "num_negative_seen": neg_res.num_seen,
        "num_ignored_seen": num_ignored,
        "num_images": num_images,
    }


def normalized_loss_cdf(losses: np.ndarray) -> np.ndarray:
    """
    The paper's curve: sort ``losses`` (M,) ascending, normalise to sum 1, cumulative sum.
    Entry i is the share of the total loss carried by the (i+1) lowest-loss anchors.
    """
    s = np.sort(np.asarray(losses, dtype=np.float64))
    total = s.sum()
    if len(s) == 0 or total <= 0:
        return np.zeros(len(s))
    return np.cumsum(s) / total


def cdf_on_grid(cdf: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """The cumulative normalised loss of the lowest ``fractions`` of the anchors (0 at 0)."""
    n = len(cdf)
    if n == 0:
        return np.full(len(fractions), np.nan)
    k = np.ceil(fractions * n).astype(np.int64)  # number of anchors counted
    return np.where(k > 0, cdf[np.clip(k - 1, 0, n - 1)], 0.0)


def summarize(result: Dict, gammas: Sequence[float], num_grid: int = 1001):
    """Curves on a grid of fractions and the share of the loss of the hardest anchors."""
    grid = np.linspace(0.0, 1.0, num_grid)
    curves, shares = {}, {}
    for group in ("positives", "negatives"):
        data = result[group]
        for gi, g in enumerate(gammas):
            cdf = normalized_loss_cdf(data[:, gi]) if len(data) else np.zeros(0)
            key = f"{group[:3]} gamma={g:g}"
            curves[key] = cdf_on_grid(cdf, grid)
            shares[key] = {
                f"hardest_{int(q * 100)}%": (
                    float(1.0 - cdf_on_grid(cdf, np.array([1.0 - q]))[0]) if len(cdf) else None
                )
                for q in (0.01, 0.1, 0.2)
            }
    return grid, curves, shares


def _totals(result: Dict, gammas: Sequence[float]) -> Dict:
    out = {}
    for gi, g in enumerate(gammas):
        tot = {}
        for group in ("positives", "negatives"):
            data = result[group]
            n_seen = result[f"num_{group[:-1]}_seen"]
            tot[group] = float(data[:, gi].astype(np.float64).mean() * n_seen) if len(data) else 0.0
        both = tot["positives"] + tot["negatives"]
        tot["negative_share"] = tot["negatives"] / both if both > 0 else None
        out[f"gamma={g:g}"] = tot
    return out


def write_outputs(result, gammas, output_dir, meta: Dict, dpi=120):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    grid, curves, shares = summarize(result, gammas)
    keys = list(curves)
    csv_path = os.path.join(output_dir, "loss_cdf.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fraction"] + keys)
        for i, fr in enumerate(grid):
            w.writerow([f"{fr:.6g}"] + [f"{curves[k][i]:.8g}" for k in keys])

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, group, title in (
        (axes[0], "pos", "positive samples"),
        (axes[1], "neg", "negative samples"),
    ):
        n_kept = len(result["positives" if group == "pos" else "negatives"])
        n_seen = result["num_positive_seen" if group == "pos" else "num_negative_seen"]
        for g in gammas:
            ax.plot(grid, curves[f"{group} gamma={g:g}"], label=f"gamma = {g:g}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"fraction of {'foreground' if group == 'pos' else 'background'} samples")
        ax.set_ylabel("cumulative normalized loss")
        ax.set_title(f"CDF of the loss of {title}\n({n_kept:,} of {n_seen:,} anchors)", fontsize=10)
        ax.legend(loc="upper left")
    weights = meta.get("weights") or ""
    # The run folder names the model: keep the last three path components of a long path.
    short = os.path.join(*weights.split(os.sep)[-3:]) if weights else "random-init model"
    fig.suptitle(f"Fig. 4: {short} on {meta.get('dataset')}", fontsize=9)
    fig.tight_layout()
    png_path = os.path.join(output_dir, "loss_cdf.png")
    fig.savefig(png_path, dpi=dpi)
    plt.close(fig)

    json_path = os.path.join(output_dir, "loss_cdf.json")
    summary = dict(meta)
    summary.update(
        {
            "gammas": list(gammas),
            "num_images": result["num_images"],
            "num_positive_seen": result["num_positive_seen"],
            "num_negative_seen": result["num_negative_seen"],
            "num_ignored_seen": result["num_ignored_seen"],
            "num_positive_kept": int(len(result["positives"])),
            "num_negative_kept": int(len(result["negatives"])),
            "share_of_loss_in_hardest_anchors": shares,
            # Estimated total loss of each group (mean of the kept anchors x anchors seen), and
            # the share of the negatives: how much easy background dominates the summed loss.
            "total_loss_estimate": _totals(result, gammas),
        }
    )
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=2)
    return [png_path, csv_path, json_path]


def build_loader(cfg, dataset_name: str, max_images: Optional[int], seed: int, num_workers: int):
    """
    Test-scale, no-flip loader over ``dataset_name`` that keeps the annotations (detectron2's
    test mapper drops them). With ``max_images``, a seeded random subset of the images, as the
    paper's "random images".
    """
    import detectron2.data.transforms as T
    from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader

    if dataset_name not in DatasetCatalog.list():
        raise SystemExit(
            f"Dataset {dataset_name!r} is not registered in detectron2's DatasetCatalog. "
            f"Registered names include: {sorted(DatasetCatalog.list())[:20]} ..."
        )
    dicts = DatasetCatalog.get(dataset_name)
    if max_images is not None and max_images < len(dicts):
        order = np.random.default_rng(seed).permutation(len(dicts))[:max_images]
        dicts = [dicts[i] for i in sorted(order)]
    mapper = DatasetMapper(
        is_train=True,  # keep the annotations; augmentations below are the test ones
        augmentations=[
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
        ],
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=False,
        recompute_boxes=False,
    )
    return build_detection_test_loader(dataset=dicts, mapper=mapper, num_workers=num_workers)


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="the model's config (YAML)")
    p.add_argument(
        "--weights",
        default=None,
        help="checkpoint (default: the config's MODEL.WEIGHTS; '' = keep the random/initial "
        "weights, for testing only)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="registered detectron2 dataset name (default: the config's DATASETS.TEST[0])",
    )
    p.add_argument("--gammas", type=float, nargs="+", default=list(DEFAULT_GAMMAS))
    p.add_argument(
        "--alpha",
        type=float,
        default=-1.0,
        help="alpha_t weighting of the re-scored loss (default -1: none; within the negatives "
        "it is a constant that the normalisation removes)",
    )
    p.add_argument("--max-images", type=int, default=None, help="random subset of the images")
    p.add_argument("--max-positives", type=int, default=100_000, help="positive reservoir size")
    p.add_argument("--max-negatives", type=int, default=1_000_000, help="negative reservoir size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    p.add_argument(
        "--impl",
        default="eager",
        choices=("auto", "compiled", "eager"),
        help="focal_det loss implementation (eager avoids compile time for a one-off pass)",
    )
    p.add_argument("--log-period", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--output-dir", default="output/loss_cdf")
    p.add_argument(
        "opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs (e.g. MODEL.DEVICE cpu)",
    )
    return p


def setup_cfg(args):
    from detectron2.config import get_cfg

    from focal_det import add_focal_config

    cfg = get_cfg()
    add_focal_config(cfg)
    from focal_det.config_check import merge_config_file, merge_config_list

    merge_config_file(cfg, args.config_file)  # unknown keys / wrong types: clear message
    merge_config_list(cfg, args.opts)
    if args.weights is not None:
        cfg.MODEL.WEIGHTS = args.weights
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    logger.setLevel(logging.INFO)
    for name, v in (
        ("--max-positives", args.max_positives),
        ("--max-negatives", args.max_negatives),
    ):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1; got {v}")
    if any(g < 0 for g in args.gammas):
        raise SystemExit(f"--gammas must be >= 0; got {args.gammas}")

    from detectron2.modeling import build_model

    import focal_det  # noqa: F401  (registers the model and the demo datasets)
    from focal_det.checkpoint import FocalCheckpointer

    cfg = setup_cfg(args)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
    if not dataset:
        raise SystemExit("No --dataset given and the config has no DATASETS.TEST")
    model = build_model(cfg)
    if not hasattr(model, "label_anchors"):
        raise SystemExit(
            f"{type(model).__name__} has no label_anchors(): loss_cdf needs a dense detector "
            "such as FocalRetinaNet or detectron2's RetinaNet"
        )
    if _sigmoid_logits_problem(model):
        raise SystemExit(_sigmoid_logits_problem(model))
    if cfg.MODEL.WEIGHTS:
        FocalCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # no code run from the file
    else:
        logger.warning("No weights given: the curves describe the model at initialisation.")
    loader = build_loader(cfg, dataset, args.max_images, args.seed, args.num_workers)
    result = collect_anchor_losses(
        model,
        loader,
        gammas=args.gammas,
        alpha=args.alpha,
        max_positives=args.max_positives,
        max_negatives=args.max_negatives,
        max_images=args.max_images,
        seed=args.seed,
        impl=args.impl,
        log_period_s=args.log_period,
    )
    if result["num_positive_seen"] == 0:
        logger.warning("No positive anchors were found: is the dataset annotated?")
    meta = {
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "dataset": dataset,
        "alpha": args.alpha,
        "seed": args.seed,
        "command": " ".join(
            [os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])
        ),
    }
    for p in write_outputs(result, args.gammas, args.output_dir, meta):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
