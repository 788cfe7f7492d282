"""
Reliability of training (issue 8, items 3 and 4): a non-finite loss stops with the iteration,
the loss and a hint, leaving the last good checkpoint in place; a run SIGKILLed while writing a
checkpoint resumes from the previous one and ends with exactly the weights of an uninterrupted
run (deterministic CPU settings, augmentation on).
"""
import os
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
from focal_det.engine.hooks import NonFiniteLossError

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


def test_non_finite_error_names_the_loss():
    from detectron2.config import get_cfg

    from focal_det.engine.hooks import explain_non_finite_loss

    cfg = get_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH = 0.02, 2
    for original in [
        "FocalRetinaNet: non-finite loss at iteration 9: loss_cls=nan, loss_box_reg=0.31.",
        "Loss became infinite or NaN at iteration=9!\nloss_dict = {'loss_cls': 0.5, "
        "'loss_box_reg': inf}",
    ]:
        with pytest.raises(NonFiniteLossError) as e:
            with explain_non_finite_loss(cfg, 9):
                raise FloatingPointError(original)
        msg = str(e.value)
        bad = "loss_cls" if "loss_cls=nan" in original else "loss_box_reg"
        assert f"iteration 9 ({bad})" in msg
        assert "calls for about 0.00125" in msg and "16x that: lower it" in msg
