"""
Datasets of focal_det. Importing this package registers the demo's tree-crown dataset
(``deepforest_trees_train`` / ``deepforest_trees_val``, built on first use from the ``deepforest``
wheel on PyPI) in detectron2's DatasetCatalog / MetadataCatalog.
"""

from .deepforest import (  # noqa: F401
    DEEPFOREST_SPLITS,
    build_deepforest_trees,
    deepforest_trees_root,
    register_deepforest_trees,
)
from .wheels import fetch_pinned_wheel, focal_det_cache_dir  # noqa: F401

register_deepforest_trees()
