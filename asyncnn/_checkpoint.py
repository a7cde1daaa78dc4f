"""Checkpoints: a folder with ``spec.msgpack`` (graph, policy, optimizer, counters, and the
layout of the arrays), ``arrays.safetensors`` (weights and optimizer buffers) and
``manifest.json`` (the format version and the SHA-256 of each of the other two files). Nothing is
pickled: a checkpoint is rebuilt from specs, and every file is checked before it is used.

The layout of a folder (format version 2)::

    manifest.json       {"format": "asyncnn-checkpoint", "version": 2,
                         "files": {"spec.msgpack": {"bytes": n, "sha256": hex}, ...}}
    spec.msgpack        {"format", "version", "graph", "policy", "optimizer", "seed", "dtype",
                         "minibatches", "keys", "epochs_done", "traces", "trace_base", "layout",
                         "options", "fit", "callbacks"}
    arrays.safetensors  "params/<layer>/<i>", "opt/<layer>/<i>", "pending/<layer>/<i>",
                        "actor/<layer>/<i>", "earlier/<layer>/<version>/<i>"
    fit.json            where the epoch stands (the spec's "fit"), for an asyncnn before it

A layer's entry in the layout holds its "params", "opt_state" and "version"; where there are
any, its "pending" gradients (``{"grads": tree, "count": n, "delays": [d, ...]}``, "delays"
those of ``RunState.pending_delays``), its custom actor's "actor_state", and "earlier", the
versions before the latest that the policy pins forwards to (``RunState.earlier_params``:
``PipeDream2BW``'s version before the latest), as ``[{"version": v, "params": tree}, ...]``.
Each of those was added after format version 2 began, as optional fields: a checkpoint without
one loads as before (without "earlier", the next ``fit`` computes its first minibatch at the
latest weights; without "delays", its first update applies the pending gradients as of no
delay), and an asyncnn that predates one loads the checkpoint without it.

The spec's "fit" says where the epoch stands (``Trainer.save``'s record): "epoch_batches",
"minibatches", "epoch_layout" (what the minibatches of the epoch it stands in were; at an
epoch's start, those of the last epoch, which an asyncnn before kept as null), and of the
unfinished epoch's minibatches done, "epoch_losses"
(their losses) and "epoch_rows" (their rows, which weigh the losses in the epoch's; a later
optional field as above: without it, each minibatch's rows follow from the epoch layout).

The spec's "callbacks" (a later optional field, written only where there are any) holds the
states of the callbacks of the trainer's latest fit (``Callback.callback_state``: the counters
of ``EarlyStopping``), as ``[{"class": name, "module": the class's module, "index": i, "state":
plain data}, ...]``, "index" counting the callbacks of a class of that name and package before it
(an entry without "module", as the first records were written, counts those of that name); an
entry may also hold "epoch_end": ``{"epoch": e, "logs": {...}}``, an epoch end the checkpoint
counts as done that had not reached that callback yet (a save from an earlier callback's
``on_epoch_end``). The first fit of the loaded trainer hands each state to the callback given in
its place, and delivers such an end to it after ``on_fit_start``. Without the field, that fit's
callbacks start afresh.

A save first finishes one that was interrupted between its renames (its files would otherwise be
overwritten half-way), writes every file beside its place, then renames them into place; one that
fails before its renames removes what it wrote and leaves the folder as it was. It holds the
folder's lock throughout (``flock``, where the system has it), which a load takes to finish an
interrupted save: a load meeting a save under way waits for it, rather than renaming its files.
A load holds it shared from its check of the checksums to its read of the files, so a save
waits for a load reading, which reads one checkpoint whole (not the old spec with the new
arrays). Where there is no lock, a load may finish a save under way, and the save takes its
files found in place as its own renames done; a load checks the checksums again after its read,
and reads again once where a save replaced the checkpoint meanwhile. A save interrupted between
its renames in a folder that has since become read-only is refused by the load with a
``CheckpointError`` saying so (loading it would take renaming): it loads from a writable copy.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from ._callback_states import check_callback_record, load_callback_states
from ._checkpoint_files import (
    _MAX_MANIFEST_BYTES,
    _MAX_SPEC_BYTES,
    FORMAT,
    MANIFEST,
    SPEC,
    CheckpointError,
    _finish_save,
    _interrupted_first_save,
    _read_manifest,
    _read_spec,
    read_verified,
)
from ._checkpoint_tree import ARRAYS, CastOverflow, _cast_like, _fits, _join
from ._fit_file import _FIT_FILE, _epoch_batches, fit_position
from ._math._imports import UntrustedModuleError, trusted_modules, untrusted_cause
from ._math._optim import keeps_base_state
from ._math._optim_checks import _check_step
from ._math._pytree import tree_flatten
from ._optimizer_swap import rmsprop_carried
from ._runtime._config import RunConfig
from ._runtime._graph import Graph
from ._runtime._policies import Policy, policy_from_spec
from ._runtime._run import RunState
from ._runtime._wrapped import WrappedPolicy
from .backends import get_backend

if TYPE_CHECKING:
    from ._train import Trainer

__all__ = [
    "CheckpointError",
    "check_save_path",
    "load_checkpoint",
    "read_graph",
]


#: the run options a checkpoint keeps (checked on load as a RunConfig checks them)
_OPTIONS = ("stall_timeout", "check_finite", "trace_payloads", "cuda_graphs")


def _options(options: Any, spec_path: str) -> dict[str, Any]:
    """The run options a checkpoint kept (``spec["options"]``), checked.

    Raises:
        CheckpointError: naming the option and the value expected.
    """
    if not isinstance(options, dict):
        raise CheckpointError(f"{spec_path}: 'options' must be a dict, got {options!r:.80}")
    # (an option of a later version is left out: its default here)
    kept = {name: value for name, value in options.items() if name in _OPTIONS}
    try:
        RunConfig(**kept)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{spec_path}: option {exc}") from exc
    return kept


#: the files a checkpoint folder holds (``fit.json``: where the epoch stands, by Trainer.save)
_FILES = (MANIFEST, SPEC, ARRAYS, "fit.json")


def check_save_path(path: str) -> None:
    """Refuses a save that would overwrite a file that is no part of a checkpoint: ``path`` is a
    file, or a folder holding one of the names a checkpoint writes without being a checkpoint.
    Call it before a long run whose end saves (the CLI's ``--save``) to fail before training.

    Raises:
        FileExistsError: naming the path or the files, and what to do instead.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(
            f"cannot save a checkpoint to {path!r}: it is a file; a checkpoint is a folder (name "
            "a new or empty folder, or a checkpoint to replace)"
        )
    present = [name for name in _FILES if os.path.exists(os.path.join(path, name))]
    if present and not _is_checkpoint(path):
        raise FileExistsError(
            f"cannot save a checkpoint to {path!r}: it holds {', '.join(present)}, which saving "
            "would overwrite, and it is not an asyncnn checkpoint; save to a new or empty folder "
            "(or remove those files)"
        )


def _is_checkpoint(path: str) -> bool:
    """Whether the folder ``path`` holds an asyncnn checkpoint (its manifest, or the spec of a
    checkpoint written before manifests), whatever its version and even if damaged."""
    try:
        manifest_path = os.path.join(path, MANIFEST)
        if os.path.exists(manifest_path) and os.path.getsize(manifest_path) <= _MAX_MANIFEST_BYTES:
            with contextlib.suppress(ValueError):  # not an object: the spec may still say
                if _read_manifest(manifest_path).get("format") == FORMAT:
                    return True
        spec_path = os.path.join(path, SPEC)
        if os.path.exists(spec_path) and os.path.getsize(spec_path) <= _MAX_SPEC_BYTES:
            with open(spec_path, "rb") as f:
                spec = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
            return isinstance(spec, dict) and spec.get("format") == FORMAT
    except Exception:  # noqa: BLE001 - unreadable: not known to be a checkpoint
        return False
    return False


def _spec_path(path: str) -> str:
    """The spec file of the checkpoint folder ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint folder.
    """
    if not os.path.isdir(path) or not any(
        os.path.exists(os.path.join(path, name)) for name in (SPEC, MANIFEST, MANIFEST + ".tmp")
    ):
        interrupted = _interrupted_first_save(path)
        if interrupted is not None:
            raise FileNotFoundError(interrupted)
        latest = _latest_in_checkpoint_dir(path)
        if latest is not None:
            raise FileNotFoundError(
                f"{path!r} is not a checkpoint folder but a fit's checkpoint_dir, holding a "
                f"checkpoint per epoch (epoch-NNNN); load one of them, the latest: {latest!r}"
            )
        raise FileNotFoundError(f"{path!r} is not a checkpoint folder: it has no {SPEC}")
    return os.path.join(path, SPEC)


def _latest_in_checkpoint_dir(path: str) -> str | None:
    """The checkpoint of the most epochs among the ``epoch-NNNN`` entries of ``path`` (a fit's
    ``checkpoint_dir``), or None where it holds none (or is not a folder)."""
    from ._fit import _checkpoint_epochs

    if not os.path.isdir(path):
        return None
    entries = _checkpoint_epochs(path)
    for n in sorted(entries, reverse=True):
        candidate = os.path.join(path, entries[n])
        if _is_checkpoint(candidate):
            return candidate
    return None


@contextlib.contextmanager
def _rebuilding(spec_path: str, trusted: Any) -> Iterator[None]:
    """Rebuilds objects from the specs of ``spec_path`` in its block, with ``trusted`` modules:
    a failure is a :class:`CheckpointError`, or an ``UntrustedModuleError`` naming the file."""
    try:
        with trusted_modules(trusted):
            yield
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        untrusted = untrusted_cause(exc)
        if untrusted is not None:
            raise UntrustedModuleError(f"{spec_path}: {untrusted}") from None
        raise CheckpointError(f"{spec_path}: its specs cannot be rebuilt: {exc}") from exc


def read_graph(path: str, trusted: Any = None) -> Graph:
    """The graph saved in the checkpoint folder ``path``, read from its spec alone: the arrays
    are neither read nor checksummed (:func:`load_checkpoint`, given the graph or another
    placement of it, checks the whole folder).

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint folder.
        CheckpointError: the spec is damaged, of another format version, or its graph cannot
            be rebuilt.
        UntrustedModuleError: the spec names a class of a module neither imported nor trusted.
    """
    spec_path = _spec_path(path)
    if not os.path.exists(spec_path) and not _finish_save(path):
        # (not a save interrupted between its renames, whose new spec would be whole)
        interrupted = _interrupted_first_save(path)
        if interrupted is not None:
            raise CheckpointError(interrupted)
    return _spec_graph(_read_spec(spec_path), spec_path, trusted)


def _spec_graph(spec: dict[str, Any], spec_path: str, trusted: Any = None) -> Graph:
    """The graph of ``spec``, read from ``spec_path`` (:func:`read_graph`'s, of a spec read).

    Raises:
        CheckpointError: its graph cannot be rebuilt.
        UntrustedModuleError: it names a class of a module neither imported nor trusted.
    """
    with _rebuilding(spec_path, trusted):
        return Graph.from_spec(spec["graph"])


def _check_devices_here(graph: Graph, path: str) -> None:
    """Refuses, saying how to load it, a checkpoint whose layers sit on GPUs where this machine
    has no cupy (the graph's check failed on the first such layer's inputs, and said to place
    the work on the CPU, which the saved graph's devices decide)."""
    on_gpu = {n: graph.nodes[n].device for n in graph.layers if graph.nodes[n].device != "cpu"}
    if not on_gpu:
        return
    try:
        get_backend(next(iter(on_gpu.values())))
    except ImportError as exc:
        raise ImportError(
            f"{path}: the checkpoint's layers {on_gpu} are on GPUs, which need cupy (not "
            "installed here: pip install 'asyncnn[gpu]'). To load it on the CPU, build the same "
            "graph with device='cpu' for those layers and pass it: "
            f"ann.Trainer.load({path!r}, graph=graph) (the weights go into that graph)"
        ) from exc


def _check_overrides(cls: type[Trainer], overrides: Mapping[str, Any]) -> None:
    """Refuses an override that is no argument of ``cls`` (a subclass's own too) nor
    ``trusted_modules``: ``lr=1e-4`` failed in the build, as ``Trainer.__init__() got an
    unexpected keyword argument 'lr'``, a call the user never made.

    Raises:
        TypeError: naming the unknown overrides, the accepted ones, and how to change a
            learning rate (the one such override users try).
    """
    accepted = []
    for klass in cls.__mro__:  # up to the first __init__ that takes no **kwargs
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # (less self)
        accepted += [
            p.name for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in accepted
        ]  # fmt: skip
        if all(p.kind is not p.VAR_KEYWORD for p in params):
            break
    else:  # (no __init__ that closes its arguments: any may be taken)
        return
    unknown = sorted(k for k in overrides if k not in accepted and k != "trusted_modules")
    if unknown:
        which = f"override {unknown[0]!r}" if len(unknown) == 1 else f"overrides {unknown}"
        raise TypeError(
            f"{cls.__name__}.load: unknown {which}; overrides are {cls.__name__}'s arguments "
            f"({', '.join(accepted)}) and trusted_modules. To change a learning rate, pass an "
            "optimizer: optimizer=optim.AdamW(lr=1e-4) (one of the checkpoint's kind keeps its "
            "state)"
        )


def load_checkpoint(cls: type[Trainer], path: str, **overrides: Any) -> Trainer:
    """A trainer rebuilt from the checkpoint folder ``path`` (see the module's docstring).

    ``overrides`` replace constructor arguments: with ``graph``, the weights go into that graph
    instead of the one saved (the same layers placed otherwise: on other devices or workers),
    which must have the checkpoint's layers, by name, with parameters of the same structure and
    shapes; with ``dtype``, the weights and optimizer buffers are cast to it; with an
    ``optimizer`` whose state has another structure than the checkpoint's (another kind), each
    layer's optimizer state starts fresh (the weights, versions and counters are kept), except
    that an ``RMSprop`` after one of another ``momentum`` or ``centered`` goes on with the step
    and square averages, as the optimizer setter's (:func:`rmsprop_carried`); with a
    ``policy`` of another kind than the checkpoint's (``Sync`` after ``Async``), the gradients
    the saved policy had accumulated and not yet applied are dropped. The epoch's position
    comes from the spec (from ``fit.json`` for a checkpoint of an asyncnn before the spec kept
    it). With a ``trace`` override equal to the path the saved
    trainer traced to, the trainer's :attr:`~asyncnn.Trainer.traces` come back with it, so the
    next ``fit`` numbers its trace on from them (``run.2.trace`` after ``run.trace`` and
    ``run.1.trace``); set ``trainer.traces = []`` to trace to the path itself.
    ``trusted_modules=[...]`` names modules whose classes the spec may
    name without their being imported already (see
    :func:`~asyncnn._math._imports.import_by_path`).

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint folder (also one where a first save
            was cut off before it wrote its manifest, and a fit's ``checkpoint_dir``, whose
            latest checkpoint the message names).
        CheckpointError: a file is missing, damaged (its checksum differs), of another format
            version, malformed, left by a first save cut off there (said so), left by a save
            interrupted between its renames in a folder that is read-only (said so, with how to
            load it: from a writable copy), replaced by saves during both of its reads where
            the folder cannot be locked (said so: load it again once they end), or does not fit
            the graph it describes (or the ``graph`` given): the message names the layer, the
            place in its parameters and the shapes. An optimizer state kept (not another
            optimizer's, which starts fresh) that its optimizer's update would refuse too: a
            step count that is not an int >= 0, a buffer of ints or bools or another shape.
        ValueError: ``fit.json`` (read for an older checkpoint) is damaged or another save's:
            the message names it and the fix.
        TypeError: ``graph`` is not a :class:`~asyncnn.Graph`.
        ImportError: the checkpoint's layers are on GPUs and cupy is not installed (the message
            says how to load it on the CPU: with ``graph=``).
        UntrustedModuleError: the spec names a class of a module neither imported nor trusted.
        TypeError: an override that is none of ``cls``'s arguments (``lr=1e-4``), named with
            those it takes, before anything is read.
    """
    _check_overrides(cls, overrides)
    trusted = overrides.pop("trusted_modules", None)
    given_graph = overrides.pop("graph", None)
    if given_graph is not None and not isinstance(given_graph, Graph):
        raise TypeError(f"graph must be an asyncnn Graph, got {type(given_graph).__name__}")
    spec_path = _spec_path(path)
    arrays_path = os.path.join(path, ARRAYS)
    # checked and read as one checkpoint (a save under way: waited for; one interrupted between
    # its renames: finished, the new one)
    _, (spec, arrays) = read_verified(
        path, lambda: (_read_spec(spec_path), _read_arrays(arrays_path))
    )
    with _rebuilding(spec_path, trusted):
        graph = Graph.from_spec(spec["graph"]) if given_graph is None else given_graph
        optimizer = _optimizer_from_spec(spec["optimizer"])
        policy = policy_from_spec(spec["policy"])
    kwargs: dict[str, Any] = {
        "optimizer": optimizer,
        "policy": policy,
        "seed": spec["seed"],
        "dtype": spec["dtype"],
    }
    kwargs.update(_options(spec.get("options", {}), spec_path))  # none in older checkpoints
    kwargs.update(overrides)
    fits = "its graph" if given_graph is None else "the graph given"
    _same_layers(graph, spec["layout"], f"{path}: the checkpoint does not fit {fits}")
    if given_graph is None:
        _check_devices_here(graph, path)
    position = _position(path, spec, spec_path)
    trainer = cls(graph, **kwargs)
    fresh = trainer.state
    same_dtype = "dtype" not in overrides
    # gradients the saved policy accumulated and had not yet applied were summed for its update
    # rule (Async's mean of its last keys): under a policy of another kind they would enter its
    # first update unscaled, so they are dropped (as another optimizer starts its own state)
    keep_pending = _accumulates_alike(policy, kwargs["policy"])
    try:
        params, opt_states, versions, pending, actor_states = {}, {}, {}, {}, {}
        earlier_params: dict[str, dict[int, Any]] = {}
        pending_delays: dict[str, list[int]] = {}
        for name in graph.layers:
            entry = spec["layout"][name]
            device = graph.nodes[name].device
            params[name] = _join(entry["params"], f"params/{name}", arrays, device, [0])
            _fits(params[name], fresh.params[name], f"the parameters of {name!r}", same_dtype)
            params[name] = _cast_like(
                params[name], fresh.params[name], device, f"the checkpoint's params[{name!r}]"
            )
            opt_state = _join(entry["opt_state"], f"opt/{name}", arrays, device, [0])
            opt_states[name] = _opt_state(
                opt_state, fresh.opt_states[name], name, trainer.optimizer, device,
                replaced="optimizer" in overrides, path=path,
            )  # fmt: skip
            versions[name] = entry["version"]  # (a count: _read_spec checked it)
            if "pending" in entry and keep_pending:
                acc = _join(entry["pending"]["grads"], f"pending/{name}", arrays, device, [0])
                if acc is not None:  # None: only skipped keys (an expert given no rows) so far
                    what = f"the pending gradients of {name!r}"
                    _fits(acc, fresh.params[name], what, same_dtype)
                    acc = _cast_like(acc, fresh.params[name], device, what)
                pending[name] = (acc, entry["pending"]["count"])
                if entry["pending"].get("delays"):  # (none in an older asyncnn's checkpoint)
                    pending_delays[name] = list(entry["pending"]["delays"])
            if "actor_state" in entry:
                actor_states[name] = _join(
                    entry["actor_state"], f"actor/{name}", arrays, device, [0]
                )
            # (none in a checkpoint of an older asyncnn: its next fit starts the stream anew)
            for held in entry.get("earlier", []):
                v = held["version"]  # (a count below the layer's: _read_spec checked it)
                what = f"the parameters of {name!r} at version {v}"
                earlier = _join(held["params"], f"earlier/{name}/{v}", arrays, device, [0])
                _fits(earlier, fresh.params[name], what, same_dtype)
                earlier = _cast_like(earlier, fresh.params[name], device, what)
                earlier_params.setdefault(name, {})[v] = earlier
        trainer.state = RunState(
            params, opt_states, versions, spec["minibatches"], spec["keys"], pending,
            actor_states, earlier_params, pending_delays,
        )  # fmt: skip
        trainer.epochs_done = spec["epochs_done"]
    except CheckpointError:  # (damaged, not another graph's: it says so itself)
        raise
    except CastOverflow as exc:  # (the dtype asked for, not the checkpoint, is at fault)
        raise ValueError(f"{path}: {exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path}: the checkpoint does not fit {fits}: {exc}") from exc
    if trainer.trace is not None and trainer.trace == spec.get("trace_base"):
        # the saved trainer's traces: its next fit numbers its trace on from them (run.2.trace
        # after run.trace and run.1.trace), as the trainer that saved it would have
        trainer.traces = list(spec.get("traces", []))  # (none in an older asyncnn's checkpoint)
    trainer.epoch_batches, trainer._epoch_layout = position
    trainer._epoch_losses = _epoch_losses(spec, spec_path, trainer.epoch_batches)
    load_callback_states(trainer, _callback_record(spec, spec_path))
    return trainer


def _callback_record(spec: dict[str, Any], spec_path: str) -> list[dict[str, Any]]:
    """The states of the saved fit's callbacks (the spec's ``"callbacks"``; none in a
    checkpoint of an older asyncnn, or of a fit whose callbacks kept none).

    Raises:
        CheckpointError: the record is malformed (saying how).
    """
    try:
        return check_callback_record(spec.get("callbacks", []))
    except ValueError as exc:
        raise CheckpointError(f"{spec_path} is malformed: its 'callbacks' record: {exc}") from None


def _opt_state(
    saved: Any, fresh: Any, name: str, optimizer: Any, device: str, *, replaced: bool, path: str
) -> Any:
    """A layer's optimizer state from the checkpoint (``saved``), checked against ``fresh``
    (the trainer's optimizer's ``init``) as that optimizer's update would check it at the
    layer's first update, and cast to its dtypes; ``fresh`` itself where an optimizer given to
    the load (``replaced``) keeps its state in another structure (another kind).

    Raises:
        ValueError: the structure, a shape, or a dtype that no cast makes the fresh one's (an
            int32 ``exp_avg``) differs, naming the place in the state.
        CheckpointError: the step count is not one (``-5``, ``1.5``), naming the layer.
    """
    what = f"the optimizer state of {name!r}"
    if replaced and tree_flatten(saved)[1] != tree_flatten(fresh)[1]:
        # another optimizer: its own state, fresh; an RMSprop of another momentum or centered
        # goes on with the step and square averages, as the optimizer setter's (one rule)
        saved = rmsprop_carried(saved, fresh, optimizer)
        if saved is None:
            return fresh
    if isinstance(saved, dict) and isinstance(fresh, dict) and type(fresh.get("step")) is int:
        step = saved.get("step")
        if isinstance(step, np.integer) or (
            isinstance(step, np.ndarray) and step.ndim == 0 and step.dtype.kind in "iu"
        ):  # a numpy integer the state held (update takes one), saved as an array: a count
            saved = {**saved, "step": int(step)}
    _fits(saved, fresh, what)
    state = _cast_like(saved, fresh, device, what)
    # a float buffer was cast to the trainer's dtype; one of ints or bools is no optimizer's
    # buffer, and would fail the layer's first update, inside the run
    _fits(state, fresh, what, same_dtype=True)
    if keeps_base_state(optimizer):  # (another optimizer's update checks its own state)
        try:
            _check_step(f"{what} ({type(optimizer).__name__})", state["step"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: the checkpoint is damaged: {exc}") from None
    return state


def _epoch_losses(
    spec: dict[str, Any], spec_path: str, epoch_batches: int
) -> list[tuple[float, int | None]]:
    """The known losses of the unfinished epoch's minibatches done, each with its rows (the
    spec's ``fit["epoch_losses"]`` and ``fit["epoch_rows"]``; no losses in a checkpoint of an
    older asyncnn, and no rows, ``None``, in one of an asyncnn that kept only the losses).

    Raises:
        CheckpointError: a list is malformed, the losses are more than the minibatches done, or
            the rows are not one per loss.
    """
    fit = spec.get("fit")
    record = fit if isinstance(fit, dict) and epoch_batches else {}
    losses = record.get("epoch_losses", [])
    if (
        not isinstance(losses, list)
        or len(losses) > epoch_batches
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in losses)
    ):
        raise CheckpointError(
            f"{spec_path} is malformed: its 'fit' record's epoch_losses must be a list of at "
            f"most {epoch_batches} numbers (the losses of the epoch's minibatches done), got "
            f"{losses!r:.80}"
        )
    rows = record.get("epoch_rows")
    if rows is None:
        return [(float(v), None) for v in losses]
    if (
        not isinstance(rows, list)
        or len(rows) != len(losses)
        or not all(type(r) is int and r >= 1 for r in rows)
    ):
        raise CheckpointError(
            f"{spec_path} is malformed: its 'fit' record's epoch_rows must be a list of one "
            f"int >= 1 per loss of epoch_losses ({len(losses)}: the rows of each of those "
            f"minibatches), got {rows!r:.80}"
        )
    return [(float(v), r) for v, r in zip(losses, rows, strict=True)]


def _position(path: str, spec: dict[str, Any], spec_path: str) -> tuple[int, Any]:
    """Where the checkpoint's epoch stands: the spec's ``"fit"``, else (a checkpoint written
    before the spec kept it) ``fit.json`` beside it, else its start.

    Raises:
        CheckpointError: the spec's record is malformed (naming the field).
        ValueError: ``fit.json`` is damaged or another save's (naming the fix).
    """
    minibatches = spec["minibatches"]  # (a count: _read_spec checked it)
    if "fit" in spec:
        try:
            return fit_position(spec["fit"], minibatches)
        except ValueError as exc:
            raise CheckpointError(f"{spec_path} is malformed: its 'fit' record: {exc}") from exc
    fit_file = os.path.join(path, _FIT_FILE)
    if os.path.exists(fit_file):
        return _epoch_batches(fit_file, minibatches)
    return 0, None


def _accumulates_alike(saved: Policy, given: Policy) -> bool:
    """Whether ``given`` accumulates gradients as ``saved`` does: the same kind of policy under
    any wrappers (staleness remedies), whatever its settings."""
    while isinstance(saved, WrappedPolicy):
        saved = saved.wrapped
    while isinstance(given, WrappedPolicy):
        given = given.wrapped
    return type(saved) is type(given)


def _read_arrays(arrays_path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(arrays_path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{arrays_path} is damaged: {type(exc).__name__}: {exc}") from exc


def _optimizer_from_spec(spec: Any) -> Any:
    from .optim import from_spec

    return from_spec(spec)


def _same_layers(graph: Graph, layout: dict[str, Any], prefix: str) -> None:
    """Checks that the checkpoint holds the weights of exactly the graph's layers, by name.

    Raises:
        CheckpointError: after ``prefix``, naming the layers missing on either side.
    """
    missing = [n for n in graph.layers if n not in layout]
    extra = [n for n in layout if n not in graph.layers]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"it has no weights for the layers {missing}")
        if extra:
            parts.append(f"it has weights for the layers {extra}, which the graph lacks")
        raise CheckpointError(
            f"{prefix}: {'; '.join(parts)} (the checkpoint's layers: {list(layout)}; the "
            f"graph's: {graph.layers})"
        )
