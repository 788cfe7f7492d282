"""
Whether loaded weights hold the model: ``--eval-only`` and ``demo.py`` refuse weights that leave
the head, or most of the model, randomly initialised (another architecture's checkpoint, an
empty dict), since the AP would be that of random layers.
"""
import logging

__all__ = ["MissingWeightsError", "check_eval_weights", "missing_weights", "weights_problem"]

logger = logging.getLogger(__name__)


def missing_weights(model, incompatible):
    """
    What a load left uninitialised: ``{group: (missing, total, [names])}`` with ``group`` the
    first component of the parameter name ("head", "backbone", ...); mis-shaped tensors, which
    fvcore skips, count as missing.
    """
    keys = list(model.state_dict().keys())
    lost = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
    out = {}
    for k in keys:
        group = k.split(".")[0]
        n_lost, total, names = out.get(group, (0, 0, []))
        if k in lost:
            n_lost += 1
            names = names + [k]
        out[group] = (n_lost, total + 1, names)
    return out


def weights_problem(model, incompatible, head_prefix="head"):
    """
    None if the loaded weights cover the model; else a sentence saying what is missing: any
    tensor of the head, or more than half of all tensors (a checkpoint of another model, an
    empty dict), leaves a model whose predictions are those of random layers.
    """
    groups = missing_weights(model, incompatible)
    n_lost = sum(g[0] for g in groups.values())
    n_all = sum(g[1] for g in groups.values())
    head_lost = groups.get(head_prefix, (0, 0, []))[0]
    if not head_lost and n_lost * 2 <= n_all:
        return None
    parts = [
        f"{lost} of {total} '{name}' tensors ({', '.join(names[:4])}{', ...' if lost > 4 else ''})"
        for name, (lost, total, names) in groups.items()
        if lost
    ]
    return f"{n_lost} of the model's {n_all} weight tensors are not in it: " + "; ".join(parts)


class MissingWeightsError(RuntimeError):
    """--eval-only on weights that do not hold (most of) the model."""


def check_eval_weights(cfg, model, checkpointer, command="--eval-only"):
    """
    Raise :class:`MissingWeightsError` when what ``checkpointer`` loaded leaves the head, or
    most of the model, randomly initialised (``TEST.ALLOW_MISSING_WEIGHTS True``: warn only).
    ``command`` names what is evaluating, for the message.
    """
    inc = getattr(checkpointer, "last_incompatible", None)
    if inc is None:  # nothing was loaded
        problem = "MODEL.WEIGHTS is empty, so no weights were loaded"
    else:
        problem = weights_problem(model, inc)
        if problem is None:
            return
        problem = f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} does not hold this model: {problem}"
    message = (
        f"{command}: {problem}. The AP would be that of randomly initialised layers. Pass the "
        "checkpoint this config trained (e.g. OUTPUT_DIR/model_final.pth; a checkpoint of "
        "another architecture, such as Faster R-CNN, or of another number of classes does not "
        "fit), or set TEST.ALLOW_MISSING_WEIGHTS True to evaluate anyway."
    )
    if not cfg.TEST.ALLOW_MISSING_WEIGHTS:
        raise MissingWeightsError(message)
    logger.warning(message + " (evaluating anyway: TEST.ALLOW_MISSING_WEIGHTS is True)")
