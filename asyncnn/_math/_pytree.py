"""Pytrees: nested dicts, lists and tuples whose leaves are arrays (or anything else).

Parameters, gradients and optimizer states are pytrees. Dict keys are visited in sorted order so
that two dicts built in different orders flatten the same way. A :class:`ReadOnlyDict` (the
trainer's ``params``) flattens as the plain dict it copies, wherever it is in a tree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

__all__ = [
    "ReadOnlyDict",
    "TreeDef",
    "leaf_path",
    "tree_copy",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_unflatten",
]


class ReadOnlyDict(dict[Any, Any]):
    """A dict that refuses every change (a snapshot, such as ``Trainer.params``, that a change
    would not reach the source of): each mutator raises ``TypeError`` with its ``refusal``.

    Its copies (``dict(d)``, ``d.copy()``, ``copy.copy``, ``copy.deepcopy``, pickle, ``d | x``)
    are plain dicts, the caller's to change. Only this dict is read-only: the containers it
    holds are as given. The pytree functions take it as the plain dict it copies (rebuilt as
    one), at the top of a tree or inside one (``vjp(f, (tr.params, x))``). One type, not a
    subclass per use: their fast paths test types by identity.

    Args:
        refusal: what a change is refused with (what the dict is, and how to change it
            instead); by default, to change a copy.
    """

    __slots__ = ("refusal",)

    def __init__(self, *args: Any, refusal: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusal = refusal or "this dict is read-only; change a copy of it instead (dict(d))"

    def _refuse(self) -> NoReturn:
        raise TypeError(self.refusal)

    def __setitem__(self, key: Any, value: Any) -> NoReturn:
        self._refuse()

    def __delitem__(self, key: Any) -> NoReturn:
        self._refuse()

    # (mypy wants |= to give what | gives: | gives a plain copy, this refuses)
    def __ior__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        self._refuse()

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse()

    def pop(self, *args: Any) -> NoReturn:
        self._refuse()

    def popitem(self) -> NoReturn:
        self._refuse()

    def clear(self) -> NoReturn:
        self._refuse()

    def setdefault(self, *args: Any) -> NoReturn:
        self._refuse()

    def __copy__(self) -> dict[Any, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Any, Any]:
        return copy.deepcopy(dict(self), memo)

    def __reduce__(self) -> tuple[Any, ...]:
        # a plain dict when unpickled (dict's own pickling would refill this one through
        # __setitem__, refused): loading needs no asyncnn either
        return (dict, (dict(self),))


class TreeDef:
    """The shape of a pytree without its leaves: enough to rebuild it from a flat list."""

    __slots__ = ("kind", "meta", "children", "num_leaves", "flat")

    def __init__(
        self,
        kind: str,
        meta: Any,
        children: tuple[TreeDef, ...],
        num_leaves: int | None = None,
        flat: bool | None = None,
    ) -> None:
        self.kind = kind  # "leaf", "dict", "list" or "tuple"
        self.meta = meta  # sorted keys for a dict
        self.children = children
        if num_leaves is None:
            num_leaves = 1 if kind == "leaf" else sum(c.num_leaves for c in children)
        self.num_leaves: int = num_leaves
        # a container whose children are all leaves (a layer's {"weight", "bias"}): rebuilt
        # from its leaves in one step
        if flat is None:
            flat = kind != "leaf" and all(c.kind == "leaf" for c in children)
        self.flat = flat

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return (
            isinstance(other, TreeDef)
            and self.kind == other.kind
            and self.meta == other.meta
            and self.children == other.children
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.meta, self.children))

    def __repr__(self) -> str:
        if self.kind == "leaf":
            return "*"
        if self.kind == "dict":
            inner = ", ".join(
                f"{k!r}: {c!r}" for k, c in zip(self.meta, self.children, strict=True)
            )
            return "{" + inner + "}"
        inner = ", ".join(repr(c) for c in self.children)
        return f"[{inner}]" if self.kind == "list" else f"({inner})"


_LEAF = TreeDef("leaf", None, ())
#: what a dict's value may be that is no leaf (a :class:`ReadOnlyDict` is opened as a dict)
_CONTAINERS = (dict, list, tuple, ReadOnlyDict)
#: the same for a list's or a tuple's item, plain dicts aside (tested first, on their own)
_SEQUENCES = (list, tuple, ReadOnlyDict)
#: the one TreeDef of each dict structure whose values are all leaves (a layer's parameters),
#: by its sorted keys: shared, so that comparing two trees of such dicts is mostly identity
_FLAT_DICTS: dict[tuple[Any, ...], TreeDef] = {}


def _flat_dict(keys: tuple[Any, ...]) -> TreeDef:
    treedef = _FLAT_DICTS.get(keys)
    if treedef is None:
        treedef = TreeDef("dict", keys, (_LEAF,) * len(keys), len(keys), True)
        if len(_FLAT_DICTS) < 4096:
            _FLAT_DICTS[keys] = treedef
    return treedef


#: a dict's keys in the order it holds them -> (its keys sorted, the TreeDef of a dict of those
#: keys whose values are all leaves): a layer's parameter dicts are built the same way every
#: time, so this spares each flatten the sort of their keys
_KEY_ORDERS: dict[tuple[Any, ...], tuple[tuple[Any, ...], TreeDef]] = {}


def _sorted_keys(tree: dict[Any, Any]) -> tuple[tuple[Any, ...], TreeDef]:
    try:
        keys = tuple(sorted(tree))
    except TypeError as exc:
        raise _unsortable(tree, exc) from None
    found = (keys, _flat_dict(keys))
    if len(_KEY_ORDERS) < 4096:
        _KEY_ORDERS[tuple(tree)] = found
    return found


def _unsortable(tree: dict[Any, Any], exc: TypeError) -> TypeError:
    """The error for a dict whose keys do not sort (an int and a str): its leaves have no order.

    Refused rather than sorted by some total order (type name, then key): keys of one type or
    of types that compare (int and float) keep their order, and a mistake is named where it is
    made, as JAX does."""
    keys = list(tree)
    firsts: dict[type, Any] = {}  # the first key of each type: the pair that fails among them
    for k in keys:
        firsts.setdefault(type(k), k)
    pair = ""
    reps = list(firsts.values())
    for i, a in enumerate(reps):
        for b in reps[i + 1 :]:
            try:
                a < b  # noqa: B015 - only whether it raises
            except TypeError:
                pair = f"{type(a).__name__} {a!r} and {type(b).__name__} {b!r}"
                break
        if pair:
            break
    shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
    return TypeError(
        f"pytree dict keys must be mutually sortable (e.g. all str), got "
        f"{pair or str(exc)} in a dict with keys [{shown}]: its leaves are ordered by sorted key; "
        "give it keys of one type (str(k) for each)"
    )


def _flatten(tree: Any, out: list[Any]) -> TreeDef:
    # Called for every leaf of every vjp and optimizer update: keep the common paths short
    # (plain loops, no comprehensions: each would be a call of its own).
    t = type(tree)
    if t is dict:
        keys, flat_def = _KEY_ORDERS.get(tuple(tree)) or _sorted_keys(tree)
        start = len(out)
        append = out.append
        for k in keys:
            v = tree[k]
            if type(v) in _CONTAINERS:
                break
            append(v)
        else:  # every value a leaf
            return flat_def
        del out[start:]
        children = tuple([_flatten(tree[k], out) for k in keys])
        return TreeDef("dict", keys, children, len(out) - start, False)
    if t is list or t is tuple:
        start = len(out)
        append = out.append
        kids: list[TreeDef] = []
        flat = True
        for v in tree:
            tv = type(v)
            if tv is dict:
                # a module's parameters (a dict of leaves) inline: a stage's tree is a list of
                # them, flattened at every vjp and optimizer update
                flat = False
                keys, flat_def = _KEY_ORDERS.get(tuple(v)) or _sorted_keys(v)
                mark = len(out)
                for k in keys:
                    x = v[k]
                    if type(x) in _CONTAINERS:
                        break
                    append(x)
                else:
                    kids.append(flat_def)
                    continue
                del out[mark:]
                kids.append(_flatten(v, out))
            elif tv in _SEQUENCES:
                kids.append(_flatten(v, out))
                flat = False
            else:
                append(v)
                kids.append(_LEAF)
        return TreeDef("list" if t is list else "tuple", None, tuple(kids), len(out) - start, flat)
    if t is ReadOnlyDict:  # (after the plain containers: free to them)
        return _flatten(dict(tree), out)
    out.append(tree)
    return _LEAF


def leaf_path(treedef: TreeDef, k: int) -> list[Any]:
    """The keys and indices from the root of a tree of structure ``treedef`` to its leaf ``k``
    (in flattening order): ``[0, 'w']`` for ``tree[0]['w']``."""
    labels: list[Any] = []
    while treedef.kind != "leaf":
        keys = treedef.meta if treedef.kind == "dict" else range(len(treedef.children))
        for label, child in zip(keys, treedef.children, strict=True):
            if k < child.num_leaves:
                labels.append(label)
                treedef = child
                break
            k -= child.num_leaves
    return labels


def leaf_name(treedef: TreeDef, k: int, name: str) -> str:
    """The name of leaf ``k`` (in flattening order) of a tree of structure ``treedef``, from
    the tree's ``name``: ``primals[0]['w']``."""
    return name + "".join(f"[{label!r}]" for label in leaf_path(treedef, k))


