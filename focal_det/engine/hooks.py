"""
Training-health and resume support for ``Trainer``.

* :func:`explain_non_finite_loss` turns the ``FloatingPointError`` of a non-finite loss (raised
  by FocalRetinaNet or by detectron2's ``SimpleTrainer``) into a :class:`NonFiniteLossError`
  that names the iteration, the loss term(s) and the likely fix (the linear scaling rule: the
  paper's LR 0.01 is for 16 images per batch), and stops the checkpointer from writing anything
  on the way out (``PeriodicCheckpointer.after_train`` would otherwise write ``model_final``
  after a failure at the last iteration), so the last good checkpoint stays the one
  ``--resume`` loads.
* :class:`ResumableDataHook` stores the data stream's seed in the checkpoint and, before
  training starts, tells the sampler how many batches the restored run already consumed (see
  ``focal_det.data.resumable``).
"""
import contextlib
import logging
import re

from detectron2.engine import HookBase

__all__ = [
    "NonFiniteLossError",
    "ResumableDataHook",
    "explain_non_finite_loss",
    "find_resumable_sampler",
    "linear_scaling_hint",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/Inf; the message says where and what to try."""


def linear_scaling_hint(cfg):
    ims, lr = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR
    scaled = 0.01 * ims / 16
    ratio = lr / scaled if scaled > 0 else float("inf")
    verdict = (
        f"which is {ratio:.3g}x that: lower it" if ratio > 1.5
        else "so the LR itself looks in range: check the data (boxes, images) and warm-up"
    )
    return (
        f"SOLVER.BASE_LR={lr:g} with SOLVER.IMS_PER_BATCH={ims}. By the linear scaling rule "
        f"(the paper's LR 0.01 is for 16 images per batch) this batch size calls for about "
        f"{scaled:g}, {verdict}. A longer SOLVER.WARMUP_ITERS (now {cfg.SOLVER.WARMUP_ITERS}) "
        "also helps early divergence."
    )


_NAMED_NON_FINITE = re.compile(r"'?(loss_\w+)'?\s*[:=]\s*(?:tensor\()?(-?nan|-?inf)", re.I)


def _non_finite_names(message):
    names = [m.group(1) for m in _NAMED_NON_FINITE.finditer(message)]
    if not names:
        names = sorted(set(re.findall(r"\bloss_\w+", message)))
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def explain_non_finite_loss(cfg, iteration, checkpointer=None):
    """
    Wrap one training step. A ``FloatingPointError`` inside becomes a
    :class:`NonFiniteLossError` with the iteration, the loss name(s) and a hint; ``checkpointer``
    (a ``SafeDetectionCheckpointer``) is told to write nothing more.
    """
    try:
        yield
    except NonFiniteLossError:
        raise
    except FloatingPointError as e:
        last = "(none yet)"
        if checkpointer is not None:
            if checkpointer.has_checkpoint():
                last = checkpointer.get_checkpoint_file()
            checkpointer.refuse_saves(f"training stopped at iteration {iteration}: {e}")
        names = _non_finite_names(str(e))
        which = ", ".join(names) if names else "see the original error below"
        raise NonFiniteLossError(
            f"Non-finite loss at iteration {iteration} ({which}); training stopped.\n"
            f"  Likely cause: {linear_scaling_hint(cfg)}\n"
            f"  The last good checkpoint is {last}; no checkpoint was written after the "
            f"failure. Fix the config and run again with --resume.\n"
            f"  Original error: {e}"
        ) from e


def find_resumable_sampler(data_loader):
    """The ``ResumableTrainingSampler`` behind a loader built by build_resumable_train_loader."""
    from ..data.resumable import ResumableTrainingSampler

    dataset = getattr(data_loader, "dataset", None)
    sampler = getattr(dataset, "sampler", None)
    return sampler if isinstance(sampler, ResumableTrainingSampler) else None


class ResumableDataHook(HookBase):
    """
    Keeps the training data stream resumable: its ``state_dict`` (the sampler's seed) goes into
    every checkpoint through the trainer's state; ``before_train`` (after ``resume_or_load``)
    makes the sampler skip the batches of iterations ``0 .. start_iter - 1``.
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def before_train(self):
        self.sampler.set_start_iter(self.trainer.start_iter)
        if self.trainer.start_iter:
            logger.info(
                f"Data stream resumed at iteration {self.trainer.start_iter} "
                f"(seed {self.sampler.seed}): skipping the batches already trained on."
            )

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)
