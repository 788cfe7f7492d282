"""
train_net.py / focal_det.engine: training, checkpoint + --eval-only, --resume, and the
2-process CPU (gloo) distributed path, on a tiny synthetic dataset.
"""
import json
import math
import os
import socket

import pytest
import synthetic_detection  # noqa: I001  (tests/ helper, on sys.path under pytest)
import torch
from detectron2.engine import default_argument_parser, launch
from repo_scripts import QUICK, load_script  # noqa: I001  (tests/ helper)

from focal_det.engine import main as engine_main


def _args(tmp, *extra, eval_only=False, resume=False, num_gpus=1, config=QUICK):
    opts = [
        "DATASETS.TRAIN", "('fdet_engine_synth_train',)",
        "DATASETS.TEST", "('fdet_engine_synth_test',)",
        "MODEL.RETINANET.NUM_CLASSES", "3",
        "OUTPUT_DIR", os.path.join(tmp, "out"),
        "SEED", "0",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",  # untrained: keep low-score boxes
        *extra,
    ]  # fmt: skip
    argv = ["--config-file", config, "--num-gpus", str(num_gpus)]
    if eval_only:
        argv.append("--eval-only")
    if resume:
        argv.append("--resume")
    return default_argument_parser().parse_args(argv + opts)


def _register(tmp):
    train, test = os.path.join(tmp, "train"), os.path.join(tmp, "test")
    synthetic_detection.register("fdet_engine_synth_train", train, num_images=4)
    synthetic_detection.register("fdet_engine_synth_test", test, num_images=4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_net_script():
    """train_net.py imported as a module (its ``main`` is what ``launch`` runs)."""
    return load_script("train_net.py")


def test_train_then_eval_only_reproduces_results(tmp_path):
    tmp = str(tmp_path)
    _register(tmp)
    args = _args(tmp, "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "3")
    train_res = _train_net_script().main(args)
    final = os.path.join(tmp, "out", "model_final.pth")
    assert os.path.isfile(final)
    assert set(train_res["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}

    ev = _args(tmp, "MODEL.WEIGHTS", final, eval_only=True)
    eval_res = engine_main(ev)
    # Evaluating the saved weights gives exactly the numbers of the end-of-training evaluation.
    for k, v in train_res["bbox"].items():
        assert eval_res["bbox"][k] == pytest.approx(v, nan_ok=True), k
    results_json = os.path.join(tmp, "out", "inference", "coco_instances_results.json")
    with open(results_json) as f:
        dets = json.load(f)
    assert all({"image_id", "category_id", "bbox", "score"} <= set(d) for d in dets)


def test_softmax_focal_loss_quick_config_trains_and_evaluates(tmp_path):
    # configs/quick/retinanet_tiny_softmax_quick.yaml: K + 1 logits per anchor, softmax scores.
    from focal_det.engine import Trainer, setup

    tmp = str(tmp_path)
    _register(tmp)
    config = os.path.join(os.path.dirname(QUICK), "retinanet_tiny_softmax_quick.yaml")
    # LR 0.005 (the quick config's 0.01 is 8x the linear-scaling rule for 2 images): at 0.01 this
    # run diverged at iteration ~26, where sigmoid FL still trained.
    cfg = setup(_args(tmp, "SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)", "SOLVER.BASE_LR",
                      "0.005", config=config))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    assert type(trainer.model.cls_loss).__name__ == "SoftmaxFocalLoss"
    assert trainer.model.head.cls_score.out_channels == 9 * (3 + 1)
    res = trainer.train()  # evaluates after the last iteration
    loss = [v for v, _ in trainer.storage.history("loss_cls").values()]
    assert len(loss) == 40 and all(map(math.isfinite, loss))
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert set(res["bbox"]) >= {"AP", "AP50", "AP75"}
    with open(os.path.join(tmp, "out", "inference", "coco_instances_results.json")) as f:
        dets = json.load(f)
    assert dets and {d["category_id"] for d in dets} <= {0, 1, 2}
    assert all(0 <= d["score"] <= 1 for d in dets)


def test_resume_continues_from_last_checkpoint(tmp_path):
    tmp = str(tmp_path)
    _register(tmp)
    engine_main(_args(tmp, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2"))
    # --resume with a longer schedule starts after iteration 2, from the saved weights.
    from focal_det.engine import Trainer, setup

    cfg = setup(_args(tmp, "SOLVER.MAX_ITER", "4", resume=True))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    saved = torch.load(os.path.join(tmp, "out", "model_final.pth"), weights_only=False)["model"]
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


def _dist_worker(tmp):
    """Runs in each of the 2 spawned processes."""
    import torch.distributed as dist
    from detectron2.utils import comm

    torch.set_num_threads(1)
    _register(tmp)
    # GroupNorm: BatchNorm running statistics legitimately differ between ranks (each sees its
    # own images; detectron2 does not broadcast buffers), GN has none, so the whole state must
    # match.
    args = _args(
        tmp, "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "3", "MODEL.RESNETS.NORM", "GN",
        num_gpus=2,
    )  # fmt: skip
    from focal_det.engine import Trainer, setup

    cfg = setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    res = trainer.train()
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    rank = comm.get_rank()
    state = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
    torch.save(
        {"state": state, "results": res, "world": dist.get_world_size()},
        os.path.join(tmp, f"rank{rank}.pth"),
    )


@pytest.mark.slow
def test_two_cpu_processes_gloo(tmp_path, monkeypatch):
    tmp = str(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(_dist_worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(tmp,))
    r0 = torch.load(os.path.join(tmp, "rank0.pth"), weights_only=False)
    r1 = torch.load(os.path.join(tmp, "rank1.pth"), weights_only=False)
    assert r0["world"] == r1["world"] == 2
    # Both ranks end with identical parameters and buffers (DDP averaged their gradients).
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0, msg=k)
    # Evaluation gathered the predictions of both ranks (each ran inference on half of the
    # test images): the main process saw an entry for every image and computed COCO AP.
    preds = torch.load(
        os.path.join(tmp, "out", "inference", "instances_predictions.pth"), weights_only=False
    )
    assert sorted(p["image_id"] for p in preds) == [0, 1, 2, 3]
    assert "AP" in r0["results"]["bbox"]
    assert not r1["results"]  # non-main ranks return no metrics (detectron2's convention)


def test_eval_only_on_a_test_dev_style_set_writes_the_results_json(tmp_path):
    # A test set without annotations (COCO test-dev): no AP, the detections JSON is written.
    from detectron2.data import DatasetCatalog, MetadataCatalog

    tmp = str(tmp_path)
    _register(tmp)
    images = [
        {k: r[k] for k in ("file_name", "image_id", "height", "width")}
        for r in DatasetCatalog.get("fdet_engine_synth_test")
    ]
    gt_file = os.path.join(tmp, "image_info_test.json")
    info = {
        "images": [
            {"id": r["image_id"], "file_name": r["file_name"], "height": r["height"],
             "width": r["width"]} for r in images
        ],
        "categories": [{"id": i, "name": n} for i, n in enumerate(synthetic_detection.CLASSES)],
    }  # fmt: skip
    with open(gt_file, "w") as f:
        json.dump(info, f)
    if "fdet_engine_synth_testdev" not in DatasetCatalog.list():
        DatasetCatalog.register("fdet_engine_synth_testdev", lambda: images)
        MetadataCatalog.get("fdet_engine_synth_testdev").set(
            thing_classes=list(synthetic_detection.CLASSES), json_file=gt_file
        )
    # An untrained model (MODEL.WEIGHTS ""): --eval-only needs the flag that says it is meant.
    res = engine_main(_args(tmp, "DATASETS.TEST", "('fdet_engine_synth_testdev',)",
                            "TEST.ALLOW_MISSING_WEIGHTS", "True", eval_only=True))  # fmt: skip
    assert "bbox" not in res  # nothing to compare against
    with open(os.path.join(tmp, "out", "inference", "coco_instances_results.json")) as f:
        dets = json.load(f)
    assert dets and {d["image_id"] for d in dets} <= {r["image_id"] for r in images}
