"""
Shared pieces of the benchmarks: the three detectors built the same way, synthetic data, the
anchor count of an image, machine description, copy bandwidth, memory probes, the run record
(date, commit, command, machine) and the writer of a section of docs/benchmarks.md.

The three variants compared (all RetinaNet R50-FPN, P3-P7, A = 9, K classes, random weights):

* ``ours``        focal_det's ``FocalRetinaNet`` built from detectron2's Base-RetinaNet config;
* ``d2``          detectron2's own ``RetinaNet`` from the same config and the SAME weights (our
                  model loads detectron2's state dict strictly);
* ``torchvision`` ``torchvision.models.detection.RetinaNet`` assembled exactly as
                  ``retinanet_resnet50_fpn`` does, but with FrozenBN and the stem + res2 frozen
                  like the other two (``retinanet_resnet50_fpn(weights=None)`` would switch to
                  trainable BatchNorm, which is not what anybody trains).

Random weights and frozen BN blow activations up layer after layer (and NaNs slow nothing down
on paper but change how many candidates inference keeps), so each FrozenBN is calibrated once on
a synthetic image: its statistics are set to the per-channel mean and variance of its input,
as a trained network's would roughly be. The classification bias is then set to
``logit(score_thresh) = -2.94`` so that, as with a trained detector on a real image, the score
threshold keeps thousands of candidates and inference does its full work (top-1000 per level,
decode, NMS) instead of returning nothing.
"""
import ctypes
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Every benchmark imports this module before focal_det: the focal_det of this checkout, not the
# one the environment has installed (an editable install may point at another checkout).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DOCS = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def d2_cfg(meta_arch="RetinaNet", depth=50, num_classes=80, min_size=800, max_size=1333):
    """detectron2's Base-RetinaNet config (R50-FPN, FrozenBN, FREEZE_AT=2) + our keys."""
    from detectron2.config import get_cfg

    from focal_det import add_focal_config
    from focal_det.config_check import merge_detectron2_zoo_config

    cfg = get_cfg()
    add_focal_config(cfg)
    # detectron2's own file (its anchor sizes need eval); user configs are read as data only.
    merge_detectron2_zoo_config(cfg, "COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    cfg.MODEL.META_ARCHITECTURE = meta_arch
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.INPUT.MIN_SIZE_TEST = min_size
    cfg.INPUT.MAX_SIZE_TEST = max_size
    return cfg


def _frozen_bn_types():
    from detectron2.layers import FrozenBatchNorm2d as D2FrozenBN
    from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

    return (D2FrozenBN, TVFrozenBN)


@torch.no_grad()
def calibrate_frozen_bn(model, run_forward):
    """Set every FrozenBN's statistics to those of its input during ``run_forward()``."""
    hooks = []

    def pre_hook(mod, inputs):
        x = inputs[0].float()
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-5)
        mod.weight.fill_(1.0)
        mod.bias.fill_(0.0)

    for m in model.modules():
        if isinstance(m, _frozen_bn_types()):
            hooks.append(m.register_forward_pre_hook(pre_hook))
    was_training = model.training
    model.eval()
    try:
        run_forward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def build_variant(name, cfg_opts=(), num_classes=80, device="cpu", test_size=(800, 1333)):
    """
    Build one variant (random init, not calibrated). ``name`` is "d2", "torchvision" or
    "ours"; ``cfg_opts`` are detectron2 config overrides for "ours"/"d2" (e.g.
    ["MODEL.FOCAL.CHANNELS_LAST", "True"]).
    """
    if name == "torchvision":
        return _build_torchvision(num_classes, test_size).to(device)
    from detectron2.modeling import build_model

    import focal_det  # noqa: F401  (registers FocalRetinaNet)

    cfg = d2_cfg(
        "FocalRetinaNet" if name == "ours" else "RetinaNet",
        num_classes=num_classes,
        min_size=test_size[0],
        max_size=test_size[1],
    )
    cfg.merge_from_list(list(cfg_opts))
    cfg.MODEL.DEVICE = device
    return build_model(cfg)


