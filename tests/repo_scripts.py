"""
Paths of the repository and a loader for its scripts (tools/*.py, train_net.py), which are
files rather than modules of an importable package. A tests/ helper, on sys.path under pytest
like synthetic_detection.
"""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick", "retinanet_tiny_quick.yaml")


def load_script(relpath, name=None):
    """Import ``REPO/relpath`` (e.g. "tools/run_table.py") as a module named ``name``."""
    name = name or os.path.splitext(os.path.basename(relpath))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
