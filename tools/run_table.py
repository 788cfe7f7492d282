#!/usr/bin/env python
"""
Run every config of one of the paper's tables and write our AP / AP50 / AP75 next to the paper's.

    python tools/run_table.py --table 1b                   # paper scale: configs/table1b/*.yaml
    python tools/run_table.py --table 1b --print-commands  # train_net.py commands, for a cluster
    python tools/run_table.py --table 1b --collect-only    # only (re)write the table from outputs
    python tools/run_table.py --table 1a --scale demo --iters 300 --seeds 0 1

Rows are the YAML files of ``configs/table<T>/``. Each file's *settings* (alpha, gamma, anchors,
OHEM batch/NMS, depth/scale, FL* gamma/beta, ...) are read from the merged config and matched to
the paper's row in ``focal_det.paper_tables``; a config that matches no row of the paper is an
error, so the table is also a check of the configs.

``--scale paper`` runs ``train_net.py --config-file configs/table<T>/<row>.yaml``.
``--scale demo`` maps the row onto the demo (``--demo-config``: its dataset, MobileNetV2-FPN
backbone, input size and schedule) and changes only what the table varies: the loss keys
(``MODEL.FOCAL.LOSS.*``, ``MODEL.FOCAL.OHEM.*``, ``MODEL.RETINANET.FOCAL_LOSS_{ALPHA,GAMMA}``),
and for Table 1c the number of anchor scales per octave / aspect ratios (on the demo's own base
anchor sizes), for Table 1e the input scale (relative to the paper's 600 px). Backbone depth has
no demo counterpart (1d's ResNet-101 becomes MobileNetV2; 1e's depth-101 rows and Table 2 are not
mapped). Every row gets the same schedule (``--iters``, steps scaled as 60k/80k of 90k).

Each run writes to ``<output-root>/<scale>/<config-stem>__<hash>/seed<S>/`` (the hash covers the
full command, so a changed schedule or option never reuses an old result). A run is finished when
its ``log.txt`` holds the COCO "copypaste" results printed after ``model_final.pth`` was saved;
finished rows are not rerun (resumable). A run that fails (e.g. diverges: non-finite loss) is
recorded in ``run_status.json`` and shown as failed; ``--retry-failed`` runs it again. A row whose
merged config equals a finished run of another row (same scale, same seed) reuses that run: at
demo scale, Table 1d's FL row is Table 1b's gamma-2 row and Table 1e's 600 px row is the demo
config itself.

Writes ``<output-root>/<scale>/table<T>.md`` (and ``--markdown PATH``): per row our mean AP /
AP50 / AP75 over the finished seeds, the sample std of AP, n and every seed's numbers, beside the
paper's; ``table<T>.json`` (the same, with the std of every metric and each row's val AP curve;
``tools/paper_claims.py`` reads it), ``table<T>.png`` (the paper's AP and ours per row, seeds as
dots) and ``table<T>_curves.png`` (each run's training loss vs iteration and, when the runs
evaluated during training (``TEST.EVAL_PERIOD``), each row's val AP vs iteration); the PNGs are
copied next to ``--markdown`` too.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# The focal_det of this checkout (an editable install may point at another one).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = ("1a", "1b", "1c", "1d", "1e", "2", "3")
METRICS = ("AP", "AP50", "AP75")
# The keys that define a loss setting; copied from a table row onto the demo config.
LOSS_KEYS = (
    "MODEL.FOCAL.LOSS.NAME",
    "MODEL.FOCAL.LOSS.STAR_GAMMA",
    "MODEL.FOCAL.LOSS.STAR_BETA",
    "MODEL.RETINANET.FOCAL_LOSS_ALPHA",
    "MODEL.RETINANET.FOCAL_LOSS_GAMMA",
    "MODEL.FOCAL.OHEM.BATCH_SIZE_PER_IMAGE",
    "MODEL.FOCAL.OHEM.NMS_THRESH",
    "MODEL.FOCAL.OHEM.POSITIVE_FRACTION",
    "MODEL.FOCAL.OHEM.NMS_GROUPS",
    "MODEL.FOCAL.OHEM.BOX_LOSS",
    "MODEL.FOCAL.OHEM.NORMALIZER",
)
PAPER_SCALE = 600  # Table 1's train/test scale, the reference of 1e's scale mapping


class TableError(Exception):
    """A table or its configs cannot be run as asked (message says what and how to fix)."""


@dataclass
class Row:
    config: str  # path of the table's YAML
    stem: str
    setting: Dict  # the paper table's setting columns, read from the config
    paper: Dict  # the paper's row (settings + metrics)


@dataclass
class Run:
    row: Row
    seed: int
    output_dir: str
    argv: List[str]  # train_net.py arguments (without the interpreter)
    skipped: Optional[str] = None  # reason the row has no run at this scale
    status: Dict = field(default_factory=dict)
    expected_cfg: Optional[Dict] = None  # flattened merged config the command gives now
    reused_from: Optional[str] = None  # set when another row's finished run is this run


# ---------------------------------------------------------------------------------------------
# configs -> rows
# ---------------------------------------------------------------------------------------------
def load_cfg(path: str, opts: Optional[List[str]] = None):
    from detectron2.config import get_cfg

    from focal_det import add_focal_config
    from focal_det.config_check import ConfigError, merge_config_file, merge_config_list

    cfg = get_cfg()
    add_focal_config(cfg)
    try:
        # Checked merges (unknown keys, wrong types, no code run from YAML), as train_net.py.
        merge_config_file(cfg, path)
        if opts:
            merge_config_list(cfg, list(opts))
    except ConfigError as e:
        raise TableError(str(e)) from e
    return cfg


def row_setting(table: str, cfg) -> Dict:
    """The paper table's setting columns of one config (see focal_det.paper_tables)."""
    loss = cfg.MODEL.FOCAL.LOSS.NAME
    alpha = float(cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA)
    gamma = float(cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA)
    if table == "1a":
        _expect(table, cfg, loss == "BalancedCE", "MODEL.FOCAL.LOSS.NAME BalancedCE")
        return {"alpha": alpha}
    if table == "1b":
        _expect(table, cfg, loss == "FocalLoss", "MODEL.FOCAL.LOSS.NAME FocalLoss")
        return {"gamma": gamma, "alpha": alpha}
    if table == "1c":
        return {
            "scales": len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]),
            "aspect_ratios": len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]),
        }
    if table == "1d":
        if loss == "FocalLoss":
            return {"method": "FL", "batch_size": None, "nms": None}
        _expect(table, cfg, loss == "OHEM", "MODEL.FOCAL.LOSS.NAME OHEM or FocalLoss")
        ohem = cfg.MODEL.FOCAL.OHEM
        return {
            "method": "OHEM 1:3" if ohem.POSITIVE_FRACTION > 0 else "OHEM",
            "batch_size": int(ohem.BATCH_SIZE_PER_IMAGE),
            "nms": float(ohem.NMS_THRESH),
        }
    if table == "1e":
        return {"depth": int(cfg.MODEL.RESNETS.DEPTH), "scale": int(cfg.INPUT.MIN_SIZE_TEST)}
    if table == "2":
        r = cfg.MODEL.RESNETS
        if r.NUM_GROUPS > 1:
            name = f"ResNeXt-{r.DEPTH}-{r.NUM_GROUPS}x{r.WIDTH_PER_GROUP}d-FPN"
        else:
            name = f"ResNet-{r.DEPTH}-FPN"
        return {"backbone": name}
    if table == "3":
        if loss == "BalancedCE":
            return {"loss": "CE", "gamma": None, "beta": None}
        if loss == "FocalLoss":
            return {"loss": "FL", "gamma": gamma, "beta": None}
        _expect(table, cfg, loss == "FocalLossStar", "a CE, FL or FL* loss")
        s = cfg.MODEL.FOCAL.LOSS
        return {"loss": "FL*", "gamma": float(s.STAR_GAMMA), "beta": float(s.STAR_BETA)}
    raise TableError(f"Unknown table {table!r}; choose one of {TABLES}")


