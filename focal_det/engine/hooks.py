"""
Training-health and resume support for ``Trainer``.

* :func:`explain_non_finite_loss` turns the non-finite loss of a training step (FocalRetinaNet's
  :class:`~focal_det.modeling.NonFiniteLossError`, or the ``FloatingPointError`` of detectron2's
  ``SimpleTrainer`` for a model that does not check its own) into a ``NonFiniteLossError`` with
  the iteration, the loss term(s) and the likely fix (the linear scaling rule: the paper's LR
  0.01 is for 16 images per batch), and stops the checkpointer from writing anything
  on the way out (``PeriodicCheckpointer.after_train`` would otherwise write ``model_final``
  after a failure at the last iteration), so the last good checkpoint stays the one
  ``--resume`` loads. Its advice is literal: ``--resume`` with the fix added applies the new
  ``SOLVER`` values (:func:`check_resumed_run`), and the checkpoint it names passed the
  checkpointer's weight and next-loss checks.
* :class:`ResumableDataHook` stores the data stream's seed in the checkpoint and, before
  training starts, tells the sampler how many batches the restored run already consumed (see
  ``focal_det.data.resumable``).
* :class:`RunConfigHook` stores the run's config in every checkpoint; on ``--resume``
  :func:`check_resumed_run` compares it with the new one: a model that no longer fits the
  checkpoint stops with the alternative, changed ``SOLVER`` values are applied (detectron2 would
  silently keep the checkpoint's LR, momentum and weight decay), and keys that void the exact
  resume are named.
* :class:`EvalAfterSuccessHook`: detectron2's ``EvalHook`` minus the evaluation of a model whose
  training failed at its last iteration.
"""
import contextlib
import logging

from detectron2.engine import HookBase
from detectron2.engine.hooks import EvalHook

from ..config_check import flatten_keys, load_yaml
from ..data.resumable import ResumableTrainingSampler
from ..modeling.meta_arch import NonFiniteLossError

__all__ = [
    "EvalAfterSuccessHook",
    "ResumableDataHook",
    "ResumeError",
    "RunConfigHook",
    "check_resumed_run",
    "explain_non_finite_loss",
    "find_resumable_sampler",
    "linear_scaling_hint",
    "solver_state",
]

logger = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """``--resume`` with a config whose model does not fit the checkpoint."""


def _linear_scaled_lr(cfg):
    return 0.01 * cfg.SOLVER.IMS_PER_BATCH / 16


def suggested_fix(cfg):
    """The override to add after a divergence, as ``KEY VALUE`` text."""
    scaled = _linear_scaled_lr(cfg)
    if cfg.SOLVER.BASE_LR > 1.5 * scaled:
        return f"SOLVER.BASE_LR {scaled:g}"
    return f"SOLVER.WARMUP_ITERS {max(2 * cfg.SOLVER.WARMUP_ITERS, 100)}"


def linear_scaling_hint(cfg):
    ims, lr = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR
    scaled = _linear_scaled_lr(cfg)
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


