"""
tools/demo_selection.py: every probe is the shipped demo config with checked overrides, trained
and evaluated on the held-out splits only, and the table reads what the runs wrote.
"""
import json

from detectron2.config import get_cfg
from repo_scripts import load_script  # noqa: I001  (tests/ helper)

from focal_det import add_focal_config
from focal_det.config_check import flatten_keys, merge_config_file, merge_config_list

sel = load_script("tools/demo_selection.py")


def _cfg(opts):
    cfg = get_cfg()
    add_focal_config(cfg)
    merge_config_file(cfg, str(sel.DEMO_CONFIG))
    merge_config_list(cfg, opts)
    return cfg


def test_every_probe_merges_and_never_touches_val():
    shipped = dict(flatten_keys(_cfg([])))
    for name, _, _ in sel.PROBES:
        cfg = _cfg(sel.probe_opts(name))
        assert cfg.DATASETS.TRAIN == ("deepforest_trees_trainsub",)
        assert cfg.DATASETS.TEST == ("deepforest_trees_holdout",)
        changed = {
            k for k, v in dict(flatten_keys(cfg)).items()
            if shipped[k] != v and not k.startswith(("DATASETS.", "SOLVER.CHECKPOINT_PERIOD"))
        }  # fmt: skip
        if name == "chosen":  # the probe that chose the demo config is the demo config
            assert changed == set()
        else:
            assert changed, name
    old = _cfg(sel.probe_opts("old_demo"))
    assert old.MODEL.RETINANET.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    assert not old.INPUT.CROP.ENABLED and old.SOLVER.IMS_PER_BATCH == 4


def test_table_reads_the_runs_and_marks_missing_ones(tmp_path):
    run = tmp_path / "chosen"
    run.mkdir()
    bbox = {"AP": 21.25, "AP50": 59.4, "AP75": 9.35, "APs": 1.0, "APm": 30.0}
    (run / "demo_results.json").write_text(
        json.dumps({"bbox": bbox, "seconds": {"train_and_eval": 271.4}, "threads": 2})
    )
    (run / "code.json").write_text(json.dumps({"code_id": "abc1234567"}))
    rows = sel.collect(tmp_path)
    assert [r["probe"] for r in rows] == [p[0] for p in sel.PROBES]
    table = sel.to_markdown(rows)
    what = "+ 16 crops of 200 px per batch (the demo config)"
    assert f"| chosen | {what} | 21.2 | 59.4 | 9.3 |" in table
    assert "| 271 | 2 | abc1234567 |" in table
    assert table.count("not run") == (len(sel.PROBES) - 1) * (len(sel.METRICS) + 3)
    assert sel.run_probe("chosen", tmp_path, threads=1) == "finished"  # resumable: not rerun
