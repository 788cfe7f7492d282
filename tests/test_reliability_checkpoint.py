"""
Reliability of checkpoints (issue 8, items 3-5): atomic saves, no checkpoint of diverged
weights, and loading that does not execute code from the file.
"""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from focal_det.checkpoint.safe_checkpointer import SafeDetectionCheckpointer, UnsafeCheckpointError


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


# ---- issue 15 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_honour_the_umask_like_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        ckpt = SafeDetectionCheckpointer(_model(), str(tmp_path))
        ckpt.save("model_0000")
        reference = tmp_path / "written_with_open"
        with open(reference, "w"):
            pass
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (reference.stat().st_mode & 0o777) == expected  # what open() gives
    for name in ("model_0000.pth", "last_checkpoint"):
        assert ((tmp_path / name).stat().st_mode & 0o777) == expected, name


def _not_checkpoints(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": _model().state_dict()}, good)
    raw = good.read_bytes()
    files = {
        "empty.pth": b"",
        "truncated.pth": raw[: len(raw) // 2],
        "garbage.pth": b"<html>404 Not Found</html>" * 20,
        "lfs.pth": b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 93\n",
        "empty.pkl": b"",
        "truncated.pkl": pickle.dumps({"blobs": {"w": np.zeros(50)}}, protocol=2)[:40],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    return sorted(files) + ["list.pth"]


def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path):
    from focal_det.checkpoint.safe_checkpointer import CheckpointFormatError

    for name in _not_checkpoints(tmp_path):
        path = str(tmp_path / name)
        with pytest.raises(CheckpointFormatError) as e:
            SafeDetectionCheckpointer(_model(), str(tmp_path / "out")).load(path)
        msg = str(e.value)
        assert path in msg, msg
        assert "FOCAL_TRUST_PICKLE" not in msg  # broken, not unsafe: do not steer to trust
        if name.startswith("lfs"):
            assert "Git LFS pointer" in msg and "git lfs pull" in msg
        else:
            assert "is not a usable checkpoint" in msg and "truncated" in msg
    assert "it is empty (0 bytes)" in str(
        pytest.raises(CheckpointFormatError, SafeDetectionCheckpointer(_model()).load,
                      str(tmp_path / "empty.pth")).value
    )  # fmt: skip
    assert "it holds a list, not a dict of weights" in str(
        pytest.raises(CheckpointFormatError, SafeDetectionCheckpointer(_model()).load,
                      str(tmp_path / "list.pth")).value
    )  # fmt: skip


def test_huge_weights_are_written_but_not_marked_last(tmp_path, caplog):
    model = _model()
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path), max_abs_weight=1e4)
    ckpt.save("model_0000")
    with torch.no_grad():
        model[2].weight[0, 0] = 2.5e13  # seen in a diverging run, one step before NaN
    with caplog.at_level("WARNING"):
        ckpt.save("model_0001")
    assert _files(tmp_path) == ["last_checkpoint", "model_0000.pth", "model_0001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000.pth"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "model_0001.pth is not marked as the last good one" in msg and "2.weight 2.5e+13" in msg
    with torch.no_grad():
        model[2].weight[0, 0] = 0.5  # BatchNorm running stats of 1e3 are healthy: params only
        model[1].running_var.fill_(5e4)
    ckpt.save("model_0002")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0002.pth"


def test_checkpoint_is_marked_last_only_after_a_healthy_next_loss(tmp_path, caplog):
    ckpt = SafeDetectionCheckpointer(_model(), str(tmp_path), confirm_with_next_loss=True)
    for it, loss in enumerate([1.2, 1.1, 1.0]):
        ckpt.judge_pending(loss, it)
    ckpt.save("model_0002")
    assert not ckpt.has_checkpoint()  # waiting for the loss computed on its weights
    ckpt.judge_pending(0.9, 3)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0002.pth"
    ckpt.save("model_0003")
    with caplog.at_level("WARNING"):
        ckpt.judge_pending(185000.0, 4)  # the weights saved at iteration 3 give an exploded loss
    assert (tmp_path / "last_checkpoint").read_text() == "model_0002.pth"
    assert "model_0003.pth is not marked as the last good one" in caplog.text
    ckpt.save("model_0004")
    ckpt.judge_pending(float("inf"), 5)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0002.pth"
    ckpt.save("model_final")
    ckpt.confirm_pending()  # training ended normally: the final weights are the result
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


def test_weights_problem_names_missing_head_and_backbone_tensors():
    from detectron2.modeling import build_model
    from fvcore.common.checkpoint import _IncompatibleKeys as Inc
    from synthetic_detection import tiny_cfg

    from focal_det.checkpoint import weights_problem

    model = build_model(tiny_cfg())
    keys = list(model.state_dict())
    head = [k for k in keys if k.startswith("head.")]
    assert weights_problem(model, Inc([], [], [])) is None
    msg = weights_problem(model, Inc(head, [], []))  # a Faster R-CNN: same backbone, no head
    assert f"{len(head)} of {len(head)} 'head' tensors (head.cls_subnet.0.weight" in msg
    msg = weights_problem(model, Inc(keys, [], []))  # an empty dict
    assert f"{len(keys)} of the model's {len(keys)}" in msg and "'backbone' tensors" in msg
    shaped = [("head.cls_score.weight", (720, 32, 3, 3), (27, 32, 3, 3))]  # other NUM_CLASSES
    assert "head.cls_score.weight" in weights_problem(model, Inc([], [], shaped))
