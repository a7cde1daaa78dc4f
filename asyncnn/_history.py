"""What ``Trainer.fit`` measured: :class:`History`."""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from ._checkpoint_files import write_failed, write_whole
from ._runtime._statistics import ActorStatistics

__all__ = ["History"]


@dataclass
class History:
    """What ``fit`` measured.

    Attributes:
        losses: one mean loss per minibatch, in minibatch order (per key for ``Async``, whose
            keys are minibatches).
        epochs: one dict per epoch finished: ``"epoch"`` (counted over the trainer's life, so
            a second ``fit`` starts after the first's), ``"loss"`` and, with
            ``validation_data``, ``"val_loss"`` (and ``"val_accuracy"``). ``"loss"`` is over
            the epoch's rows, as :meth:`Trainer.evaluate` gives ``"val_loss"``: the mean of its
            minibatch losses each weighted by its rows (a short last minibatch counts for its
            rows only), or their sum for a loss of ``reduction="sum"`` (with loss nodes of
            both kinds, the weighted mean); a ``CrossEntropyLoss`` with ignored labels or
            class weights is weighted by its rows here and by its labels' weights in
            ``evaluate``, so the two part there. An epoch that an interrupted ``fit`` left
            unfinished gets its entry from the ``fit`` that finishes it, also after
            ``Trainer.save`` and ``load``; its ``"loss"`` is over all of the epoch's
            minibatches, those the interrupted ``fit`` ran included (their losses are in that
            ``fit``'s :attr:`losses`), as an unbroken ``fit`` gives it.
        samples_per_second: training throughput over the whole call.
        seconds: wall time of the call.
        statistics: per-actor counters at the end of the call.
        stopped_early: a callback ended the fit (``trainer.stop_training``).

    :meth:`save` writes it as JSON and :meth:`load` reads it back, to keep a run's history
    beside its checkpoint.
    """

    losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    samples_per_second: float = 0.0
    seconds: float = 0.0
    statistics: dict[str, ActorStatistics] = field(default_factory=dict, repr=False)
    stopped_early: bool = False

    @property
    def metrics(self) -> dict[str, list[float]]:
        """The epoch metrics as ``{name: one value per epoch}`` (``"loss"``, ``"val_loss"``...)."""
        out: dict[str, list[float]] = {}
        for entry in self.epochs:
            for name, value in entry.items():
                if name != "epoch":
                    out.setdefault(name, []).append(value)
        return out

    def utilisation(self) -> dict[str, float]:
        """Busy fraction of each actor over the call."""
        out = {}
        for name, s in self.statistics.items():
            total = s.busy_seconds + s.idle_seconds
            out[name] = s.busy_seconds / total if total > 0 else 0.0
        return out

    def __repr__(self) -> str:
        parts = [f"{len(self.losses)} minibatches", f"{len(self.epochs)} epochs"]
        if self.losses:
            parts.append(f"loss {self.losses[0]:.4g} -> {self.losses[-1]:.4g}")
        last = self.epochs[-1] if self.epochs else {}
        parts += [f"{k} {v:.4g}" for k, v in last.items() if k.startswith("val_")]
        parts.append(f"{self.samples_per_second:.0f} samples/s")
        if self.stopped_early:
            parts.append("stopped early")
        return f"History({', '.join(parts)})"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the history to ``path`` as one JSON object, which :meth:`load` reads back.

        The format (``"format": "asyncnn.History"``, ``"version": 1``) holds every attribute
        under its own name: ``losses`` (a list of numbers), ``epochs`` (a list of objects, an
        epoch's ``"epoch"`` an integer), ``samples_per_second``, ``seconds``, ``stopped_early``
        and ``statistics`` (``{actor: {"kind": class, counter: value}}``: the fields of the
        actor's :class:`ActorStatistics`, whose ``kind`` is its class name for asyncnn's own
        (``"LoopStatistics"``...) and ``"module:qualname"`` for a custom one; a dict keyed by
        integers, such as ``delays``, is keyed by them as strings). It is strict JSON
        that any reader parses: a non-finite float is written as the string ``"NaN"``,
        ``"Infinity"`` or ``"-Infinity"``, every other float as the shortest decimal that reads
        back to the same bits. numpy scalars are written as the Python numbers they equal.
        The file is written whole or not at all (through ``<path>.tmp``, renamed into place),
        its folder made first where there is none, as :meth:`Trainer.save` makes its own (so
        ``hist.save("run/history.json")`` beside a checkpoint saved to ``run``).

        Raises:
            TypeError: a value is not a number where one belongs (named with its field;
                nothing is written).
            OSError: the file, or its folder, cannot be written (named by ``path``; no ``.tmp``
                file is left behind).
        """
        path = os.fspath(path)
        # serialised first: a value that cannot be written fails before the file is touched
        text = json.dumps(self._to_json(), allow_nan=False, indent=1)
        folder = os.path.dirname(path)
        if folder:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:  # (named by the file the caller gave, which it is for)
                why = exc.strerror or str(exc)
                if isinstance(exc, FileExistsError):  # (its words, "File exists", say not which)
                    why = "a file is in its place"
                elif exc.filename is not None and os.fspath(exc.filename) != folder:
                    why = f"{why}: {os.fspath(exc.filename)}"  # (a folder above it)
                raise write_failed(
                    exc.errno,
                    f"its folder {folder} could not be made: {why}",
                    path,
                    "; give a path in a folder that exists or can be made",
                ) from exc
        try:
            write_whole(path, text + "\n")
        except OSError as exc:
            if exc.filename != path + ".tmp":
                raise
            # the file written first and renamed into place is this method's own: the caller
            # named `path`
            raise write_failed(exc.errno, exc.strerror or str(exc), path) from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        """The history that :meth:`save` wrote to ``path`` (every float bit-identical).

        Raises:
            FileNotFoundError: there is no file at ``path``.
            ValueError: the file is not a saved history, or a field of it is damaged (the
                message names the file and the field), or it names a custom statistics class
                whose module this process has not imported (import it first: reading a file
                never imports code).
        """
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            record = json.loads(data.decode("utf-8"))
        except ValueError as exc:  # also a UnicodeDecodeError: a binary file
            raise ValueError(f"{path} is not a saved History: it is not JSON ({exc})") from None
        try:
            return cls._from_json(record)
        except ValueError as exc:
            raise ValueError(f"{path} is not a readable saved History: {exc}") from None

    def _to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "losses": [_float_out(v, f"losses[{i}]") for i, v in enumerate(self.losses)],
            "epochs": [
                {k: _number_out(v, f"epochs[{i}][{k!r}]") for k, v in entry.items()}
                for i, entry in enumerate(self.epochs)
            ],
            "samples_per_second": _float_out(self.samples_per_second, "samples_per_second"),
            "seconds": _float_out(self.seconds, "seconds"),
            "stopped_early": bool(self.stopped_early),
            "statistics": {
                str(name): _statistics_out(s, f"statistics[{name!r}]")
                for name, s in self.statistics.items()
            },
        }

    @classmethod
    def _from_json(cls, record: Any) -> History:
        if not isinstance(record, dict):
            raise ValueError(f"it holds a JSON {type(record).__name__}, not an object")
        if record.get("format") != _FORMAT:
            raise ValueError(f"its format is {record.get('format')!r:.80}, not {_FORMAT!r}")
        if record.get("version") != _VERSION:
            raise ValueError(
                f"its version is {record.get('version')!r:.80}; this asyncnn reads version "
                f"{_VERSION} (upgrade asyncnn to read a newer file)"
            )
        unknown = sorted(set(record) - _FIELDS)
        if unknown:
            raise ValueError(f"it has unknown fields {unknown}")
        losses = _list(record.get("losses", []), "losses")
        epochs = _list(record.get("epochs", []), "epochs")
        statistics = record.get("statistics", {})
        if not isinstance(statistics, dict):
            raise ValueError(f"statistics is a JSON {type(statistics).__name__}, not an object")
        stopped = record.get("stopped_early", False)
        if not isinstance(stopped, bool):
            raise ValueError(f"stopped_early is {stopped!r:.80}, not true or false")
        return cls(
            losses=[_float_in(v, f"losses[{i}]") for i, v in enumerate(losses)],
            epochs=[_epoch_in(e, f"epochs[{i}]") for i, e in enumerate(epochs)],
            samples_per_second=_float_in(
                record.get("samples_per_second", 0.0), "samples_per_second"
            ),
            seconds=_float_in(record.get("seconds", 0.0), "seconds"),
            statistics={
                name: _statistics_in(s, f"statistics[{name!r}]") for name, s in statistics.items()
            },
            stopped_early=stopped,
        )


_FORMAT = "asyncnn.History"
_VERSION = 1
_FIELDS = frozenset({"format", "version", *(f.name for f in fields(History))})
# JSON has no token for these; the strings are Python's own spellings of them
_NON_FINITE_OUT = {math.inf: "Infinity", -math.inf: "-Infinity"}
_NON_FINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_out(value: Any, where: str) -> float | str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"History.{where} is {value!r:.80}, not a number; save writes numbers")
    x = float(value)
    if math.isnan(x):
        return "NaN"
    return _NON_FINITE_OUT.get(x, x)


def _number_out(value: Any, where: str) -> int | float | str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return _float_out(value, where)


def _value_out(value: Any, where: str) -> Any:
    """A counter's value as JSON: numbers (numpy's too), None, strings, lists, and dicts keyed
    by strings or integers (as strings: JSON's keys are)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Real):
        return _number_out(value, where)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, str | numbers.Integral):
                raise TypeError(f"History.{where} has the key {k!r:.80}, not a str or an int")
            out[str(k)] = _value_out(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_value_out(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"History.{where} is {type(value).__name__}, which save cannot write")


def _statistics_kinds() -> dict[str, type[ActorStatistics]]:
    """The counters' classes of asyncnn's own actors, by name."""
    from ._runtime._loops import LoopStatistics  # (they import much of the runtime)
    from ._runtime._routing import RouterStatistics

    return {c.__name__: c for c in (ActorStatistics, LoopStatistics, RouterStatistics)}


def _statistics_out(stats: Any, where: str) -> dict[str, Any]:
    if not isinstance(stats, ActorStatistics):
        raise TypeError(f"History.{where} is {type(stats).__name__}, not ActorStatistics")
    cls = type(stats)
    kind = cls.__name__
    if _statistics_kinds().get(kind) is not cls:  # a custom actor's: found again by its path
        kind = f"{cls.__module__}:{cls.__qualname__}"
    out: dict[str, Any] = {"kind": kind}
    for f in fields(cls):
        out[f.name] = _value_out(getattr(stats, f.name), f"{where}.{f.name}")
    return out


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where} is a JSON {type(value).__name__}, not an array")
    return value


