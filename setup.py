#!/usr/bin/env python
"""focal_det: Focal Loss for Dense Object Detection (RetinaNet) as a detectron2 plugin."""
import os
import re

from setuptools import find_packages, setup


def get_version():
    path = os.path.join(os.path.dirname(__file__), "focal_det", "__init__.py")
    with open(path) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="focal_det",
    version=get_version(),
    description="Focal Loss for Dense Object Detection (RetinaNet): every loss of the paper, "
    "its configs and tools, as a detectron2 plugin",
    packages=find_packages(exclude=("tests", "tests.*", "configs", "tools", "benchmarks"))
    + ["focal_det.model_zoo.configs"],
    # The repository's configs/ (the one source) ships as focal_det/model_zoo/configs, as
    # detectron2's model_zoo/configs: model_zoo.get_config_file and the demo job then work from
    # a wheel or a non-editable install too. Mapped, not copied: nothing to keep in sync.
    package_dir={"focal_det.model_zoo.configs": "configs"},
    package_data={"focal_det.model_zoo.configs": ["*.yaml", "**/*.yaml"]},
    python_requires=">=3.9",
    # detectron2 is deliberately not listed: it is not on PyPI under its own name. Install it
    # from source (its INSTALL.md) or let scripts/setup_env.sh install the registry wheel.
    install_requires=[
        "torch>=1.13",
        "torchvision",
        "fvcore",
        "iopath",
        "pycocotools",
        "numpy",
        "matplotlib",
        "tabulate",
        "tqdm",
        "PyYAML",
    ],
    extras_require={
        "test": ["pytest", "ruff"],
        "fast-eval": ["faster-coco-eval"],
    },
    include_package_data=True,
)
