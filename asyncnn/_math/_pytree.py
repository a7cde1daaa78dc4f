"""Pytrees: nested dicts, lists and tuples whose leaves are arrays (or anything else).

Parameters, gradients and optimizer states are pytrees. Dict keys are visited in sorted order so
that two dicts built in different orders flatten the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["TreeDef", "tree_flatten", "tree_leaves", "tree_map", "tree_unflatten"]


class TreeDef:
    """The shape of a pytree without its leaves: enough to rebuild it from a flat list."""

    __slots__ = ("kind", "meta", "children", "num_leaves")

    def __init__(
        self, kind: str, meta: Any, children: tuple[TreeDef, ...], num_leaves: int | None = None
    ) -> None:
        self.kind = kind  # "leaf", "dict", "list" or "tuple"
        self.meta = meta  # sorted keys for a dict
        self.children = children
        if num_leaves is None:
            num_leaves = 1 if kind == "leaf" else sum(c.num_leaves for c in children)
        self.num_leaves: int = num_leaves

    def __eq__(self, other: object) -> bool:
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


def _flatten(tree: Any, out: list[Any]) -> TreeDef:
    # Called for every leaf of every vjp and optimizer update: keep the common paths short.
    t = type(tree)
    if t is not dict and t is not list and t is not tuple:
        out.append(tree)
        return _LEAF
    start = len(out)
    if t is dict:
        keys = tuple(sorted(tree))
        children = tuple([_flatten(tree[k], out) for k in keys])
        return TreeDef("dict", keys, children, len(out) - start)
    children = tuple([_flatten(v, out) for v in tree])
    return TreeDef("list" if t is list else "tuple", None, children, len(out) - start)


def tree_flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    """Returns the leaves of ``tree`` in a fixed order and the structure to rebuild it."""
    leaves: list[Any] = []
    treedef = _flatten(tree, leaves)
    return leaves, treedef


def _unflatten(treedef: TreeDef, leaves: Iterator[Any]) -> Any:
    if treedef.kind == "leaf":
        return next(leaves)
    if treedef.kind == "dict":
        return {
            k: _unflatten(c, leaves) for k, c in zip(treedef.meta, treedef.children, strict=True)
        }
    items = [_unflatten(c, leaves) for c in treedef.children]
    return items if treedef.kind == "list" else tuple(items)


def tree_unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    """Rebuilds a pytree of the structure ``treedef`` from a flat list of leaves."""
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"tree {treedef!r} has {treedef.num_leaves} leaves, got {len(leaves)}")
    return _unflatten(treedef, iter(leaves))


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in flattening order."""
    return tree_flatten(tree)[0]


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
