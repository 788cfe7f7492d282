"""
Checkpoints that survive a kill and files that stay data.

``SafeDetectionCheckpointer`` is detectron2's :class:`DetectionCheckpointer` with these changes:

* **Atomic saves.** Its ``path_manager`` opens every file it writes with
  :func:`focal_det.utils.files.atomic_open`, so fvcore's own ``save`` and
  ``tag_last_checkpoint`` write ``<name>.pth`` and ``last_checkpoint`` to a temporary file in the
  same folder, fsync it and ``os.replace`` it into place (``last_checkpoint`` after the checkpoint
  is complete). A run killed at any instant (SIGKILL, OOM killer, pre-emption) leaves either the
  previous checkpoint or the new one as "last", never a truncated file. Temporary files get the
  permissions of ``open()`` (0666 minus the umask), so a server under another user can read them.
* **No checkpoint of broken weights.** ``save`` refuses (``FloatingPointError``) to write
  weights that contain NaN/Inf, so a run that diverges keeps its last good checkpoint as the one
  ``--resume`` picks up. "Last good" is stricter than finite: a checkpoint whose parameters
  exceed ``max_abs_weight`` is written but not tagged as ``last_checkpoint``; with
  ``confirm_with_next_loss=True`` (the Trainer's) a checkpoint is tagged only once the loss
  computed on its weights, at the next iteration, is finite and not exploding
  (:meth:`SafeDetectionCheckpointer.judge_pending`): weights can be small yet already give a
  loss 1000x the previous ones, the step before NaN.
* **Loading does not run code from the file.** ``.pth``/``.pyth`` files are read with
  ``torch.load(weights_only=True)`` (fvcore calls ``torch.load`` without it, which falls back to
  full unpickling when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set or on older PyTorch).
  Detectron / detectron2-model-zoo ``.pkl`` files are pickles by nature; they are read with a
  restricted unpickler that only rebuilds numpy arrays, numpy scalars and plain containers, and
  refuses any other global (``os.system``, ...). Pass ``trust_pickle=True`` (or set
  ``FOCAL_TRUST_PICKLE=1``) only for a file from a source you trust whose format needs more:
  it turns on full unpickling for ``.pkl`` and ``.pth`` alike. A file that is not a checkpoint
  at all (empty, truncated, a list, a Git LFS pointer) raises :class:`CheckpointFormatError`
  naming the file, not an unpickling or "unsafe" error.
"""
import collections
import logging
import math
import os
import pickle
import statistics

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ..utils.files import atomic_open

