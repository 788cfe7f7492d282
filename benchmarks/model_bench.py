"""
Side-by-side speed and memory of RetinaNet R50-FPN implementations, in ONE run:

  ours         focal_det FocalRetinaNet, default config (+ --ours-opts)
  ours_fast    FocalRetinaNet with the speed switches: MODEL.FOCAL.CHANNELS_LAST=True and
               MODEL.FOCAL.FOLD_FROZEN_BN=True (numerically equal: modeling/speed_switches.py)
  ours_compiled  ours_fast + MODEL.FOCAL.COMPILE_HEAD=True (not in the default list: compiling
               the head takes minutes on a 2-core CPU)
  d2           detectron2's RetinaNet, same config, same weights
  torchvision  torchvision's RetinaNet as retinanet_resnet50_fpn builds it (FrozenBN, 3 trainable
               stages, like the others), same input sizes, K classes

Measured: training iteration time (forward + backward + SGD step, batch --batch of the
--train-size), its peak memory, and inference time per image (batch 1) at each --infer-sizes
short side (aspect 4:3). Warm-up iterations are excluded. Every (variant, phase) runs in a fresh
subprocess, so that peak memory is that variant's alone; the variants are interleaved over
--rounds rounds (order reversed every other round) and the median is reported, so that load
from other processes affects all variants alike. Ratios to detectron2 are the headline.

Peak memory on CPU: in each subprocess, after the model, its weights and the batch exist and
freed heap is returned to the OS (malloc_trim), the RSS is read (baseline) and the kernel's
peak-RSS counter is reset (/proc/self/clear_refs); after the measured iterations VmHWM is read.
"peak extra" = VmHWM - baseline: what the iterations need beyond the model and data (activations,
gradients, optimizer state, allocator caching). On CUDA: torch.cuda.max_memory_allocated.

Writes benchmarks/results/model_bench.json and the section between
<!-- BEGIN model_bench --> / <!-- END model_bench --> of docs/benchmarks.md.

  flock /tmp/focal_bench.lock .venv/bin/python benchmarks/model_bench.py
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

FAST_OPTS = ["MODEL.FOCAL.CHANNELS_LAST", "True", "MODEL.FOCAL.FOLD_FROZEN_BN", "True"]
VARIANTS = {
    # name: (kind, config overrides)
    "ours": ("ours", []),
    "ours_fast": ("ours", FAST_OPTS),
    "ours_compiled": ("ours", FAST_OPTS + ["MODEL.FOCAL.COMPILE_HEAD", "True"]),
    "d2": ("d2", []),
    "torchvision": ("torchvision", []),
}
DEFAULT_VARIANTS = ["ours", "ours_fast", "d2", "torchvision"]
RESULT_TAG = "MODEL_BENCH_RESULT "


# ---------------------------------------------------------------------------------------------
# worker: one (variant, phase) in a fresh process
# ---------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _mem_start(device):
    import torch

    bc.release_free_memory()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    base = bc.rss_mb()
    bc.reset_peak_rss()
    return base


def _mem_peak(device):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return bc.peak_rss_mb()


def run_worker(spec):
    import torch

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    kind = spec["kind"]
    amp = spec.get("amp", False)
    torch.manual_seed(0)
    t_build = time.perf_counter()
    model = bc.build_variant(
        kind,
        cfg_opts=spec["opts"],
        num_classes=spec["num_classes"],
        device=device,
        test_size=(spec["sizes"][0][0], 10000),
    )
    state = torch.load(spec["weights"], map_location=device)
    model.load_state_dict(state, strict=True)
    del state
    build_s = time.perf_counter() - t_build
    out = {"variant": spec["variant"], "phase": spec["phase"], "build_s": build_s}

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.float16, enabled=amp)

    if spec["phase"] == "train":
        from detectron2.utils.events import EventStorage

        (h, w) = spec["sizes"][0]
        batch = bc.synthetic_images(spec["batch"], h, w, num_classes=spec["num_classes"], seed=1)
        if device == "cuda":
            for b in batch:
                b["image"] = b["image"].to(device)
                b["instances"] = b["instances"].to(device)
        if kind == "torchvision":
            images, targets = bc.to_torchvision(batch)
            if device == "cuda":
                images = [i.to(device) for i in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

            def forward():
                return model(images, targets)

        else:

            def forward():
                return model(batch)

        model.train()
        opt = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9
        )
        base = _mem_start(device)
        times, cpu_times, losses = [], [], []
        with EventStorage():
            for i in range(spec["warmup"] + spec["iters"]):
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                with autocast():
                    loss_dict = forward()
                total = sum(loss_dict.values())
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                _sync(device)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if i >= spec["warmup"]:
                    times.append(dt)
                    cpu_times.append(dc)
                losses.append(float(total.detach()))
        out.update(times=times, cpu_times=cpu_times, losses=losses, mem_base_mb=base,
                   mem_peak_mb=_mem_peak(device))
    else:
        model.eval()
        base = _mem_start(device)
        per_size = {}
        for h, w in spec["sizes"]:
            img = bc.synthetic_images(1, h, w, num_classes=spec["num_classes"], seed=2)[0]
            if device == "cuda":
                img["image"] = img["image"].to(device)
            if kind == "torchvision":
                model.transform.min_size = (h,)
                x = [img["image"].flip(0) / 255.0]
            else:
                x = [{"image": img["image"], "height": h, "width": w}]
            if device != "cuda":
                bc.reset_peak_rss()
            else:
                torch.cuda.reset_peak_memory_stats()
            times, cpu_times = [], []
            with torch.no_grad():
                for i in range(spec["warmup"] + spec["iters"]):
                    _sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    with autocast():
                        res = model(x)
                    _sync(device)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    if i >= spec["warmup"]:
                        times.append(dt)
                        cpu_times.append(dc)
            r = res[0]
            ndet = len(r["boxes"]) if kind == "torchvision" else len(r["instances"])
            per_size[str(h)] = {"times": times, "cpu_times": cpu_times,
                                "mem_peak_mb": _mem_peak(device), "dets": ndet}
        out.update(per_size=per_size, mem_base_mb=base)
    return out


# ---------------------------------------------------------------------------------------------
# orchestrator
# ---------------------------------------------------------------------------------------------
def _size(short, aspect=4 / 3):
    return (short, int(round(short * aspect)))


def _launch(spec, env, log, in_process=False):
    t0 = time.perf_counter()
    if in_process:  # smoke tests: no process isolation, memory numbers are not meaningful
        res = run_worker(spec)
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise RuntimeError(
                f"worker {spec['variant']}/{spec['phase']} failed (exit {proc.returncode}); "
                "its output is above"
            )
        res = json.loads(lines[-1][len(RESULT_TAG):])
    wall = time.perf_counter() - t0
    res["process_wall_s"] = wall
    if spec["phase"] == "train":
        peak = res["mem_peak_mb"] - res["mem_base_mb"]
        what = (f"{statistics.median(res['times']):7.3f} s/iter "
                f"(CPU {statistics.median(res['cpu_times']):7.3f} s)  peak +{peak:.0f} MiB")
    else:
        what = "  ".join(
            f"{k}px {1e3 * statistics.median(v['times']):6.0f} ms"
            for k, v in res["per_size"].items()
        )
    log(f"  {spec['variant']:14s} {spec['phase']:5s} {what}  ({wall:.0f} s)")
    return res


def summarize(runs, variants, infer_sizes):
    """Median over all measured iterations of all rounds, per variant."""
    summary = {}
    for v in variants:
        tr = [r for r in runs if r["variant"] == v and r["phase"] == "train"]
        inf = [r for r in runs if r["variant"] == v and r["phase"] == "infer"]
        s = {}
        if tr:
            s["train_s_per_iter"] = statistics.median([t for r in tr for t in r["times"]])
            s["train_cpu_s_per_iter"] = statistics.median(
                [t for r in tr for t in r["cpu_times"]]
            )
            s["train_peak_extra_mb"] = statistics.median(
                [r["mem_peak_mb"] - r["mem_base_mb"] for r in tr]
            )
            s["train_base_mb"] = statistics.median([r["mem_base_mb"] for r in tr])
        for short in infer_sizes:
            k = str(short)
            vals = [t for r in inf for t in r["per_size"][k]["times"]]
            if vals:
                s[f"infer_{k}_s_per_img"] = statistics.median(vals)
                s[f"infer_{k}_cpu_s_per_img"] = statistics.median(
                    [t for r in inf for t in r["per_size"][k]["cpu_times"]]
                )
                s[f"infer_{k}_peak_extra_mb"] = statistics.median(
                    [r["per_size"][k]["mem_peak_mb"] - r["mem_base_mb"] for r in inf]
                )
                s[f"infer_{k}_dets"] = inf[-1]["per_size"][k]["dets"]
        summary[v] = s
    ref = summary.get("d2", {})
    for s in summary.values():
        s["ratios_vs_d2"] = {
            k: s[k] / ref[k]
            for k in s
            if k in ref and isinstance(s[k], float) and ref[k] and not k.endswith("dets")
        }
    return summary


def to_markdown(result):
    a = result["args"]
    m = result["machine"]
    sizes = a["infer_sizes"]
    unit = "GPU MiB (max allocated)" if a["device"] == "cuda" else "MiB RSS"
    lines = [
        "## Train / inference: ours vs detectron2 vs torchvision (RetinaNet R50-FPN)",
        "",
        *bc.measured_header(result),
        f"Machine: {m['cpu']}, {m['cores_visible']} cores visible, {m['torch_threads']} torch "
        f"threads{', GPU ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}, torchvision "
        f"{m['torchvision']}, detectron2 {m['detectron2']}, Python {m['python']}. Device "
        f"`{a['device']}`{', AMP fp16' if a.get('amp') else ', fp32'}.",
        "",
        f"Train: batch {a['batch']} x {a['train_size'][0]}x{a['train_size'][1]}, "
        f"{a['num_classes']} classes, 5 GT boxes per image, forward + backward + SGD step; "
        f"inference: batch 1, short side {', '.join(map(str, sizes))} (4:3). "
        f"{a['warmup']} warm-up + {a['iters']} measured iterations per process, "
        f"{a['rounds']} rounds with the variants interleaved; medians. Peak extra memory: "
        f"{unit} above the model + data baseline, each variant in a fresh process "
        "(method: `benchmarks/model_bench.py` docstring).",
        "",
    ]
    cpu = a["device"] == "cpu"
    head = ["variant", "train s/iter", "x d2"]
    head += ["train CPU s/iter", "x d2"] if cpu else []
    head += [f"train peak extra {unit}", "x d2"]
    for sz in sizes:
        head += [f"infer {sz}px ms/img", "x d2"]
    head += [f"infer {sizes[-1]}px peak extra", "x d2"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))

    def fmt(s, key, scale=1.0, digits=2):
        return f"{s[key] * scale:.{digits}f}" if key in s else "-"

    def ratio(s, key):
        r = s["ratios_vs_d2"].get(key)
        return f"**{r:.2f}**" if r is not None else "-"

    for v, s in result["summary"].items():
        row = [f"`{v}`", fmt(s, "train_s_per_iter"), ratio(s, "train_s_per_iter")]
        if cpu:
            row += [fmt(s, "train_cpu_s_per_iter"), ratio(s, "train_cpu_s_per_iter")]
        row += [fmt(s, "train_peak_extra_mb", digits=0), ratio(s, "train_peak_extra_mb")]
        for sz in sizes:
            row += [fmt(s, f"infer_{sz}_s_per_img", 1e3, 0), ratio(s, f"infer_{sz}_s_per_img")]
        row += [fmt(s, f"infer_{sizes[-1]}_peak_extra_mb", digits=0),
                ratio(s, f"infer_{sizes[-1]}_peak_extra_mb")]
        lines.append("| " + " | ".join(row) + " |")
    if cpu:
        la = result.get("loadavg", {})
        lines += ["", "CPU s/iter: process CPU time (all threads) per iteration, less sensitive "
                  "than wall time to other processes on the machine; 1-min load average at "
                  f"start / end of the run: {la.get('start', '?')} / {la.get('end', '?')}."]
    described = []
    for v in result["summary"]:
        kind, opts = VARIANTS[v]
        opts = opts + (a["ours_opts"] if kind == "ours" else [])
        described.append(f"`{v}` = {kind}" + (f" with `{' '.join(opts)}`" if opts else ""))
    lines += ["", "Variants: " + "; ".join(described) + "."]
    if result.get("notes"):
        lines += ["", result["notes"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--train-size", default="800x1067", help="HxW of the training images")
    p.add_argument("--batch", type=int, default=1, help="training images per iteration")
    p.add_argument("--infer-sizes", nargs="+", type=int, default=[600, 800],
                   help="inference short sides (long side = 4/3 x)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up iterations per process")
    p.add_argument("--iters", type=int, default=2, help="measured iterations per process")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--phases", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (CPU)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA)")
    p.add_argument("--ours-opts", nargs="*", default=[],
                   help="extra config overrides for the ours* variants (KEY VALUE ...)")
    p.add_argument("--json", default=str(bc.RESULTS / "model_bench.json"))
    p.add_argument("--doc", default=str(bc.DOCS), help="Markdown file to update ('' = none)")
    p.add_argument("--doc-marker", default="model_bench")
    p.add_argument("--weights-cache", default="",
                   help="directory to keep the calibrated random weights in across runs")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process (smoke tests; memory not isolated)")
    p.add_argument("--notes", default="", help="text appended to the Markdown section")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return None

    import torch

    torch.set_num_threads(args.threads)
    th, tw = (int(x) for x in args.train_size.lower().split("x"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONWARNINGS="ignore")
    log = print
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        wdir = args.weights_cache or tmp
        os.makedirs(wdir, exist_ok=True)
        weights = {}
        for kind in sorted({VARIANTS[v][0] for v in args.variants}):
            src = "torchvision" if kind == "torchvision" else "d2"
            if src not in weights:
                weights[src] = os.path.join(wdir, f"{src}_k{args.num_classes}.pth")
                if not os.path.exists(weights[src]):
                    bc.prepare_weights(src, weights[src], num_classes=args.num_classes,
                                       calib_size=(min(th, 512), min(tw, 683)))
        base = dict(threads=args.threads, device=args.device, amp=args.amp,
                    num_classes=args.num_classes, warmup=args.warmup, iters=args.iters)
        for rnd in range(args.rounds):
            order = args.variants if rnd % 2 == 0 else args.variants[::-1]
            log(f"round {rnd + 1}/{args.rounds}")
            for v in order:
                kind, opts = VARIANTS[v]
                opts = opts + (args.ours_opts if kind == "ours" else [])
                w = weights["torchvision" if kind == "torchvision" else "d2"]
                for phase in args.phases:
                    sizes = [(th, tw)] if phase == "train" else [_size(s) for s in args.infer_sizes]
                    spec = dict(base, variant=v, kind=kind, opts=opts, phase=phase,
                                weights=w, sizes=sizes, batch=args.batch)
                    runs.append(_launch(spec, env, log, args.in_process))
    args_d = vars(args).copy()
    for k in ("worker", "notes", "weights_cache"):
        args_d.pop(k)
    args_d["train_size"] = [th, tw]
    result = {
        **bc.run_record(under_lock=True),
        "args": args_d,
        "summary": summarize(runs, args.variants, args.infer_sizes),
        "runs": runs,
        "total_wall_s": time.perf_counter() - t_start,
        "notes": args.notes,
        "loadavg": {
            "start": round(load_start, 1) if load_start is not None else None,
            "end": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        },
    }
    bc.publish(result, to_markdown(result), args.json, args.doc, args.doc_marker)
    return result


if __name__ == "__main__":
    main()
