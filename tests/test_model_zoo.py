"""
focal_det.model_zoo: names, configs, trained-weight URLs; detectron2 model-zoo RetinaNet
checkpoints load unchanged into FocalRetinaNet; offline and checksum messages.
"""
import hashlib
import pickle

import pytest
import torch
from detectron2.modeling import build_model

import focal_det  # noqa: F401
from focal_det import model_zoo
from focal_det.checkpoint import FocalCheckpointer, WeightsUnavailableError, expected_cache_path
from focal_det.checkpoint import checkpointer as ckpt_module


def test_every_config_is_in_the_zoo_and_loads():
    names = model_zoo.list_configs()
    assert "retinanet_R101_FPN_800.yaml" in names
    assert "table1b/retinanet_R_50_FPN_600_fl_gamma2.0_alpha0.25.yaml" in names
    for name in names:
        cfg = model_zoo.get_config(name)
        assert cfg.MODEL.META_ARCHITECTURE, name
    for name in model_zoo.TRAINED:
        assert name in names, name


def test_unknown_and_untrained_names_are_clear_errors():
    with pytest.raises(RuntimeError, match="not in focal_det's model zoo"):
        model_zoo.get_config_file("table9/nothing.yaml")
    with pytest.raises(RuntimeError, match="No trained weights are published"):
        model_zoo.get_config("table1a/retinanet_R_50_FPN_600_ce_alpha0.75.yaml", trained=True)


def _random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_detectron2_model_zoo_checkpoint_loads_unchanged(tmp_path, monkeypatch):
    # detectron2's own RetinaNet with the zoo config; its checkpoint in detectron2's model-zoo
    # format (a pickle of numpy arrays) must load into FocalRetinaNet with every key used.
    name = "zoo/detectron2/retinanet_R_50_FPN_1x.yaml"
    cfg = model_zoo.get_config(name)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    torch.manual_seed(0)
    d2_model = build_model(cfg).eval()
    _random_state(d2_model, 0)
    path = tmp_path / "model_final_d2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in d2_model.state_dict().items()},
                     "__author__": "Detectron2 Model Zoo"}, f)  # fmt: skip
    monkeypatch.setitem(model_zoo.TRAINED, name, (str(path), 37.4, "coco_2017_val"))

    ours = model_zoo.get(name, trained=True, device="cpu")
    assert type(ours).__name__ == "FocalRetinaNet"
    d2_sd, our_sd = d2_model.state_dict(), ours.state_dict()
    # FocalRetinaNet may add its own non-parameter state (e.g. the loss normaliser's EMA).
    assert d2_sd.keys() == {k for k in our_sd if not k.endswith("_extra_state")}
    for k in d2_sd:
        assert torch.equal(d2_sd[k], our_sd[k]), k
    image = torch.rand(3, 96, 128) * 255
    inputs = [{"image": image, "height": 96, "width": 128}]
    with torch.no_grad():
        a, b = d2_model(inputs)[0]["instances"], ours(inputs)[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)


def _tiny_model():
    cfg = model_zoo.get_config("quick/retinanet_tiny_quick.yaml")
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    return build_model(cfg)


def test_offline_download_says_what_to_fetch_and_where(monkeypatch):
    def no_network(path, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(ckpt_module.PathManager, "get_local_path", no_network)
    url = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    with pytest.raises(WeightsUnavailableError) as e:
        FocalCheckpointer(_tiny_model()).load(url)
    msg = str(e.value)
    assert "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl" in msg
    assert expected_cache_path(url) in msg
    assert expected_cache_path(url).endswith("detectron2/ImageNetPretrained/MSRA/R-50.pkl")


def test_sha256_is_verified(tmp_path, monkeypatch):
    model = _tiny_model()
    path = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    FocalCheckpointer(_tiny_model()).load(f"{path}?sha256={digest}")  # right hash: loads
    with pytest.raises(ValueError, match="expected 00"):
        FocalCheckpointer(_tiny_model()).load(f"{path}?sha256={'0' * 64}")
    # Hashes pinned in KNOWN_SHA256 are checked without being written in the path.
    monkeypatch.setitem(ckpt_module.KNOWN_SHA256, str(path), "f" * 64)
    with pytest.raises(ValueError, match="sha256"):
        FocalCheckpointer(_tiny_model()).load(str(path))


def test_model_zoo_md_is_up_to_date_and_covers_every_paper_row():
    import os

    from focal_det.model_zoo.model_zoo_md import paper_row, render
    from focal_det.paper_tables import PAPER_TABLES

    path = os.path.join(os.path.dirname(model_zoo.get_config_file("Base-RetinaNet.yaml")), "..",
                        "MODEL_ZOO.md")  # fmt: skip
    with open(path) as f:
        assert f.read() == render(), (
            "MODEL_ZOO.md is stale: python -m focal_det.model_zoo.model_zoo_md > MODEL_ZOO.md"
        )
    # Each paper row is reached by exactly one config, found from the config's values.
    seen = {}
    for name in model_zoo.list_configs():
        table, row = paper_row(name, model_zoo.get_config(name))
        if table is None:
            continue
        assert row is not None, name
        key = (table, tuple(sorted((k, str(v)) for k, v in row.items())))
        assert key not in seen, f"{name} and {seen.get(key)} are the same paper row"
        seen[key] = name
    for table, t in PAPER_TABLES.items():
        assert sum(1 for k in seen if k[0] == table) == len(t.rows), table
