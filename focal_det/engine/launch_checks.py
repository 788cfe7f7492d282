"""
Checks of the multi-process launch arguments of ``train_net.py`` (detectron2's
``default_argument_parser``), made before ``launch`` spawns anything.
"""
import socket
from urllib.parse import urlparse

__all__ = ["dist_url_problem"]


def _port_in_use(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As torch's TCPStore: a port left in TIME_WAIT by a finished run is free to bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def dist_url_problem(args):
    """
    A sentence saying why ``args.dist_url`` cannot work on this machine, with the fix, or None.

    With more than one process, rank 0 (``--machine-rank 0``) listens on the port of a
    ``tcp://`` ``--dist-url``. detectron2's default port depends only on the user id, so a
    second run of the same user (or any program on that port) makes every spawned worker die
    with a deep ``EADDRINUSE`` traceback that never mentions ``--dist-url``.
    """
    world = args.num_gpus * args.num_machines
    if world <= 1 or args.machine_rank != 0 or not str(args.dist_url).startswith("tcp://"):
        return None
    url = urlparse(args.dist_url)
    if url.port is None or not _port_in_use(url.port):
        return None
    auto = " or --dist-url auto (detectron2 picks a free port)" if args.num_machines == 1 else ""
    return (
        f"--dist-url {args.dist_url}: port {url.port} is already in use on this machine "
        f"(another training run? detectron2's default port is the same for all runs of a user). "
        f"Pass a free port, e.g. --dist-url tcp://{url.hostname}:{_free_port()}{auto}."
    )
