"""The counters each actor keeps (read with ``run.statistics()`` or ``History.statistics``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ActorStatistics"]


@dataclass(slots=True)
class ActorStatistics:
    """Counters of one actor, read with ``run.statistics()`` or ``History.statistics``.

    Attributes:
        busy_seconds: time spent in this actor's operations (forward, backward, update, and a
            custom actor's handlers whole, their awaits included); the work of another actor
            run inside one of them (handed over in its task) counts as that actor's.
        idle_seconds: time alive and not busy: from the actor's start to when it stopped (to
            the reading, while the run goes on), less :attr:`busy_seconds`.
        messages_in / messages_out: messages received and sent (forwards and gradients, one
            per input slot or consumer edge, and the run's control messages received).
        forwards / backwards / updates: keys forwarded, keys backwarded (a split backward's
            two halves count once), optimizer updates applied. A loss actor computes a key's
            loss and gradients in one operation, counted in ``forwards``.
        stored: keys whose activations are held now; ``peak_stored``: the most held at once.
        versions_held: distinct parameter versions kept in memory now: the latest, those the
            stored keys' pullbacks hold (stashing holds several), and earlier ones the policy
            keeps besides (``PipeDream2BW``'s pinned version, ``DelayCompensation``'s forward
            weights); 1 without stashing (``stash=False`` keeps each key's inputs and
            recomputes at the latest). ``peak_versions_held``: the most at once.
        stored_bytes / peak_stored_bytes: bytes the stored keys keep for their backwards, now
            and at most. A key kept without its pullback (``stash=False``, ``Async`` by
            default: the backward recomputes) keeps its inputs alone, and counts exactly their
            bytes. A key kept with its pullback counts its inputs and its output, an estimate
            of the pullback's residuals (which also hold the values inside a stage of several
            ops: a ReLU's output, a dropout's mask). A routing merge counts the gate weights,
            row picks and branch outputs it keeps. Weights are not counted (see
            ``versions_held``).
        pool_used_bytes / pool_held_bytes: on a GPU, the device's memory pool (cupy's) after
            this actor's last compute: bytes in live arrays, and bytes the pool holds from the
            driver (live plus cached for reuse); 0 on the CPU. The pool is the device's, shared
            by the actors there. ``peak_pool_used_bytes`` / ``peak_pool_held_bytes``: the most
            seen after any compute of this actor.
        graph_bytes: on a GPU with CUDA graphs active, the device memory held by this actor's
            captured CUDA graphs (each capture's memory pool and cuBLAS workspace); 0 otherwise.
        skipped: keys that reached this actor with no rows (a router sent them elsewhere).
        delays: how stale the gradients this layer applied were: ``{delay: count}``, where a
            gradient's delay is the number of updates of this layer between the forward that
            made it and the update that applies it (its version at the update minus its
            forward's version; 0 under ``Sync``, ``GPipe`` and ``OneFOneB``).
            ``max_delay``: the largest; ``delay_total``: their sum (see :attr:`mean_delay`).
    """

    busy_seconds: float = 0.0
    idle_seconds: float = 0.0
    messages_in: int = 0
    messages_out: int = 0
    forwards: int = 0
    backwards: int = 0
    updates: int = 0
    stored: int = 0
    peak_stored: int = 0
    versions_held: int = 0
    peak_versions_held: int = 0
    stored_bytes: int = 0
    peak_stored_bytes: int = 0
    pool_used_bytes: int = 0
    pool_held_bytes: int = 0
    peak_pool_used_bytes: int = 0
    peak_pool_held_bytes: int = 0
    graph_bytes: int = 0
    skipped: int = 0
    delays: dict[int, int] = field(default_factory=dict)
    max_delay: int = 0
    delay_total: int = 0

    def note_pool(self, used: int, held: int) -> None:
        """Records a reading of the device's memory pool (bytes in use, bytes held)."""
        self.pool_used_bytes = used
        self.pool_held_bytes = held
        if used > self.peak_pool_used_bytes:
            self.peak_pool_used_bytes = used
        if held > self.peak_pool_held_bytes:
            self.peak_pool_held_bytes = held

    def note_delay(self, delay: int) -> None:
        """Records the delay of one gradient applied (see :attr:`delays`)."""
        self.delays[delay] = self.delays.get(delay, 0) + 1
        self.delay_total += delay
        if delay > self.max_delay:
            self.max_delay = delay

    @property
    def mean_delay(self) -> float:
        """The mean delay of the gradients applied (0.0 before any)."""
        n = sum(self.delays.values())
        return self.delay_total / n if n else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict."""
        return asdict(self)
