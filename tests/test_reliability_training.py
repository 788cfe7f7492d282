"""
Reliability of training (issue 8, items 3 and 4): a non-finite loss stops with the iteration,
the loss and a hint, leaving the last good checkpoint in place; a run SIGKILLed while writing a
checkpoint resumes from the previous one and ends with exactly the weights of an uninterrupted
run (deterministic CPU settings, augmentation on).
"""
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import synthetic_detection  # noqa: I001  (tests/ helper, on sys.path under pytest)
import torch
from detectron2.engine import default_argument_parser
from detectron2.utils.events import get_event_storage

from focal_det.engine import Trainer, setup
from focal_det.modeling import NonFiniteLossError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick", "retinanet_tiny_quick.yaml")
DATASET = "reliability_train"


def _argv(out_dir, max_iter, period, resume=False):
    return ["--config-file", QUICK] + (["--resume"] if resume else []) + [
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", "()",
        "MODEL.RETINANET.NUM_CLASSES", "3",
        "OUTPUT_DIR", out_dir,
        "SEED", "7",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", str(period),
        "SOLVER.STEPS", f"({max_iter - 1},)",
        "INPUT.RANDOM_FLIP", "horizontal",  # augmentation must resume too
    ]  # fmt: skip


def _train(out_dir, max_iter, period, resume=False, trainer_cls=Trainer):
    cfg = setup(default_argument_parser().parse_args(_argv(out_dir, max_iter, period, resume)))
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import synthetic_detection
    import torch
    from detectron2.engine import default_argument_parser
    from focal_det.engine import Trainer, setup

    synthetic_detection.register({dataset!r}, {data!r}, num_images=6)
    real_save = torch.save
    saves = []

    def save_then_die(obj, f, *a, **k):
        # Checkpoint number {die_at_save} (counting from 1) is killed half-written.
        saves.append(1)
        if len(saves) == {die_at_save}:
            real_save(obj, f, *a, **k)
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)

    torch.save = save_then_die
    cfg = setup(default_argument_parser().parse_args({argv!r}))
    t = Trainer(cfg)
    t.resume_or_load(resume=False)
    t.train()
    """
)


@pytest.mark.slow
def test_sigkill_mid_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    data = str(tmp_path / "data")
    synthetic_detection.register(DATASET, data, num_images=6)

    # Uninterrupted reference: 6 iterations.
    ref = _train(str(tmp_path / "ref"), max_iter=6, period=2)
    ref_state = {k: v.clone() for k, v in ref.model.state_dict().items()}

    # Same run in a subprocess, SIGKILLed while writing its 2nd checkpoint (iteration 3,
    # model_0000003.pth); the one of iteration 1 is complete.
    out = str(tmp_path / "killed")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(
        tests=os.path.dirname(__file__), dataset=DATASET, data=data, die_at_save=2,
        argv=_argv(out, 6, 2),
    ))
    env = dict(os.environ, OMP_NUM_THREADS="1", FOCAL_TEST_THREADS="1")
    proc = subprocess.run([sys.executable, str(driver)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_0000001.pth"
    assert not os.path.exists(os.path.join(out, "model_0000003.pth"))  # only a temp file

    assert any(f.startswith(".model_0000003.pth.") for f in os.listdir(out))
    resumed = _train(out, max_iter=6, period=2, resume=True)
    assert resumed.start_iter == 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # the partial file is gone
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0, msg=k)


class _NaNAtIteration3(Trainer):
    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        forward = model.forward

        def nan_forward(batched_inputs):
            out = forward(batched_inputs)
            if model.training and get_event_storage().iter == 3:
                out["loss_cls"] = out["loss_cls"] * float("nan")
            return out

        model.forward = nan_forward
        return model


def test_nan_loss_stops_with_iteration_loss_and_hint(tmp_path):
    synthetic_detection.register(DATASET, str(tmp_path / "data"), num_images=6)
    out = str(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError) as e:
        # Iteration 3 is the last: PeriodicCheckpointer would write model_final on the way out.
        _train(out, max_iter=4, period=2, trainer_cls=_NaNAtIteration3)
    msg = str(e.value)
    assert "iteration 3" in msg and "loss_cls" in msg
    assert "LR 0.01 is for 16 images" in msg and "IMS_PER_BATCH=2" in msg
    assert "model_0000001.pth" in msg
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000001.pth"]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_0000001.pth"


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_resumable_sampler_continues_the_stream(rank, world):
    from focal_det.data.resumable import ResumableTrainingSampler

    # Mixed orientations: batches are formed per group, at the index level.
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    kw = dict(aspect_groups=groups, rank=rank, world_size=world)
    full = ResumableTrainingSampler(len(groups), 3, seed=5, **kw)
    stream = _take(iter(full), 3 * 20)
    batches = [stream[i : i + 3] for i in range(0, len(stream), 3)]
    assert all(len({groups[idx] for idx, _ in b}) == 1 for b in batches)
    resumed = ResumableTrainingSampler(len(groups), 3, seed=5, **kw)
    resumed.set_start_iter(7)
    assert _take(iter(resumed), 3 * 13) == stream[3 * 7 :]


def test_resumable_loader_with_workers_continues_the_batches(tmp_path):
    from focal_det.data.resumable import build_resumable_train_loader

    cfg = setup(default_argument_parser().parse_args(
        _argv(str(tmp_path), 10, 5) + ["DATALOADER.NUM_WORKERS", "2", "SOLVER.IMS_PER_BATCH", "2"]
    ))  # fmt: skip
    dicts = [{"image_id": i, "width": 100 + 50 * (i % 2), "height": 120} for i in range(7)]

    def mapper(d):  # what augmentation would draw, from the seeded RNGs
        return {"image_id": d["image_id"], "draw": float(np.random.rand())}

    def batches(start_iter, n):
        loader, sampler = build_resumable_train_loader(cfg, dicts, mapper)
        sampler.set_start_iter(start_iter)
        it = iter(loader)
        out = [[(x["image_id"], x["draw"]) for x in next(it)] for _ in range(n)]
        del it
        return out

    ref = batches(0, 9)
    assert batches(5, 4) == ref[5:]
    # Each batch holds one orientation (detectron2's aspect-ratio grouping semantics).
    assert all(len({dicts[i]["width"] > 120 for i, _ in b}) == 1 for b in ref)


def test_non_finite_error_carries_its_facts_into_the_advice():
    from detectron2.config import get_cfg

    from focal_det.engine.hooks import explain_non_finite_loss

    cfg = get_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH = 0.02, 2
    # FocalRetinaNet's error has the losses; detectron2's SimpleTrainer's (a model that does not
    # check its own) has text only, which the advice then quotes.
    ours = NonFiniteLossError("FocalRetinaNet: non-finite loss at iteration 9: ...",
                              losses={"loss_cls": 0.5, "loss_box_reg": float("inf")}, iteration=9)
    d2 = FloatingPointError("Loss became infinite or NaN at iteration=9!\nloss_dict = {...}")
    for original, named in [(ours, "loss_box_reg"), (d2, "see the original error below")]:
        with pytest.raises(NonFiniteLossError) as e:
            with explain_non_finite_loss(cfg, 9):
                raise original
        assert e.value.iteration == 9 and e.value.explained and e.value.__cause__ is original
        assert e.value.losses == (ours.losses if original is ours else {})
        msg = str(e.value)
        assert f"iteration 9 ({named})" in msg and f"Original error: {original}" in msg
        assert "calls for about 0.00125" in msg and "16x that: lower it" in msg


# ---- issue 15: advice after a divergence that leads out of it (BAD 4) ---------------------------
def _diverge_argv(out_dir, *extra, resume=False):
    return ["--config-file", QUICK] + (["--resume"] if resume else []) + [
        "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()",
        "MODEL.RETINANET.NUM_CLASSES", "3", "OUTPUT_DIR", out_dir, "SEED", "0",
        "SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(7,)", "SOLVER.CHECKPOINT_PERIOD", "1",
        *extra,
    ]  # fmt: skip


def _run(argv):
    trainer = Trainer(setup(default_argument_parser().parse_args(argv)))
    trainer.resume_or_load(resume="--resume" in argv)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_divergence_advice_followed_literally_trains_to_the_end(tmp_path, caplog):
    import re

    synthetic_detection.register(DATASET, str(tmp_path / "data"), num_images=6)
    out = str(tmp_path / "run")
    # LR 1.0 for 2 images (80x the linear-scaling rule): the loss of iteration 2 is ~1e5, of
    # iteration 3 ~1e22, NaN at iteration 4, while weights stay finite until then.
    with pytest.raises(NonFiniteLossError) as e:
        _run(_diverge_argv(out, "SOLVER.BASE_LR", "1.0"))
    msg = str(e.value)
    # Every checkpoint was written, but only the one whose weights gave a healthy loss at the
    # next iteration is "last good" (model_0000002/3 held weights of the divergence already).
    assert {"model_0000000.pth", "model_0000001.pth", "model_0000002.pth"} <= set(os.listdir(out))
    last = os.path.join(out, "model_0000000.pth")
    assert f"The last good checkpoint is {last}" in msg
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_0000000.pth"

    # 1) "run the same command again with --resume ... and <fix> added to the overrides".
    fix = re.search(r"with --resume \(a flag: put it before the KEY VALUE overrides\) and "
                    r"(SOLVER\.\S+ \S+) added to the overrides", msg)  # fmt: skip
    assert fix, msg
    assert fix.group(1) == "SOLVER.BASE_LR 0.00125"
    with caplog.at_level("WARNING", logger="focal_det.engine.hooks"):
        resumed = _run(_diverge_argv(out, "SOLVER.BASE_LR", "1.0", *fix.group(1).split(),
                                     resume=True))  # fmt: skip
    assert resumed.start_iter == 1 and resumed.iter == 8
    assert "SOLVER.BASE_LR: 1.0 -> 0.00125: applied from iteration 1 on" in caplog.text
    lrs = [v for v, _ in resumed.storage.history("lr").values()]
    assert len(lrs) == 7 and max(lrs) <= 0.00125  # the new LR, warm-up included, not 1.0
    losses = [v for v, _ in resumed.storage.history("total_loss").values()]
    assert all(map(np.isfinite, losses)) and max(losses) < 10
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"

    # 2) "Or start a new schedule from its weights: MODEL.WEIGHTS <ckpt> <fix>, without --resume,
    # in a new OUTPUT_DIR."
    alt = re.search(r"MODEL\.WEIGHTS (\S+) (SOLVER\.\S+ \S+), without --resume", msg)
    assert alt and alt.group(1) == last
    fresh = _run(_diverge_argv(str(tmp_path / "new"), "MODEL.WEIGHTS", alt.group(1),
                               *alt.group(2).split()))  # fmt: skip
    assert fresh.start_iter == 0 and fresh.iter == 8
    assert all(map(np.isfinite, [v for v, _ in fresh.storage.history("total_loss").values()]))


def test_resume_applies_changed_solver_values_and_names_the_rest(tmp_path, caplog):
    synthetic_detection.register(DATASET, str(tmp_path / "data"), num_images=6)
    out = str(tmp_path / "run")
    _train(out, max_iter=2, period=2)
    elsewhere = tmp_path / "elsewhere.pth"
    elsewhere.write_bytes(b"weights")
    argv = _argv(out, 4, 2, resume=True) + [
        "SOLVER.BASE_LR", "0.004", "SOLVER.WEIGHT_DECAY", "0.001", "SOLVER.STEPS", "(3,)",
        "SEED", "8", "SOLVER.IMS_PER_BATCH", "4", "MODEL.WEIGHTS", str(elsewhere),
    ]  # fmt: skip
    cfg = setup(default_argument_parser().parse_args(argv))
    trainer = Trainer(cfg)
    with caplog.at_level("WARNING", logger="focal_det.engine.hooks"):
        trainer.resume_or_load(resume=True)
    text = caplog.text
    assert "SOLVER.BASE_LR: 0.01 -> 0.004: applied from iteration 2 on" in text
    assert "SOLVER.WEIGHT_DECAY: 0.0001 -> 0.001: applied" in text
    assert "SEED: 7 -> 8: the data stream continues with the checkpoint's seed 7" in text
    assert "SOLVER.IMS_PER_BATCH: 2 -> 4: the resumed run is no longer the uninterrupted" in text
    assert f"MODEL.WEIGHTS: '' -> '{elsewhere}' is ignored: --resume loads" in text
    # detectron2 restores the checkpoint's LR and weight decay; this config's are in force.
    groups = trainer.optimizer.param_groups
    assert max(trainer.scheduler.base_lrs) == pytest.approx(0.004 * cfg.SOLVER.BIAS_LR_FACTOR)
    assert {g["weight_decay"] for g in groups} <= {0.001, cfg.SOLVER.WEIGHT_DECAY_NORM, 0.0}
    # Iteration 2 is past the warm-up and, with the new STEPS (3,), before the decay (the old
    # STEPS (1,) would give 0.1x): exactly the new base LR (biases: times BIAS_LR_FACTOR).
    assert cfg.SOLVER.WARMUP_ITERS <= 2
    assert sorted({round(g["lr"], 12) for g in groups}) == sorted(
        {round(0.004, 12), round(0.004 * cfg.SOLVER.BIAS_LR_FACTOR, 12)}
    )
    assert "SOLVER.STEPS: [1] -> [3]: applied from iteration 2 on" in text


def test_resume_with_another_number_of_classes_is_refused_with_the_alternative(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from focal_det.engine.hooks import ResumeError

    synthetic_detection.register(DATASET, str(tmp_path / "data"), num_images=6)
    five = "reliability_train_5cls"
    if five not in DatasetCatalog.list():
        DatasetCatalog.register(five, lambda: DatasetCatalog.get(DATASET))
        MetadataCatalog.get(five).set(thing_classes=list("abcde"))
    out = str(tmp_path / "run")
    _train(out, max_iter=2, period=2)
    argv = _argv(out, 4, 2, resume=True) + [
        "MODEL.RETINANET.NUM_CLASSES", "5", "DATASETS.TRAIN", f"('{five}',)"]
    trainer = Trainer(setup(default_argument_parser().parse_args(argv)))
    with pytest.raises(ResumeError) as e:  # was: a shape error inside the optimizer's step
        trainer.resume_or_load(resume=True)
    msg = str(e.value)
    assert "head.cls_score.weight (27, 32, 3, 3) in the checkpoint, (45, 32, 3, 3) now" in msg
    assert "MODEL.RETINANET.NUM_CLASSES: 3 -> 5" in msg
    assert f"MODEL.WEIGHTS {os.path.join(out, 'model_final.pth')} without --resume" in msg


class _NaNAtLastIteration(_NaNAtIteration3):
    evaluated = 0

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        cls.evaluated += 1
        return super().test(cfg, model, evaluators)


def test_no_evaluation_after_a_failure_at_the_last_iteration(tmp_path):
    synthetic_detection.register(DATASET, str(tmp_path / "data"), num_images=6)
    argv = _argv(str(tmp_path / "out"), 4, 2) + ["DATASETS.TEST", f"('{DATASET}',)"]
    trainer = _NaNAtLastIteration(setup(default_argument_parser().parse_args(argv)))
    trainer.resume_or_load(resume=False)
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        trainer.train()
    assert _NaNAtLastIteration.evaluated == 0  # detectron2's EvalHook would evaluate here
    assert not os.path.exists(os.path.join(str(tmp_path / "out"), "inference"))


def test_focal_det_logs_are_formatted_into_the_log(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "reliability_train_one_bad_box"
    records = synthetic_detection.write_images(str(tmp_path / "data"), num_images=4)
    records[0]["annotations"][0]["bbox"] = [10, 10, 10, 40]  # zero width: dropped, with a warning
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(thing_classes=list(synthetic_detection.CLASSES))
    out = str(tmp_path / "out")
    argv = _argv(out, 2, 2) + ["DATASETS.TRAIN", f"('{name}',)"]
    Trainer(setup(default_argument_parser().parse_args(argv))).train()
    resumed = Trainer(setup(default_argument_parser().parse_args(
        _argv(out, 3, 2, resume=True) + ["DATASETS.TRAIN", f"('{name}',)"])))  # fmt: skip
    resumed.resume_or_load(resume=True)
    resumed.train()
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    # detectron2's file format: "[time] logger LEVEL: message", for focal_det's loggers too.
    assert re.search(rf"\] focal_det\.data\.sanitize WARNING: {name}: dropped 1 degenerate", log)
    assert re.search(r"\] focal_det\.engine\.hooks INFO: Data stream resumed at iteration 2", log)


def test_busy_default_port_suggests_dist_url(tmp_path):
    import socket
    from urllib.parse import urlparse

    port = urlparse(default_argument_parser().parse_args([]).dist_url).port
    with socket.socket() as s:
        try:  # occupy detectron2's default port (if someone else holds it, it is busy anyway)
            s.bind(("", port))
            s.listen(1)
        except OSError:
            pass
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", QUICK,
             "--num-gpus", "2", "OUTPUT_DIR", str(tmp_path / "out")],
            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"port {port} is already in use on this machine" in proc.stderr
    assert "--dist-url tcp://127.0.0.1:" in proc.stderr and "--dist-url auto" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
