"""benchmarks/loss_bench.py: the anchor count of the paper's scale, and a tiny end-to-end run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import loss_bench  # noqa: E402


def test_anchor_count_of_two_800x1333_images_is_403200():
    per_image, sizes = loss_bench.num_anchors(800, 1333)
    assert sizes == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]  # 1333 padded to 1344
    assert 2 * per_image == 403_200
    assert loss_bench.num_anchors_detectron2(800, 1333) == per_image


def test_demo_scale_follows_the_demo_config():
    # the model the demo config builds, vs the anchor count of its resized tile from the formula
    from detectron2.config import get_cfg

    from focal_det import add_focal_config

    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(str(loss_bench.DEMO_CONFIG))
    scale = loss_bench.demo_scale()
    side = min(max(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN)  # square 400 px tiles
    per_cell = len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]) * len(
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]
    )
    # level "pN" has stride 2^N (P3-P7 in the paper; the demo uses P2-P6)
    strides = [2 ** int(f[1:]) for f in cfg.MODEL.RETINANET.IN_FEATURES]
    assert (scale["height"], scale["width"]) == (side, side)
    expected = loss_bench.num_anchors(side, side, strides=strides, per_cell=per_cell)[0]
    assert scale["anchors_per_image"] == expected
    assert scale["images"] == cfg.SOLVER.IMS_PER_BATCH
    assert scale["num_classes"] == cfg.MODEL.RETINANET.NUM_CLASSES


def test_tiny_run_writes_json_and_only_its_markdown_section(tmp_path):
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nintro\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    out = tmp_path / "r.json"
    variants = ["fvcore", "torchvision", "ours_dropin_eager", "ours_labels_eager"]
    args = ["--height", "64", "--width", "96", "--num-classes", "3", "--repeats", "1",
            "--demo-repeats", "1", "--threads", "1", "--memory", "none", "--device", "cpu",
            "--variants", *variants, "--json", str(out), "--markdown", str(md)]
    loss_bench.main(args)
    result = json.loads(out.read_text())
    assert [t["scale"] for t in result["tables"]] == ["paper", "demo"]
    for table in result["tables"]:
        rows = {r["variant"]: r for r in table["rows"]}
        assert set(rows) == set(variants)
        assert rows["fvcore"]["speedup_vs_fvcore"] == pytest.approx(1.0)
        # the dense variants computed the same loss value
        assert rows["ours_dropin_eager"]["loss"] == pytest.approx(rows["fvcore"]["loss"], rel=1e-4)
    assert result["tables"][0]["anchors"] == 2 * loss_bench.num_anchors(64, 96)[0]
    demo = result["tables"][1]
    assert demo["anchors"] == demo["images"] * demo["anchors_per_image"]
    assert demo["num_logits"] == demo["anchors"] * demo["num_classes"]
    text = md.read_text()
    assert "keep me" in text and text.count(loss_bench.BEGIN) == 1
    loss_bench.main(args)  # a second run replaces its section, leaves the rest
    text2 = md.read_text()
    assert text2.count(loss_bench.BEGIN) == 1 and "keep me" in text2 and "| fvcore |" in text2


def test_help_runs():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loss_bench.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--repeats" in out.stdout