__all__ = [
    "CheckpointFormatError",
    "SafeDetectionCheckpointer",
    "UnsafeCheckpointError",
    "restricted_pickle_load",
]

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked to rebuild an object that is not plain data."""


class CheckpointFormatError(ValueError):
    """A weights file that is not a (complete) checkpoint: empty, truncated, another format."""


def _not_a_checkpoint(filename, why):
    return CheckpointFormatError(
        f"{filename} is not a usable checkpoint: {why}. It may be truncated (an interrupted "
        "copy or download), or another kind of file. Copy or download it again; a checkpoint "
        "of focal_det/detectron2 is a torch.save of {'model': state_dict, ...}."
    )


# Globals a Detectron/detectron2 model-zoo .pkl needs: numpy arrays, numpy scalars, dtypes and
# plain containers. Everything else (os.system, subprocess.*, builtins.eval, ...) is refused.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol-2 pickles of bytes written by Python 3
    ("__builtin__", "set"),
    ("builtins", "set"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, source, **kwargs):
        super().__init__(f, **kwargs)
        self._source = source

    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._source} asks to rebuild '{module}.{name}', which is not plain data "
            "(numpy arrays / dicts / lists / numbers / strings). Refusing to unpickle it: a "
            "pickle can run arbitrary code. If you trust this file's source, load it with "
            "SafeDetectionCheckpointer(..., trust_pickle=True) or FOCAL_TRUST_PICKLE=1."
        )


def restricted_pickle_load(f, source="<stream>", encoding="latin1"):
    """``pickle.load`` that only rebuilds numpy arrays and plain Python containers."""
    return _RestrictedUnpickler(f, source, encoding=encoding).load()


def _non_finite_tensors(state_dict):
    bad = []
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            bad.append(k)
    return bad


def _largest_parameters(model, state_dict, bound):
    """[(name, max |value|)] of the parameters above ``bound``, largest first."""
    # Parameters only: BatchNorm running variances legitimately reach 1e3 in healthy training.
    names = {k for k, _ in model.named_parameters()}
    big = []
    for k, v in state_dict.items():
        if k in names and v.numel():
            m = float(v.detach().abs().max())
            if m > bound:
                big.append((k, m))
    return sorted(big, key=lambda kv: -kv[1])


# A loss this many times the median of the recent ones means the weights it was computed on
# are already diverging (seen: 1.1 -> 1.8e5 -> 1e22 -> NaN): their checkpoint is not "good".
LOSS_EXPLOSION_FACTOR = 100.0
_LOSS_WINDOW = 20


def _first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:200]


def _check_not_empty_or_pointer(filename):
    local = PathManager.get_local_path(filename)
    size = os.path.getsize(local)
    if size == 0:
        raise _not_a_checkpoint(filename, "it is empty (0 bytes)")
    with open(local, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointFormatError(
            f"{filename} is a Git LFS pointer ({size} bytes), not the weights: run "
            "`git lfs pull` in its repository, or download the file itself."
        )


class _AtomicWrites:
    """
    A checkpointer's ``path_manager`` (detectron2's PathManager) whose ``open`` for writing is
    :func:`atomic_open`; every other call goes to the wrapped one.
    """

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path, mode="r", **kwargs):
        if mode in ("w", "wb"):
            return atomic_open(self._path_manager.get_local_path(path), mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._path_manager, name)


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` with atomic saves, a refusal to save non-finite weights,
    and loading that does not execute code from the file (see the module docstring).
    """

    def __init__(self, model, save_dir="", *, trust_pickle=None, max_abs_weight=1e4,
                 confirm_with_next_loss=False, **kwargs):  # fmt: skip
        """
        Args:
            max_abs_weight (float): a checkpoint with a parameter above this (absolute value)
                is written but not tagged as ``last_checkpoint``.
            confirm_with_next_loss (bool): tag a checkpoint as ``last_checkpoint`` only when
                :meth:`judge_pending` finds the loss computed on its weights healthy (the
                Trainer calls it after every iteration) or :meth:`confirm_pending` is called.
        """
        super().__init__(model, save_dir, **kwargs)
        # fvcore's save / tag_last_checkpoint write through it: the smallest hook for atomicity.
        self.path_manager = _AtomicWrites(self.path_manager)
        if trust_pickle is None:
            trust_pickle = os.environ.get("FOCAL_TRUST_PICKLE", "0") == "1"
        self.trust_pickle = trust_pickle
        self.max_abs_weight = max_abs_weight
        self.confirm_with_next_loss = confirm_with_next_loss
        self._refuse_reason = None
        self._cleaned = False
        self._pending = None  # basename saved, waiting for the loss on its weights
        self._tag_saved = None  # during save: how tag_last_checkpoint treats the new file
        self._recent_losses = collections.deque(maxlen=_LOSS_WINDOW)
        self.last_incompatible = None  # missing / unexpected / mis-shaped keys of the last load
        self._current_file = None

    def _remove_stale_temp_files(self):
        # A run killed inside atomic_open leaves its ".<name>.<random>.tmp" behind (never
        # under the final name). The first save of the next run removes them: only the main
        # process of one run writes to a save_dir.
        folder = PathManager.get_local_path(self.save_dir)
        if not os.path.isdir(folder):
            return
        for f in os.listdir(folder):
            ours = ".pth." in f or f.startswith(".last_checkpoint.")
            if f.startswith(".") and f.endswith(".tmp") and ours:
                try:
                    os.unlink(os.path.join(folder, f))
                    self.logger.info(f"Removed the partial checkpoint {f} of an interrupted run.")
                except OSError:
                    pass

    # ---- saving -------------------------------------------------------------------------
    def refuse_saves(self, reason):
        """From now on ``save`` writes nothing (logs ``reason``): the run has failed."""
        self._refuse_reason = reason
        self._pending = None

    def _last_good(self):
        return self.get_checkpoint_file() if self.has_checkpoint() else "(none)"

    def judge_pending(self, loss, iteration):
        """
        ``loss``: the total loss of ``iteration``, computed on the weights after the previous
        step, i.e. those of a checkpoint saved then. Tag that checkpoint as ``last_checkpoint``
        if the loss is finite and below ``LOSS_EXPLOSION_FACTOR`` x the median of the last
        iterations; otherwise keep the previous one as the last good checkpoint.
        """
        recent = list(self._recent_losses)
        self._recent_losses.append(loss)
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        median = statistics.median(recent) if recent else 0.0
        if math.isfinite(loss) and (median <= 0 or loss <= LOSS_EXPLOSION_FACTOR * median):
            self.tag_last_checkpoint(pending)
            return
        self.logger.warning(
            f"Checkpoint {pending} is not marked as the last good one: the loss on its weights "
            f"(iteration {iteration}) is {loss:.4g}, not finite or more than "
            f"{LOSS_EXPLOSION_FACTOR:g}x the median {median:.4g} of the previous {len(recent)} "
            f"iterations: the training is diverging. --resume would start from "
            f"{self._last_good()}."
        )

    def confirm_pending(self):
        """Tag the checkpoint waiting for :meth:`judge_pending` (the run ended normally)."""
        if self._pending is not None and self._refuse_reason is None:
            self.tag_last_checkpoint(self._pending)
        self._pending = None

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if self._refuse_reason is not None:
            self.logger.warning(f"Not saving checkpoint '{name}': {self._refuse_reason}")
            return
        state = self.model.state_dict()
        bad = _non_finite_tensors(state)
        if bad:
            last = self._last_good()
            self.refuse_saves(f"the weights became non-finite ({bad[:3]})")
            # Weights, not a loss (no NonFiniteLossError): the Trainer's loss check stops a run
            # first; this is the last line for any other caller, with the same advice.
            raise FloatingPointError(
                f"Not saving checkpoint '{name}': {len(bad)} weight tensor(s) contain NaN/Inf "
                f"(first: {bad[:3]}). The training diverged; the last good checkpoint is "
                f"{last}. Lower SOLVER.BASE_LR (linear scaling rule: the paper's 0.01 is for "
                "16 images per batch) or raise SOLVER.WARMUP_ITERS, then run again with "
                "--resume (the changed SOLVER values apply from that checkpoint on), or start "
                f"from its weights with MODEL.WEIGHTS {last} and no --resume."
            )
        big = _largest_parameters(self.model, state, self.max_abs_weight)
        if not self._cleaned:
            self._remove_stale_temp_files()
            self._cleaned = True
        # fvcore's save writes the file, then calls tag_last_checkpoint for it: whether it
        # becomes "last" now, later (judge_pending) or never is decided there.
        self._tag_saved = "never" if big else "pending" if self.confirm_with_next_loss else "now"
        try:
            super().save(name, **kwargs)
        finally:
            self._tag_saved = None
        if big:
            self.logger.warning(
                f"Checkpoint {name}.pth is not marked as the last good one: {len(big)} "
                f"parameter(s) exceed |w| = {self.max_abs_weight:g} (largest: {big[0][0]} "
                f"{big[0][1]:.3g}), the training is diverging. --resume would start from "
                f"{self._last_good()}."
            )

    def tag_last_checkpoint(self, last_filename_basename):
        when, self._tag_saved = self._tag_saved, None
        if when in ("never", "pending"):
            self._pending = last_filename_basename if when == "pending" else None
            return
        super().tag_last_checkpoint(last_filename_basename)

    # ---- loading ------------------------------------------------------------------------
    def _torch_load(self, f):
        _check_not_empty_or_pointer(f)
        try:
            if self.trust_pickle:  # the user vouched for the file: full unpickling
                loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=False)
            else:
                loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only's refusal names a GLOBAL it would have to import; anything else
            # ("Unsupported operand", "invalid load key") is a file that is not a pickle.
            if "global" not in str(e).lower():
                raise _not_a_checkpoint(f, f"it does not unpickle ({_first_line(e)})") from e
            raise UnsafeCheckpointError(
                f"{f} contains objects other than tensors and plain containers, so it was not "
                "loaded (torch.load(weights_only=True)). If you trust its source: allowlist the "
                "class with torch.serialization.add_safe_globals, or set FOCAL_TRUST_PICKLE=1 "
                f"(SafeDetectionCheckpointer(..., trust_pickle=True)). Original error: {e}"
            ) from e
        except (EOFError, RuntimeError, KeyError, IndexError, ValueError, OSError) as e:
            # What torch.load raises for a cut-off zip / legacy file (e.g. "failed finding
            # central directory", EOFError, KeyError of a missing record).
            raise _not_a_checkpoint(f, f"{type(e).__name__}: {_first_line(e)}") from e
        if not isinstance(loaded, dict):
            raise _not_a_checkpoint(
                f, f"it holds a {type(loaded).__name__}, not a dict of weights"
            )
        return loaded

    def _load_model(self, checkpoint):
        model_state = checkpoint.get("model")
        if not isinstance(model_state, dict):
            raise _not_a_checkpoint(
                self._current_file, f"its 'model' entry is a {type(model_state).__name__}, not "
                "a dict of tensors"
            )  # fmt: skip
        self.last_incompatible = super()._load_model(checkpoint)
        return self.last_incompatible

    def _load_file(self, filename):
        # detectron2's _load_file calls pickle.load / torch.load inline (no hook for the loader):
        # its .pkl / .pyth handling is restated around the safe loaders; .pth is detectron2's.
        self._current_file = filename
        if filename.endswith(".pkl") and self.trust_pickle:
            return super()._load_file(filename)
        if filename.endswith(".pkl"):
            _check_not_empty_or_pointer(filename)
            with PathManager.open(filename, "rb") as f:
                try:
                    data = restricted_pickle_load(f, source=filename)
                except UnsafeCheckpointError:
                    raise
                except Exception as e:  # EOFError, UnpicklingError("invalid load key"), ...
                    raise _not_a_checkpoint(
                        filename, f"{type(e).__name__}: {_first_line(e)}"
                    ) from e
            if not isinstance(data, dict):
                raise _not_a_checkpoint(
                    filename, f"it holds a {type(data).__name__}, not a dict of weights"
                )
            if "model" in data and "__author__" in data:
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            data = self._torch_load(filename)
            if "model_state" not in data:
                raise ValueError(f"Cannot load .pyth file {filename}: no 'model_state' key.")
            model_state = {
                k: v for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        # .pth and anything else: detectron2's own handling, which calls self._torch_load.
        return super()._load_file(filename)
