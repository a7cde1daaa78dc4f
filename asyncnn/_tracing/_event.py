"""One event of a trace, with named fields.

The file keeps each event as a msgpack map with short keys (``docs/trace_format.md``); an
:class:`Event` is that map (``e["ev"]`` still reads it, so it is a ``dict``) with a named,
typed field for each key, and the writer's defaults for the keys it leaves out.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Event"]


class Event(dict[str, Any]):
    """One event record of a trace (see ``docs/trace_format.md`` for every field).

    Attributes:
        time: seconds since the run started (the writer's clock).
        actor: the actor (or ``"scheduler"``, or an input node) it happened at.
        what: what happened: ``admit``, ``receive``, ``start``, ``end``, ``send``, ``update``,
            ``flush``, ``error``, ... (the record's ``ev``).
        kind: the message kind (``forward``/``backward``), or ``""``.
        key: the key, or -1.
        version: the parameter version, or -1.
        peer: where a message went or came from, or ``""``.
        seq: the actor's processing sequence number, or -1.
        tensors: per tensor, its shape, dtype, bytes and digest (``None`` for an absent one).
        payloads: the kept tensor bytes (empty unless the trace kept them).
        meta: small facts (minibatch, rows, slot, loss...).
    """

    __slots__ = ()

    @property
    def time(self) -> float:
        return float(self["t"])

    @property
    def actor(self) -> str:
        return str(self.get("a", ""))

    @property
    def what(self) -> str:
        return str(self.get("ev", ""))

    @property
    def kind(self) -> str:
        return str(self.get("k", ""))

    @property
    def key(self) -> int:
        return int(self.get("key", -1))

    @property
    def version(self) -> int:
        return int(self.get("v", -1))

    @property
    def peer(self) -> str:
        return str(self.get("p", ""))

    @property
    def seq(self) -> int:
        return int(self.get("seq", -1))

    @property
    def tensors(self) -> list[Any]:
        return list(self.get("x") or [])

    @property
    def payloads(self) -> list[Any]:
        return list(self.get("pl") or [])

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.get("m") or {})
