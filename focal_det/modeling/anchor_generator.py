"""
Detectron's RetinaNet anchors (the paper's released code), as a detectron2 anchor generator:
``MODEL.ANCHOR_GENERATOR.NAME: "DetectronAnchorGenerator"`` (every ``configs/zoo/Detectron``
config), for the models trained with them.

Detectron (``modeling/generate_anchors.py``, called per level, octave scale and aspect ratio by
``core/test_retinanet.py`` and ``roi_data/retinanet.py``) builds a cell anchor of sqrt-area
``size`` and aspect ratio ``r = h / w`` on a level of stride ``s`` in its "+1" pixel convention
(a box ``[x1, y1, x2, y2]`` covers the pixels x1..x2, so its width is ``x2 - x1 + 1``):

1. the base anchor is the s x s box of pixels 0..s-1, centred at ``c = (s - 1) / 2``;
2. ``_ratio_enum`` reshapes it to the ratio at whole pixels: ``w_r = round(sqrt(s^2 / r))``,
   ``h_r = round(w_r * r)`` (numpy's round, half to even);
3. ``_scale_enum`` scales both by ``size / s``: ``W = w_r * size / s``, ``H = h_r * size / s``,
   around the same centre: ``[c - (W - 1) / 2, c - (H - 1) / 2, c + (W - 1) / 2,
   c + (H - 1) / 2]``;
4. the anchor at feature-map cell (x, y) is that box shifted by ``(x s, y s)``.

How detectron2's ``DefaultAnchorGenerator`` differs: its cell anchor is the exact
``sqrt(size^2 / r) x r sqrt(size^2 / r)`` box centred at the cell corner (``OFFSET 0.0``) or
the cell centre (``OFFSET 0.5``). Detectron's centre ``(s - 1) / 2`` in the +1 convention is
``s / 2`` in continuous coordinates, so with ``OFFSET 0.0`` every anchor of a converted model
is half a stride off (4 px on P3 ... 64 px on P7), and its non-square anchors are not the
rounded ones it was trained with (s = 8, size 32, r = 0.5: Detectron 44 x 24, detectron2
45.25 x 22.63).

:class:`DetectronAnchorGenerator` overrides only the cell-anchor computation: the cell anchors
are Detectron's boxes in continuous coordinates ``[x1, y1, x2 + 1, y2 + 1]`` (so their widths
are Detectron's ``x2 - x1 + 1``), and detectron2's grid shift (``OFFSET 0.0``) adds ``(x s, y s)``
as Detectron does. In these coordinates Detectron's +1 box coding (``utils/boxes.py``
``bbox_transform``: widths ``x2 - x1 + 1``, centre ``x1 + w / 2``, decoded ``x2 = cx + w / 2 - 1``)
is detectron2's ``Box2BoxTransform`` (widths ``x2 - x1``, decoded ``x2 = cx + w / 2``), and its
+1 IoU is detectron2's IoU: the decoded boxes are Detectron's ``[x1, y1, x2 + 1, y2 + 1]``
(tested in ``tests/test_anchor_generator.py``).
"""
import math
from typing import List, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    BufferList,
    DefaultAnchorGenerator,
)

__all__ = ["DetectronAnchorGenerator", "detectron_cell_anchors"]


def detectron_cell_anchors(
    stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]
) -> torch.Tensor:
    """
    Detectron's cell anchors of one level (module docstring, steps 1-3), sizes outer and
    aspect ratios inner (Detectron's octave-then-ratio order, as detectron2's).

    Args:
        stride: the level's stride s (8 for P3 ... 128 for P7).
        sizes: sqrt-areas of the anchors in pixels (the paper's 4 s 2^(i/3)).
        aspect_ratios: h / w of the anchors.

    Returns:
        (len(sizes) * len(aspect_ratios), 4) float64 XYXY boxes in continuous coordinates
        (Detectron's ``[x1, y1, x2 + 1, y2 + 1]``), relative to the cell's top-left corner.
    """
    centre = (stride - 1) / 2.0  # of the pixels 0..s-1, in Detectron's +1 convention
    boxes = []
    for size in sizes:
        scale = size / stride
        for ratio in aspect_ratios:
            if not ratio > 0:
                raise ValueError(
                    f"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS contains {ratio}: an aspect ratio "
                    "(h / w) must be > 0."
                )
            # Python's round, like numpy's, rounds halves to even (stride 8, r = .5: 5.5 -> 6).
            w = round(math.sqrt(stride * stride / ratio))
            h = round(w * ratio)
            half_w, half_h = 0.5 * (w * scale - 1), 0.5 * (h * scale - 1)
            boxes.append(
                [centre - half_w, centre - half_h, centre + half_w + 1, centre + half_h + 1]
            )
    return torch.tensor(boxes, dtype=torch.float64)


@ANCHOR_GENERATOR_REGISTRY.register()
class DetectronAnchorGenerator(DefaultAnchorGenerator):
    """
    detectron2's ``DefaultAnchorGenerator`` with Detectron's cell anchors
    (:func:`detectron_cell_anchors`); the grid, the outputs and the config keys
    (``MODEL.ANCHOR_GENERATOR.SIZES / ASPECT_RATIOS``) are detectron2's. ``OFFSET`` must be 0:
    Detectron's anchors carry their centre offset in the cell anchors themselves.
    """

    @configurable
    def __init__(self, *, sizes, aspect_ratios, strides, offset=0.0):
        if offset != 0.0:
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.OFFSET={offset}: DetectronAnchorGenerator's cell anchors "
                "already sit where Detectron put them (centred at stride / 2 of the cell), so "
                "the grid must not shift them again; set MODEL.ANCHOR_GENERATOR.OFFSET 0.0."
            )
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=offset)

    def _calculate_anchors(self, sizes: List[List[float]], aspect_ratios: List[List[float]]):
        # The smallest hook: DefaultAnchorGenerator.generate_cell_anchors has no stride, which
        # Detectron's anchors depend on (the rounding happens on the stride-sized base anchor).
        return BufferList(
            [
                detectron_cell_anchors(stride, s, a).float()
                for stride, s, a in zip(self.strides, sizes, aspect_ratios)
            ]
        )
