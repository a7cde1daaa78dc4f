"""The checkpoints a fit writes to its ``checkpoint_dir``: the check of that folder before the
fit (:func:`check_checkpoint_dir`: one this process can write to, no later run's checkpoints
there, nothing a save could not replace), and ``checkpoint_every``'s save at an epoch's end,
rotated to the latest few. Apart from ``_checkpoint.py``, which writes and reads one checkpoint,
because this is the folder of many that a fit keeps."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._train import Trainer


def _checkpoint_epochs(folder: str) -> dict[int, str]:
    """``{epochs: name}`` of the entries ``epoch-NNNN`` of ``folder`` (none if it is missing)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        digits = name[len("epoch-") :]
        if name.startswith("epoch-") and digits.isascii() and digits.isdigit():
            found[int(digits)] = name
    return found


def check_checkpoint_dir(folder: str, epochs_done: int) -> None:
    """Refuses a ``checkpoint_dir`` holding checkpoints ``epoch-NNNN`` of more epochs than the
    trainer has done: they are another run's (or a later point of this one, resumed from an
    earlier checkpoint). The fit would save over them, and the rotation would keep them as the
    latest ones and delete those the fit writes. Checkpoints of fewer or as many epochs are
    those a resumed run continues from: the rotation removes them, oldest first.

    A later entry that is no checkpoint is taken as the fit's save of that epoch will take it:
    the ``*.tmp`` files of a save killed before it finished (which ``Trainer.load`` refuses,
    saying to load an earlier checkpoint) are replaced by it; one it would refuse (a file, a
    folder holding a checkpoint's file names without being one) is refused here, not after
    the epochs before it have trained.

    The folder is made where it is missing, and a file made and removed in it: one this process
    cannot write to (read-only, another user's) is refused before any training, not by the
    first checkpoint's save after an epoch has trained.

    Raises:
        ValueError: naming the folder, the entries and what to do instead.
        OSError: the folder cannot be made or written to (of the system's errno: a
            ``PermissionError`` where access is denied), naming ``checkpoint_dir``, the path and
            the system's words.
    """
    from ._checkpoint import _is_checkpoint, check_save_path
    from ._checkpoint_files import _finishable

    _check_writable(folder)
    names = _checkpoint_epochs(folder)
    later: list[int] = []
    refused: tuple[str, str] | None = None  # (the first entry a save cannot replace, why)
    for n in sorted(n for n in names if n > epochs_done):
        path = os.path.join(folder, names[n])
        # (a save cut off between its renames, its files all there, is one: load finishes it)
        if _is_checkpoint(path) or _finishable(path):
            later.append(n)
            continue
        if refused is None:
            try:
                check_save_path(path)
            except FileExistsError as exc:
                refused = (names[n], str(exc))
    if later:
        listed = ", ".join(names[n] for n in later[:5]) + (", ..." if len(later) > 5 else "")
        raise ValueError(
            f"checkpoint_dir {folder!r} holds {listed}, saved after more than the {epochs_done} "
            "epochs this trainer has done: another run's checkpoints, which this fit would save "
            "over or leave looking newer than its own; give another (new or empty) "
            f"checkpoint_dir, remove them, or resume the latest (Trainer.load of "
            f"{names[later[-1]]}) to go on in this folder"
        )
    if refused is not None:
        name, why = refused
        raise ValueError(
            f"checkpoint_dir {folder!r} holds {name}, which is not a checkpoint, and the fit's "
            f"save of that epoch could not replace it ({why}); remove or rename it, or give "
            "another (new or empty) checkpoint_dir"
        )


def _check_writable(folder: str) -> None:
    """Makes ``folder`` where it is missing, and a file in it, removed at once.

    Raises:
        OSError: of the system's errno, naming ``checkpoint_dir``, the path and what failed.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        fd, trial = tempfile.mkstemp(prefix=".asyncnn-write-check-", dir=folder)
        os.close(fd)
        os.remove(trial)
    except OSError as exc:
        message = (
            f"checkpoint_dir {folder!r} cannot be written to ({exc.strerror or exc}: "
            f"{exc.filename or folder}): give a folder this process can write to; nothing was "
            "trained"
        )
        raise (OSError(message) if exc.errno is None else OSError(exc.errno, message)) from exc


def _save_rotating(trainer: Trainer, folder: str, epochs_done: int, keep: int) -> None:
    """Saves ``trainer`` to ``folder/epoch-NNNN`` and removes all but the ``keep`` latest
    checkpoints of the folder, by epoch number (``epoch-10000`` comes after ``epoch-9999``),
    counting the new one, which is never removed; entries that are not checkpoints stay."""
    import shutil

    from ._checkpoint import _is_checkpoint

    os.makedirs(folder, exist_ok=True)
    name = f"epoch-{epochs_done:04d}"
    trainer.save(os.path.join(folder, name))
    if keep <= 0:
        return
    # the new one counts as one of the `keep`; those of fewer epochs go, oldest first (any of
    # more epochs, which fit's check of the folder refuses up front, is left alone)
    entries = _checkpoint_epochs(folder)
    older = [
        entries[n]
        for n in sorted(entries)
        if n < epochs_done and _is_checkpoint(os.path.join(folder, entries[n]))
    ]
    for entry in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