@contextlib.contextmanager
def explain_non_finite_loss(cfg, iteration, checkpointer=None):
    """
    Wrap one training step. A ``FloatingPointError`` inside (a non-finite loss) becomes a
    :class:`NonFiniteLossError` with the iteration, the loss name(s) and the advice;
    ``checkpointer`` (a ``SafeDetectionCheckpointer``) is told to write nothing more.
    """
    try:
        yield
    except FloatingPointError as e:
        if getattr(e, "explained", False):
            raise
        last = None
        if checkpointer is not None:
            if checkpointer.has_checkpoint():
                last = checkpointer.get_checkpoint_file()
            checkpointer.refuse_saves(f"training stopped at iteration {iteration}: {e}")
        # FocalRetinaNet's error carries its losses; detectron2's SimpleTrainer's names them in
        # its text only, shown below as the original error.
        losses = e.losses if isinstance(e, NonFiniteLossError) else {}
        names = e.non_finite if isinstance(e, NonFiniteLossError) else []
        which = ", ".join(names) if names else "see the original error below"
        fix = suggested_fix(cfg)
        if last is not None:
            advice = (
                f"  The last good checkpoint is {last} (finite weights of bounded size, which "
                "gave a healthy loss at the next iteration); no checkpoint was written after "
                "the failure.\n"
                f"  To continue from it: run the same command again with --resume (a flag: put "
                f"it before the KEY VALUE overrides) and {fix} added to the overrides. On "
                "--resume, changed SOLVER values replace the checkpoint's (the log lists "
                "them).\n"
                f"  Or start a new schedule from its weights: MODEL.WEIGHTS {last} {fix}, "
                "without --resume, in a new OUTPUT_DIR.\n"
            )
        else:
            advice = (
                "  No good checkpoint was saved before the failure: run the same command again "
                f"with {fix} added to the KEY VALUE overrides.\n"
            )
        raise NonFiniteLossError(
            f"Non-finite loss at iteration {iteration} ({which}); training stopped.\n"
            f"  Likely cause: {linear_scaling_hint(cfg)}\n"
            f"{advice}"
            f"  Original error: {e}",
            losses=losses,
            iteration=iteration,
            explained=True,
        ) from e


def find_resumable_sampler(data_loader):
    """The ``ResumableTrainingSampler`` behind a loader built by build_resumable_train_loader."""
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


class EvalAfterSuccessHook(EvalHook):
    """
    detectron2's ``EvalHook``, except that the evaluation after training runs only if training
    finished: detectron2's test (``iter + 1 >= max_iter``) also passes when the last iteration
    failed (a NaN loss), and would print the AP of the diverged model after the error.
    """

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:  # a finished loop leaves iter = max_iter
            logger.warning(
                f"Training failed at iteration {self.trainer.iter}: not evaluating the model."
            )
            del self._func
            return
        super().after_train()


class RunConfigHook(HookBase):
    """
    Puts the run's config (YAML) into every checkpoint through the trainer's state, and keeps
    the one read back on ``--resume`` in ``saved`` for :func:`check_resumed_run`.
    """

    def __init__(self, cfg):
        self._yaml = cfg.dump()
        self.saved = None

    def state_dict(self):
        return {"config": self._yaml}

    def load_state_dict(self, state):
        self.saved = state.get("config")


def config_changes(saved_yaml, cfg):
    """[(key, value in the checkpoint's config, value now)] for every key that differs."""
    saved = flatten_keys(load_yaml(text=saved_yaml, source="The config stored in the checkpoint"))
    now = flatten_keys(load_yaml(text=cfg.dump(), source="The run's config"))
    return [(k, saved[k], now[k]) for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]]


# Changed on --resume, these make the resumed run differ from the uninterrupted one: the data
# stream, its batches or the images' sizes/augmentation.
_EXACT_RESUME_KEYS = ("SOLVER.IMS_PER_BATCH", "SOLVER.REFERENCE_WORLD_SIZE", "DATASETS.TRAIN")
_EXACT_RESUME_NODES = ("DATALOADER.", "INPUT.")
# Solver hyper-parameters that torch's Optimizer.load_state_dict restores from the checkpoint.
_GROUP_KEYS = ("weight_decay", "momentum", "dampening", "nesterov", "betas", "eps")


def solver_state(optimizer, scheduler):
    """The LR schedule's base LRs and each param group's hyper-parameters, from the config."""
    groups = [{k: g[k] for k in _GROUP_KEYS if k in g} for g in optimizer.param_groups]
    return list(scheduler.base_lrs), groups


