"""The callbacks' states in checkpoints: what ``Callback.callback_state`` returns, recorded by
a save (``EarlyStopping``'s counters), checked as a checkpoint loads, and handed to the callbacks
of the loaded trainer's first fit that ends an epoch; with a state taken mid-way through an epoch
end, that epoch's end still due to the callbacks it had not reached."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from ._callbacks import Callback, _overrides

if TYPE_CHECKING:
    from ._train import Trainer

# (kept in the trainer's _fit_callbacks, _callback_states, _callback_states_loaded and the
# attributes after them: see Trainer.__init__)

#: the ints a checkpoint's spec holds (msgpack's: 64 bits, signed or not)
_INT_RANGE = (-(2**63), 2**64 - 1)


def _plain(value: Any, where: str) -> Any:
    """``value``, a callback's state, as a checkpoint keeps it: plain data, numpy scalars as
    Python's, tuples as lists.

    Raises:
        TypeError: ``value`` holds what a checkpoint cannot, named with its place ``where``.
    """
    if isinstance(value, np.generic) and isinstance(value.item(), bool | int | float | str):
        value = value.item()  # (before float: a numpy float64 is one, which msgpack may refuse)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            shown = str(value) if value.bit_length() <= 128 else f"of {value.bit_length()} bits"
            raise TypeError(
                f"{where} is the int {shown}, outside the 64 bits a checkpoint keeps (from "
                "-2**63 to 2**64 - 1): keep it as a str, or a float"
            )
        return value
    if isinstance(value, str):
        _check_text(value, f"{where} is a str")
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        keys = [k for k in value if not isinstance(k, str)]
        if keys:
            raise TypeError(
                f"{where} has the key {keys[0]!r:.80}, which is no str: a checkpoint keeps a "
                "callback's state as plain data (dicts keyed by str)"
            )
        for k in value:
            _check_text(k, f"{where} has the key {k!r:.80}, a str")
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"{where} is {type(value).__name__} {value!r:.80}, which a checkpoint cannot keep: a "
        "callback's state is plain data (None, bools, ints, floats, strs, and lists and "
        "str-keyed dicts of them); keep arrays as lists, or save them in a file of your own"
    )


def _check_text(text: str, what: str) -> None:
    """Refuses ``text`` where it is no UTF-8 text (a lone surrogate), as a checkpoint's spec
    keeps its strs; ``what`` says where it is, and that it is a str."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TypeError(
            f"{what} that is no UTF-8 text ({exc.reason}: {text[exc.start : exc.end]!r} at "
            f"{exc.start}), which a checkpoint cannot keep"
        ) from None


