"""The trainer's weights as a user reads and sets them (``Trainer.params``), and as ``predict``
and ``evaluate`` compute with them: read-only host views, a checked copy of new weights onto each
layer's device, each layer's weights on its device."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._datacheck import check_params
from ._fit import _synchronize
from ._math._pytree import ReadOnlyDict, tree_map
from ._runtime._state_checks import cast_refusing_overflow
from .backends import get_backend, to_numpy

if TYPE_CHECKING:
    from ._train import Trainer

__all__ = ["PARAMS_REFUSAL", "params_on_devices", "read_params", "set_params"]


#: what a change to :attr:`Trainer.params` is refused with: a dict read fresh at each access,
#: so a change to it (``tr.params["stage0"] = w``, ``tr.params.update(...)``) would be lost
#: without a word
PARAMS_REFUSAL = (
    "tr.params is a read-only snapshot of the weights, which a change to it would not "
    "reach: assign new ones instead, tr.params = {name: params} for the layers to change "
    "(e.g. p = dict(tr.params); p['stage0'] = w; tr.params = p)"
)


def _read_only(leaf: Any) -> Any:
    """A leaf of :attr:`Trainer.params`: a numpy array as a read-only view (a GPU array's host
    copy likewise); anything else (a number kept in a module's parameters) as it is."""
    arr = to_numpy(leaf)
    if isinstance(arr, np.ndarray):
        arr = arr.view()
        arr.flags.writeable = False
    return arr


def read_params(trainer: Trainer) -> ReadOnlyDict:
    """:attr:`Trainer.params`: each layer's weights at the current version, read-only (the
    outer dict and the arrays; the lists and dicts between them are plain)."""
    # (from a callback, on a GPU: the updates that made them may still be queued on the
    # actors' streams, which a copy to the host on another stream would not wait for)
    _synchronize(trainer.graph, trainer.cluster)
    params = {n: tree_map(_read_only, p) for n, p in trainer.state.params.items()}
    return ReadOnlyDict(params, refusal=PARAMS_REFUSAL)


def set_params(trainer: Trainer, value: Mapping[str, Any]) -> None:
    """:attr:`Trainer.params`' setter: the weights of the layers named in ``value`` replaced,
    once every one is checked, unless the trainer refuses it now (see there)."""
    trainer._check_graph("params")
    if trainer._stopping_step_hooks and trainer._fit_thread == threading.get_ident():
        raise RuntimeError(
            "params: a step hook may not set the weights, also where the fit delivers it as "
            "it stops (here after an error or an interrupt, with the state it keeps), as "
            "during its run; set them in on_fit_end, or after fit returns"
        )
    trainer._refuse_during_fit(
        "params", ": its run holds weights of its own, which its end would put back in "
        "place of these", "set them before the fit, in on_fit_start or on_fit_end, or "
        "after it returns (from a step or epoch hook: stop the fit with "
        "trainer.stop_training = True, then set them)",
        own_thread=not trainer._run_open,  # (on_fit_start and on_fit_end may set them)
    )  # fmt: skip

    for name, p in value.items():
        node = trainer.graph.nodes.get(name)
        if node is None or node.kind != "layer":
            raise KeyError(f"no layer named {name!r}; layers: {trainer.graph.layers}")
        check_params(name, trainer.state.params[name], p)
    want = np.dtype(trainer.dtype)
    fix = "rescale the weights, or use a wider dtype (Trainer(..., dtype='{wider}'))"
    # each layer's weights cast on the host, all of them before any is assigned: a finite
    # weight the cast makes Inf (1e5 in float16) is refused, as in the data. The cast is a
    # copy, so the caller's arrays stay theirs, and a write into them later (or into a
    # read-only view of params, refused) cannot change the trainer's weights (asarray first: a
    # torch tensor's __array__ takes no copy= argument)
    cast = {
        name: cast_refusing_overflow(
            lambda h, _: h.astype(want),
            tree_map(lambda a: np.asarray(to_numpy(a)), p),
            f"tr.params[{name!r}]",
            "the trainer's",
            fix,
        )
        for name, p in value.items()
    }
    for name, p in cast.items():
        backend = get_backend(trainer.graph.nodes[name].device)
        # (the version before the latest is of the weights replaced: the next fit's
        # forwards must not be pinned to it)
        trainer.state.earlier_params.pop(name, None)
        trainer.state.params[name] = tree_map(
            lambda a, backend=backend: backend.asarray(a, dtype=trainer.dtype), p
        )


def params_on_devices(trainer: Trainer) -> dict[str, Any]:
    """Each layer's weights on its device, for ``predict`` and ``evaluate``."""
    # weights that came back from worker processes are host arrays: each layer's go to its
    # device once per call (a no-op for those already there)
    _synchronize(trainer.graph, trainer.cluster)  # (from a callback on a GPU: see params)

    out = {}
    for name, p in trainer.state.params.items():
        backend = get_backend(trainer.graph.nodes[name].device)
        with backend.activate():
            out[name] = tree_map(backend.asarray, p)
    return out
