"""
Our points of the paper's Figure 2 (speed vs accuracy): the inference time per image of trained
models, each on its own test set at its own test size, next to the COCO AP its training run
measured. Writes a results file that ``tools/plot_speed_accuracy.py`` draws (and draws it).

Time per image is detectron2's "pure compute time": images decoded and resized beforehand (not
timed), one image per ``model([inputs])`` call in ``inference_mode``, so it includes
preprocessing on the tensor (normalisation, padding), backbone, head, decoding and NMS. Models
are timed interleaved round-robin (``--rounds``), after ``--warmup`` passes over the images, and
the median over rounds of the mean per image is reported, so that load from other processes
hits all models alike. AP is read from each run's ``log.txt`` (the evaluation after
``model_final.pth``, as ``tools/run_table.py`` reads it), not recomputed.

Runs are given as folders (each holding the ``config.yaml`` and ``model_final.pth`` that
``train_net.py`` writes) or as a ``tools/run_table.py`` table JSON (every finished run in it)::

    flock /tmp/focal_bench.lock .venv/bin/python benchmarks/speed_accuracy.py \\
        --from-table output/repro/demo/table1e.json --threads 1

Times on different machines and thread counts are not comparable; the paper's are on an M40 GPU.
"""
import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # run_table, plot tool
import bench_common as bc  # noqa: E402

logger = logging.getLogger("focal_det.speed_accuracy")


def runs_from_table(path):
    """
    [(label, run folder)] of a ``tools/run_table.py`` JSON: per row, its finished run of the
    lowest seed; labelled by the setting columns that vary between those rows (1e: the scale).
    """
    if not os.path.isfile(path):
        raise SystemExit(f"--from-table {path} does not exist (write it with tools/run_table.py)")
    with open(path) as f:
        table = json.load(f)
    picked = []
    for row in table.get("rows", []):
        done = sorted((r for r in row["runs"] if r.get("state") == "done"), key=lambda r: r["seed"])
        if done:
            picked.append((row["setting"], done[0]["output_dir"]))
    if not picked:
        raise SystemExit(f"{path} lists no finished run")
    varying = [k for k in picked[0][0] if len({str(s.get(k)) for s, _ in picked}) > 1]
    keys = varying or list(picked[0][0])
    return [(", ".join(f"{k} {s.get(k)}" for k in keys), folder) for s, folder in picked]


def load_run(folder, device):
    """(cfg, model in eval mode with the run's final weights, final metrics) of a run folder."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import focal_det  # noqa: F401  (registers the model and the demo datasets)
    from focal_det import add_focal_config
    from focal_det.checkpoint import FocalCheckpointer
    from focal_det.config_check import merge_config_file

    cfg_path = os.path.join(folder, "config.yaml")
    weights = os.path.join(folder, "model_final.pth")
    for p in (cfg_path, weights):
        if not os.path.isfile(p):
            raise SystemExit(f"{folder} is not a finished training run: {p} is missing")
    from run_table import parse_final_metrics

    metrics = parse_final_metrics(os.path.join(folder, "log.txt"))
    if metrics is None:
        raise SystemExit(f"{folder}/log.txt has no evaluation after model_final.pth")
    cfg = get_cfg()
    add_focal_config(cfg)
    merge_config_file(cfg, cfg_path)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = build_model(cfg)
    FocalCheckpointer(model).load(weights)
    model.eval()
    return cfg, model, metrics


def load_test_inputs(cfg, max_images):
    """The run's first test set, decoded and resized by its test mapper (not timed)."""
    from detectron2.data import build_detection_test_loader

    if not cfg.DATASETS.TEST:
        raise SystemExit("The run's config has no DATASETS.TEST to time inference on")
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    inputs = []
    for batch in loader:
        inputs.extend(batch)
        if max_images and len(inputs) >= max_images:
            break
    return inputs[:max_images] if max_images else inputs


@torch.inference_mode()
def time_pass(model, inputs, device):
    bc.sync(device)
    t0 = time.perf_counter()
    for inp in inputs:
        model([inp])
    bc.sync(device)
    return (time.perf_counter() - t0) / len(inputs)


