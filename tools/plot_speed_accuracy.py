#!/usr/bin/env python
"""
Figure 2 of the paper: speed (inference time per image) vs accuracy (COCO AP), our measured
points next to the paper's Table 1e, which are drawn in grey and labelled as the paper's.

Our points come from a results file (CSV or JSON) with one entry per model:

    label     free text shown next to the point (e.g. "R50-400")
    series    points of one series are joined by a line (e.g. "ours R50, CPU 1 thread")
    ap        COCO box AP (0-100) from the evaluation command (train_net.py --eval-only)
    time_ms   inference time per image (ms) from the benchmark command
    source    (optional) the commands that measured ap and time_ms, kept in the output JSON

JSON: a list of such objects, or {"points": [...]}. CSV: a header row with these names.
Instead of a number, ``ap`` may be given as ``run:<output_dir>``: the AP is then read from that
training/evaluation folder's log.txt (the evaluation after model_final, as tools/run_table.py).

Times measured on different machines are not comparable: the paper's are on an Nvidia M40 GPU.
When the two ranges differ by more than 5x the time axis is logarithmic.

    python tools/plot_speed_accuracy.py --results ours.csv --output-dir docs/figures

Writes fig2_speed_accuracy.png, fig2_speed_accuracy.csv (every plotted point, ours and the
paper's, with its origin) and fig2_speed_accuracy.json.
"""

import argparse
import csv
import json
import os
import sys
from typing import Dict, List, Optional

REQUIRED = ("label", "ap", "time_ms")


def load_results(path: str) -> List[Dict]:
    """Our points from a CSV or JSON results file (see the module docstring), validated."""
    if not os.path.isfile(path):
        raise SystemExit(f"Results file {path} does not exist")
    if path.lower().endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        points = data.get("points") if isinstance(data, dict) else data
        if not isinstance(points, list):
            raise SystemExit(f"{path}: expected a JSON list of points or {{'points': [...]}}")
    else:
        with open(path, newline="") as f:
            points = list(csv.DictReader(f))
    out = []
    base = os.path.dirname(os.path.abspath(path))
    for i, p in enumerate(points):
        missing = [k for k in REQUIRED if k not in p or p[k] in (None, "")]
        if missing:
            raise SystemExit(f"{path}: entry {i} ({p}) lacks {missing}; needs {REQUIRED}")
        ap = p["ap"]
        if isinstance(ap, str) and ap.startswith("run:"):
            ap = _ap_from_run(os.path.join(base, ap[4:]), path, i)
        try:
            point = {
                "label": str(p["label"]),
                "series": str(p.get("series") or "ours"),
                "ap": float(ap),
                "time_ms": float(p["time_ms"]),
                "source": str(p.get("source") or ""),
            }
        except ValueError as e:
            raise SystemExit(f"{path}: entry {i}: ap and time_ms must be numbers ({e})")
        if point["time_ms"] <= 0:
            raise SystemExit(f"{path}: entry {i}: time_ms must be > 0; got {point['time_ms']}")
        out.append(point)
    if not out:
        raise SystemExit(f"{path} holds no points")
    return out


def _ap_from_run(folder: str, path: str, i: int) -> float:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_table import parse_final_metrics

    m = parse_final_metrics(os.path.join(folder, "log.txt"))
    if m is None or "AP" not in m:
        raise SystemExit(f"{path}: entry {i}: no final evaluation in {folder}/log.txt")
    return m["AP"]


def paper_points() -> List[Dict]:
    """Table 1e of the paper as points (series per backbone depth)."""
    from focal_det.paper_tables import get_paper_table

    return [
        {
            "label": f"{r['scale']}",
            "series": f"paper RetinaNet-{r['depth']} (M40 GPU, test-dev)",
            "ap": float(r["AP"]),
            "time_ms": float(r["time_ms"]),
            "source": "paper Table 1e",
        }
        for r in get_paper_table("1e").rows
    ]


def plot(ours: List[Dict], paper: List[Dict], output_dir: str, title: Optional[str], dpi=120):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    greys = ["0.35", "0.6"]
    for k, series in enumerate(dict.fromkeys(p["series"] for p in paper)):
        pts = sorted((p for p in paper if p["series"] == series), key=lambda p: p["time_ms"])
        ax.plot([p["time_ms"] for p in pts], [p["ap"] for p in pts], "o--", color=greys[k % 2],
                label=series, markersize=4)  # fmt: skip
        for p in pts:
            ax.annotate(p["label"], (p["time_ms"], p["ap"]), fontsize=6, color=greys[k % 2],
                        xytext=(3, -8), textcoords="offset points")  # fmt: skip
    for series in dict.fromkeys(p["series"] for p in ours):
        pts = sorted((p for p in ours if p["series"] == series), key=lambda p: p["time_ms"])
        ax.plot([p["time_ms"] for p in pts], [p["ap"] for p in pts], "s-", label=series)
        for p in pts:
            ax.annotate(p["label"], (p["time_ms"], p["ap"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    times = [p["time_ms"] for p in ours + paper]
    ours_t = [p["time_ms"] for p in ours]
    paper_t = [p["time_ms"] for p in paper]
    # Logarithmic when the combined range is > 5x the paper's own spread (different machines).
    ref = paper_t or ours_t
    log_x = max(times) / min(times) > 5 * (max(ref) / min(ref))
    if log_x:
        ax.set_xscale("log")
    ax.set_xlim(min(times) * 0.8, max(times) * 1.25)
    ax.set_xlabel("inference time per image (ms)" + (", log scale" if log_x else ""))
    ax.set_ylabel("COCO AP")
    ax.set_title(title or "Fig. 2: speed vs accuracy (paper: Table 1e; times across machines "
                 "are not comparable)", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png = os.path.join(output_dir, "fig2_speed_accuracy.png")
    fig.savefig(png, dpi=dpi)
    plt.close(fig)

    csv_path = os.path.join(output_dir, "fig2_speed_accuracy.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["origin", "series", "label", "ap", "time_ms", "source"])
        for origin, pts in (("ours", ours), ("paper", paper)):
            for p in pts:
                w.writerow([origin, p["series"], p["label"], p["ap"], p["time_ms"], p["source"]])
    json_path = os.path.join(output_dir, "fig2_speed_accuracy.json")
    with open(json_path, "w") as f:
        json.dump({"ours": ours, "paper": paper, "log_time_axis": log_x}, f, indent=2)
    return [png, csv_path, json_path]


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--results", required=True, help="our points: CSV or JSON (see above)")
    p.add_argument("--output-dir", default="docs/figures")
    p.add_argument("--no-paper", action="store_true", help="do not draw the paper's Table 1e")
    p.add_argument("--title", default=None)
    p.add_argument("--dpi", type=int, default=120)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ours = load_results(args.results)
    paper = [] if args.no_paper else paper_points()
    for path in plot(ours, paper, args.output_dir, args.title, dpi=args.dpi):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
