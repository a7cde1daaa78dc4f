"""What the ``asyncnn`` command line refuses, one line each (exit status 2), before any run:
a value argparse cannot take (its types below), and train's options that cannot work together or
name a path the run could not write at its end (``--save``, ``--out``, ``--trace``, ``--metrics``).

Apart from ``_cli.py``, which runs the commands: a refused command line costs no training, so
every check that can be made before a run is made here.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from ._tracing._chrome import folder_end

# the policies that cut each minibatch into --microbatches keys
_MICROBATCHED = ("PipeDream", "OneFOneB", "GPipe")


# train's options that describe the model, the policy or the optimizer: a checkpoint holds them
_MODEL_FLAGS = (
    "--policy", "--stages", "--balance", "--microbatches", "--no-stash", "--layers", "--hidden",
    "--lr", "--seed",
)  # fmt: skip


class UsageError(Exception):
    """A command line that cannot work: printed as one line, exit status 2."""


#: a file name to suggest in a folder given to a flag that takes a file
_EXAMPLE_FILES = {"--trace": "run.trace", "--metrics": "metrics.jsonl"}


def _check_writable(flag: str, path: str, folder: bool) -> None:
    """Refuses, before the run, a path that its end (or its first step) could not write: a
    folder given for a file or a file for a folder, a path under a file, a folder it may not
    write in. The files themselves are written where the run would write them."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: that is a file; {flag} takes a folder")
    if not folder and os.path.isdir(path):
        raise UsageError(
            f"{flag} {path}: that is a folder; {flag} takes a file name (e.g. "
            f"{os.path.join(path, _EXAMPLE_FILES.get(flag, 'out.txt'))})"
        )
    end = folder_end(path)
    if not folder and end is not None:  # (a folder not made yet: one that is, said above)
        example = os.path.normpath(os.path.join(path, _EXAMPLE_FILES.get(flag, "out.txt")))
        raise UsageError(
            f"{flag} {path}: it ends in {end!r}, so it names a folder; {flag} takes a file "
            f"name (e.g. {example})"
        )
    if not folder and os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: cannot write to it (permission denied)")
        return
    # the folder written in: the path itself (a folder that exists) or its nearest ancestor
    # that exists (the run makes the folders between)
    where = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while where and not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    where = where or "."
    kind = "folder" if folder else "file"
    if not os.path.isdir(where):
        raise UsageError(
            f"{flag} {path}: {where} is a file, not a folder, so nothing can go under it; give "
            f"another {kind}"
        )
    try:  # a temporary file, gone when closed: what a write there would meet
        tempfile.TemporaryFile(dir=where).close()
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot write in {where} ({exc.strerror or exc}); give a {kind} "
            "where you can write"
        ) from exc


def _check_resume(path: str) -> None:
    """Refuses, before the data is loaded, a ``--resume`` that is no checkpoint folder, naming
    the flag (the Python API's words name only the path)."""
    from ._checkpoint import _spec_path

    fix = "--resume takes a folder that --save wrote"
    if not os.path.exists(path):
        raise UsageError(f"--resume {path}: no such folder; {fix}")
    if not os.path.isdir(path):
        raise UsageError(f"--resume {path}: that is a file; {fix}")
    try:  # (its words say why: no spec, or a first save cut off before its manifest)
        _spec_path(path)
    except FileNotFoundError as exc:
        raise UsageError(f"--resume {path}: {exc}; {fix}") from exc


def _check_train_args(args: argparse.Namespace, given: set[str]) -> None:
    """Refuses contradictory train options (one line each)."""
    # found before the run, not when its end is saved (or its first step traced)
    for flag, path, folder in (
        ("--save", args.save, True), ("--out", args.out, True), ("--trace", args.trace, False),
        ("--metrics", args.metrics, False),
    ):  # fmt: skip
        if path:
            _check_writable(flag, path, folder)
    if args.save:
        from ._checkpoint import check_save_path

        try:  # a folder the save would refuse (not a checkpoint): refused now, not after the run
            check_save_path(args.save)
        except FileExistsError as exc:
            raise UsageError(f"--save {args.save}: {exc}") from exc
    if args.resume:
        clash = [f for f in _MODEL_FLAGS if f in given]
        if clash:
            raise UsageError(
                f"--resume takes the model, policy, optimizer and seed from the checkpoint; "
                f"drop {' '.join(clash)}"
            )
        _check_resume(args.resume)
        return
    if args.no_stash and args.policy != "PipeDream":
        raise UsageError(
            f"--no-stash applies to PipeDream only ({args.policy} keeps no weight stash)"
        )
    if "--microbatches" in given and args.policy in ("Sync", "Async"):
        raise UsageError(
            f"--microbatches applies to GPipe, OneFOneB and PipeDream ({args.policy} sends each "
            "minibatch as one key)"
        )
    if args.policy in _MICROBATCHED and args.microbatches > args.batch_size:
        raise UsageError(
            f"--microbatches {args.microbatches} is more than the --batch-size of "
            f"{args.batch_size} rows (a minibatch is cut into at most one key a row): give "
            f"--microbatches {args.batch_size} or fewer, or a larger --batch-size"
        )
    modules = 2 * args.layers + 1
    if args.stages > modules:
        raise UsageError(
            f"--stages {args.stages} is more than the MLP's {modules} modules "
            f"({args.layers} hidden layers, each Linear + ReLU, and the output Linear)"
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:  # checkpoints and traces keep it as an unsigned 64-bit integer
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**64 - 1, got {value}")
    return value


_positive_int.__name__ = _natural.__name__ = "integer"  # argparse names the type in errors
_seed.__name__ = "integer"
_positive_float.__name__ = "number"
