"""
The classification-loss kernel at the detector's real scale, against the memory-bandwidth bound:
focal_det's fused label-based FL (``sigmoid_loss_from_labels``) vs what detectron2 runs (one-hot
+ ``fvcore.nn.sigmoid_focal_loss``) vs ``torchvision.ops.sigmoid_focal_loss`` (with the same
one-hot), forward + backward, for N images of HxW (all anchors of P3-P7, A = 9) and K classes.

Made for the GPU suite (benchmarks/gpu_suite.sh: fp32 and bf16, 2 and 8 images of 800x1333); it
runs on CPU too (the CPU table of record is the loss engineer's benchmarks/loss_bench.py).
It differs from loss_bench in what is timed: here the fvcore / torchvision variants build the
one-hot target and drop ignored anchors inside the timed call, as detectron2's
``RetinaNet.losses`` does every iteration (loss_bench hands them a prebuilt one-hot), and
several batch sizes share one run.

Bandwidth bound: the fewest bytes a fused forward + backward must move -- read the logits and
the labels in the forward pass, read them again and write the gradient in the backward pass:
3 * N*R*K * itemsize + 2 * N*R * 8 -- divided by the copy bandwidth measured here (a large
tensor copy: bytes read + written per second). "x bound" = measured time / that bound.
Peak extra memory (CUDA only): torch.cuda.max_memory_allocated above the inputs.

    .venv/bin/python benchmarks/loss_kernel_bench.py --device cuda --batch 2 8 \
        --dtypes float32 bfloat16
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def make_inputs(n, r, k, dtype, device, fg=0.001, ignore=0.01, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, r, k, generator=g) * 2 - 4).to(device=device, dtype=dtype)
    u = torch.rand(n, r, generator=g)
    labels = torch.full((n, r), k, dtype=torch.int64)
    is_fg = u < fg
    labels[is_fg] = torch.randint(0, k, (int(is_fg.sum()),), generator=g)
    labels[(u >= fg) & (u < fg + ignore)] = -1
    return logits.requires_grad_(), labels.to(device)


def variant_fn(name, alpha=0.25, gamma=2.0):
    import torch.nn.functional as F

    if name == "ours":
        from focal_det.losses.functional import sigmoid_loss_from_labels

        def fn(x, labels):
            return sigmoid_loss_from_labels(x, labels, alpha=alpha, gamma=gamma, reduction="sum")

        return fn

    if name == "fvcore":
        from fvcore.nn import sigmoid_focal_loss as loss
    else:
        from torchvision.ops import sigmoid_focal_loss as loss

    def fn(x, labels):  # detectron2's RetinaNet.losses, one-hot included
        k = x.shape[-1]
        valid = labels >= 0
        target = F.one_hot(labels[valid], num_classes=k + 1)[:, :-1].to(x.dtype)
        return loss(x[valid].float(), target.float(), alpha=alpha, gamma=gamma,
                    reduction="sum")

    return fn


def bench_one(name, n, r, k, dtype, device, warmup, iters):
    import torch

    fn = variant_fn(name)
    x, labels = make_inputs(n, r, k, dtype, device)
    bc.sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i in range(warmup + iters):
        x.grad = None
        bc.sync(device)
        t0 = time.perf_counter()
        loss = fn(x, labels)
        loss.backward()
        bc.sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"s": statistics.median(times), "loss": float(loss.detach())}
    if device == "cuda":
        # The gradient of the logits is an output every variant must allocate: count it apart.
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del x, labels, loss
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--batch", nargs="+", type=int, default=[2, 8])
    p.add_argument("--size", default="800x1333", help="HxW of the images")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--variants", nargs="+", default=["ours", "fvcore", "torchvision"],
                   choices=["ours", "fvcore", "torchvision"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(bc.RESULTS / "loss_kernel_bench.json"))
    p.add_argument("--doc", default=str(bc.DOCS), help="Markdown file to update ('' = none)")
    p.add_argument("--doc-marker", default="loss_kernel_bench")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    r, _ = bc.num_anchors(h, w)
    k = args.num_classes
    bw = bc.copy_bandwidth(args.device, nbytes=512 << 20)
    rows = []
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        for n in args.batch:
            bound = (3 * n * r * k * dtype.itemsize + 2 * n * r * 8) / bw
            for v in args.variants:
                res = bench_one(v, n, r, k, dtype, args.device, args.warmup, args.iters)
                res.update(variant=v, dtype=dt_name, batch=n, anchors=n * r, bound_s=bound)
                rows.append(res)
                print(f"{dt_name:9s} N={n} {v:12s} {1e3 * res['s']:9.2f} ms  "
                      f"x bound {res['s'] / bound:7.1f}"
                      + (f"  peak +{res['peak_extra_mb']:.0f} MiB" if "peak_extra_mb" in res
                         else ""), flush=True)
    result = {
        **bc.run_record(under_lock=False),  # GPU suite: a machine of its own, no lock
        "copy_bandwidth_GBps": bw / 1e9,
        "anchors_per_image": r,
        "args": vars(args),
        "rows": rows,
    }
    bc.publish(result, to_markdown(result), args.json, args.doc, args.doc_marker)
    return result


def to_markdown(result):
    a, m = result["args"], result["machine"]
    lines = [
        f"## Loss kernel vs the memory-bandwidth bound ({a['device']})",
        "",
        *bc.measured_header(result),
        f"Machine: {m.get('gpu', m['cpu'])}; torch {m['torch']}. {a['size']} images, "
        f"{result['anchors_per_image']} anchors each, K = {a['num_classes']}, FL forward + "
        f"backward; copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s.",
        "",
        "| dtype | images | variant | ms | x bandwidth bound | x fvcore | peak extra MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ref = [x for x in result["rows"] if x["variant"] == "fvcore" and x["dtype"] == row["dtype"]
               and x["batch"] == row["batch"]]
        rel = f"{row['s'] / ref[0]['s']:.3f}" if ref else "-"
        mem = f"{row['peak_extra_mb']:.0f}" if "peak_extra_mb" in row else "-"
        lines.append(
            f"| {row['dtype']} | {row['batch']} | `{row['variant']}` | {1e3 * row['s']:.2f} | "
            f"{row['s'] / row['bound_s']:.1f} | {rel} | {mem} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
