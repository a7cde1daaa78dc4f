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

from ._math._pytree import tree_flatten
from ._runtime._state_checks import cast_refusing_overflow
from .backends import get_backend, is_floating
from .backends._registry import host_array

#: the file that holds a checkpoint's arrays, which a tree's spec indexes
ARRAYS = "arrays.safetensors"


#: the dtypes a checkpoint's arrays may have: those safetensors stores and reads back as numpy
#: arrays of the same dtype (bfloat16 as ml_dtypes gives it to numpy, asyncnn's own)
_ARRAY_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                "float16", "bfloat16", "float32", "float64", "complex64")  # fmt: skip
#: the value of a leaf's "array" that marks a numpy scalar (a 0-d array in the file); True for
#: an array (also every numpy scalar of a checkpoint written before the mark: a 0-d array)
_SCALAR = "scalar"
#: the ints a spec holds (msgpack's: a signed or an unsigned 64-bit integer)
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _key_order(key: Any) -> tuple[bool, Any]:
    """Where a dict key stands in a checkpoint: ints ascending, then strs ascending. Keys of one
    type sort as ``sorted`` (and ``tree_flatten``) sort them, so that a checkpoint written
    before a dict could mix them numbers its leaves the same way."""
    return (isinstance(key, str), key)


def _unstorable(value: Any) -> str | None:
    """Why the spec (msgpack) cannot hold the int or str ``value`` (a leaf or a dict key), or
    None where it can."""
    if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
        return (
            "beyond 64 bits; a checkpoint keeps ints from -2**63 to 2**64 - 1 (keep a larger "
            "one as a str)"
        )
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"which UTF-8 cannot encode ({exc.reason} at index {exc.start}); a checkpoint "
                "keeps its strings in UTF-8"
            )
    return None


def _treedef_spec(
    tree: Any,
    what: str,
    prefix: str,
    arrays: dict[str, np.ndarray],
    counter: list[int],
    path: str = "",
) -> Any:
    """The structure of a pytree with its non-array leaves (ints, floats) kept inline; its
    arrays go to ``arrays`` (on the host) under ``<prefix>/<leaf index>``, its leaves numbered
    from ``counter[0]`` on as :func:`_join` counts them (a dict's in :func:`_key_order`). A
    numpy scalar goes there as a 0-d array, its entry ``{"array": "scalar"}`` (an array's is
    ``{"array": True}``), and :func:`_join` gives it back as a numpy scalar.

    Containers are dicts, lists and tuples of exactly these types, as :func:`tree_flatten`
    sees them (it takes an ``OrderedDict`` or a named tuple for one leaf).

    Raises:
        TypeError: a leaf or a dict key the checkpoint cannot hold (an object of another type,
            an array of a dtype safetensors does not store, an int beyond 64 bits), naming
            ``what`` and the place in it.
    """
    where = f"cannot save {what}: at {path or 'its top'}"
    kind = type(tree)
    if kind is dict:
        for k in tree:
            if type(k) not in (str, int):
                raise TypeError(
                    f"{where} a dict has the key {k!r:.80}; a checkpoint keeps str and int keys"
                )
            why = _unstorable(k)
            if why is not None:
                raise TypeError(f"{where} a dict has the key {k!r:.80}, {why}")
        return {
            "dict": {
                k: _treedef_spec(tree[k], what, prefix, arrays, counter, f"{path}[{k!r}]")
                for k in sorted(tree, key=_key_order)
            }
        }
    if kind is list or kind is tuple:
        entries = [
            _treedef_spec(v, what, prefix, arrays, counter, f"{path}[{i}]")
            for i, v in enumerate(tree)
        ]
        return {"list" if kind is list else "tuple": entries}
    index = counter[0]
    counter[0] += 1
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        host = host_array(tree)
        if host.dtype.name not in _ARRAY_DTYPES:
            raise TypeError(
                f"{where} it holds an array of dtype {host.dtype}; a checkpoint keeps arrays of "
                f"the dtypes {', '.join(_ARRAY_DTYPES)} (cast it to one, or give strings as a "
                "list of str)"
            )
        arrays[f"{prefix}/{index}"] = host
        # a numpy scalar is kept as a 0-d array and marked, so that it comes back a numpy
        # scalar of its dtype, as it passes between fits and to workers (a 0-d array is not
        # hashable); an asyncnn before the mark reads any value of "array" as an array
        return {"array": _SCALAR if isinstance(tree, np.generic) else True}
    if tree is None or isinstance(tree, bool | int | float | str):
        why = _unstorable(tree)
        if why is not None:
            raise TypeError(f"{where} it holds the {type(tree).__name__} {tree!r:.80}, {why}")
        return {"value": tree}
    raise TypeError(
        f"{where} it holds an object of type "
        f"{kind.__qualname__}; a checkpoint keeps dicts, lists and tuples (of exactly these "
        "types), arrays, numbers, strings and None (a dataclass or named tuple: give its "
        "fields as a dict)"
    )


