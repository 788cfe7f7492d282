"""
tools/run_table.py: rows discovered from configs/table*/ and matched to the paper's numbers,
demo-scale mapping, commands, metrics parsed from detectron2 logs, resumability, failures.
Training itself is replaced by a fake train_net.py that writes a detectron2-style log.txt.
"""

import json
import os
import shlex
import sys
import textwrap

import pytest
from repo_scripts import QUICK, REPO, load_script  # noqa: I001  (tests/ helper)


def _load_tool(name):
    return load_script(os.path.join("tools", name + ".py"), name)


rt = _load_tool("run_table")

LOG = """\
[11/30 06:00:01 d2.engine.train_loop]: Starting training from iteration 0
[11/30 06:00:09 fvcore.common.checkpoint]: Saving checkpoint to {out}/model_0000004.pth
[11/30 06:00:09 d2.evaluation.testing]: copypaste: Task: bbox
[11/30 06:00:09 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[11/30 06:00:09 d2.evaluation.testing]: copypaste: 1.0000,2.0000,3.0000,nan,nan,nan
[11/30 06:00:19 fvcore.common.checkpoint]: Saving checkpoint to {out}/model_final.pth
[11/30 06:00:20 d2.evaluation.testing]: copypaste: Task: bbox
[11/30 06:00:20 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[11/30 06:00:20 d2.evaluation.testing]: copypaste: {ap:.4f},52.5000,36.5000,nan,20.0000,nan
"""

# A stand-in for train_net.py: logs like detectron2 with AP = 100 * alpha + seed (so each row's
# number is traceable), detects nothing for alpha = 0.25, diverges like a real run for 0.1.
FAKE_TRAIN_NET = textwrap.dedent(
    """
    import os, sys
    argv = sys.argv[1:]
    opts = dict(zip(argv[2::2], argv[3::2]))
    out = opts["OUTPUT_DIR"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.dirname(out)), "calls.txt"), "a") as f:
        f.write(out + "\\n")
    alpha = float(opts.get("MODEL.RETINANET.FOCAL_LOSS_ALPHA", 0.25))
    if alpha == 0.1:
        print("FloatingPointError: Loss became infinite or NaN at iteration=3!")
        sys.exit(1)
    ap = 100 * alpha + int(opts["SEED"])
    if alpha == 0.25:  # no detection above the score threshold: detectron2 logs NaN
        ap = float("nan")
    text = LOG.format(out=out, ap=ap)
    if ap != ap:
        text = text.replace("nan,52.5000,36.5000", "nan,nan,nan")
    with open(os.path.join(out, "log.txt"), "w") as f:
        f.write(text)
    """
)


def test_parse_final_metrics_takes_the_evaluation_after_model_final(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(LOG.format(out=tmp_path, ap=34.0))
    m = rt.parse_final_metrics(str(log))
    assert m["AP"] == 34.0 and m["AP50"] == 52.5 and m["AP75"] == 36.5 and m["APm"] == 20.0
    # Interrupted before the final evaluation: the intermediate one must not count.
    log.write_text("\n".join(LOG.format(out=tmp_path, ap=1).splitlines()[:6]))
    assert rt.parse_final_metrics(str(log)) is None
    assert rt.parse_final_metrics(str(tmp_path / "missing.txt")) is None


@pytest.mark.parametrize("table", rt.TABLES)
def test_every_table_config_matches_a_paper_row(table):
    from focal_det.paper_tables import get_paper_table

    rows = rt.discover_rows(table, os.path.join(REPO, "configs"))
    paper = get_paper_table(table)
    assert len(rows) == len(paper.rows)  # every paper row has exactly one config
    assert [r.paper for r in rows] == list(paper.rows)  # in the paper's order


def test_a_config_that_matches_no_paper_row_is_an_error(tmp_path):
    d = tmp_path / "table1a"
    d.mkdir()
    (d / "odd.yaml").write_text(
        f'_BASE_: "{QUICK}"\nMODEL:\n  FOCAL:\n    LOSS:\n      NAME: "BalancedCE"\n'
        "  RETINANET:\n    FOCAL_LOSS_ALPHA: 0.33\n"
    )
    with pytest.raises(rt.TableError, match="match no row"):
        rt.discover_rows("1a", str(tmp_path))


@pytest.mark.parametrize("table", ["1a", "1b", "1c", "1d", "3"])
def test_demo_commands_carry_the_rows_settings(table, capsys):
    # Merging each printed command's overrides onto the demo config must give back the row's
    # setting (for 1d the depth is not part of the setting, it has no demo counterpart).
    assert rt.main(["--table", table, "--scale", "demo", "--demo-config", QUICK,
                    "--iters", "30", "--print-commands"]) == 0  # fmt: skip
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("python")]
    rows = rt.discover_rows(table, os.path.join(REPO, "configs"))
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        argv = shlex.split(line)[2:]
        assert argv[:2] == ["--config-file", os.path.relpath(QUICK, REPO)]
        opts = argv[2:]
        cfg = rt.load_cfg(QUICK, opts)
        assert rt.row_setting(table, cfg) == row.setting, line
        assert cfg.SOLVER.MAX_ITER == 30 and cfg.SOLVER.STEPS == (24,)  # quick: step 8 of 10
        assert cfg.OUTPUT_DIR.endswith("seed0")


