"""``python -m focal_det.data``: build (or reuse) the demo dataset and print what it holds."""

from .deepforest import main

main()
