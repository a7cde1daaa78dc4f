"""What ``Trainer.fit`` measured: :class:`History`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._runtime._statistics import ActorStatistics

__all__ = ["History"]


@dataclass
class History:
    """What ``fit`` measured.

    Attributes:
        losses: one mean loss per minibatch, in minibatch order (per key for ``Async``, whose
            keys are minibatches).
        epochs: one dict per epoch finished: ``"epoch"`` (counted over the trainer's life, so
            a second ``fit`` starts after the first's), ``"loss"`` (its mean minibatch loss)
            and, with ``validation_data``, ``"val_loss"`` (and ``"val_accuracy"``). An epoch
            that an interrupted ``fit`` left unfinished gets its entry from the ``fit`` that
            finishes it, whose ``"loss"`` is the mean over the minibatches that ``fit`` ran
            (the interrupted one's losses are in its own history).
        samples_per_second: training throughput over the whole call.
        seconds: wall time of the call.
        statistics: per-actor counters at the end of the call.
        stopped_early: a callback ended the fit (``trainer.stop_training``).
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
