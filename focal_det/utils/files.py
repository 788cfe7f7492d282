"""
Two file helpers that checkpoints, downloaded wheels and extracted weights share: a file that
appears complete or not at all (:func:`atomic_open`), and the SHA-256 of a file
(:func:`sha256_of_file`).
"""
import contextlib
import hashlib
import os
import secrets

__all__ = ["atomic_open", "sha256_of_file"]


def sha256_of_file(path, chunk_size=1 << 20):
    """Hex SHA-256 of a file, read in chunks (checkpoints and wheels are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path):
    # Make the rename itself durable (POSIX); not available on every OS/filesystem.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp_file(folder, prefix, suffix):
    # os.open with mode 0o666 lets the kernel apply the umask, exactly as open() does;
    # tempfile.mkstemp would force 0600, unreadable by a server running as another user.
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a temporary file {prefix}*{suffix} in {folder}")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """
    ``open(path, mode)`` for writing such that readers see either the old file or the complete
    new one: the content goes to ``.<name>.<random>.tmp`` in the same folder, is fsynced and
    ``os.replace``-d onto ``path`` when the block ends without an exception. On any exception
    (KeyboardInterrupt included) the temporary file is removed; a process killed inside the
    block leaves only the temporary file behind, never a partial ``path``.

    Args:
        path (str): final local path.
        mode (str): "wb" or "w".
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp_file(folder, "." + os.path.basename(path) + ".", ".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
