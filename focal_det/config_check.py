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

Use::

    cfg = get_cfg(); add_focal_config(cfg)
    merge_config_file(cfg, args.config_file)   # instead of cfg.merge_from_file
    merge_config_list(cfg, args.opts)          # instead of cfg.merge_from_list
    check_config(cfg)                          # settings that cannot work together
"""
import difflib
import math
import os

import yaml
from detectron2.config import CfgNode
from fvcore.common.config import BASE_KEY
from yacs.config import _check_and_coerce_cfg_value_type

__all__ = ["ConfigError", "check_config", "merge_config_file", "merge_config_list"]


class ConfigError(ValueError):
    """A config key, value or combination of values that cannot be used."""


def _all_keys(node, prefix=""):
    out = []
    for k, v in node.items():
        full = prefix + k
        out.append(full)
        if isinstance(v, CfgNode):
            out.extend(_all_keys(v, full + "."))
    return out


def closest_keys(full_key, cfg, n=3):
    """
    Valid keys most likely meant by ``full_key``: the same leaf name on another node (a key
    typed on the wrong node), then difflib's closest full keys, then the closest leaf under the
    same parent.
    """
    keys = _all_keys(cfg)
    leaf = full_key.split(".")[-1]
    parent = full_key.rpartition(".")[0]
    same_leaf = [k for k in keys if k.split(".")[-1] == leaf and k != full_key]
    close_full = difflib.get_close_matches(full_key, keys, n=n, cutoff=0.6)
    siblings = [k.split(".")[-1] for k in keys if k.rpartition(".")[0] == parent]
    close_leaf = [
        (parent + "." if parent else "") + s
        for s in difflib.get_close_matches(leaf, siblings, n=n, cutoff=0.5)
    ]
    out = []
    for k in same_leaf + close_full + close_leaf:
        if k not in out:
            out.append(k)
    return out[:n]


def _unknown_key_error(full_key, source, cfg):
    guesses = closest_keys(full_key, cfg)
    if guesses:
        hint = f"Did you mean '{guesses[0]}'?"
        if len(guesses) > 1:
            hint += f" (other close keys: {', '.join(guesses[1:])})"
    else:
        parent = full_key.rpartition(".")[0]
        node = cfg
        for p in parent.split(".") if parent else []:
            node = node.get(p) if isinstance(node, CfgNode) else None
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


def _check_mapping(loaded, node, cfg, source, prefix=""):
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
            raise _unknown_key_error(full, source, cfg)
        default = node[k]
        if isinstance(default, CfgNode):
            if not isinstance(v, dict):
                raise ConfigError(
                    f"Config key '{full}' {source} is a group of keys "
                    f"({sorted(default.keys())[:6]}...) but was given the value {v!r}. Set its "
                    f"sub-keys instead, e.g. '{full}.{sorted(default.keys())[0]}'."
                )
            _check_mapping(v, default, cfg, source, full + ".")
        else:
            if isinstance(v, dict):
                raise ConfigError(
                    f"Config key '{full}' {source} is a single value (default {default!r}), "
                    f"not a group, but was given the keys {sorted(v)}. Is it indented too far?"
                )
            _check_value(CfgNode._decode_cfg_value(v), default, full, source)


def _read_yaml_safe(path):
    if not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}' does not exist.")
    with open(path, "r") as f:
        try:
            loaded = yaml.safe_load(f)
        except yaml.constructor.ConstructorError as e:
            raise ConfigError(
                f"Config file '{path}' uses a YAML tag that builds Python objects ({e.problem}, "
                f"{e.problem_mark}). focal_det reads configs with yaml.safe_load only: a config "
                "file must not be able to run code. Use plain values."
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"Config file '{path}' must be a mapping of KEY: value, got a {type(loaded).__name__}."
        )
    return loaded


def check_config_file(cfg, path, _seen=None):
    """
    Check every key and value of ``path`` and of its ``_BASE_`` chain against ``cfg``'s
    defaults, reading YAML with ``yaml.safe_load``. Raises :class:`ConfigError`.
    """
    seen = set() if _seen is None else _seen
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"Config file '{path}' includes itself through _BASE_.")
    seen.add(real)
    loaded = _read_yaml_safe(path)
    base = loaded.get(BASE_KEY)
    if base is not None:
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
            check_config_file(cfg, base_path, seen)
    _check_mapping(loaded, cfg, cfg, f"in config file '{path}'")


def merge_config_file(cfg, path):
    """Check ``path`` (see :func:`check_config_file`), then merge it with detectron2, safely."""
    check_config_file(cfg, path)
    cfg.merge_from_file(path, allow_unsafe=False)
    return cfg


def merge_config_list(cfg, opts, source="on the command line"):
    """
    Check then merge ``KEY VALUE`` pairs (``args.opts``) into ``cfg``. Values are parsed as
    detectron2 parses them (``ast.literal_eval``, else a string).
    """
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(
            f"Config overrides {source} must be KEY VALUE pairs; '{opts[-1]}' has no value "
            f"(got {len(opts)} items: {opts})."
        )
    for full_key, raw in zip(opts[0::2], opts[1::2]):
        if cfg.key_is_deprecated(full_key):
            continue
        if cfg.key_is_renamed(full_key):
            cfg.raise_key_rename_error(full_key)
        node = cfg
        parts = full_key.split(".")
        for i, p in enumerate(parts):
            if not isinstance(node, CfgNode) or p not in node:
                raise _unknown_key_error(full_key, source, cfg)
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
def _registered(registry):
    return sorted(k for k, _ in registry)


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
    counts = [len(s) * len(r) for s, r in zip(sizes, ratios)]
    if len(set(counts)) > 1:
        problems.append(
            f"The anchor config gives {dict(zip(levels, counts))} cell anchors per level "
            f"(sizes x aspect ratios), but the RetinaNet head shares its convs across levels and "
            f"predicts the same number A of anchors everywhere: use the same number of "
            f"MODEL.ANCHOR_GENERATOR.SIZES x ASPECT_RATIOS on every level."
        )
    return problems


def check_config(cfg, world_size=None):
    """
    Reject settings that cannot work, before any model or data is built. Raises
    :class:`ConfigError` listing every problem found, each with the key and the reason.
    """
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    from .losses.build import FOCAL_LOSS_REGISTRY
    from .losses.modules import OHEM_BOX_LOSS, OHEM_NMS_GROUPS, OHEM_NORMALIZER
    from .modeling.heads import FOCAL_HEAD_REGISTRY

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
        if value not in registry:
            close = difflib.get_close_matches(value, _registered(registry), n=1, cutoff=0.5)
            did = f" Did you mean {close[0]!r}?" if close else ""
            p.append(f"{key}={value!r} is not registered.{did} Registered: "
                     f"{_registered(registry)}")

    focal = cfg.MODEL.FOCAL
    rn = cfg.MODEL.RETINANET
    if cfg.MODEL.META_ARCHITECTURE in ("FocalRetinaNet", "RetinaNet"):
        p += _anchor_problems(cfg)
    if rn.NUM_CLASSES < 1:
        p.append(f"MODEL.RETINANET.NUM_CLASSES={rn.NUM_CLASSES} must be >= 1.")
    if not rn.FOCAL_LOSS_GAMMA >= 0:
        p.append(f"MODEL.RETINANET.FOCAL_LOSS_GAMMA={rn.FOCAL_LOSS_GAMMA} must be >= 0 "
                 "(0 = cross-entropy; the paper uses 2).")
    if rn.FOCAL_LOSS_ALPHA > 1:
        p.append(f"MODEL.RETINANET.FOCAL_LOSS_ALPHA={rn.FOCAL_LOSS_ALPHA} must be in [0, 1] "
                 "(or negative to disable alpha-balancing; the paper uses 0.25).")
    if not focal.LOSS.STAR_GAMMA > 0:
        p.append(f"MODEL.FOCAL.LOSS.STAR_GAMMA={focal.LOSS.STAR_GAMMA} must be > 0: FL* divides "
                 "by gamma (Appendix A; the paper uses 2).")
    if not 0 <= focal.LOSS.NORMALIZER_MOMENTUM < 1:
        p.append(f"MODEL.FOCAL.LOSS.NORMALIZER_MOMENTUM={focal.LOSS.NORMALIZER_MOMENTUM} must be "
                 "in [0, 1) (0 = this batch's count as in the paper, 0.9 = detectron2's EMA).")
    if focal.OHEM.BATCH_SIZE_PER_IMAGE <= 0:
        p.append(f"MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE={focal.OHEM.BATCH_SIZE_PER_IMAGE} must "
                 "be > 0 (anchors kept per image; the paper uses 128/256/512).")
    frac = focal.OHEM.POSITIVE_FRACTION
    if frac != -1 and not 0 <= frac <= 1:
        p.append(f"MODEL.FOCAL.OHEM.POSITIVE_FRACTION={frac} must be in [0, 1], or -1 for no "
                 "ratio (0.25 = the paper's OHEM 1:3).")
    if not 0 < focal.OHEM.NMS_THRESH <= 1:
        p.append(f"MODEL.FOCAL.OHEM.NMS_THRESH={focal.OHEM.NMS_THRESH} must be in (0, 1].")
    for key, allowed in (("NMS_GROUPS", OHEM_NMS_GROUPS), ("BOX_LOSS", OHEM_BOX_LOSS),
                         ("NORMALIZER", OHEM_NORMALIZER)):  # fmt: skip
        if focal.OHEM[key] not in allowed:
            p.append(f"MODEL.FOCAL.OHEM.{key}={focal.OHEM[key]!r} must be one of {allowed}.")
    lq = focal.MATCHER.LOW_QUALITY_MATCHES
    if lq not in ("detectron2", "detectron", "none"):
        p.append(f"MODEL.FOCAL.MATCHER.LOW_QUALITY_MATCHES={lq!r} must be one of "
                 "'detectron2', 'detectron', 'none'.")

    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights:
        local = weights.split("?", 1)[0]  # "...?sha256=<hex>" / "?matching_heuristics=True"
        if not os.path.isfile(os.path.expanduser(local)):
            looked = os.path.abspath(os.path.expanduser(local))
            p.append(f"MODEL.WEIGHTS={weights!r}: no such file (looked for {looked}). Give a "
                     "local .pth/.pkl, a URL (https://, detectron2://), or '' to start from "
                     "random weights.")
    if cfg.TEST.get("COCO_EVAL_CHUNK_IMAGES", 0) < 0:
        p.append(f"TEST.COCO_EVAL_CHUNK_IMAGES={cfg.TEST.COCO_EVAL_CHUNK_IMAGES} must be >= 0 "
                 "(0 = detectron2's COCOEvaluator, N = streaming evaluation N images at a time).")

    s = cfg.SOLVER
    if s.IMS_PER_BATCH <= 0:
        p.append(f"SOLVER.IMS_PER_BATCH={s.IMS_PER_BATCH} must be > 0.")
    elif world_size and s.IMS_PER_BATCH % world_size:
        p.append(f"SOLVER.IMS_PER_BATCH={s.IMS_PER_BATCH} must be divisible by the number of "
                 f"processes ({world_size}).")
    if not (math.isfinite(s.BASE_LR) and s.BASE_LR > 0):
        p.append(f"SOLVER.BASE_LR={s.BASE_LR} must be a finite number > 0 (linear scaling "
                 "rule: the paper's 0.01 is for 16 images per batch).")
    if s.MAX_ITER in tuple(s.STEPS):
        p.append(f"SOLVER.STEPS={tuple(s.STEPS)} contains SOLVER.MAX_ITER={s.MAX_ITER}: an LR "
                 "step must come before the last iteration (fvcore rejects it at train start).")
    if s.CHECKPOINT_PERIOD <= 0:
        p.append(f"SOLVER.CHECKPOINT_PERIOD={s.CHECKPOINT_PERIOD} must be > 0.")
    if p:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(p))
