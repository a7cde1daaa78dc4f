"""The options of a run, as one frozen, serialisable record.

``Trainer``, :func:`~asyncnn.open_run`, a cluster's driver and its workers and a trace's header
all carry a :class:`RunConfig` whole, so an option added here travels everywhere a run goes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PAYLOAD_MODES", "RunConfig"]

#: what a trace keeps besides digests: the data fed in, every message, or nothing
PAYLOAD_MODES = ("inputs", "all", "none")


@dataclass(frozen=True)
class RunConfig:
    """How a run runs (what it runs is the graph, the optimizer and the policy).

    Attributes:
        seed: seeds parameter initialisation (per module of a sequential chain, else per
            node) and dropout; from 0 to 2**64 - 1.
        dtype: the floating dtype of parameters and float inputs.
        stall_timeout: seconds without progress, while keys are in flight, before a
            :class:`~asyncnn.StallError`.
        check_finite: check every tensor for NaN/Inf and name the first actor producing one.
        trace: write a message trace of the run to this file (None: no trace).
        trace_payloads: which tensors the trace keeps besides their digests: ``"inputs"``,
            ``"all"`` or ``"none"``.
        cuda_graphs: let GPU actors capture and replay CUDA graphs where the policy allows;
            ``None`` (the default): where the run is in one process and its GPU actors share
            one GPU; ``False``: never.
    """

    seed: int = 0
    dtype: str = "float32"
    stall_timeout: float = 60.0
    check_finite: bool = False
    trace: str | None = None
    trace_payloads: str = "inputs"
    cuda_graphs: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.seed < 0:  # numpy's seeding refuses it later, without naming the option
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.seed >= 2**64:  # a checkpoint or a trace header could not hold it (msgpack)
            raise ValueError(
                f"seed must be an int from 0 to 2**64 - 1 (checkpoints and traces keep it as an "
                f"unsigned 64-bit integer), got {self.seed!r}"
            )
        if self.dtype is None:  # np.dtype(None) is float64: not what a forgotten value means
            raise ValueError("dtype must name a floating dtype, such as 'float32'; got None")
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"dtype {self.dtype!r} is not a dtype numpy knows") from exc
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "dtype", str(dt))
        if (
            isinstance(self.stall_timeout, bool)
            or not isinstance(self.stall_timeout, int | float)
            or not self.stall_timeout > 0
        ):
            raise ValueError(f"stall_timeout must be a number > 0, got {self.stall_timeout!r}")
        object.__setattr__(self, "stall_timeout", float(self.stall_timeout))
        if self.trace_payloads not in PAYLOAD_MODES:
            raise ValueError(
                f"trace_payloads must be one of {PAYLOAD_MODES}, got {self.trace_payloads!r}"
            )
        if not isinstance(self.check_finite, bool):
            raise TypeError(f"check_finite must be True or False, got {self.check_finite!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise TypeError(
                f"cuda_graphs must be True, False or None (on where safe), got {self.cuda_graphs!r}"
            )
        if self.trace is not None:
            object.__setattr__(self, "trace", str(self.trace))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (checked as a new one is)."""
        return dataclasses.replace(self, **changes)

    def to_spec(self) -> dict[str, Any]:
        """The options as a plain, msgpack-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> RunConfig:
        """Rebuilds the options from :meth:`to_spec` (unknown fields are an error: a newer
        writer's options must not be dropped silently).

        Raises:
            ValueError: a field this version does not know, or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"run options {unknown} are unknown to this asyncnn; known: "
                             f"{sorted(known)}")  # fmt: skip
        return cls(**spec)
