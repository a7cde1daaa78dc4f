"""A two-input module and an empty graph's inputs, shared by tests/test_graph.py and
tests/test_graph_spec.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncnn as ann
from asyncnn import nn, ops


@dataclass(frozen=True)
class Add(nn.Module):
    """Sums two inputs (a test helper for two-input nodes)."""

    def __call__(self, params: Any, a: Any, b: Any, *, rng: Any = None) -> Any:
        return ops.add(a, b)


def _base() -> tuple[ann.Graph, Any, Any]:
    g = ann.Graph()
    return g, g.input("x", (None, 4)), g.input("y", (None,), dtype="int64")
