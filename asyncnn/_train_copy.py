"""Copies of a :class:`~asyncnn.Trainer`: ``copy.deepcopy`` makes an independent trainer (its own
locks, its cluster shared), refused while a fit runs; pickle is refused, naming ``save`` and
``Trainer.load``, since a trainer holds locks and may hold a cluster's processes, and asyncnn
moves a trainer between processes as a checkpoint, never as a pickle."""

from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING, Any

from ._fit import _synchronize

if TYPE_CHECKING:
    from ._train import Trainer

__all__ = ["PICKLE_REFUSAL", "deepcopy_trainer"]

#: what ``pickle.dumps(trainer)`` raises (a ``TypeError``, as pickle's own refusals are)
PICKLE_REFUSAL = (
    "cannot pickle a Trainer: it holds the locks of its fits (and a cluster's processes, where "
    "it has one), and asyncnn never moves a trainer as a pickle; to hand it to another process "
    "or keep it, save it and load it there: tr.save(path), then tr2 = ann.Trainer.load(path); "
    "for a copy in this process (to branch a sweep), copy.deepcopy(tr)"
)

#: the attributes a copy makes afresh: a fit's locks and the thread running it are the
#: original's own (a copy sharing the lock would refuse its fits while the original fits)
_FRESH = ("_fit_lock", "_interrupt", "_fit_thread")


def deepcopy_trainer(trainer: Trainer, memo: dict[int, Any]) -> Trainer:
    """``copy.deepcopy(trainer)``: a new trainer with a deep copy of everything the original
    holds (see :meth:`Trainer.__deepcopy__`) but its cluster (shared) and its fit's locks (new).

    Raises:
        RuntimeError: a fit is running on ``trainer`` (from another thread or its callbacks).
    """
    # held for the copy: a fit starting on another thread meanwhile would change the state
    # half-way through it (and is refused, as a second fit is)
    if not trainer._fit_lock.acquire(blocking=False):
        raise RuntimeError(
            "deepcopy: a fit is already running on this trainer (called from another thread, or "
            "from one of its callbacks): its weights and counters would be copied in the middle "
            "of an update; copy it after the fit returns (from another thread: join that thread "
            "first), or save it from a callback (trainer.save(path) in on_epoch_end, or fit's "
            "checkpoint_every) and make the copy with ann.Trainer.load(path)"
        )
    try:
        # (as save does: a copy on the current stream would not wait for work queued on a
        # GPU's other streams)
        _synchronize(trainer.graph, trainer.cluster)
        # (the unfinished epoch's losses, which a fit hands over as a function reading its own
        # bookkeeping: listed now, else the copy would deep-copy that fit's whole state)
        trainer._epoch_losses  # noqa: B018
        twin = object.__new__(type(trainer))
        memo[id(trainer)] = twin
        if trainer.cluster is not None:  # (it owns processes: shared, never copied)
            memo[id(trainer.cluster)] = trainer.cluster
        for name, value in vars(trainer).items():
            if name not in _FRESH:
                vars(twin)[name] = copy.deepcopy(value, memo)  # (past any setter's checks)
    finally:
        trainer._fit_lock.release()
    twin._interrupt = threading.Event()
    twin._fit_lock = threading.Lock()
    twin._fit_thread = None
    if twin.config.trace is not None:
        # numbered on from the same traces, the copy's next trace would be written over the
        # original's next one (or the original's over the copy's): it records none until given
        # a path of its own
        vars(twin)["config"] = twin.config.replace(trace=None)
    return twin
