"""What ``asyncnn train`` writes besides its report: ``results.json`` as strict JSON, and the
files of its own that the disk refuses (a full disk) said in one line that names the option
and the file, what is kept and how to go on (exit status 2, as ``main`` says it)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import Any

from ._errors import TraceWriteError


def _strict_json(value: Any) -> str:
    """``value`` as JSON that any reader parses: a non-finite float (the losses of a run that
    diverged) as null, as the Chrome export (whose conversion this is) and the JSONL logger
    write it; ``json.dumps`` would write bare NaN and Infinity tokens, which strict parsers
    (``JSON.parse``, ``jq``) refuse."""
    from ._tracing._chrome import _as_json

    return json.dumps(_as_json(value), indent=2, allow_nan=False)


class _OutputError(OSError):
    """A file of the run's own that the disk refused (a full disk): an ordinary failure, said in
    one line (exit status 2) that names the option and the file, what is kept and how to go on;
    :attr:`more` is added after it (what became of the trainer). The disk's ``errno`` is kept."""

    def __init__(self, number: int | None, message: str) -> None:
        super().__init__(number, message)
        self.message = message
        self.more = ""

    def __str__(self) -> str:
        return self.message + self.more


def _output_failure(args: argparse.Namespace, exc: BaseException) -> _OutputError | None:
    """``exc`` as a file of the run's that the disk refused (``--trace`` or ``--metrics``), said
    of its option, or None where it is some other error (a ``RuntimeError`` of anything but
    the trace's writes is a bug, whose traceback is kept)."""
    if isinstance(exc, _OutputError):
        return exc
    if not isinstance(exc, TraceWriteError) or not args.trace:
        return None
    return _OutputError(
        exc.errno,
        f"--trace {args.trace}: writing the trace failed ({_why(exc)}); the events "
        "after the failure were not recorded: free space there, or give --trace another path",
    )


def _save_after_failure(trainer: Any, save: str | None) -> str:
    """Saves what finished to ``save`` (given) after a file of the run's was refused, and says
    so; the disk that refused that file may refuse the checkpoint too, which is said as well."""
    if not save:
        return ""
    try:
        trainer.save(save)
    except OSError as exc:
        return f"; saving the trainer to {save} failed too ({exc})"
    return f"; the trainer was saved to {save} (continue with --resume {save})"


def _why(exc: OSError) -> str:
    """The system's words for a failed write ("No space left on device"), under any error that
    named the file on top of it (its cause)."""
    while isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _writing(flag: str, path: str) -> Iterator[None]:
    """Says a write that the disk refused of ``flag``'s file (a full disk's bare "[Errno 28] No
    space left on device" named neither)."""
    try:
        yield
    except OSError as exc:
        raise _OutputError(
            exc.errno,
            f"{flag} {path}: writing it failed ({_why(exc)}): free space there, or "
            f"give {flag} another path",
        ) from exc


def _metrics_logger(base: type[Any], path: str) -> Any:
    """``--metrics``' logger: ``base`` (JSONLLogger, imported with the run) whose writes that the
    disk refuses name the option and the file."""

    class _Metrics(base):
        def on_step_end(self, trainer: Any, step: int, logs: dict[str, float]) -> None:
            with _writing("--metrics", path):
                super().on_step_end(trainer, step, logs)

        def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, float]) -> None:
            with _writing("--metrics", path):
                super().on_epoch_end(trainer, epoch, logs)

        def on_fit_end(self, trainer: Any, history: Any) -> None:
            with _writing("--metrics", path):
                super().on_fit_end(trainer, history)

    return _Metrics(path)
