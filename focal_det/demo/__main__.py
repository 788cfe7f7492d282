"""``python -m focal_det.demo``: the demo job (``make demo``); ``--help`` for its options."""
import sys

from .job import main

sys.exit(main())
