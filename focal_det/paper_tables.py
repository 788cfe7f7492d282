"""
The paper's reported numbers (Tables 1a-1e, 2, 3 of "Focal Loss for Dense Object Detection"),
in ONE place, so that tools and docs compare against the same values.

Each table is a :class:`PaperTable`: ``setting`` names the columns that identify a row (the
experiment's knobs), ``metrics`` the reported columns. A row is a plain dict. Values are copied
from the paper (docs/paper.md lists them with their captions); "-" / "n/a" settings are
``None``.

Example::

    from focal_det.paper_tables import PAPER_TABLES
    PAPER_TABLES["1b"].find(gamma=2.0, alpha=0.25)["AP"]  # 34.0
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["PaperTable", "PAPER_TABLES", "get_paper_table"]


@dataclass(frozen=True)
class PaperTable:
    name: str
    caption: str
    setting: Tuple[str, ...]
    metrics: Tuple[str, ...]
    rows: Tuple[Dict, ...]

    def find(self, **setting) -> Optional[Dict]:
        """
        The row whose setting columns equal ``setting`` (floats compared to 1e-9), or None.
        Only the given columns are compared; they must all be setting columns of this table.
        """
        unknown = set(setting) - set(self.setting)
        if unknown:
            raise KeyError(
                f"Table {self.name} has setting columns {self.setting}; "
                f"got unknown {sorted(unknown)}"
            )
        for row in self.rows:
            if all(_same(row[k], v) for k, v in setting.items()):
                return row
        return None


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) < 1e-9
    return a == b


def _table(name, caption, setting, metrics, values: List[tuple]) -> PaperTable:
    cols = tuple(setting) + tuple(metrics)
    rows = []
    for v in values:
        assert len(v) == len(cols), (name, v)
        rows.append(dict(zip(cols, v)))
    return PaperTable(name, caption, tuple(setting), tuple(metrics), tuple(rows))


_APS = ("AP", "AP50", "AP75")
_APS_SML = ("AP", "AP50", "AP75", "APs", "APm", "APl")

PAPER_TABLES: Dict[str, PaperTable] = {
    "1a": _table(
        "1a",
        "alpha-balanced CE, varying alpha (ResNet-50-FPN, 600 px, minival)",
        ("alpha",),
        _APS,
        [
            (0.10, 0.0, 0.0, 0.0),
            (0.25, 10.8, 16.0, 11.7),
            (0.50, 30.2, 46.7, 32.8),
            (0.75, 31.1, 49.4, 33.0),
            (0.90, 30.8, 49.7, 32.3),
            (0.99, 28.7, 47.4, 29.9),
            (0.999, 25.1, 41.7, 26.1),
        ],
    ),
    "1b": _table(
        "1b",
        "FL, varying gamma with its best alpha (ResNet-50-FPN, 600 px, minival)",
        ("gamma", "alpha"),
        _APS,
        [
            (0.0, 0.75, 31.1, 49.4, 33.0),
            (0.1, 0.75, 31.4, 49.9, 33.1),
            (0.2, 0.75, 31.9, 50.7, 33.4),
            (0.5, 0.50, 32.9, 51.7, 35.2),
            (1.0, 0.25, 33.7, 52.0, 36.2),
            (2.0, 0.25, 34.0, 52.5, 36.5),
            (5.0, 0.25, 32.2, 49.6, 34.8),
        ],
    ),
    "1c": _table(
        "1c",
        "anchors: #scales per octave x #aspect ratios (FL gamma 2, alpha .25)",
        ("scales", "aspect_ratios"),
        _APS,
        [
            (1, 1, 30.3, 49.0, 31.8),
            (2, 1, 31.9, 50.0, 34.0),
            (3, 1, 31.8, 49.4, 33.7),
            (1, 3, 32.4, 52.3, 33.9),
            (2, 3, 34.2, 53.1, 36.5),
            (3, 3, 34.0, 52.5, 36.5),
            (4, 3, 33.8, 52.1, 36.2),
        ],
    ),
    "1d": _table(
        "1d",
        "FL vs OHEM baselines (ResNet-101-FPN, 600 px, minival)",
        ("method", "batch_size", "nms"),
        _APS,
        [
            ("OHEM", 128, 0.7, 31.1, 47.2, 33.2),
            ("OHEM", 256, 0.7, 31.8, 48.8, 33.9),
            ("OHEM", 512, 0.7, 30.6, 47.0, 32.6),
            ("OHEM", 128, 0.5, 32.8, 50.3, 35.1),
            ("OHEM", 256, 0.5, 31.0, 47.4, 33.0),
            ("OHEM", 512, 0.5, 27.6, 42.0, 29.2),
            ("OHEM 1:3", 128, 0.5, 31.1, 47.2, 33.2),
            ("OHEM 1:3", 256, 0.5, 28.3, 42.4, 30.3),
            ("OHEM 1:3", 512, 0.5, 24.0, 35.5, 26.0),
            ("FL", None, None, 36.0, 54.9, 38.7),
        ],
    ),
    "1e": _table(
        "1e",
        "speed/accuracy (test-dev; time per image on an Nvidia M40)",
        ("depth", "scale"),
        _APS_SML + ("time_ms",),
        [
            (50, 400, 30.5, 47.8, 32.7, 11.2, 33.8, 46.1, 64),
            (50, 500, 32.5, 50.9, 34.8, 13.9, 35.8, 46.7, 72),
            (50, 600, 34.3, 53.2, 36.9, 16.2, 37.4, 47.4, 98),
            (50, 700, 35.1, 54.2, 37.7, 18.0, 39.3, 46.4, 121),
            (50, 800, 35.7, 55.0, 38.5, 18.9, 38.9, 46.3, 153),
            (101, 400, 31.9, 49.5, 34.1, 11.6, 35.8, 48.5, 81),
            (101, 500, 34.4, 53.1, 36.8, 14.7, 38.5, 49.1, 90),
            (101, 600, 36.0, 55.2, 38.7, 17.4, 39.6, 49.7, 122),
            (101, 700, 37.1, 56.6, 39.8, 19.1, 40.6, 49.4, 154),
            (101, 800, 37.8, 57.5, 40.8, 20.2, 41.1, 49.2, 198),
        ],
    ),
    "2": _table(
        "2",
        "COCO test-dev, single model, RetinaNet-800 with scale jitter, 1.5x schedule",
        ("backbone",),
        _APS_SML,
        [
            ("ResNet-101-FPN", 39.1, 59.1, 42.3, 21.8, 42.7, 50.2),
            ("ResNeXt-101-32x8d-FPN", 40.8, 61.1, 44.1, 24.1, 44.2, 51.2),
        ],
    ),
    "3": _table(
        "3",
        "FL* (Appendix A; ResNet-50, 600 px, minival)",
        ("loss", "gamma", "beta"),
        _APS,
        [
            ("CE", None, None, 31.1, 49.4, 33.0),
            ("FL", 2.0, None, 34.0, 52.5, 36.5),
            ("FL*", 2.0, 1.0, 33.8, 52.7, 36.3),
            ("FL*", 4.0, 0.0, 33.9, 51.8, 36.4),
        ],
    ),
}


def get_paper_table(name: str) -> PaperTable:
    """The paper's table ``name`` ("1a" ... "1e", "2", "3"), with a clear error otherwise."""
    key = str(name).lower().replace("table", "").strip()
    if key not in PAPER_TABLES:
        raise KeyError(f"Unknown paper table {name!r}; choose one of {sorted(PAPER_TABLES)}")
    return PAPER_TABLES[key]
