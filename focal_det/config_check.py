"""
Config checking: a typo'd key, a wrong-typed value or a combination of settings that cannot
work stops the run *before any work*, with a message that names the key, where it came from
(the YAML file or the command line) and the closest valid key.

detectron2's ``CfgNode.merge_from_file``/``merge_from_list`` raise ``KeyError: 'Non-existent
config key: MODEL.RETINANET.FOCAL_LOSS_GAMA'`` or a type ``ValueError`` deep inside yacs, without
the file of a ``_BASE_`` chain or a suggestion, and detectron2 reads YAML with
``yaml.unsafe_load`` as a fallback (``allow_unsafe=True`` by default), which can run code from a
config file. Here every YAML file of the chain is read with ``yaml.safe_load`` and checked
against the defaults before anything is merged; the merge itself is detectron2's (so config
versioning still works) with ``allow_unsafe=False``.

Every YAML focal_det reads (configs, the ``config.yaml`` saved next to a checkpoint, tools,
benchmarks) goes through :func:`load_yaml`: ``yaml.safe_load`` semantics, plus a refusal of keys
written twice in one mapping (PyYAML keeps the last one silently) and of empty files.

Use::

    cfg = get_cfg(); add_focal_config(cfg)
    merge_config_file(cfg, args.config_file)   # instead of cfg.merge_from_file
    merge_config_list(cfg, args.opts)          # instead of cfg.merge_from_list
    check_config(cfg)                          # settings that cannot work together
    check_dataset_classes(cfg)                 # NUM_CLASSES against the registered datasets
"""
import difflib
import json
import math
import os

import yaml
from detectron2.config import CfgNode
from fvcore.common.config import BASE_KEY
from yacs.config import _check_and_coerce_cfg_value_type

from .evaluation.coco import check_coco_eval_impl
from .losses.build import FOCAL_LOSS_REGISTRY
from .losses.modules import (
    check_alpha,
    check_gamma,
    check_impl,
    check_ohem_option,
    check_star_gamma,
)
from .modeling.heads import FOCAL_HEAD_REGISTRY, check_anchors_per_level
from .modeling.matcher import check_iou_thresholds, check_low_quality_matches
from .modeling.meta_arch import check_normalizer_momentum
from .modeling.test_time_augmentation import check_tta_min_sizes
from .utils.registry import UnregisteredNameError, get_registered

__all__ = [
    "ConfigError",
    "check_config",
    "check_dataset_classes",
    "flatten_keys",
    "load_yaml",
    "merge_config_file",
    "merge_config_list",
    "merge_detectron2_zoo_config",
]

# Meta-architectures that read MODEL.RETINANET (ours and detectron2's): MODEL.ROI_HEADS / RPN do
# nothing for them, and a "did you mean" prefers their nodes.
RETINANET_META_ARCHS = ("FocalRetinaNet", "RetinaNet")
_RETINANET_NODES = ("MODEL.RETINANET.", "MODEL.FOCAL.")


class ConfigError(ValueError):
    """A config key, value or combination of values that cannot be used."""