def _expect(table, cfg, ok, what):
    if not ok:
        raise TableError(f"A Table {table} config must use {what}; got {cfg.MODEL.FOCAL.LOSS.NAME}")


def discover_rows(table: str, configs_root: str) -> List[Row]:
    """The rows of ``table``: one per YAML under ``configs_root/table<T>``, in the paper's order."""
    from focal_det.paper_tables import get_paper_table

    paper = get_paper_table(table)
    folder = os.path.join(configs_root, f"table{table}")
    if not os.path.isdir(folder):
        raise TableError(f"No config folder {folder} for Table {table}")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".yaml"))
    if not files:
        raise TableError(f"{folder} holds no .yaml configs")
    rows = []
    for f in files:
        path = os.path.join(folder, f)
        setting = row_setting(table, load_cfg(path))
        match = paper.find(**setting)
        if match is None:
            raise TableError(
                f"{path}: its settings {setting} match no row of the paper's Table {table} "
                f"({[{k: r[k] for k in paper.setting} for r in paper.rows]})"
            )
        rows.append(Row(path, os.path.splitext(f)[0], setting, match))
    order = {id(r): i for i, r in enumerate(paper.rows)}
    rows.sort(key=lambda r: order[id(r.paper)])
    seen = {}
    for r in rows:
        key = id(r.paper)
        if key in seen:
            raise TableError(f"{r.config} and {seen[key]} are the same paper row {r.setting}")
        seen[key] = r.config
    return rows


# ---------------------------------------------------------------------------------------------
# rows -> commands
# ---------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    """A config value as a command-line override that merge_from_list parses back exactly."""
    if isinstance(v, (list, tuple)):
        return repr(_plain(v))
    return str(v)


def _plain(v):
    """CfgNode lists/tuples as plain Python literals (lists stay lists, tuples tuples)."""
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def _get(cfg, key):
    node = cfg
    for k in key.split("."):
        node = node[k]
    return node


def schedule_opts(demo_cfg, iters: Optional[int]) -> List[str]:
    """SOLVER overrides for ``iters`` iterations, the config's steps and warm-up scaled to it."""
    if iters is None:
        return []
    if iters < 1:
        raise TableError(f"--iters must be >= 1; got {iters}")
    base = demo_cfg.SOLVER.MAX_ITER
    steps = tuple(max(1, min(iters - 1, round(s * iters / base))) for s in demo_cfg.SOLVER.STEPS)
    steps = tuple(sorted(set(s for s in steps if 0 < s < iters)))
    # Warm-up keeps its share of the schedule (a shorter run warms up over fewer iterations).
    warmup = max(1, min(iters - 1, round(demo_cfg.SOLVER.WARMUP_ITERS * iters / base)))
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", repr(steps),
        "SOLVER.WARMUP_ITERS", str(warmup),
        "SOLVER.CHECKPOINT_PERIOD", str(10 * iters),
    ]  # fmt: skip


