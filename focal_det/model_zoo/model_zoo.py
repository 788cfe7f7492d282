"""
focal_det's model zoo, shaped like ``detectron2.model_zoo``: every YAML under ``configs/`` by its
path relative to that folder (e.g. ``"table1b/retinanet_R_50_FPN_600_fl_gamma2.0_alpha0.25.yaml"``),
and, for the zoo configs of already-trained models, the URL of their weights.

Trained weights exist for ``zoo/detectron2/*`` (detectron2's model zoo, loads unchanged) and
``zoo/Detectron/*`` (the paper's released Detectron models, loaded through focal_det's
converter). The table configs have no trained weights of ours yet: ``trained=True`` says so.
"""
import os
from typing import Optional

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from ..checkpoint import FocalCheckpointer
from ..config import add_focal_config
from ..config_check import merge_config_file

__all__ = ["get_config_file", "get_config", "get_checkpoint_url", "get", "list_configs"]

_DETECTRON = "https://dl.fbaipublicfiles.com/detectron/"
_D2 = "detectron2://COCO-Detection/"

# config -> (weights URL, box AP published by whoever trained it, on which split). These AP values
# are the publishers' (detectron2's MODEL_ZOO.md, Detectron's MODEL_ZOO.md), not measured here.
TRAINED = {
    "zoo/detectron2/retinanet_R_50_FPN_1x.yaml": (
        _D2 + "retinanet_R_50_FPN_1x/190397773/model_final_bfca0b.pkl", 37.4, "coco_2017_val"),
    "zoo/detectron2/retinanet_R_50_FPN_3x.yaml": (
        _D2 + "retinanet_R_50_FPN_3x/190397829/model_final_5bd44e.pkl", 38.7, "coco_2017_val"),
    "zoo/detectron2/retinanet_R_101_FPN_3x.yaml": (
        _D2 + "retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl", 40.4, "coco_2017_val"),
}  # fmt: skip
for _body, _sched, _id, _stamp, _ap in [
    ("R-50", "1x", 36768636, "08_29_48.t4zc9clc", 35.7),
    ("R-50", "2x", 36768677, "08_30_38.sgZIQZQ5", 35.7),
    ("R-101", "1x", 36768744, "08_31_38.5poQe1ZB", 37.7),
    ("R-101", "2x", 36768840, "08_33_29.grtM0RTf", 37.8),
    ("X-101-64x4d", "1x", 36768875, "08_34_37.FSXgMpzP", 39.8),
    ("X-101-64x4d", "2x", 36768907, "08_35_40.pF3nzPpu", 39.2),
    ("X-101-32x8d", "1x", 36769563, "08_42_05.06JTK6vJ", 39.5),
    ("X-101-32x8d", "2x", 36769641, "08_42_55.sUPnwXI5", 38.6),
]:
    TRAINED[f"zoo/Detectron/retinanet_{_body}-FPN_{_sched}.yaml"] = (
        f"{_DETECTRON}{_id}/12_2017_baselines/retinanet_{_body}-FPN_{_sched}.yaml.{_stamp}/output/"
        "train/coco_2014_train%3Acoco_2014_valminusminival/retinanet/model_final.pkl",
        _ap,
        "coco_2014_minival",
    )


def _config_root():
    # A built package (wheel, `pip install .`) carries the repository's configs/ as
    # focal_det/model_zoo/configs (setup.py maps the folder, nothing is copied in the source
    # tree); a source checkout or an editable install reads configs/ next to the package.
    packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    if os.path.isdir(packaged):
        return packaged
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def list_configs():
    """All config names of the zoo (paths relative to ``configs/``), sorted."""
    root = _config_root()
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".yaml"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def get_config_file(config_path: str) -> str:
    """
    Returns:
        the absolute path of ``configs/<config_path>``.
    """
    path = os.path.join(_config_root(), config_path)
    if not os.path.isfile(path):
        raise RuntimeError(
            f"{config_path} is not in focal_det's model zoo (looked for {path}). Names are paths "
            f"under configs/, e.g. 'retinanet_R101_FPN_800.yaml'; see MODEL_ZOO.md or "
            f"focal_det.model_zoo.list_configs()."
        )
    return path


def get_checkpoint_url(config_path: str) -> str:
    """
    Returns:
        the URL of the trained weights of ``config_path``.
    """
    if config_path not in TRAINED:
        get_config_file(config_path)  # an unknown name gets the "not in the zoo" message
        raise RuntimeError(
            f"No trained weights are published for {config_path}. Train it with "
            f"`./train_net.py --config-file configs/{config_path}`, or use a config with trained "
            f"weights: {sorted(TRAINED)}."
        )
    return TRAINED[config_path][0]


def get_config(config_path: str, trained: bool = False):
    """
    Returns:
        CfgNode: detectron2's defaults + focal_det's keys + ``config_path``; with
        ``trained=True`` ``MODEL.WEIGHTS`` is the trained model's URL.
    """
    cfg = get_cfg()
    add_focal_config(cfg)
    merge_config_file(cfg, get_config_file(config_path))  # checked keys, yaml.safe_load only
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(config_path)
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """
    Build the model of ``config_path`` and load ``MODEL.WEIGHTS`` (the trained weights with
    ``trained=True``, else the ImageNet initialisation) through :class:`FocalCheckpointer`, which
    downloads with detectron2's PathManager (or says what to download when offline).

    Returns:
        the model (``nn.Module``) in eval mode, on ``device`` (default: CUDA if available).
    """
    cfg = get_config(config_path, trained)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    FocalCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()
