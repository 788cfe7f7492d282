"""
Inference backends side by side, in ONE run: detectron2's eager RetinaNet against focal_det's
FocalRetinaNet run eagerly ("pytorch"), as TorchScript ("torchscript", tools/export_model.py
--format torchscript) and as ONNX in onnxruntime ("onnxruntime", --format onnx), all with the
SAME weights, on the same image, in ms per image (batch 1, CPU, --threads threads).

Models (--models):
  r50   RetinaNet R50-FPN, detectron2's Base-RetinaNet config (FrozenBN), 80 classes, one
        --r50-size image (800 x 1067 by default: the paper's 800 px scale at 4:3);
  demo  the demo model of --demo-config (default configs/demo/retinanet_mobilenet_v2_trees.yaml:
        MobileNetV2-FPN, 1 class), at its test size (INPUT.MIN_SIZE_TEST x MIN_SIZE_TEST, capped
        by MAX_SIZE_TEST, as its square tiles are resized).
Random weights (speed only), made realistic as benchmarks/bench_common.py does: every FrozenBN
calibrated on a synthetic image, the classification logits centred on logit(SCORE_THRESH_TEST)
(here also scaled to std 1) so that half of them pass the threshold and inference does its full
work (top-1000 per level, decoding, NMS). FocalRetinaNet loads detectron2's state dict strictly.

Timed: ``runner(image)`` from the (3, H, W) float32 test-size tensor to the detections
(normalisation, padding, backbone, head, anchors, decoding, NMS; for the eager models also
detectron2's detector_postprocess at scale 1). Each variant runs --warmup untimed then --iters
timed images per round; --rounds rounds with the order reversed every other round; medians.
Every variant's detections are checked against detectron2's (``compare_detections``: same
count and classes, boxes within 1e-3 px, scores within 1e-5 + 1e-4 x score, ties in any order)
and the largest differences are recorded. Export times are reported too.

Writes benchmarks/results/export_bench.json and the section between
<!-- BEGIN export_bench --> / <!-- END export_bench --> of docs/benchmarks.md. Run it alone:

  flock -x /tmp/focal_bench.lock .venv/bin/python benchmarks/export_bench.py
"""
import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

VARIANTS = ["d2_eager", "pytorch", "torchscript", "onnxruntime"]
DEMO_CONFIG = str(bc.REPO / "configs" / "demo" / "retinanet_mobilenet_v2_trees.yaml")


