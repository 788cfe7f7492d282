"""
A tests/ helper (on sys.path under pytest): the one comparison of two detectors' inference
outputs used by the speed-path tests, so that every fast path is held to the same tolerances.
"""
import torch


def assert_same_detections(outputs, references, more_than=0):
    """
    ``outputs`` / ``references``: detectron2 inference outputs (lists of {"instances": ...}).
    Per image: the same number of detections (and more than ``more_than``, so that the check
    compares something), the same classes, and scores / boxes equal up to float32 re-ordering
    (a fused or channels-last conv sums in another order; boxes are in pixels, hence atol 1e-3).
    """
    for o, r in zip(outputs, references):
        o, r = o["instances"], r["instances"]
        assert len(o) == len(r) > more_than
        torch.testing.assert_close(o.scores, r.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(o.pred_classes, r.pred_classes)
        torch.testing.assert_close(o.pred_boxes.tensor, r.pred_boxes.tensor, rtol=1e-4, atol=1e-3)


def assert_same_detection_lists(got, ref, min_count=1, box_atol=1e-3, score_atol=1e-5):
    """
    ``got`` / ``ref``: ``(boxes (R, 4), scores (R,), classes (R,))`` of one image from two
    implementations (e.g. an exported graph and the eager model). The same number of detections
    (at least ``min_count``), and a one-to-one pairing in which each pair has the same class,
    scores within ``score_atol`` and boxes within ``box_atol`` px. Detections whose scores are
    equal to within ``score_atol`` may come in another order (two top-k / sort implementations
    order exact ties differently); everything else must be in the same place.
    """
    (gb, gs, gc), (rb, rs, rc) = got, ref
    assert len(gs) == len(rs) >= min_count, (len(gs), len(rs))
    assert gb.dtype == gs.dtype == torch.float32 and gc.dtype == torch.int64
    assert bool((gs[1:] <= gs[:-1]).all()), "scores must be in descending order"
    fits = (
        ((gs[:, None] - rs[None, :]).abs() <= score_atol)
        & (gc[:, None] == rc[None, :])
        & ((gb[:, None, :] - rb[None, :, :]).abs().amax(dim=2) <= box_atol)
    )
    taken = torch.zeros(len(rs), dtype=torch.bool)
    for i in range(len(gs)):
        free = (fits[i] & ~taken).nonzero().flatten()
        assert len(free), f"detection {i} (score {gs[i]:.6f}, class {gc[i]}, box " \
                          f"{gb[i].tolist()}) has no counterpart"
        taken[free[0]] = True
        # only a tie may move a detection away from its place
        assert free[0] == i or (rs[i] - gs[i]).abs() <= score_atol, (i, int(free[0]))
