"""Where a checkpoint's epoch stands: how many minibatches of the current epoch were done, and
what those minibatches were (the epoch layout), so that the next ``fit`` of a loaded trainer
finishes that epoch first.

:meth:`Trainer.save` keeps it in the checkpoint's spec (``spec["fit"]``, renamed into place with
the weights, so the two never disagree) and, for an asyncnn that predates it, in ``fit.json``
beside the checkpoint. Loading reads the spec's, and ``fit.json`` only for a checkpoint whose
spec has none (written by an older asyncnn), checked against the checkpoint's own minibatch count
(a save interrupted between its files leaves another's). Apart from ``_checkpoint.py`` because
reading it is mostly refusing a damaged or mismatched record, one field at a time.
"""

from __future__ import annotations

import json
from typing import Any

from ._fit import epoch_layout

_FIT_FILE = "fit.json"


def fit_position(fit: Any, minibatches: int) -> tuple[int, dict[str, Any] | None]:
    """Where the epoch stands, from a position record ``{"epoch_batches", "minibatches",
    "epoch_layout"}`` (the spec's ``"fit"``, or ``fit.json``'s object), and the epoch layout it
    was counted in (``None`` in a record of an older save, which kept none).

    Raises:
        ValueError: a field is damaged (named), or the record was written after another number
            of minibatches than ``minibatches`` (the message says both).
    """
    if not isinstance(fit, dict):
        raise ValueError(f"it is {type(fit).__name__}, not an object")
    done = fit.get("epoch_batches", 0)
    if type(done) is not int or done < 0:
        raise ValueError(f"epoch_batches is {done!r:.80}, not an int >= 0")
    layout = _layout(fit.get("epoch_layout"))
    saved = fit.get("minibatches")
    if saved is not None and saved != minibatches:
        raise _Foreign(
            f"it was written after {saved!r:.80} minibatches, the checkpoint after {minibatches}"
        )
    return done, layout


class _Foreign(ValueError):
    """A position record of another save than the checkpoint's."""


def _epoch_batches(fit_file: str, minibatches: int) -> tuple[int, dict[str, Any] | None]:
    """Where the checkpoint's epoch stands, from its ``fit.json`` (see :func:`fit_position`)."""
    fix = f"delete {fit_file} to start the interrupted epoch over"
    try:
        with open(fit_file, encoding="utf-8") as f:
            fit = json.load(f)
        return fit_position(fit, minibatches)
    except _Foreign:
        raise ValueError(
            f"{fit_file} was written after {fit.get('minibatches')} minibatches, the checkpoint "
            f"beside it after {minibatches} (a save interrupted between its files?); {fix}"
        ) from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{fit_file} is damaged ({exc}); {fix}") from exc


def _layout(value: Any) -> dict[str, Any] | None:
    """``fit.json``'s ``epoch_layout``, checked field by field (``ValueError`` naming one)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"epoch_layout is {value!r}, not an object")
    ints = {"rows": 0, "batch_size": 1}
    for key, low in ints.items():
        v = value.get(key)
        if type(v) is not int or v < low:
            raise ValueError(f"epoch_layout[{key!r}] is {v!r}, not an int >= {low}")
    for key in ("shuffle", "drop_last"):
        if not isinstance(value.get(key), bool):
            raise ValueError(f"epoch_layout[{key!r}] is {value.get(key)!r}, not true or false")
    seed = value.get("seed")
    if seed is not None and (type(seed) is not int or seed < 0):
        raise ValueError(f"epoch_layout['seed'] is {seed!r}, not an int >= 0 or null")
    return epoch_layout(
        value["rows"], value["batch_size"], value["shuffle"], seed, value["drop_last"]
    )
