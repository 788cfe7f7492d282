"""
Checkpoints that survive a kill and files that stay data.

``SafeDetectionCheckpointer`` is detectron2's :class:`DetectionCheckpointer` with three changes:

* **Atomic saves.** ``save`` writes ``<name>.pth`` to a temporary file in the same folder,
  fsyncs it and ``os.replace``-s it into place; ``last_checkpoint`` is rewritten the same way
  and only after the checkpoint file is complete. A run killed at any instant (SIGKILL, OOM
  killer, pre-emption) leaves either the previous checkpoint or the new one as "last", never a
  truncated file. fvcore's ``Checkpointer.save`` opens the final path for writing directly.
* **No checkpoint of broken weights.** ``save`` refuses (``FloatingPointError``) to write
  weights that contain NaN/Inf, so a run that diverges keeps its last good checkpoint as the one
  ``--resume`` picks up.
* **Loading does not run code from the file.** ``.pth``/``.pyth`` files are read with
  ``torch.load(weights_only=True)`` (fvcore calls ``torch.load`` without it, which falls back to
  full unpickling when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set or on older PyTorch).
  Detectron / detectron2-model-zoo ``.pkl`` files are pickles by nature; they are read with a
  restricted unpickler that only rebuilds numpy arrays, numpy scalars and plain containers, and
  refuses any other global (``os.system``, ...). Pass ``trust_pickle=True`` (or set
  ``FOCAL_TRUST_PICKLE=1``) only for a file from a source you trust whose format needs more:
  it turns on full unpickling for ``.pkl`` and ``.pth`` alike.

``download_verified`` is the hash-checked download for model-zoo files.
"""
import hashlib
import logging
import os
import pickle
import tempfile
import urllib.request

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = [
    "SafeDetectionCheckpointer",
    "UnsafeCheckpointError",
    "atomic_write_bytes",
    "download_verified",
    "restricted_pickle_load",
    "sha256_of_file",
]

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked to rebuild an object that is not plain data."""


def _fsync_dir(path):
    # Make the rename itself durable (POSIX); not available on every OS/filesystem.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, write_fn):
    """
    Write a file so that readers see either its old content or the complete new one.

    Args:
        path (str): final local path.
        write_fn (callable): called with a binary file object to write the content.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Includes KeyboardInterrupt: never leave a half-written temp file behind.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


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


def sha256_of_file(path, chunk_size=1 << 20):
    """Hex SHA-256 of a file, read in chunks (checkpoints are too large to read at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def download_verified(url, dst, sha256, *, timeout=60):
    """
    Download ``url`` to ``dst`` only if its SHA-256 equals ``sha256``.

    The file is streamed into a temporary file next to ``dst``, hashed while downloading, and
    moved into place only when the hash matches; a mismatch raises ``ValueError`` and leaves no
    file. An existing ``dst`` with the right hash is reused; one with a wrong hash is replaced.

    Returns:
        str: ``dst``.
    """
    sha256 = sha256.lower()
    if os.path.isfile(dst) and sha256_of_file(dst) == sha256:
        return dst
    h = hashlib.sha256()

    def write(f):
        with urllib.request.urlopen(url, timeout=timeout) as r:
            for block in iter(lambda: r.read(1 << 20), b""):
                h.update(block)
                f.write(block)
        if h.hexdigest() != sha256:
            raise ValueError(
                f"Download of {url} has sha256 {h.hexdigest()}, expected {sha256}. The file was "
                "not kept: it is corrupt, truncated, or not the file the model zoo lists."
            )

    atomic_write_bytes(dst, write)
    return dst


def _non_finite_tensors(state_dict):
    bad = []
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            bad.append(k)
    return bad


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` with atomic saves, a refusal to save non-finite weights,
    and loading that does not execute code from the file (see the module docstring).
    """

    def __init__(self, model, save_dir="", *, trust_pickle=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        if trust_pickle is None:
            trust_pickle = os.environ.get("FOCAL_TRUST_PICKLE", "0") == "1"
        self.trust_pickle = trust_pickle
        self._refuse_reason = None
        self._cleaned = False

    def _remove_stale_temp_files(self):
        # A run killed inside atomic_write_bytes leaves its ".<name>.<random>.tmp" behind (never
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

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if self._refuse_reason is not None:
            self.logger.warning(f"Not saving checkpoint '{name}': {self._refuse_reason}")
            return
        data = {"model": self.model.state_dict()}
        bad = _non_finite_tensors(data["model"])
        if bad:
            last = self.get_checkpoint_file() if self.has_checkpoint() else "(none)"
            self.refuse_saves(f"the weights became non-finite ({bad[:3]})")
            raise FloatingPointError(
                f"Not saving checkpoint '{name}': {len(bad)} weight tensor(s) contain NaN/Inf "
                f"(first: {bad[:3]}). The training diverged; the last good checkpoint is "
                f"{last}. Lower SOLVER.BASE_LR (linear scaling rule: the paper's 0.01 is for "
                "16 images per batch) or raise SOLVER.WARMUP_ITERS, then --resume."
            )
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        if not self._cleaned:
            self._remove_stale_temp_files()
            self._cleaned = True
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        local = PathManager.get_local_path(save_file)
        atomic_write_bytes(local, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        local = PathManager.get_local_path(os.path.join(self.save_dir, "last_checkpoint"))
        atomic_write_bytes(local, lambda f: f.write(last_filename_basename.encode()))

    # ---- loading ------------------------------------------------------------------------
    def _torch_load(self, f):
        if self.trust_pickle:  # the user vouched for the file: full unpickling
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{f} contains objects other than tensors and plain containers, so it was not "
                "loaded (torch.load(weights_only=True)). If you trust its source: allowlist the "
                "class with torch.serialization.add_safe_globals, or set FOCAL_TRUST_PICKLE=1 "
                f"(SafeDetectionCheckpointer(..., trust_pickle=True)). Original error: {e}"
            ) from e

    def _load_file(self, filename):
        if filename.endswith(".pkl") and self.trust_pickle:
            return super()._load_file(filename)
        if filename.endswith(".pkl"):
            with PathManager.open(filename, "rb") as f:
                data = restricted_pickle_load(f, source=filename)
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
