"""A tiny graph, its data, a recorded run and the record boundaries of a trace file, for
tests/test_trace_read.py and tests/test_trace_read_damage.py."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, optim, policies

PREFIX = 12  # u32 length, u32 ~length, u32 crc32


def _graph() -> ann.Graph:
    return ann.Graph.sequential(
        [nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)],
        loss=nn.CrossEntropyLoss(),
        stages=2,
        input_shape=(None, 4),
    )


def _data(n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 4)).astype(np.float32), "y": rng.integers(0, 2, n)}


def _record(
    path: Path, payloads: str = "inputs", policy: Any = None, n: int = 8, batch: int = 4
) -> tuple[ann.Trainer, dict[str, Any], Any, dict[str, np.ndarray]]:
    """Trains the tiny 2-stage graph with a trace; returns the trainer, its initial params, the
    history and the data."""
    tr = ann.Trainer(
        _graph(),
        optimizer=optim.SGD(lr=0.1),
        policy=policy or policies.Sync(),
        seed=3,
        trace=str(path),
        trace_payloads=payloads,
    )
    p0 = tr.params
    d = _data(n)
    hist = tr.fit(d, epochs=1, batch_size=batch)
    return tr, p0, hist, d


def _boundaries(raw: bytes) -> list[int]:
    """The byte offsets where records start, and the file's end."""
    out = [0]
    while out[-1] < len(raw):
        (n,) = struct.unpack_from("<I", raw, out[-1])
        out.append(out[-1] + PREFIX + n)
    assert out[-1] == len(raw)
    return out
