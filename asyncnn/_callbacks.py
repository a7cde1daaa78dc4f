"""Callbacks of ``Trainer.fit``: hooks at the end of each step and epoch, early stopping, and
metrics loggers (JSON lines; TensorBoard scalars through ``tensorboardX``)."""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import time
from collections.abc import Iterable
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._train import History, Trainer

__all__ = ["Callback", "EarlyStopping", "JSONLLogger", "TensorBoardLogger"]


class Callback:
    """Base class of ``fit``'s callbacks: override the hooks you need.

    Hooks run in ``fit``'s own thread, between steps. ``trainer.params`` and
    ``trainer.versions`` are those of the last completed update; under a streaming policy
    (``PipeDream``, ``PipeDream2BW``, ``Async``) what the fit would keep if it stopped there
    (see ``docs/workflow.md``), so ``trainer.save`` from a hook writes a resumable state. Set
    ``trainer.stop_training = True`` to end the fit after the current step (no minibatch is
    admitted after it; those in flight under a streaming policy finish first).

    The order: ``on_fit_start``; then for each epoch, ``on_step_end`` of each of its
    minibatches, in step order (under ``Async``, the order their losses come in), each once
    its loss is known (under a streaming policy a few steps after it was admitted; under
    ``Sync``, ``GPipe``, ``OneFOneB`` and the other policies that flush, before the next
    minibatch is admitted), then that epoch's ``on_epoch_end``; ``on_fit_end`` last.

    On a cluster the hooks come as in one process (under a policy that flushes, a stop there
    trains the same minibatches), but the workers send their weights back only at the end of
    the run: until then a hook sees the trainer's state from before the fit, and
    ``trainer.save`` is refused.

    Example:
        ```python
        class PrintEvery(ann.callbacks.Callback):
            def on_step_end(self, trainer, step, logs):
                if step % 10 == 0:
                    print(step, logs["loss"])
        ```
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once before the first step."""

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        """Called when minibatch ``step`` (counted over the trainer's life) has its loss.

        ``logs`` holds ``"loss"`` and ``"epoch"``.
        """

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        """Called after each epoch, once its updates are applied everywhere.

        ``logs`` holds ``"epoch"``, ``"loss"`` (the epoch's loss over its rows: each
        minibatch's loss weighted by its rows, as ``Trainer.evaluate`` weighs its batches, or
        summed for a loss of ``reduction="sum"``; see :attr:`History.epochs`) and, with
        ``validation_data``, ``"val_loss"`` (and ``"val_accuracy"`` for a classifier).
        """

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        """Called when ``fit`` ends, also when it ends by an error or an interrupt."""

    def callback_state(self) -> Any:
        """This callback's own state that a resumed fit goes on from (``EarlyStopping``'s
        counters), or None (the default: it keeps none).

        Checkpoints keep it: :meth:`Trainer.save <asyncnn.Trainer.save>` (also
        ``checkpoint_every``'s, and a save after the fit returned or was interrupted) records
        the state of each callback of the trainer's latest fit, and the first ``fit`` of a
        trainer loaded from it hands each state to :meth:`load_callback_state` of the callback
        given in its place (of a class of the same name and package, and as many callbacks of
        that class before it), before ``on_fit_start``. Until a fit of the loaded trainer has
        ended an epoch, the states stay its checkpoint's: a first fit that fails before, or
        trains no epoch, leaves them to the next (and a save writes them). A save from an
        earlier callback's ``on_epoch_end`` (or after an error there) records that epoch's end
        as still due to this callback, which the resumed fit delivers to the one in its place
        after ``on_fit_start``. Plain data only: None, bools, ints (of 64 bits), floats, strs
        (of UTF-8 text), and lists, tuples and str-keyed dicts of them (a tuple comes back as
        a list, a numpy scalar as the Python number).
        """
        return None

    def load_callback_state(self, state: Any) -> None:
        """Takes up what :meth:`callback_state` returned, as kept in a checkpoint (called on the
        callback given to the first ``fit`` of a loaded trainer, before its ``on_fit_start``).

        (A callback whose class overrides neither method is given no state: the fit warns
        that the saved one is dropped, and it starts afresh.)

        Raises:
            ValueError: ``state`` does not fit this callback (one of other settings saved
                it): the fit warns, saying why, and this callback starts afresh.
            TypeError: the callback's class overrides :meth:`callback_state` but not this
                method, so it saves a state it cannot take back.
        """
        raise TypeError(
            f"{type(self).__name__} was given a saved state but keeps none (its class "
            "overrides callback_state, not load_callback_state); override callback_state and "
            "load_callback_state together"
        )


