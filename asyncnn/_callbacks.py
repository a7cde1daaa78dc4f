"""Callbacks of ``Trainer.fit``: hooks at the end of each step and epoch, early stopping, and
metrics loggers (JSON lines; TensorBoard scalars through ``tensorboardX``)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

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


def _overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


def _is_count(value: object) -> bool:
    """Whether ``value`` is an int >= 0 (a bool is not one)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= 0


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

    Attributes:
        best: the last value that counted as an improvement (with ``min_delta``, not always
            the best seen: smaller gains do not move it, as in Keras and Lightning).
        stopped_epoch: the epoch that stopped the fit, or None. Both, and the count of epochs
            without improvement, carry over to the next ``fit`` given this callback (a fit per
            epoch goes on counting): make a new one to start afresh.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 2,
        min_delta: float = 0.0,
        mode: str = "auto",
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"EarlyStopping: monitor must be a metric's name, got {monitor!r}")
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"EarlyStopping: mode must be 'min', 'max' or 'auto', got {mode!r}")
        if not _is_count(patience):
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        given: object = min_delta  # (any number: mypy takes float for no numbers.Real)
        try:
            # (a NaN would make every epoch "not better", stopping a fit that improves; a bool
            # is refused as patience's is; an int past a float's range overflowed unnamed)
            finite = (
                isinstance(given, Real)
                and not isinstance(given, bool)
                and math.isfinite(float(given))
            )
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
        ValueError: ``every`` is not an int >= 0; ``path`` is empty.
        TypeError: ``path`` is not a path.
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1) -> None:
        if not _is_count(every):
            raise ValueError(f"JSONLLogger: every must be an int >= 0, got {every!r}")
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
        ValueError: ``every`` is not an int >= 0; ``logdir`` is empty.
        TypeError: ``logdir`` is not a path.
        ImportError: tensorboardX is not installed (saying how to install it).
    """

    def __init__(self, logdir: str | os.PathLike[str], every: int = 1) -> None:
        if not _is_count(every):
            raise ValueError(f"TensorBoardLogger: every must be an int >= 0, got {every!r}")
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
