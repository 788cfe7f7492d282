"""
Forward + backward time and peak extra memory of the focal loss: focal_det's fused losses
(compiled and eager) vs ``fvcore.nn.sigmoid_focal_loss`` vs ``torchvision.ops.sigmoid_focal_loss``,
measured side by side in one run, with a memory-bandwidth lower bound, at two scales:

* ``paper``: N images of HxW (default 2 x 800x1333), all anchors of P3-P7 with A = 9 (the image
  is padded to a multiple of 32 as detectron2's FPN does: 800x1344 -> 201,600 anchors per
  image), K = 80 classes;
* ``demo``: one training iteration of the demo (``--demo-config``, default
  configs/demo/retinanet_mobilenet_v2_trees.yaml): SOLVER.IMS_PER_BATCH images, K =
  MODEL.RETINANET.NUM_CLASSES, and the anchors of the model that config builds (random weights)
  on a dataset tile resized as its INPUT.MIN/MAX_SIZE_TRAIN resize it (derived, not written
  down, so that the numbers follow the config).

~0.1% foreground anchors, ~1% ignored; FL with alpha = 0.25, gamma = 2, summed.

Variants (each computes the same loss value; checked at start-up):

* ``fvcore``            fvcore.nn.sigmoid_focal_loss(x, onehot, 0.25, 2, "sum")
* ``torchvision``       torchvision.ops.sigmoid_focal_loss(x, onehot, 0.25, 2, "sum")
* ``ours_dropin``       focal_det.losses.sigmoid_focal_loss(x, onehot, 0.25, 2, "sum",
                        impl="compiled")
* ``ours_dropin_eager`` the same with impl="eager"
* ``ours_labels``       focal_det.losses.sigmoid_loss_from_labels(x, labels, impl="compiled")
                        (the detector's path)
* ``ours_labels_eager`` the same with impl="eager" (no torch.compile)

Each table also names the implementation IMPL "auto" picks at its size.

The dense variants get a prebuilt (N*R, K) float one-hot target (not timed, not counted as extra
memory): that favours them, since a detector must build it every iteration.

Time: median over ``--repeats`` (paper) / ``--demo-repeats`` (demo) of forward + ``backward()``,
variants interleaved round-robin so that load from other processes hits all of them alike; the
first call (torch.compile warm-up for the compiled variants) is reported separately. Peak extra
memory on CPU: each variant runs in a fresh subprocess with glibc's malloc told to mmap every
block >= 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed memory goes back to the OS; after a warm-up
call the peak RSS counter is reset (/proc/self/clear_refs) and the peak RSS (VmHWM) of one
forward + backward minus the RSS before it is the extra memory: it includes the (N*R, K)
gradient every variant must return. On CUDA: max_memory_allocated above the memory held before
the call.

Bandwidth bound: the fewest bytes any implementation must move -- read the logits and the
targets (one-hot floats for the dense API, int64 labels for ours_labels), write the gradient --
divided by the copy bandwidth measured in this run (large tensor copy, bytes read + written per
second). "x bound" = measured time / that bound.

Usage (the documented run; hold the lock exclusively so no other job shares the cores)::

    flock -x /tmp/focal_bench.lock .venv/bin/python benchmarks/loss_bench.py --threads 2

On a CUDA machine it runs the tables in bfloat16 and float32 (``--device auto``).
"""
import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from bench_common import num_anchors  # noqa: E402  (part of this script's API: tests use it)

REPO = bc.REPO
DEFAULT_JSON = bc.RESULTS / "loss_bench.json"
DEFAULT_MD = bc.DOCS
MARKER = "loss_bench"
BEGIN, END = f"<!-- BEGIN {MARKER} -->", f"<!-- END {MARKER} -->"
VARIANTS = (
    "fvcore", "torchvision", "ours_dropin", "ours_dropin_eager", "ours_labels",
    "ours_labels_eager",
)
SCALES = ("paper", "demo")
DEMO_CONFIG = REPO / "configs" / "demo" / "retinanet_mobilenet_v2_trees.yaml"
ALPHA, GAMMA = 0.25, 2.0