def measure(entries, rounds, warmup, device):
    """Median over ``rounds`` of the per-image time (s) of each entry, interleaved."""
    for e in entries:
        for _ in range(warmup):
            time_pass(e["model"], e["inputs"], device)
    samples = {id(e): [] for e in entries}
    for r in range(rounds):
        for e in entries:
            samples[id(e)].append(time_pass(e["model"], e["inputs"], device))
        logger.info("round %d/%d done", r + 1, rounds)
    return {id(e): statistics.median(samples[id(e)]) for e in entries}


def to_markdown(result):
    pts = result["points"]
    fastest = min(p["time_ms"] for p in pts)
    lines = ["## Speed vs accuracy of trained models (our Figure 2 points)", ""]
    lines += bc.measured_header(result)
    lines += [
        f"{result['threads']} thread(s), device {result['device']}; per image: median over "
        f"{result['rounds']} interleaved rounds of the mean over the test images.",
        "",
        "| model | test size (px) | images | AP | AP50 | ms / image | time vs fastest |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(pts, key=lambda p: p["time_ms"]):
        lines.append(
            f"| {p['label']} | {p['test_size']} | {p['num_images']} | {p['ap']:.1f} | "
            f"{p['ap50']:.1f} | {p['time_ms']:.1f} | {p['time_ms'] / fastest:.2f}x |"
        )
    lines += ["", f"Runs: {', '.join('`' + p['source'] + '`' for p in pts)}"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", help="training output folders")
    src.add_argument("--from-table", help="a tools/run_table.py table JSON: its finished runs")
    p.add_argument("--labels", nargs="+", help="one label per --runs folder (default: folder)")
    p.add_argument("--series", default=None, help="legend of our points")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per model first")
    p.add_argument("--max-images", type=int, default=0, help="0 = the whole test set")
    p.add_argument("--json", default=str(bc.RESULTS / "speed_accuracy_demo.json"))
    p.add_argument("--doc", default=str(bc.DOCS), help="Markdown file to update ('' = none)")
    p.add_argument("--doc-marker", default="speed_accuracy")
    p.add_argument("--plot-dir", default="docs/figures", help="draw Figure 2 here ('' = none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("--rounds and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available here")
    torch.set_num_threads(args.threads)

    if args.from_table:
        named = runs_from_table(args.from_table)
    else:
        if args.labels and len(args.labels) != len(args.runs):
            raise SystemExit(f"{len(args.labels)} --labels for {len(args.runs)} --runs")
        named = list(zip(args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs],
                         args.runs))  # fmt: skip
    entries = []
    for label, folder in named:
        cfg, model, metrics = load_run(folder, args.device)
        inputs = load_test_inputs(cfg, args.max_images)
        h, w = inputs[0]["image"].shape[-2:]
        logger.info("%s: %d test images of %dx%d from %s", label, len(inputs), h, w, folder)
        entries.append(
            {"label": label, "folder": folder, "model": model, "inputs": inputs,
             "metrics": metrics, "test_size": f"{h}x{w}"}
        )  # fmt: skip
    per_image = measure(entries, args.rounds, args.warmup, args.device)
    series = args.series or (
        f"ours ({args.device}, {args.threads} thread{'s' if args.threads > 1 else ''})"
    )
    record = bc.run_record()
    if argv is not None:  # called as a function: record the arguments it was given
        record["command"] = "flock /tmp/focal_bench.lock " + shlex.join(
            ["python", "benchmarks/speed_accuracy.py", *argv]
        )
    result = {
        **record,
        "threads": args.threads,
        "device": args.device,
        "rounds": args.rounds,
        "points": [
            {
                "label": e["label"],
                "series": series,
                "ap": e["metrics"]["AP"],
                "ap50": e["metrics"].get("AP50", float("nan")),
                "time_ms": 1000 * per_image[id(e)],
                "test_size": e["test_size"],
                "num_images": len(e["inputs"]),
                "source": os.path.relpath(os.path.abspath(e["folder"]), bc.REPO),
            }
            for e in entries
        ],
    }
    bc.publish(result, to_markdown(result), args.json, args.doc, args.doc_marker)
    if args.plot_dir and args.json:
        import plot_speed_accuracy

        plot_speed_accuracy.main(["--results", args.json, "--output-dir", args.plot_dir])
    return 0


if __name__ == "__main__":
    sys.exit(main())
