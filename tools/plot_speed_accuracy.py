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
When the two ranges differ by more than 5x the time axis is logarithmic. When our APs and the
paper's are far apart (e.g. the CPU demo's AP 5 against COCO's 30+), ``--layout auto`` draws the
two side by side, each on its own axes, instead of squashing one of them flat.

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

# The focal_det of this checkout (an editable install may point at another one).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def separate_panels(ours: List[Dict], paper: List[Dict]) -> bool:
    """
    True when our APs and the paper's are too far apart to share an axis usefully (one range's
    top below half of the other's bottom, e.g. a CPU demo model at AP 5 against COCO at 28-38):
    the two are then drawn side by side, each on its own axes, to compare the *shape* of the
    trade-off rather than squash one of them into a line.
    """
    if not ours or not paper:
        return False
    o = [p["ap"] for p in ours]
    q = [p["ap"] for p in paper]
    return max(o) < 0.5 * min(q) or max(q) < 0.5 * min(o)


def _draw(ax, points: List[Dict], paper_style: bool):
    greys = ["0.35", "0.6"]
    for k, series in enumerate(dict.fromkeys(p["series"] for p in points)):
        pts = sorted((p for p in points if p["series"] == series), key=lambda p: p["time_ms"])
        xs, ys = [p["time_ms"] for p in pts], [p["ap"] for p in pts]
        if paper_style:
            ax.plot(xs, ys, "o--", color=greys[k % 2], label=series, markersize=4)
        else:
            ax.plot(xs, ys, "s-", label=series)
        for p in pts:
            ax.annotate(p["label"], (p["time_ms"], p["ap"]), fontsize=6 if paper_style else 7,
                        color=greys[k % 2] if paper_style else None,
                        xytext=(3, -8) if paper_style else (3, 3),
                        textcoords="offset points")  # fmt: skip


def _time_axis(ax, points: List[Dict], ref: List[Dict]) -> bool:
    """Limits and label of the time axis; logarithmic when the points' range is > 5x ref's."""
    times = [p["time_ms"] for p in points]
    ref_t = [p["time_ms"] for p in ref] or times
    log_x = max(times) / min(times) > 5 * (max(ref_t) / min(ref_t))
    if log_x:
        ax.set_xscale("log")
    ax.set_xlim(min(times) * 0.8, max(times) * 1.25)
    ax.set_xlabel("inference time per image (ms)" + (", log scale" if log_x else ""))
    ax.grid(alpha=0.3)
    return log_x


def plot(
    ours: List[Dict],
    paper: List[Dict],
    output_dir: str,
    title: Optional[str],
    dpi=120,
    layout: str = "auto",
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    two = layout == "two" or (layout == "auto" and separate_panels(ours, paper))
    if two and ours and paper:
        fig, (ax_p, ax_o) = plt.subplots(1, 2, figsize=(11, 4.8))
        _draw(ax_p, paper, paper_style=True)
        _draw(ax_o, ours, paper_style=False)
        _time_axis(ax_p, paper, paper)
        log_x = _time_axis(ax_o, ours, ours)
        ax_p.set_ylabel("COCO AP (paper: COCO test-dev)")
        ax_o.set_ylabel("COCO AP (ours: on our test set)")
        ax_p.set_title("paper, Table 1e (Nvidia M40)", fontsize=9)
        ax_o.set_title("ours (measured here)", fontsize=9)
        for ax in (ax_p, ax_o):
            ax.legend(fontsize=7, loc="lower right")
        fig.suptitle(title or "Fig. 2: speed vs accuracy, side by side (different datasets and "
                     "machines: compare the shape, not the values)", fontsize=9)  # fmt: skip
    else:
        two = False
        fig, ax = plt.subplots(figsize=(7, 4.8))
        _draw(ax, paper, paper_style=True)
        _draw(ax, ours, paper_style=False)
        # Logarithmic when the combined range is > 5x the paper's own spread (different machines).
        log_x = _time_axis(ax, ours + paper, paper or ours)
        ax.set_ylabel("COCO AP")
        ax.set_title(title or "Fig. 2: speed vs accuracy (paper: Table 1e; times across machines "
                     "are not comparable)", fontsize=9)  # fmt: skip
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
        json.dump(
            {"ours": ours, "paper": paper, "log_time_axis": log_x,
             "layout": "two panels" if two else "one axis"}, f, indent=2,
        )  # fmt: skip
    return [png, csv_path, json_path]


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--results", required=True, help="our points: CSV or JSON (see above)")
    p.add_argument("--output-dir", default="docs/figures")
    p.add_argument("--no-paper", action="store_true", help="do not draw the paper's Table 1e")
    p.add_argument("--title", default=None)
    p.add_argument("--layout", default="auto", choices=["auto", "one", "two"],
                   help="one axis, or ours and the paper's side by side (auto: two panels when "
                   "the AP ranges are far apart)")  # fmt: skip
    p.add_argument("--dpi", type=int, default=120)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ours = load_results(args.results)
    paper = [] if args.no_paper else paper_points()
    for path in plot(ours, paper, args.output_dir, args.title, dpi=args.dpi, layout=args.layout):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
