"""Turning messages and parameter trees into frames (a msgpack header plus raw buffers) and back.

Nothing travels as pickle: a tensor is described by its dtype and shape in the header and its
bytes go as one raw buffer, received straight into the array the receiver then uses.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._checkpoint_tree import _unstorable  # (what msgpack cannot hold: one rule)
from asyncnn._runtime._messages import Message
from asyncnn.backends._dtypes import rebuildable_name
from asyncnn.backends._registry import host_array, is_cupy_array

if TYPE_CHECKING:
    from asyncnn._runtime._run import RunState

__all__ = [
    "announce_message",
    "decode_message",
    "decode_state",
    "decode_tree",
    "dtype_code",
    "encode_message",
    "encode_state",
    "encode_tree",
    "unsendable",
]


def dtype_code(dtype: np.dtype[Any]) -> str:
    """How a header names ``dtype`` so that the receiver rebuilds the same one (see
    :func:`~asyncnn.backends._dtypes.rebuildable_name`: ml_dtypes' bfloat16 goes by its name,
    its ``str`` would make the receiver compute on void).

    Raises:
        TypeError: the dtype has no name another process can rebuild it from (a structured
            dtype), or holds objects (whose bytes are pointers).
    """
    code = None if dtype.hasobject else rebuildable_name(dtype)
    if code is None:
        raise TypeError(f"dtype {dtype} has no name another process could rebuild it from")
    return code


def encode_message(msg: Message) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A message's header and buffers. GPU tensors come to the host first: the caller must have
    waited for ``msg.event`` (the producing kernels)."""
    descs: list[Any] = []
    buffers: list[np.ndarray] = []
    for i, t in enumerate(msg.tensors):
        if t is None:
            descs.append(None)
            continue
        host = host_array(t)
        descs.append([_code_of(host.dtype, msg, i, host.shape), list(host.shape)])
        buffers.append(host)
    header = {
        "t": "m",
        "k": msg.kind,
        "key": msg.key,
        "v": msg.version,
        "s": msg.src,
        "d": msg.dst,
        "sl": msg.slot,
        "m": msg.meta,
        "x": descs,
    }
    return header, buffers


def _code_of(dtype: np.dtype[Any], msg: Message, i: int, shape: Any) -> str:
    try:
        return dtype_code(dtype)
    except TypeError:
        # objects' bytes are pointers, a structured dtype's fields would arrive as raw bytes
        raise TypeError(
            f"a {msg.kind} message from {msg.src!r} to {msg.dst!r}: tensor {i} (shape "
            f"{tuple(shape)}) has dtype {dtype}, which cannot travel between processes; give "
            "the layer plain numeric arrays"
        ) from None


def announce_message(msg: Message) -> dict[str, Any]:
    """A message's header announcing its tensors (dtype, shape under ``"g"``) without carrying
    them: they follow over NCCL (see ``_nccl``)."""
    header, _ = encode_message(Message(msg.kind, msg.key, msg.version, msg.src, msg.dst,
                                       msg.slot, (), msg.meta))  # fmt: skip
    header["g"] = [
        None if t is None else [_code_of(np.dtype(t.dtype), msg, i, t.shape), list(t.shape)]
        for i, t in enumerate(msg.tensors)
    ]
    return header


def decode_message(header: dict[str, Any], buffers: list[np.ndarray]) -> Message:
    """The inverse of :func:`encode_message` (the arrays are views of the received buffers).

    Raises:
        ValueError: the header lacks a field or its tensors do not match the buffers.
    """
    try:
        descs = header["x"]
        tensors: list[Any] = []
        it = iter(buffers)
        for d in descs:
            if d is None:
                tensors.append(None)
                continue
            tensors.append(_view(next(it), d[0], d[1]))
        if next(it, None) is not None:
            raise ValueError("more buffers than tensors")
        return Message(
            str(header["k"]),
            int(header["key"]),
            int(header["v"]),
            str(header["s"]),
            str(header["d"]),
            int(header["sl"]),
            tuple(tensors),
            dict(header["m"]),
        )
    except (KeyError, TypeError, StopIteration) as exc:
        raise ValueError(
            f"a message frame with a malformed header ({exc!r}): {header!r:.200}"
        ) from exc


def _view(buf: np.ndarray, dtype: str, shape: list[int]) -> np.ndarray:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(
            f"a tensor's dtype {dtype!r:.40} is unknown in this process (bfloat16 needs the "
            "ml_dtypes package installed in every process of the cluster)"
        ) from None
    if dt.hasobject:
        raise ValueError(f"object dtype {dtype!r} cannot travel")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"a tensor's shape {shape!r:.100} is not a list of sizes")
    count = math.prod(shape)  # exact (np.prod of a list also costs microseconds per message)
    if count * dt.itemsize != buf.nbytes:
        raise ValueError(
            f"a tensor of dtype {dtype} and shape {tuple(shape)} needs {count * dt.itemsize} "
            f"bytes, the frame carried {buf.nbytes}"
        )
    return buf.view(dt).reshape(shape)


def encode_tree(tree: Any, buffers: list[np.ndarray]) -> Any:
    """A msgpack-able description of a pytree of arrays; the arrays' bytes go to ``buffers``."""
    if isinstance(tree, dict):
        return {"dict": [[k, encode_tree(v, buffers)] for k, v in tree.items()]}
    if isinstance(tree, list | tuple):
        tag = "list" if isinstance(tree, list) else "tuple"
        return {tag: [encode_tree(v, buffers) for v in tree]}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        host = host_array(tree)
        buffers.append(host)
        spec = {"a": len(buffers) - 1, "d": dtype_code(host.dtype), "s": list(host.shape)}
        if isinstance(tree, np.generic):  # a numpy scalar (a custom actor's count) stays one
            spec["sc"] = 1
        return spec
    if tree is None or isinstance(tree, bool | int | float | str):
        return {"value": tree}
    raise TypeError(f"cannot send a {type(tree).__name__} in a parameter tree")


