"""
Data for training on detectron2's registered datasets: the extra augmentations
(``augment``), a training stream that ``--resume`` continues exactly (``resumable``) and clear
errors for data that is wrong in the usual ways (``sanitize``). The demo's dataset is in
``focal_det.demo``.
"""