def _packed(state: Any, where: str) -> Any:
    """:func:`_plain`'s ``state``, and what msgpack refuses of it (nested too deep, say) refused
    by name too, as the save would refuse it."""
    try:
        plain = _plain(state, where)
    except RecursionError:
        raise TypeError(f"{where} holds itself, or is nested too deep for a checkpoint") from None
    try:
        msgpack.packb(plain, use_bin_type=True)
    except Exception as exc:  # noqa: BLE001 - any refusal: named, with msgpack's own words
        raise TypeError(
            f"{where} cannot be kept in a checkpoint: msgpack refused it "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return plain


def _package(module: str) -> str:
    """The package a class's module is part of: matching by it, a class moved between the
    modules of its package (asyncnn's own private ones) still takes its saved state, and
    another library's class of the same name does not."""
    return module.partition(".")[0]


def _keys(callbacks: Sequence[Callback]) -> list[tuple[str, str, int]]:
    """Each callback's key in a record: its class's module and name, and how many callbacks of
    a class of that name and package come before it."""
    seen: dict[tuple[str, str], int] = {}
    keys = []
    for cb in callbacks:
        cls = type(cb)
        same = (_package(cls.__module__), cls.__qualname__)
        keys.append((cls.__module__, cls.__qualname__, seen.get(same, 0)))
        seen[same] = seen.get(same, 0) + 1
    return keys


def _name_keys(callbacks: Sequence[Callback]) -> list[tuple[str, int]]:
    """Each callback's key in a record without modules (as the first records were written):
    its class's name, and how many callbacks of a class of that name come before it."""
    seen: dict[str, int] = {}
    keys = []
    for cb in callbacks:
        name = type(cb).__qualname__
        keys.append((name, seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
    return keys


def callback_states(
    callbacks: Sequence[Callback], epoch_end: tuple[int, dict[str, float], int] | None = None
) -> list[dict[str, Any]]:
    """The record a checkpoint keeps of ``callbacks``' states: ``{"class": the class's name,
    "module": its module, "index": how many callbacks of that class come before it, "state":
    its callback_state()}`` for each one whose ``callback_state()`` is not None, in order.

    ``epoch_end`` is the epoch whose ``on_epoch_end`` the fit is delivering, or was when an
    error stopped it: ``(epoch, logs, i)``, the callbacks from the ``i``-th on not given it
    yet. Each of those with an ``on_epoch_end`` has it in its entry (``"epoch_end": {"epoch",
    "logs"}``), which the fit resumed from the record delivers to the callback in its place,
    after its ``on_fit_start``: the checkpoint counts that epoch as done.

    Raises:
        TypeError: a state holds what a checkpoint cannot, naming the callback and the place.
    """
    record = []
    for i, (cb, (module, name, index)) in enumerate(zip(callbacks, _keys(callbacks), strict=True)):
        state = cb.callback_state()
        if state is None:
            continue
        where = f"the state of callback {_which(name, index)} (its callback_state())"
        entry = {"class": name, "module": module, "index": index, "state": _packed(state, where)}
        if epoch_end is not None and i >= epoch_end[2] and _overrides(cb, "on_epoch_end"):
            epoch, logs, _ = epoch_end
            entry["epoch_end"] = {"epoch": epoch, "logs": _packed(logs, f"epoch {epoch}'s logs")}
        record.append(entry)
    return record


def _which(name: str, index: int) -> str:
    """A callback of a record, as a message names it: ``EarlyStopping`` for the first of its
    class, ``EarlyStopping #2`` for the second."""
    return name if index == 0 else f"{name} #{index + 1}"


def check_callback_record(record: Any) -> list[dict[str, Any]]:
    """``record``, a checkpoint's ``"callbacks"``, checked to be one :func:`callback_states`
    writes (or wrote before it kept modules).

    Raises:
        ValueError: saying what is wrong with it.
    """
    if not isinstance(record, list):
        raise ValueError(f"it must be a list, got {record!r:.80}")
    seen = set()
    for entry in record:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("class"), str)
            or not isinstance(entry.get("module", ""), str)
            or type(entry.get("index")) is not int
            or entry["index"] < 0
            or "state" not in entry
        ):
            raise ValueError(
                'each entry must be {"class": str, "module": str, "index": int >= 0, "state": '
                f"...}}, got {entry!r:.80}"
            )
        if "epoch_end" in entry:
            _check_epoch_end(entry["epoch_end"])
        module = entry.get("module")
        key = (None if module is None else _package(module), entry["class"], entry["index"])
        if key in seen:
            raise ValueError(f"it holds {_which(*key[1:])} twice")
        seen.add(key)
    return record


def _check_epoch_end(end: Any) -> None:
    """Refuses an entry's ``"epoch_end"`` that is none :func:`callback_states` writes.

    Raises:
        ValueError: saying what is wrong with it.
    """
    logs = end.get("logs") if isinstance(end, dict) else None
    if (
        not isinstance(end, dict)
        or type(end.get("epoch")) is not int
        or end["epoch"] < 0
        or not isinstance(logs, dict)
        or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, int | float)
            for k, v in logs.items()
        )
    ):
        raise ValueError(
            'an entry\'s "epoch_end" must be {"epoch": int >= 0, "logs": {str: number}}, got '
            f"{end!r:.80}"
        )


def trainer_callback_states(trainer: Trainer) -> list[dict[str, Any]]:
    """What a save of ``trainer`` records of its callbacks' states: those of its running fit's
    callbacks as they are now (a save from a hook, ``checkpoint_every``'s), with the epoch end
    being delivered still due to those after the one delivering it; else those its latest
    fit's had when it ended. The states of the checkpoint it was loaded from instead, until a
    fit of it has ended an epoch.

    Raises:
        TypeError: a state holds what a checkpoint cannot (naming the callback and the place).
        Exception: what reading the states raised as the latest fit ended (a fresh one).
    """
    live = trainer._fit_callbacks
    if live is not None and not _loaded_still_due(trainer):
        return callback_states(live, trainer._epoch_end_due)
    kept = trainer._callback_states
    if isinstance(kept, Exception):
        raise _raised_again(kept) from kept
    return list(kept)


