"""
Export (issue 17): a tiny FocalRetinaNet exported once per format (TorchScript by tracing, ONNX
by torch.export + onnxruntime on CPU) at one sample size gives the eager model's detections at
other sizes (non-multiples of 32, non-square, levels with fewer than TOPK_CANDIDATES_TEST
logits), and detectron2's own RetinaNet with the same weights agrees. Also: tools/export_model.py
end to end, and the ONNX graph's dynamic axes and NMS op.
"""
import numpy as np
import onnx
import pytest
import torch
from detection_asserts import assert_same_detection_lists  # noqa: I001  (tests/ helper)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import RetinaNet, build_model
from repo_scripts import load_script  # noqa: I001  (tests/ helper)
from synthetic_detection import random_detector
from synthetic_detection import tiny_cfg as _tiny_cfg

from focal_det.export import EagerRunner, ExportableRetinaNet, export_retinanet, load_runner

SAMPLE_SIZE = (128, 160)
# None of them is the sample's; all but (160, 256) are non-multiples of 32; (67, 67) has levels
# of 243, 108 and 27 logits (< 1000: k follows the shape), (224, 96) is taller than wide.
SIZES = [(97, 131), (224, 96), (67, 67), (160, 256)]
BACKEND = {"torchscript": "torchscript", "onnx": "onnxruntime"}


def tiny_cfg(meta_arch="FocalRetinaNet"):
    """3 classes, 16-channel FPN, anchors from 16 px; unit-scale inputs for random weights."""
    cfg = _tiny_cfg(meta_arch, fpn_channels=16, smallest_anchor=16,
                    pixel_std=[57.375, 57.120, 58.395])  # fmt: skip
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 160, 224
    return cfg


def build_tiny(meta_arch="FocalRetinaNet", seed=0):
    """Random weights, perturbed head: ~800-1000 detections over 0.05 per image before the
    TEST.DETECTIONS_PER_IMAGE limit."""
    return random_detector(tiny_cfg(meta_arch), seed=seed)


def image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, *size, generator=g) * 255).round()


def assert_same(got, ref):
    assert_same_detection_lists(got, ref, min_count=20)


@pytest.fixture(scope="module")
def model():
    return build_tiny()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """{format: path}, both exported from the same model at SAMPLE_SIZE."""
    out = tmp_path_factory.mktemp("export")
    return {
        fmt: export_retinanet(model, image(SAMPLE_SIZE, 0), fmt, str(out / fmt))
        for fmt in BACKEND
    }


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(BACKEND))
def test_exported_graph_gives_eager_detections_at_other_sizes(model, exported, fmt):
    runner = load_runner(BACKEND[fmt], exported[fmt])
    eager = EagerRunner(model)
    for i, size in enumerate(SIZES + [SAMPLE_SIZE]):
        x = image(size, seed=10 + i)
        got, ref = runner(x), eager(x)
        assert_same(got, ref)
        assert len(got[1]) <= model.max_detections_per_image
        assert got[0][:, 2].max() <= size[1] and got[0][:, 3].max() <= size[0]  # clipped


@pytest.mark.slow
def test_exported_graph_equals_detectron2_retinanet_with_the_same_weights(model, exported):
    d2 = build_model(tiny_cfg("RetinaNet")).eval()
    assert type(d2) is RetinaNet
    d2.load_state_dict(model.state_dict(), strict=False)  # ours adds only "_extra_state"
    runner = load_runner("onnxruntime", exported["onnx"])
    for i, size in enumerate(SIZES[:2]):
        x = image(size, seed=20 + i)
        with torch.no_grad():
            ref = d2([{"image": x}])[0]["instances"]
        assert_same(runner(x), (ref.pred_boxes.tensor, ref.scores, ref.pred_classes))


def test_the_detections_limit_is_exercised(model):
    """Without TEST.DETECTIONS_PER_IMAGE the test images would give far more than 100
    detections: the limit (then the removal of boxes outside the image) decides R above."""
    module = ExportableRetinaNet(model)
    limit = model.max_detections_per_image
    model.max_detections_per_image = 100000
    try:
        with torch.no_grad():
            counts = [len(module(image(size, seed=10 + i))[1]) for i, size in enumerate(SIZES)]
    finally:
        model.max_detections_per_image = limit
    assert min(counts) > 5 * limit


@pytest.mark.slow
def test_onnx_graph_has_dynamic_height_width_and_onnx_nms(exported):
    proto = onnx.load(exported["onnx"])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert len(dims) == 3 and dims[0].dim_value == 3
    assert dims[1].dim_param and dims[2].dim_param  # symbolic, not the sample's 128 x 160
    ops = {n.op_type for n in proto.graph.node}
    assert "NonMaxSuppression" in ops and "TopK" in ops
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "classes"]


