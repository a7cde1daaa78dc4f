"""Checkpoints: a folder with ``spec.msgpack`` (graph, policy, optimizer, counters, and the
layout of the arrays) and ``arrays.safetensors`` (weights and optimizer buffers). Nothing is
pickled: a checkpoint is rebuilt from specs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from ._math._pytree import tree_flatten
from ._runtime._graph import Graph
from ._runtime._policies import policy_from_spec
from ._runtime._run import RunState
from .backends import get_backend, to_numpy

if TYPE_CHECKING:
    from ._train import Trainer

FORMAT = "asyncnn-checkpoint"
VERSION = 1


def _treedef_spec(tree: Any) -> Any:
    """The structure of a pytree with its non-array leaves (ints, floats) kept inline."""
    if isinstance(tree, dict):
        return {"dict": {k: _treedef_spec(v) for k, v in tree.items()}}
    if isinstance(tree, list | tuple):
        return {"list" if isinstance(tree, list) else "tuple": [_treedef_spec(v) for v in tree]}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return {"array": True}
    return {"value": tree}


def _split(tree: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    leaves, _ = tree_flatten(tree)
    spec = _treedef_spec(tree)
    for i, leaf in enumerate(leaves):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            arrays[f"{prefix}/{i}"] = np.ascontiguousarray(to_numpy(leaf))
    return spec


def _join(spec: Any, prefix: str, arrays: dict[str, Any], device: str, counter: list[int]) -> Any:
    if "dict" in spec:
        return {
            k: _join(v, prefix, arrays, device, counter) for k, v in sorted(spec["dict"].items())
        }
    if "list" in spec or "tuple" in spec:
        items = [
            _join(v, prefix, arrays, device, counter) for v in spec.get("list", spec.get("tuple"))
        ]
        return items if "list" in spec else tuple(items)
    i = counter[0]
    counter[0] += 1
    if spec.get("array"):
        return get_backend(device).asarray(arrays[f"{prefix}/{i}"])
    return spec["value"]


def save_checkpoint(trainer: Trainer, path: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    state = trainer.state
    arrays: dict[str, np.ndarray] = {}
    layout: dict[str, Any] = {}
    for name in trainer.graph.layers:
        layout[name] = {
            "params": _split(state.params[name], f"params/{name}", arrays),
            "opt_state": _split(state.opt_states[name], f"opt/{name}", arrays),
            "version": state.versions[name],
        }
        if name in state.pending_grads:  # gradients accumulated and not yet applied
            acc, count = state.pending_grads[name]
            layout[name]["pending"] = {
                "grads": _split(acc, f"pending/{name}", arrays),
                "count": count,
            }
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "graph": trainer.graph.to_spec(),
        "policy": trainer.policy.to_spec(),
        "optimizer": trainer.optimizer.to_spec(),
        "seed": trainer.seed,
        "dtype": trainer.dtype,
        "minibatches": state.minibatches,
        "keys": state.keys,
        "epochs_done": trainer.epochs_done,
        "traces": list(trainer.traces),  # so a resumed trainer numbers its next trace on
        "trace_base": trainer.trace,
        "layout": layout,
    }
    # Write beside, then rename: a crash mid-save never leaves a half-written checkpoint.
    tmp_arrays = os.path.join(path, "arrays.safetensors.tmp")
    tmp_spec = os.path.join(path, "spec.msgpack.tmp")
    save_file(arrays, tmp_arrays)
    with open(tmp_spec, "wb") as f:
        f.write(msgpack.packb(spec, use_bin_type=True))
    os.replace(tmp_arrays, os.path.join(path, "arrays.safetensors"))
    os.replace(tmp_spec, os.path.join(path, "spec.msgpack"))


def load_checkpoint(cls: type[Trainer], path: str, **overrides: Any) -> Trainer:
    from safetensors.numpy import load_file

    from .optim import from_spec as optimizer_from_spec

    spec_path = os.path.join(path, "spec.msgpack")
    if not os.path.exists(spec_path):
        raise FileNotFoundError(f"{path!r} is not a checkpoint folder: it has no spec.msgpack")
    with open(spec_path, "rb") as f:
        spec = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    if spec.get("format") != FORMAT:
        raise ValueError(
            f"{spec_path} is not an asyncnn checkpoint (format {spec.get('format')!r})"
        )
    arrays = load_file(os.path.join(path, "arrays.safetensors"))
    graph = Graph.from_spec(spec["graph"])
    kwargs: dict[str, Any] = {
        "optimizer": optimizer_from_spec(spec["optimizer"]),
        "policy": policy_from_spec(spec["policy"]),
        "seed": spec["seed"],
        "dtype": spec["dtype"],
    }
    kwargs.update(overrides)
    trainer = cls(graph, **kwargs)
    params, opt_states, versions, pending = {}, {}, {}, {}
    for name in graph.layers:
        entry = spec["layout"][name]
        device = graph.nodes[name].device
        params[name] = _join(entry["params"], f"params/{name}", arrays, device, [0])
        opt_states[name] = _join(entry["opt_state"], f"opt/{name}", arrays, device, [0])
        versions[name] = int(entry["version"])
        if "pending" in entry:
            acc = _join(entry["pending"]["grads"], f"pending/{name}", arrays, device, [0])
            pending[name] = (acc, int(entry["pending"]["count"]))
    trainer.state = RunState(
        params, opt_states, versions, spec["minibatches"], spec["keys"], pending
    )
    trainer.epochs_done = int(spec["epochs_done"])
    if trainer.trace is not None and trainer.trace == spec.get("trace_base"):
        trainer.traces = [str(t) for t in spec.get("traces", [])]
    return trainer
