"""
``FocalCheckpointer``: the checkpointer of focal_det's Trainer, model zoo and tools.

It is :class:`SafeDetectionCheckpointer` (atomic saves, no code run from files) that also:
  * loads the paper's Detectron RetinaNet ``.pkl`` files, renaming their blobs with
    :mod:`focal_det.checkpoint.detectron_names` (detectron2's C2 heuristics do not know the
    RetinaNet head);
  * loads detectron2 model-zoo RetinaNet checkpoints unchanged (same parameter names);
  * turns a failed download into a message that says what to download and where to put it;
  * verifies a SHA-256 given as ``...?sha256=<hex>`` on the weights URL/path, or known to the
    model zoo for that URL.
"""
import logging
import os
from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np
import torch
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import get_cache_dir

from ..utils.files import sha256_of_file
from .detectron_names import detectron_to_focal_names, is_detectron_retinanet
from .safe_checkpointer import SafeDetectionCheckpointer

__all__ = ["FocalCheckpointer", "WeightsUnavailableError", "expected_cache_path", "KNOWN_SHA256"]

logger = logging.getLogger(__name__)

# SHA-256 of model-zoo files, by URL, where someone has hashed the real file. Empty: no file was
# downloadable where this project was written (no internet), and a hash is never invented.
# Add "url": "hex" after hashing a download; pinned hashes are then checked on every load.
KNOWN_SHA256 = {}

_REMOTE_PREFIXES = ("http://", "https://", "detectron2://")


class WeightsUnavailableError(RuntimeError):
    """The weights file could not be fetched (offline, or the URL is wrong)."""


def _to_https(url):
    if url.startswith("detectron2://"):
        return "https://dl.fbaipublicfiles.com/detectron2/" + url[len("detectron2://") :]
    return url


def expected_cache_path(url):
    """
    Where detectron2/iopath caches ``url`` (and so where to put a file downloaded elsewhere):
    ``$FVCORE_CACHE`` (default ``~/.torch/iopath_cache``) / the URL's path.
    """
    parsed = urlparse(_to_https(url))
    return os.path.join(
        get_cache_dir(), os.path.dirname(parsed.path.lstrip("/")), parsed.path.split("/")[-1]
    )


def _split_sha256(path):
    """``path?sha256=..`` -> (path without that query item, expected hex or None)."""
    parsed = urlparse(path)
    queries = parse_qs(parsed.query)
    expected = queries.pop("sha256", [None])[0]
    rest = parsed._replace(query=urlencode(queries, doseq=True)).geturl()
    return rest, expected


class FocalCheckpointer(SafeDetectionCheckpointer):
    def load(self, path, *args, **kwargs):
        if not path:
            return super().load(path, *args, **kwargs)
        path, expected = _split_sha256(path)
        base = urlparse(path)._replace(query="").geturl()
        expected = expected or KNOWN_SHA256.get(_to_https(base))
        if base.startswith(_REMOTE_PREFIXES):
            try:
                local = PathManager.get_local_path(base)
            except Exception as e:
                raise WeightsUnavailableError(
                    f"Could not download the weights {base} ({type(e).__name__}: {e}). "
                    f"Without internet access: download {_to_https(base)} on another machine "
                    f"and put it at {expected_cache_path(base)} (detectron2's download cache; "
                    "set FVCORE_CACHE to move it), or set MODEL.WEIGHTS to the local file."
                ) from e
        else:
            local = PathManager.get_local_path(base)
        if expected:
            got = sha256_of_file(local)
            if got != expected.lower():
                raise ValueError(
                    f"{local} (weights {base}) has sha256 {got}, expected {expected}: the file "
                    "is corrupt, truncated or not the published model. Delete it and download it "
                    "again."
                )
            logger.info(f"sha256 of {local} verified.")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        blobs = loaded.get("model", {})
        if loaded.get("__author__") == "Caffe2" and is_detectron_retinanet(blobs):
            state, unused = detectron_to_focal_names(blobs)
            if unused:
                logger.warning(
                    f"{len(unused)} blobs of the Detectron RetinaNet file {filename} are not "
                    f"model parameters and were skipped: {unused[:10]}"
                    + (" ..." if len(unused) > 10 else "")
                )
            state = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
            logger.info(f"Converted {len(state)} Detectron RetinaNet blobs of {filename}.")
            return {
                "model": state,
                "__author__": "Detectron RetinaNet (converted by focal_det)",
                "matching_heuristics": False,
            }
        return loaded