def unsendable(tree: Any) -> tuple[str, str] | None:
    """Where in ``tree`` the first part lies that :func:`encode_tree` (or the msgpack header
    that carries its description) refuses, as an index path (``"['tags'][1]"``, ``""`` for
    ``tree`` itself), and what that part is; None when all of it can travel.

    Arrays are judged by their dtype alone, without copying a device's array to the host."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if not (k is None or isinstance(k, bool | int | float | str)):
                return f"[{k!r:.60}]", f"a key of type {type(k).__name__}"
            if _unstorable(k) is not None:
                return (
                    f"[{k!r:.60}]",
                    "a key msgpack cannot encode (an int past 64 bits, a str with lone surrogates)",
                )
            found = unsendable(v)
            if found is not None:
                return f"[{k!r}]{found[0]}", found[1]
        return None
    if isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            found = unsendable(v)
            if found is not None:
                return f"[{i}]{found[0]}", found[1]
        return None
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        try:
            # (another library's array, a torch tensor say, travels as its host copy: judged
            # by that one's dtype, as encode_tree sends it)
            dtype = (
                tree.dtype
                if isinstance(tree, np.ndarray | np.generic) or is_cupy_array(tree)
                else host_array(tree).dtype
            )
            dtype_code(np.dtype(dtype))
        except (TypeError, ValueError, RuntimeError) as exc:
            return "", f"an array of dtype {tree.dtype} ({exc})"
        return None
    if tree is None or isinstance(tree, bool | int | float | str):
        return (
            None
            if _unstorable(tree) is None
            else ("", f"{tree!r:.60}, which msgpack cannot encode")
        )
    return "", f"a {type(tree).__name__}"


def decode_tree(spec: Any, buffers: list[np.ndarray]) -> Any:
    """The inverse of :func:`encode_tree` (numpy arrays, views of ``buffers``)."""
    if "dict" in spec:
        return {k: decode_tree(v, buffers) for k, v in spec["dict"]}
    if "list" in spec:
        return [decode_tree(v, buffers) for v in spec["list"]]
    if "tuple" in spec:
        return tuple(decode_tree(v, buffers) for v in spec["tuple"])
    if "a" in spec:
        array = _view(buffers[spec["a"]], spec["d"], spec["s"])
        return array[()] if spec.get("sc") and not array.shape else array
    return spec["value"]


def encode_state(
    state: RunState, buffers: list[np.ndarray], names: Collection[str] | None = None
) -> dict[str, Any]:
    """The header fields of ``state``'s weights, optimizer states, versions, pending gradients,
    actor states, earlier weight versions (``RunState.earlier_params``) and pending gradients'
    delays (``RunState.pending_delays``) for the layers ``names`` (default: those ``state``
    has); the arrays' bytes go to ``buffers`` (weights, then optimizer states, then pending
    gradients, then the rest)."""
    if names is None:
        names = list(state.params)
    pending = {n: list(state.pending_grads[n]) for n in names if n in state.pending_grads}
    actor_states = {n: state.actor_states[n] for n in names if n in state.actor_states}
    for n, st in actor_states.items():  # (one made in the driver, bound for a worker now)
        found = unsendable(st)
        if found is not None:
            raise TypeError(
                f"the actor state of layer {n!r} cannot be sent to another process: "
                f"state{found[0]} is {found[1]}. Return a tree of dicts, lists and tuples of "
                "arrays, numbers, strings and None from its actor_state()"
            )
    return {
        "params": encode_tree({n: state.params[n] for n in names}, buffers),
        "opt_states": encode_tree({n: state.opt_states[n] for n in names}, buffers),
        "versions": {n: state.versions[n] for n in names},
        "pending": encode_tree(pending, buffers),
        "actor_states": encode_tree(actor_states, buffers),
        "earlier": encode_tree(
            {n: state.earlier_params[n] for n in names if n in state.earlier_params}, buffers
        ),
        # (plain ints: the header carries them, no buffer)
        "pending_delays": {
            n: [int(d) for d in state.pending_delays[n]] for n in names if n in state.pending_delays
        },
    }


def decode_state(header: dict[str, Any], buffers: list[np.ndarray]) -> dict[str, Any]:
    """The inverse of :func:`encode_state`: ``{"params", "opt_states", "versions", "pending",
    "actor_states", "earlier", "pending_delays"}``, pending gradients as ``{layer: (sum,
    count)}`` (numpy arrays, views of ``buffers``)."""
    return {
        "params": decode_tree(header["params"], buffers),
        "opt_states": decode_tree(header["opt_states"], buffers),
        "versions": dict(header["versions"]),
        "pending": {
            k: (v[0], int(v[1])) for k, v in decode_tree(header["pending"], buffers).items()
        },
        "actor_states": decode_tree(header.get("actor_states", encode_tree({}, [])), buffers),
        # (the versions come back as the int keys they were sent as)
        "earlier": decode_tree(header.get("earlier", encode_tree({}, [])), buffers),
        "pending_delays": {
            k: [int(d) for d in v] for k, v in header.get("pending_delays", {}).items()
        },
    }
