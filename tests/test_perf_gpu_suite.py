"""
benchmarks/gpu_suite.sh --smoke: the GPU suite's CPU fallback runs end to end at tiny sizes
(every step of the real suite: loss kernel vs bandwidth bound, training iteration, inference),
writes its JSON results, and leaves docs/benchmarks.md alone. No timing is asserted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_runs_on_cpu(tmp_path):
    doc = REPO / "docs" / "benchmarks.md"
    doc_before = doc.read_text() if doc.exists() else None
    env = dict(os.environ, OUT_DIR=str(tmp_path), PY=sys.executable, OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--smoke"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    loss = json.loads((tmp_path / "gpu_loss_kernel.json").read_text())
    by_variant = {r["variant"]: r for r in loss["rows"]}
    assert set(by_variant) == {"ours", "fvcore", "torchvision"}
    # All three compute the same focal loss of the same inputs.
    ref = by_variant["fvcore"]["loss"]
    for r in by_variant.values():
        assert abs(r["loss"] - ref) <= 1e-4 * abs(ref), (r["variant"], r["loss"], ref)
        assert r["s"] > 0 and r["bound_s"] > 0

    model = json.loads((tmp_path / "gpu_model_b1_fp32.json").read_text())
    assert set(model["summary"]) == {"ours_fast", "d2"}
    for name, s in model["summary"].items():
        assert s["train_s_per_iter"] > 0, name
        assert s["infer_64_s_per_img"] > 0, name
        assert "train_s_per_iter" in s["ratios_vs_d2"]
    # The calibrated random weights train without overflow (the losses are real numbers).
    for r in model["runs"]:
        if r["phase"] == "train":
            assert all(v == v and abs(v) < 1e6 for v in r["losses"]), r["losses"]
    assert (doc.read_text() if doc.exists() else None) == doc_before
