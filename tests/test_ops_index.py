"""Integer indices of ``ops.take`` and ``ops.getitem`` (``asyncnn/_math/_ops.py`` and their rules
in ``_rules_array.py``) outside their axis: refused on the host; on a GPU, where cupy would wrap
them around, NaN entries whose gradient reaches nothing. The GPU path runs here on numpy arrays
by patching ``ids_on_host``; ``tests/test_fused_nn.py`` runs it on cupy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import ops

X = np.arange(24.0).reshape(2, 3, 4)


def _indices_as_on_a_gpu(monkeypatch: Any) -> None:
    """In ``monkeypatch``'s context numpy indices take the path of GPU indices (not read back to
    the host), which would fail the test if they were."""
    from asyncnn._math import _ops_nn

    def no_read(ids: Any) -> Any:
        raise AssertionError("a GPU index was read back to the host")

    monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)
    monkeypatch.setattr(_ops_nn, "id_range", no_read)


def _reference(x: np.ndarray, given: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``x[index]`` and its gradient for ones, computed another way: each integer array's axis
    padded with a NaN entry that its bad indices read and whose gradient is dropped."""
    index = list(given)
    padded = np.array(x)

    def width(item: Any) -> int:
        if item is None:
            return 0
        return item.ndim if getattr(getattr(item, "dtype", None), "kind", "") == "b" else 1

    rest = x.ndim - sum(width(i) for i in index if i is not Ellipsis)
    axis = 0
    for place, item in enumerate(index):
        if item is Ellipsis:
            axis += rest
            continue
        if isinstance(item, np.ndarray) and item.dtype.kind in "iu":
            n = x.shape[axis]
            wide = item.astype(np.int64)
            index[place] = np.where((wide < -n) | (wide >= n), n, wide % max(n, 1))
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, 1)
            padded = np.pad(padded, pad, constant_values=np.nan)
        axis += width(item)
    out = padded[tuple(index)]
    grad = np.zeros(padded.shape)
    np.add.at(grad, tuple(index), np.ones_like(out))
    return out, grad[tuple(slice(0, s) for s in x.shape)]


def _same_with_nans(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(want))


def _ids(dtype: str) -> np.ndarray:
    """Indices into an axis of 4: good ones (negative ones too, from the end) and bad ones."""
    if dtype.startswith("u"):  # (no negative unsigned index; a uint64 past 2**63 is bad)
        big = 2**63 + 1 if dtype == "uint64" else np.iinfo(dtype).max
        return np.array([[0, 4, 3], [big, 1, 3]], dtype=dtype)
    return np.array([[0, 4, -1], [-5, -4, 3]], dtype=dtype)