# ---------------------------------------------------------------------------------------------
# The one YAML loader.
# ---------------------------------------------------------------------------------------------
class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only) that refuses a key written twice in one mapping."""


def _construct_mapping_once(loader, node, deep=False):
    lines = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in lines:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"duplicate key {key!r} (lines {lines[key]} and {line}): YAML would keep only "
                "the last one, silently; keep one of them",
                key_node.start_mark,
            )  # fmt: skip
        lines[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictSafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_once
)


def load_yaml(path=None, *, text=None, source=None):
    """
    Read a YAML file (or ``text``) as plain data, the one way focal_det reads YAML.

    Like ``yaml.safe_load`` (no tag can build a Python object, so a file cannot run code), and
    also refuses a key written twice in one mapping and an empty (or comment-only) document.

    Returns:
        dict: the mapping at the top of the document.

    Raises:
        ConfigError: naming the file and what is wrong with it.
    """
    what = source or (f"Config file '{path}'" if path is not None else "YAML text")
    if text is None:
        if not os.path.isfile(path):
            raise ConfigError(f"{what} does not exist.")
        with open(path, "r") as f:
            text = f.read()
    try:
        loaded = yaml.load(text, Loader=_StrictSafeLoader)
    except yaml.constructor.ConstructorError as e:
        if e.problem and e.problem.startswith("duplicate key"):
            raise ConfigError(f"{what} has a {e.problem} ({e.problem_mark}).") from None
        raise ConfigError(
            f"{what} uses a YAML tag that builds Python objects ({e.problem}, "
            f"{e.problem_mark}). focal_det reads configs with yaml.safe_load only: a config "
            "file must not be able to run code. Use plain values."
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {e}") from None
    if loaded is None:
        raise ConfigError(
            f"{what} is empty (or holds only comments): there is nothing to merge. Check that "
            "it is the file you meant (a truncated copy?); write `{}` for a deliberately empty "
            "config."
        )
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{what} must be a mapping of KEY: value, got a {type(loaded).__name__}."
        )
    return loaded


def _all_keys(node, prefix=""):
    out = []
    for k, v in node.items():
        full = prefix + k
        out.append(full)
        if isinstance(v, CfgNode):
            out.extend(_all_keys(v, full + "."))
    return out


def closest_keys(full_key, cfg, n=3, meta_arch=None):
    """
    Valid keys most likely meant by ``full_key``: the key in other letter case, the same leaf
    name on another node (a key typed on the wrong node; RetinaNet's nodes first when
    ``meta_arch`` is a RetinaNet), then difflib's closest full keys, then the closest leaf under
    the same parent. Comparisons ignore case: config keys are upper case.
    """
    keys = _all_keys(cfg)
    by_upper = {k.upper(): k for k in keys}
    key_up = full_key.upper()
    leaf = key_up.split(".")[-1]
    parent = key_up.rpartition(".")[0]
    same_case = [by_upper[key_up]] if key_up in by_upper and by_upper[key_up] != full_key else []
    same_leaf = [k for k in keys if k.split(".")[-1] == leaf and k.upper() != key_up]
    if meta_arch in RETINANET_META_ARCHS:  # stable: otherwise detectron2's node order
        same_leaf.sort(key=lambda k: not k.startswith(_RETINANET_NODES))
    close_full = [
        by_upper[k] for k in difflib.get_close_matches(key_up, list(by_upper), n=n, cutoff=0.6)
    ]
    siblings = [k for k in keys if k.rpartition(".")[0].upper() == parent]
    sibling_leaves = {k.split(".")[-1]: k for k in siblings}
    close_leaf = [
        sibling_leaves[s] for s in difflib.get_close_matches(leaf, list(sibling_leaves), n=n,
                                                             cutoff=0.5)
    ]  # fmt: skip
    out = []
    for k in same_case + same_leaf + close_full + close_leaf:
        if k not in out:
            out.append(k)
    return out[:n]


def _unknown_key_error(full_key, source, cfg, meta_arch=None):
    guesses = closest_keys(full_key, cfg, meta_arch=meta_arch)
    if guesses:
        hint = f"Did you mean '{guesses[0]}'?"
        if guesses[0].upper() == full_key.upper():
            hint += " (config keys are upper case)"
        if len(guesses) > 1:
            hint += f" (other close keys: {', '.join(guesses[1:])})"
    else:
        parent = full_key.rpartition(".")[0]
        node = cfg
        for p in parent.split(".") if parent else []:
            node = node.get(p.upper()) if isinstance(node, CfgNode) else None
        valid = sorted(node.keys()) if isinstance(node, CfgNode) else sorted(cfg.keys())
        hint = f"No close match; valid keys under '{parent or '<root>'}': {valid}"
    return ConfigError(f"Unknown config key '{full_key}' {source}. {hint}")


def _type_name(v):
    return type(v).__name__


def _check_value(value, default, full_key, source):
    """detectron2's (yacs') type rule, with a message that says where and how to fix it."""
    try:
        return _check_and_coerce_cfg_value_type(value, default, full_key.split(".")[-1], full_key)
    except ValueError:
        fix = ""
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            fix = f" Write it as a float, e.g. {float(value)!r}."
        elif isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
            fix = f" Write it as a list, e.g. [{value!r}]."
        raise ConfigError(
            f"Config key '{full_key}' {source} expects type {_type_name(default)} (default: "
            f"{default!r}) but got {_type_name(value)} {value!r}.{fix}"
        ) from None


def _check_mapping(loaded, node, cfg, source, prefix="", meta_arch=None):
    for k, v in loaded.items():
        full = prefix + k
        if prefix == "" and k == BASE_KEY:
            continue
        if cfg.key_is_deprecated(full):
            continue
        if cfg.key_is_renamed(full):
            cfg.raise_key_rename_error(full)
        if not isinstance(k, str):
            raise ConfigError(f"Config key {k!r} (under '{prefix}') {source} is not a string.")
        if k not in node:
            if node.is_new_allowed():
                continue
            raise _unknown_key_error(full, source, cfg, meta_arch)
        default = node[k]
        if isinstance(default, CfgNode):
            if not isinstance(v, dict):
                raise ConfigError(
                    f"Config key '{full}' {source} is a group of keys "
                    f"({sorted(default.keys())[:6]}...) but was given the value {v!r}. Set its "
                    f"sub-keys instead, e.g. '{full}.{sorted(default.keys())[0]}'."
                )
            _check_mapping(v, default, cfg, source, full + ".", meta_arch)
        else:
            if isinstance(v, dict):
                raise ConfigError(
                    f"Config key '{full}' {source} is a single value (default {default!r}), "
                    f"not a group, but was given the keys {sorted(v)}. Is it indented too far?"
                )
            _check_value(CfgNode._decode_cfg_value(v), default, full, source)


def _read_chain(path, seen):
    """[(path, loaded mapping)] of ``path``'s ``_BASE_`` chain, the deepest base first."""
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"Config file '{path}' includes itself through _BASE_.")
    seen.add(real)
    loaded = load_yaml(path)
    chain = []
    if BASE_KEY in loaded:
        base = loaded[BASE_KEY]
        if base is None or base == "":
            raise ConfigError(
                f"_BASE_ in '{path}' has no value: give the base config file (a path relative "
                "to this file) or remove the line."
            )
        if not isinstance(base, str):
            raise ConfigError(f"_BASE_ in '{path}' must be a file name, got {base!r}.")
        base_path = os.path.expanduser(base)
        if not os.path.isabs(base_path) and not base_path.startswith(("http://", "https://")):
            base_path = os.path.join(os.path.dirname(path), base_path)
        if not base_path.startswith(("http://", "https://")):
            if not os.path.isfile(base_path):
                raise ConfigError(
                    f"_BASE_ '{base}' of config file '{path}' not found (looked for {base_path})."
                )
            chain = _read_chain(base_path, seen)
    return chain + [(path, loaded)]


