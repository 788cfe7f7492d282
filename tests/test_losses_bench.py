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


def test_tiny_run_writes_json_and_only_its_markdown_section(tmp_path):
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nintro\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    out = tmp_path / "r.json"
    args = ["--height", "64", "--width", "96", "--num-classes", "3", "--repeats", "1",
            "--threads", "1", "--memory", "none", "--device", "cpu",
            "--variants", "fvcore", "torchvision", "ours_dropin", "ours_labels_eager",
            "--json", str(out), "--markdown", str(md)]
    loss_bench.main(args)
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["tables"][0]["rows"]}
    assert set(rows) == {"fvcore", "torchvision", "ours_dropin", "ours_labels_eager"}
    assert rows["fvcore"]["speedup_vs_fvcore"] == pytest.approx(1.0)
    # the dense variants computed the same loss value
    assert rows["ours_dropin"]["loss"] == pytest.approx(rows["fvcore"]["loss"], rel=1e-4)
    text = md.read_text()
    assert "keep me" in text and text.count(loss_bench.BEGIN) == 1
    loss_bench.main(args)  # a second run replaces its section, leaves the rest
    text2 = md.read_text()
    assert text2.count(loss_bench.BEGIN) == 1 and "keep me" in text2 and "| fvcore |" in text2


def test_help_runs():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loss_bench.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--repeats" in out.stdout