def demo_row_opts(table: str, row: Row, row_cfg, demo_cfg) -> Tuple[Optional[List[str]], str]:
    """
    The overrides that put ``row`` onto the demo config.

    Returns:
        (opts, "") or (None, reason) when the row has no demo counterpart.
    """
    if table == "2":
        return None, "Table 2 compares backbones; the demo has one (MobileNetV2)"
    opts = []
    for key in LOSS_KEYS:
        # Only what differs from the demo config, so the command shows the experiment.
        if _get(row_cfg, key) != _get(demo_cfg, key):
            opts += [key, _fmt(_get(row_cfg, key))]
    if table == "1c":
        n = len(row_cfg.MODEL.ANCHOR_GENERATOR.SIZES[0])
        bases = [float(level[0]) for level in demo_cfg.MODEL.ANCHOR_GENERATOR.SIZES]
        sizes = [[b * 2 ** (i / n) for i in range(n)] for b in bases]
        opts += ["MODEL.ANCHOR_GENERATOR.SIZES", repr(sizes)]
        opts += [
            "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
            repr(_plain(row_cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS)),
        ]
    if table == "1e":
        if row.setting["depth"] != 50:
            return None, "depth 101 has no MobileNetV2 counterpart (only the depth-50 rows map)"
        # The demo's own train/test size plays the paper's 600 px; the others scale with it.
        f = row.setting["scale"] / PAPER_SCALE
        d = demo_cfg.INPUT
        # MIN_SIZE_TEST 0 (no resize) tests at the image size: take the training size then.
        test_min = d.MIN_SIZE_TEST or max(d.MIN_SIZE_TRAIN)
        test_max = d.MAX_SIZE_TEST if d.MIN_SIZE_TEST else d.MAX_SIZE_TRAIN
        opts += [
            "INPUT.MIN_SIZE_TRAIN", repr(tuple(int(round(s * f)) for s in d.MIN_SIZE_TRAIN)),
            "INPUT.MAX_SIZE_TRAIN", str(int(round(d.MAX_SIZE_TRAIN * f))),
            "INPUT.MIN_SIZE_TEST", str(int(round(test_min * f))),
            "INPUT.MAX_SIZE_TEST", str(int(round(test_max * f))),
        ]  # fmt: skip
    return opts, ""


def plan_runs(args, rows: List[Row]) -> List[Run]:
    runs = []
    scale_root = os.path.join(args.output_root, args.scale)
    demo_cfg = load_cfg(args.demo_config) if args.scale == "demo" else None
    for row in rows:
        if args.scale == "paper":
            base = ["--config-file", os.path.relpath(row.config, REPO)]
            if args.num_gpus != 1:
                base = ["--num-gpus", str(args.num_gpus)] + base
            opts, reason = [], ""
            if args.iters is not None:
                opts = schedule_opts(load_cfg(row.config), args.iters)
        else:
            row_opts, reason = demo_row_opts(args.table, row, load_cfg(row.config), demo_cfg)
            base = ["--config-file", os.path.relpath(args.demo_config, REPO)]
            opts = None if row_opts is None else row_opts + schedule_opts(demo_cfg, args.iters)
        if args.workers is not None and opts is not None:
            opts += ["DATALOADER.NUM_WORKERS", str(args.workers)]
        if opts is not None:
            opts += list(args.opts)
        expected = None
        if opts is not None:
            # Fail now, with the key named, rather than in the n-th training process.
            expected = _flat_cfg(load_cfg(base[-1], opts))
        for seed in args.seeds:
            if opts is None:
                runs.append(Run(row, seed, "", [], skipped=reason))
                continue
            digest = hashlib.sha1(json.dumps(base + opts).encode()).hexdigest()[:8]
            out = os.path.join(scale_root, f"{row.stem}__{digest}", f"seed{seed}")
            argv = base + opts + ["SEED", str(seed), "OUTPUT_DIR", out]
            runs.append(Run(row, seed, out, argv, expected_cfg=expected))
    return runs


# Keys that legitimately differ between a run's saved config.yaml and its planned config.
_VOLATILE_KEYS = ("OUTPUT_DIR", "SEED", "MODEL.DEVICE")


def _flat_cfg(cfg) -> Dict:
    from focal_det.config_check import flatten_keys, load_yaml

    flat = flatten_keys(load_yaml(text=cfg.dump(), source="The planned config"))
    return {k: v for k, v in flat.items() if k not in _VOLATILE_KEYS}


def config_drift(run: Run) -> List[str]:
    """
    Keys whose value in the run's saved ``config.yaml`` differs from what its command gives
    today (e.g. a base config edited after the run). Keys present on one side only (a key
    added to focal_det since) are ignored. Empty when nothing to compare.
    """
    path = os.path.join(run.output_dir, "config.yaml")
    if run.expected_cfg is None or not os.path.isfile(path):
        return []
    return _differing_keys(_saved_cfg(path)[0], run.expected_cfg)


