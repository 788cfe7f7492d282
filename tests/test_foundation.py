from detectron2.config import get_cfg

import focal_det
from focal_det.env import collect_env_info


def test_add_focal_config_adds_keys_and_is_idempotent():
    cfg = get_cfg()
    focal_det.add_focal_config(cfg)
    assert cfg.MODEL.FOCAL.LOSS.NAME == "FocalLoss"
    assert cfg.MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM == 0.0
    cfg.MODEL.FOCAL.LOSS.NAME = "OHEM"
    focal_det.add_focal_config(cfg)  # second call must not reset user values
    assert cfg.MODEL.FOCAL.LOSS.NAME == "OHEM"


def test_env_report_names_the_stack():
    report = collect_env_info()
    for name in ("torch", "torchvision", "detectron2", "fvcore", "pycocotools", "CUDA available"):
        assert name in report
    assert "not importable" not in report.split("faster_coco_eval")[0]


def test_setup_refuses_wheel_with_wrong_hash(tmp_path):
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "check_sha256.sh"
    wheel = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    wheel.write_bytes(b"not the real wheel")
    good = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
    proc = subprocess.run(["bash", str(script), str(wheel), good], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "sha256 mismatch" in proc.stderr and good in proc.stderr
    assert not wheel.exists(), "a wheel with the wrong hash must not be left for the installer"
    # and the same script accepts a file whose hash matches
    wheel.write_bytes(b"x")
    import hashlib

    ok = subprocess.run(
        ["bash", str(script), str(wheel), hashlib.sha256(b"x").hexdigest()], capture_output=True
    )
    assert ok.returncode == 0 and wheel.exists()