def _split(tree: Any, prefix: str, arrays: dict[str, np.ndarray], what: str) -> Any:
    """The spec of ``tree`` (:func:`_treedef_spec`), its arrays added to ``arrays``.

    Raises:
        TypeError: ``tree`` holds what a checkpoint cannot (naming ``what`` and the place); the
            save it is part of then writes nothing.
    """
    return _treedef_spec(tree, what, prefix, arrays, [0])


def _join(spec: Any, prefix: str, arrays: dict[str, Any], device: str, counter: list[int]) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{prefix}: a tree entry must be a map of one key, got {spec!r:.80}")
    if "dict" in spec:
        if not isinstance(spec["dict"], dict):
            raise ValueError(f"{prefix}: 'dict' holds {type(spec['dict']).__name__}, not a map")
        for k in spec["dict"]:
            if type(k) not in (str, int):  # (a save writes no other; sorting them would fail)
                raise ValueError(f"{prefix}: a dict has the key {k!r:.80}, not a str or an int")
        return {
            k: _join(spec["dict"][k], prefix, arrays, device, counter)
            for k in sorted(spec["dict"], key=_key_order)
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
        if spec["array"] == _SCALAR:  # a numpy scalar (on the host, as it was saved)
            return np.asarray(arrays[name])[()]
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


class CastOverflow(ValueError):
    """A checkpoint's finite value that the trainer's dtype cannot hold (see :func:`_cast_like`):
    the load's own refusal, not a sign of a damaged checkpoint."""


def _cast_like(tree: Any, like: Any, device: str, what: str) -> Any:
    """``tree`` with each floating array leaf in the dtype of ``like``'s (where a ``dtype``
    override gave the trainer another one than the checkpoint's); other leaves as they are.

    Raises:
        CastOverflow: a finite value the cast makes Inf (a float32 weight of 1e5 loaded with
            ``dtype="float16"``), naming ``what`` and the leaf's place in it.
    """
    likes, like_def = tree_flatten(like)
    treedef = tree_flatten(tree)[1]
    if like_def != treedef:
        raise ValueError(f"{what}: structures differ: {treedef!r} and {like_def!r}")

    def cast(a: Any, k: int) -> Any:
        b = likes[k]
        if not (hasattr(a, "dtype") and hasattr(b, "dtype")) or a.dtype == b.dtype:
            return a
        if not (is_floating(a.dtype) and is_floating(b.dtype)):
            return a
        return get_backend(device).asarray(a, dtype=b.dtype)

    fix = "rescale it, or load with a wider dtype (Trainer.load(..., dtype='{wider}'))"
    try:
        return cast_refusing_overflow(cast, tree, what, "the trainer's", fix)
    except ValueError as exc:  # (the structures agree: only an overflow raises here)
        raise CastOverflow(str(exc)) from None


_SCALARS: tuple[type, ...] = (int, float, bool, type(None), str)
