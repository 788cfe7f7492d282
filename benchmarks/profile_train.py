"""
Where does a training iteration spend its time? torch.profiler over one (or more) training
iterations of ``ours`` and/or detectron2's ``RetinaNet`` (R50-FPN, same weights, same batch).

The forward pieces (backbone, head, anchors, label assignment, losses, classification loss) are
wrapped in ``record_function`` ranges so the summary shows each as a share of the iteration;
backward is reported per autograd op.

    flock /tmp/focal_bench.lock .venv/bin/python benchmarks/profile_train.py

Writes benchmarks/results/profile_train.json and the section between
<!-- BEGIN profile_train --> / <!-- END profile_train --> of docs/benchmarks.md.
"""
import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def _wrap(obj, attr, label):
    import torch

    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)


def profile_variant(name, weights, batch, iters, cfg_opts, row_limit):
    import torch
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    kind = "ours" if name.startswith("ours") else name
    model = bc.build_variant(kind, cfg_opts=cfg_opts)
    model.load_state_dict(torch.load(weights), strict=True)
    model.train()
    _wrap(model.backbone, "forward", "## backbone fwd")
    _wrap(model.head, "forward", "## head fwd")
    _wrap(model.anchor_generator, "forward", "## anchors")
    _wrap(model, "label_anchors", "## label_anchors")
    _wrap(model, "losses", "## losses (cls+box)")
    if hasattr(model, "cls_loss"):
        _wrap(model.cls_loss, "forward", "## cls loss module")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        losses = model(batch)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        with torch.profiler.record_function("## backward"):
            total.backward()
        with torch.profiler.record_function("## sgd step"):
            opt.step()

    with EventStorage():
        step()  # warm-up (allocations, momentum buffers)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                step()
        wall = (time.perf_counter() - t0) / iters
    ka = prof.key_averages()
    phases = {e.key[3:]: e.cpu_time_total / 1e6 / iters for e in ka if e.key.startswith("## ")}
    top_ops = sorted(
        ((e.key, e.self_cpu_time_total / 1e6 / iters) for e in ka if not e.key.startswith("## ")),
        key=lambda kv: -kv[1],
    )[:8]
    print(f"\n=== {name} {' '.join(cfg_opts)}: {wall:.2f} s/iter (profiled wall) ===")
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {k:24s} {v:7.3f} s  {100 * v / wall:5.1f} %")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=row_limit))
    return {"variant": name, "opts": cfg_opts, "wall_s": wall, "phases_s": phases,
            "top_ops_self_s": top_ops}


PHASES = ["backbone fwd", "head fwd", "anchors", "label_anchors", "losses (cls+box)",
          "cls loss module", "backward", "sgd step"]


def to_markdown(result):
    a, m = result["args"], result["machine"]
    lines = [
        "## Where a training iteration spends its time (torch.profiler)",
        "",
        *bc.measured_header(result),
        f"Machine: {m['cpu']}, {m['cores_visible']} cores, {a['threads']} torch threads; torch "
        f"{m['torch']}. Batch {a['batch']} x {a['height']}x{a['width']}, R50-FPN, K = 80, "
        "same weights; 1 warm-up iteration, then profiled. Seconds per iteration (share of "
        "the profiled wall time; the profiler itself adds overhead). The variants run one "
        "after the other, so load from other jobs differs between columns: read the shares; "
        "the side-by-side timing is model_bench's.",
        "",
        "| phase | " + " | ".join(f"`{r['variant']}`" for r in result["runs"]) + " |",
        "|---|" + "---|" * len(result["runs"]),
    ]
    for ph in PHASES + ["(wall, whole iteration)"]:
        cells = []
        for r in result["runs"]:
            v = r["wall_s"] if ph.startswith("(wall") else r["phases_s"].get(ph)
            cells.append("-" if v is None else f"{v:.2f} s ({100 * v / r['wall_s']:.0f} %)")
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    lines += ["", "Heaviest operators (self CPU s/iter): " + "; ".join(
        f"`{r['variant']}`: " + ", ".join(f"{k} {v:.2f}" for k, v in r["top_ops_self_s"][:4])
        for r in result["runs"]) + "."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["d2", "ours", "ours_fast"],
                   choices=["d2", "ours", "ours_fast"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1067)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25, help="rows of the per-op table")
    p.add_argument(
        "--ours-opts", nargs="*", default=[], help="config overrides for ours (KEY VALUE ...)"
    )
    p.add_argument("--json", default=str(bc.RESULTS / "profile_train.json"))
    p.add_argument("--doc", default=str(bc.DOCS), help="Markdown file to update ('' = none)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    batch = bc.synthetic_images(args.batch, args.height, args.width, seed=1)
    from model_bench import FAST_OPTS

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "d2.pth")
        bc.prepare_weights("d2", weights)
        for name in args.variants:
            opts = {"d2": [], "ours": [], "ours_fast": FAST_OPTS}[name]
            opts = opts + (args.ours_opts if name.startswith("ours") else [])
            runs.append(profile_variant(name, weights, batch, args.iters, opts, args.rows))
    result = {
        **bc.run_record(under_lock=True),
        "args": vars(args),
        "runs": runs,
    }
    bc.publish(result, to_markdown(result), args.json, args.doc, "profile_train")


if __name__ == "__main__":
    main()
