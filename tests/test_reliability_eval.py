"""
Evaluation at scale (issue 8, item 6): StreamingCOCOEvaluator keeps compact per-image arrays
and gathers them across workers, and gives exactly detectron2's COCOEvaluator numbers and
results file. (Its memory is measured by benchmarks/eval_memory.py, not asserted here.)
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

import focal_det.evaluation.streaming as streaming
from focal_det.evaluation import FocalCOCOEvaluator
from focal_det.evaluation.streaming import StreamingCOCOEvaluator


def write_fake_coco(path, num_images, num_classes=3, seed=0, size=(200, 300)):
    """A COCO ground-truth JSON (non-contiguous category ids) and random detections near it."""
    rng = np.random.RandomState(seed)
    h, w = size
    cats = [{"id": 10 * (i + 1), "name": f"c{i}"} for i in range(num_classes)]
    images, anns, preds = [], [], []
    for i in range(num_images):
        images.append({"id": i + 1, "width": w, "height": h, "file_name": f"{i}.jpg"})
        boxes, labels, scores = [], [], []
        for _ in range(rng.randint(1, 4)):
            bw, bh = rng.randint(10, 100), rng.randint(10, 100)
            x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
            c = rng.randint(num_classes)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cats[c]["id"],
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        for _ in range(rng.randint(0, 100)):
            x0, y0 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            boxes.append([x0, y0, x0 + rng.uniform(5, 90), y0 + rng.uniform(5, 90)])
            labels.append(rng.randint(num_classes))
            scores.append(rng.uniform())
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor(scores, dtype=torch.float32)
        inst.pred_classes = torch.tensor(labels, dtype=torch.int64)
        preds.append(({"image_id": i + 1, "height": h, "width": w}, {"instances": inst}))
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return preds


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco")
    preds = write_fake_coco(str(d / "gt.json"), num_images=16)
    name = "reliability_fake_coco"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(d / "gt.json"), str(d))
    DatasetCatalog.get(name)  # sets thing_dataset_id_to_contiguous_id
    return name, preds


def _assert_same(got, ref):
    assert got.keys() == ref.keys() == {"bbox"}
    assert got["bbox"].keys() == ref["bbox"].keys()
    for k, v in ref["bbox"].items():  # NaN for categories without ground truth
        assert (math.isnan(v) and math.isnan(got["bbox"][k])) or got["bbox"][k] == v, k


def _run(evaluator, preds):
    evaluator.reset()
    for inp, out in preds:
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def test_streaming_matches_detectron2_evaluator(fake_coco, tmp_path):
    name, preds = fake_coco
    ref = _run(FocalCOCOEvaluator(name, ("bbox",), False, str(tmp_path / "ref")), preds)
    # Chunks of 5 images: 16 images -> 4 chunks, the last one partial.
    got = _run(StreamingCOCOEvaluator(name, ("bbox",), False, str(tmp_path / "new"),
                                      chunk_images=5), preds)
    assert ref["bbox"]["AP"] > 0
    _assert_same(got, ref)
    with open(tmp_path / "ref" / "coco_instances_results.json") as f:
        ref_json = json.load(f)
    with open(tmp_path / "new" / "coco_instances_results.json") as f:
        assert json.load(f) == ref_json


def test_streaming_gathers_across_workers(fake_coco, tmp_path, monkeypatch):
    name, preds = fake_coco
    ref = _run(StreamingCOCOEvaluator(name, ("bbox",), False), preds)
    # Two "workers" evaluate interleaved halves; the main process gathers both (comm.gather).
    workers = [StreamingCOCOEvaluator(name, ("bbox",), True, chunk_images=3) for _ in range(2)]
    for w in workers:
        w.reset()
    for i, (inp, out) in enumerate(preds):
        workers[i % 2].process([inp], [out])
    gathered = []
    for w in workers:  # what each worker contributes to comm.gather
        w._distributed = False
        gathered.append(w._gather()[0])
    workers[0]._distributed = True
    monkeypatch.setattr(streaming.comm, "synchronize", lambda: None)
    monkeypatch.setattr(streaming.comm, "gather", lambda data, dst=0: gathered)
    monkeypatch.setattr(streaming.comm, "is_main_process", lambda: True)
    got = workers[0].evaluate()
    _assert_same(got, ref)
    # Every image's detections arrived exactly once.
    ids = np.concatenate([g[0] for g in gathered])
    assert sorted(ids.tolist()) == list(range(1, len(preds) + 1))


def test_streaming_matches_with_custom_max_dets(fake_coco):
    name, preds = fake_coco
    kw = dict(max_dets_per_image=20)
    ref = _run(FocalCOCOEvaluator(name, ("bbox",), False, **kw), preds)
    got = _run(StreamingCOCOEvaluator(name, ("bbox",), False, chunk_images=7, **kw), preds)
    _assert_same(got, ref)


def test_config_selects_streaming_evaluator(fake_coco, tmp_path):
    from synthetic_detection import tiny_cfg

    from focal_det.evaluation import build_coco_evaluator

    name, preds = fake_coco
    cfg = tiny_cfg()
    assert type(build_coco_evaluator(cfg, name, str(tmp_path))) is FocalCOCOEvaluator
    cfg.TEST.COCO_EVAL_CHUNK_IMAGES = 4
    ev = build_coco_evaluator(cfg, name, str(tmp_path))
    assert isinstance(ev, StreamingCOCOEvaluator) and ev._chunk_images == 4
    _run(ev, preds)
    assert os.path.isfile(tmp_path / "instances_predictions.npz")


def _gloo_worker(tmp):
    """Each of 2 spawned processes evaluates its half of the images; rank 0 gets everything."""
    from detectron2.utils import comm

    torch.set_num_threads(1)
    # One file per rank: two processes writing one path race (a rank read it half-written).
    gt = os.path.join(tmp, f"gt_rank{comm.get_rank()}.json")
    preds = write_fake_coco(gt, num_images=16)
    register_coco_instances("reliability_gloo_coco", {}, gt, tmp)
    DatasetCatalog.get("reliability_gloo_coco")
    ev = StreamingCOCOEvaluator("reliability_gloo_coco", ("bbox",), True, chunk_images=5)
    mine = preds[comm.get_rank() :: comm.get_world_size()]
    res = _run(ev, mine)
    torch.save({"res": dict(res), "n": len(mine)}, os.path.join(tmp, f"rank{comm.get_rank()}.pth"))


def test_streaming_gathers_across_two_gloo_processes(tmp_path, monkeypatch):
    import socket

    from detectron2.engine import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(_gloo_worker, 2, dist_url=f"tcp://127.0.0.1:{port}", args=(str(tmp_path),))
    r0 = torch.load(tmp_path / "rank0.pth", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pth", weights_only=False)
    assert r0["n"] == r1["n"] == 8 and r1["res"] == {}  # non-main ranks return nothing
    # The reference: one process evaluating all 16 images with detectron2's evaluator.
    preds = write_fake_coco(str(tmp_path / "ref_gt.json"), num_images=16)
    name = "reliability_gloo_ref"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(tmp_path / "ref_gt.json"), str(tmp_path))
    DatasetCatalog.get(name)
    _assert_same(r0["res"], _run(FocalCOCOEvaluator(name, ("bbox",), False), preds))
