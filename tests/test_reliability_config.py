"""
Reliability of configs (issue 8, item 1): a bad key, value or combination stops before any
work, with a message naming the key, its source and the closest valid key.
"""
import os

import pytest
from detectron2.config import get_cfg
from repo_scripts import QUICK  # noqa: I001  (tests/ helper)
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


def _set(cfg, key, value):
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


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
    _set(cfg, key, value)
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("(", r"\(")):
        check_config(cfg)


def test_group_norm_head_needs_a_multiple_of_32_channels():
    cfg = tiny_cfg()
    cfg.MODEL.RETINANET.NORM = "GN"
    check_config(cfg)  # 32 channels: one per group
    cfg.MODEL.FPN.OUT_CHANNELS = 48
    with pytest.raises(ConfigError, match=r"MODEL.FPN.OUT_CHANNELS=48 must be a multiple of 32"):
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


# ---- issue 15 ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "files,expect",
    [
        ({"a.yaml": ""}, "is empty \\(or holds only comments\\).*write `{}`"),
        ({"a.yaml": "# only a comment\n# and another\n"}, "is empty"),
        ({"a.yaml": "_BASE_: b.yaml\n", "b.yaml": "# nothing here\n"}, "b.yaml' is empty"),
        ({"a.yaml": "_BASE_:\nSOLVER:\n  BASE_LR: 0.1\n"}, "_BASE_ in .*a.yaml' has no value"),
        (
            {"a.yaml": "SOLVER:\n  BASE_LR: 0.1\n  MAX_ITER: 5\n  BASE_LR: 0.2\n"},
            "duplicate key 'BASE_LR' \\(lines 2 and 4\\).*keep one",
        ),
        ({"a.yaml": "SOLVER:\n  BASE_LR: 0.1\nSOLVER:\n  MAX_ITER: 5\n"}, "duplicate key 'SOLVER'"),
    ],
)
def test_empty_base_less_and_duplicate_key_yaml_are_clear_errors(tmp_path, files, expect):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=expect):
        merge_config_file(_cfg(), str(tmp_path / "a.yaml"))


def test_a_deliberately_empty_config_merges(tmp_path):
    # What the empty-file message recommends must work.
    cfg = merge_config_file(_cfg(), _write(tmp_path / "a.yaml", "{}  # nothing to change\n"))
    assert cfg.SOLVER.BASE_LR == _cfg().SOLVER.BASE_LR


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    # "<<: *anchor" then an override is YAML's own inheritance, not a key written twice.
    from focal_det.config_check import load_yaml

    f = _write(tmp_path / "b.yaml", "A: &a {B: 1, C: 2}\nD:\n  <<: *a\n  C: 3\n")
    assert load_yaml(f)["D"] == {"B": 1, "C": 3}


def test_lowercase_keys_get_the_upper_case_key():
    with pytest.raises(ConfigError) as e:
        merge_config_list(_cfg(), ["model.retinanet.num_classes", "3"])
    msg = str(e.value)
    assert "Did you mean 'MODEL.RETINANET.NUM_CLASSES'? (config keys are upper case)" in msg


def test_lowercase_node_in_a_file(tmp_path):
    f = _write(tmp_path / "a.yaml", "model:\n  retinanet:\n    num_classes: 3\n")
    with pytest.raises(ConfigError, match="Unknown config key 'model'.*Did you mean 'MODEL'"):
        merge_config_file(_cfg(), f)
    f = _write(tmp_path / "b.yaml", "MODEL:\n  retinanet:\n    NUM_CLASSES: 3\n")
    with pytest.raises(ConfigError, match="Did you mean 'MODEL.RETINANET'"):
        merge_config_file(_cfg(), f)


def _first_guess(message):
    return message.split("Did you mean '")[1].split("'")[0]


def test_model_num_classes_suggests_the_retinanet_key_for_our_meta_arch(tmp_path):
    # On a RetinaNet, MODEL.ROI_HEADS.NUM_CLASSES would be the classic wrong fix (no effect).
    with pytest.raises(ConfigError) as e:
        merge_config_list(_cfg(), ["MODEL.NUM_CLASSES", "3"])  # detectron2's default R-CNN
    assert _first_guess(str(e.value)) == "MODEL.ROI_HEADS.NUM_CLASSES"

    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    with pytest.raises(ConfigError) as e:
        merge_config_list(cfg, ["MODEL.NUM_CLASSES", "3"])
    assert _first_guess(str(e.value)) == "MODEL.RETINANET.NUM_CLASSES"

    # In a file whose _BASE_ sets the meta-architecture (checked before anything is merged).
    _write(tmp_path / "Base.yaml", "MODEL:\n  META_ARCHITECTURE: FocalRetinaNet\n")
    f = _write(tmp_path / "a.yaml", "_BASE_: Base.yaml\nMODEL:\n  NUM_CLASSES: 3\n")
    with pytest.raises(ConfigError) as e:
        merge_config_file(_cfg(), f)
    assert _first_guess(str(e.value)) == "MODEL.RETINANET.NUM_CLASSES"