@pytest.mark.parametrize("dtype", ["int64", "int32", "int8", "uint8", "uint64"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_take_of_gpu_indices_outside_the_axis_gives_nan_and_no_gradient(
    dtype: str, axis: int, monkeypatch: Any
) -> None:
    # cupy's take wraps an index: 4 of four read entry 0 and -5 entry 3, and trained them
    _indices_as_on_a_gpu(monkeypatch)
    x = np.arange(64.0).reshape(4, 4, 4)
    ids = _ids(dtype)
    out, pullback = ann.vjp(lambda a: ops.take(a, ids, axis=axis), x)
    (grad,) = pullback(np.ones_like(out))
    want, want_grad = _reference(x, (slice(None),) * (axis % 3) + (ids,))
    _same_with_nans(out, want)
    np.testing.assert_array_equal(grad, want_grad)
    wide = ids.astype(np.int64)  # (as numpy reads a uint64 index)
    good = (wide >= -4) & (wide < 4)
    assert np.isnan(out).sum() == 16 * int((~good).sum())
    np.testing.assert_array_equal(
        ops.take(x, ids[good], axis=axis), np.take(x, ids[good].astype(np.int64), axis=axis)
    )


@pytest.mark.parametrize(
    "index",
    [
        (np.array([[0, 2], [-3, 3]]),),
        (np.array([1, -1, 2]), slice(1, None)),
        (np.array([1, 2]), slice(None), np.array([[0], [-5], [4]])),  # broadcast, apart
        (1, slice(None), np.array([0, 4, -1])),  # (the advanced axes go first, as in numpy)
        (Ellipsis, None, np.array([-4, 3, 9])),
        (np.array([True, False]), np.array([-1, 3]), slice(None)),  # with a mask
        (np.array(3),),  # 0-d
    ],
    ids=["rows", "rows-slice", "apart", "int-apart", "ellipsis", "mask", "0-d"],
)
def test_getitem_of_gpu_indices_outside_the_axis_gives_nan_and_no_gradient(
    index: tuple[Any, ...], monkeypatch: Any
) -> None:
    _indices_as_on_a_gpu(monkeypatch)
    out, pullback = ann.vjp(lambda a: a[index if len(index) > 1 else index[0]], X)
    (grad,) = pullback(np.ones_like(out))
    want, want_grad = _reference(X, index)
    _same_with_nans(out, want)
    np.testing.assert_array_equal(grad, want_grad)


def test_gpu_indices_of_an_empty_axis_give_nan(monkeypatch: Any) -> None:
    _indices_as_on_a_gpu(monkeypatch)
    empty = np.zeros((2, 0, 3))
    out, pullback = ann.vjp(lambda a: ops.take(a, np.array([0, -1]), axis=1), empty)
    assert out.shape == (2, 2, 3) and np.isnan(out).all()
    assert pullback(np.ones_like(out))[0].shape == (2, 0, 3)
    out, pullback = ann.vjp(lambda a: a[:, np.array([[0]])], empty)
    assert out.shape == (2, 1, 1, 3) and np.isnan(out).all()
    assert pullback(np.ones_like(out))[0].shape == (2, 0, 3)
    # no index: nothing to read, as in numpy
    assert ops.take(empty, np.zeros(0, dtype=np.int64), axis=1).shape == (2, 0, 3)


def test_gpu_indices_into_an_integer_array_are_checked_on_the_host(monkeypatch: Any) -> None:
    # an integer entry has no NaN to mark a bad index with: it would come out as another's
    from asyncnn._math import _ops_nn

    monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)
    table = np.arange(12).reshape(3, 4)
    for bad in (3, -4):  # (axis 0 of 3)
        with pytest.raises(IndexError, match=rf"take: index {bad} is out of bounds for axis 0"):
            ops.take(table, np.array([0, bad]))
    for bad in (4, -5):  # (axis 1 of 4)
        with pytest.raises(IndexError, match=rf"getitem: index {bad} is out of bounds for axis 1"):
            ops.getitem(table, (slice(None), np.array([[bad]])))
    np.testing.assert_array_equal(ops.take(table, np.array([-3, 2])), table[[0, 2]])
    np.testing.assert_array_equal(ops.getitem(table, np.array([-1])), table[[2]])


def test_host_indices_out_of_range_are_refused_naming_the_axis_and_shape() -> None:
    x = np.arange(12.0).reshape(3, 4)
    said = r"is out of bounds for axis {} with size {} \(x of shape \(3, 4\)\); valid indices"
    for call, op, bad, axis in [
        (lambda: ops.take(x, np.array([[0, 3]])), "take", 3, 0),
        (lambda: ops.take(x, [1, -5], axis=1), "take", -5, 1),  # a list
        (lambda: ops.take(x, 4, axis=-1), "take", 4, 1),  # an int
        (lambda: ops.take(x, np.int32(-4)), "take", -4, 0),  # a numpy scalar
        (lambda: ops.getitem(x, np.array([2, 3])), "getitem", 3, 0),
        (lambda: ops.getitem(x, (slice(None), [0, 4])), "getitem", 4, 1),
        (lambda: ops.getitem(x, (-4, np.array([0]))), "getitem", -4, 0),
        (lambda: ops.getitem(x, (..., np.array([-5]))), "getitem", -5, 1),
    ]:
        n = x.shape[axis]
        with pytest.raises(IndexError, match=rf"{op}: index {bad} {said.format(axis, n)}"):
            call()
    with pytest.raises(IndexError, match=r"getitem: index 3 is out of bounds"):
        ann.vjp(lambda a: a[np.array([3])], x)  # traced, through the operator
    # negative indices in [-n, 0) count from the end, as in numpy
    np.testing.assert_array_equal(ops.take(x, [-3, -1], axis=0), x[[0, 2]])
    np.testing.assert_array_equal(ops.getitem(x, (-1, np.array([-4]))), x[-1, [0]])