#: The hooks ``fit`` calls, in the order it first calls them.
HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))

# What the words of a hook-like name mean (Keras's, Lightning's, and the like), for
# suggest_hook: when in its unit a hook runs, and the unit. fit has no hook at the start of a
# step or of an epoch: a name of one is pointed to the hook at its end, saying so.
_WHEN = {
    "start": ("begin", "beginning", "start", "starting", "started", "init", "setup", "before"),
    "end": ("end", "ending", "ended", "finish", "finished", "done", "complete", "after"),
}
_UNIT = {
    "step": ("batch", "step", "iteration", "iter", "minibatch", "microbatch", "update"),
    # (fit validates at each epoch's end: validation_data's metrics are in on_epoch_end's logs)
    "epoch": ("epoch", "validation", "val", "eval", "evaluation"),
    "fit": ("fit", "train", "training", "run", "trainer"),
}
# what fit never does: no hook of its is meant
_NOT_FIT = ("test", "predict", "prediction", "inference", "sanity")
_WORDS = {
    **{w: ("when", k) for k, ws in _WHEN.items() for w in ws},
    **{w: ("unit", k) for k, ws in _UNIT.items() for w in ws},
    **{w: ("other", "") for w in _NOT_FIT},
}
_HOOK_OF = {
    ("step", "end"): "on_step_end",
    ("step", "start"): "on_step_end (fit has no hook at a step's start)",
    ("step", ""): "on_step_end",
    ("epoch", "end"): "on_epoch_end",
    ("epoch", "start"): (
        "on_epoch_end (fit has no hook at an epoch's start: on_fit_start comes before the "
        "first, on_epoch_end after each)"
    ),
    ("epoch", ""): "on_epoch_end",
    ("fit", "start"): "on_fit_start",
    ("fit", "end"): "on_fit_end",
}


def _word(token: str) -> tuple[str, str] | None:
    """What ``token`` (a word of a hook-like name) means, a misspelling too (``epoc``,
    ``strat``), or None; a word of 3 letters or fewer only as written."""
    if token in _WORDS:
        return _WORDS[token]
    if len(token) <= 3:
        return None
    close = difflib.get_close_matches(token, [w for w in _WORDS if len(w) > 3], n=1, cutoff=0.8)
    return _WORDS[close[0]] if close else None


def suggest_hook(name: str) -> str | None:
    """The hook a method ``name`` (``on_...``, none of :data:`HOOKS`) most likely meant, as a
    warning puts it after "did you mean", or None where none fits.

    By the meaning of its words first (``on_batch_end``: the per-step ``on_step_end``; one at
    a unit's start or end such as ``on_train_begin``: ``on_fit_start``; ``on_epoch_begin``:
    ``on_epoch_end``, saying that fit has no epoch-start hook), by its letters next (a typo,
    ``on_fitstart``). Matched by letters alone, ``on_batch_end`` came out as ``on_epoch_end``
    and ``on_epoch_start`` as ``on_fit_start``. A name of what fit never does
    (``on_test_end``, ``on_predict_batch_end``) or of no hook's words (``on_improvement``, a
    helper's) gets None.
    """
    tokens = [t for t in re.split(r"[_\W]+", name.lower()) if t and t != "on"]
    meanings = [_word(t) for t in tokens]
    if ("other", "") in meanings:
        return None
    units = {m[1] for m in meanings if m is not None and m[0] == "unit"}
    when = next((m[1] for m in meanings if m is not None and m[0] == "when"), "")
    # the finest unit named wins: on_train_batch_end is a step's end, on_train_epoch_end an
    # epoch's; with no unit, a start or an end alone (on_begin, on_end) is the fit's
    unit = next((u for u in ("step", "epoch", "fit") if u in units), "fit" if when else "")
    # (a step's or an epoch's hook whatever else the name says; the fit's only where every word
    # is understood: on_checkpoint_end is no fit's end)
    if unit in ("step", "epoch") or (unit == "fit" and when and None not in meanings):
        return _HOOK_OF[unit, when]
    close = difflib.get_close_matches(name, HOOKS, n=1)
    return close[0] if close else None


def _overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


