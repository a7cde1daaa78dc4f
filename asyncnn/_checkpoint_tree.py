"""A checkpoint's pytrees: each tree of weights, optimizer state or actor state is kept as a
spec of its structure (with its numbers and strings inline, in ``spec.msgpack``) and its arrays
(in ``arrays.safetensors``, under ``<prefix>/<leaf index>``), and put back together from the
two on load, then checked against the graph's own trees and cast to their dtypes. Apart from
``_checkpoint.py``, which writes, reads and verifies the folder's files, because this is the
one place that knows how a tree maps to the files' entries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._math._pytree import tree_flatten, tree_map
from .backends import get_backend, is_floating
from .backends._registry import host_array

#: the file that holds a checkpoint's arrays, which a tree's spec indexes
ARRAYS = "arrays.safetensors"


def _treedef_spec(tree: Any, what: str, path: str = "") -> Any:
    """The structure of a pytree with its non-array leaves (ints, floats) kept inline.

    Containers are dicts, lists and tuples of exactly these types, as :func:`tree_flatten`
    sees them (it takes an ``OrderedDict`` or a named tuple for one leaf).

    Raises:
        TypeError: a leaf the spec cannot hold, naming ``what`` and the place in it.
    """
    kind = type(tree)
    if kind is dict:
        for k in tree:
            if type(k) not in (str, int):
                raise TypeError(
                    f"cannot save {what}: at {path or 'its top'} a dict has the key {k!r:.80}; "
                    "a checkpoint keeps str and int keys"
                )
        return {"dict": {k: _treedef_spec(v, what, f"{path}[{k!r}]") for k, v in tree.items()}}
    if kind is list or kind is tuple:
        entries = [_treedef_spec(v, what, f"{path}[{i}]") for i, v in enumerate(tree)]
        return {"list" if kind is list else "tuple": entries}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return {"array": True}
    if tree is None or isinstance(tree, bool | int | float | str):
        return {"value": tree}
    raise TypeError(
        f"cannot save {what}: at {path or 'its top'} it holds an object of type "
        f"{kind.__qualname__}; a checkpoint keeps dicts, lists and tuples (of exactly these "
        "types), arrays, numbers, strings and None (a dataclass or named tuple: give its "
        "fields as a dict)"
    )


def _split(tree: Any, prefix: str, arrays: dict[str, np.ndarray], what: str) -> Any:
    leaves, _ = tree_flatten(tree)
    spec = _treedef_spec(tree, what)
    for i, leaf in enumerate(leaves):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            arrays[f"{prefix}/{i}"] = host_array(leaf)
    return spec


def _join(spec: Any, prefix: str, arrays: dict[str, Any], device: str, counter: list[int]) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{prefix}: a tree entry must be a map of one key, got {spec!r:.80}")
    if "dict" in spec:
        if not isinstance(spec["dict"], dict):
            raise ValueError(f"{prefix}: 'dict' holds {type(spec['dict']).__name__}, not a map")
        return {
            k: _join(v, prefix, arrays, device, counter) for k, v in sorted(spec["dict"].items())
        }
    if "list" in spec or "tuple" in spec:
        entries = spec.get("list", spec.get("tuple"))
        if not isinstance(entries, list):
            raise ValueError(f"{prefix}: a list entry holds {type(entries).__name__}")
        items = [_join(v, prefix, arrays, device, counter) for v in entries]
        return items if "list" in spec else tuple(items)
    i = counter[0]
    counter[0] += 1
    if "array" in spec:
        name = f"{prefix}/{i}"
        if name not in arrays:
            raise ValueError(f"{prefix}: the array {name!r} is missing from {ARRAYS}")
        return get_backend(device).asarray(arrays[name])
    if "value" in spec:
        return spec["value"]
    raise ValueError(f"{prefix}: unknown tree entry {sorted(spec)!r}")


def _fits(tree: Any, like: Any, what: str, same_dtype: bool = False, path: str = "") -> None:
    """Checks that ``tree`` has the structure, shapes (and dtypes) of ``like`` (the graph's).

    Raises:
        ValueError: naming ``what``, the place in it (``[0]['weight']``) and what differs.
    """
    where = f"{what}, at {path}," if path else what
    if isinstance(like, dict):
        if not isinstance(tree, dict) or set(tree) != set(like):
            got = (
                f"the keys {sorted(tree, key=str)}"
                if isinstance(tree, dict)
                else type(tree).__name__
            )
            raise ValueError(
                f"{where} hold {got} in the checkpoint, the keys {sorted(like, key=str)} in "
                "the graph"
            )
        for k in sorted(like, key=str):
            _fits(tree[k], like[k], what, same_dtype, f"{path}[{k!r}]")
        return
    if isinstance(like, list | tuple):
        if type(tree) is not type(like) or len(tree) != len(like):
            got = (
                f"a {type(tree).__name__} of {len(tree)} entries"
                if isinstance(tree, list | tuple)
                else type(tree).__name__
            )
            raise ValueError(
                f"{where} hold {got} in the checkpoint, a {type(like).__name__} of {len(like)} "
                "entries in the graph"
            )
        for i, (a, b) in enumerate(zip(tree, like, strict=True)):
            _fits(a, b, what, same_dtype, f"{path}[{i}]")
        return
    a_array, b_array = hasattr(tree, "shape"), hasattr(like, "shape")
    if a_array != b_array or isinstance(tree, dict | list | tuple):
        raise ValueError(
            f"{where} hold {type(tree).__name__} in the checkpoint, {type(like).__name__} in "
            "the graph"
        )
    if a_array and tuple(tree.shape) != tuple(like.shape):
        raise ValueError(
            f"{where} have shape {tuple(tree.shape)} in the checkpoint, {tuple(like.shape)} in "
            "the graph"
        )
    if a_array and same_dtype and np.dtype(tree.dtype) != np.dtype(like.dtype):
        raise ValueError(
            f"{where} have dtype {tree.dtype} in the checkpoint, {like.dtype} in the graph"
        )
    if not a_array and not isinstance(tree, _SCALARS):
        raise ValueError(f"{where} hold {tree!r:.80}, not a number")


def _cast_like(tree: Any, like: Any, device: str) -> Any:
    """``tree`` with each floating array leaf in the dtype of ``like``'s (where a ``dtype``
    override gave the trainer another one than the checkpoint's); other leaves as they are."""

    def cast(a: Any, b: Any) -> Any:
        if not (hasattr(a, "dtype") and hasattr(b, "dtype")) or a.dtype == b.dtype:
            return a
        if not (is_floating(a.dtype) and is_floating(b.dtype)):
            return a
        return get_backend(device).asarray(a, dtype=b.dtype)

    return tree_map(cast, tree, like)


_SCALARS: tuple[type, ...] = (int, float, bool, type(None), str)
