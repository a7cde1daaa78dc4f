"""Pytrees (``asyncnn/_math/_pytree.py``): flattening order, structure and round trips."""

from __future__ import annotations

import numpy as np
import pytest

from asyncnn._math._pytree import TreeDef, tree_flatten, tree_map, tree_unflatten

_A = np.arange(3.0)

# every kind of node, and each container holding each kind: a list of modules' parameter
# dicts (a stage's tree), a dict that holds a container (not a dict of leaves), empty ones
_TREES = {
    "stage": [{"weight": _A, "bias": _A + 1}, {}, {"weight": _A + 2, "bias": _A + 3}, {}],
    "tuple of dicts": ({"b": 1, "a": 2}, {"c": 3}),
    "dict holding a list": [{"w": _A, "inner": [4, {"x": 5}]}, 6],
    "nested lists": [[1, [2, (3,)]], (), []],
    "dict of dicts": {"b": {"y": 1, "x": 2}, "a": [{"k": 3}]},
    "leaf": _A,
    "None leaves": [None, {"a": None}],
}


@pytest.mark.parametrize("tree", list(_TREES.values()), ids=list(_TREES))
def test_a_tree_flattens_in_sorted_key_order_and_rebuilds_itself(tree):
    leaves, treedef = tree_flatten(tree)
    reference = _reference_leaves(tree)
    assert len(leaves) == len(reference)
    assert all(a is b for a, b in zip(leaves, reference, strict=True))
    rebuilt = tree_unflatten(treedef, leaves)
    assert _same(rebuilt, tree)
    assert treedef.num_leaves == len(leaves)
    # the structure is the one the same tree built anew gives, and a copy's
    assert tree_flatten(tree_map(lambda x: x, tree))[1] == treedef


def test_a_dict_of_leaves_has_one_structure_wherever_it_sits():
    # inside a list the flattening takes a dict of leaves inline; its structure must equal
    # the dict's own, flattened alone or inside a dict
    inline = tree_flatten([{"b": 1, "a": 2}])[1].children[0]
    alone = tree_flatten({"a": 0, "b": 0})[1]
    nested = tree_flatten({"k": {"b": 1, "a": 2}})[1].children[0]
    assert inline == alone == nested
    assert inline.flat and inline.meta == ("a", "b")


def test_a_list_holding_a_dict_is_not_flat_and_a_dict_holding_a_list_is_not_either():
    tree = [{"w": [1, 2]}, 3]
    leaves, treedef = tree_flatten(tree)
    assert leaves == [1, 2, 3]
    assert not treedef.flat and not treedef.children[0].flat
    assert tree_unflatten(treedef, leaves) == tree


def test_unflatten_refuses_the_wrong_number_of_leaves():
    treedef = tree_flatten(_TREES["stage"])[1]
    with pytest.raises(ValueError, match="has 4 leaves, got 3"):
        tree_unflatten(treedef, [1, 2, 3])
    assert isinstance(treedef, TreeDef)


def _reference_leaves(tree):
    # the order written out: dict keys sorted, containers depth first
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _reference_leaves(tree[k])]
    if isinstance(tree, list | tuple):
        return [x for v in tree for x in _reference_leaves(v)]
    return [tree]


def _same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b


@pytest.mark.parametrize(
    "wrap",
    [lambda d: d, lambda d: [d, 0], lambda d: {"k": d}],
    ids=["alone", "in a list", "in a dict"],
)
def test_a_dicts_keys_sort_the_same_whichever_order_it_was_built_in(wrap):
    # the flattening remembers each insertion order's sorted keys: the first order seen must
    # not decide the leaf order of a dict built in another, nor a dict of leaves that of the
    # same keys holding a container
    first, second = {"b": 1, "a": 2, "c": 3}, {"c": 30, "a": 10, "b": 20}
    for _ in range(2):  # the second pass is answered by what the first remembered
        leaves1, def1 = tree_flatten(wrap(first))
        leaves2, def2 = tree_flatten(wrap(second))
        assert def1 == def2
        assert leaves1[:3] == [2, 1, 3] and leaves2[:3] == [10, 20, 30]
    nested = {"b": [4], "a": 5, "c": 6}
    leaves, treedef = tree_flatten(wrap(nested))
    assert leaves[:3] == [5, 4, 6] and not tree_flatten(nested)[1].flat
    assert tree_unflatten(treedef, leaves) == wrap(nested)