def _describe(key, old, new, ckpt, start_iter, data_seed):
    change = f"{key}: {old!r} -> {new!r}"
    if key == "MODEL.WEIGHTS":
        return (f"{change} is ignored: --resume loads {ckpt}; to start from MODEL.WEIGHTS, run "
                "without --resume")
    if key == "SEED":
        return (f"{change}: the data stream continues with the checkpoint's seed {data_seed}, so "
                "that the run resumes exactly; for another seed start a new run without --resume")
    if key in _EXACT_RESUME_KEYS or key.startswith(_EXACT_RESUME_NODES):
        return (f"{change}: the resumed run is no longer the uninterrupted one (other batches, "
                "images or sizes from iteration "
                f"{start_iter} on); start a new run without --resume to change it cleanly")
    if key.startswith("SOLVER."):
        return f"{change}: applied from iteration {start_iter} on"
    return change


def check_resumed_run(trainer, fresh_solver):
    """
    After ``resume_or_load(resume=True)``: stop if the model no longer fits the checkpoint,
    re-apply this config's SOLVER values over the checkpoint's optimizer / LR-schedule state and
    log every config key that changed since the checkpoint was written.

    Args:
        fresh_solver: :func:`solver_state` taken before the checkpoint was loaded.
    """
    ckpt = trainer.checkpointer.get_checkpoint_file()
    hook = next((h for h in trainer._hooks if isinstance(h, RunConfigHook)), None)
    changes = config_changes(hook.saved, trainer.cfg) if hook and hook.saved else None
    inc = getattr(trainer.checkpointer, "last_incompatible", None)
    if inc is not None and (inc.incorrect_shapes or inc.missing_keys):
        mism = [f"{k} {tuple(a)} in the checkpoint, {tuple(b)} now"
                for k, a, b in inc.incorrect_shapes[:4]]  # fmt: skip
        model_changes = [f"{k}: {o!r} -> {n!r}" for k, o, n in changes or []
                         if k.startswith("MODEL.") and k != "MODEL.WEIGHTS"]  # fmt: skip
        raise ResumeError(
            f"--resume: the model of this config does not fit {ckpt}: "
            f"{len(inc.incorrect_shapes)} tensor(s) changed shape ({'; '.join(mism)}) and "
            f"{len(inc.missing_keys)} are missing ({', '.join(inc.missing_keys[:4])}). "
            + (f"Config keys changed since it was written: {', '.join(model_changes)}. "
               if model_changes else "")
            + "--resume continues that run (its optimizer state belongs to its model). To "
            f"train this model from those weights instead, use MODEL.WEIGHTS {ckpt} without "
            "--resume (mismatched tensors start from scratch), in a new OUTPUT_DIR."
        )  # fmt: skip

    lines = []
    if changes:
        seed = getattr(find_resumable_sampler(trainer._trainer.data_loader), "seed", None)
        lines = [_describe(k, o, n, ckpt, trainer.start_iter, seed) for k, o, n in changes]

    base_lrs, groups = fresh_solver
    sched, opt = trainer.scheduler, trainer.optimizer
    reapplied = list(sched.base_lrs) != base_lrs
    for g, fresh in zip(opt.param_groups, groups):
        for k, v in fresh.items():
            reapplied |= g.get(k) != v
            g[k] = v
    if reapplied:
        old_lr = max(sched.base_lrs)
        sched.base_lrs = list(base_lrs)
        lrs = sched.get_lr()  # the schedule of this config at the resumed iteration
        for g, base, lr in zip(opt.param_groups, base_lrs, lrs):
            g["initial_lr"], g["lr"] = base, lr
        sched._last_lr = list(lrs)
        lines.append(
            f"the checkpoint's optimizer state had other SOLVER values (base LR {old_lr:g}); "
            f"this config's apply (base LR {max(base_lrs):g}, iteration {trainer.start_iter} "
            f"at LR {max(lrs):g})"
        )
    if lines:
        logger.warning(
            f"Resuming from {ckpt} with a config that differs from the checkpoint's:\n  - "
            + "\n  - ".join(lines)
        )