def tree_flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    """Returns the leaves of ``tree`` in a fixed order and the structure to rebuild it."""
    leaves: list[Any] = []
    treedef = _flatten(tree, leaves)
    return leaves, treedef


def _unflatten(treedef: TreeDef, leaves: Iterator[Any]) -> Any:
    # plain loops, no comprehensions (each would be a call of its own)
    kind = treedef.kind
    if kind == "leaf":
        return next(leaves)
    if kind == "dict":
        out: dict[Any, Any] = {}
        if treedef.flat:
            for k in treedef.meta:
                out[k] = next(leaves)
        else:
            for k, c in zip(treedef.meta, treedef.children, strict=True):
                out[k] = _unflatten(c, leaves)
        return out
    items: list[Any] = []
    if treedef.flat:
        for _ in treedef.children:
            items.append(next(leaves))
    else:
        for c in treedef.children:
            ck = c.kind
            if ck == "leaf":
                items.append(next(leaves))
            elif ck == "dict" and c.flat:  # a module's parameters, inline (see _flatten)
                d: dict[Any, Any] = {}
                for k in c.meta:
                    d[k] = next(leaves)
                items.append(d)
            else:
                items.append(_unflatten(c, leaves))
    return items if kind == "list" else tuple(items)


def tree_unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    """Rebuilds a pytree of the structure ``treedef`` from a flat list of leaves."""
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"tree {treedef!r} has {treedef.num_leaves} leaves, got {len(leaves)}")
    return _unflatten(treedef, iter(leaves))


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in flattening order."""
    return tree_flatten(tree)[0]


def tree_copy(tree: Any) -> Any:
    """``tree`` with a fresh copy of each array leaf (leaves without ``copy``, such as None or
    an int, stay as they are)."""
    return tree_map(_copy_leaf, tree)


def _copy_leaf(a: Any) -> Any:
    return a.copy() if hasattr(a, "copy") else a


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Applies ``fn`` leaf by leaf to one or more pytrees of the same structure."""
    leaves, treedef = tree_flatten(tree)
    others = []
    for other in rest:
        other_leaves, other_def = tree_flatten(other)
        if other_def != treedef:
            raise ValueError(f"tree_map: structures differ: {treedef!r} and {other_def!r}")
        others.append(other_leaves)
    return tree_unflatten(treedef, [fn(*xs) for xs in zip(leaves, *others, strict=True)])