def _count(owner: str, name: str, value: Any) -> int:
    """``value`` as an int >= 0 for ``owner``'s argument ``name`` (a numpy integer too).

    Raises:
        TypeError: not an int: a float (even a whole one, ``2.0``), a bool, a string.
        ValueError: an int below 0.
    """
    if isinstance(value, Integral) and not isinstance(value, bool):
        if int(value) < 0:
            raise ValueError(f"{owner}: {name} must be an int >= 0, got {value!r}")
        return int(value)
    what = ""
    if isinstance(value, bool | np.bool_):
        what = " (a bool)"
    elif isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        what = f" (a float: pass {int(value)})"
    elif isinstance(value, Real):
        what = f" (a {type(value).__name__})"
    raise TypeError(f"{owner}: {name} must be an int >= 0, got {value!r:.80}{what}")


def _path(owner: str, name: str, value: Any, kind: str, example: str) -> str:
    """``value`` as a path to a ``kind`` (``"file"``, ``"folder"``) for ``owner``'s argument
    ``name``, refused where it is given, as ``Trainer(trace='')`` is, rather than when a fit
    starts.

    Raises:
        TypeError: not a path (naming ``owner``'s argument ``name``).
        ValueError: an empty path (``example``, a path of that kind, shows one).
    """
    try:
        path = os.fspath(value)
    except TypeError:
        raise TypeError(
            f"{owner}: {name} must be a path (a str or os.PathLike), got {value!r:.80}"
        ) from None
    if not path:
        raise ValueError(
            f"{owner}: {name}='' names no {kind}: pass a {kind} path (e.g. {owner}({example!r}))"
        )
    return path


def wants_epoch_end(callbacks: list[Callback]) -> bool:
    """Whether any of ``callbacks`` has an epoch-end hook."""
    return any(_overrides(cb, "on_epoch_end") for cb in callbacks)


def wants_step_end(callbacks: list[Callback]) -> bool:
    """Whether any of ``callbacks`` has a step-end hook."""
    return any(_overrides(cb, "on_step_end") for cb in callbacks)


