"""
Reliability of checkpoints (issue 8, items 3-5): atomic saves, no checkpoint of diverged
weights, and loading that does not execute code from the file.
"""
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from focal_det.engine.safe_checkpoint import (
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
    download_verified,
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))


def _files(folder):
    return sorted(os.listdir(folder))


def test_save_is_atomic_and_loads_back(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path), optimizer=opt)
    ckpt.save("model_0000", iteration=0)
    assert _files(tmp_path) == ["last_checkpoint", "model_0000.pth"]  # no temp file left
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000.pth"

    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    extra = SafeDetectionCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 0
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_interrupted_save_keeps_previous_last_checkpoint(tmp_path, monkeypatch):
    model = _model()
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000")

    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 truncated")  # what a killed torch.save leaves behind
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0001")
    monkeypatch.setattr(torch, "save", real_save)
    # No file under the final name, no temp litter, "last" still the complete previous one.
    assert _files(tmp_path) == ["last_checkpoint", "model_0000.pth"]
    assert ckpt.get_checkpoint_file().endswith("model_0000.pth")
    SafeDetectionCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)


def test_non_finite_weights_are_not_saved(tmp_path):
    model = _model()
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000")
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError) as e:
        ckpt.save("model_0001")
    msg = str(e.value)
    assert "0.weight" in msg and "model_0000.pth" in msg and "BASE_LR" in msg
    assert _files(tmp_path) == ["last_checkpoint", "model_0000.pth"]


class _Payload:
    """Unpickling this creates a folder: stands for any code a malicious file could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pth_with_code_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, bad)
    ckpt = SafeDetectionCheckpointer(_model(), str(tmp_path / "out"))
    with pytest.raises(UnsafeCheckpointError, match="bad.pth.*FOCAL_TRUST_PICKLE=1"):
        ckpt.load(str(bad))
    assert not os.path.exists(marker)
    # Only an explicit opt-in unpickles it (and runs its code: that is what trust means).
    trusting = SafeDetectionCheckpointer(_model(), str(tmp_path / "out"), trust_pickle=True)
    trusting._torch_load(str(bad))
    assert os.path.exists(marker)


def test_pkl_with_code_is_refused_and_plain_pkl_loads(tmp_path):
    marker = str(tmp_path / "pwned")
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"blobs": {"w": np.zeros(2)}, "x": _Payload(marker)}, f, protocol=2)
    ckpt = SafeDetectionCheckpointer(_model(), str(tmp_path / "out"))
    with pytest.raises(UnsafeCheckpointError, match="posix.mkdir|os.mkdir"):
        ckpt._load_file(str(bad))
    assert not os.path.exists(marker)

    # A Detectron (Caffe2) style file: numpy blobs, written with protocol 2 as Python 2 did.
    good = tmp_path / "good.pkl"
    blobs = {"conv1_w": np.arange(6, dtype=np.float32).reshape(2, 3), "conv1_w_momentum": 0}
    with open(good, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    out = ckpt._load_file(str(good))
    assert out["__author__"] == "Caffe2" and list(out["model"]) == ["conv1_w"]
    np.testing.assert_array_equal(out["model"]["conv1_w"], blobs["conv1_w"])


def test_download_verified(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"weights" * 100)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dst = tmp_path / "cache" / "weights.bin"
    assert download_verified(src.as_uri(), str(dst), digest) == str(dst)
    assert dst.read_bytes() == src.read_bytes()

    dst2 = tmp_path / "cache" / "other.bin"
    with pytest.raises(ValueError, match="expected 0{64}"):
        download_verified(src.as_uri(), str(dst2), "0" * 64)
    assert _files(tmp_path / "cache") == ["weights.bin"]
