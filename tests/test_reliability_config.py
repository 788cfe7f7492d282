"""
Reliability of configs (issue 8, item 1): a bad key, value or combination stops before any
work, with a message naming the key, its source and the closest valid key.
"""
import os

import pytest
from detectron2.config import get_cfg
from synthetic_detection import tiny_cfg

import focal_det  # noqa: F401  (registers everything)
from focal_det import add_focal_config
from focal_det.config_check import (
    ConfigError,
    check_config,
    merge_config_file,
    merge_config_list,
)


def _cfg():
    cfg = get_cfg()
    add_focal_config(cfg)
    return cfg


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_unknown_key_in_base_file_names_file_and_closest_key(tmp_path):
    base = _write(tmp_path / "Base.yaml", "MODEL:\n  RETINANET:\n    FOCAL_LOSS_GAMA: 1.0\n")
    child = _write(tmp_path / "child.yaml", "_BASE_: Base.yaml\nSOLVER:\n  BASE_LR: 0.01\n")
    with pytest.raises(ConfigError) as e:
        merge_config_file(_cfg(), child)
    msg = str(e.value)
    assert "MODEL.RETINANET.FOCAL_LOSS_GAMA" in msg
    assert base in msg  # the file of the _BASE_ chain that has the typo
    assert "Did you mean 'MODEL.RETINANET.FOCAL_LOSS_GAMMA'" in msg


def test_key_on_wrong_node_suggests_the_right_node(tmp_path):
    f = _write(tmp_path / "a.yaml", "MODEL:\n  FOCAL:\n    FOCAL_LOSS_ALPHA: 0.5\n")
    with pytest.raises(ConfigError, match="Did you mean 'MODEL.RETINANET.FOCAL_LOSS_ALPHA'"):
        merge_config_file(_cfg(), f)


def test_wrong_type_in_file_and_good_file_merges(tmp_path):
    f = _write(tmp_path / "a.yaml", "SOLVER:\n  BASE_LR: 1\n")
    with pytest.raises(ConfigError) as e:
        merge_config_file(_cfg(), f)
    msg = str(e.value)
    assert "SOLVER.BASE_LR" in msg and str(f) in msg and "float" in msg and "1.0" in msg

    good = _write(tmp_path / "b.yaml", "MODEL:\n  FOCAL:\n    LOSS:\n      NAME: OHEM\n")
    cfg = merge_config_file(_cfg(), good)
    assert cfg.MODEL.FOCAL.LOSS.NAME == "OHEM"


def test_unsafe_yaml_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    f = _write(
        tmp_path / "evil.yaml",
        f"SOLVER:\n  BASE_LR: !!python/object/apply:os.mkdir ['{marker}']\n",
    )
    with pytest.raises(ConfigError, match="safe_load"):
        merge_config_file(_cfg(), f)
    assert not os.path.exists(marker)


def test_command_line_unknown_key_wrong_type_and_odd_length():
    with pytest.raises(ConfigError) as e:
        merge_config_list(_cfg(), ["SOLVER.BASE_LR", "0.02", "SOLVER.MAX_ITERS", "10"])
    assert "SOLVER.MAX_ITERS" in str(e.value) and "command line" in str(e.value)
    assert "Did you mean 'SOLVER.MAX_ITER'" in str(e.value)

    with pytest.raises(ConfigError, match="SOLVER.IMS_PER_BATCH.*expects type int.*str 'sixteen'"):
        merge_config_list(_cfg(), ["SOLVER.IMS_PER_BATCH", "sixteen"])
    with pytest.raises(ConfigError, match="KEY VALUE pairs; 'SOLVER.BASE_LR' has no value"):
        merge_config_list(_cfg(), ["SOLVER.BASE_LR"])
    cfg = merge_config_list(_cfg(), ["SOLVER.BASE_LR", "0.02", "MODEL.FOCAL.LOSS.NAME", "OHEM"])
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.MODEL.FOCAL.LOSS.NAME == "OHEM"


def test_project_configs_pass_the_checks():
    # Every YAML we ship must load under the strict, safe checks.
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".yaml")]
    for f in files:
        merge_config_file(_cfg(), f)


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE", 0, "BATCH_SIZE_PER_IMAGE=0 must be > 0"),
        ("MODEL.FOCAL.OHEM.POSITIVE_FRACTION", 1.5, "POSITIVE_FRACTION=1.5 must be in"),
        ("MODEL.FOCAL.OHEM.NMS_GROUPS", "class", "NMS_GROUPS='class' must be one of ('all'"),
        ("MODEL.FOCAL.OHEM.BOX_LOSS", "all", "BOX_LOSS='all' must be one of ('foreground'"),
        ("MODEL.FOCAL.OHEM.NORMALIZER", "num_fg", "NORMALIZER='num_fg' must be one of"),
        ("MODEL.RETINANET.FOCAL_LOSS_GAMMA", -1.0, "FOCAL_LOSS_GAMMA=-1.0 must be >= 0"),
        ("MODEL.FOCAL.LOSS.STAR_GAMMA", 0.0, "STAR_GAMMA=0.0 must be > 0"),
        ("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbon", "Did you mean 'build_resnet_fpn_ba"),
        ("MODEL.FOCAL.LOSS.NAME", "Focal", "Registered: ["),
    ],
)
def test_incompatible_settings_are_rejected(key, value, expect):
    cfg = tiny_cfg()
    check_config(cfg)  # the valid baseline passes
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("(", r"\(")):
        check_config(cfg)


def test_anchor_count_must_match_across_levels():
    cfg = tiny_cfg()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 40, 50], [64], [128, 160, 200]]
    cfg.MODEL.RETINANET.IN_FEATURES = ["p3", "p4", "p5"]
    with pytest.raises(ConfigError, match=r"\{'p3': 9, 'p4': 3, 'p5': 9\} cell anchors"):
        check_config(cfg)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64]]
    with pytest.raises(ConfigError, match="has 2 lists but there are 3 feature levels"):
        check_config(cfg)


def test_setup_stops_before_any_work(tmp_path):
    from detectron2.engine import default_argument_parser

    from focal_det.engine import setup

    out = tmp_path / "out"
    quick = os.path.join(os.path.dirname(__file__), "..", "configs", "quick",
                         "retinanet_tiny_quick.yaml")
    for opts, expect in [
        (["SOLVER.BASE_LRR", "0.1"], "Did you mean 'SOLVER.BASE_LR'"),
        (["MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE", "-4"], "BATCH_SIZE_PER_IMAGE=-4 must be > 0"),
        (["MODEL.WEIGHTS", str(tmp_path / "nope.pth")], "nope.pth.*no such file"),
    ]:
        args = default_argument_parser().parse_args(
            ["--config-file", quick, "OUTPUT_DIR", str(out)] + opts
        )
        with pytest.raises(ConfigError, match=expect):
            setup(args)
        assert not out.exists()  # default_setup (logs, config dump) never ran
