"""
Renders MODEL_ZOO.md: every config of the zoo with the paper's numbers beside it.

The paper row of a config is found from the config's own values (loss, alpha, gamma, anchors,
OHEM settings, depth, scale, backbone), never from its file name, in
``focal_det.paper_tables``. ``python -m focal_det.model_zoo.model_zoo_md > MODEL_ZOO.md``
regenerates the file; tests/test_model_zoo.py checks it is up to date.
"""
from ..paper_tables import PAPER_TABLES
from .model_zoo import TRAINED, get_config, list_configs

__all__ = ["paper_row", "render"]

NOT_MEASURED = "—"


def paper_row(name, cfg):
    """
    Returns:
        (table name, row dict) of the paper for config ``name``, or (None, None) for configs
        that are not a row of the paper (bases, quick, demo, zoo).
    """
    table = name.split("/")[0] if "/" in name else None
    m, loss = cfg.MODEL, cfg.MODEL.FOCAL.LOSS.NAME
    alpha, gamma = m.RETINANET.FOCAL_LOSS_ALPHA, m.RETINANET.FOCAL_LOSS_GAMMA
    if table == "table1a":
        return "1a", PAPER_TABLES["1a"].find(alpha=alpha)
    if table == "table1b":
        return "1b", PAPER_TABLES["1b"].find(gamma=gamma, alpha=alpha)
    if table == "table1c":
        sizes, ratios = m.ANCHOR_GENERATOR.SIZES, m.ANCHOR_GENERATOR.ASPECT_RATIOS
        return "1c", PAPER_TABLES["1c"].find(scales=len(sizes[0]), aspect_ratios=len(ratios[0]))
    if table == "table1d":
        if loss == "OHEM":
            o = m.FOCAL.OHEM
            method = "OHEM 1:3" if o.POSITIVE_FRACTION > 0 else "OHEM"
            row = PAPER_TABLES["1d"].find(
                method=method, batch_size=o.BATCH_SIZE_PER_IMAGE, nms=o.NMS_THRESH
            )
            return "1d", row
        return "1d", PAPER_TABLES["1d"].find(method="FL")
    if table == "table1e":
        return "1e", PAPER_TABLES["1e"].find(depth=m.RESNETS.DEPTH, scale=cfg.INPUT.MIN_SIZE_TEST)
    if table == "table2":
        backbone = "ResNeXt-101-32x8d-FPN" if m.RESNETS.NUM_GROUPS > 1 else "ResNet-101-FPN"
        return "2", PAPER_TABLES["2"].find(backbone=backbone)
    if table == "table3":
        if loss == "FocalLossStar":
            star = m.FOCAL.LOSS
            return "3", PAPER_TABLES["3"].find(
                loss="FL*", gamma=star.STAR_GAMMA, beta=star.STAR_BETA
            )
        return "3", PAPER_TABLES["3"].find(loss="CE" if loss == "BalancedCE" else "FL")
    return None, None


def _describe(name, cfg):
    m, loss = cfg.MODEL, cfg.MODEL.FOCAL.LOSS.NAME
    body = (
        f"X-{m.RESNETS.DEPTH}-{m.RESNETS.NUM_GROUPS}x{m.RESNETS.WIDTH_PER_GROUP}d"
        if m.RESNETS.NUM_GROUPS > 1
        else f"R-{m.RESNETS.DEPTH}"
    )
    if loss == "FocalLoss":
        what = f"FL γ={m.RETINANET.FOCAL_LOSS_GAMMA:g} α={m.RETINANET.FOCAL_LOSS_ALPHA:g}"
    elif loss == "BalancedCE":
        what = f"CE α={m.RETINANET.FOCAL_LOSS_ALPHA:g}"
    elif loss == "FocalLossStar":
        what = f"FL* γ={m.FOCAL.LOSS.STAR_GAMMA:g} β={m.FOCAL.LOSS.STAR_BETA:g}"
    elif loss == "OHEM":
        o = m.FOCAL.OHEM
        ratio = " 1:3" if o.POSITIVE_FRACTION > 0 else ""
        what = f"OHEM{ratio} B={o.BATCH_SIZE_PER_IMAGE} nms={o.NMS_THRESH:g}"
    else:
        what = loss
    sizes, ratios = m.ANCHOR_GENERATOR.SIZES, m.ANCHOR_GENERATOR.ASPECT_RATIOS
    anchors = f"{len(sizes[0])}x{len(ratios[0])}"
    return body, what, anchors, cfg.INPUT.MIN_SIZE_TEST


