"""Writing a checkpoint folder (the layout is in ``_checkpoint.py``'s docstring): the trainer's
state checked to load again, its arrays and specs written beside their places, synced, then
renamed into place, all under the folder's lock. Apart from ``_checkpoint.py``, which reads a
folder back, because a save and a load share only the layout and its checks."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from ._callback_states import trainer_callback_states
from ._checkpoint import _OPTIONS, check_save_path
from ._checkpoint_files import (
    FORMAT,
    MANIFEST,
    SPEC,
    VERSION,
    _finish_save_locked,
    _holds,
    _holds_manifest,
    _sha256,
    folder_lock,
    give_open_mode,
    naming,
    naming_safetensors,
    replace_unless_done,
)
from ._checkpoint_tree import ARRAYS, _split
from ._runtime._run import RunState

if TYPE_CHECKING:
    from ._train import Trainer


__all__ = ["save_checkpoint", "split_actor_state"]


def _check_loadable(trainer: Trainer, state: RunState) -> None:
    """Refuses, before anything is written, versions, counters, layers, pending gradients or
    delays that the load (its ``open_run``) would refuse: a checkpoint its own ``Trainer.load``
    cannot read is data lost (a float delay was cut to an int, more delays than gradients
    written, a float version written as it was)."""
    from ._runtime._state_checks import (
        _check_pending_delays,
        _check_pending_grads,
        check_state_counts,
    )

    try:
        check_state_counts(trainer.graph, state)
        _check_pending_grads(trainer.graph, state)
        _check_pending_delays(trainer.graph, state)
    except (TypeError, ValueError) as exc:
        said = str(exc).removeprefix("open_run: ")
        raise type(exc)(f"Trainer.save: the trainer's state would not load again: {said}") from None


def split_actor_state(name: str, state: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The spec of layer ``name``'s custom actor state (what its ``actor_state()`` returned), its
    arrays added to ``arrays`` (see :func:`_split`).

    Raises:
        TypeError: ``state`` holds what a checkpoint cannot, naming the layer and the place.
    """
    return _split(
        state, f"actor/{name}", arrays, f"the actor state of {name!r} (its actor_state())"
    )


def save_checkpoint(trainer: Trainer, path: str, fit: dict[str, Any] | None = None) -> None:
    """Writes the checkpoint folder ``path`` (see the module's docstring); ``fit`` is where the
    epoch stands (:meth:`Trainer.save`'s record), kept in the spec with the weights."""
    check_save_path(path)
    state = trainer.state
    _check_loadable(trainer, state)
    # (read first: a state a checkpoint cannot keep fails the save with nothing written)
    callbacks = trainer_callback_states(trainer)
    arrays: dict[str, np.ndarray] = {}
    layout: dict[str, Any] = {}
    for name in trainer.graph.layers:
        layout[name] = {
            "params": _split(
                state.params[name], f"params/{name}", arrays, f"the parameters of {name!r}"
            ),
            "opt_state": _split(
                state.opt_states[name], f"opt/{name}", arrays, f"the optimizer state of {name!r}"
            ),
            "version": int(state.versions[name]),  # (a numpy int, checked: msgpack has none)
        }
        if name in state.pending_grads:  # gradients accumulated and not yet applied
            acc, count = state.pending_grads[name]
            layout[name]["pending"] = {
                "grads": _split(acc, f"pending/{name}", arrays, f"the gradients of {name!r}"),
                "count": count,
            }
            delays = state.pending_delays.get(name)
            if delays:  # (those of the gradients pending: their update counts them)
                layout[name]["pending"]["delays"] = [int(d) for d in delays]
        if name in state.actor_states:  # a custom actor's own state (LayerActor.actor_state)
            layout[name]["actor_state"] = split_actor_state(name, state.actor_states[name], arrays)
        earlier = state.earlier_params.get(name)
        if earlier:  # the versions before the latest that forwards are pinned to (PipeDream2BW)
            layout[name]["earlier"] = [
                {
                    "version": int(v),
                    "params": _split(
                        p, f"earlier/{name}/{v}", arrays, f"the parameters of {name!r} at {v}"
                    ),
                }
                for v, p in sorted(earlier.items())
            ]
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "graph": trainer.graph.to_spec(),
        "policy": trainer.policy.to_spec(),
        "optimizer": trainer.optimizer.to_spec(),
        "seed": trainer.seed,
        "dtype": trainer.dtype,
        "minibatches": int(state.minibatches),
        "keys": int(state.keys),
        "epochs_done": trainer.epochs_done,
        "traces": list(trainer.traces),  # so a resumed trainer numbers its next trace on
        "trace_base": trainer.trace,
        "layout": layout,
        # the run options a loaded trainer starts with (its constructor's, unless overridden)
        "options": {name: getattr(trainer, name) for name in _OPTIONS},
    }
    if fit is not None:
        spec["fit"] = fit
    if callbacks:  # (none: no field, as an asyncnn before it wrote the spec)
        spec["callbacks"] = callbacks
    # packed before the folder is made, as the trees were checked: what a checkpoint cannot hold
    # fails the save with nothing written
    packed = msgpack.packb(spec, use_bin_type=True)
    made = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    # (a load finishing an interrupted save waits for this one, and renames none of its files)
    with folder_lock(path):
        _write_and_rename(path, arrays, packed, made)