def _raised_again(error: Exception) -> Exception:
    """A copy of ``error``, which reading the callbacks' states raised as the latest fit ended,
    for a save to raise (``from`` it): raised again, the one object would take each save's
    frames into its traceback."""
    fresh: Exception
    try:
        fresh = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception that cannot be made again from its args
        fresh = RuntimeError(f"{type(error).__name__}: {error}")
    # (its own notes, not the original's list: the original, shown above it, has those)
    fresh.__notes__ = [
        "raised as the latest fit ended, reading its callbacks' states (above), which a save "
        "records: to save this trainer all the same, run a fit without that callback first "
        "(fit(data, epochs=0, callbacks=[the others]) trains nothing)"
    ]
    return fresh


def _loaded_still_due(trainer: Trainer) -> bool:
    """Whether ``trainer``'s record is the states of the checkpoint it was loaded from, which
    no fit of it has gone on from yet: none has ended an epoch (one that failed before, or ran
    none, leaves them to the next, which its callbacks then take)."""
    return trainer._callback_states_loaded and trainer.epochs_done == trainer._callback_states_since


def load_callback_states(trainer: Trainer, record: list[dict[str, Any]]) -> None:
    """Gives ``trainer``, loaded from a checkpoint, its ``record`` of callback states (checked
    by :func:`check_callback_record`), which its next fit hands on."""
    trainer._callback_states = record
    trainer._callback_states_loaded = bool(record)
    trainer._callback_states_since = trainer.epochs_done


def quiet_loaded_callback_states(trainer: Trainer) -> list[str]:
    """The callbacks (as messages name them) whose states ``trainer`` was loaded with and has
    not handed on yet, which its fits then drop without a warning where they have no such
    callback: for a caller that says so itself (``asyncnn train``, whose users pass no
    callbacks)."""
    if not _loaded_still_due(trainer) or not isinstance(trainer._callback_states, list):
        return []
    trainer._callback_states_quiet = True
    return [_which(entry["class"], entry["index"]) for entry in trainer._callback_states]


def start_callback_states(trainer: Trainer, callbacks: Sequence[Callback]) -> None:
    """As a fit starts, before its callbacks do: where ``trainer`` was loaded from a checkpoint
    that kept callback states and no fit of it has ended an epoch since, each state goes to the
    callback of ``callbacks`` in its place (:func:`_keys`; an epoch end still due to it is
    delivered after ``on_fit_start``: :func:`deliver_restored_epoch_ends`); then ``callbacks``
    are the ones whose states a save records. Warns (a ``UserWarning``) of a state that no
    callback given takes, that its callback refuses (``ValueError``), or whose callback keeps
    none: those start afresh, and the states are dropped (once the fit ends an epoch).

    Raises:
        TypeError: a callback that saves a state but cannot take one was given one (its
            load_callback_state's).
    """
    trainer._epoch_end_due = None
    trainer._restored_epoch_ends = []
    if _loaded_still_due(trainer) and isinstance(trainer._callback_states, list):
        trainer._restored_epoch_ends = _restore(trainer, callbacks, trainer._callback_states)
    else:
        trainer._callback_states_loaded = False
    trainer._callback_states_since = trainer.epochs_done
    trainer._fit_callbacks = list(callbacks)