def model_configs(args):
    """{name: (cfg of FocalRetinaNet, (H, W))} of the models asked for."""
    from focal_det.engine import load_config

    out = {}
    if "r50" in args.models:
        short = args.r50_size
        cfg = bc.d2_cfg("FocalRetinaNet", min_size=short, max_size=1333)
        out["r50"] = (cfg, (short, min(int(round(short * 4 / 3)), 1333)))
    if "demo" in args.models:
        cfg = load_config(args.demo_config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
        cfg.MODEL.MOBILENET.WEIGHTS = "none"  # random weights: speed only
        cfg.MODEL.FOCAL.COMPILE_HEAD = False
        short = cfg.INPUT.MIN_SIZE_TEST
        out["demo"] = (cfg, (short, min(short, cfg.INPUT.MAX_SIZE_TEST)))
    return out


def build_pair(cfg, size, seed=0):
    """(detectron2 RetinaNet, FocalRetinaNet) of ``cfg`` with the same calibrated weights."""
    from detectron2.modeling import build_model

    import focal_det  # noqa: F401  (registers FocalRetinaNet and the backbones)

    d2_cfg = cfg.clone()
    d2_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    torch.manual_seed(seed)
    d2 = build_model(d2_cfg)
    image = bc.synthetic_images(1, *size, num_classes=cfg.MODEL.RETINANET.NUM_CLASSES,
                                seed=seed + 1)[0]  # fmt: skip
    bc.calibrate_frozen_bn(d2, lambda: d2([image]))
    # Logits of std 1 around logit(threshold): half of them pass (as bench_common's bias alone
    # gives), spread like a detector's rather than all within 1e-4 of 0.05, where float
    # rounding (channels-last, folded BN) reorders near-ties and changes the top-k sets.
    cls_score = d2.head.cls_score
    outs = []
    hook = cls_score.register_forward_hook(
        lambda mod, inp, out: outs.append(out - mod.bias[:, None, None])
    )
    with torch.no_grad():
        d2.eval()([{"image": image["image"]}])
        hook.remove()
        cls_score.weight.div_(torch.cat([o.flatten() for o in outs]).std())
        thresh = cfg.MODEL.RETINANET.SCORE_THRESH_TEST
        cls_score.bias.fill_(math.log(thresh / (1 - thresh)))
    ours = build_model(cfg)
    ours.load_state_dict(d2.state_dict(), strict=True)
    return d2.eval(), ours.eval()


def time_variants(runners, image, args, log):
    """{variant: [seconds per image]} over interleaved rounds."""
    times = {v: [] for v in runners}
    for rnd in range(args.rounds):
        order = list(runners) if rnd % 2 == 0 else list(runners)[::-1]
        for v in order:
            run = runners[v]
            for _ in range(args.warmup):
                run(image)
            for _ in range(args.iters):
                t0 = time.perf_counter()
                run(image)
                times[v].append(time.perf_counter() - t0)
            log(f"  round {rnd + 1} {v:12s} {1e3 * statistics.median(times[v][-args.iters:]):8.1f}"
                " ms/image")
    return times


def bench_model(name, cfg, size, args, tmp, log):
    from focal_det.export import EagerRunner, export_retinanet, load_runner
    from focal_det.export.exporters import compare_detections

    log(f"{name}: {size[0]}x{size[1]} image, building models ...")
    d2, ours = build_pair(cfg, size)
    image = bc.synthetic_images(1, *size, seed=7)[0]["image"]
    export_s, runners = {}, {"d2_eager": EagerRunner(d2), "pytorch": EagerRunner(ours)}
    for fmt, backend in (("torchscript", "torchscript"), ("onnx", "onnxruntime")):
        if backend not in args.variants:
            continue
        t0 = time.perf_counter()
        path = export_retinanet(ours, image, fmt, os.path.join(tmp, name, fmt))
        export_s[backend] = time.perf_counter() - t0
        log(f"  exported {fmt} in {export_s[backend]:.0f} s")
        runners[backend] = load_runner(backend, path, num_threads=args.threads)
    runners = {v: runners[v] for v in VARIANTS if v in args.variants}
    ref = runners["d2_eager"](image)
    checks = {v: compare_detections(r(image), ref) for v, r in runners.items()}
    times = time_variants(runners, image, args, log)
    base = statistics.median(times["d2_eager"])
    return {
        "image_size": list(size),
        "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
        "export_s": export_s,
        "variants": {
            v: {
                "ms_per_image": 1e3 * statistics.median(t),
                "ratio_vs_d2_eager": statistics.median(t) / base,
                "times_s": t,
                "detections": checks[v]["count"],
                "same_as_d2_eager": checks[v]["ok"],
                "max_box_diff": checks[v]["max_box_diff"],
                "max_score_diff": checks[v]["max_score_diff"],
            }
            for v, t in times.items()
        },
    }


def to_markdown(r):
    m = r["machine"]
    lines = [
        "## Inference backends: eager vs TorchScript vs onnxruntime, against detectron2",
        "",
        *bc.measured_header(r),
        f"Machine: {m['cpu']}, {m['cores_visible']} cores visible, {r['threads']} threads "
        f"(torch and onnxruntime); torch {m['torch']}, onnxruntime {r['onnxruntime']}, "
        f"detectron2 {m['detectron2']}. Batch 1, float32, random calibrated weights (speed "
        f"only), {r['warmup']} warm-up + {r['iters']} timed images per variant and round, "
        f"{r['rounds']} interleaved rounds, medians (method: `benchmarks/export_bench.py` "
        "docstring). `d2_eager` = detectron2's RetinaNet; the other three run FocalRetinaNet "
        "with the same weights (`pytorch` = eager, `torchscript` / `onnxruntime` = the files "
        "of `tools/export_model.py`).",
        "",
    ]
    for name, res in r["models"].items():
        h, w = res["image_size"]
        what = ("RetinaNet R50-FPN, 80 classes" if name == "r50"
                else f"demo model (`{r['demo_config']}`), {res['num_classes']} class(es)")
        exports = ", ".join(f"{k} {v:.0f} s" for k, v in res["export_s"].items())
        lines += [
            f"**{what}, {h}x{w} input** (export time: {exports or '-'})",
            "",
            "| backend | ms/image | x d2_eager | detections | same as d2_eager | max box / score "
            "diff |",
            "|---|---|---|---|---|---|",
        ]
        for v, s in res["variants"].items():
            same = "yes" if s["same_as_d2_eager"] else "**no**"
            diff = ("-" if s["max_box_diff"] is None
                    else f"{s['max_box_diff']:.1e} px / {s['max_score_diff']:.1e}")
            lines.append(f"| `{v}` | {s['ms_per_image']:.1f} | **{s['ratio_vs_d2_eager']:.2f}** "
                         f"| {s['detections']} | {same} | {diff} |")
        lines.append("")
    la = r.get("loadavg", {})
    lines.append(f"1-min load average at start / end: {la.get('start')} / {la.get('end')}.")
    if r.get("notes"):
        lines += ["", r["notes"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["r50", "demo"], choices=["r50", "demo"])
    p.add_argument("--demo-config", default=DEMO_CONFIG)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                   help="d2_eager is always run (the reference)")
    p.add_argument("--r50-size", type=int, default=800, help="short side of the R50 image")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=str(bc.RESULTS / "export_bench.json"))
    p.add_argument("--doc", default=str(bc.DOCS), help="Markdown file to update ('' = none)")
    p.add_argument("--doc-marker", default="export_bench")
    p.add_argument("--notes", default="", help="text appended to the Markdown section")
    args = p.parse_args(argv)
    args.variants = ["d2_eager"] + [v for v in args.variants if v != "d2_eager"]

    import onnxruntime

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    load_start = os.getloadavg()[0]
    record = bc.run_record(under_lock=True)
    if argv is not None:  # called as a function: record the arguments it was given
        record["command"] = "flock /tmp/focal_bench.lock " + shlex.join(
            ["python", "benchmarks/export_bench.py", *argv]
        )
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, size) in model_configs(args).items():
            models[name] = bench_model(name, cfg, size, args, tmp, print)
    result = {
        **record,
        "threads": args.threads,
        "warmup": args.warmup,
        "iters": args.iters,
        "rounds": args.rounds,
        "demo_config": os.path.relpath(args.demo_config, bc.REPO)
        if os.path.abspath(args.demo_config).startswith(str(bc.REPO)) else args.demo_config,
        "onnxruntime": onnxruntime.__version__,
        "models": models,
        "loadavg": {"start": round(load_start, 1), "end": round(os.getloadavg()[0], 1)},
        "notes": args.notes,
    }
    bc.publish(result, to_markdown(result), args.json, args.doc, args.doc_marker)
    return result


if __name__ == "__main__":
    main()