def check_config_file(cfg, path):
    """
    Check every key and value of ``path`` and of its ``_BASE_`` chain against ``cfg``'s
    defaults, reading YAML with :func:`load_yaml`. Raises :class:`ConfigError`.
    """
    chain = _read_chain(path, set())
    meta_arch = cfg.MODEL.META_ARCHITECTURE
    for _, loaded in chain:  # the one the chain ends with ranks the "did you mean"s
        model = loaded.get("MODEL")
        if isinstance(model, dict) and isinstance(model.get("META_ARCHITECTURE"), str):
            meta_arch = model["META_ARCHITECTURE"]
    for file, loaded in chain:
        _check_mapping(loaded, cfg, cfg, f"in config file '{file}'", meta_arch=meta_arch)


def flatten_keys(mapping, prefix=""):
    """``{"SOLVER": {"BASE_LR": 0.01}}`` -> ``{"SOLVER.BASE_LR": 0.01}`` (nested dicts only)."""
    out = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            out.update(flatten_keys(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def merge_config_file(cfg, path):
    """Check ``path`` (see :func:`check_config_file`), then merge it with detectron2, safely."""
    check_config_file(cfg, path)
    cfg.merge_from_file(path, allow_unsafe=False)
    return cfg


def merge_detectron2_zoo_config(cfg, name):
    """
    Merge detectron2's own model-zoo config ``name`` (e.g.
    "COCO-Detection/retinanet_R_50_FPN_1x.yaml") into ``cfg``: the benchmarks' reference.

    detectron2 writes its RetinaNet anchor sizes as ``!!python/object/apply:eval``, which no
    safe loader reads; only the files inside the installed detectron2 package, as trusted as its
    code, are read that way here (never a config a user passes).
    """
    from detectron2 import model_zoo

    path = os.path.realpath(model_zoo.get_config_file(name))
    package = os.path.realpath(os.path.dirname(model_zoo.__file__))
    if not path.startswith(package + os.sep):
        raise ConfigError(f"{path} is not a config of the installed detectron2 package.")
    cfg.merge_from_file(path, allow_unsafe=True)
    return cfg


def merge_config_list(cfg, opts, source="on the command line"):
    """
    Check then merge ``KEY VALUE`` pairs (``args.opts``) into ``cfg``. Values are parsed as
    detectron2 parses them (``ast.literal_eval``, else a string).
    """
    opts = list(opts or [])
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise ConfigError(
            f"'{flags[0]}' is among the KEY VALUE config overrides {source}: command-line flags "
            f"(--resume, --eval-only, --num-gpus, ...) must come before the overrides, since "
            f"everything from the first KEY on is read as KEY VALUE pairs. Write e.g. "
            f"`train_net.py --config-file CFG {flags[0]} KEY VALUE ...`."
        )
    if len(opts) % 2:
        raise ConfigError(
            f"Config overrides {source} must be KEY VALUE pairs; '{opts[-1]}' has no value "
            f"(got {len(opts)} items: {opts})."
        )
    pairs = dict(zip(opts[0::2], opts[1::2]))
    meta_arch = pairs.get("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE)
    for full_key, raw in zip(opts[0::2], opts[1::2]):
        if cfg.key_is_deprecated(full_key):
            continue
        if cfg.key_is_renamed(full_key):
            cfg.raise_key_rename_error(full_key)
        node = cfg
        parts = full_key.split(".")
        for i, p in enumerate(parts):
            if not isinstance(node, CfgNode) or p not in node:
                raise _unknown_key_error(full_key, source, cfg, meta_arch)
            if i < len(parts) - 1:
                node = node[p]
        default = node[parts[-1]]
        if isinstance(default, CfgNode):
            raise ConfigError(
                f"Config key '{full_key}' {source} is a group of keys; override one of its "
                f"sub-keys ({sorted(default.keys())}) instead."
            )
        _check_value(CfgNode._decode_cfg_value(raw), default, full_key, source)
    cfg.merge_from_list(opts)
    return cfg


# ---------------------------------------------------------------------------------------------
# Settings that cannot work together.
# ---------------------------------------------------------------------------------------------
def _anchor_problems(cfg):
    ag = cfg.MODEL.ANCHOR_GENERATOR
    levels = list(cfg.MODEL.RETINANET.IN_FEATURES)
    n = len(levels)
    sizes, ratios = list(ag.SIZES), list(ag.ASPECT_RATIOS)
    problems = []
    for name, v in (("SIZES", sizes), ("ASPECT_RATIOS", ratios)):
        if not v or not all(isinstance(x, (list, tuple)) and len(x) > 0 for x in v):
            problems.append(
                f"MODEL.ANCHOR_GENERATOR.{name}={v!r} must be a list of non-empty lists "
                f"(one per level, or one for all levels)."
            )
        elif len(v) not in (1, n):
            problems.append(
                f"MODEL.ANCHOR_GENERATOR.{name} has {len(v)} lists but there are {n} feature "
                f"levels ({levels}): give 1 list (shared) or {n}."
            )
    if problems:
        return problems
    sizes = sizes * n if len(sizes) == 1 else sizes
    ratios = ratios * n if len(ratios) == 1 else ratios
    counts = {lv: len(s) * len(r) for lv, s, r in zip(levels, sizes, ratios)}
    return _problems(check_anchors_per_level, counts)


def _problems(check, *args):
    """[its message] if ``check(*args)`` raises a config error, else []."""
    try:
        check(*args)
    except (UnregisteredNameError, ValueError, ImportError) as e:
        return [str(e)]
    return []


# What a MODEL.ROI_HEADS / MODEL.RPN key of detectron2's R-CNNs is called on a RetinaNet.
_RCNN_TO_RETINANET = {
    "ROI_HEADS.NUM_CLASSES": "MODEL.RETINANET.NUM_CLASSES",
    "ROI_HEADS.SCORE_THRESH_TEST": "MODEL.RETINANET.SCORE_THRESH_TEST",
    "ROI_HEADS.NMS_THRESH_TEST": "MODEL.RETINANET.NMS_THRESH_TEST",
    "ROI_HEADS.IOU_THRESHOLDS": "MODEL.RETINANET.IOU_THRESHOLDS",
    "ROI_HEADS.IOU_LABELS": "MODEL.RETINANET.IOU_LABELS",
    "ROI_HEADS.IN_FEATURES": "MODEL.RETINANET.IN_FEATURES",
    "ROI_HEADS.BATCH_SIZE_PER_IMAGE": "MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE (OHEM only)",
    "ROI_HEADS.POSITIVE_FRACTION": "MODEL.FOCAL.OHEM.POSITIVE_FRACTION (OHEM only)",
    "ROI_HEADS.NAME": "MODEL.FOCAL.HEAD_NAME",
    "RPN.HEAD_NAME": "MODEL.FOCAL.HEAD_NAME",
    "RPN.IN_FEATURES": "MODEL.RETINANET.IN_FEATURES",
    "RPN.IOU_THRESHOLDS": "MODEL.RETINANET.IOU_THRESHOLDS",
    "RPN.IOU_LABELS": "MODEL.RETINANET.IOU_LABELS",
    "RPN.BBOX_REG_LOSS_TYPE": "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
    "RPN.BBOX_REG_WEIGHTS": "MODEL.RETINANET.BBOX_REG_WEIGHTS",
    "RPN.SMOOTH_L1_BETA": "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA",
    "RPN.NMS_THRESH": "MODEL.RETINANET.NMS_THRESH_TEST",
    "RPN.PRE_NMS_TOPK_TEST": "MODEL.RETINANET.TOPK_CANDIDATES_TEST",
    "RPN.POST_NMS_TOPK_TEST": "TEST.DETECTIONS_PER_IMAGE",
    "RPN.BATCH_SIZE_PER_IMAGE": "MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE (OHEM only)",
    "RPN.POSITIVE_FRACTION": "MODEL.FOCAL.OHEM.POSITIVE_FRACTION (OHEM only)",
}


def _same_value(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # YAML lists, CLI tuples
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _rcnn_keys_problems(cfg):
    """MODEL.ROI_HEADS / MODEL.RPN keys set away from detectron2's defaults on a RetinaNet."""
    from detectron2.config import get_cfg

    defaults = get_cfg().MODEL
    p = []
    for node in ("ROI_HEADS", "RPN"):
        for k, v in cfg.MODEL[node].items():
            if k in defaults[node] and not _same_value(v, defaults[node][k]):
                use = _RCNN_TO_RETINANET.get(f"{node}.{k}")
                fix = f"set {use} instead" if use else "RetinaNet has no such setting: remove it"
                p.append(
                    f"MODEL.{node}.{k}={v!r} has no effect on {cfg.MODEL.META_ARCHITECTURE} (it "
                    f"configures detectron2's R-CNN {'box head' if node == 'ROI_HEADS' else 'RPN'}"
                    f"): {fix}."
                )
    return p


def check_config(cfg, world_size=None):
    """
    Reject settings that cannot work, before any model or data is built. Raises
    :class:`ConfigError` listing every problem found, each with the key and the reason.

    The rules of values that a module's constructor also needs are that module's own check
    functions (the constructors call the same ones): every loss's keys are checked, whichever
    loss is selected, as a typo in an unused node is still a typo.
    """
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    p = []
    for key, registry in (
        ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY),
        ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY),
        ("MODEL.FOCAL.HEAD_NAME", FOCAL_HEAD_REGISTRY),
        ("MODEL.FOCAL.LOSS.NAME", FOCAL_LOSS_REGISTRY),
    ):
        value = cfg
        for part in key.split("."):
            value = value[part]
        p += _problems(get_registered, registry, key, value)

    focal = cfg.MODEL.FOCAL
    rn = cfg.MODEL.RETINANET
    if cfg.MODEL.META_ARCHITECTURE in RETINANET_META_ARCHS:
        p += _anchor_problems(cfg)
        # An error, not a warning: ROI_HEADS.NUM_CLASSES 3 would silently train 80 classes.
        p += _rcnn_keys_problems(cfg)
    if rn.NUM_CLASSES < 1:
        p.append(f"MODEL.RETINANET.NUM_CLASSES={rn.NUM_CLASSES} must be >= 1.")
    if not 0 < rn.PRIOR_PROB < 1:
        p.append(f"MODEL.RETINANET.PRIOR_PROB={rn.PRIOR_PROB} must be in (0, 1): the head's "
                 "bias starts at -log((1 - pi) / pi) (the paper uses pi = 0.01).")
    p += _problems(check_iou_thresholds, rn.IOU_THRESHOLDS, rn.IOU_LABELS)
    p += _problems(check_gamma, rn.FOCAL_LOSS_GAMMA)
    p += _problems(check_alpha, rn.FOCAL_LOSS_ALPHA)
    p += _problems(check_star_gamma, focal.LOSS.STAR_GAMMA)
    p += _problems(check_impl, focal.LOSS.IMPL)
    p += _problems(check_normalizer_momentum, focal.LOSS.NORMALIZER_MOMENTUM)
    for key in ("BATCH_SIZE_PER_IMAGE", "POSITIVE_FRACTION", "NMS_THRESH", "NMS_GROUPS",
                "BOX_LOSS", "NORMALIZER"):  # fmt: skip
        p += _problems(check_ohem_option, key, focal.OHEM[key])
    if rn.NORM == "GN" and cfg.MODEL.FPN.OUT_CHANNELS % 32:
        p.append(f"MODEL.RETINANET.NORM='GN' normalises the head in detectron2's 32 groups: "
                 f"MODEL.FPN.OUT_CHANNELS={cfg.MODEL.FPN.OUT_CHANNELS} must be a multiple of 32.")
    p += _problems(check_low_quality_matches, focal.MATCHER.LOW_QUALITY_MATCHES)

    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights:
        local = weights.split("?", 1)[0]  # "...?sha256=<hex>" / "?matching_heuristics=True"
        if not os.path.isfile(os.path.expanduser(local)):
            looked = os.path.abspath(os.path.expanduser(local))
            p.append(f"MODEL.WEIGHTS={weights!r}: no such file (looked for {looked}). Give a "
                     "local .pth/.pkl, a URL (https://, detectron2://), or '' to start from "
                     "random weights.")
    # The evaluator would say so too, but only when it is built: after training.
    p += _problems(check_coco_eval_impl, cfg.TEST.get("COCO_EVAL_IMPL", "pycocotools"),
                   cfg.TEST.DETECTIONS_PER_IMAGE)  # fmt: skip
    if cfg.TEST.get("COCO_EVAL_CHUNK_IMAGES", 0) < 0:
        p.append(f"TEST.COCO_EVAL_CHUNK_IMAGES={cfg.TEST.COCO_EVAL_CHUNK_IMAGES} must be >= 0 "
                 "(0 = detectron2's COCOEvaluator, N = streaming evaluation N images at a time).")
    if cfg.TEST.AUG.ENABLED:
        p += _problems(check_tta_min_sizes, cfg.TEST.AUG.MIN_SIZES, cfg.INPUT.MIN_SIZE_TEST)

    s = cfg.SOLVER
    if s.IMS_PER_BATCH <= 0:
        p.append(f"SOLVER.IMS_PER_BATCH={s.IMS_PER_BATCH} must be > 0.")
    elif world_size and s.IMS_PER_BATCH % world_size:
        p.append(f"SOLVER.IMS_PER_BATCH={s.IMS_PER_BATCH} must be divisible by the number of "
                 f"processes ({world_size}).")
    if not (math.isfinite(s.BASE_LR) and s.BASE_LR > 0):
        p.append(f"SOLVER.BASE_LR={s.BASE_LR} must be a finite number > 0 (linear scaling "
                 "rule: the paper's 0.01 is for 16 images per batch).")
    if s.MAX_ITER <= 0:
        p.append(f"SOLVER.MAX_ITER={s.MAX_ITER} must be > 0 (the number of training "
                 "iterations; the paper trains 90k iterations of 16 images).")
    if list(s.STEPS) != sorted(set(s.STEPS)):
        p.append(f"SOLVER.STEPS={tuple(s.STEPS)} must be increasing iterations, without "
                 "repeats (the paper: (60000, 80000)).")
    if s.MAX_ITER in tuple(s.STEPS):
        p.append(f"SOLVER.STEPS={tuple(s.STEPS)} contains SOLVER.MAX_ITER={s.MAX_ITER}: an LR "
                 "step must come before the last iteration (fvcore rejects it at train start).")
    if s.CHECKPOINT_PERIOD <= 0:
        p.append(f"SOLVER.CHECKPOINT_PERIOD={s.CHECKPOINT_PERIOD} must be > 0.")
    if p:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(p))


# ---------------------------------------------------------------------------------------------
# The config against the registered datasets.
# ---------------------------------------------------------------------------------------------
def _dataset_classes(name):
    """``thing_classes`` of a registered dataset, from its metadata or its COCO json; or None."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes", None)
    if classes is not None:
        return list(classes)
    json_file = meta.get("json_file", None)
    if not json_file or not os.path.isfile(json_file):
        return None  # unknown until loaded; missing files get their own message
    with open(json_file) as f:
        try:
            cats = json.load(f).get("categories")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(
                f"Annotation file {json_file} of dataset '{name}' is not a COCO json ({e}): a "
                "truncated download or another file? Download it again."
            ) from None
    if not cats:
        return None
    # load_coco_json's order: contiguous ids follow the sorted category ids.
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def check_dataset_classes(cfg):
    """
    ``MODEL.RETINANET.NUM_CLASSES`` must equal the number of ``thing_classes`` of every
    registered dataset of ``DATASETS.TRAIN`` and ``DATASETS.TEST``, checked before anything is
    built. Too small: labels >= NUM_CLASSES are trained as background or as other classes; too
    large: the whole schedule trains, then COCO evaluation fails on a class id the dataset
    lacks. Datasets not (yet) registered or without known classes are not checked.

    Raises:
        ConfigError: naming the datasets, their classes and the value to set.
    """
    from detectron2.data import DatasetCatalog

    k = cfg.MODEL.RETINANET.NUM_CLASSES
    found = {}
    for split in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[split]:
            if name in DatasetCatalog.keys():
                classes = _dataset_classes(name)
                if classes is not None:
                    found[name] = (split, classes)
    wrong = {n: sc for n, sc in found.items() if len(sc[1]) != k}
    if not wrong:
        return
    counts = sorted({len(c) for _, c in found.values()})
    listed = "; ".join(
        f"'{n}' (DATASETS.{split}) has {len(c)}: {c[:8]}{' ...' if len(c) > 8 else ''}"
        for n, (split, c) in wrong.items()
    )
    if len(counts) > 1:
        fix = (f"the datasets disagree ({counts} classes): train and test on datasets with the "
               "same classes, then set MODEL.RETINANET.NUM_CLASSES to that number")
    else:
        fix = f"set MODEL.RETINANET.NUM_CLASSES {counts[0]}"
    effect = (
        f"labels >= {k} would be trained as background or as other classes"
        if k < max(counts)
        else f"the head would predict {k} classes and COCO evaluation would fail after training "
        "on a class id the dataset does not have"
    )
    raise ConfigError(
        f"MODEL.RETINANET.NUM_CLASSES={k} does not match the dataset classes: {listed}. As "
        f"configured, {effect}. Fix: {fix}."
    )
