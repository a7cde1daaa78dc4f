"""One ``Trainer.fit`` call from the trainer's side, once its plan is checked (``_fit_plan.py``):
where the unfinished epoch stands (started over where this fit's minibatches are others), the
callbacks' ``on_fit_start`` and ``on_fit_end`` (every one that started ends, however the fit
ends: :func:`_end_all`), and the run inside its progress bar, traced to the next trace file and
timed. Apart from ``_fit.py``, which runs the epochs and keeps the state, because this is what
happens around the run."""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._callback_states import (
    check_savable_callback_states,
    deliver_restored_epoch_ends,
    end_callback_states,
    start_callback_states,
)
from ._callbacks import Callback
from ._fit import _FitState, _Progress
from ._fit_plan import _FitPlan
from ._history import History
from ._runtime._lifecycle import run_trio

if TYPE_CHECKING:
    from ._train import Trainer


def run_fit(trainer: Trainer, plan: _FitPlan) -> History:
    """Runs the fit ``plan`` on ``trainer`` in this thread, which its callbacks run on (a
    notebook's fit runs on a worker thread); returns its :class:`History`."""
    trainer._fit_thread = threading.get_ident()
    try:
        # (before any callback starts: a loaded trainer's saved states go to the callbacks
        # given in their places, which on_fit_start then sees)
        start_callback_states(trainer, plan.callbacks)
        try:
            return _fit_here(trainer, plan)
        finally:  # (what a save after the fit records, also after an interrupt)
            end_callback_states(trainer)
    finally:
        trainer._fit_thread = None


def _fit_here(trainer: Trainer, plan: _FitPlan) -> History:
    """:func:`run_fit`'s work, on the fit's thread."""
    dataset = plan.dataset
    per_epoch = dataset.num_batches(plan.batch_size, plan.drop_last)
    counted = trainer._epoch_layout  # (None: a position of an older save, taken as it comes)
    same = counted is not None and counted == plan.epoch_layout(trainer.seed)
    # (all of the epoch's minibatches: its end is pending, which the position says only
    # with its layout; an older save's never reached its epoch's end)
    going_on = trainer.epoch_batches < per_epoch and counted is None
    going_on |= trainer.epoch_batches <= per_epoch and same
    if plan.epochs and trainer.epoch_batches and not going_on:
        # counted in other minibatches (other data, sizes, order): that epoch starts over
        trainer.epoch_batches = 0
        trainer._epoch_layout = None
        trainer._epoch_losses = []
    total = plan.epochs * per_epoch - (trainer.epoch_batches if plan.epochs else 0)
    history = History()
    trainer.history = history
    trainer.stop_training = False
    fit = _FitState(trainer, plan, history)
    trace_path = _next_trace_path(trainer)
    before = _file_mark(trace_path)
    start = time.perf_counter()
    started: list[Callback] = []
    try:
        for cb in plan.callbacks:
            cb.on_fit_start(trainer)
            started.append(cb)
        # the epoch end a loaded trainer's checkpoint counted as done but that had not reached
        # some of the saved fit's callbacks (a save from an earlier one's on_epoch_end): their
        # successors have it now, as the unbroken fit's had it (one may stop the fit here)
        deliver_restored_epoch_ends(trainer)
        if plan.checkpoint_every:  # (its saves would refuse such a state only after training)
            check_savable_callback_states(plan.callbacks)
    except BaseException as exc:  # those started end (a logger closes its file), then it
        _end_all(started, trainer, history, exc)  # raises
        raise
    try:
        try:
            with _Progress(trainer.progress, total) as bar:
                fit.bar = bar
                trainer._run_open = True
                trainer._weights_pending = trainer.cluster is not None
                try:
                    run_trio(fit.main, trace_path)
                finally:
                    trainer._run_open = trainer._weights_pending = False
        except BaseException:
            fit.keep()
            raise
        finally:
            # (listed now: the function a fit handed over holds the fit)
            trainer._epoch_losses_list = trainer._epoch_losses
            if trace_path is not None and _file_mark(trace_path) not in (None, before):
                # (only a trace this fit wrote: one that failed before its run opened the
                # trace, or whose path another run held, wrote none)
                trainer.traces.append(trace_path)
            history.seconds = time.perf_counter() - start
            history.samples_per_second = fit.rows / history.seconds if history.seconds > 0 else 0.0
    except BaseException as exc:  # it goes on, whatever the callbacks' ends raise
        _end_all(plan.callbacks, trainer, history, exc)
        raise
    _end_all(plan.callbacks, trainer, history)
    return history


def _next_trace_path(trainer: Trainer) -> str | None:
    """The trace file of ``trainer``'s next fit: its ``trace``, then ``NAME.1.EXT``,
    ``NAME.2.EXT``, ... (one per fit traced so far); None without a trace."""
    if trainer.trace is None:
        return None
    if not trainer.traces:
        return trainer.trace
    import os

    stem, ext = os.path.splitext(trainer.trace)
    return f"{stem}.{len(trainer.traces)}{ext}"


def _file_mark(path: str | None) -> tuple[int, int, int, int] | None:
    """What tells the file at ``path`` apart from a later write of it (device, inode,
    modification time, size), or None where there is none: a run's trace writer empties and
    writes the file it opens, so a trace that a fit wrote changed its mark."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _end_all(
    callbacks: Sequence[Callback],
    trainer: Trainer,
    history: History,
    propagating: BaseException | None = None,
) -> None:
    """Every callback's ``on_fit_end``, even where one raises (a logger after it must still
    close its file); then the first error, if any, with any later ones as notes.

    Where the fit is already raising ``propagating`` (an error, or a ``KeyboardInterrupt`` that
    the CLI turns into exit status 130), the callbacks' errors do not replace it: each is added
    to it as a note, traceback included, and nothing is raised here (the caller re-raises it).
    """
    first = propagating
    for cb in callbacks:
        try:
            cb.on_fit_end(trainer, history)
        except BaseException as exc:  # noqa: BLE001 - raised below, once all have ended
            if first is None:
                first = exc
            else:
                first.add_note(
                    f"{type(cb).__name__}.on_fit_end raised too, while this was raised:\n"
                    + "".join(traceback.format_exception(exc, chain=False)).rstrip()
                )
    if first is not None and first is not propagating:
        raise first
