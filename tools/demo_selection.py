#!/usr/bin/env python
"""
How the demo's geometry and recipe were chosen, as runs anyone can repeat: each probe is the demo
config (configs/demo/retinanet_mobilenet_v2_trees.yaml) with some of its levers undone or
changed, trained on ``deepforest_trees_trainsub`` and evaluated on ``deepforest_trees_holdout``
(a band of the training crop, see focal_det/demo/deepforest.py). The val split is never used
here: it is measured once, by ``make demo``, with the config this table chose.

    python tools/demo_selection.py                      # run what is missing, write the table
    python tools/demo_selection.py --jobs 2 --threads 1 # two probes at a time, 1 thread each
    python tools/demo_selection.py --collect-only --markdown docs/figures/demo_selection.md

Each probe runs ``python -m focal_det.demo`` into ``<output-root>/<probe>/``; a probe with a
``demo_results.json`` is finished and not rerun (resumable). Each run records the code it
trained with (``code_id``, as tools/run_table.py).
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_table import code_version  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "retinanet_mobilenet_v2_trees.yaml"
HOLDOUT = [
    "DATASETS.TRAIN", '("deepforest_trees_trainsub",)',
    "DATASETS.TEST", '("deepforest_trees_holdout",)',
    "SOLVER.CHECKPOINT_PERIOD", "100000",
]  # fmt: skip
# The demo before issue 13: P3-P7 with the anchors halved (2x the stride), 4 whole tiles per
# batch, no GN, smooth L1, horizontal flips only.
_P3P7 = ["MODEL.FPN.IN_FEATURES", "['c3', 'c4', 'c5']",
         "MODEL.RETINANET.IN_FEATURES", "['p3', 'p4', 'p5', 'p6', 'p7']"]  # fmt: skip
_NO_GN = ["MODEL.RETINANET.NORM", "''"]
_SMOOTH_L1 = ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1"]
_NO_AUG = ["INPUT.EXTRA_AUG.VERTICAL_FLIP", "False", "INPUT.EXTRA_AUG.ROTATE_90", "False",
           "INPUT.EXTRA_AUG.BRIGHTNESS", "0.0", "INPUT.EXTRA_AUG.CONTRAST", "0.0",
           "INPUT.EXTRA_AUG.SATURATION", "0.0"]  # fmt: skip
_WHOLE_TILES = ["INPUT.CROP.ENABLED", "False", "INPUT.MIN_SIZE_TRAIN", "(256,)",
                "INPUT.MAX_SIZE_TRAIN", "256", "SOLVER.IMS_PER_BATCH", "4"]  # fmt: skip
# (name, what it is, overrides of the demo config). Order: the path from the old demo to the
# chosen recipe one lever at a time, then the alternatives that were measured against it.
PROBES = [
    ("old_demo", "before: P3-P7, anchors 2x stride, 4 tiles/batch",
     _P3P7 + _NO_GN + _SMOOTH_L1 + _NO_AUG + _WHOLE_TILES),
    ("p2p6", "P2-P6, anchors 4x stride", _NO_GN + _SMOOTH_L1 + _NO_AUG + _WHOLE_TILES),
    ("p2p6_gn", "+ GroupNorm head", _SMOOTH_L1 + _NO_AUG + _WHOLE_TILES),
    ("p2p6_gn_aug", "+ flips, quarter turns, colour jitter", _SMOOTH_L1 + _WHOLE_TILES),
    ("p2p6_gn_aug_giou", "+ GIoU box loss", _WHOLE_TILES),
    ("chosen", "+ 16 crops of 200 px per batch (the demo config)", []),
    ("chosen_seed1", "the demo config, SEED 1", ["SEED", "1"]),
    ("chosen_smooth_l1", "the demo config with smooth L1", _SMOOTH_L1),
    ("chosen_scale0.8", "smooth L1, crops -> 160 px, 12/batch, test 320 px",
     _SMOOTH_L1 + ["INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "160",
                   "INPUT.MIN_SIZE_TEST", "320", "INPUT.MAX_SIZE_TEST", "320",
                   "SOLVER.IMS_PER_BATCH", "12"]),
    ("chosen_jitter", "the demo config + scale jitter 112-144 px",
     ["INPUT.MIN_SIZE_TRAIN", "(112, 128, 144)", "INPUT.MAX_SIZE_TRAIN", "144"]),
]  # fmt: skip
METRICS = ("AP", "AP50", "AP75", "APs", "APm")


def probe_opts(name):
    """The command-line overrides of probe ``name`` (after the holdout datasets)."""
    for n, _, opts in PROBES:
        if n == name:
            return HOLDOUT + list(opts)
    raise KeyError(f"unknown probe {name!r}; known: {[p[0] for p in PROBES]}")


def run_probe(name, root, threads, python=sys.executable):
    out = Path(root) / name
    if (out / "demo_results.json").is_file():
        return "finished"
    out.mkdir(parents=True, exist_ok=True)
    (out / "code.json").write_text(json.dumps(code_version(), indent=1))
    cmd = [python, "-m", "focal_det.demo", "--config-file", str(DEMO_CONFIG),
           "--output-dir", str(out), "--num-vis", "4", *probe_opts(name)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out / "stdout.log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"[demo_selection] {name}: {'done' if rc == 0 else f'FAILED (exit {rc})'}", flush=True)
    return "done" if rc == 0 else "failed"


def collect(root):
    rows = []
    for name, what, _ in PROBES:
        out = Path(root) / name
        row = {"probe": name, "what": what}
        if (out / "demo_results.json").is_file():
            res = json.loads((out / "demo_results.json").read_text())
            row.update({m: res["bbox"][m] for m in METRICS})
            row["seconds"] = res["seconds"]["train_and_eval"]
            row["threads"] = res["threads"]
        if (out / "code.json").is_file():
            row["code_id"] = json.loads((out / "code.json").read_text())["code_id"]
        rows.append(row)
    return rows


def to_markdown(rows):
    lines = [
        "| probe | what | " + " | ".join(METRICS) + " | train + eval (s) | threads | code |",
        "|---|---|" + "---|" * (len(METRICS) + 3),
    ]
    for r in rows:
        if "AP" not in r:
            lines.append(f"| {r['probe']} | {r['what']} |" + " not run |" * (len(METRICS) + 3))
            continue
        ap = " | ".join(f"{r[m]:.1f}" for m in METRICS)
        lines.append(f"| {r['probe']} | {r['what']} | {ap} | {r['seconds']:.0f} | "
                     f"{r['threads']} | {r.get('code_id', '?')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--output-root", default="output/demo_selection")
    parser.add_argument("--probes", nargs="*", default=None, help="default: all")
    parser.add_argument("--jobs", type=int, default=1, help="probes at once")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per probe")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    names = args.probes or [p[0] for p in PROBES]
    for n in names:
        probe_opts(n)  # unknown names fail before anything runs
    if not args.collect_only:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            states = list(pool.map(lambda n: run_probe(n, args.output_root, args.threads), names))
        if "failed" in states:
            print("[demo_selection] some probes failed: see their stdout.log", file=sys.stderr)
    table = to_markdown(collect(args.output_root))
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
