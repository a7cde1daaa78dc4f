"""In-memory datasets, minibatches and microbatches.

A dataset is a dict of arrays sharing their first dimension (one row per example). Batching is
deterministic: without shuffling, batches are consecutive row ranges; with shuffling, the order
is a permutation that depends only on ``(seed, epoch)``, so a run resumed at epoch ``e``
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from asyncnn.backends import is_cupy_array

__all__ = ["ArrayDataset", "batch_length", "epoch_permutation", "split_microbatches"]


def _check_index(value: Any, name: str, minimum: int) -> int:
    # (a bool is an int to operator.index: fit(data, 5, True) meant shuffle, not batch_size=1)
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if index < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {index}")
    return index


def _check_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: a Python or numpy bool (a string such as ``"no"`` would be true)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def batch_length(batch: Mapping[str, Any]) -> int:
    """The number of rows of a batch (a dict of arrays sharing their first dimension).

    Raises:
        ValueError: the batch is empty, holds a 0-d array, or its arrays differ in length; the
            message names the offending field.
    """
    if not batch:
        raise ValueError("a batch needs at least one array, got an empty dict")
    length: int | None = None
    first = ""
    for name, array in batch.items():
        shape = getattr(array, "shape", None)
        if shape is None or len(shape) == 0:
            raise ValueError(
                f"field {name!r} must be an array with a leading batch dimension, got "
                f"{type(array).__name__} of shape {shape}"
            )
        if length is None:
            length, first = int(shape[0]), name
        elif int(shape[0]) != length:
            raise ValueError(
                f"field {name!r} has {shape[0]} rows but field {first!r} has {length}; every "
                "array of a dataset or batch needs the same first dimension"
            )
    assert length is not None
    return length


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray[Any, Any]:
    """The shuffled row order of one epoch: a function of ``(num_rows, seed, epoch)`` only.

    Each epoch draws from its own stream ``SeedSequence([seed, epoch])``, so the order of epoch
    ``e`` does not depend on how many epochs were drawn before it (a resumed run reproduces it).
    The order is the same in every process and on every machine with the same numpy version
    (it draws integers only, no floating point); numpy promises its ``Generator`` streams only
    within one version, so a run resumed under another numpy may shuffle differently (the
    tests pin the order, so a numpy that changes it is noticed).

    Raises:
        TypeError: an argument is not an int (a bool is not one).
        ValueError: an argument is negative.
    """
    # (a negative num_rows gave an empty order, a float one a numpy AxisError)
    num_rows = _check_index(num_rows, "num_rows", 0)
    seed = _check_index(seed, "seed", 0)
    epoch = _check_index(epoch, "epoch", 0)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_rows)


def has_numpy_dtype(array: Any) -> bool:
    """Whether ``array.dtype`` is one numpy knows (a torch tensor's is not)."""
    try:
        np.dtype(array.dtype)
    except TypeError:
        return False
    return True


def _plain_ndarray(name: str, array: np.ndarray[Any, Any], what: str = "field") -> Any:
    """A numpy array (of a subclass: ``np.matrix``, ``np.memmap``) as a plain ndarray view of
    its data, no copy (np.matrix would stay 2-d when indexed, and keep its ``*`` as a matrix
    product through a cast); a masked array refused, naming it as ``what`` (``"field"`` of a
    dataset, ``"input"`` of a batch).

    Raises:
        TypeError: ``array`` is a masked array.
    """
    if isinstance(array, np.ma.MaskedArray):
        raise TypeError(
            f"{what} {name!r} is a masked array: its masked entries would be read as the values "
            f"stored under the mask; fill them ({name}.filled(value)) or drop those rows first"
        )
    return np.asarray(array)


def _as_array(name: str, array: Any) -> Any:
    """One field of a dataset as an array that rows can be taken from (see
    :class:`ArrayDataset`)."""
    if isinstance(array, np.ndarray):
        return _plain_ndarray(name, array)
    if hasattr(array, "shape") and is_cupy_array(array):
        return array
    if hasattr(array, "iloc"):  # pandas: an index array selects rows by label, not position
        return _converted(name, array)
    if hasattr(array, "shape") and hasattr(array, "dtype") and has_numpy_dtype(array):
        return array  # an array of a numpy dtype (h5py, zarr): rows are read as needed
    # (a dtype numpy does not know, a torch tensor's, is converted here too)
    return _converted(name, array)


def _converted(name: str, array: Any) -> np.ndarray[Any, Any]:
    try:
        return np.asarray(array)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(
            f"field {name!r} cannot be made an array (its rows must all have the same shape): {exc}"
        ) from exc
    except (TypeError, RuntimeError) as exc:  # a GPU torch tensor, one that requires grad
        raise TypeError(
            f"field {name!r} ({type(array).__name__}) cannot be made a numpy array: {exc}"
        ) from exc


class ArrayDataset:
    """A dataset held in memory as named arrays with one row per example.

    Args:
        arrays: ``{name: array}`` (or another dataset, whose arrays are then shared); every
            array has the same length along axis 0. numpy and cupy arrays are kept as they are
            (no copy; a subclass such as ``np.memmap`` or ``np.matrix`` as a plain ndarray view
            of its data), and so are other arrays of a numpy dtype (h5py, zarr: read lazily,
            the rows of each batch as it is taken, in increasing order as h5py needs); anything
            else (lists, a CPU torch tensor, a pandas Series or DataFrame, whose index arrays
            would select rows by label) is converted with ``np.asarray``. A masked array is
            refused: its masked entries would be read as they are stored.

    Example:
        ```python
        ds = ArrayDataset({"x": np.zeros((10, 3)), "y": np.arange(10)})
        [b["y"].tolist() for b in ds.batches(4)]  # [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        ```
    """

    def __init__(self, arrays: Mapping[str, Any] | ArrayDataset) -> None:
        if isinstance(arrays, ArrayDataset):
            arrays = arrays.arrays
        if not isinstance(arrays, Mapping):
            raise TypeError(
                "ArrayDataset takes a dict of arrays, e.g. ArrayDataset({'x': x, 'y': y}); got "
                f"{type(arrays).__name__}"
            )
        converted: dict[str, Any] = {}
        for name, array in arrays.items():
            if not isinstance(name, str):
                raise TypeError(f"ArrayDataset field names must be str, got {name!r}")
            converted[name] = _as_array(name, array)
        self._length = batch_length(converted)
        self._arrays = converted

    @property
    def arrays(self) -> dict[str, Any]:
        """The dataset's arrays (a new dict; the arrays themselves are shared, not copied)."""
        return dict(self._arrays)

    def keys(self) -> list[str]:
        """The field names, in insertion order."""
        return list(self._arrays)

    def __getitem__(self, name: str) -> Any:
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(f"no field {name!r} in the dataset; it has {self.keys()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}: {getattr(v, 'dtype', '?')}{tuple(v.shape)}" for k, v in self._arrays.items()
        )
        return f"ArrayDataset({self._length} rows; {fields})"

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields per epoch."""
        batch_size = _check_index(batch_size, "batch_size", 1)
        if _check_flag(drop_last, "drop_last"):
            return self._length // batch_size
        return -(-self._length // batch_size)

    def take(self, rows: Any) -> dict[str, Any]:
        """The rows ``rows`` (a slice or an index array) of every field, as a dict.

        A field read lazily (h5py, zarr) is read at the rows in increasing order, each once
        (h5py refuses other index arrays), and comes back as numpy in the order asked for (also
        for a slice, which an xarray or a dask array would answer with its own type). Its rows
        are checked as numpy checks an index array (an empty one gives 0 rows).

        Raises:
            IndexError: a row out of ``[-len, len)`` (naming it and the length), a boolean mask
                of another length, or an index array that is neither integer nor boolean.
        """
        if isinstance(rows, slice):
            return {
                name: (
                    array[rows]
                    if isinstance(array, np.ndarray) or is_cupy_array(array)
                    else np.asarray(array[rows])
                )
                for name, array in self._arrays.items()
            }
        out: dict[str, Any] = {}
        index: Any = None
        for name, array in self._arrays.items():
            if isinstance(array, np.ndarray) or is_cupy_array(array):
                out[name] = array[rows]
                continue
            if index is None:
                index = self._lazy_index(rows)
                increasing, back = np.unique(index, return_inverse=True)
                back = back.reshape(index.shape)
            if index.size == 0:  # (nothing to read: no reader need take an empty selection)
                out[name] = np.empty((*index.shape, *array.shape[1:]), np.dtype(array.dtype))
                continue
            out[name] = np.asarray(array[increasing])[back]
        return out

    def _lazy_index(self, rows: Any) -> np.ndarray[Any, Any]:
        """``rows`` (an index array, list or int) as non-negative row numbers, checked as numpy
        checks an index array (a field read lazily is given them without its own check).

        Raises:
            IndexError: a row out of ``[-len, len)``, a boolean mask of another length, or an
                index that is neither integer nor boolean; naming it and the length.
        """
        index = np.asarray(rows)
        if index.size == 0 and index.dtype.kind not in "iub":  # ([] is float64 to numpy)
            index = index.astype(np.intp)
        if index.dtype == np.bool_:
            if index.shape != (self._length,):
                raise IndexError(
                    f"boolean index did not match the dataset's {self._length} rows: the mask "
                    f"has shape {index.shape}, give one of shape ({self._length},)"
                )
            return np.flatnonzero(index)
        if index.dtype.kind not in "iu":
            raise IndexError(f"row indices must be of integer (or boolean) type, got {index.dtype}")
        wrapped = np.where(index < 0, index + self._length, index)
        outside = (wrapped < 0) | (wrapped >= self._length)
        if outside.any():
            bad = index[outside].flat[0]
            raise IndexError(
                f"index {bad} is out of bounds for axis 0 with size {self._length} (the "
                f"dataset has {self._length} rows: give rows in [-{self._length}, "
                f"{self._length}))"
            )
        return wrapped

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        start: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Yields the minibatches of one epoch as dicts of arrays.

        Args:
            batch_size: rows per batch (>= 1). The last batch is smaller when the length is not
                a multiple, unless ``drop_last``.
            shuffle: visit the rows in the order :func:`epoch_permutation` gives for
                ``(seed, epoch)``; otherwise in storage order (batches are then views, not copies).
            seed: the shuffling seed (>= 0).
            epoch: the epoch number (>= 0); each epoch has its own order.
            drop_last: skip a final batch smaller than ``batch_size``.
            start: the first batch to yield (>= 0): the epoch's batches from there, as
                they come from 0 (the same rows, the same order), the ones before read not
                at all (a fit resuming mid-epoch on an h5py file). None past the last.
        """
        batch_size = _check_index(batch_size, "batch_size", 1)
        start = _check_index(start, "start", 0)
        order = (
            epoch_permutation(self._length, seed, epoch)
            if _check_flag(shuffle, "shuffle")
            else None
        )
        stop = self.num_batches(batch_size, drop_last) * batch_size
        for first in range(start * batch_size, min(stop, self._length), batch_size):
            end = min(first + batch_size, self._length)
            if order is None:
                yield self.take(slice(first, end))
            else:
                yield self.take(order[first:end])


def split_microbatches(batch: Mapping[str, Any], m: int) -> list[dict[str, Any]]:
    """Splits a batch into ``m`` microbatches the way ``numpy.array_split`` splits an array.

    With ``n`` rows, the first ``n % m`` microbatches have ``n // m + 1`` rows and the rest
    ``n // m``; rows keep their order and the microbatches are views (slices) of the batch.

    Args:
        batch: a dict of arrays sharing their first dimension (numpy or cupy).
        m: the number of microbatches, ``1 <= m <= n``.

    Raises:
        ValueError: ``m < 1``, the batch has no rows, or ``m`` exceeds the number of rows (a
            microbatch would be empty).
    """
    m = _check_index(m, "m (the number of microbatches)", 1)
    n = batch_length(batch)
    if n == 0:  # ("use at most 0 microbatches", the advice below, cannot be followed)
        fields = ", ".join(f"{name!r}" for name in batch)
        raise ValueError(f"cannot split a batch of 0 rows (fields {fields}) into microbatches")
    if m > n:
        raise ValueError(
            f"cannot split a batch of {n} rows into {m} microbatches: each needs at least one "
            f"row; use at most {n} microbatches or a batch_size of at least {m}"
        )
    size, extra = divmod(n, m)
    out: list[dict[str, Any]] = []
    start = 0
    for i in range(m):
        end = start + size + (1 if i < extra else 0)
        out.append({name: array[start:end] for name, array in batch.items()})
        start = end
    return out
