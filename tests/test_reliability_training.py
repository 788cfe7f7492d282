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

    # Uninterrupted reference: 8 iterations.
    ref = _train(str(tmp_path / "ref"), max_iter=8, period=2)
    ref_state = {k: v.clone() for k, v in ref.model.state_dict().items()}

    # Same run in a subprocess, SIGKILLed while writing its 3rd checkpoint (iteration 5,
    # model_0000005.pth); the one of iteration 3 is complete.
    out = str(tmp_path / "killed")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(
        tests=os.path.dirname(__file__), dataset=DATASET, data=data, die_at_save=3,
        argv=_argv(out, 8, 2),
    ))
    env = dict(os.environ, OMP_NUM_THREADS="1", FOCAL_TEST_THREADS="1")
    proc = subprocess.run([sys.executable, str(driver)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_0000003.pth"
    assert not os.path.exists(os.path.join(out, "model_0000005.pth"))  # only a temp file

    resumed = _train(out, max_iter=8, period=2, resume=True)
    assert resumed.start_iter == 4
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
