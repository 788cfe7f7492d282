"""
COCO AP with and without test-time augmentation (``FocalRetinaNetWithTTA``) of one checkpoint on
one dataset, and the inference time per image of each, in one run:

    flock -x /tmp/focal_bench.lock .venv/bin/python benchmarks/tta_bench.py \\
        --config-file configs/demo/retinanet_mobilenet_v2_trees.yaml \\
        --weights output/demo/model_final.pth \\
        TEST.AUG.MIN_SIZES "(224, 256, 288)" TEST.AUG.MAX_SIZE 1000 TEST.AUG.FLIP True

The dataset is ``--dataset`` (default: the config's first DATASETS.TEST). Both evaluations use
the project's test loader and COCO evaluator (``focal_det.engine.Trainer``), as
``train_net.py --eval-only`` with TEST.AUG.ENABLED does; the TTA settings are the config's
``TEST.AUG.*`` (override them as above). Time per image: wall time of the ``model(inputs)``
calls (one image each; loading, resizing and evaluation not counted), mean over the dataset
after ``--warmup`` untimed images, ``--threads`` torch threads.

Writes ``--json`` (default benchmarks/results/tta_bench.json) and the section between
<!-- BEGIN tta_bench --> / <!-- END tta_bench --> of ``--doc`` (default docs/benchmarks.md;
'' = none).
"""
import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


class _Timed(nn.Module):
    """Calls ``model`` and records the wall time of each call after the first ``warmup``."""

    def __init__(self, model, warmup):
        super().__init__()
        self.model, self.warmup, self.times, self.calls = model, warmup, [], 0

    def forward(self, inputs):
        t0 = time.perf_counter()
        out = self.model(inputs)
        if self.calls >= self.warmup:
            self.times.append((time.perf_counter() - t0) / len(inputs))
        self.calls += 1
        return out


def evaluate(cfg, model, dataset, output_dir, warmup):
    """(COCO bbox results, seconds per image) of ``model`` on ``dataset``."""
    from detectron2.evaluation import inference_on_dataset

    from focal_det.engine import Trainer

    timed = _Timed(model, warmup)
    evaluator = Trainer.build_evaluator(cfg, dataset, output_folder=output_dir)
    res = inference_on_dataset(timed, Trainer.build_test_loader(cfg, dataset), evaluator)
    per_image = sum(timed.times) / len(timed.times) if timed.times else float("nan")
    return res.get("bbox", {}), per_image


def run(args, argv=None):
    import focal_det  # noqa: F401  (registers the model, backbones, datasets)
    from focal_det.engine import Trainer, load_config
    from focal_det.modeling import FocalRetinaNetWithTTA

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", args.weights])
    cfg.MODEL.MOBILENET.WEIGHTS = "none"  # the checkpoint holds every weight
    cfg.MODEL.DEVICE = "cpu"
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    cfg.DATASETS.TEST = (dataset,)
    cfg.freeze()
    model = Trainer.build_model(cfg)
    Trainer.build_checkpointer(cfg, model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.output_dir or tmp
        for name, m in (("plain", model), ("tta", FocalRetinaNetWithTTA(cfg, model))):
            bbox, sec = evaluate(cfg, m, dataset, os.path.join(work, name), args.warmup)
            out[name] = {"bbox": bbox, "s_per_image": sec}
    aug = cfg.TEST.AUG
    record = bc.run_record(under_lock=True)
    if argv is not None:  # called as a function: record the arguments it was given
        record["command"] = "flock /tmp/focal_bench.lock " + shlex.join(
            ["python", "benchmarks/tta_bench.py", *argv]
        )
    return {
        **record,
        "config_file": args.config_file,
        "weights": args.weights,
        "dataset": dataset,
        "num_images": len(_dataset_dicts(dataset)),
        "test_size": [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
        "tta": {"min_sizes": list(aug.MIN_SIZES), "max_size": aug.MAX_SIZE, "flip": aug.FLIP,
                "nms_thresh": cfg.MODEL.RETINANET.NMS_THRESH_TEST,
                "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE},
        "threads": args.threads,
        "results": out,
    }  # fmt: skip


def _dataset_dicts(name):
    from detectron2.data import DatasetCatalog

    return DatasetCatalog.get(name)


def to_markdown(r):
    t = r["tta"]
    n_aug = len(t["min_sizes"]) * (2 if t["flip"] else 1)
    lines = [
        "## Test-time augmentation: AP and time per image (FocalRetinaNetWithTTA)",
        "",
        *bc.measured_header(r),
        f"Checkpoint `{r['weights']}` (config `{r['config_file']}`) on `{r['dataset']}` "
        f"({r['num_images']} images), CPU, {r['threads']} threads. Plain: the test size "
        f"(short side {r['test_size'][0]}, max {r['test_size'][1]}). TTA: short sides "
        f"{tuple(t['min_sizes'])} (max {t['max_size']}){', each also flipped' if t['flip'] else ''}"
        f" = {n_aug} inputs per image, merged by per-class NMS at {t['nms_thresh']}, "
        f"{t['detections_per_image']} kept. Time: `model(inputs)` calls, mean per image.",
        "",
        "| | AP | AP50 | AP75 | APs | APm | APl | ms/image | x plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = r["results"]["plain"]["s_per_image"]
    for name, res in r["results"].items():
        b = res["bbox"]
        cells = [f"{b.get(k, float('nan')):.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm",
                                                          "APl")]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {1e3 * res['s_per_image']:.1f} | {res['s_per_image'] / base:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=str(bc.REPO / "configs/demo/retinanet_mobilenet_v2_"
                                                          "trees.yaml"))  # fmt: skip
    p.add_argument("--weights", required=True, help="checkpoint (.pth)")
    p.add_argument("--dataset", default="", help="registered dataset (default: DATASETS.TEST[0])")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed images at the start")
    p.add_argument("--output-dir", default="", help="keep the evaluators' files here")
    p.add_argument("--json", default=str(bc.RESULTS / "tta_bench.json"))
    p.add_argument("--doc", default=str(bc.DOCS), help="Markdown file to update ('' = none)")
    p.add_argument("--doc-marker", default="tta_bench")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    result = run(args, argv)
    bc.publish(result, to_markdown(result), args.json, args.doc, args.doc_marker)
    return result


if __name__ == "__main__":
    main()