def _float_in(value: Any, where: str) -> float:
    if isinstance(value, str) and value in _NON_FINITE_IN:
        return _NON_FINITE_IN[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f'{where} is {value!r:.80}, not a number (or "NaN", "Infinity", "-Infinity")'
        )
    return float(value)


def _epoch_in(entry: Any, where: str) -> dict[str, float]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a JSON {type(entry).__name__}, not an object")
    out: dict[str, float] = {}
    for name, value in entry.items():
        # an integer stays one (the "epoch" number), as fit wrote it
        out[name] = value if type(value) is int else _float_in(value, f"{where}[{name!r}]")
    return out


def _statistics_class(kind: Any, where: str) -> type[ActorStatistics]:
    """The class ``kind`` names: asyncnn's by name, a custom one by ``module:qualname`` from a
    module already imported (reading a file never imports code: docs/security.md)."""
    builtin = _statistics_kinds()
    if not isinstance(kind, str):
        raise ValueError(f"{where}.kind is {kind!r:.80}, not a class name")
    if kind in builtin:
        return builtin[kind]
    module, _, qualname = kind.partition(":")
    found: Any = sys.modules.get(module) if qualname else None
    for part in qualname.split(".") if found is not None else ():
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, ActorStatistics):
        return found
    raise ValueError(
        f"{where}.kind is {kind!r:.80}, no statistics class of this process (a custom one is "
        f"found only once its module is imported: import it before History.load)"
    )


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` cut at each ``sep`` outside brackets (``"list[float | None] | None"`` at
    ``"|"``: two parts), each stripped."""
    parts: list[str] = []
    depth = start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _inside(kind: str, *names: str) -> str | None:
    """What ``kind`` holds between the brackets of one of ``names`` (``list[float]``:
    ``"float"``), or None."""
    for name in names:
        if kind.startswith(name + "[") and kind.endswith("]"):
            return kind[len(name) + 1 : -1]
    return None


def _typed_in(value: Any, kind: str, where: str) -> Any:
    """A JSON value back as the field's annotation ``kind`` says (as written in the class):
    floats (non-finite ones are written as strings), ints, ``X | None`` (``Optional[X]``),
    ``list[X]``, ``tuple[X, ...]`` and ``tuple[X, Y]`` (written as lists), ``dict[K, V]``."""
    if kind == "float":
        return _float_in(value, where)
    if kind == "int":
        if type(value) is not int:
            raise ValueError(f"{where} is {value!r:.80}, not an integer")
        return value
    parts = _split_top(kind, "|")
    optional = _inside(kind, "Optional", "typing.Optional")
    if optional is not None or (len(parts) == 2 and "None" in parts):  # ``X | None``
        if optional is None:
            parts.remove("None")
            optional = parts[0]
        return None if value is None else _typed_in(value, optional, where)
    items = _inside(kind, "list", "List", "typing.List")
    if items is not None:
        if not isinstance(value, list):
            raise ValueError(f"{where} is {value!r:.80}, not a list")
        return [_typed_in(v, items, f"{where}[{i}]") for i, v in enumerate(value)]
    items = _inside(kind, "tuple", "Tuple", "typing.Tuple")
    if items is not None:
        if not isinstance(value, list):
            raise ValueError(f"{where} is {value!r:.80}, not a list (a tuple, written as one)")
        each = _split_top(items, ",")
        if len(each) == 2 and each[1] == "...":
            each = [each[0]] * len(value)
        elif len(each) != len(value):
            raise ValueError(
                f"{where} has {len(value)} entries; its tuple[{items}] has {len(each)}"
            )
        pairs = enumerate(zip(value, each, strict=True))
        return tuple(_typed_in(v, k, f"{where}[{i}]") for i, (v, k) in pairs)
    inner = _inside(kind, "dict", "Dict", "typing.Dict")
    if inner is not None:
        if not isinstance(value, dict):
            raise ValueError(f"{where} is {value!r:.80}, not an object")
        key_kind, value_kind = (_split_top(inner, ",") + ["", ""])[:2]
        out = {}
        for k, v in value.items():
            key: Any = k
            if key_kind == "int":
                try:
                    key = int(k)
                except ValueError:
                    raise ValueError(f"{where} has the key {k!r:.80}, not an integer") from None
            out[key] = _typed_in(v, value_kind, f"{where}[{k!r}]")
        return out
    return value  # a type this reader does not know: the JSON value as it is


def _statistics_in(record: Any, where: str) -> ActorStatistics:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object")
    cls = _statistics_class(record.get("kind", "ActorStatistics"), where)
    # an annotation is its source text under ``from __future__ import annotations``, else a type
    kinds = {f.name: f.type.__name__ if type(f.type) is type else str(f.type) for f in fields(cls)}
    unknown = sorted(set(record) - set(kinds) - {"kind"})
    if unknown:
        raise ValueError(f"{where} has counters {unknown} that {cls.__name__} lacks")
    values = {
        name: _typed_in(value, kinds[name], f"{where}.{name}")
        for name, value in record.items()
        if name != "kind"
    }
    try:
        return cls(**values)
    except TypeError as exc:  # a custom class whose fields changed since the save
        raise ValueError(f"{where}: {cls.__name__} refused the counters ({exc})") from None