def _saved_cfg(path: str) -> Tuple[Dict, Optional[int]]:
    """(flattened config, SEED) a run saved (detectron2 writes ``config.yaml`` in its folder)."""
    from detectron2.config import CfgNode

    from focal_det.config_check import load_yaml

    raw = load_yaml(path)  # the one safe YAML reader
    return _flat_cfg(CfgNode(raw)), raw.get("SEED")


def _same_value(a, b) -> bool:
    """Config values equal, floats to 1e-12 relative: the demo YAML's anchor size
    ``2 ** (4 + 1 / 3)`` and Table 1c's ``16 * 2 ** (1 / 3)`` differ in the last bit, and both
    are one float32 anchor."""
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
        return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _differing_keys(saved: Dict, expected: Dict) -> List[str]:
    return sorted(
        k for k in saved.keys() & expected.keys() if not _same_value(saved[k], expected[k])
    )


def _finished_runs(scale_root: str) -> List[Tuple[str, Optional[int], Dict]]:
    """(folder, seed, flattened saved config) of every finished run under ``scale_root``."""
    out = []
    for name in sorted(os.listdir(scale_root)):
        folder = os.path.join(scale_root, name)
        subs = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for sub in subs:
            run_dir = os.path.join(folder, sub)
            cfg_path = os.path.join(run_dir, "config.yaml")
            if not sub.startswith("seed") or not os.path.isfile(cfg_path):
                continue
            if parse_final_metrics(os.path.join(run_dir, "log.txt")) is not None:
                saved, seed = _saved_cfg(cfg_path)
                out.append((run_dir, seed, saved))
    return out


def reuse_equivalent_runs(runs: List[Run], scale_root: str) -> None:
    """
    Points every run that has no result of its own at a finished run of the same seed whose
    saved config equals the one it would train, when there is one under ``scale_root`` (the
    folders of all tables of a scale share it). At demo scale several rows are one experiment:
    Table 1d's FL row is Table 1b's gamma-2 row, and Table 1e's 600 px row is the demo config
    itself; their commands differ, so their folders do, but training it again would only repeat
    a result. Compared as ``config_drift`` does (``OUTPUT_DIR`` and ``MODEL.DEVICE`` aside); the
    seed must match too. Sets ``run.output_dir`` and ``run.reused_from``.
    """
    if not os.path.isdir(scale_root):
        return
    candidates = None  # read once, only if a run needs it
    for r in runs:
        if r.skipped or r.expected_cfg is None or run_state(r)["state"] not in ("pending", "stale"):
            continue
        if candidates is None:
            candidates = _finished_runs(scale_root)
        for folder, seed, saved in candidates:
            if (
                seed == r.seed
                and folder != r.output_dir
                and saved.keys() & r.expected_cfg.keys()
                and not _differing_keys(saved, r.expected_cfg)
            ):
                r.reused_from = r.output_dir
                r.output_dir = folder
                break


# ---------------------------------------------------------------------------------------------
# output folder -> metrics
# ---------------------------------------------------------------------------------------------
_COPYPASTE = re.compile(r"copypaste: (.*)$")


def parse_final_metrics(log_path: str) -> Optional[Dict[str, float]]:
    """
    The bbox metrics of the evaluation that follows the save of ``model_final.pth`` in a
    detectron2 ``log.txt`` (the first COCO "copypaste" block after it), or None if absent.
    """
    if not os.path.isfile(log_path):
        return None
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    start = None
    for i, line in enumerate(lines):
        if "Saving checkpoint to" in line and "model_final.pth" in line:
            start = i
    if start is None:
        return None
    payload = [m.group(1) for m in map(_COPYPASTE.search, lines[start:]) if m]
    for i in range(len(payload) - 2):
        if payload[i].strip() == "Task: bbox":
            names = payload[i + 1].split(",")
            values = payload[i + 2].split(",")
            if len(names) == len(values):
                return {n.strip(): float(v) for n, v in zip(names, values)}
    return None


def run_state(run: Run) -> Dict:
    """{"state": "done"|"failed"|"pending", "metrics": {...}?, ...} of one run's folder."""
    if run.skipped:
        return {"state": "skipped", "reason": run.skipped}
    metrics = parse_final_metrics(os.path.join(run.output_dir, "log.txt"))
    status_path = os.path.join(run.output_dir, "run_status.json")
    status = {}
    if os.path.isfile(status_path):
        with open(status_path) as f:
            status = json.load(f)
    if metrics is not None:
        drift = config_drift(run)
        if drift:
            # Its command is the same but a config file it reads has changed since: the result
            # is not this command's any more. Rerun by default; shown as "stale" until then.
            return {**status, "state": "stale", "metrics": metrics,
                    "reason": f"config changed since the run: {', '.join(drift[:5])}"}  # fmt: skip
        return {**status, "state": "done", "metrics": metrics}
    if status.get("state") == "failed":
        return status
    return {"state": "pending"}


