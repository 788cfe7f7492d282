"""
A non-editable install ships the configs (issue 15, BAD 2): a wheel built from this tree,
installed into a fresh folder and imported from another working directory, lists every config
of the repository's configs/, resolves model-zoo names and the demo job's config (with its
_BASE_ chain) inside the installed package. The installed folder reuses the environment's
torch / detectron2 (--no-deps), so nothing is downloaded. ~10 s.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
from repo_scripts import REPO  # noqa: I001  (tests/ helper)

_PROBE = """
import json, os, sys
import focal_det
from focal_det import model_zoo
from focal_det.config_check import merge_config_file
from focal_det.demo.job import DEFAULT_CONFIG
from detectron2.config import get_cfg
cfg = get_cfg(); focal_det.add_focal_config(cfg); merge_config_file(cfg, DEFAULT_CONFIG)
print(json.dumps({
    "package": focal_det.__file__,
    "configs": model_zoo.list_configs(),
    "quick": model_zoo.get_config_file("quick/retinanet_tiny_quick.yaml"),
    "quick_meta_arch": model_zoo.get_config("quick/retinanet_tiny_quick.yaml")
        .MODEL.META_ARCHITECTURE,
    "demo_config": DEFAULT_CONFIG,
    "demo_backbone": cfg.MODEL.BACKBONE.NAME,
}))
"""


def _repo_configs():
    root = os.path.join(REPO, "configs")
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root) for f in files if f.endswith(".yaml")
    )  # fmt: skip


@pytest.mark.slow
def test_wheel_install_ships_the_configs(tmp_path):
    src = tmp_path / "src"  # pip builds in the source folder: build from a copy, not the repo
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ("focal_det", "configs"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    wheels = list((tmp_path / "dist").glob("focal_det-*.whl"))
    assert len(wheels) == 1
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target),
                          str(wheels[0])], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=str(elsewhere), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = str(target / "focal_det")
    assert got["package"].startswith(installed)  # not this checkout, not the editable install
    assert got["configs"] == _repo_configs() and len(got["configs"]) > 50
    assert got["quick"] == os.path.join(installed, "model_zoo", "configs", "quick",
                                        "retinanet_tiny_quick.yaml")  # fmt: skip
    assert got["quick_meta_arch"] == "FocalRetinaNet"
    assert got["demo_config"].startswith(installed) and os.path.isfile(got["demo_config"])
    assert got["demo_backbone"] == "build_mobilenet_v2_fpn_backbone"  # from its _BASE_
