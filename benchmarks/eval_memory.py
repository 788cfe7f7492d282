"""
Peak memory of COCO evaluation over many images: detectron2's COCOEvaluator (as wrapped by
FocalCOCOEvaluator) vs focal_det's StreamingCOCOEvaluator, side by side in one run.

    flock /tmp/focal_bench.lock .venv/bin/python benchmarks/eval_memory.py --images 500 --dets 100

Each evaluator runs in its own fresh subprocess on the same synthetic ground truth and the same
synthetic detections (generated image by image from a seed, never all held by the harness).
Reported per evaluator, from /proc/self/status:
  * held after inference: VmRSS after process() of every image minus VmRSS before (what the
    evaluator keeps for the whole inference loop);
  * peak: VmHWM (peak RSS of the process) minus VmRSS before the first image;
and the AP both computed (they must be equal).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_common as bc  # noqa: E402


def _child(kind, gt_json, num_images, dets, out_dir, chunk_images):
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.structures import Boxes, Instances

    from focal_det.evaluation import FocalCOCOEvaluator
    from focal_det.evaluation.streaming import StreamingCOCOEvaluator

    register_coco_instances("bench_eval", {}, gt_json, os.path.dirname(gt_json))
    DatasetCatalog.get("bench_eval")
    cls = StreamingCOCOEvaluator if kind == "streaming" else FocalCOCOEvaluator
    kw = {"chunk_images": chunk_images} if kind == "streaming" else {}
    ev = cls("bench_eval", ("bbox",), False, out_dir, **kw)
    ev.reset()
    rng = np.random.RandomState(1)
    h, w = 480, 640
    base = bc.rss_mb()
    for i in range(num_images):
        x0 = rng.uniform(0, w - 100, dets)
        y0 = rng.uniform(0, h - 100, dets)
        x1, y1 = x0 + rng.uniform(5, 100, dets), y0 + rng.uniform(5, 100, dets)
        boxes = np.stack([x0, y0, x1, y1], 1)
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor(rng.uniform(size=dets), dtype=torch.float32)
        inst.pred_classes = torch.tensor(rng.randint(0, 80, dets))
        ev.process([{"image_id": i + 1, "height": h, "width": w}], [{"instances": inst}])
    held = bc.rss_mb() - base
    res = ev.evaluate()
    peak = bc.peak_rss_mb() - base
    print(json.dumps({"held_mb": held, "peak_mb": peak, "AP": res["bbox"]["AP"]}))


def _write_gt(path, num_images):
    import numpy as np

    rng = np.random.RandomState(0)
    cats = [{"id": i + 1, "name": f"c{i}"} for i in range(80)]
    images, anns = [], []
    for i in range(num_images):
        images.append({"id": i + 1, "width": 640, "height": 480, "file_name": f"{i}.jpg"})
        for _ in range(7):  # COCO averages ~7 boxes per image
            bw, bh = rng.randint(10, 200), rng.randint(10, 200)
            x, y = rng.randint(0, 640 - bw), rng.randint(0, 480 - bh)
            anns.append({"id": len(anns) + 1, "image_id": i + 1,
                         "category_id": int(rng.randint(1, 81)), "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--dets", type=int, default=100, help="detections per image")
    ap.add_argument("--chunk-images", type=int, default=100,
                    help="StreamingCOCOEvaluator's images per COCOeval.evaluate chunk")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child, args.gt, args.images, args.dets, args.out, args.chunk_images)
    with tempfile.TemporaryDirectory() as tmp:
        gt = os.path.join(tmp, "gt.json")
        _write_gt(gt, args.images)
        rows = {}
        for kind in ("detectron2", "streaming"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--gt", gt, "--images",
                 str(args.images), "--dets", str(args.dets), "--out", os.path.join(tmp, kind),
                 "--chunk-images", str(args.chunk_images)],
                capture_output=True, text=True, check=True,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            ).stdout  # fmt: skip
            rows[kind] = json.loads(out.strip().splitlines()[-1])
    print(f"COCO evaluation memory, {args.images} images x {args.dets} detections, streaming "
          f"chunks of {args.chunk_images} images (python {sys.version.split()[0]})")
    print(f"{'evaluator':<12} {'held after inference':>22} {'peak over baseline':>20} {'AP':>8}")
    for kind, r in rows.items():
        print(f"{kind:<12} {r['held_mb']:>19.1f} MB {r['peak_mb']:>17.1f} MB {r['AP']:>8.4f}")
    d, s = rows["detectron2"], rows["streaming"]
    kib = 1 / 1024
    print(f"ratio detectron2/streaming: held {d['held_mb'] / max(s['held_mb'], kib):.1f}x, "
          f"peak {d['peak_mb'] / max(s['peak_mb'], kib):.2f}x; same AP: {d['AP'] == s['AP']}")


if __name__ == "__main__":
    main()