def test_softmax_loss_model_exports_with_its_class_scores(tmp_path):
    """The softmax focal loss's K + 1 logits: the graph ranks its class probabilities."""
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS.NAME = "SoftmaxFocalLoss"
    model = random_detector(cfg, seed=1)
    assert not model.sigmoid_class_scores()
    path = export_retinanet(model, image(SAMPLE_SIZE, 0), "torchscript", str(tmp_path))
    runner, eager = load_runner("torchscript", path), EagerRunner(model)
    for i, size in enumerate(SIZES[:3]):
        x = image(size, seed=30 + i)
        assert_same(runner(x), eager(x))


def test_compiled_head_is_refused_with_a_fix():
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.COMPILE_HEAD = True  # compiles lazily, at the first call
    with pytest.raises(ValueError, match="COMPILE_HEAD False"):
        ExportableRetinaNet(build_model(cfg))


@pytest.mark.slow
def test_export_model_tool_writes_file_and_config_and_checks_itself(model, tmp_path):
    cfg = tiny_cfg()
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(cfg.dump())
    ckpt = DetectionCheckpointer(model, str(tmp_path))
    ckpt.save("tiny")
    tool = load_script("tools/export_model.py")
    sample = tmp_path / "sample.png"
    from PIL import Image

    Image.fromarray(np.random.RandomState(0).randint(0, 256, (120, 150, 3), np.uint8)).save(sample)
    out = tmp_path / "ts"
    path = tool.main([
        "--config-file", str(cfg_path), "--format", "torchscript", "--output", str(out),
        "--sample-image", str(sample), "MODEL.WEIGHTS", str(tmp_path / "tiny.pth"),
    ])  # fmt: skip
    assert path == str(out / "model.ts") and (out / "config.yaml").is_file()
    runner = load_runner("torchscript", path)
    x = image((90, 200), seed=5)
    assert_same(runner(x), EagerRunner(model)(x))
    with pytest.raises(Exception, match="Unknown config key 'MODEL.RETINANET.NMS_TRESH_TEST'"):
        tool.main(["--config-file", str(cfg_path), "--output", str(out),
                   "MODEL.RETINANET.NMS_TRESH_TEST", "0.5"])  # fmt: skip


def _json_detections(image_result):
    dets = image_result["detections"]
    return (
        torch.tensor([d["bbox_xyxy"] for d in dets], dtype=torch.float32).reshape(-1, 4),
        torch.tensor([d["score"] for d in dets], dtype=torch.float32),
        torch.tensor([d["category_id"] for d in dets], dtype=torch.int64),
    )


@pytest.mark.slow
def test_demo_py_backends_give_the_pytorch_detections(model, exported, tmp_path):
    import synthetic_detection

    demo = load_script("demo.py")
    images = tmp_path / "images"
    synthetic_detection.write_images(str(images), num_images=2, size=(128, 160), seed=1)
    synthetic_detection.write_images(str(images / "tall"), num_images=1, size=(150, 97), seed=2)
    cfg_text = tiny_cfg().dump()
    (tmp_path / "config.yaml").write_text(cfg_text)
    DetectionCheckpointer(model, str(tmp_path)).save("tiny")
    for fmt in BACKEND:  # demo.py reads the config next to the exported file
        (tmp_path / fmt / "config.yaml").parent.mkdir(exist_ok=True)
        (tmp_path / fmt / "config.yaml").write_text(cfg_text)
    inputs = [str(images), str(images / "tall")]
    ref = demo.run(tmp_path / "tiny.pth", inputs, tmp_path / "out_pt", threshold=0.3)
    assert len(ref["images"]) == 3
    for fmt, backend in BACKEND.items():
        weights = tmp_path / fmt / exported[fmt].rsplit("/", 1)[1]
        weights.write_bytes(open(exported[fmt], "rb").read())
        got = demo.run(weights, inputs, tmp_path / f"out_{fmt}", threshold=0.3, backend=backend)
        assert [r["file"] for r in got["images"]] == [r["file"] for r in ref["images"]]
        for g, r in zip(got["images"], ref["images"]):
            assert (g["height"], g["width"]) == (r["height"], r["width"])
            # detections.json rounds boxes to 0.01 px and scores to 1e-4
            assert_same_detection_lists(
                _json_detections(g), _json_detections(r), min_count=5, box_atol=0.0101,
                score_atol=1.01e-4,
            )  # fmt: skip
    with pytest.raises(ValueError, match="takes a .onnx file"):
        demo.run(tmp_path / "tiny.pth", inputs, tmp_path / "x", backend="onnxruntime")