def _failure_reason(output_dir: str, stdout_path: str) -> str:
    text = ""
    for p in (stdout_path, os.path.join(output_dir, "log.txt")):
        if os.path.isfile(p):
            with open(p, errors="replace") as f:
                text += f.read()[-20000:]
    for pattern in (r"(FloatingPointError[^\n]*)", r"(Loss became infinite or NaN[^\n]*)",
                    r"(non-finite[^\n]*)", r"(\w+Error: [^\n]*)"):  # fmt: skip
        m = re.findall(pattern, text)
        if m:
            msg = m[-1].strip()
            if len(msg) > 300:  # whole sentences, marked as cut
                cut = msg.rfind(". ", 0, 300)
                msg = msg[: cut + 1 if cut > 0 else 300] + " [...]"
            return msg
    return "exited with an error (see stdout.txt)"


TRAINING_CODE = ("focal_det", "configs", "train_net.py")  # what a training run imports / reads


def code_version() -> Dict:
    """
    The code a run trains with: the commit, ``code_id`` (a hash of the git objects of
    ``TRAINING_CODE``, so it changes only when that code does, not with every commit) and whether
    that code has uncommitted changes. A config alone does not pin a result: every run records
    this and the table says on which code its rows ran.
    """
    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "--short=10", "HEAD")
    if commit is None:
        return {"commit": None}
    objects = [git("rev-parse", f"HEAD:{p}") or "" for p in TRAINING_CODE]
    return {
        "commit": commit,
        "code_id": hashlib.sha1(" ".join(objects).encode()).hexdigest()[:10],
        "code_dirty": bool(git("status", "--porcelain", "--", *TRAINING_CODE)),
    }


def execute(run: Run, python: str, threads: int, train_net: str) -> Dict:
    """Run one training (blocking); returns its state and writes run_status.json."""
    version = code_version()
    os.makedirs(run.output_dir, exist_ok=True)
    cmd = [python, train_net] + run.argv
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    stdout_path = os.path.join(run.output_dir, "stdout.txt")
    start = time.time()
    with open(stdout_path, "w") as out:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.time() - start
    status = {"returncode": rc, "wall_time_s": round(wall, 1), "command": shlex.join(cmd),
              "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
              **version}  # fmt: skip
    metrics = parse_final_metrics(os.path.join(run.output_dir, "log.txt"))
    if rc == 0 and metrics is not None:
        status.update(state="done", metrics=metrics)
    else:
        status.update(state="failed", reason=_failure_reason(run.output_dir, stdout_path))
    with open(os.path.join(run.output_dir, "run_status.json"), "w") as f:
        json.dump(status, f, indent=2)
    return status


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------
def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _ap_value(state: Dict, metric: str) -> float:
    return 0.0 if state.get("no_detections") else state["metrics"].get(metric, math.nan)


def summarize(table: str, runs: List[Run]) -> List[Dict]:
    """
    One dict per paper row: settings, the paper's metrics, every run's state, and over the
    finished seeds: ``n``, ``ours_mean``, ``ours_std`` (sample std, n - 1; None with one seed),
    ``ours_seeds`` (each seed's AP / AP50 / AP75, 0 where it detected nothing) and ``val_AP``
    (the periodic evaluations' AP vs iteration, see :func:`val_ap_curve`).
    """
    out, by_row = [], {}
    for r in runs:
        by_row.setdefault(r.row.config, []).append(r)
    for config, rs in by_row.items():
        row = rs[0].row
        seeds = []
        for r in rs:
            s = r.status or run_state(r)
            seeds.append({"seed": r.seed, "output_dir": r.output_dir, **s})
            if r.reused_from:
                seeds[-1]["reused_from"] = r.reused_from
        done = [s for s in seeds if s["state"] == "done"]
        for s in done:
            # detectron2's COCO evaluator reports NaN when the model output no detection above
            # the test score threshold; COCO AP is then 0 (nothing found), counted as such.
            s["no_detections"] = all(math.isnan(s["metrics"].get(m, math.nan)) for m in METRICS)
        values = {m: [_ap_value(s, m) for s in done] for m in METRICS}
        out.append(
            {
                "config": os.path.relpath(config, REPO),
                "setting": row.setting,
                "paper": {m: row.paper[m] for m in METRICS},
                "n": len(done),
                "ours_mean": {m: statistics.mean(v) if v else None for m, v in values.items()},
                "ours_std": {
                    m: statistics.stdev(v) if len(v) > 1 else None for m, v in values.items()
                },
                "ours_seeds": [
                    {"seed": s["seed"], **{m: _ap_value(s, m) for m in METRICS},
                     "no_detections": s["no_detections"]}
                    for s in done
                ],  # fmt: skip
                "val_AP": val_ap_curve(done),
                "runs": seeds,
            }
        )
    return out


def _seeds_cell(s: Dict) -> str:
    """Each seed's AP / AP50 / AP75 ("s1 6.0 / 24.1 / 0.8"), or its state when it has none."""
    parts = []
    results = {x["seed"]: x for x in s["ours_seeds"]}
    for r in s["runs"]:
        if r["seed"] in results:
            x = results[r["seed"]]
            star = "*" if x["no_detections"] else ""
            parts.append(f"s{r['seed']} " + " / ".join(f"{x[m]:.1f}" for m in METRICS) + star)
        elif r["state"] != "pending" or not results:
            # A seed not run yet is left out once another seed of the row has a result.
            parts.append(f"s{r['seed']} " + ("not run" if r["state"] == "pending" else r["state"]))
    return "; ".join(parts)


