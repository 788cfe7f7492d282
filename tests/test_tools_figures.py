"""
tools/plot_loss_curves.py (Figures 1, 5, 6) and tools/loss_cdf.py (Figure 4): the curves come
from focal_det's losses and must match the paper's closed forms / the model's own loss.
"""

import csv
import json
import os

import numpy as np
import pytest
import synthetic_detection  # noqa: I001  (tests/ helper, on sys.path under pytest)
import torch
import torch.nn.functional as F
from repo_scripts import QUICK, load_script  # noqa: I001  (tests/ helper)


def _load_tool(name):
    return load_script(os.path.join("tools", name + ".py"), name)


plc = _load_tool("plot_loss_curves")
lcdf = _load_tool("loss_cdf")


# ---------------------------------------------------------------- plot_loss_curves
def test_loss_curves_match_closed_forms_and_write_files(tmp_path):
    rc = plc.main(["--output-dir", str(tmp_path), "--num-points", "21"])
    assert rc == 0
    names = sorted(os.listdir(tmp_path))
    for stem in ("fig1_focal_loss", "fig5_loss_vs_xt", "fig6_derivative_vs_xt"):
        assert stem + ".png" in names and stem + ".csv" in names
    report = json.loads((tmp_path / "loss_curves_check.json").read_text())
    # The paper's Sec 3.2 examples: 100x lower at p_t = 0.9, ~1000x at p_t ~ 0.968.
    assert report["ce_over_fl_gamma2"]["p_t=0.9"] == pytest.approx(100.0, rel=1e-6)
    assert 950 < report["ce_over_fl_gamma2"]["p_t=0.968"] < 1000
    # Figure 1's CSV at gamma = 0 is CE = -log(p_t), recomputed here independently.
    with open(tmp_path / "fig1_focal_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 21
    pt = np.array([float(r["p_t"]) for r in rows])
    np.testing.assert_allclose([float(r["FL gamma=0"]) for r in rows], -np.log(pt), rtol=1e-8)
    np.testing.assert_allclose(
        [float(r["FL gamma=2"]) for r in rows], -((1 - pt) ** 2) * np.log(pt), rtol=1e-8
    )
    # Figure 6 at x_t = 0: dCE/dx_t = p_t - 1 = -0.5; dFL*/dx_t (gamma 4, beta 0) = -0.5 too.
    with open(tmp_path / "fig6_derivative_vs_xt.csv") as f:
        mid = list(csv.DictReader(f))[10]
    assert float(mid["x_t"]) == pytest.approx(0.0, abs=1e-12)
    assert float(mid["CE"]) == pytest.approx(-0.5)
    assert float(mid["FL* gamma=4 beta=0"]) == pytest.approx(-0.5)


def test_loss_curves_fail_loudly_on_a_wrong_loss(monkeypatch, capsys):
    from focal_det.losses import sigmoid_focal_loss_star

    def wrong_fl(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
        # A classic bug: (1 - p) instead of (1 - p_t) as the modulating factor.
        p = torch.sigmoid(inputs)
        ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        return ce * (1 - p) ** gamma

    monkeypatch.setattr(plc, "_loss_functions", lambda: (wrong_fl, sigmoid_focal_loss_star))
    assert plc.main(["--output-dir", "/nonexistent/never-written", "--num-points", "9"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "gamma=0.5" in err and "y=-1" in err


def test_closed_form_gradients_are_the_derivatives_of_the_closed_losses():
    # The references themselves: finite differences of the closed-form losses.
    xt = torch.linspace(-4, 4, 33, dtype=torch.float64)
    h = 1e-6
    for fn in (
        plc.closed_ce,
        lambda x: plc.closed_fl(x, 2.0),
        lambda x: plc.closed_fl_star(x, 2.0, 1.0),
    ):
        fd = (fn(xt + h)[0] - fn(xt - h)[0]) / (2 * h)
        torch.testing.assert_close(fn(xt)[1], fd, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- loss_cdf
def test_reservoir_keeps_everything_under_capacity_and_samples_uniformly():
    r = lcdf.Reservoir(capacity=100, dim=1, seed=0)
    r.add(np.arange(30, dtype=np.float32)[:, None])
    r.add(np.arange(30, 60, dtype=np.float32)[:, None])
    np.testing.assert_array_equal(r.values()[:, 0], np.arange(60))

    n, cap = 200_000, 5_000
    r = lcdf.Reservoir(capacity=cap, dim=2, seed=1)
    stream = np.stack([np.arange(n), -np.arange(n)], 1).astype(np.float32)
    for chunk in np.array_split(stream, 37):  # uneven batches, several larger than capacity
        r.add(chunk)
    v = r.values()
    assert r.num_seen == n and v.shape == (cap, 2)
    assert len(np.unique(v[:, 0])) == cap  # without replacement
    np.testing.assert_array_equal(v[:, 1], -v[:, 0])  # rows stay intact
    # Uniform over the whole stream: each of 10 equal parts holds ~cap/10 (binomial sd ~21).
    counts = np.histogram(v[:, 0], bins=10, range=(0, n))[0]
    assert np.all(np.abs(counts - cap / 10) < 100), counts


def test_normalized_cdf_is_the_papers_curve():
    cdf = lcdf.normalized_loss_cdf(np.array([4.0, 1.0, 3.0, 2.0]))
    np.testing.assert_allclose(cdf, [0.1, 0.3, 0.6, 1.0])
    grid = lcdf.cdf_on_grid(cdf, np.array([0.0, 0.25, 0.5, 1.0]))
    np.testing.assert_allclose(grid, [0.0, 0.1, 0.3, 1.0])


def test_loss_cdf_on_a_tiny_random_model_matches_the_models_own_loss(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from focal_det import add_focal_config

    synthetic_detection.register("tools_cdf_tiny", str(tmp_path / "imgs"), num_images=3)
    opts = ["MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "0.25"]
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(QUICK)
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    weights = str(tmp_path / "tiny.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("tiny")

    out = tmp_path / "cdf"
    argv = ["--config-file", QUICK, "--weights", weights, "--dataset", "tools_cdf_tiny",
            "--gammas", "0", "2", "--alpha", "0.25", "--output-dir", str(out),
            "--max-negatives", "1000000", *opts]  # fmt: skip
    assert lcdf.main(argv) == 0
    summary = json.loads((out / "loss_cdf.json").read_text())
    assert summary["num_images"] == 3
    assert summary["num_negative_kept"] == summary["num_negative_seen"] > 0
    assert summary["num_positive_seen"] > 0
    assert os.path.getsize(out / "loss_cdf.png") > 0
    with open(out / "loss_cdf.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("pos gamma=0", "neg gamma=2"):
        col = np.array([float(r[key]) for r in rows])
        assert col[0] == 0 and col[-1] == pytest.approx(1.0) and np.all(np.diff(col) >= -1e-12)

    # Independent reference: the meta-architecture's own FL (gamma 2, alpha .25) over the same
    # images, eval-mode BN, normalised by its foreground count. Sum of the tool's per-anchor
    # losses / #positives must be the model's loss_cls.
    from detectron2.data import DatasetCatalog

    loader = lcdf.build_loader(cfg, "tools_cdf_tiny", None, 0, 0)
    res = lcdf.collect_anchor_losses(model, loader, gammas=[2.0], alpha=0.25)
    assert res["num_positive_seen"] == summary["num_positive_seen"]
    model.eval()
    total_ref, total_pos = 0.0, 0
    for batch in loader:
        with torch.no_grad(), EventStorage():
            images = model.preprocess_image(batch)
            feats = model.backbone(images.tensor)
            feats = [feats[f] for f in model.head_in_features]
            preds = model.head(feats)
            losses = model.forward_training(images, feats, preds, [d["instances"] for d in batch])
            anchors = model.anchor_generator(feats)
            labels, _ = model.label_anchors(anchors, [d["instances"] for d in batch])
        npos = int(((labels[0] >= 0) & (labels[0] != 3)).sum())
        total_ref += float(losses["loss_cls"]) * max(npos, 1)
        total_pos += npos
    assert len(DatasetCatalog.get("tools_cdf_tiny")) == 3
    assert total_pos == res["num_positive_seen"]
    ours = float(res["positives"].sum() + res["negatives"].sum())
    assert ours == pytest.approx(total_ref, rel=1e-4)
    tot = summary["total_loss_estimate"]["gamma=2"]  # all anchors kept: the estimate is exact
    assert tot["positives"] + tot["negatives"] == pytest.approx(total_ref, rel=1e-4)
    assert 0 < tot["negative_share"] < 1


def test_loss_cdf_refuses_a_softmax_loss_model_with_the_fix(tmp_path):
    synthetic_detection.register("tools_cdf_softmax", str(tmp_path / "imgs"), num_images=1)
    argv = ["--config-file", QUICK, "--dataset", "tools_cdf_softmax", "--output-dir",
            str(tmp_path / "cdf"), "MODEL.RETINANET.NUM_CLASSES", "3",
            "MODEL.FOCAL.LOSS.NAME", "SoftmaxFocalLoss"]  # fmt: skip
    with pytest.raises(SystemExit, match="SoftmaxFocalLoss.*use a model trained with a sigmoid"):
        lcdf.main(argv)  # was: a shape error deep in the loss (K + 1 logits read as K)
    assert not (tmp_path / "cdf").exists()


def test_loss_cdf_rejects_unknown_dataset(tmp_path):
    with pytest.raises(SystemExit, match="not registered"):
        lcdf.main(["--config-file", QUICK, "--weights", "", "--dataset", "no_such_dataset_xyz",
                   "--output-dir", str(tmp_path)])  # fmt: skip


# ---------------------------------------------------------------- plot_speed_accuracy
psa = _load_tool("plot_speed_accuracy")


def test_speed_accuracy_plot_from_a_tiny_results_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text(
        "x: Saving checkpoint to run/model_final.pth\n"
        "y: copypaste: Task: bbox\ny: copypaste: AP,AP50,AP75\ny: copypaste: 12.3400,20.0,10.0\n"
    )
    res = tmp_path / "ours.csv"
    res.write_text(
        "label,series,ap,time_ms,source\n"
        "400,ours CPU,10.5,900,bench+eval\n"
        "600,ours CPU,run:run,1500,train_net.py --eval-only\n"
    )
    out = tmp_path / "fig"
    assert psa.main(["--results", str(res), "--output-dir", str(out), "--layout", "one"]) == 0
    with open(out / "fig2_speed_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["origin"] == "ours"]
    paper = [r for r in rows if r["origin"] == "paper"]
    assert [float(r["ap"]) for r in ours] == [10.5, 12.34]  # second AP read from the run's log
    assert len(paper) == 10 and all("paper" in r["series"] for r in paper)
    assert {(r["label"], float(r["ap"]), float(r["time_ms"])) for r in paper} >= {
        ("600", 34.3, 98.0),
        ("800", 37.8, 198.0),
    }
    meta = json.loads((out / "fig2_speed_accuracy.json").read_text())
    assert meta["log_time_axis"] is True  # 900-1500 ms on a CPU vs 64-198 ms on the M40
    assert meta["layout"] == "one axis"
    assert os.path.getsize(out / "fig2_speed_accuracy.png") > 0
    # AP 10.5-12.3 against the paper's 28.7-37.8: auto puts them side by side, own time axes
    assert psa.main(["--results", str(res), "--output-dir", str(out)]) == 0
    meta = json.loads((out / "fig2_speed_accuracy.json").read_text())
    assert meta["layout"] == "two panels" and meta["log_time_axis"] is False
    assert psa.separate_panels([{"ap": 20.0}], [{"ap": 30.0}]) is False

    res_json = tmp_path / "ours.json"
    res_json.write_text(json.dumps({"points": [{"label": "a", "ap": 1, "time_ms": 0}]}))
    with pytest.raises(SystemExit, match="time_ms must be > 0"):
        psa.main(["--results", str(res_json), "--output-dir", str(out)])
    res_json.write_text(json.dumps([{"label": "a", "ap": 1}]))
    with pytest.raises(SystemExit, match="lacks"):
        psa.main(["--results", str(res_json), "--output-dir", str(out)])
