"""How a replay, or a second run, is checked against a recorded run: each actor's sends in
processing order and the weights each of its updates made, compared by digest (and where each
update was made), and each loss actor's losses, bit for bit; the first difference is a
:class:`Divergence`.

Apart from ``_replay.py`` because comparing two traces is another job than rerunning one:
:func:`asyncnn.trace.diff` compares two recorded runs with the same functions.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncnn._errors import TraceFormatError

from ._event import Event
from ._read import Trace, payload_array

__all__ = [
    "Divergence",
    "compare_sends",
    "earliest",
    "loss_divergences",
    "losses_of",
    "send_divergences",
    "update_divergences",
]


@dataclass(frozen=True)
class Divergence:
    """Where a replay (or a second run) first differs from a recorded run.

    Attributes:
        actor: the actor whose output differed first (by recorded time).
        seq: that actor's processing sequence number (its ``seq``-th piece of work).
        key: the key it was working on; ``kind``: forward or backward, ``"update"`` where
            the weights an update made differ, or where an update was made (``key``: the
            backward that made it), ``"loss"`` where a loss actor's loss value differs, or
            ``"actor_state"`` where a custom actor's ``actor_state`` raised in the recorded run
            and returned in the replay (``key`` -1: no key's work; ``seq``: the computes it
            had done, the read coming after them; ``expected``: the recorded error's text).
        peer: where the differing message went (empty for an update or a loss).
        expected / got: the digests (for a reordering, the operations; for an update made at
            another compute, each one's ``(seq, kind, key)``; for a loss, the two values)
            that differ.
        max_abs_diff: the size of the difference where both payloads were kept (for a loss,
            where both values are finite), else None.
        reason: one line saying what differed.
    """

    actor: str
    seq: int
    key: int
    kind: str
    peer: str = ""
    expected: Any = None
    got: Any = None
    max_abs_diff: float | None = None
    reason: str = ""

    def __str__(self) -> str:
        size = (
            f"; max |difference| {self.max_abs_diff:.3g}" if self.max_abs_diff is not None else ""
        )
        to = f" to {self.peer!r}" if self.peer else ""
        # (an actor_state read is no key's work: "the actor_state of key -1" named a key)
        of = f" of key {self.key}" if self.key >= 0 else ""
        return (
            f"first divergence at actor {self.actor!r}, sequence {self.seq}: the {self.kind}"
            f"{of}{to}: {self.reason}{size}"
        )


def _events_by_actor(trace: Trace, actors: set[str], what: str) -> dict[str, list[Event]]:
    """Each actor's events of kind ``what``, in the order written (an actor's updates are
    written in the order it made them)."""
    out: dict[str, list[Event]] = {a: [] for a in actors}
    for e in trace.events:
        if e.what == what and e.actor in out:
            out[e.actor].append(e)
    return out


def _sends_by_actor(trace: Trace, actors: set[str]) -> dict[str, list[Event]]:
    out = _events_by_actor(trace, actors, "send")
    for sends in out.values():
        sends.sort(key=lambda e: e.seq)  # stable: sends of one op keep their order
    return out


def compare_sends(
    recorded: Trace, replayed: Trace, actors: set[str], prefix: bool = False
) -> tuple[int, Divergence | None]:
    """Compares every actor's sent tensors, in processing order; returns (checked, first).

    With ``prefix``, a replay that sent less (it was stopped) is compared as far as it went.
    """
    checked, found = send_divergences(recorded, replayed, actors, prefix)
    return checked, earliest(found)


def earliest(found: list[tuple[float, Divergence]]) -> Divergence | None:
    """The divergence of the earliest recorded time (each actor's first), or None."""
    return min(found, key=lambda f: f[0])[1] if found else None


def send_divergences(
    recorded: Trace, replayed: Trace, actors: set[str], prefix: bool
) -> tuple[int, list[tuple[float, Divergence]]]:
    """The sends compared, and each actor's first differing send with its recorded time."""
    a = _sends_by_actor(recorded, actors)
    b = _sends_by_actor(replayed, actors)
    checked = 0
    found: list[tuple[float, Divergence]] = []
    for actor in sorted(actors):
        for i, ea in enumerate(a[actor]):
            if i >= len(b[actor]):
                if prefix:
                    break
                found.append((ea.time, Divergence(actor, ea.seq, ea.key, ea.kind,
                              ea.peer, reason="the replay sent nothing here")))  # fmt: skip
                break
            eb = b[actor][i]
            checked += 1
            same_op = (ea.kind, ea.key, ea.get("p")) == (eb.kind, eb.key, eb.get("p"))
            da, db = _digests(ea), _digests(eb)
            if same_op and da == db:
                continue
            if not same_op:
                reason = f"the replay sent the {eb.kind} of key {eb.key} to {eb.get('p')!r} instead"
                div = Divergence(actor, ea.seq, ea.key, ea.kind, ea.peer,
                                 (ea.kind, ea.key), (eb.kind, eb.key), None, reason)  # fmt: skip
            else:
                div = Divergence(actor, ea.seq, ea.key, ea.kind, ea.peer,
                                 da, db, _max_abs_diff(ea, eb), _what_differs(ea, eb))  # fmt: skip
            found.append((ea.time, div))
            break
        else:
            if len(b[actor]) > len(a[actor]):
                eb = b[actor][len(a[actor])]
                found.append((float("inf"), Divergence(actor, eb.seq, eb.key, eb.kind,
                              eb.peer, reason="the replay sent more than the run")))  # fmt: skip
    return checked, found


def _max_abs_diff(ea: Event, eb: Event) -> float | None:
    """The largest difference between the first tensors of two sends whose digests differ
    (complex numbers by modulus), where both payloads were kept, have one shape and can be read
    here (an extension dtype needs ml_dtypes); else None."""
    for i, (xa, xb) in enumerate(zip(ea.tensors, eb.tensors, strict=False)):
        if (xa and xa["h"]) == (xb and xb["h"]):
            continue
        try:
            pa, pb = payload_array(ea, i), payload_array(eb, i)
        except TraceFormatError:  # (a dtype numpy does not know here: ml_dtypes missing)
            return None
        if pa is None or pb is None or pa.shape != pb.shape or pa.size == 0:
            return None  # (no bytes, no digest to differ: a damaged digest)
        wide = np.complex128 if "complex" in pa.dtype.name + pb.dtype.name else np.float64
        return float(np.max(np.abs(pa.astype(wide) - pb.astype(wide))))
    return None


def update_divergences(
    recorded: Trace, replayed: Trace, actors: set[str], prefix: bool
) -> tuple[int, list[tuple[float, Divergence]]]:
    """The updates compared, and each actor's first differing update with its recorded time:
    the i-th update of each side paired, one made at another compute (``seq`` and key) than
    the run's is said as such (where each came) before its weights are compared."""
    a = _events_by_actor(recorded, actors, "update")
    b = _events_by_actor(replayed, actors, "update")
    checked = 0
    found: list[tuple[float, Divergence]] = []
    for actor in sorted(actors):
        ups_a, ups_b = a[actor], b[actor]
        if not any("x" in e for e in ups_a):
            continue  # an older trace: no digests of the weights
        for i, ea in enumerate(ups_a):
            if i >= len(ups_b):
                if not prefix:
                    found.append((ea.time, _update_divergence(
                        ea, ea, None, f"the replay made no update to version {ea.version}")))  # fmt: skip
                break
            eb = ups_b[i]
            checked += 1
            if "seq" in ea and "seq" in eb and (ea.seq, ea.key) != (eb.seq, eb.key):
                # made at another compute: which weights either one made says nothing then
                found.append(_moved_update(recorded, replayed, ea, eb))
                break
            da, db = _digests(ea), _digests(eb)
            if da == db and ea.version == eb.version:
                continue
            if ea.version != eb.version:
                reason = f"the replay's update made version {eb.version}, the run's {ea.version}"
            else:
                reason = f"the weights of version {ea.version} differ: " + _which_leaf(ea, eb)
            found.append((ea.time, _update_divergence(ea, ea, eb, reason)))
            break
        else:
            if len(ups_b) > len(ups_a):
                eb = ups_b[len(ups_a)]
                found.append((float("inf"), _update_divergence(
                    eb, None, eb, f"the replay made more updates than the run (to version "
                    f"{eb.version})")))  # fmt: skip
    return checked, found


def _moved_update(
    recorded: Trace, replayed: Trace, ea: Event, eb: Event
) -> tuple[float, Divergence]:
    """The divergence of two paired updates made at other computes (``ea`` the run's, ``eb``
    the replay's), at the earlier of the two, with its time in the run: the run's update, or
    the end of the run's compute in which the replay updated and the run did not."""
    kind_a, kind_b = _compute_kind(recorded, ea), _compute_kind(replayed, eb)
    made = (
        f"version {ea.version}"
        if ea.version == eb.version
        else f"version {eb.version} (the run's: {ea.version})"
    )
    if eb.seq < ea.seq:
        at, time = eb, _end_time(recorded, ea.actor, eb.seq, ea.time)
        reason = (
            f"the replay's update to {made} came in the {kind_b} of key {eb.key} (seq "
            f"{eb.seq}), before the run's, in the {kind_a} of key {ea.key} (seq {ea.seq})"
        )
    else:
        at, time = ea, ea.time
        reason = (
            f"the run's update to {made} came in the {kind_a} of key {ea.key} (seq "
            f"{ea.seq}), the replay's update later, in the {kind_b} of key {eb.key} (seq "
            f"{eb.seq})"
        )
    return time, Divergence(
        ea.actor, at.seq, at.key, "update", "",
        (ea.seq, kind_a, ea.key), (eb.seq, kind_b, eb.key), None,
        f"{reason}: the policy (or the actor's code) updates at other computes than the run's",
    )  # fmt: skip


def _compute_kind(trace: Trace, update: Event) -> str:
    """The kind of the compute (its ``start``) of ``update``'s actor and ``seq``, in which the
    update was made ("compute" where the trace holds no such start)."""
    for e in trace.events:
        if e.what == "start" and e.actor == update.actor and e.seq == update.seq:
            return e.kind
    return "compute"


def _end_time(trace: Trace, actor: str, seq: int, default: float) -> float:
    """When ``actor``'s compute ``seq`` ended in ``trace`` (``default`` where it holds none)."""
    for e in trace.events:
        if e.what == "end" and e.actor == actor and e.seq == seq:
            return e.time
    return default


def _loss_ends(trace: Trace, actors: set[str]) -> dict[str, list[Event]]:
    """Each loss actor's ``end`` events that carry its loss, in the order written (a loss
    actor's computes end in its processing order); other actors' lists are empty."""
    out = _events_by_actor(trace, actors, "end")
    return {a: [e for e in ends if "loss" in e.meta] for a, ends in out.items()}


def losses_of(trace: Trace, actors: set[str]) -> dict[str, dict[int, float]]:
    """``{loss actor: {key: loss}}``: the losses that the loss actors among ``actors`` computed
    in ``trace`` (an actor that computed none is left out)."""
    return {
        a: {e.key: float(e.meta["loss"]) for e in ends}
        for a, ends in _loss_ends(trace, actors).items()
        if ends
    }


def _same_loss(a: float, b: float) -> bool:
    """Two loss values are the same float, bit for bit (NaN equal to NaN, whatever its
    payload; 0.0 and -0.0 differ)."""
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return struct.pack("<d", a) == struct.pack("<d", b)


def loss_divergences(
    recorded: Trace, replayed: Trace, actors: set[str], prefix: bool
) -> tuple[int, list[tuple[float, Divergence]]]:
    """The losses compared, and each loss actor's first differing loss with its recorded time
    (that of the compute's ``end``, after the gradients it sent: a loss whose gradient differs
    too is found at the gradient first). With ``prefix``, a replay that computed fewer (it was
    stopped) is compared as far as it went."""
    a, b = _loss_ends(recorded, actors), _loss_ends(replayed, actors)
    checked = 0
    found: list[tuple[float, Divergence]] = []
    for actor in sorted(actors):
        for i, ea in enumerate(a[actor]):
            if i >= len(b[actor]):
                if not prefix:
                    found.append((ea.time, Divergence(actor, ea.seq, ea.key, "loss",
                                  reason="the replay computed no loss here")))  # fmt: skip
                break
            eb = b[actor][i]
            checked += 1
            va, vb = float(ea.meta["loss"]), float(eb.meta["loss"])
            if ea.key == eb.key and _same_loss(va, vb):
                continue
            if ea.key != eb.key:
                div = Divergence(actor, ea.seq, ea.key, "loss", "", ea.key, eb.key, None,
                                 f"the replay computed the loss of key {eb.key} instead")  # fmt: skip
            else:
                size = abs(va - vb) if math.isfinite(va) and math.isfinite(vb) else None
                div = Divergence(actor, ea.seq, ea.key, "loss", "", va, vb, size,
                                 f"the run's loss was {va!r}, the replay's {vb!r}")  # fmt: skip
            found.append((ea.time, div))
            break
        else:
            if len(b[actor]) > len(a[actor]):
                eb = b[actor][len(a[actor])]
                found.append((float("inf"), Divergence(actor, eb.seq, eb.key, "loss",
                              reason="the replay computed more losses than the run")))  # fmt: skip
    return checked, found


def _which_leaf(ea: Event, eb: Event) -> str:
    """The first parameter array whose digest (or count) differs between two updates."""
    xa, xb = ea.tensors, eb.tensors
    for i, (a, b) in enumerate(zip(xa, xb, strict=False)):
        if (a and a["h"]) != (b and b["h"]):
            shape = tuple(a["s"]) if a else None
            return (
                f"parameter array {i} of {len(xa)} (shape {shape}; the leaves of the layer's "
                "parameter tree, dict keys sorted) has another digest"
            )
    return f"the run's update holds {len(xa)} parameter arrays, the replay's {len(xb)}"


def _update_divergence(
    at: Event, recorded: Event | None, replayed: Event | None, reason: str
) -> Divergence:
    """A divergence at the update ``at`` (kind ``"update"``; the key and ``seq`` of the backward
    that made it), with the digests of the recorded and the replayed update where there are."""
    return Divergence(
        at.actor, at.seq, at.key, "update", "",
        None if recorded is None else _digests(recorded),
        None if replayed is None else _digests(replayed),
        None, reason,
    )  # fmt: skip


def _what_differs(ea: Event, eb: Event) -> str:
    """Why two sends of the same message differ: the first tensor whose shape or dtype differs
    (two graphs of other sizes), else its digest."""
    for i, (xa, xb) in enumerate(zip(ea.tensors, eb.tensors, strict=False)):
        if xa is None or xb is None:
            continue
        if (xa.get("s"), xa.get("d")) != (xb.get("s"), xb.get("d")):
            return (
                f"tensor {i} has shape {tuple(xa.get('s', ()))} {xa.get('d')} in the first "
                f"run and {tuple(xb.get('s', ()))} {xb.get('d')} in the second"
            )
    if len(ea.tensors) != len(eb.tensors):
        return f"the first run sent {len(ea.tensors)} tensors, the second {len(eb.tensors)}"
    return "the tensor's digest differs"


def _digests(e: Event) -> list[Any]:
    """The digest of each tensor ``e`` carries (None where it carried none)."""
    return [x and x["h"] for x in e.tensors]
