"""What :meth:`Trainer.save` checks and records before the checkpoint folder is written
(``_checkpoint_save.py`` writes it): no empty path, no save from another thread while a fit
runs, nor of a cluster's fit before its workers send their weights back; where the current
epoch stands, in the spec's record and in ``fit.json``."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checkpoint_files import write_whole
from ._fit import _synchronize
from ._fit_file import _FIT_FILE

if TYPE_CHECKING:
    from ._train import Trainer

__all__ = ["save_trainer"]


def save_trainer(trainer: Trainer, path: str | os.PathLike[str]) -> None:
    """:meth:`Trainer.save` (see there)."""
    from ._checkpoint_save import save_checkpoint

    path = os.fspath(path)
    if not path:  # (open() failed on it with a bare "No such file or directory: ''")
        raise ValueError(
            "save: an empty path (an unset variable?); give a folder to write the checkpoint "
            "to (e.g. tr.save('ckpt'))"
        )
    trainer._check_graph("save")
    trainer._refuse_during_fit(
        "save", " on another thread: its weights and counters would be read in the middle "
        "of an update", "save from the fit's callbacks (on_epoch_end; or pass fit "
        "checkpoint_every), or after the fit returns", own_thread=True,
    )  # fmt: skip

    if trainer._weights_pending:
        # (as checkpoint_every is refused there: the trainer holds the weights from before
        # the fit, and the checkpoint would silently be of them)
        raise RuntimeError(
            "save: a fit on a cluster is running: its workers send their weights back only "
            "at the end of its run, so inside a step or epoch hook the trainer holds the "
            "weights from before the fit, and this checkpoint would hold none of its "
            "training; save in on_fit_end or after the fit returns (call fit one epoch at "
            "a time to save between epochs)"
        )
    _synchronize(trainer.graph, trainer.cluster)  # (from a callback on a GPU: see params)
    position = {
        "epoch_batches": trainer.epoch_batches,
        # (a numpy int as JSON's; any other value is the checkpoint's to refuse, below)
        "minibatches": _json_int(trainer.state.minibatches),
        # (at an epoch's start, the last epoch's: the minibatches the run went in)
        "epoch_layout": trainer._epoch_layout,
    }
    # serialised first: a value JSON cannot hold fails the save before anything is written
    fit = json.dumps(position)
    # (the spec's record only: fit.json is for an asyncnn that reads no more than above)
    losses = list(trainer._epoch_losses) if trainer.epoch_batches else []
    record: dict[str, Any] = {**position, "epoch_losses": [loss for loss, _ in losses]}
    rows = [r for _, r in losses]
    # the weight of each loss in the epoch's; apart, so that an older asyncnn reads the
    # losses as it did (and none where a checkpoint of one left them unknown)
    if None not in rows:
        record["epoch_rows"] = rows
    save_checkpoint(trainer, path, record)
    write_whole(os.path.join(path, _FIT_FILE), fit)  # (no fit.json.tmp left on a failure)


def _json_int(value: Any) -> Any:
    """``value`` as an int where it is a numpy integer (a state given back by a decoder), else
    as it is."""
    return int(value) if isinstance(value, np.integer) else value
