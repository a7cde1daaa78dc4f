"""A numpy stand-in for CUDA graphs (the ``emulated`` fixture), for tests of the capture's
bookkeeping (``asyncnn/_runtime/_capture.py``) on the CPU.

The stand-in "captures" a function by running it once and keeping the arrays it returned as the
graph's buffers; a launch runs the function again and writes the new results into those buffers,
as a replay writes its outputs in place. A pullback among the results is single-use, so the
stand-in's pullback recomputes the forward from the graph's input and weight buffers as they are
at the backward: it gives the eager result only if nothing wrote those buffers between the
forward and its backward, which is what a real graph's residuals need. Races between CUDA streams
are not modelled (tests/test_gpu_capture.py runs the real graphs on a GPU).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any

import numpy as np
import pytest

import asyncnn.backends
from asyncnn._math._pytree import tree_flatten, tree_unflatten
from asyncnn._runtime import _actors, _capture, _capture_loss, _loss_actor

__all__ = ["emulated"]


class _CaptureError(RuntimeError):
    pass


_capturing = [False]  # a capture records its copies, it does not make them


def _copy_into(dst: Any, src: Any) -> None:
    if not _capturing[0]:
        np.copyto(dst, src)


class _Graph:
    """A function run again at each launch, its array results written into the first run's."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        _capturing[0] = True
        try:
            leaves, self.treedef = tree_flatten(fn())
        finally:
            _capturing[0] = False
        # a numpy reduction gives a scalar, where cupy's gives a 0-d array a launch writes into
        self.leaves = [np.array(x) if isinstance(x, np.generic) else x for x in leaves]
        wrapped = [
            x if isinstance(x, np.ndarray) or not callable(x) else self._fresh(i)
            for i, x in enumerate(self.leaves)
        ]
        self.result = tree_unflatten(self.treedef, wrapped)

    def _fresh(self, i: int) -> Any:
        # a pullback: from a new run of the function, on the buffers as they are now
        return lambda *a: tree_flatten(self.fn())[0][i](*a)

    def launch(self, stream: Any) -> None:
        leaves, treedef = tree_flatten(self.fn())
        assert treedef == self.treedef
        for old, new in zip(self.leaves, leaves, strict=True):
            if isinstance(old, np.ndarray):
                old[...] = new


def _sum_into(out: list[Any], terms: list[list[Any]], scale: float) -> None:
    # the eager sum's operations, in place (backends/_fused_sum.py does them in one kernel)
    for i, dst in enumerate(out):
        leaves = [t[i] for t in terms]
        if len(leaves) == 1:
            np.copyto(dst, leaves[0])
        else:
            np.add(leaves[0], leaves[1], out=dst)
            for a in leaves[2:]:
                np.add(dst, a, out=dst)
        if scale != 1.0:
            np.multiply(dst, scale, out=dst)


class _NotSummed(RuntimeError):
    pass


class _Pool:
    def total_bytes(self) -> int:
        return 0


@pytest.fixture
def emulated(monkeypatch):
    """CUDA graphs emulated on numpy, for CPU actors; yields a dict whose ``"fail"`` entry, a
    callable of (actor name, capture count), makes chosen forward captures fail, and whose
    ``"not_summed"`` makes every capture of an update reading a sum of gradients fail."""
    control: dict[str, Any] = {
        "fail": lambda name, n: False, "actors": [], "count": {}, "not_summed": False
    }  # fmt: skip
    graphs = types.ModuleType("asyncnn.backends._graphs")
    graphs.CaptureError = _CaptureError
    graphs.WORKSPACE_BYTES = 0
    graphs.copy_into = _copy_into
    graphs.copy_of = lambda a: a.copy()
    fused = types.ModuleType("asyncnn.backends._fused")
    fused.in_place = contextlib.nullcontext
    fused.scalars_on_device = lambda buffer: contextlib.nullcontext()
    # (numpy's optimizers compute their step's scalars themselves, from the step the capture
    # keeps current in its frozen state: none are written for them)
    fused.adam_step_scalars = lambda *args: (0.0, 0.0, 0.0)
    fused.sgd_step_scalars = lambda lr: (0.0, 0.0, 0.0)
    fused.set_scalars = lambda buffer, values: None
    fused_sum = types.ModuleType("asyncnn.backends._fused_sum")
    fused_sum.sum_into = _sum_into
    fused_sum.sums = lambda terms: True

    @contextlib.contextmanager
    def summed(gradients: list[Any], terms: list[list[Any]], scale: float) -> Any:
        # the update reads the sum in place of the gradients: here they hold it (each launch),
        # then NaN, as unwritten as a real graph leaves them (nothing may read them after)
        _sum_into(gradients, terms, scale)
        yield
        for g in gradients:
            g.fill(np.nan)
        if control["not_summed"]:
            raise _NotSummed("emulated: an update read its gradients as they were")

    fused_sum.summed, fused_sum.NotSummed, fused_sum.MAX_TERMS = summed, _NotSummed, 8
    for name, module in (("_graphs", graphs), ("_fused", fused), ("_fused_sum", fused_sum)):
        monkeypatch.setitem(sys.modules, f"asyncnn.backends.{name}", module)
        monkeypatch.setattr(asyncnn.backends, name, module, raising=False)

    def capture(self, fn, warm=None):
        name = self.actor.name
        n = control["count"][name] = control["count"].get(name, 0) + 1
        if warm is None and name.startswith("stage") and control["fail"](name, n):
            raise _CaptureError("emulated: this capture fails")
        (fn if warm is None else warm)()
        graph = _Graph(fn)
        self.stats.captures += 1
        return graph, graph.result, (_Pool(), types.SimpleNamespace(nbytes=0))

    monkeypatch.setattr(_capture._Graphs, "_capture", capture)
    # a backward graph calls its entry's pullback at every launch: keep the captured one
    monkeypatch.setattr(
        _capture._Entry,
        "pullback",
        property(
            lambda self: self.__dict__.get("_pullback"),
            lambda self, v: (
                self.__dict__.__setitem__("_pullback", v)
                if v is not None or "_pullback" not in self.__dict__
                else None
            ),
        ),
        raising=False,
    )
    layer_init, loss_init = _actors.LayerActor.__init__, _loss_actor.LossActor.__init__

    def layer(self, ctx, *args, **kwargs):
        layer_init(self, ctx, *args, **kwargs)
        if ctx.cuda_graphs and not self.stochastic:
            self.graphs = _capture.ActorGraphs(self)
            control["actors"].append(self)

    def loss(self, ctx, node):
        loss_init(self, ctx, node)
        if ctx.cuda_graphs:
            self.graphs = _capture_loss.LossGraphs(self)
            self.direct = False
            control["actors"].append(self)

    monkeypatch.setattr(_actors.LayerActor, "__init__", layer)
    monkeypatch.setattr(_loss_actor.LossActor, "__init__", loss)
    return control
