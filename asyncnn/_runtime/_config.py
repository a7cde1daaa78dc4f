"""The options of a run, as one frozen, serialisable record.

``Trainer``, :func:`~asyncnn.open_run`, a cluster's driver and its workers and a trace's header
all carry a :class:`RunConfig` whole, so an option added here travels everywhere a run goes.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncnn.backends import is_compute_float
from asyncnn.backends._dtypes import unknown_dtype_hint

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
            :class:`~asyncnn.StallError` (any real number > 0, ``math.inf`` for never).
        check_finite: check every tensor for NaN/Inf and name the first actor producing one.
        trace: write a message trace of the run to this file, a path (``str``, ``bytes`` or
            ``os.PathLike``, kept as ``str``); None: no trace.
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
            hint = unknown_dtype_hint(self.dtype)
            raise ValueError(f"dtype {self.dtype!r} is not a dtype numpy knows{hint}") from exc
        if not is_compute_float(dt):  # parameters in it would fail later, at a layer
            # (a float8 or a long double too: asyncnn computes in these four only)
            raise ValueError(
                f"dtype must name a floating dtype asyncnn computes in: float16, float32, "
                f"float64 or bfloat16, such as 'float32'; got {self.dtype!r} ({dt})"
            )
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "dtype", str(dt))
        # numpy's scalars are numbers.Real too (np.float32(5) read from a config file);
        # a bool is a Real, but True seconds is a mistake
        if (
            isinstance(self.stall_timeout, bool | np.bool_)
            or not isinstance(self.stall_timeout, numbers.Real)
            or not self.stall_timeout > 0
        ):
            raise ValueError(f"stall_timeout must be a number > 0, got {self.stall_timeout!r}")
        object.__setattr__(self, "stall_timeout", float(self.stall_timeout))
        if not isinstance(self.trace_payloads, str) or self.trace_payloads not in PAYLOAD_MODES:
            raise ValueError(
                f"trace_payloads must be one of {PAYLOAD_MODES}, got {self.trace_payloads!r}"
            )
        if not isinstance(self.check_finite, bool | np.bool_):
            raise TypeError(f"check_finite must be True or False, got {self.check_finite!r}")
        object.__setattr__(self, "check_finite", bool(self.check_finite))
        if self.cuda_graphs is not None:
            if not isinstance(self.cuda_graphs, bool | np.bool_):
                raise TypeError(
                    "cuda_graphs must be True, False or None (on where safe), got "
                    f"{self.cuda_graphs!r}"
                )
            object.__setattr__(self, "cuda_graphs", bool(self.cuda_graphs))
        if self.trace is not None:
            object.__setattr__(self, "trace", _trace_path(self.trace))

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


def _trace_path(trace: Any) -> str:
    """``trace`` as the ``str`` path a recorder opens (``str(x)`` would turn ``True`` into a
    file named "True" and ``b"run.trace"`` into one named "b'run.trace'").

    Raises:
        TypeError: not a path.
        ValueError: an empty path.
    """
    if isinstance(trace, str | bytes | os.PathLike):
        path = os.fsdecode(os.fspath(trace))
        if not path:
            raise ValueError(
                "trace='' names no file: pass trace= a file path, or None for no trace"
            )
        return path
    raise TypeError(
        f"trace must be a file path (a str or os.PathLike) or None for no trace, got {trace!r}"
    )