class EarlyStopping(Callback):
    """Stops ``fit`` when a monitored epoch metric has stopped improving.

    Args:
        monitor: an epoch metric: ``"loss"``, or ``"val_loss"``/``"val_accuracy"`` with
            ``validation_data`` (``fit`` refuses one it does not log before it starts).
        patience: epochs in a row without improvement that the fit goes on through: the next
            one stops it (``patience=0`` stops at the first epoch that does not improve; Keras
            and Lightning stop one epoch earlier, at the ``patience``-th). A NaN never counts
            as an improvement.
        min_delta: how much a value must beat ``best`` by to count as an improvement (more
            than this; 0: any improvement).
        mode: ``"min"``, ``"max"``, or ``"auto"`` (``"max"`` for accuracies, else ``"min"``).

    Raises:
        TypeError: an argument of the wrong type: ``patience`` not an int (a float, even
            ``2.0``, or a bool), ``min_delta`` not a number, ``monitor`` or ``mode`` not a str.
        ValueError: ``patience`` below 0, ``min_delta`` NaN or infinite, ``monitor`` empty,
            ``mode`` none of the three.

    Attributes:
        best: the last value that counted as an improvement (with ``min_delta``, not always
            the best seen: smaller gains do not move it, as in Keras and Lightning).
        stopped_epoch: the epoch that stopped the fit, or None. Both, and the count of epochs
            without improvement, carry over to the next ``fit`` given this callback (a fit per
            epoch goes on counting): make a new one to start afresh. Checkpoints keep them
            too (:meth:`callback_state`): the first ``fit`` of a trainer loaded from one goes on
            counting in the ``EarlyStopping`` given in this one's place (from an epoch whose
            end this one had not had when a callback before it saved, too: the resumed fit
            delivers it first, and stops at once where it stops there), so a run interrupted
            and resumed stops where it would have without the break.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 2,
        min_delta: float = 0.0,
        mode: str = "auto",
    ) -> None:
        # a wrong type is a TypeError, a wrong value a ValueError, as Trainer.fit's arguments
        if not isinstance(monitor, str):
            raise TypeError(
                f"EarlyStopping: monitor must be a metric's name (a str), got {monitor!r:.80}"
            )
        if not monitor:
            raise ValueError(f"EarlyStopping: monitor must be a metric's name, got {monitor!r}")
        if mode not in ("min", "max", "auto"):
            error = ValueError if isinstance(mode, str) else TypeError
            raise error(f"EarlyStopping: mode must be 'min', 'max' or 'auto', got {mode!r:.80}")
        patience = _count("EarlyStopping", "patience", patience)
        given: object = min_delta  # (any number: mypy takes float for no numbers.Real)
        if isinstance(given, bool) or not isinstance(given, Real):
            raise TypeError(
                f"EarlyStopping: min_delta must be a finite number, got {min_delta!r:.80}"
            )
        try:
            # (a NaN would make every epoch "not better", stopping a fit that improves; an int
            # past a float's range overflowed unnamed)
            finite = math.isfinite(float(given))
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError(f"EarlyStopping: min_delta must be a finite number, got {min_delta!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = abs(min_delta)
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        self.mode = mode
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def _check_measured(self, metrics: Iterable[str]) -> None:
        """Refuses a ``monitor`` that is none of ``metrics``, the epoch metrics a fit logs
        (``fit`` calls it before any callback starts, so that no epoch trains first). A subclass
        with an ``on_epoch_end`` of its own may monitor a metric it adds to the logs: it is
        checked at each epoch's end only.

        Raises:
            ValueError: naming the monitor, the metrics and what gives the ``val_*`` ones.
        """
        if type(self).on_epoch_end is EarlyStopping.on_epoch_end:
            self._check_in(set(metrics))

    def _check_in(self, metrics: set[str]) -> None:
        metrics.discard("epoch")  # (the epoch's number, not a metric)
        if self.monitor not in metrics:
            raise ValueError(
                f"EarlyStopping monitors {self.monitor!r}, which this fit does not measure; it "
                f"measures {sorted(metrics)} (val_* need fit(..., validation_data=...), and "
                "val_accuracy a classifier's loss: see Trainer.evaluate)"
            )

    def callback_state(self) -> dict[str, Any]:
        """``best``, the epochs without improvement (``"wait"``) and ``stopped_epoch``, with the
        ``monitor`` and ``mode`` they were counted in."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_callback_state(self, state: Any) -> None:
        """Goes on from what :meth:`callback_state` returned (``patience`` and ``min_delta``
        are this callback's own: a resumed run may change them).

        Raises:
            ValueError: ``state`` was counted for another ``monitor`` or ``mode`` (a best of
                another metric means nothing to this one), or is no such state.
        """
        if not isinstance(state, dict) or not {"monitor", "mode", "best", "wait"} <= set(state):
            raise ValueError(f"it is no EarlyStopping state: {state!r:.120}")
        for name in ("monitor", "mode"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"it was counted with {name}={state[name]!r:.80}, this EarlyStopping has "
                    f"{name}={getattr(self, name)!r}"
                )
        best, wait, stopped = state["best"], state["wait"], state.get("stopped_epoch")
        if best is not None and (isinstance(best, bool) or not isinstance(best, Real)):
            raise ValueError(f"its best is {best!r:.80}, not a number or None")
        for name, value in (("wait", wait), ("stopped_epoch", stopped)):
            if (value is not None or name == "wait") and (
                isinstance(value, bool) or not isinstance(value, Integral) or value < 0
            ):
                raise ValueError(f"its {name} is {value!r:.80}, not an int >= 0")
        self.best = None if best is None else float(best)
        self.wait = int(wait)
        self.stopped_epoch = None if stopped is None else int(stopped)

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        self._check_in(set(logs))
        value = float(logs[self.monitor])
        # a NaN is never an improvement (it would become the best, and no value is better than
        # a NaN: a fit diverging at its first epoch, then improving, stopped)
        better = not math.isnan(value) and (
            self.best is None
            or (self.mode == "min" and value < self.best - self.min_delta)
            or (self.mode == "max" and value > self.best + self.min_delta)
        )
        if better:
            self.best = value
            self.wait = 0
            return
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            trainer.stop_training = True


