"""
Environment report, like detectron2's ``collect_env``: ``python -m focal_det.env``.
"""
import importlib
import importlib.metadata as metadata
import os
import platform
import sys

from tabulate import tabulate


def _version(module_name, dist_names=()):
    try:
        mod = importlib.import_module(module_name)
    except Exception as e:  # report, don't crash: this is a diagnostic tool
        return f"not importable ({type(e).__name__}: {e})"
    version = getattr(mod, "__version__", None)
    for dist in dist_names:
        try:
            version = f"{version or metadata.version(dist)} (dist {dist}=={metadata.version(dist)})"
            break
        except metadata.PackageNotFoundError:
            continue
    location = os.path.dirname(getattr(mod, "__file__", "") or "")
    return f"{version} @ {location}" if location else str(version)


def _detectron2_source():
    try:
        metadata.version("sal-detectron2")
        return "registry wheel sal-detectron2 (installed by scripts/setup_env.sh)"
    except metadata.PackageNotFoundError:
        pass
    try:
        return f"distribution detectron2=={metadata.version('detectron2')} (source build or wheel)"
    except metadata.PackageNotFoundError:
        return "unknown (importable from the path, no distribution metadata)"


def _detectron2_compiled_ops():
    try:
        from detectron2 import _C  # noqa: F401

        return "available"
    except Exception as e:
        return f"not available ({type(e).__name__}); RetinaNet does not need them"


def collect_env_info():
    import torch

    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("machine", platform.machine()),
        ("focal_det", _version("focal_det")),
        ("torch", _version("torch")),
        ("torchvision", _version("torchvision")),
        ("detectron2", _version("detectron2")),
        ("detectron2 source", _detectron2_source()),
        ("detectron2._C", _detectron2_compiled_ops()),
        ("fvcore", _version("fvcore")),
        ("iopath", _version("iopath")),
        ("pycocotools", _version("pycocotools", ("pycocotools",))),
        ("faster_coco_eval", _version("faster_coco_eval")),
        ("OpenCV (cv2)", _version("cv2")),
        ("onnx", _version("onnx")),
        ("onnxscript", _version("onnxscript")),
        ("onnxruntime", _version("onnxruntime")),
        ("CUDA available", torch.cuda.is_available()),
        ("CPU threads (torch)", torch.get_num_threads()),
    ]
    if torch.cuda.is_available():
        rows.append(("CUDA (torch built with)", torch.version.cuda))
        for i in range(torch.cuda.device_count()):
            rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
    datasets = os.environ.get("DETECTRON2_DATASETS", "(unset: ./datasets)")
    rows.append(("DETECTRON2_DATASETS", datasets))
    return tabulate(rows)


def main():
    print(collect_env_info())


if __name__ == "__main__":
    main()
