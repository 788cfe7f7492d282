"""A config key that names an entry of a detectron2 ``Registry``: the lookup, with a clear error."""
import difflib

__all__ = ["UnregisteredNameError", "get_registered"]


class UnregisteredNameError(KeyError):
    """A config key names nothing registered; the message lists what is."""

    def __str__(self):  # KeyError's own str() is the repr of its message
        return str(self.args[0])


def get_registered(registry, key: str, name: str):
    """
    ``registry.get(name)`` for the value ``name`` of config key ``key``; raises
    :class:`UnregisteredNameError` with the closest registered name and all of them.
    """
    if name in registry:
        return registry.get(name)
    registered = sorted(k for k, _ in registry)
    close = difflib.get_close_matches(str(name), registered, n=1, cutoff=0.5)
    did = f" Did you mean {close[0]!r}?" if close else ""
    raise UnregisteredNameError(f"{key}={name!r} is not registered.{did} Registered: {registered}")
