#!/usr/bin/env python
"""
The demo recipe trained twice in one run: through focal_det's ``FocalRetinaNet`` (the paper's
loss settings, as ``make demo`` trains it) and through detectron2's own ``RetinaNet``
meta-architecture (the same config file with ``MODEL.META_ARCHITECTURE RetinaNet``, hence
detectron2's loss settings: EMA loss normaliser, low-quality matches whatever their IoU, and its
inference), on the same data, schedule, threads and machine. Each run is ``python -m
focal_det.demo`` in its own process; the table compares their COCO AP on the config's test
split and their wall time.

    flock /tmp/focal_bench.lock .venv/bin/python benchmarks/demo_vs_detectron2.py --threads 2

Writes benchmarks/results/demo_vs_detectron2.json and the section ``demo_vs_detectron2`` of
docs/benchmarks.md.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

DEMO_CONFIG = bc.REPO / "configs" / "demo" / "retinanet_mobilenet_v2_trees.yaml"
VARIANTS = {
    "focal_det FocalRetinaNet": [],
    "detectron2 RetinaNet": ["MODEL.META_ARCHITECTURE", "RetinaNet"],
}
METRICS = ("AP", "AP50", "AP75", "APs", "APm")


def run_variant(config_file, output_dir, opts, threads):
    """Train + evaluate one variant with the demo job; returns its demo_results.json."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable, "-m", "focal_det.demo", "--config-file", str(config_file),
        "--output-dir", str(output_dir), "--num-vis", "4", *opts,
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=bc.REPO)
    with open(Path(output_dir) / "demo_results.json") as f:
        return json.load(f)


def to_markdown(result):
    lines = ["## The demo recipe: focal_det vs detectron2's RetinaNet", ""]
    lines += bc.measured_header(result)
    lines += [
        f"Config `{result['config_file']}`"
        + (f" with `{' '.join(result['opts'])}`" if result["opts"] else "")
        + f", {result['threads']} threads, trained and evaluated on "
        f"`{result['test']}` once per variant (same seed). Wall time: training + evaluation.",
        "",
        "| meta-architecture | " + " | ".join(METRICS) + " | train + eval (s) | x ours |",
        "|---|" + "---|" * (len(METRICS) + 2),
    ]
    ours = result["variants"]["focal_det FocalRetinaNet"]["seconds"]
    for name, r in result["variants"].items():
        ap = " | ".join(f"{r['bbox'][m]:.1f}" for m in METRICS)
        lines.append(f"| {name} | {ap} | {r['seconds']:.0f} | {r['seconds'] / ours:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(DEMO_CONFIG))
    parser.add_argument("--output-root", default="output/demo_vs_detectron2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(bc.RESULTS / "demo_vs_detectron2.json"))
    parser.add_argument("--doc", default=str(bc.DOCS), help="'' to skip docs/benchmarks.md")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    result = {**bc.run_record(), "config_file": os.path.relpath(args.config_file, bc.REPO),
              "opts": args.opts, "threads": args.threads, "variants": {}}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        out = Path(args.output_root) / f"variant{i}"
        r = run_variant(args.config_file, out, [*args.opts, *extra], args.threads)
        result["test"] = ", ".join(r["dataset"]["test"])
        result["variants"][name] = {
            "bbox": {m: r["bbox"][m] for m in METRICS},
            "seconds": r["seconds"]["train_and_eval"],
            "output_dir": str(out),
        }
    bc.publish(result, to_markdown(result), args.json, args.doc, "demo_vs_detectron2")
    return result


if __name__ == "__main__":
    main()
