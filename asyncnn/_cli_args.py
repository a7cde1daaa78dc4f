"""What the ``asyncnn`` command line refuses, one line each (exit status 2), before any run:
a value argparse cannot take (its types below), and train's options that cannot work together,
name a path the run could not write at its end (``--save``, ``--out``, ``--trace``, ``--metrics``)
or that another of them writes too, an empty path (but ``--out ''``, "none"), or a ``--resume``
checkpoint that train cannot continue.

Apart from ``_cli.py``, which runs the commands: a refused command line costs no training, so
every check that can be made before a run is made here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ._tracing._chrome import folder_end

if TYPE_CHECKING:
    from ._runtime._graph import Graph

# the policies that cut each minibatch into --microbatches keys
_MICROBATCHED = ("PipeDream", "OneFOneB", "GPipe")


# train's options that describe the model, the policy or the seed: a checkpoint holds them
_MODEL_FLAGS = (
    "--policy", "--stages", "--balance", "--microbatches", "--no-stash", "--layers", "--hidden",
    "--seed",
)  # fmt: skip

#: --optimizer's names, as asyncnn.optim spells them (the first, the default, as before the flag)
_OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad")
#: the optimizers that have a momentum factor (--momentum)
_WITH_MOMENTUM = ("SGD", "RMSprop")
# the optimizer's hyperparameters: with --resume, they apply to the optimizer --optimizer names
# (the checkpoint holds its own)
_OPTIMIZER_FLAGS = ("--lr", "--momentum", "--weight-decay")


#: the row width of each --dataset, which a --resume checkpoint's model must take (known here so
#: that a checkpoint of another is refused before the data is loaded; a test checks them)
_DATASET_FEATURES = {"mnist1d": 40, "digits": 64}


class UsageError(Exception):
    """A command line that cannot work: printed as one line, exit status 2."""


#: a file name to suggest in a folder given to a flag that takes a file
_EXAMPLE_FILES = {"--trace": "run.trace", "--metrics": "metrics.jsonl"}


def _check_given(flag: str, path: str | None, folder: bool) -> None:
    """Refuses an empty path (``--resume "$CKPT"`` of an unset variable), which would otherwise
    read as the option not given: ``--resume ''`` trained a new model, ``--save ''`` saved
    nothing, and the run ended with status 0. ``None``, the option not given, passes."""
    if path is not None and not path:
        kind = "folder" if folder else "file"
        raise UsageError(
            f"{flag}: an empty path (an unset shell variable?); give a {kind}, or leave {flag} out"
        )


def _check_writable(flag: str, path: str, folder: bool) -> None:
    """Refuses, before the run, a path that its end (or its first step) could not write: an
    empty one, a folder given for a file or a file for a folder, a path under a file, a folder
    it may not write in. The files themselves are written where the run would write them."""
    _check_given(flag, path, folder)
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


def _check_resume(path: str) -> tuple[Graph, int, int | None]:
    """Refuses, before the data is loaded, a ``--resume`` that is no checkpoint folder or a
    damaged one, naming the flag (the Python API's words name only the path); returns the
    checkpoint's graph, its epochs done and the batch size of its last epoch's minibatches
    (``None`` where it records none), read from its spec (its arrays are checksummed, not read:
    ``Trainer.load`` reads them once)."""
    from ._checkpoint import (
        _is_checkpoint,
        _latest_in_checkpoint_dir,
        _position,
        _spec_graph,
        _spec_path,
    )
    from ._checkpoint_files import MANIFEST, CheckpointError, _read_spec, read_verified

    fix = "--resume takes a folder that --save wrote"
    if not os.path.exists(path):
        raise UsageError(f"--resume {path}: no such folder; {fix}")
    if not os.path.isdir(path):
        raise UsageError(f"--resume {path}: that is a file; {fix}")
    try:  # (its words say why: no spec, or a first save cut off before its manifest)
        spec_path = _spec_path(path)
    except FileNotFoundError as exc:
        latest = _latest_in_checkpoint_dir(path)
        if latest is not None:  # (said here with the flag, where Python's says Trainer.load)
            raise UsageError(
                f"--resume {path}: it holds a checkpoint per epoch (a fit's checkpoint_dir), "
                f"not one checkpoint; give one of them, the latest: --resume {latest}"
            ) from exc
        raise UsageError(f"--resume {path}: {exc}; {fix}") from exc
    try:  # checked and its spec read as Trainer.load does, before it is loaded (a save cut
        # off between its renames: finished; one under way: waited for, and checked after it)
        _, spec = read_verified(path, lambda: _read_spec(spec_path))
        graph = _spec_graph(spec, spec_path)
        epochs_done: int = spec["epochs_done"]
        _, layout = _position(path, spec, spec_path)  # (as Trainer.load will read it)
    except (ValueError, OSError) as exc:  # CheckpointError, UntrustedModuleError, unreadable
        why = str(exc).rstrip(".")
        if _is_checkpoint(path):  # a checkpoint, damaged: the reader's words say where
            raise UsageError(f"--resume {path}: {why}") from exc
        if not os.path.exists(os.path.join(path, MANIFEST)):
            # a spec.msgpack that no save wrote: what is wrong with it, rather than the
            # manifest's absence, which the reader puts down to an older asyncnn
            try:
                _read_spec(spec_path)
            except CheckpointError as spec_exc:
                why = str(spec_exc).rstrip(".")
        raise UsageError(f"--resume {path}: {why}; {fix}") from exc
    return graph, epochs_done, None if layout is None else layout["batch_size"]


def _check_resumable(args: argparse.Namespace, graph: Graph) -> None:
    """Refuses a checkpoint whose graph does not read what ``asyncnn train`` feeds it: ``x``,
    rows of the ``--dataset``'s features, and ``y``, integer labels (a checkpoint saved from
    Python failed after the data and the weights were loaded, speaking of a batch the user never
    gave), or that is no classifier, whose test accuracy train reports (one failed after the
    whole run, with a bare "error: accuracy")."""
    from ._train import _classifiers

    path = args.resume
    elsewhere = (
        "it is not a checkpoint asyncnn train can resume; load it in Python with ann.Trainer.load"
    )
    x = graph.nodes.get("x")
    y = graph.nodes.get("y")
    if sorted(graph.inputs) != ["x", "y"] or x is None or y is None:
        raise UsageError(
            f"--resume {path}: its graph's inputs are {sorted(graph.inputs)}, and asyncnn train "
            f"feeds 'x' (rows of features) and 'y' (integer labels): {elsewhere}"
        )
    # (a shape or dtype not declared takes what it is given)
    rows = x.shape is None or len(x.shape) == 2
    labels = (y.shape is None or len(y.shape) == 1) and (
        y.dtype is None or y.dtype.startswith(("int", "uint"))
    )
    if not (rows and labels):
        raise UsageError(
            f"--resume {path}: its graph's inputs are 'x' of shape {x.shape} and 'y' of shape "
            f"{y.shape} ({y.dtype}), and asyncnn train feeds rows of features (None, F) and "
            f"integer labels (None,): {elsewhere}"
        )
    if not _classifiers(graph):
        raise UsageError(
            f"--resume {path}: its losses {list(graph.losses)} are no classifier's (a "
            "CrossEntropyLoss of the integer labels 'y'), and asyncnn train trains classifiers "
            f"and reports their test accuracy: {elsewhere}"
        )
    features = None if x.shape is None else x.shape[1]
    have = _DATASET_FEATURES[args.dataset]
    if features is None or features == have:
        return
    fits = [name for name, n in _DATASET_FEATURES.items() if n == features]
    if fits:
        raise UsageError(
            f"--resume {path}: its model takes rows of {features} features, --dataset "
            f"{args.dataset} has {have}: give the --dataset it was trained on (--dataset "
            f"{fits[0]})"
        )
    widths = " or ".join(f"{n} (--dataset {name})" for name, n in _DATASET_FEATURES.items())
    raise UsageError(
        f"--resume {path}: its model takes rows of {features} features, and asyncnn train's "
        f"datasets have {widths}: {elsewhere}"
    )


def _checkpoint_files() -> tuple[str, ...]:
    """The files a checkpoint folder holds, and those a save writes beside them first."""
    from ._checkpoint import _FILES

    return (*_FILES, *(name + ".tmp" for name in _FILES))


def _check_outputs_apart(args: argparse.Namespace) -> None:
    """Refuses outputs that would write over each other (the second to write wins, and the run's
    end finds the first lost: ``--trace X --metrics X`` kept the trace and no metric), or a file
    where another output makes a folder. Outputs that only share a folder are fine."""
    real = os.path.realpath
    files = [(f"--trace {args.trace}", args.trace), (f"--metrics {args.metrics}", args.metrics)]
    if args.out:
        files.append(
            (f"--out {args.out} (its results.json)", os.path.join(args.out, "results.json"))
        )
    files = [(said, path) for said, path in files if path]
    for i, (said, path) in enumerate(files):
        for other_said, other in files[i + 1 :]:
            if real(path) == real(other):
                raise UsageError(f"{said} and {other_said} name the same file; give each its own")
    for said, path in files:  # a file inside another output's file: that one made a folder
        for other_said, other in files:
            if other is not path and real(other).startswith(real(path) + os.sep):
                raise UsageError(
                    f"{said}: the run writes a file there, and {other_said} needs it as a "
                    "folder; give another path"
                )
    # the folders written in (the checkpoint read by --resume, which --save may replace, too)
    folders = [("--save", args.save), ("--out", args.out), ("--resume", args.resume)]
    checkpoint_files = _checkpoint_files()
    for said, path in files:
        for flag, folder in folders:
            if not folder:
                continue
            if real(folder) == real(path) or real(folder).startswith(real(path) + os.sep):
                raise UsageError(
                    f"{said}: the run writes a file there, and {flag} {folder} needs it as a "
                    "folder; give another path"
                )
            name = os.path.basename(path)
            if (
                flag != "--out"
                and os.path.dirname(real(path)) == real(folder)
                and (name in checkpoint_files)
            ):
                verb = "writes" if flag == "--save" else "reads"
                raise UsageError(
                    f"{said}: {flag} {folder} {verb} that file (a checkpoint's {name}); give "
                    "another name"
                )


def _check_train_args(args: argparse.Namespace, given: set[str]) -> None:
    """Refuses contradictory train options (one line each)."""
    # an empty path is no path (only --out takes '', documented as "none"): refused first
    _check_given("--resume", args.resume, folder=True)
    # found before the run, not when its end is saved (or its first step traced)
    for flag, path, folder in (
        ("--save", args.save, True), ("--out", args.out, True), ("--trace", args.trace, False),
        ("--metrics", args.metrics, False),
    ):  # fmt: skip
        if path is not None and (path or flag != "--out"):
            _check_writable(flag, path, folder)
    _check_outputs_apart(args)
    if "--trace-payloads" in given and not args.trace:
        raise UsageError("--trace-payloads applies to the trace: give --trace PATH too")
    if args.save:
        from ._checkpoint import check_save_path

        try:  # a folder the save would refuse (not a checkpoint): refused now, not after the run
            check_save_path(args.save)
        except FileExistsError as exc:
            raise UsageError(f"--save {args.save}: {exc}") from exc
    if args.resume:
        switch = "--optimizer" in given
        clash = [f for f in _MODEL_FLAGS if f in given]
        hyper = [f for f in _OPTIMIZER_FLAGS if f in given and not switch]
        if clash or hyper:
            # (the optimizer's hyperparameters are said apart: --optimizer makes them apply)
            also = ""
            if hyper:
                also = (
                    ", or give --optimizer NAME to switch the checkpoint's optimizer "
                    f"({' and '.join(hyper)} then apply to it)"
                )
            raise UsageError(
                f"--resume takes the model, policy, optimizer and seed from the checkpoint; "
                f"drop {' '.join(clash + hyper)}{also}"
            )
        if switch:
            _check_optimizer_flags(args, given)
        else:  # the checkpoint's optimizer goes on (the default name is no choice made)
            args.optimizer = None
        graph, epochs_done, batch_size = _check_resume(args.resume)
        _check_resumable(args, graph)
        args.batch_size_from = "given" if "--batch-size" in given else "the default"
        if "--batch-size" not in given and batch_size is not None:
            # the run goes on in the checkpoint's minibatches (in others, its unfinished epoch
            # would start over: the rows it has trained, trained twice)
            args.batch_size = batch_size
            args.batch_size_from = "the checkpoint's"
        if args.epochs <= epochs_done:  # (an equal count trained nothing, and reported it)
            raise UsageError(
                f"--epochs {args.epochs}: the checkpoint has trained {epochs_done} already "
                f"(--epochs counts them too); give --epochs {epochs_done + 1} or more to train on"
            )
        return
    _check_optimizer_flags(args, given)
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


def _check_optimizer_flags(args: argparse.Namespace, given: set[str]) -> None:
    """Refuses a hyperparameter that the chosen optimizer has no field for (``--momentum``
    with Adam, the default too: it was not given, so the user may not know it is the one)."""
    if args.momentum is not None and args.optimizer not in _WITH_MOMENTUM:
        default = "" if "--optimizer" in given else "the default; "
        raise UsageError(
            f"--momentum applies to {' and '.join(_WITH_MOMENTUM)}, not --optimizer "
            f"{args.optimizer} ({default}it has no momentum factor): give --optimizer "
            f"{' or '.join(_WITH_MOMENTUM)}, or drop --momentum"
        )


def _any_case(names: Sequence[str]) -> Callable[[str], str]:
    """An argparse type for a ``choices`` option: one of ``names`` in any ASCII case, as
    ``names`` spell it (``--optimizer sgd`` is ``SGD``, ``--policy gpipe`` ``GPipe``), so the
    checks and the run see the one spelling; any other text as given, which ``choices`` then
    refuses with the list of the names."""
    spelt = {name.lower(): name for name in names}

    def name(text: str) -> str:
        # ASCII case only: str.casefold (and lower, for a Kelvin sign) map other letters onto
        # ASCII ones, and "\u017fync" (a long s) would be taken for Sync
        return spelt.get(text.lower(), text) if text.isascii() else text

    return name


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


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if not value >= 0:  # (nan too)
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:  # checkpoints and traces keep it as an unsigned 64-bit integer
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**64 - 1, got {value}")
    return value


_positive_int.__name__ = _natural.__name__ = "integer"  # argparse names the type in errors
_seed.__name__ = "integer"
_positive_float.__name__ = _non_negative_float.__name__ = "number"