def _build_torchvision(num_classes, test_size):
    from torchvision.models import resnet50
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    # As torchvision.models.detection.retinanet_resnet50_fpn, with FrozenBN + 3 trainable stages.
    backbone = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(
        backbone, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    return RetinaNet(
        backbone,
        num_classes,
        min_size=test_size[0],
        max_size=test_size[1],
        detections_per_img=100,  # detectron2's TEST.DETECTIONS_PER_IMAGE
    )


def prepare_weights(name, path, num_classes=80, seed=0, score_thresh=0.05, calib_size=(512, 683)):
    """Build ``name`` ("d2" or "torchvision"), calibrate it, save its state dict to ``path``."""
    torch.manual_seed(seed)
    model = build_variant(name, num_classes=num_classes)
    img = synthetic_images(1, *calib_size, num_classes=num_classes, seed=seed + 1)[0]
    if name == "torchvision":
        calibrate_frozen_bn(model, lambda: model([img["image"] / 255.0]))
        cls_bias = model.head.classification_head.cls_logits.bias
    else:
        calibrate_frozen_bn(model, lambda: model([img]))
        cls_bias = model.head.cls_score.bias
    with torch.no_grad():
        cls_bias.fill_(math.log(score_thresh / (1 - score_thresh)))
    torch.save(model.state_dict(), path)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def num_anchors(height, width, strides=(8, 16, 32, 64, 128), per_cell=9, divisibility=32):
    """
    Anchors of P3-P7 for an HxW image, as detectron2's RetinaNet generates them: the image is
    padded to a multiple of ``divisibility``; P3-P5 are the padded size / stride; P6, P7 come
    from 3x3 stride-2 convs with padding 1 (out = (in - 1) // 2 + 1).
    Returns (anchors per image, [(h, w) of each level]).
    """
    h = math.ceil(height / divisibility) * divisibility
    w = math.ceil(width / divisibility) * divisibility
    sizes = []
    for s in strides:
        if s <= divisibility:
            sizes.append((h // s, w // s))
        else:
            ph, pw = sizes[-1]
            sizes.append(((ph - 1) // 2 + 1, (pw - 1) // 2 + 1))
    return sum(a * b for a, b in sizes) * per_cell, sizes


def synthetic_images(n, height, width, num_boxes=5, num_classes=80, seed=0):
    """
    ``n`` detectron2-style inputs: {"image": (3, H, W) float 0..255, "instances": Instances}
    with ``num_boxes`` random ground-truth boxes of 32..(min(H, W)/2) px each.
    """
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.rand(3, height, width, generator=g) * 255
        wh = 32 + torch.rand(num_boxes, 2, generator=g) * (min(height, width) / 2 - 32)
        xy = torch.rand(num_boxes, 2, generator=g) * (
            torch.tensor([width, height]) - wh
        )
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
        out.append({"image": img, "instances": inst, "height": height, "width": width})
    return out


def to_torchvision(batch):
    """detectron2-style inputs -> (images 0..1 RGB, targets) for torchvision's RetinaNet."""
    images = [b["image"].flip(0) / 255.0 for b in batch]  # BGR 0..255 -> RGB 0..1
    targets = [
        {"boxes": b["instances"].gt_boxes.tensor, "labels": b["instances"].gt_classes}
        for b in batch
    ]
    return images, targets


# ---------------------------------------------------------------------------------------------
# machine and memory
# ---------------------------------------------------------------------------------------------
def machine_description():
    cpu = platform.processor() or "cpu"
    try:
        txt = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.*)", txt)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import detectron2
    import torchvision

    desc = {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(0)
    return desc


def sync(device):
    """Wait for the device's queued work (a no-op on CPU) so that a timer brackets all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes=256 << 20, repeats=5):
    """Bytes read + written per second by a large tensor copy (best of ``repeats``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times)


def rss_mb():
    """Current resident set size (MiB) from /proc/self/status."""
    return _status_field("VmRSS")


def peak_rss_mb():
    """Peak resident set size (MiB) since start or the last :func:`reset_peak_rss`."""
    hwm = _status_field("VmHWM")
    if hwm is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return hwm


def reset_peak_rss():
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory():
    """Hand freed heap pages back to the OS so that an RSS baseline is not inflated."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_field(key):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def git_commit():
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line():
    return shlex.join([Path(sys.executable).name] + sys.argv)


def run_record(under_lock=True):
    """
    The provenance every benchmark result starts with: date, commit, the command (prefixed with
    the ``flock`` wrapper for timing runs that must hold the benchmark lock) and the machine.
    """
    command = command_line()
    if under_lock:
        command = "flock /tmp/focal_bench.lock " + command
    return {
        "date": now_utc(),
        "commit": git_commit(),
        "command": command,
        "machine": machine_description(),
    }


def measured_header(result):
    """Markdown lines naming when, at which commit and with which command ``result`` was made."""
    return [
        f"Measured {result['date']} at commit `{result['commit']}` with",
        "",
        "```",
        result["command"],
        "```",
        "",
    ]


# ---------------------------------------------------------------------------------------------
# docs/benchmarks.md
# ---------------------------------------------------------------------------------------------
def write_doc_section(marker, markdown, path=DOCS):
    """
    Replace the text between ``<!-- BEGIN marker -->`` and ``<!-- END marker -->`` of ``path``
    (creating the file or appending the section when missing); other sections are untouched.
    """
    begin, end = f"<!-- BEGIN {marker} -->", f"<!-- END {marker} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def publish(result, markdown, json_path, doc_path, marker):
    """Print ``markdown``, write ``result`` to ``json_path`` and the doc section ``marker`` of
    ``doc_path`` (either skipped when '')."""
    print("\n" + markdown)
    if json_path:
        write_json(result, json_path)
    if doc_path:
        write_doc_section(marker, markdown, doc_path)
