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