def markdown(table: str, scale: str, summary: List[Dict], title_note: str = "") -> str:
    from focal_det.paper_tables import get_paper_table

    paper = get_paper_table(table)
    cols = list(paper.setting)
    head = (
        cols + ["ours AP", "AP std", "n", "ours AP50", "ours AP75", "per seed: AP / AP50 / AP75"]
        + [f"paper {m}" for m in METRICS]
    )  # fmt: skip
    lines = [
        f"Table {table} ({paper.caption}); ours at scale `{scale}`{title_note}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for s in summary:
        cells = [_cell(s["setting"][c]) for c in cols]
        states = [r["state"] for r in s["runs"]]
        if s["n"]:
            star = "*" if any(x["no_detections"] for x in s["ours_seeds"]) else ""
            mean, std = s["ours_mean"], s["ours_std"]["AP"]
            cells += [f"{mean['AP']:.1f}{star}", "-" if std is None else f"{std:.1f}",
                      str(s["n"]), f"{mean['AP50']:.1f}{star}", f"{mean['AP75']:.1f}{star}"]
        else:
            what = next((w for w in ("skipped", "failed", "stale") if w in states), "not run")
            what = "n/a" if what == "skipped" else what
            cells += [what, "-", "0", what, what]
        cells.append(_seeds_cell(s))
        cells += [_cell(s["paper"][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["- ours: mean over the n finished seeds; AP std: their sample std (n - 1)"]
    if any(x["no_detections"] for s in summary for x in s["ours_seeds"]):
        notes.append(
            "- \\* no detection above the test score threshold (COCO AP undefined; counted as 0)"
        )
    grouped: Dict[Tuple[str, str], List[int]] = {}  # (config, note) -> seeds, one line each
    for s in summary:
        for r in s["runs"]:
            if r.get("reused_from") and r["state"] == "done":
                what = (
                    f"the same config as `{_display_path(os.path.dirname(r['output_dir']))}`"
                    " (another row's run, reused; not trained again)"
                )
                grouped.setdefault((s["config"], what), []).append(r["seed"])
            if r["state"] in ("failed", "skipped", "stale"):
                what = f"{r['state']}: {r.get('reason', '')}"
                grouped.setdefault((s["config"], what), []).append(r["seed"])
    for (config, what), seeds in grouped.items():
        label = "seed" + ("s " if len(seeds) > 1 else " ") + ", ".join(map(str, seeds))
        notes.append(f"- {os.path.basename(config)} {label}: {what}")
    versions = {}
    for s in summary:
        for r in s["runs"]:
            if r["state"] == "done":
                v = f"code {r['code_id']}" if r.get("code_id") else "unrecorded"
                v += " (uncommitted changes)" if r.get("code_dirty") else ""
                versions[v] = versions.get(v, 0) + 1
    if len(versions) > 1 or any("unrecorded" in v or "uncommitted" in v for v in versions):
        notes.append(
            "- code of the finished runs: "
            + ", ".join(f"{v}: {n} run(s)" for v, n in sorted(versions.items()))
            + (" -- not one version: rows may differ by code, not only by setting"
               if len(versions) > 1 else "")
        )  # fmt: skip
    elif versions:
        notes.append(
            f"- every finished run used the same training code ({next(iter(versions))}:"
            f" git objects of {', '.join(TRAINING_CODE)})"
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _row_label(cols: List[str], setting: Dict, sep: str) -> str:
    """A row's setting columns as text, e.g. "gamma 2, alpha 0.25" (``sep`` between columns)."""
    return sep.join(f"{c} {_cell(setting[c])}" for c in cols)


def plot_table(table: str, scale: str, summary: List[Dict], path: str) -> Dict:
    """
    The table as a picture: per row (x, labelled by its setting), the paper's AP and ours side
    by side in two panels (each on its own AP axis: demo-scale APs are far below COCO's), our
    seeds as dots and their mean as a bar. Rows without a result of ours are left empty.
    Returns what was drawn: {"labels", "paper", "ours_mean", "ours_seeds"}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from focal_det.paper_tables import get_paper_table

    paper_table = get_paper_table(table)
    cols = list(paper_table.setting)
    labels = [_row_label(cols, s["setting"], "\n") for s in summary]
    paper = [s["paper"]["AP"] for s in summary]
    ours = [s["ours_mean"]["AP"] for s in summary]
    seeds = [[x["AP"] for x in s["ours_seeds"]] for s in summary]
    xs = list(range(len(summary)))
    fig, (ax_p, ax_o) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(xs) * 2), 4))
    ax_p.bar(xs, paper, color="0.6")
    ax_p.set_title(f"paper, Table {table}: {paper_table.caption}", fontsize=8)
    ok = [x for x in xs if ours[x] is not None]
    ax_o.bar(ok, [ours[x] for x in ok], color="tab:blue", alpha=0.6, label="mean over seeds")
    for x in ok:
        ax_o.plot([x] * len(seeds[x]), seeds[x], "k.", markersize=5)
    for x in xs:
        if ours[x] is None:
            ax_o.text(x, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=7)
    ax_o.set_title(f"ours at scale {scale} (AP on its test set; dots: seeds)", fontsize=9)
    for ax in (ax_p, ax_o):
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("AP")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"labels": labels, "paper": paper, "ours_mean": ours, "ours_seeds": seeds}


def read_curve(output_dir: str, key: str = "loss_cls") -> Tuple[List[int], List[float]]:
    """(iterations, values) of ``key`` in a run's detectron2 ``metrics.json`` (empty if none)."""
    path = os.path.join(output_dir, "metrics.json")
    its, vals = [], []
    if not os.path.isfile(path):
        return its, vals
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupted run
                continue
            if key in rec and "iteration" in rec:
                its.append(int(rec["iteration"]))
                vals.append(float(rec[key]))
    return its, vals


VAL_AP_KEY = "bbox/AP"  # what detectron2's EvalHook puts into metrics.json (TEST.EVAL_PERIOD)


def val_ap_curve(runs: List[Dict]) -> Optional[Dict]:
    """
    The periodic evaluations' AP of a row's finished ``runs`` (summary dicts with
    "seed" and "output_dir"): {"iterations", "mean", "seeds": {seed: values}} on the iterations
    that every seed evaluated at, NaN (no detection) counted as 0 as in the table; None when no
    run evaluated during training.
    """
    curves = {}
    for r in runs:
        its, vals = read_curve(r["output_dir"], VAL_AP_KEY)
        if its:
            curves[r["seed"]] = dict(zip(its, (0.0 if math.isnan(v) else v for v in vals)))
    if not curves:
        return None
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    return {
        "iterations": common,
        "mean": [statistics.mean(c[i] for c in curves.values()) for i in common],
        "seeds": {str(k): [c[i] for i in common] for k, c in curves.items()},
    }


def plot_curves(table: str, summary: List[Dict], path: str) -> Dict[str, Dict]:
    """
    Left: the training loss (``loss_cls``, as logged: normalised by the foreground count) of
    every run of the table against the iteration, one line per run, a cross where a run failed;
    shows *when* each setting starts to learn, which the final AP alone does not. Right, when
    the runs evaluated during training (TEST.EVAL_PERIOD): each row's val AP against the
    iteration, the mean over its finished seeds bold, the seeds thin; shows whether the
    schedule was long enough (where AP stops rising). Returns the number of points drawn:
    {"loss_cls": {run label: n}, "val_AP": {row label: n}}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from focal_det.paper_tables import get_paper_table

    cols = list(get_paper_table(table).setting)
    with_ap = [s for s in summary if s.get("val_AP")]
    fig, axes = plt.subplots(1, 2 if with_ap else 1, figsize=(15 if with_ap else 8, 4.5))
    ax, ax_ap = (axes[0], axes[1]) if with_ap else (axes, None)
    drawn = {"loss_cls": {}, "val_AP": {}}
    cmap = plt.get_cmap("tab10")
    for k, s in enumerate(summary):
        name = _row_label(cols, s["setting"], ", ")
        for r in s["runs"]:
            if r["state"] not in ("done", "failed", "stale"):
                continue
            its, vals = read_curve(r["output_dir"])
            if not its:
                continue
            label = f"{name}, seed {r['seed']}"
            style = "-" if r["seed"] == min(x["seed"] for x in s["runs"]) else "--"
            finite = [(i, v) for i, v in zip(its, vals) if math.isfinite(v)]
            ax.plot([i for i, _ in finite], [v for _, v in finite], style, color=cmap(k % 10),
                    label=label + (" (failed)" if r["state"] == "failed" else ""), linewidth=1)
            if r["state"] == "failed" and finite:
                ax.plot(*finite[-1], "x", color=cmap(k % 10), markersize=9)
            drawn["loss_cls"][label] = len(finite)
        curve = s.get("val_AP")
        if ax_ap is not None and curve:
            for values in curve["seeds"].values():
                ax_ap.plot(curve["iterations"], values, color=cmap(k % 10), linewidth=0.6,
                           alpha=0.5)  # fmt: skip
            ax_ap.plot(curve["iterations"], curve["mean"], "o-", color=cmap(k % 10), linewidth=2,
                       markersize=3, label=f"{name} (mean of {len(curve['seeds'])})")  # fmt: skip
            drawn["val_AP"][name] = len(curve["mean"])
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss_cls (normalised by # foreground anchors), log scale")
    ax.set_title(f"Table {table}: classification loss during training (not comparable across "
                 "losses, only its shape)", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    if drawn["loss_cls"]:
        ax.legend(fontsize=6, ncol=2)
    if ax_ap is not None:
        ax_ap.set_xlabel("iteration")
        ax_ap.set_ylabel("val AP")
        ax_ap.set_title(f"Table {table}: val AP during training (bold: mean over seeds; thin: "
                        "seeds)", fontsize=9)  # fmt: skip
        ax_ap.grid(alpha=0.3)
        ax_ap.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def write_table(args, runs: List[Run]) -> Tuple[str, str]:
    summary = summarize(args.table, runs)
    scale_root = os.path.join(args.output_root, args.scale)
    os.makedirs(scale_root, exist_ok=True)
    note = f", {len(args.seeds)} seed(s) {args.seeds}"
    if args.iters is not None:
        note += f", {args.iters} iterations"
    md = markdown(args.table, args.scale, summary, note)
    md_path = os.path.join(scale_root, f"table{args.table}.md")
    for p in [md_path] + ([args.markdown] if args.markdown else []):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        with open(p, "w") as f:
            f.write(md)
    png_path = os.path.join(scale_root, f"table{args.table}.png")
    plot_table(args.table, args.scale, summary, png_path)
    curves_path = os.path.join(scale_root, f"table{args.table}_curves.png")
    plot_curves(args.table, summary, curves_path)
    if args.markdown:
        stem = os.path.splitext(args.markdown)[0]
        shutil.copyfile(png_path, stem + ".png")
        shutil.copyfile(curves_path, stem + "_curves.png")
    json_path = os.path.join(scale_root, f"table{args.table}.json")
    with open(json_path, "w") as f:
        json.dump(
            {
                "table": args.table,
                "scale": args.scale,
                "seeds": args.seeds,
                "iters": args.iters,
                "rows": summary,
            },  # fmt: skip
            f,
            indent=2,
        )
    return md_path, json_path


# ---------------------------------------------------------------------------------------------
def _display_path(path: str) -> str:
    """``path`` relative to the repository when it is inside it (commands run from there)."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return path if rel.startswith("..") else rel


def default_demo_config() -> str:
    """The demo's training config: configs/demo/*.yaml that is not a Base-*.yaml (exactly one)."""
    folder = os.path.join(REPO, "configs", "demo")
    cands = sorted(
        f for f in os.listdir(folder) if f.endswith(".yaml") and not f.startswith("Base")
    ) if os.path.isdir(folder) else []  # fmt: skip
    if len(cands) != 1:
        raise TableError(
            f"Cannot pick the demo config among {cands} in {folder}: pass --demo-config"
        )
    return os.path.join(folder, cands[0])


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--table", required=True, choices=TABLES, help="which of the paper's tables")
    p.add_argument("--scale", default="paper", choices=("paper", "demo"))
    p.add_argument("--configs-root", default=os.path.join(REPO, "configs"))
    p.add_argument("--demo-config", default=None, help="demo scale: the demo training config")
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="override SOLVER.MAX_ITER (steps scaled proportionally); same for every row",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed per row")
    p.add_argument("--output-root", default=os.path.join(REPO, "output", "tables"))
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    p.add_argument("--num-gpus", type=int, default=1, help="paper scale: train_net.py --num-gpus")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each (CPU) run")
    p.add_argument("--workers", type=int, default=None, help="DATALOADER.NUM_WORKERS of each run")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs train_net.py")
    p.add_argument(
        "--train-net", default=os.path.join(REPO, "train_net.py"), help=argparse.SUPPRESS
    )
    p.add_argument(
        "--rows", nargs="+", default=None, help="only the configs whose stem contains one of these"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true", help="print, run nothing")
    mode.add_argument("--collect-only", action="store_true", help="write the table, run nothing")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for every run"
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.output_root = os.path.abspath(args.output_root)
    if args.opts[:1] == ["--"]:  # "--" separating the overrides from options taking lists
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        raise SystemExit(f"Config overrides must be KEY VALUE pairs; got {args.opts}")
    try:
        if args.scale == "demo" and args.demo_config is None:
            args.demo_config = default_demo_config()
        rows = discover_rows(args.table, args.configs_root)
        if args.rows:
            rows = [r for r in rows if any(k in r.stem for k in args.rows)]
            if not rows:
                raise TableError(
                    f"--rows {args.rows} selects none of the Table {args.table} configs"
                )
        runs = plan_runs(args, rows)
        reuse_equivalent_runs(runs, os.path.join(args.output_root, args.scale))
    except TableError as e:
        print(f"run_table: {e}", file=sys.stderr)
        return 2

    for r in runs:
        if r.reused_from:
            print(
                f"[run_table] {r.row.stem} seed {r.seed}: same config as the finished run"
                f" {r.output_dir}; reusing its result"
            )
    if args.print_commands:
        for r in runs:
            if r.skipped:
                print(f"# {r.row.stem}: not run at scale {args.scale}: {r.skipped}")
            else:
                argv = list(r.argv)
                argv[-1] = _display_path(argv[-1])  # OUTPUT_DIR
                print(shlex.join(["python", "train_net.py"] + argv))
        return 0

    if not args.collect_only:
        todo = []
        for r in runs:
            st = run_state(r)
            if st["state"] in ("pending", "stale") or (
                st["state"] == "failed" and args.retry_failed
            ):
                todo.append(r)
        print(
            f"[run_table] Table {args.table} ({args.scale}): {len(runs)} runs, {len(todo)} to run"
        )
        for i, r in enumerate(todo):
            print(
                f"[run_table] ({i + 1}/{len(todo)}) {r.row.stem} seed {r.seed} -> {r.output_dir}",
                flush=True,
            )
            st = execute(r, args.python, args.threads, args.train_net)
            r.status = st
            msg = (
                f"AP {st['metrics'].get('AP', math.nan):.2f}" if st["state"] == "done" else
                f"FAILED: {st.get('reason')}"
            )  # fmt: skip
            print(f"[run_table]     {msg} ({st['wall_time_s']:.0f}s)", flush=True)
            write_table(args, runs)
    md_path, json_path = write_table(args, runs)
    with open(md_path) as f:
        print(f.read())
    print(f"wrote {md_path}\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
