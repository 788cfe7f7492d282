"""benchmarks/export_bench.py: the backends side by side, on a tiny model (no ONNX export here:
tests/test_export.py covers onnxruntime; this checks the benchmark's own work)."""
import json

from repo_scripts import QUICK, load_script

eb = load_script("benchmarks/export_bench.py", "export_bench")


def test_backends_are_timed_on_the_same_weights_and_written_down(tmp_path):
    md = tmp_path / "bench.md"
    md.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    argv = ["--models", "demo", "--demo-config", QUICK, "--variants", "pytorch", "torchscript",
            "--threads", "1", "--warmup", "0", "--iters", "1", "--rounds", "2",
            "--json", str(tmp_path / "r.json"), "--doc", str(md)]  # fmt: skip
    result = eb.main(argv)
    res = result["models"]["demo"]
    assert res["image_size"] == [160, 160]  # the config's test size
    assert list(res["variants"]) == ["d2_eager", "pytorch", "torchscript"]
    for v in res["variants"].values():
        # same weights: every backend gives detectron2's detections (the bias makes them many)
        assert v["same_as_d2_eager"] and v["detections"] == 100
        assert len(v["times_s"]) == 2 and v["ms_per_image"] > 0
    assert res["variants"]["d2_eager"]["ratio_vs_d2_eager"] == 1.0
    assert set(res["export_s"]) == {"torchscript"}
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["models"]["demo"]["variants"]["pytorch"]["detections"] == 100
    doc = md.read_text()
    assert "keep me" in doc and "<!-- BEGIN export_bench -->" in doc
    assert "python benchmarks/export_bench.py --models demo" in doc
    ms = res["variants"]["torchscript"]["ms_per_image"]
    assert f"| `torchscript` | {ms:.1f} |" in doc