def render():
    lines = [
        "# focal_det model zoo",
        "",
        "Every config under `configs/`, by its model-zoo name, with the paper's numbers beside it",
        "(docs/paper.md; minival unless the table says test-dev). **Ours** holds only numbers",
        "measured by this project, with the command that measured it: none so far (the paper's",
        "runs need COCO and, as in the paper, 8 GPUs; this project was built on a 2-core CPU",
        "machine without COCO), so that column is —.",
        "",
        "```python",
        "from focal_det import model_zoo",
        'cfg = model_zoo.get_config("table1b/retinanet_R_50_FPN_600_fl_gamma2.0_alpha0.25.yaml")',
        'model = model_zoo.get("zoo/Detectron/retinanet_R-50-FPN_1x.yaml", trained=True)',
        "```",
        "",
        "Train or evaluate any of them with `train_net.py` (README, \"Training and evaluation on",
        "COCO\"): `./train_net.py --num-gpus 8 --config-file configs/<name>`.",
        "",
        "This file is generated: `python -m focal_det.model_zoo.model_zoo_md > MODEL_ZOO.md`.",
        "",
    ]
    names = list_configs()
    cfgs = {name: get_config(name) for name in names}
    titles = {
        "1a": "Table 1a: alpha-balanced CE",
        "1b": "Table 1b: focal loss, gamma with its best alpha",
        "1c": "Table 1c: anchors (#scales per octave x #aspect ratios)",
        "1d": "Table 1d: FL vs OHEM (ResNet-101-FPN)",
        "1e": "Table 1e: speed/accuracy (test-dev)",
        "2": "Table 2: RetinaNet-800, scale jitter, 1.5x (test-dev)",
        "3": "Table 3: FL* (Appendix A)",
    }
    for table, title in titles.items():
        metrics = PAPER_TABLES[table].metrics
        metrics = [k for k in metrics if k != "time_ms"]
        lines += [f"## {title}", ""]
        head = ["config", "backbone", "loss", "anchors", "scale"] + [f"paper {k}" for k in metrics]
        head += ["paper ms (M40)"] if table == "1e" else []
        head += ["ours AP"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in names:
            cfg = cfgs[name]
            t, row = paper_row(name, cfg)
            if t != table:
                continue
            if row is None:
                raise ValueError(f"{name}: no row of Table {table} matches this config's values")
            body, what, anchors, scale = _describe(name, cfg)
            cells = [f"[`{name}`](configs/{name})", body, what, anchors, str(scale)]
            cells += [f"{row[k]:.1f}" for k in metrics]
            cells += [str(row["time_ms"])] if table == "1e" else []
            cells += [NOT_MEASURED]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    lines += [
        "## Other configs",
        "",
        "| config | what |",
        "|---|---|",
    ]
    for name in names:
        if name.startswith(("table", "zoo/", "demo/")):  # demo/: see the README's demo section
            continue
        if name == "retinanet_R101_FPN_800.yaml":
            what = ("R-101-FPN at 800 px, FL γ=2 α=.25, 90k, minival (Table 1e's largest model; "
                    "the paper's 37.8 AP is test-dev)")  # fmt: skip
        elif name.startswith("Base-"):
            what = "base config (inherited through `_BASE_`)"
        elif name.startswith("quick/"):
            what = "CPU-sized smoke test of the pipeline (not a paper setting)"
        else:
            what = "(undocumented)"
        lines.append(f"| [`{name}`](configs/{name}) | {what} |")
    lines.append("")

    lines += [
        "## Trained models that load into FocalRetinaNet",
        "",
        "Box AP as **published by their authors** (not measured here). `trained=True` downloads",
        "through detectron2's PathManager into `$FVCORE_CACHE` (default `~/.torch/iopath_cache`);",
        "offline, the error names the URL and the exact file path to put the download at.",
        "",
        "| config | weights | published box AP | split |",
        "|---|---|---|---|",
    ]
    for name in sorted(TRAINED):
        url, ap, split = TRAINED[name]
        lines.append(f"| [`{name}`](configs/{name}) | [model]({url.replace('detectron2://', 'https://dl.fbaipublicfiles.com/detectron2/')}) | {ap} | {split} |")  # noqa: E501
    lines += [
        "",
        "* `zoo/detectron2/*`: detectron2's model-zoo RetinaNets (detectron2's training recipe:",
        "  multi-scale 640-800 px, EMA loss normaliser, L1 box loss, COCO 2017). Their checkpoints",
        "  load into FocalRetinaNet unchanged (same parameter names; tested with a locally made",
        "  checkpoint in `tests/test_model_zoo.py`).",
        "* `zoo/Detectron/*`: the paper's own released models (Detectron, Caffe2 `.pkl`),",
        "  loaded by `focal_det.checkpoint` (`FocalCheckpointer`), which renames the `retnet_*`,",
        "  `fpn_*` and `res*` blobs; tested by a round trip with identical outputs in",
        "  `tests/test_c2_converter.py`; Detectron's pixel means are set in these configs.",
        "  * **Anchors** (fixed): these configs use Detectron's anchors",
        "    (`MODEL.ANCHOR_GENERATOR.NAME: DetectronAnchorGenerator`,",
        "    `focal_det/modeling/anchor_generator.py`). They used detectron2's (`OFFSET",
        "    0.0`), which put every box of a converted model half a stride off (4 px on P3",
        "    ... 64 px on P7: for an object of its anchor's size that caps the IoU at 0.62 /",
        "    0.68 / 0.74 for the three octave scales) and whose non-square anchors were not",
        "    the whole-pixel ones Detectron trained with (stride 8, size 32, ratio 1:2:",
        "    Detectron 44 x 24 px, detectron2 45.25 x 22.63).",
        "  * **Now exact** (`tests/test_anchor_generator.py`, against Detectron's formulas):",
        "    the cell anchors of every level (bit for bit in float32) and the grid anchors;",
        "    on them detectron2's `Box2BoxTransform` decodes (and encodes) as Detectron's +1",
        "    `bbox_transform` (same clip of dw/dh at log(1000/16)), to float32 rounding, and",
        "    the IoU of the matcher is Detectron's +1 IoU.",
        "  * **Still different** from Detectron's `core/test_retinanet.py`, so the AP of a",
        "    converted model may still differ slightly from the published one (not measured:",
        "    no COCO here): (1) resizing: Detectron subtracts the mean from the float image",
        "    and resizes it with OpenCV's bilinear (`INTER_LINEAR`); detectron2 resizes the",
        "    uint8 image with PIL's bilinear filter (antialiased when shrinking) and rounds",
        "    it to uint8 before the mean is subtracted; (2) Detectron keeps candidates above",
        "    score 0.0 on the coarsest level (P7), 0.05 elsewhere; we use 0.05 everywhere;",
        "    (3) detections go back to the original image by dividing Detectron's +1 boxes by",
        "    the scale s, whose COCO width is `x2 - x1 + 1`: ours come out (1 - 1/s) px",
        "    narrower and shorter (0.4 px for a 480 px-high COCO image at 800 px); (4)",
        "    Detectron clips the boxes before its per-class NMS, which runs in original-image",
        "    pixels with +1 areas; detectron2 runs it on the unclipped boxes of the resized",
        "    image and clips afterwards. Training with these configs differs too: detectron2",
        "    resizes a ground-truth box in continuous coordinates, Detectron in the +1",
        "    convention (its boxes end up s - 1 px smaller).",
        "* SHA-256: no published hash is known for these files and none was computed here",
        "  (offline); pass `MODEL.WEIGHTS <url or path>?sha256=<hex>` or add the hash to",
        "  `focal_det.checkpoint.KNOWN_SHA256` to have every load verified.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