def test_demo_scale_1e_maps_scale_and_skips_depth_101(capsys):
    assert rt.main(["--table", "1e", "--scale", "demo", "--demo-config", QUICK,
                    "--print-commands"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("# ") and "depth 101" in ln for ln in out) == 5
    cmds = [shlex.split(ln)[2:] for ln in out if ln.startswith("python")]
    # quick config tests at 160 px; the paper's 400..800 px around 600 map to 107..213 px
    sizes = [rt.load_cfg(QUICK, c[2:]).INPUT.MIN_SIZE_TEST for c in cmds]
    assert sizes == [107, 133, 160, 187, 213]


@pytest.mark.slow
def test_run_table_runs_resumes_and_records_failures(tmp_path, capsys):
    fake = tmp_path / "fake_train_net.py"
    fake.write_text(f"LOG = {LOG!r}\n" + FAKE_TRAIN_NET)
    root = tmp_path / "out"
    argv = ["--table", "1a", "--scale", "demo", "--demo-config", QUICK, "--iters", "5",
            "--seeds", "0", "1", "--output-root", str(root), "--train-net", str(fake),
            "--markdown", str(tmp_path / "t.md")]  # fmt: skip
    assert rt.main(argv) == 0
    calls = (root / "demo" / "calls.txt").read_text().split()
    assert len(calls) == 14  # 7 rows x 2 seeds

    md = (tmp_path / "t.md").read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| 0.")}
    assert len(lines) == 7
    # alpha .75: AP = 75 (seed 0) and 76 (seed 1) -> mean 75.5, sample std sqrt(0.5) = 0.71, n 2;
    # beside the paper's 31.1 / 49.4 / 33.0
    cells = [c.strip() for c in lines["0.75"].split("|")[1:-1]]
    assert cells == ["0.75", "75.5", "0.7", "2", "52.5", "36.5",
                     "s0 75.0 / 52.5 / 36.5; s1 76.0 / 52.5 / 36.5", "31.1", "49.4", "33"]
    cells = [c.strip() for c in lines["0.1"].split("|")[1:-1]]
    assert cells[1:7] == ["failed", "-", "0", "failed", "failed", "s0 failed; s1 failed"]
    assert "FloatingPointError" in md
    # no detection: counted as AP 0 and marked, in the mean and in each seed
    cells = [c.strip() for c in lines["0.25"].split("|")[1:-1]]
    assert cells[1:4] == ["0.0*", "0.0", "2"] and cells[6].count("0.0 / 0.0 / 0.0*") == 2
    assert "no detection above" in md
    data = json.loads((root / "demo" / "table1a.json").read_text())
    assert data["rows"][0]["runs"][0]["state"] == "failed" and data["rows"][0]["n"] == 0
    assert data["rows"][3]["runs"][1]["metrics"]["AP"] == 76.0
    row = data["rows"][3]
    assert row["n"] == 2 and row["ours_mean"]["AP"] == 75.5 and row["ours_std"]["AP50"] == 0.0
    assert row["ours_std"]["AP"] == pytest.approx(0.5**0.5)
    assert [(x["seed"], x["AP"], x["AP75"]) for x in row["ours_seeds"]] == [
        (0, 75.0, 36.5), (1, 76.0, 36.5)
    ]  # fmt: skip
    assert [x["no_detections"] for x in data["rows"][1]["ours_seeds"]] == [True, True]
    assert row["val_AP"] is None  # the fake run evaluates only at the end
    # Each run records the code it trained with; the table names it.
    version = rt.code_version()
    assert version["commit"] and data["rows"][3]["runs"][0]["commit"] == version["commit"]
    assert version["code_id"] in md
    mixed = json.loads(json.dumps(data["rows"]))
    mixed[3]["runs"][1]["code_id"] = "0123456789"
    assert "not one version" in rt.markdown("1a", "demo", mixed)
    # The picture: what it draws is the table's numbers (failed row empty, no detection = 0).
    assert (root / "demo" / "table1a.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "t.png").is_file()
    drawn = rt.plot_table("1a", "demo", data["rows"], str(tmp_path / "p.png"))
    assert drawn["ours_mean"][3] == 75.5 and drawn["ours_seeds"][3] == [75.0, 76.0]
    assert drawn["ours_mean"][0] is None and drawn["ours_seeds"][1] == [0.0, 0.0]
    assert drawn["paper"][3] == 31.1 and drawn["labels"][3] == "alpha 0.75"

    # Resumable: nothing finished is rerun; --retry-failed reruns only the failed row's 2 runs.
    assert rt.main(argv) == 0
    assert len((root / "demo" / "calls.txt").read_text().split()) == 14
    assert rt.main(argv + ["--retry-failed"]) == 0
    calls = (root / "demo" / "calls.txt").read_text().split()
    assert len(calls) == 16 and all("alpha0.10" in c for c in calls[14:])
    # A different schedule is a different run (the folder hash covers the whole command).
    assert rt.main(argv[:-2] + ["--collect-only", "--iters", "6"]) == 0
    assert "not run" in capsys.readouterr().out


def test_unknown_demo_config_choice_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rt, "REPO", str(tmp_path))
    (tmp_path / "configs" / "demo").mkdir(parents=True)
    assert rt.main(["--table", "1a", "--scale", "demo", "--print-commands"]) == 2
    assert "pass --demo-config" in capsys.readouterr().err


def test_help_runs():
    import subprocess

    for tool in ("run_table", "paper_claims", "plot_loss_curves", "loss_cdf",
                 "plot_speed_accuracy"):
        r = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", tool + ".py"), "--help"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0 and "usage" in r.stdout, (tool, r.stderr[-500:])


def test_a_mistyped_override_fails_before_any_run(tmp_path, capsys):
    argv = ["--table", "3", "--scale", "demo", "--demo-config", QUICK, "--output-root",
            str(tmp_path), "--", "MODEL.RETINANET.FOCAL_LOSS_ALPH", "0.5"]  # fmt: skip
    assert rt.main(argv) == 2
    assert "FOCAL_LOSS_ALPHA" in capsys.readouterr().err  # the closest key is suggested
    assert not (tmp_path / "demo").exists()


def test_a_result_whose_config_changed_since_is_stale_and_rerun(tmp_path):
    fake = tmp_path / "fake_train_net.py"
    fake.write_text(f"LOG = {LOG!r}\n" + FAKE_TRAIN_NET)
    root = tmp_path / "out"
    argv = ["--table", "3", "--scale", "demo", "--demo-config", QUICK, "--iters", "5", "--rows",
            "fl_gamma2.0", "--output-root", str(root), "--train-net", str(fake)]  # fmt: skip
    assert rt.main(argv) == 0
    (run,) = rt.plan_runs(
        rt.build_parser().parse_args(argv), rt.discover_rows("3", REPO + "/configs")[1:2]
    )
    # As detectron2 saves it: the run's merged config. Identical -> done; an edited base -> stale.
    cfg = rt.load_cfg(QUICK, run.argv[2:])
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    os.replace(tmp_path / "cfg.yaml", os.path.join(run.output_dir, "config.yaml"))
    assert rt.run_state(run)["state"] == "done"
    cfg.defrost()
    cfg.SOLVER.BASE_LR = 0.123
    with open(os.path.join(run.output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    st = rt.run_state(run)
    assert st["state"] == "stale" and "SOLVER.BASE_LR" in st["reason"]
    assert rt.main(argv) == 0  # reruns it
    assert len((root / "demo" / "calls.txt").read_text().split()) == 2


def test_a_row_with_the_config_of_another_tables_finished_run_reuses_it(tmp_path, capsys):
    # At demo scale Table 1d's FL row and Table 1b's gamma-2 row are one experiment (their
    # commands differ only in the folder name): the second table must not train it again.
    fake = tmp_path / "fake_train_net.py"
    fake.write_text(f"LOG = {LOG!r}\n" + FAKE_TRAIN_NET)
    root = tmp_path / "out"
    common = ["--scale", "demo", "--demo-config", QUICK, "--iters", "5", "--output-root",
              str(root), "--train-net", str(fake)]  # fmt: skip
    argv_1b = ["--table", "1b", "--rows", "gamma2.0", "--seeds", "0", "1"] + common
    assert rt.main(argv_1b) == 0
    rows = [r for r in rt.discover_rows("1b", REPO + "/configs") if "gamma2.0" in r.stem]
    for run in rt.plan_runs(rt.build_parser().parse_args(argv_1b), rows):
        # what detectron2 saves: the merged config of the run's command
        with open(os.path.join(run.output_dir, "config.yaml"), "w") as f:
            f.write(rt.load_cfg(QUICK, run.argv[2:]).dump())
    calls = (root / "demo" / "calls.txt").read_text().split()
    assert len(calls) == 2

    argv_1d = ["--table", "1d", "--rows", "fl_", "--seeds", "0", "1", "2"] + common
    assert rt.main(argv_1d + ["--markdown", str(tmp_path / "t.md")]) == 0
    calls = (root / "demo" / "calls.txt").read_text().split()
    # seeds 0 and 1 reused from 1b; seed 2 has no equivalent run and is trained
    assert len(calls) == 3 and calls[-1].endswith("seed2") and "_R_101_" in calls[-1]
    assert "reusing its result" in capsys.readouterr().out
    data = json.loads((root / "demo" / "table1d.json").read_text())
    runs = data["rows"][-1]["runs"]
    assert [os.path.dirname(r["output_dir"]) for r in runs[:2]] == [
        os.path.dirname(c) for c in calls[:2]
    ]
    assert all("_R_101_" in r["reused_from"] for r in runs[:2]) and "reused_from" not in runs[2]
    notes = [ln for ln in (tmp_path / "t.md").read_text().splitlines() if "reused" in ln]
    assert len(notes) == 1 and "seeds 0, 1:" in notes[0]  # one line per row, seeds grouped

    # A changed config is not the same experiment: nothing is reused, the rows are trained.
    assert rt.main(argv_1d + ["--seeds", "0", "--", "SOLVER.BASE_LR", "0.02"]) == 0
    assert len((root / "demo" / "calls.txt").read_text().split()) == 4


def test_training_curves_read_detectron2_metrics_json(tmp_path):
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    for d in (ok, bad):
        d.mkdir()
    (ok / "metrics.json").write_text(
        "\n".join(json.dumps({"iteration": i, "loss_cls": 3.0 / (i + 1)}) for i in (19, 39, 59))
        + '\n{"iteration": 79, "bbox/AP": 5.0}\n{"iteration": 99, "loss_c'  # eval line; cut line
    )
    (bad / "metrics.json").write_text(
        json.dumps({"iteration": 19, "loss_cls": 1.0}) + "\n"
        + json.dumps({"iteration": 39, "loss_cls": float("nan")}) + "\n"
    )  # fmt: skip
    assert rt.read_curve(str(ok)) == ([19, 39, 59], [0.15, 0.075, 0.05])
    assert rt.read_curve(str(tmp_path / "none")) == ([], [])
    summary = [
        {"setting": {"alpha": 0.75}, "runs": [
            {"seed": 0, "state": "done", "output_dir": str(ok)},
            {"seed": 1, "state": "pending", "output_dir": str(ok)}]},
        {"setting": {"alpha": 0.1}, "runs": [
            {"seed": 0, "state": "failed", "output_dir": str(bad)}]},
    ]  # fmt: skip
    drawn = rt.plot_curves("1a", summary, str(tmp_path / "c.png"))
    # the pending run is not drawn; the failed one up to its last finite value
    assert drawn == {"loss_cls": {"alpha 0.75, seed 0": 3, "alpha 0.1, seed 0": 1}, "val_AP": {}}
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_val_ap_curve_is_the_mean_over_seeds_of_the_periodic_evaluations(tmp_path):
    # detectron2's EvalHook writes "bbox/AP" at each TEST.EVAL_PERIOD; NaN = no detection (0).
    evals = {0: [(199, 2.0), (399, 6.0), (599, 7.0)], 1: [(199, float("nan")), (399, 4.0)]}
    runs = []
    for seed, points in evals.items():
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        lines = [json.dumps({"iteration": 19, "loss_cls": 1.0})]
        lines += [json.dumps({"iteration": i, "bbox/AP": v, "bbox/AP50": 9.0}) for i, v in points]
        (d / "metrics.json").write_text("\n".join(lines) + "\n")
        runs.append({"seed": seed, "state": "done", "output_dir": str(d)})
    curve = rt.val_ap_curve(runs)
    # only the iterations both seeds evaluated at (seed 1 stopped earlier)
    assert curve == {"iterations": [199, 399], "mean": [1.0, 5.0],
                     "seeds": {"0": [2.0, 6.0], "1": [0.0, 4.0]}}  # fmt: skip
    assert rt.val_ap_curve(runs[:0]) is None
    summary = [{"setting": {"alpha": 0.75}, "runs": runs, "val_AP": curve}]
    drawn = rt.plot_curves("1a", summary, str(tmp_path / "c.png"))
    assert drawn["val_AP"] == {"alpha 0.75": 2} and len(drawn["loss_cls"]) == 2


def test_a_long_failure_message_is_cut_at_a_sentence_and_marked(tmp_path):
    first = "FloatingPointError: non-finite loss at iteration 188: loss_cls=nan."
    (tmp_path / "stdout.txt").write_text("noise\n" + first + " Hint " + "x" * 400 + ". More.\n")
    reason = rt._failure_reason(str(tmp_path), str(tmp_path / "stdout.txt"))
    assert reason == first + " [...]"


def test_configs_that_differ_only_in_the_last_bit_of_a_float_are_one_experiment():
    # The demo YAML writes its 3-scale anchors as 2 ** (4 + 1/3) etc.; Table 1c's mapping computes
    # 16 * 2 ** (1/3): one float32 anchor, two float64 spellings. The 3 x 3 row is the demo config.
    yaml_sizes = [[16.0, 2 ** (4 + 1 / 3), 2 ** (4 + 2 / 3)]]
    mapped_sizes = [[b * 2 ** (i / 3) for i in range(3)] for b in (16.0,)]
    assert yaml_sizes != mapped_sizes  # the case this is about
    saved = {"MODEL.ANCHOR_GENERATOR.SIZES": yaml_sizes, "SEED": 0, "MODEL.FOCAL.LOSS.NAME": "a"}
    assert rt._differing_keys(saved, {**saved, "MODEL.ANCHOR_GENERATOR.SIZES": mapped_sizes}) == []
    # A real difference (a different anchor, another type, another length) still counts.
    for other in ([[16.0, 20.16, 2 ** (4 + 2 / 3)]], [[16, 20, 25]], [[16.0, 2 ** (4 + 1 / 3)]]):
        changed = {**saved, "MODEL.ANCHOR_GENERATOR.SIZES": other}
        assert rt._differing_keys(saved, changed) == ["MODEL.ANCHOR_GENERATOR.SIZES"]
    assert rt._differing_keys(saved, {**saved, "MODEL.FOCAL.LOSS.NAME": "b"}) == [
        "MODEL.FOCAL.LOSS.NAME"
    ]