def _write_and_rename(path: str, arrays: dict[str, np.ndarray], packed: bytes, made: bool) -> None:
    """Writes the checkpoint's files beside their places in the folder ``path`` and renames them
    into place (:func:`save_checkpoint`'s writing, which holds the folder's lock); ``made``: the
    save made the folder, which a failure before the renames removes again."""
    from safetensors.numpy import save_file

    if os.path.exists(os.path.join(path, MANIFEST + ".tmp")):
        # an earlier save interrupted between its renames: this one would write over the files
        # it still has to rename, and an interruption of this one would then leave neither
        # checkpoint whole
        _finish_save_locked(path)
    # Write beside (each file on disk before it is renamed), then rename, the manifest last: a
    # crash mid-save leaves the old checkpoint, or the new one in part renamed (which load
    # finishes: _finish_save), never a half-written file that loads.
    tmp_arrays = os.path.join(path, ARRAYS + ".tmp")
    tmp_spec = os.path.join(path, SPEC + ".tmp")
    tmp_manifest = os.path.join(path, MANIFEST + ".tmp")
    # (a save that fails leaves no file of its own, and the folder's checkpoint as it was)
    hint = f"; the folder {path} is left as it was: free space there, or save to another folder"
    try:
        with naming_safetensors(tmp_arrays, hint), naming(tmp_arrays, hint):
            save_file(arrays, tmp_arrays)
        give_open_mode(tmp_arrays)  # (safetensors made it 0600)
        _sync(tmp_arrays)
        with naming(tmp_spec, hint), open(tmp_spec, "wb") as spec_file:
            spec_file.write(packed)
        _sync(tmp_spec)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "files": {
                name: {"bytes": os.path.getsize(tmp), "sha256": _sha256(tmp)}
                for name, tmp in ((SPEC, tmp_spec), (ARRAYS, tmp_arrays))
            },
        }
        with naming(tmp_manifest, hint), open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        _sync(tmp_manifest)
    except BaseException:  # a full disk, Ctrl-C: the old checkpoint stays, without the debris
        for tmp in (tmp_manifest, tmp_spec, tmp_arrays):  # (a large one on a full disk)
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if made:  # the folder as it was: none (a first save there that failed is no checkpoint)
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    # A load that found this save between its renames, where the folder could not be locked
    # (Windows, some network file systems), finished it: its files are then in place already,
    # and this save's checkpoint is the folder's.
    for name, tmp in ((ARRAYS, tmp_arrays), (SPEC, tmp_spec)):
        final, entry = os.path.join(path, name), manifest["files"][name]
        replace_unless_done(tmp, final, functools.partial(_holds, final, entry))
    final = os.path.join(path, MANIFEST)
    replace_unless_done(tmp_manifest, final, functools.partial(_holds_manifest, final, manifest))
    _sync(path)


def _sync(path: str) -> None:
    """Has the file (or folder: its entries) ``path`` on disk, where the system can."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # nor synced on some file systems
        pass
    finally:
        os.close(fd)