def num_anchors_detectron2(height, width):
    """The same count from detectron2's own DefaultAnchorGenerator (cross-check)."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.anchor_generator import build_anchor_generator

    cfg = get_cfg()
    sizes = [[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in [32, 64, 128, 256, 512]]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = sizes
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    shapes = [ShapeSpec(stride=s) for s in (8, 16, 32, 64, 128)]
    gen = build_anchor_generator(cfg, shapes)
    _, level_sizes = num_anchors(height, width)
    feats = [torch.zeros(1, 1, h, w) for h, w in level_sizes]
    return sum(len(b) for b in gen(feats))


def demo_scale(config_file=DEMO_CONFIG):
    """
    The loss's input in one training iteration of the demo: {images, anchors_per_image,
    num_classes, height, width}. The model is built from ``config_file`` (random weights) and its
    anchor generator run on the features of one dataset tile, resized as the config's training
    resize does (INPUT.MIN_SIZE_TRAIN: the largest choice) and padded as its preprocessing does.
    """
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model

    from focal_det import add_focal_config
    from focal_det.config_check import merge_config_file
    from focal_det.demo.deepforest import _DEFAULT_PARAMS

    cfg = get_cfg()
    add_focal_config(cfg)
    merge_config_file(cfg, str(config_file))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS, cfg.MODEL.MOBILENET.WEIGHTS = "cpu", "", "none"
    model = build_model(cfg).eval()
    tile = _DEFAULT_PARAMS["tile_size"]  # every training image of the demo's dataset is a tile
    h, w = T.ResizeShortestEdge.get_output_shape(
        tile, tile, max(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN
    )
    with torch.no_grad():
        images = model.preprocess_image([{"image": torch.zeros(3, h, w)}])
        features = model.backbone(images.tensor)
        anchors = model.anchor_generator([features[f] for f in model.head_in_features])
    return dict(
        images=cfg.SOLVER.IMS_PER_BATCH, anchors_per_image=sum(len(a) for a in anchors),
        num_classes=model.num_classes, height=h, width=w,
        config=str(Path(config_file).resolve().relative_to(REPO)),
    )


def paper_scale(args):
    R, _ = num_anchors(args.height, args.width)
    return dict(images=args.images, anchors_per_image=R, num_classes=args.num_classes,
                height=args.height, width=args.width)


# ---------------------------------------------------------------------------------------------
def make_inputs(num_images, anchors_per_image, num_classes, fg_fraction, device, dtype, seed=0):
    M = num_images * anchors_per_image
    g = torch.Generator().manual_seed(seed)
    # logits around the prior-probability init (pi = 0.01 -> -4.6) with some spread
    x = (torch.randn(M, num_classes, generator=g) - 4.6).to(device=device, dtype=dtype)
    labels = torch.full((M,), num_classes, dtype=torch.int64)
    fg = torch.randperm(M, generator=g)[: max(1, int(round(M * fg_fraction)))]
    labels[fg] = torch.randint(0, num_classes, (len(fg),), generator=g)
    labels[torch.randperm(M, generator=g)[: M // 100]] = -1  # ~1% ignored anchors
    labels = labels.to(device)
    return x, labels


def make_variant(name, labels, num_classes, dtype):
    """Returns (fn(x) -> loss, needs dense target, bytes of targets per anchor)."""
    from fvcore.nn import sigmoid_focal_loss as fv_focal
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    from focal_det.losses import sigmoid_focal_loss, sigmoid_loss_from_labels

    valid = labels >= 0
    if name.startswith("ours_labels"):
        impl = "eager" if name.endswith("_eager") else "compiled"
        return (
            lambda x: sigmoid_loss_from_labels(x, labels, alpha=ALPHA, gamma=GAMMA, impl=impl),
            None,
        )
    # dense API: ignored anchors get all-zero targets AND a zero weight via masking the logits
    # would cost a copy; instead they are treated as background here, for all three dense
    # variants alike (the value check below compares dense variants with each other).
    onehot = torch.zeros(labels.numel(), num_classes, dtype=dtype, device=labels.device)
    fgm = valid & (labels < num_classes)
    onehot[fgm.nonzero().squeeze(1), labels[fgm]] = 1
    fns = {
        "fvcore": lambda x: fv_focal(x, onehot, ALPHA, GAMMA, "sum"),
        "torchvision": lambda x: tv_focal(x, onehot, ALPHA, GAMMA, "sum"),
        "ours_dropin": lambda x: sigmoid_focal_loss(x, onehot, ALPHA, GAMMA, "sum",
                                                    impl="compiled"),
        "ours_dropin_eager": lambda x: sigmoid_focal_loss(x, onehot, ALPHA, GAMMA, "sum",
                                                          impl="eager"),
    }
    return fns[name], onehot


def fwd_bwd(fn, x):
    x.grad = None
    loss = fn(x)
    loss.backward()
    return loss


# ---------------------------------------------------------------------------------------------
# memory: one variant per fresh process (CPU), or CUDA allocator statistics
# ---------------------------------------------------------------------------------------------
def memory_child(args):
    """Runs in a fresh process: prints the peak extra RSS (bytes) of one forward + backward."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = getattr(torch, args.dtypes[0])
    x, labels = make_inputs(
        args.images, args.anchors_per_image, args.num_classes, args.fg_fraction, device, dtype
    )
    fn, _ = make_variant(args.memory_child, labels, args.num_classes, dtype)
    x.requires_grad_()
    fwd_bwd(fn, x)  # warm-up (compiles ours); its gradient stays, like in training
    x.grad = None
    import gc

    gc.collect()
    if not bc.reset_peak_rss():  # VmHWM back to the current RSS
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): Linux >= 4.0 only")
    before = bc.rss_mb()
    fwd_bwd(fn, x)
    print(json.dumps({"peak_extra_bytes": round((bc.peak_rss_mb() - before) * 2**20)}))