def _restore(
    trainer: Trainer, callbacks: Sequence[Callback], record: list[dict[str, Any]]
) -> list[tuple[Callback, int, dict[str, float]]]:
    """Hands each state of ``record`` to the callback of ``callbacks`` in its place, warning of
    those none takes; returns the callbacks that took one with an epoch end still due to them,
    each with that epoch and its logs, in their order."""
    from ._runtime._lifecycle import _user_stacklevel

    by_class = {
        (_package(module), name, index): cb
        for cb, (module, name, index) in zip(callbacks, _keys(callbacks), strict=True)
    }
    by_name = dict(zip(_name_keys(callbacks), callbacks, strict=True))
    missing = []
    due: dict[int, tuple[int, dict[str, float]]] = {}
    for entry in record:
        name, index, module = entry["class"], entry["index"], entry.get("module")
        which = _which(name, index)
        if module is None:  # (a record of before modules: by name alone)
            cb = by_name.get((name, index))
        else:
            cb = by_class.get((_package(module), name, index))
        if cb is None:
            missing.append(which + _other_class(callbacks, name, module))
            continue
        if not _keeps_state(cb):
            warnings.warn(
                f"fit: the checkpoint this trainer was loaded from kept the state of callback "
                f"{which}, which the {which} given to this fit keeps none of its own (its class "
                "overrides neither callback_state nor load_callback_state): it starts afresh "
                "and that state is dropped",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
            continue
        try:
            # (a copy: the callback may keep and change what it is given)
            cb.load_callback_state(copy.deepcopy(entry["state"]))
        except ValueError as exc:
            warnings.warn(
                f"fit: the checkpoint this trainer was loaded from kept the state of callback "
                f"{which}, which the {which} given to this fit does not take ({exc}): it starts "
                "afresh",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
            continue
        if "epoch_end" in entry:
            due[id(cb)] = (entry["epoch_end"]["epoch"], dict(entry["epoch_end"]["logs"]))
    if missing and not trainer._callback_states_quiet:
        warnings.warn(
            "fit: the checkpoint this trainer was loaded from kept the state of the callbacks "
            f"{', '.join(missing)}, which this fit is not given: their state is dropped. To go "
            "on from it, pass callbacks of those classes (new ones, in the order the saved "
            "fit had them); to leave them out, filter this warning",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )
    return [(cb, *due[id(cb)]) for cb in callbacks if id(cb) in due]


def _keeps_state(cb: Callback) -> bool:
    """Whether ``cb``'s class keeps a state of its own (overrides either method of it)."""
    return _overrides(cb, "callback_state") or _overrides(cb, "load_callback_state")


def _other_class(callbacks: Sequence[Callback], name: str, module: str | None) -> str:
    """Where ``callbacks`` has one of a class named ``name`` of another package than
    ``module``, the saved state's: both, as a message names them (else nothing)."""
    if module is None:
        return ""
    for cb in callbacks:
        cls = type(cb)
        if cls.__qualname__ == name and _package(cls.__module__) != _package(module):
            return f" (of {module}; this fit's {name} is {cls.__module__}.{name})"
    return ""


def deliver_restored_epoch_ends(trainer: Trainer) -> None:
    """After the fit's ``on_fit_start``: the epoch end that the checkpoint counted as done but
    that had not reached a callback yet (a save from an earlier callback's ``on_epoch_end``, or
    an error there), delivered to the callback that took that callback's state, as the
    unbroken fit delivered it (an ``EarlyStopping`` may stop the fit there, before it trains)."""
    due, trainer._restored_epoch_ends = trainer._restored_epoch_ends, []
    for cb, epoch, logs in due:
        cb.on_epoch_end(trainer, epoch, dict(logs))


def deliver_epoch_end(
    trainer: Trainer, callbacks: Sequence[Callback], epoch: int, logs: dict[str, float]
) -> None:
    """Each of ``callbacks``' ``on_epoch_end`` of ``epoch``, in order, noting (for a save from
    one of them, or after an error in one) which of them have not had it yet."""
    for i, cb in enumerate(callbacks):
        trainer._epoch_end_due = (epoch, dict(logs), i + 1)
        cb.on_epoch_end(trainer, epoch, dict(logs))
    trainer._epoch_end_due = None


def check_savable_callback_states(callbacks: Sequence[Callback]) -> None:
    """Refuses, before a fit with ``checkpoint_every`` trains, a callback state its saves
    could not keep (the first of them refused it only after ``checkpoint_every`` epochs). A
    state that becomes one only later is refused by that save.

    Raises:
        TypeError: the save's own message (naming the callback and the place in its state),
            and that the fit checked it as it started.
    """
    try:
        callback_states(callbacks)
    except TypeError as exc:
        raise TypeError(
            f"{exc} (checked as the fit starts, before any training: checkpoint_every saves "
            "the callbacks' states with every checkpoint)"
        ) from None


def end_callback_states(trainer: Trainer) -> None:
    """As a fit ends, however it ends: the record of its callbacks' states now, with an epoch
    end that an error cut short still due to those after it, is what a later save of
    ``trainer`` writes (or the error reading them raised, which that save raises: a fit that
    trained is not failed at its end by a state only a save needs). Where the fit ended no
    epoch of a trainer loaded with states, those stay, for its next fit."""
    live = trainer._fit_callbacks
    if live is None:
        return
    trainer._fit_callbacks = None
    epoch_end, trainer._epoch_end_due = trainer._epoch_end_due, None
    trainer._restored_epoch_ends = []
    if _loaded_still_due(trainer):
        return
    trainer._callback_states_loaded = trainer._callback_states_quiet = False
    kept: list[dict[str, Any]] | Exception
    try:
        kept = callback_states(live, epoch_end)
    except Exception as exc:  # noqa: BLE001 - raised by the save that needs the states
        kept = exc
    trainer._callback_states = kept