def test_a_flag_after_the_overrides_is_explained(tmp_path):
    from detectron2.engine import default_argument_parser

    from focal_det.engine import setup

    # detectron2's parser reads everything after the first KEY as overrides (REMAINDER).
    args = default_argument_parser().parse_args(
        ["--config-file", QUICK, "SOLVER.BASE_LR", "0.001", "--resume"]
    )
    assert args.opts[-1] == "--resume" and not args.resume
    with pytest.raises(ConfigError, match="'--resume' is among the KEY VALUE config overrides.*"
                                          "must come before the overrides"):  # fmt: skip
        setup(args)


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("MODEL.ROI_HEADS.NUM_CLASSES", 3,
         "MODEL.ROI_HEADS.NUM_CLASSES=3 has no effect on FocalRetinaNet.*set "
         "MODEL.RETINANET.NUM_CLASSES instead"),
        ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.3, "set MODEL.RETINANET.SCORE_THRESH_TEST"),
        ("MODEL.RPN.IN_FEATURES", ["p3"], "RPN.IN_FEATURES=.*set MODEL.RETINANET.IN_FEATURES"),
        ("MODEL.RPN.IOU_THRESHOLDS", [0.4, 0.6], "set MODEL.RETINANET.IOU_THRESHOLDS instead"),
        ("MODEL.RPN.BOUNDARY_THRESH", 0, "RetinaNet has no such setting: remove it"),
    ],
)  # fmt: skip
def test_rcnn_keys_on_a_retinanet_are_refused(key, value, expect):
    cfg = tiny_cfg()
    _set(cfg, key, value)
    with pytest.raises(ConfigError, match=expect):
        check_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"  # detectron2's RetinaNet ignores them as well
    with pytest.raises(ConfigError, match="has no effect on RetinaNet"):
        check_config(cfg)


def test_rcnn_keys_at_their_defaults_or_on_an_rcnn_pass():
    cfg = tiny_cfg()
    cfg.MODEL.RPN.IN_FEATURES = ("res4",)  # the default, written as a tuple (command line)
    check_config(cfg)
    rcnn = _cfg()
    rcnn.MODEL.ROI_HEADS.NUM_CLASSES = 3  # where it belongs
    check_config(rcnn)


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("TEST.COCO_EVAL_IMPL", "fast", "COCO_EVAL_IMPL='fast' must be one of \\('pycocotools'"),
        ("MODEL.RETINANET.PRIOR_PROB", 1.5, "PRIOR_PROB=1.5 must be in \\(0, 1\\)"),
        ("MODEL.RETINANET.PRIOR_PROB", 0.0, "PRIOR_PROB=0.0 must be in \\(0, 1\\)"),
        ("MODEL.RETINANET.IOU_THRESHOLDS", [0.5, 0.4], "IOU_THRESHOLDS=\\[0.5, 0.4\\] must be "
                                                      "increasing"),
        ("MODEL.RETINANET.IOU_LABELS", [0, 1], "IOU_LABELS=\\[0, 1\\] must hold"),
        ("SOLVER.MAX_ITER", -5, "SOLVER.MAX_ITER=-5 must be > 0"),
        ("SOLVER.STEPS", (80, 60), "SOLVER.STEPS=\\(80, 60\\) must be increasing"),
    ],
)  # fmt: skip
def test_values_that_used_to_fail_late_fail_in_check_config(key, value, expect):
    cfg = tiny_cfg()
    cfg.SOLVER.MAX_ITER = 100
    cfg.SOLVER.STEPS = (60, 80)
    check_config(cfg)
    _set(cfg, key, value)
    with pytest.raises(ConfigError, match=expect):
        check_config(cfg)


