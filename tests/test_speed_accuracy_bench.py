"""benchmarks/speed_accuracy.py: our Figure 2 points from finished training runs."""

import json
import os

import pytest
import synthetic_detection
import torch
from repo_scripts import load_script

sa = load_script("benchmarks/speed_accuracy.py", "speed_accuracy_bench")

LOG = """\
[11/30 06:00:19 fvcore.common.checkpoint]: Saving checkpoint to {out}/model_final.pth
[11/30 06:00:20 d2.evaluation.testing]: copypaste: Task: bbox
[11/30 06:00:20 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[11/30 06:00:20 d2.evaluation.testing]: copypaste: {ap:.4f},{ap50:.4f},1.0000,nan,nan,nan
"""


def _finished_run(folder, size, ap, seed):
    """A training output folder as train_net.py leaves it: config.yaml, model_final.pth, log."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = synthetic_detection.tiny_cfg()
    cfg.DATASETS.TEST = ("speed_acc_tiny",)
    cfg.INPUT.MIN_SIZE_TEST = size
    cfg.INPUT.MAX_SIZE_TEST = 1000
    torch.manual_seed(seed)
    model = build_model(cfg)
    os.makedirs(folder)
    DetectionCheckpointer(model, save_dir=folder).save("model_final")
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    with open(os.path.join(folder, "log.txt"), "w") as f:
        f.write(LOG.format(out=folder, ap=ap, ap50=2 * ap))
    return model


def test_points_carry_each_runs_ap_test_size_and_weights(tmp_path, monkeypatch):
    synthetic_detection.register("speed_acc_tiny", str(tmp_path / "imgs"), num_images=2)
    small, large = str(tmp_path / "small"), str(tmp_path / "large")
    m_small = _finished_run(small, 96, 3.5, seed=0)
    _finished_run(large, 160, 7.25, seed=1)

    # The weights timed are the run's: check by the detections of the loaded model.
    cfg, loaded, metrics = sa.load_run(small, "cpu")
    inputs = sa.load_test_inputs(cfg, 0)
    m_small.eval()
    with torch.no_grad():
        want = m_small([inputs[0]])[0]["instances"]
        got = loaded([inputs[0]])[0]["instances"]
    assert torch.equal(want.pred_boxes.tensor, got.pred_boxes.tensor) and len(got) > 0
    assert metrics["AP"] == 3.5 and len(inputs) == 2

    out = tmp_path / "out"
    argv = ["--runs", small, large, "--labels", "96 px", "160 px", "--rounds", "2", "--warmup",
            "0", "--json", str(out / "r.json"), "--doc", str(out / "b.md"), "--plot-dir",
            str(out / "fig")]  # fmt: skip
    assert sa.main(argv) == 0
    res = json.loads((out / "r.json").read_text())
    pts = {p["label"]: p for p in res["points"]}
    assert (pts["96 px"]["ap"], pts["96 px"]["ap50"]) == (3.5, 7.0)
    assert pts["160 px"]["ap"] == 7.25
    # the synthetic images are 128x160: the short side is resized to MIN_SIZE_TEST
    assert pts["96 px"]["test_size"] == "96x120" and pts["160 px"]["test_size"] == "160x200"
    assert all(p["time_ms"] > 0 and p["num_images"] == 2 for p in pts.values())
    assert res["commit"] and "speed_accuracy" in res["command"]
    doc = (out / "b.md").read_text()
    assert "<!-- BEGIN speed_accuracy -->" in doc and "| 96 px | 96x120 | 2 | 3.5 | 7.0 |" in doc
    fig = json.loads((out / "fig" / "fig2_speed_accuracy.json").read_text())
    assert [p["ap"] for p in fig["ours"]] == [3.5, 7.25] and len(fig["paper"]) == 10

    # --from-table: per row the finished run of the lowest seed, labelled by what varies
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"rows": [
        {"setting": {"depth": 50, "scale": 400},
         "runs": [{"seed": 1, "state": "done", "output_dir": large},
                  {"seed": 0, "state": "done", "output_dir": small}]},
        {"setting": {"depth": 50, "scale": 600},
         "runs": [{"seed": 0, "state": "failed", "output_dir": "x"}]},
        {"setting": {"depth": 50, "scale": 800},
         "runs": [{"seed": 0, "state": "done", "output_dir": large}]},
    ]}))  # fmt: skip
    assert sa.runs_from_table(str(table)) == [("scale 400", small), ("scale 800", large)]


def test_a_folder_that_is_not_a_finished_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not a finished training run"):
        sa.load_run(str(tmp_path), "cpu")
    (tmp_path / "t.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="no finished run"):
        sa.runs_from_table(str(tmp_path / "t.json"))
