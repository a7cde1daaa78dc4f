"""A user module and tree helpers shared by tests/test_nn.py, tests/test_nn_torch.py and
tests/test_nn_errors.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from asyncnn import nn, ops
from asyncnn.backends import to_numpy


@dataclasses.dataclass(frozen=True)
class Scale(nn.Module):
    """A user module, rebuilt from its spec by import path."""

    n: int
    inner: nn.Module = nn.Identity()

    def init_params(self, init: nn.Initializer) -> Any:
        return {"scale": init.ones((self.n,))}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.multiply(self.inner({}, x), params["scale"])


def _np(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_np(v) for v in tree]
    return to_numpy(tree)


def _np_leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _np_leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _np_leaves(v)]
    return [tree]
