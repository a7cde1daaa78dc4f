"""``fit.json``, the file beside a checkpoint that says where its epoch stands: how many
minibatches of the current epoch were done, and what those minibatches were (the epoch layout),
so that the next ``fit`` of a loaded trainer finishes that epoch first.

:meth:`Trainer.save` writes it after the checkpoint; :meth:`Trainer.load` reads it here,
checked against the checkpoint beside it. Apart from ``_train.py`` (whose job is the trainer
itself) because reading it is mostly refusing a damaged or mismatched file, one field at a time.
"""

from __future__ import annotations

import json
from typing import Any

from ._fit import epoch_layout

_FIT_FILE = "fit.json"


def _epoch_batches(fit_file: str, minibatches: int) -> tuple[int, dict[str, Any] | None]:
    """Where the checkpoint's epoch stands, from its ``fit.json``, checked against the
    checkpoint's own minibatch count (a save interrupted between its files leaves another's),
    and the epoch layout it was counted in (``None`` in a ``fit.json`` of an older save)."""
    fix = f"delete {fit_file} to start the interrupted epoch over"
    try:
        with open(fit_file, encoding="utf-8") as f:
            fit = json.load(f)
        done = int(fit.get("epoch_batches", 0))
        saved = fit.get("minibatches")
        layout = _layout(fit.get("epoch_layout"))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{fit_file} is damaged ({exc}); {fix}") from exc
    if saved is not None and saved != minibatches:
        raise ValueError(
            f"{fit_file} was written after {saved} minibatches, the checkpoint beside it after "
            f"{minibatches} (a save interrupted between its files?); {fix}"
        )
    return done, layout


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