def test_late_values_stop_setup_before_any_work(tmp_path):
    from detectron2.engine import default_argument_parser

    from focal_det.engine import setup

    out = tmp_path / "out"
    for opts, expect in [
        (["TEST.COCO_EVAL_IMPL", "fast"], "COCO_EVAL_IMPL='fast'"),  # was: after training
        (["MODEL.RETINANET.PRIOR_PROB", "1.5"], "PRIOR_PROB=1.5"),  # was: math domain error
        (["MODEL.RETINANET.IOU_THRESHOLDS", "[0.5, 0.4]"], "IOU_THRESHOLDS"),  # was: bare assert
        (["SOLVER.MAX_ITER", "-5", "SOLVER.STEPS", "()"], "MAX_ITER=-5"),
        (["MODEL.ROI_HEADS.NUM_CLASSES", "3"], "set MODEL.RETINANET.NUM_CLASSES instead"),
    ]:
        args = default_argument_parser().parse_args(
            ["--config-file", QUICK, "OUTPUT_DIR", str(out)] + opts
        )
        with pytest.raises(ConfigError, match=expect):
            setup(args)
        assert not out.exists()


# ---- NUM_CLASSES against the registered datasets (issue 15, BAD 3) ------------------------------
def _classes_args(tmp_path, num_classes, train="reliability_cls_train", test="()"):
    from detectron2.engine import default_argument_parser

    return default_argument_parser().parse_args([
        "--config-file", QUICK, "OUTPUT_DIR", str(tmp_path / "out"),
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", test,
        "MODEL.RETINANET.NUM_CLASSES", str(num_classes),
    ])  # fmt: skip


def test_num_classes_too_small_or_too_large_stops_setup(tmp_path):
    import synthetic_detection

    from focal_det.engine import setup

    synthetic_detection.register("reliability_cls_train", str(tmp_path / "data"), num_images=2)
    with pytest.raises(ConfigError) as e:
        setup(_classes_args(tmp_path, 2))
    msg = str(e.value)
    assert "MODEL.RETINANET.NUM_CLASSES=2" in msg and "'reliability_cls_train'" in msg
    assert "has 3: ['red', 'green', 'blue']" in msg and "labels >= 2 would be trained" in msg
    assert "Fix: set MODEL.RETINANET.NUM_CLASSES 3" in msg
    with pytest.raises(ConfigError) as e:  # left at detectron2's 80, a test set of 3 classes
        setup(_classes_args(tmp_path, 80, test="('reliability_cls_train',)"))
    assert "COCO evaluation would fail after training" in str(e.value)
    assert "Fix: set MODEL.RETINANET.NUM_CLASSES 3" in str(e.value)
    assert not (tmp_path / "out").exists()  # before any work
    assert setup(_classes_args(tmp_path, 3)).MODEL.RETINANET.NUM_CLASSES == 3  # the fix works


def test_num_classes_read_from_a_coco_json_without_metadata(tmp_path):
    # register_coco_instances sets no thing_classes until the json is loaded: read its
    # categories (sorted by id, as load_coco_json numbers them).
    import json

    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    from focal_det.engine import setup

    gt = tmp_path / "gt.json"
    cats = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    name = "reliability_cls_json"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(gt), str(tmp_path))
    with pytest.raises(ConfigError, match=r"'reliability_cls_json' \(DATASETS.TRAIN\) has 2: "
                                          r"\['a', 'b'\]"):  # fmt: skip
        setup(_classes_args(tmp_path, 80, train=name))
    gt.write_text('{"images": [], "categ')  # truncated download
    with pytest.raises(ConfigError, match=f"{gt} of dataset 'reliability_cls_json' is not a COCO"):
        setup(_classes_args(tmp_path, 80, train=name))


# ---- every YAML read goes through the safe loader (issue 15, BAD 1) -----------------------------
def test_no_yaml_is_read_outside_the_safe_loader():
    import re

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    unsafe = re.compile(r"\.merge_from_file\(|yaml\.(safe_|unsafe_|full_)?load\(|import yaml")
    offenders = []
    for top in ("focal_det", "tools", "benchmarks", "demo.py", "train_net.py"):
        path = os.path.join(repo, top)
        files = [path] if path.endswith(".py") else [
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py")
        ]  # fmt: skip
        for f in files:
            if f.endswith(os.path.join("focal_det", "config_check.py")):
                continue  # the loader itself
            for i, line in enumerate(open(f).read().splitlines(), 1):
                if unsafe.search(line.split("#")[0]):
                    offenders.append(f"{os.path.relpath(f, repo)}:{i}: {line.strip()}")
    assert not offenders, offenders
