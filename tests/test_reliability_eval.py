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
    # Leave together and close the group: a rank that exits while gloo's threads are still up
    # can abort in their destructor ("terminate called without an active exception", SIGABRT).
    comm.synchronize()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
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


# ---- issue 15 ---------------------------------------------------------------------------------
def test_nan_ground_truth_in_the_test_set_is_reported(tmp_path, caplog):
    gt = tmp_path / "gt.json"
    write_fake_coco(str(gt), num_images=4)
    data = json.loads(gt.read_text())
    data["annotations"][0]["bbox"] = [float("nan"), 5, 10, 10]
    data["annotations"][1]["bbox"] = [5, 5, 0, 10]  # empty
    gt.write_text(json.dumps(data))  # json writes NaN; pycocotools reads it back
    name = "reliability_nan_gt"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(gt), str(tmp_path))
    with caplog.at_level("WARNING", logger="focal_det.evaluation.coco"):
        FocalCOCOEvaluator(name, ("bbox",), False)
    images = len({a["image_id"] for a in data["annotations"][:2]})
    assert f"{name}: 2 ground-truth box(es) in {images} image(s) of {gt}" in caplog.text
    assert "counts as a missed object" in caplog.text
    caplog.clear()
    good = tmp_path / "good.json"
    write_fake_coco(str(good), num_images=4)
    if "reliability_good_gt" not in DatasetCatalog.list():
        register_coco_instances("reliability_good_gt", {}, str(good), str(tmp_path))
    with caplog.at_level("WARNING", logger="focal_det.evaluation.coco"):
        FocalCOCOEvaluator("reliability_good_gt", ("bbox",), False)
    assert "ground-truth box" not in caplog.text


def _faster_rcnn_state_dict():
    """The state dict of detectron2's own Faster R-CNN (R-FPN) with the quick config's ResNet."""
    from detectron2 import model_zoo as d2_zoo
    from detectron2.modeling import build_model

    cfg = d2_zoo.get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return build_model(cfg).state_dict()


def _eval_args(tmp_path, weights, *extra):
    from detectron2.engine import default_argument_parser
    from repo_scripts import QUICK

    return default_argument_parser().parse_args([
        "--config-file", QUICK, "--eval-only", "MODEL.WEIGHTS", str(weights),
        "DATASETS.TRAIN", "('reliability_eval_synth',)",
        "DATASETS.TEST", "('reliability_eval_synth',)", "MODEL.RETINANET.NUM_CLASSES", "3",
        "OUTPUT_DIR", str(tmp_path / "out"), *extra,
    ])  # fmt: skip


def test_eval_only_with_weights_of_another_model_fails(tmp_path):
    import synthetic_detection

    from focal_det.checkpoint import MissingWeightsError
    from focal_det.engine import main as engine_main

    synthetic_detection.register("reliability_eval_synth", str(tmp_path / "data"), num_images=2)
    faster = tmp_path / "faster_rcnn.pth"
    torch.save({"model": _faster_rcnn_state_dict()}, faster)
    with pytest.raises(MissingWeightsError) as e:
        engine_main(_eval_args(tmp_path, faster))
    msg = str(e.value)
    assert f"MODEL.WEIGHTS='{faster}' does not hold this model" in msg
    assert "'head' tensors (head.cls_subnet.0.weight" in msg  # the backbone loaded, not the head
    assert "TEST.ALLOW_MISSING_WEIGHTS True" in msg
    assert not (tmp_path / "out" / "inference").exists()  # no AP of a random head

    empty = tmp_path / "empty_dict.pth"
    torch.save({}, empty)
    with pytest.raises(MissingWeightsError, match="'backbone' tensors.*'head' tensors"):
        engine_main(_eval_args(tmp_path, empty))
    # Who means it says so: evaluated (with a warning).
    res = engine_main(_eval_args(tmp_path, empty, "TEST.ALLOW_MISSING_WEIGHTS", "True"))
    assert "AP" in res["bbox"]


def test_eval_only_with_wrong_weights_exits_non_zero(tmp_path):
    import subprocess
    import sys

    from repo_scripts import QUICK, REPO

    faster = tmp_path / "faster_rcnn.pth"
    torch.save({"model": _faster_rcnn_state_dict()}, faster)
    # The quick config's own test set (COCO val 100) is never read: the check comes first.
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", QUICK,
         "--eval-only", "MODEL.WEIGHTS", str(faster), "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=str(tmp_path), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "MissingWeightsError" in proc.stderr and "'head' tensors" in proc.stderr