def test_a_dict_whose_keys_do_not_sort_is_refused_naming_them():
    # (before: Python's bare "'<' not supported between instances of 'str' and 'int'")
    said = (
        r"pytree dict keys must be mutually sortable \(e\.g\. all str\), got int 1 and str 'a' "
        r"in a dict with keys \[1, 'a'\]"
    )
    for _ in range(2):  # nothing remembered from the first refusal answers the second
        with pytest.raises(TypeError, match=said):
            tree_flatten({1: 0, "a": 1})
        with pytest.raises(TypeError, match=said):
            tree_flatten([{1: 0, "a": 1}])
    with pytest.raises(TypeError, match=r"got NoneType None and int 2 in a dict with keys"):
        tree_map(lambda v: v, {"k": {None: 1, 2: 3}})
    # keys of one type, or of types that compare (int and float), sort as before
    assert tree_flatten({2: "b", 1.5: "a", True: "t"})[0] == ["t", "a", "b"]


@pytest.mark.parametrize(
    "plain",
    [_TREES["dict of dicts"], {"w": _A, "b": 1}, {}, {"stage1": _TREES["stage"], "stage0": [{}]}],
    ids=["of containers", "of leaves", "empty", "trainer-like"],
)
def test_a_read_only_dict_flattens_and_maps_as_the_plain_dict_it_copies(plain):
    # (Trainer.params is one: its pytree must be exactly that of the plain dict it replaced)
    from asyncnn._math._pytree import ReadOnlyDict

    frozen = ReadOnlyDict(plain)
    assert isinstance(frozen, dict) and frozen == plain
    leaves, treedef = tree_flatten(frozen)
    plain_leaves, plain_def = tree_flatten(plain)
    assert treedef == plain_def and treedef.flat == plain_def.flat
    assert treedef.num_leaves == plain_def.num_leaves
    assert all(a is b for a, b in zip(leaves, plain_leaves, strict=True))
    assert len(leaves) == len(plain_leaves)
    assert _same(tree_unflatten(treedef, leaves), plain)  # a plain dict again
    assert _same(tree_map(lambda x: x, frozen), plain)
    assert _same(tree_map(lambda a, b: a, frozen, plain), plain)
    assert _same(tree_map(lambda a, b: b, plain, frozen), plain)
    with pytest.raises(TypeError, match="read-only"):
        frozen["new"] = 1
    assert frozen == plain


@pytest.mark.parametrize(
    "wrap",
    [
        lambda d: [d, _A],
        lambda d: (_A, d),
        lambda d: {"params": d, "x": _A},
        lambda d: [{"weight": _A}, [d]],
    ],
    ids=["in a list", "in a tuple", "a dict's value", "deeper"],
)
def test_a_read_only_dict_inside_a_tree_flattens_as_a_plain_dict(wrap):
    # (vjp(f, (tr.params, x)) and tree_map over [tr.params]: opened as a dict, not one leaf)
    from asyncnn._math._pytree import ReadOnlyDict

    plain = {"stage1": _TREES["stage"], "stage0": [{"w": _A + 5}]}
    frozen = ReadOnlyDict(plain, refusal="nope")
    leaves, treedef = tree_flatten(wrap(frozen))
    plain_leaves, plain_def = tree_flatten(wrap(plain))
    assert treedef == plain_def
    assert all(a is b for a, b in zip(leaves, plain_leaves, strict=True))
    assert len(leaves) == len(plain_leaves)
    assert _same(tree_map(lambda x: x, wrap(frozen)), wrap(plain))
    with pytest.raises(TypeError, match="nope"):
        frozen.update({})


def test_gradients_through_a_read_only_dict_inside_the_arguments() -> None:
    # (an experiment took the vjp of (tr.params, ...) as one argument)
    from asyncnn import testing, vjp
    from asyncnn._math._pytree import ReadOnlyDict

    params = ReadOnlyDict({"w": np.array([1.0, 2.0]), "b": np.array(0.5)})
    out, pullback = vjp(lambda p, x: ((p["w"] * x).sum() + p["b"]) ** 2, params, _A[:2])
    (grads, gx) = pullback(1.0)
    assert type(grads) is dict and sorted(grads) == ["b", "w"]
    np.testing.assert_allclose(grads["w"], 2 * float(out) ** 0.5 * _A[:2])
    testing.check_grads(lambda a: (a[0]["w"] * a[1]).sum(), (params, _A[:2]))


def test_gradients_of_a_dict_whose_keys_do_not_sort_name_the_keys() -> None:
    import asyncnn as ann
    from asyncnn import ops

    # before: "'<' not supported between instances of 'str' and 'int'", naming no dict
    w = np.ones(2)
    for params in ({0: w, "head": w}, {None: w, "x": w}):
        with pytest.raises(TypeError, match=r"pytree dict keys must be mutually sortable"):
            ann.grad(lambda p: ops.sum(p["x" if None in p else 0]))(params)