class JSONLLogger(Callback):
    """Writes metrics as JSON lines while training goes, one object a line, flushed each time.

    Each step's line is ``{"event": "step", "step": ..., "epoch": ..., "loss": ..., "time": ...}``
    (every ``every`` steps); each epoch's is ``{"event": "epoch", "epoch": ..., "loss": ...,
    "val_loss": ..., "time": ...}``. ``time`` is seconds since the fit started. A NaN or
    infinite value is written as ``null`` (JSON has neither), so every line reads back with
    ``json.loads`` and any JSON tool. The file is appended to, so a resumed run continues it;
    a last line left unfinished (a process killed while writing it) is ended first, so that
    the new lines stay whole.

    Args:
        path: the file to write (its folder is made if missing).
        every: log every this many steps (0: epochs only).

    Raises:
        ValueError: ``every`` is below 0; ``path`` is empty.
        TypeError: ``every`` is not an int (a float, even ``2.0``, a bool); ``path`` is not a
            path.
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1) -> None:
        every = _count("JSONLLogger", "every", every)
        self.path = _path("JSONLLogger", "path", path, "file", "logs/metrics.jsonl")
        self.every = every
        self._file: Any = None
        self._start = 0.0

    def on_fit_start(self, trainer: Trainer) -> None:
        folder = os.path.dirname(self.path)
        try:
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed at fit end
        except OSError as exc:
            # (a bare "FileExistsError: File exists: 'afile'" read as if the log were there)
            raise OSError(
                f"JSONLLogger({self.path!r}) cannot write its file there: {exc.strerror or exc}"
                f" ({exc.filename!r}{_open_hint(self.path, exc)})"
            ) from exc
        # (a pipe or a terminal, such as /dev/stdout, has no end to look at: tell() raises)
        if self._file.seekable() and self._file.tell() and not _ends_line(self.path):
            # (the first record would have been glued to that fragment: both lines unreadable)
            self._file.write("\n")
        self._start = time.perf_counter()

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        record["time"] = round(time.perf_counter() - self._start, 6)
        clean = {k: _json_value(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        if self.every and step % self.every == 0:
            self._write({"event": "step", "step": step, **logs})

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        self._write({"event": "epoch", **logs, "epoch": epoch})

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _open_hint(path: str, exc: OSError) -> str:
    """What most likely made opening ``path`` fail with ``exc``, as the end of its message."""
    if isinstance(exc, IsADirectoryError):
        example = os.path.join(os.fsdecode(path), "metrics.jsonl")
        return f"; the path is a folder: give a file path in it, such as {example!r}"
    if isinstance(exc, FileExistsError | NotADirectoryError):
        # (makedirs finds a file where a folder of the path should be; open, a file above it)
        return "; a part of the path that is a file, not a folder?"
    return ""


def _ends_line(path: str) -> bool:
    """Whether the (non-empty) file at ``path`` ends with a newline."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _json_value(value: Any) -> Any:
    """``value`` as JSON writes it: numpy scalars as Python numbers (json refuses them), a NaN or
    an infinity as None (json would write the bare ``NaN``/``Infinity``, which JSON lacks)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return value
    if isinstance(value, Integral):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else None


class TensorBoardLogger(Callback):
    """TensorBoard scalars through ``tensorboardX`` (``pip install 'asyncnn[tensorboard]'``).

    Step losses go to ``train/loss`` at the step number (every ``every`` steps); epoch metrics to
    ``epoch/NAME`` at the epoch number. View with ``tensorboard --logdir LOGDIR``.

    Args:
        logdir: the folder of the event files.
        every: log every this many steps (0: epochs only).

    Raises:
        ValueError: ``every`` is below 0; ``logdir`` is empty.
        TypeError: ``every`` is not an int (a float, even ``2.0``, a bool); ``logdir`` is not
            a path.
        ImportError: tensorboardX is not installed (saying how to install it).
    """

    def __init__(self, logdir: str | os.PathLike[str], every: int = 1) -> None:
        every = _count("TensorBoardLogger", "every", every)
        try:
            import tensorboardX  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "TensorBoardLogger writes through tensorboardX: pip install 'asyncnn[tensorboard]' "
                "(or use JSONLLogger, which needs nothing)"
            ) from exc
        # (tensorboardX reads an empty logdir as its own default, runs/DATE_HOST: the events
        # went to a folder never named)
        self.logdir = _path("TensorBoardLogger", "logdir", logdir, "folder", "runs/tb")
        self.every = every
        self._writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from tensorboardX import SummaryWriter

        # a file of its own per fit: tensorboardX names it by the second and the host, and
        # opens it for writing, so a logger reused by a fit starting in the same second (one
        # epoch per fit) truncated the earlier fit's events
        self._writer = SummaryWriter(
            logdir=self.logdir, filename_suffix=f".{os.getpid()}.{time.time_ns()}"
        )

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        if self._writer is not None and self.every and step % self.every == 0:
            self._writer.add_scalar("train/loss", logs["loss"], step)

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in logs.items():
            if name != "epoch":
                self._writer.add_scalar(f"epoch/{name}", value, epoch)

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