def measure_memory_cpu(args, scale, name, dtype_name):
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--memory-child", name,
        "--images", str(scale["images"]), "--anchors-per-image", str(scale["anchors_per_image"]),
        "--num-classes", str(scale["num_classes"]), "--fg-fraction", str(args.fg_fraction),
        "--threads", str(args.threads), "--dtypes", dtype_name, "--device", "cpu",
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024), MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if out.returncode != 0:
        raise RuntimeError(f"memory child {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def measure_memory_cuda(fn, x):
    fwd_bwd(fn, x)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(fn, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------------------------------------
def run_table(args, scale_name, scale, device, dtype_name):
    from focal_det.losses.functional import _resolve_impl

    dtype = getattr(torch, dtype_name)
    x0, labels = make_inputs(
        scale["images"], scale["anchors_per_image"], scale["num_classes"], args.fg_fraction,
        device, dtype,
    )
    M, K = x0.shape
    itemsize = x0.element_size()
    repeats = args.repeats if scale_name == "paper" else args.demo_repeats
    variants = {}
    for name in args.variants:
        fn, onehot = make_variant(name, labels, scale["num_classes"], dtype)
        target_bytes = onehot.numel() * onehot.element_size() if onehot is not None else M * 8
        variants[name] = dict(fn=fn, target_bytes=target_bytes, times=[])
        del onehot

    x = x0.clone().requires_grad_()
    values = {}
    for name, v in variants.items():  # first call: compile warm-up + value check
        bc.sync(device)
        t0 = time.perf_counter()
        loss = fwd_bwd(v["fn"], x)
        bc.sync(device)
        v["first_call_s"] = time.perf_counter() - t0
        values[name] = loss.item()
    dense = [values[n] for n in values if not n.startswith("ours_labels")]
    lab = [values[n] for n in values if n.startswith("ours_labels")]
    for group in (dense, lab):
        for val in group:
            if not math.isclose(val, group[0], rel_tol=1e-3):
                raise RuntimeError(f"variants disagree on the loss value: {values}")

    for _ in range(repeats):
        for name, v in variants.items():  # interleaved: contention hits all variants alike
            bc.sync(device)
            t0 = time.perf_counter()
            fwd_bwd(v["fn"], x)
            bc.sync(device)
            v["times"].append(time.perf_counter() - t0)
    x.grad = None

    bw = bc.copy_bandwidth(device)
    rows = []
    for name, v in variants.items():
        if args.memory == "none":
            mem = None
        elif device.type == "cuda":
            mem = measure_memory_cuda(v["fn"], x)
        else:
            mem = measure_memory_cpu(args, scale, name, dtype_name)
        must_move = M * K * itemsize * 2 + v["target_bytes"]  # read logits, targets; write grad
        t = statistics.median(v["times"])
        rows.append(dict(
            variant=name, median_s=t, min_s=min(v["times"]), times_s=v["times"],
            first_call_s=v["first_call_s"], loss=values[name], peak_extra_bytes=mem,
            bound_bytes=must_move, bound_s=must_move / bw, x_bound=t / (must_move / bw),
        ))
    ref = {r["variant"]: r for r in rows}.get("fvcore")
    for r in rows:
        r["speedup_vs_fvcore"] = ref["median_s"] / r["median_s"] if ref else None
        r["memory_vs_fvcore"] = (
            r["peak_extra_bytes"] / ref["peak_extra_bytes"]
            if ref and r["peak_extra_bytes"] and ref["peak_extra_bytes"] else None
        )
    return dict(scale=scale_name, **scale, device=device.type, dtype=dtype_name,
                num_logits=M * K, anchors=M, repeats=repeats, copy_bandwidth_Bps=bw,
                auto_impl=_resolve_impl("auto", x0), rows=rows)


def bench_lock_held(path="/tmp/focal_bench.lock"):
    """True when another open file description holds the benchmark lock (our flock wrapper)."""
    import fcntl

    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def machine_info(device, threads):
    """bench_common's machine description plus what this table reports: load, threads, date."""
    info = bc.machine_description()
    if device.type != "cuda":
        info.pop("gpu", None)  # a CPU table names no GPU even where one is present
    info.update(
        load_avg_start=os.getloadavg(), logical_cpus=os.cpu_count(), torch_threads=threads,
        platform=platform.platform(), date_utc=bc.now_utc(),
    )
    return info


def _mib(b):
    if b is None:
        return "n/a"
    return f"{b / 2**20:,.0f} MiB" if b >= 10 * 2**20 else f"{b / 2**10:,.0f} KiB"


def _scale_line(t, a):
    if t["scale"] == "paper":
        return (
            f"Paper scale: {t['images']} images of {t['height']}x{t['width']} -> "
            f"{t['anchors_per_image']:,} anchors per image (P3-P7, A = 9, padded to /32; "
            f"detectron2's anchor generator agrees: {t['anchors_per_image_detectron2']:,}), "
            f"K = {t['num_classes']}"
        )
    return (
        f"Demo scale (`{t['config']}`): SOLVER.IMS_PER_BATCH = {t['images']} tiles resized to "
        f"{t['height']}x{t['width']} -> {t['anchors_per_image']:,} anchors per image (the "
        f"config's model and anchor generator), K = {t['num_classes']}"
    )


def render_markdown(result):
    a = result["args"]
    m = result["machine"]
    lines = [
        "## Loss: fused focal loss (compiled, eager) vs fvcore vs torchvision (forward + backward)",
        "",
        f"Command: `{result['command']}` (commit `{result['commit']}`)  ",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch "
        "threads" + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}; {m['date_utc']}; 1-min load average "
        f"{m['load_avg_start'][0]:.1f} at the start, "
        f"{m.get('load_avg_end', [float('nan')])[0]:.1f} at the end (the variants are "
        "interleaved so that any other load hits them alike).  ",
        f"{a['fg_fraction']:.1%} foreground and 1% ignored anchors, FL alpha 0.25 gamma 2, "
        "summed. `ours_dropin` / `ours_labels`: IMPL 'compiled'; `*_eager`: IMPL 'eager'.",
        "",
        "Peak extra memory: CPU = peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS "
        "before one warmed-up forward + backward, each variant in a fresh process with "
        "MALLOC_MMAP_THRESHOLD_=64KiB (freed blocks return to the OS); includes the gradient. "
        "CUDA = torch.cuda.max_memory_allocated above the memory held before the call. "
        "Bound = (read logits + targets, write gradient) bytes / measured copy bandwidth; "
        "'x bound' = time / bound. 'first call' includes torch.compile warm-up. The dense "
        "variants get a prebuilt one-hot target (not timed, not counted), which favours them.",
        "",
    ]
    for t in result["tables"]:
        lines += [
            f"### {t['scale'].capitalize()} scale, {t['device'].upper()} {t['dtype']} "
            f"({t['anchors']:,} anchors x {t['num_classes']} = {t['num_logits']:,} logits)",
            "",
            f"{_scale_line(t, a)}; median of {t['repeats']} interleaved repeats; copy bandwidth "
            f"{t['copy_bandwidth_Bps'] / 1e9:.1f} GB/s; IMPL 'auto' runs {t['auto_impl']} at "
            "this size.",
            "",
            "| variant | fwd+bwd (ms) | speed-up vs fvcore | peak extra mem | mem vs fvcore "
            "| bound (ms) | x bound | first call (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in t["rows"]:
            sp = r["speedup_vs_fvcore"]
            mv = r["memory_vs_fvcore"]
            ms = r["median_s"] * 1e3
            lines.append(
                f"| {r['variant']} | {f'{ms:,.0f}' if ms >= 100 else f'{ms:.2f}'} | "
                f"{'' if sp is None else f'{sp:.1f}x'} | {_mib(r['peak_extra_bytes'])} | "
                f"{'' if mv is None else f'1/{1 / mv:.1f}'} | {r['bound_s'] * 1e3:.2f} | "
                f"{r['x_bound']:.0f}x | {r['first_call_s']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", nargs="+", default=list(SCALES), choices=SCALES)
    p.add_argument("--images", type=int, default=2, help="paper scale")
    p.add_argument("--height", type=int, default=800, help="paper scale")
    p.add_argument("--width", type=int, default=1333, help="paper scale")
    p.add_argument("--num-classes", type=int, default=80, help="paper scale")
    p.add_argument("--demo-config", default=str(DEMO_CONFIG), help="demo scale")
    p.add_argument("--fg-fraction", type=float, default=0.001)
    p.add_argument("--repeats", type=int, default=5, help="paper scale")
    p.add_argument("--demo-repeats", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch intra-op threads (default: all logical CPUs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="default: float32 on CPU; bfloat16 float32 on CUDA")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--memory", default="auto", choices=["auto", "none"],
                   help="'none' skips the peak-memory measurement")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--markdown", default=str(DEFAULT_MD),
                   help="file whose loss_bench section is rewritten ('' to skip)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--anchors-per-image", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        args.dtypes = args.dtypes or ["float32"]
        memory_child(args)
        return None
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.dtypes = args.dtypes or (["bfloat16", "float32"] if device.type == "cuda" else ["float32"])
    torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/loss_bench.py"]
                       + list(sys.argv[1:] if argv is None else argv))
    if bench_lock_held():
        command = "flock -x /tmp/focal_bench.lock " + command
    scales = {}
    for name in args.scales:
        if name == "paper":
            scales[name] = paper_scale(args)
            scales[name]["anchors_per_image_detectron2"] = num_anchors_detectron2(
                args.height, args.width
            )
        else:
            scales[name] = demo_scale(args.demo_config)
    result = dict(
        command=command,
        commit=bc.git_commit(),
        machine=machine_info(device, args.threads),
        args={k: v for k, v in vars(args).items()
              if k not in ("memory_child", "anchors_per_image")},
        tables=[],
    )
    for scale_name, scale in scales.items():
        for dtype_name in args.dtypes:
            table = run_table(args, scale_name, scale, device, dtype_name)
            result["tables"].append(table)
            for r in table["rows"]:
                print(f"{scale_name} {device.type} {dtype_name} {r['variant']:18s} "
                      f"{r['median_s'] * 1e3:9.2f} ms  x{(r['speedup_vs_fvcore'] or 0):5.1f} vs "
                      f"fvcore  mem {_mib(r['peak_extra_bytes'])}  {r['x_bound']:.0f}x bound",
                      flush=True)
    result["machine"]["load_avg_end"] = os.getloadavg()
    if args.json:
        bc.write_json(result, args.json)
    if args.markdown:
        bc.write_doc_section(MARKER, render_markdown(result), args.markdown)
    return result


if __name__ == "__main__":
    main()
