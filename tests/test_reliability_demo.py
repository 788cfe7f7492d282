"""
Reliability of demo.py (issue 15): the config.yaml next to a checkpoint is data, never code;
config typos get train_net.py's suggestions; one unreadable image does not cost the others'
detections; 16-bit grayscale images are scaled to 8 bits, not binarised; a file as --output,
or weights of another model, get a clear error. A tiny random model is enough for all of it.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from PIL import Image
from repo_scripts import REPO  # noqa: I001  (tests/ helper)
from synthetic_detection import tiny_cfg

sys.path.insert(0, REPO)
import demo  # noqa: E402  (the top-level inference command)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """model.pth + config.yaml as training leaves them, for a tiny random FocalRetinaNet."""
    folder = tmp_path_factory.mktemp("model")
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = ()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 80
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, folder / "model.pth")
    (folder / "config.yaml").write_text(cfg.dump())
    return folder


def _main(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        demo.main(list(argv))
    return e.value.code, capsys.readouterr().err


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_config_yaml_next_to_the_checkpoint_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    shared = tmp_path / "shared_model"
    shared.mkdir()
    (shared / "model.pth").write_bytes(b"any")  # the config is read first
    (shared / "config.yaml").write_text(
        f"MODEL:\n  META_ARCHITECTURE: FocalRetinaNet\n"
        f"EXTRA: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    image = _png(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    code, err = _main(capsys, "--weights", str(shared / "model.pth"), "--input", image,
                      "--output", str(tmp_path / "out"))  # fmt: skip
    assert code == 2
    assert str(shared / "config.yaml") in err and "builds Python objects" in err
    assert not marker.exists()
    # The payload is live: detectron2's own loader (allow_unsafe, its default) runs it.
    CfgNode.load_yaml_with_base(str(shared / "config.yaml"), allow_unsafe=True)
    assert marker.exists()


def test_config_typos_get_suggestions(model_dir, tmp_path, capsys):
    image = _png(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    code, err = _main(capsys, "--weights", str(model_dir / "model.pth"), "--input", image,
                      "--output", str(tmp_path / "out"), "MODEL.RETINANET.SCORE_THRESH_TES",
                      "0.2")  # fmt: skip
    assert code == 2 and "Did you mean 'MODEL.RETINANET.SCORE_THRESH_TEST'" in err
    code, err = _main(capsys, "--weights", str(model_dir / "model.pth"), "--input", image,
                      "--output", str(tmp_path / "out"), "model.retinanet.score_thresh_test",
                      "0.2")  # fmt: skip
    assert code == 2 and "(config keys are upper case)" in err


def test_output_naming_a_file_is_a_clear_error(model_dir, tmp_path, capsys):
    image = _png(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    not_a_dir = tmp_path / "detections.json"
    not_a_dir.write_text("{}")
    code, err = _main(capsys, "--weights", str(model_dir / "model.pth"), "--input", image,
                      "--output", str(not_a_dir))  # fmt: skip
    assert code == 2 and f"--output {not_a_dir} is a file: give a folder" in err


def test_weights_of_another_model_are_refused(model_dir, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text((model_dir / "config.yaml").read_text())
    torch.save({"model": {}}, tmp_path / "empty.pth")
    image = _png(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    code, err = _main(capsys, "--weights", str(tmp_path / "empty.pth"), "--input", image,
                      "--output", str(tmp_path / "out"))  # fmt: skip
    assert code == 2 and "does not hold this model" in err and "'head' tensors" in err


def test_unreadable_image_is_skipped_and_16bit_is_scaled(model_dir, tmp_path, caplog):
    rng = np.random.RandomState(0)
    gray16 = rng.randint(0, 65536, size=(48, 64)).astype(np.uint16)
    inputs = tmp_path / "in"
    inputs.mkdir()
    _png(inputs / "a_gray16.png", gray16)
    (inputs / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    # The reference for the 16-bit image: its top byte, written as an ordinary 8-bit PNG.
    _png(inputs / "c_gray8.png", (gray16 >> 8).astype(np.uint8))
    with caplog.at_level("WARNING", logger="focal_det.demo"):
        result = demo.run(model_dir / "model.pth", [str(inputs)], tmp_path / "out", threshold=0)
    assert [os.path.basename(r["file"]) for r in result["images"]] == ["a_gray16.png",
                                                                       "c_gray8.png"]
    assert [os.path.basename(s["file"]) for s in result["skipped"]] == ["b_corrupt.png"]
    assert "Skipping" in caplog.text and "b_corrupt.png" in caplog.text
    saved = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(saved["images"]) == 2 and len(saved["skipped"]) == 1
    a, c = result["images"]
    assert a["detections"] and a["detections"] == c["detections"]  # scaled, not binarised
    # Exit status 0 when some images were readable, 1 when none was.
    good = ["--weights", str(model_dir / "model.pth"), "--output", str(tmp_path / "o2")]
    assert demo.main(good + ["--input", str(inputs / "c_gray8.png")]) == 0
    assert demo.main(good + ["--input", str(inputs / "b_corrupt.png")]) == 1
