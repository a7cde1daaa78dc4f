import random
import subprocess
import sys

import numpy as np
import pytest

import asyncnn.data as data
from asyncnn._math import _datasets


def _dataset(n=10):
    return data.ArrayDataset({"x": np.arange(n * 2.0).reshape(n, 2), "y": np.arange(n)})


# -- ArrayDataset ---------------------------------------------------------------------------------
def test_len_keys_and_repr():
    ds = _dataset(7)
    assert len(ds) == 7 and ds.keys() == ["x", "y"] and "x" in ds and "z" not in ds
    assert "7 rows" in repr(ds)
    np.testing.assert_array_equal(ds["y"], np.arange(7))


def test_mismatched_lengths_name_the_field():
    with pytest.raises(ValueError, match=r"field 'y' has 9 rows but field 'x' has 10"):
        data.ArrayDataset({"x": np.zeros((10, 3)), "y": np.zeros(9)})


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="empty dict"):
        data.ArrayDataset({})
    with pytest.raises(ValueError, match="'s' must be an array with a leading batch dimension"):
        data.ArrayDataset({"x": np.zeros(3), "s": np.float64(1.0)})
    with pytest.raises(TypeError, match="dict of arrays"):
        data.ArrayDataset(np.zeros((3, 2)))
    with pytest.raises(KeyError, match=r"no field 'z'.*\['x', 'y'\]"):
        _dataset()["z"]


def test_lists_are_converted():
    ds = data.ArrayDataset({"x": [[1.0, 2.0], [3.0, 4.0]], "y": [0, 1]})
    assert ds["x"].shape == (2, 2) and ds["y"].dtype.kind == "i"


def test_ragged_lists_name_the_field():
    with pytest.raises(ValueError, match="field 'x' cannot be made an array"):
        data.ArrayDataset({"x": [[1.0, 2.0], [3.0]], "y": [0, 1]})


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_arrays_of_other_kinds_are_read_as_numpy_or_refused_by_name(tmp_path):
    x = np.arange(20.0).reshape(10, 2)
    # np.matrix kept its 2-d rows when indexed (a (n, 1) label column): fit failed in the loss
    ds = data.ArrayDataset({"x": np.asmatrix(x), "y": np.asmatrix(np.arange(10.0)).T[:, 0]})
    assert type(ds["x"]) is np.ndarray and ds["y"].shape == (10, 1)
    batch = next(ds.batches(4, shuffle=True))
    assert type(batch["x"]) is np.ndarray and batch["x"].shape == (4, 2)
    # a memory map stays a view of its file
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    ds = data.ArrayDataset({"x": mapped})
    assert type(ds["x"]) is np.ndarray and np.shares_memory(ds["x"], mapped)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in ds.batches(3)]), x)
    with pytest.raises(TypeError, match=r"field 'x' is a masked array.*x.filled\(value\)"):
        data.ArrayDataset({"x": np.ma.masked_array(x, mask=x > 5)})


def test_a_torch_tensor_is_read_as_numpy():
    # (its dtype, torch.float64, reached the input checks: "Cannot interpret 'torch.float64' as
    # a data type", naming no field)
    torch = pytest.importorskip("torch")
    ds = data.ArrayDataset({"x": torch.arange(6.0).reshape(3, 2), "y": torch.tensor([0, 1, 2])})
    assert type(ds["x"]) is np.ndarray and ds["x"].dtype == np.float32
    assert ds["y"].dtype == np.int64 and [b["y"].tolist() for b in ds.batches(2)] == [[0, 1], [2]]
    with pytest.raises(TypeError, match=r"field 'x' \(Tensor\) cannot be made a numpy array"):
        data.ArrayDataset({"x": torch.zeros(3, requires_grad=True)})


def test_batches_in_order_with_a_short_last_batch():
    ds = _dataset(10)
    batches = list(ds.batches(4))
    assert [b["y"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    np.testing.assert_array_equal(batches[2]["x"], [[16.0, 17.0], [18.0, 19.0]])
    assert ds.num_batches(4) == 3
    # Unshuffled batches are views of the stored arrays (no copy per step).
    assert np.shares_memory(batches[0]["x"], ds["x"])


def test_drop_last():
    ds = _dataset(10)
    assert [b["y"].tolist() for b in ds.batches(4, drop_last=True)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ds.num_batches(4, drop_last=True) == 2
    assert list(ds.batches(11, drop_last=True)) == []
    assert [len(b["y"]) for b in ds.batches(5, drop_last=True)] == [5, 5]


def test_shuffle_is_a_permutation_that_depends_only_on_seed_and_epoch():
    ds = _dataset(50)

    def order(**kw):
        return np.concatenate([b["y"] for b in ds.batches(8, shuffle=True, **kw)])

    a = order(seed=3, epoch=2)
    assert sorted(a.tolist()) == list(range(50)) and a.tolist() != list(range(50))
    np.testing.assert_array_equal(a, order(seed=3, epoch=2))  # reproducible (a resumed run)
    assert a.tolist() != order(seed=3, epoch=1).tolist()  # each epoch its own order
    assert a.tolist() != order(seed=4, epoch=2).tolist()  # each seed its own order
    np.testing.assert_array_equal(a, data.epoch_permutation(50, 3, 2))
    # Rows stay together across fields.
    for b in ds.batches(8, shuffle=True, seed=3, epoch=2):
        np.testing.assert_array_equal(b["x"][:, 0], 2.0 * b["y"])


def test_epoch_permutation_is_pinned():
    # The shuffled order of every run rests on it: a numpy (or code) change that alters it
    # breaks the docstring's promise that a resumed run sees the batches the first one would
    # have seen, and must be seen here first.
    assert data.epoch_permutation(10, 0, 0).tolist() == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    assert data.epoch_permutation(12, 7, 3).tolist() == [4, 2, 5, 8, 7, 3, 11, 10, 0, 1, 9, 6]
    assert data.epoch_permutation(0, 0, 0).tolist() == []


@pytest.mark.parametrize(
    ("num_rows", "error", "match"),
    [
        (-1, ValueError, "num_rows must be >= 0, got -1"),  # (was an empty order)
        (10.0, TypeError, "num_rows must be an int, got float 10.0"),  # (was numpy's AxisError)
        (True, TypeError, "num_rows must be an int, got bool True"),
    ],
)
def test_epoch_permutation_checks_num_rows(num_rows, error, match):
    with pytest.raises(error, match=match):
        data.epoch_permutation(num_rows, 0, 0)


def test_shuffle_does_not_touch_the_global_rng():
    state = np.random.get_state()[1].copy()
    list(_dataset(20).batches(4, shuffle=True, seed=1))
    np.testing.assert_array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize("bad", [0, -3])
def test_batch_size_must_be_positive(bad):
    with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {bad}"):
        list(_dataset().batches(bad))


def test_batch_size_must_be_an_int():
    with pytest.raises(TypeError, match="batch_size must be an int, got float 2.5"):
        list(_dataset().batches(2.5))


def test_negative_seed_or_epoch_is_an_error():
    with pytest.raises(ValueError, match="seed must be >= 0"):
        list(_dataset().batches(2, shuffle=True, seed=-1))
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        list(_dataset().batches(2, shuffle=True, epoch=-1))


@pytest.mark.parametrize(
    "call",
    [
        lambda ds: list(ds.batches(True)),
        lambda ds: ds.num_batches(np.True_),
        lambda ds: list(ds.batches(4, shuffle=True, seed=False)),
        lambda ds: data.split_microbatches(ds.take(slice(0, 4)), True),
    ],
)
def test_a_bool_is_not_a_count(call):
    # (operator.index takes a bool: fit(data, 5, True), meaning shuffle, trained batch_size=1)
    with pytest.raises(TypeError, match="must be an int, got bool"):
        call(_dataset())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shuffle": "no"}, "shuffle must be True or False, got str 'no'"),
        ({"drop_last": 1}, "drop_last must be True or False, got int 1"),
        ({"shuffle": None}, "shuffle must be True or False, got NoneType None"),
    ],
)
def test_shuffle_and_drop_last_must_be_bools(kwargs, match):
    # (shuffle="no" shuffled: any truthy value did)
    with pytest.raises(TypeError, match=match):
        list(_dataset().batches(4, **kwargs))
    assert len(list(_dataset().batches(4, shuffle=np.True_, drop_last=np.False_))) == 3


class _LazyRows:
    """Stands in for an h5py dataset: a numpy dtype, rows read on indexing, and an index array
    refused unless strictly increasing (h5py: "Indexing elements must be in increasing order")."""

    def __init__(self, array):
        self._array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads = 0

    def __getitem__(self, rows):
        if isinstance(rows, np.ndarray) and not (np.diff(rows) > 0).all():
            raise TypeError("Indexing elements must be in increasing order")
        self.reads += 1
        return self._array[rows]


class _LabelledRows:
    """Stands in for a pandas Series whose index labels are not 0..n-1 (after a shuffle or a
    split): an index array selects rows by label, a slice by position."""

    def __init__(self, array, labels):
        self._array, self._labels, self.shape, self.dtype = array, labels, array.shape, array.dtype
        self.iloc = array

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            return self._array[rows]
        where = {label: i for i, label in enumerate(self._labels)}
        return self._array[[where[r] for r in np.asarray(rows).tolist()]]

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)


def test_lazily_read_arrays_are_shuffled_row_by_row_like_numpy():
    # (shuffle=True failed on an h5py dataset, which ArrayDataset keeps unread: h5py refuses
    # an index array that is not increasing)
    plain = _dataset(23)
    lazy = data.ArrayDataset({"x": _LazyRows(plain["x"]), "y": plain["y"]})
    want = list(plain.batches(5, shuffle=True, seed=2, epoch=1))
    got = list(lazy.batches(5, shuffle=True, seed=2, epoch=1))
    for w, g in zip(want, got, strict=True):
        assert type(g["x"]) is np.ndarray
        np.testing.assert_array_equal(g["x"], w["x"])
        np.testing.assert_array_equal(g["y"], w["y"])
    assert lazy["x"].reads == 5  # one read a batch, not one a row
    np.testing.assert_array_equal(lazy.take(np.array([3, -1, 3]))["x"], plain["x"][[3, 22, 3]])


def test_lazily_read_rows_are_taken_as_numpy_takes_them():
    # (an out-of-range negative row wrapped once to a valid one: take([-24]) of 23 rows read row
    # 22; take([]) asked the field for a float index array, which it refused)
    plain = _dataset(23)
    lazy = data.ArrayDataset({"x": _LazyRows(plain["x"])})
    for rows in ([], np.array([], dtype=np.int64), np.zeros(23, bool), np.zeros((0, 2), int)):
        got = lazy.take(rows)["x"]
        assert type(got) is np.ndarray and got.dtype == plain["x"].dtype
        np.testing.assert_array_equal(got, plain.take(rows)["x"], strict=True)
    assert lazy["x"].reads == 0  # nothing to read
    for rows, bad in (([-24], -24), ([0, 23], 23), (np.array([[1], [-30]]), -30)):
        with pytest.raises(IndexError, match=f"index {bad} is out of bounds for axis 0 with size"):
            plain.take(rows)
        with pytest.raises(IndexError, match=rf"index {bad} is out of bounds .* 23 rows"):
            lazy.take(rows)
    with pytest.raises(IndexError, match=r"boolean index did not match .* 23 rows.*\(5,\)"):
        lazy.take(np.ones(5, bool))
    with pytest.raises(IndexError, match="must be of integer .* float64"):
        lazy.take(np.array([1.0]))
    np.testing.assert_array_equal(lazy.take([-23, 22])["x"], plain["x"][[0, 22]])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_from_a_later_batch_read_none_of_the_ones_before(shuffle, drop_last):
    # (a fit resuming near an epoch's end took, and threw away, every batch before: the
    # whole epoch read again from an h5py file)
    plain = _dataset(23)
    every = list(plain.batches(5, shuffle=shuffle, seed=2, epoch=1, drop_last=drop_last))
    for start in range(len(every) + 2):
        lazy = data.ArrayDataset({"x": _LazyRows(plain["x"]), "y": plain["y"]})
        got = list(
            lazy.batches(5, shuffle=shuffle, seed=2, epoch=1, drop_last=drop_last, start=start)
        )
        assert len(got) == max(0, len(every) - start)
        for w, g in zip(every[start:], got, strict=True):
            np.testing.assert_array_equal(g["x"], w["x"])
            np.testing.assert_array_equal(g["y"], w["y"])
        assert lazy["x"].reads == len(got)  # only the batches yielded were read
    with pytest.raises(TypeError, match="start must be an int, got bool True"):
        list(plain.batches(5, start=True))
    with pytest.raises(ValueError, match="start must be >= 0, got -1"):
        list(plain.batches(5, start=-1))


class _ArrayLike:
    """What slicing an xarray DataArray or a dask array gives: not an ndarray, readable as one."""

    def __init__(self, array):
        self._array = array

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)


class _LazyOwnType(_LazyRows):
    def __getitem__(self, rows):
        return _ArrayLike(super().__getitem__(rows))


@pytest.mark.parametrize("shuffle", [False, True])
def test_lazily_read_arrays_come_back_as_numpy_in_order_too(shuffle):
    # (only shuffled batches were made numpy: in storage order a batch was the array type's own
    # slice, a lazy dask array or a named-axis DataArray, handed to the actors as it was)
    plain = _dataset(11)
    lazy = data.ArrayDataset({"x": _LazyOwnType(plain["x"]), "y": plain["y"]})
    got = list(lazy.batches(4, shuffle=shuffle, seed=1))
    for w, g in zip(plain.batches(4, shuffle=shuffle, seed=1), got, strict=True):
        assert type(g["x"]) is np.ndarray
        np.testing.assert_array_equal(g["x"], w["x"])


def test_a_label_indexed_series_is_read_by_position():
    # (a pandas Series was kept as it came: a shuffled batch took its rows by index label,
    # other rows than the x of the same batch, silently)
    plain = _dataset(12)
    labels = np.random.default_rng(0).permutation(12)
    ds = data.ArrayDataset({"x": plain["x"], "y": _LabelledRows(plain["y"], labels)})
    assert type(ds["y"]) is np.ndarray
    for b in ds.batches(5, shuffle=True, seed=1):
        np.testing.assert_array_equal(b["x"][:, 0], 2.0 * b["y"])


@pytest.mark.parametrize("package", ["h5py", "pandas"])
def test_real_lazy_and_labelled_arrays_shuffle_like_numpy(package, tmp_path):
    module = pytest.importorskip(package)
    plain = _dataset(23)
    if package == "h5py":
        with module.File(tmp_path / "d.h5", "w") as f:
            f["x"] = plain["x"]
        file = module.File(tmp_path / "d.h5", "r")
        fields = {"x": file["x"], "y": plain["y"]}
    else:
        order = np.random.default_rng(0).permutation(23)  # as after a split: labels shuffled
        frame = module.DataFrame({"a": plain["x"][:, 0], "y": plain["y"]}).iloc[order]
        fields = {"x": frame[["a"]], "y": frame["y"]}
        plain = data.ArrayDataset({"x": plain["x"][order, :1], "y": plain["y"][order]})
    got = list(data.ArrayDataset(fields).batches(5, shuffle=True, seed=3))
    for w, g in zip(plain.batches(5, shuffle=True, seed=3), got, strict=True):
        np.testing.assert_array_equal(g["x"], w["x"])
        np.testing.assert_array_equal(g["y"], w["y"])


def test_a_dataset_of_a_dataset_shares_its_arrays():
    ds = _dataset()
    again = data.ArrayDataset(ds)
    assert again.keys() == ds.keys() and again["x"] is ds["x"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda tr, d: tr.predict(d["x"]), r"predict takes a dict .* \{'x': x\}; got ndarray"),
        (
            lambda tr, d: tr.evaluate((d["x"], d["y"])),
            r"evaluate takes a dict .* \{'x': x, 'y': y\}; got tuple",
        ),
        (
            lambda tr, d: tr.fit(d, batch_size=4, validation_data=(d["x"], d["y"])),
            r"validation_data takes a dict .* \{'x': x, 'y': y\}; got tuple",
        ),
        (lambda tr, d: tr.fit(d, 5, True), "batch_size must be an int, got bool True"),
    ],
)
def test_what_the_trainer_reads_is_checked_naming_the_argument(call, match):
    # (an array or an (x, y) tuple, as Keras takes, failed with numpy's "The truth value of an
    # array with more than one element is ambiguous")
    import asyncnn as ann
    from asyncnn import optim, policies

    from _reference import chain_graph

    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    rng = np.random.default_rng(0)
    d = {"x": rng.standard_normal((8, 5)), "y": rng.integers(0, 3, 8)}
    with pytest.raises(TypeError, match=match):
        call(tr, d)
    assert tr.versions == {"stage0": 0, "stage1": 0}


# -- microbatches ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "m"), [(10, 1), (10, 3), (10, 4), (10, 10), (7, 2), (32, 5)])
def test_microbatches_split_like_array_split(n, m):
    batch = {"x": np.arange(n * 3).reshape(n, 3), "y": np.arange(n)}
    micro = data.split_microbatches(batch, m)
    assert len(micro) == m
    for key in batch:
        expected = np.array_split(batch[key], m)
        for got, want in zip(micro, expected, strict=True):
            np.testing.assert_array_equal(got[key], want)
    # Hand-checked: 10 rows into 4 gives 3, 3, 2, 2.
    if (n, m) == (10, 4):
        assert [len(mb["y"]) for mb in micro] == [3, 3, 2, 2]


def test_microbatch_errors():
    batch = {"x": np.zeros((4, 2)), "y": np.zeros(4)}
    with pytest.raises(ValueError, match="batch of 4 rows into 5 microbatches"):
        data.split_microbatches(batch, 5)
    with pytest.raises(ValueError, match=r"m \(the number of microbatches\) must be >= 1"):
        data.split_microbatches(batch, 0)
    with pytest.raises(ValueError, match="field 'y' has 3 rows"):
        data.split_microbatches({"x": np.zeros((4, 2)), "y": np.zeros(3)}, 2)
    # (the advice was "use at most 0 microbatches")
    with pytest.raises(ValueError, match=r"batch of 0 rows \(fields 'x', 'y'\) into microbatches"):
        data.split_microbatches({"x": np.zeros((0, 2)), "y": np.zeros(0)}, 1)


def test_batch_length():
    assert data.batch_length({"a": np.zeros((5, 2)), "b": np.zeros(5)}) == 5


def test_importing_data_loads_no_dataset_packages():
    # mnist1d pulls in matplotlib and sklearn is slow to import: both wait until first used.
    code = (
        "import sys, asyncnn.data; "
        "print(sorted(m for m in ('mnist1d', 'matplotlib', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- MNIST-1D -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    return data.load_mnist1d(cache_dir=tmp_path_factory.mktemp("cache"))


def test_mnist1d_shapes_dtypes_and_labels(mnist1d):
    assert set(mnist1d) == {"x_train", "y_train", "x_test", "y_test"}
    assert mnist1d["x_train"].shape == (4000, 40) and mnist1d["x_train"].dtype == np.float32
    assert mnist1d["x_test"].shape == (1000, 40) and mnist1d["x_test"].dtype == np.float32
    assert mnist1d["y_train"].shape == (4000,) and mnist1d["y_train"].dtype == np.int64
    assert mnist1d["y_test"].shape == (1000,) and mnist1d["y_test"].dtype == np.int64
    y = np.concatenate([mnist1d["y_train"], mnist1d["y_test"]])
    # 500 examples of each digit overall, shuffled between the splits.
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 500))
    assert set(np.unique(mnist1d["y_test"])) == set(range(10))
    x = np.concatenate([mnist1d["x_train"], mnist1d["x_test"]])
    assert np.isfinite(x).all()
    # make_dataset standardizes the whole set.
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3


def test_mnist1d_leaves_the_global_rngs_alone(tmp_path):
    np.random.seed(123)
    random.seed(456)
    expected_np = np.random.get_state()[1].copy()
    expected_py = random.getstate()
    data.load_mnist1d(num_samples=100, seed=7, cache=False)
    np.testing.assert_array_equal(np.random.get_state()[1], expected_np)
    assert random.getstate() == expected_py
    # ...and so the next draws are the ones the user's seed promised.
    np.random.seed(123)
    first = np.random.random(3)
    np.random.seed(123)
    data.load_mnist1d(num_samples=100, seed=8, cache=False)
    np.testing.assert_array_equal(np.random.random(3), first)


def test_mnist1d_is_deterministic_and_cached_on_disk(tmp_path):
    a = data.load_mnist1d(num_samples=200, seed=5, cache_dir=tmp_path)
    files = list(tmp_path.glob("mnist1d-*-n200-*seed5.npz"))
    assert len(files) == 1
    _datasets._mnist1d_cached.cache_clear()  # force a read from disk
    b = data.load_mnist1d(num_samples=200, seed=5, cache_dir=tmp_path)
    c = data.load_mnist1d(num_samples=200, seed=5, cache=False)  # regenerated from scratch
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])
    assert a["x_train"].shape == (160, 40)
    d = data.load_mnist1d(num_samples=200, seed=6, cache=False)
    assert not np.array_equal(a["x_train"], d["x_train"])


def test_mnist1d_returns_copies(tmp_path):
    a = data.load_mnist1d(num_samples=100, seed=1, cache=False)
    a["x_train"][:] = 0.0
    b = data.load_mnist1d(num_samples=100, seed=1, cache=False)
    assert np.abs(b["x_train"]).sum() > 0


def test_mnist1d_damaged_cache_file_is_regenerated(tmp_path):
    a = data.load_mnist1d(num_samples=100, seed=2, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not a zip file")
    _datasets._mnist1d_cached.cache_clear()
    b = data.load_mnist1d(num_samples=100, seed=2, cache_dir=tmp_path)
    np.testing.assert_array_equal(a["x_test"], b["x_test"])


def _write_npy(path):
    with path.open("wb") as f:  # (np.save would add ".npy" to the name)
        np.save(f, np.zeros(3))


def _write_foreign_npz(path):
    # a whole, readable file under the cache's name holding other arrays than load_mnist1d's
    np.savez(path, x_train=np.zeros((3, 40), np.float32), y_train=np.zeros(3, np.int64),
             x_test=np.zeros((1, 40), np.float32), y_test=np.array([55]))  # fmt: skip


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b""),  # (EOFError from np.load)
        _write_npy,  # (TypeError: np.load gave an ndarray, not an npz file)
        _write_foreign_npz,  # (was handed out as the dataset: 3 rows, a label 55)
    ],
    ids=["empty", "npy", "other-arrays"],
)
def test_mnist1d_unreadable_or_foreign_cache_file_is_regenerated(tmp_path, damage):
    a = data.load_mnist1d(num_samples=100, seed=2, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    damage(path)
    _datasets._mnist1d_cached.cache_clear()
    b = data.load_mnist1d(num_samples=100, seed=2, cache_dir=tmp_path)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    _datasets._mnist1d_cached.cache_clear()  # the file was written over with the right arrays
    assert _datasets._read_npz(path, 80, 20) is not None


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt, OSError, ValueError], ids=["ctrl-c", "oserror", "valueerror"]
)
def test_mnist1d_cache_write_cut_off_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    # (Ctrl-C while np.savez wrote left NAME.npz.<pid>.<tid>.tmp in the cache for good: only an
    # OSError removed it) a disk error stays silent (the next process regenerates); others go on
    def cut_off(f, **arrays):
        f.write(b"PK\x03\x04partial")
        raise error("cut off")

    monkeypatch.setattr(_datasets.np, "savez", cut_off)
    path = tmp_path / "c" / "x.npz"
    if error is OSError:
        _datasets._write_npz(path, {"a": np.zeros(3)})
    else:
        with pytest.raises(error, match="cut off"):
            _datasets._write_npz(path, {"a": np.zeros(3)})
    assert list(path.parent.iterdir()) == []


def test_mnist1d_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYNCNN_CACHE_DIR", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ASYNCNN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "asyncnn"
    # a relative XDG_CACHE_HOME is ignored, as the XDG specification says (it was used: the
    # cache went under the current folder)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "asyncnn"


def test_mnist1d_argument_errors():
    with pytest.raises(ValueError, match="multiple of 10"):
        data.load_mnist1d(num_samples=55, cache=False)
    for split in (1.0, float("nan"), float("inf"), float("-inf")):  # (nan, inf: int() failed)
        with pytest.raises(ValueError, match=f"train_split={split} leaves an empty split"):
            data.load_mnist1d(train_split=split, cache=False)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        data.load_mnist1d(seed=-1, cache=False)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        data.load_mnist1d(seed=2**32, cache=False)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: data.load_mnist1d(seed=True, cache=False), "seed must be an int, got bool True"),
        (lambda: data.load_mnist1d(num_samples=100, cache="no"), "cache must be True or False"),
        (lambda: data.load_mnist1d(num_samples=10.0), "num_samples must be an int, got float"),
        (lambda: data.load_digits(stratify="no"), "stratify must be True or False, got str"),
        (lambda: data.load_digits(seed=False), "seed must be an int, got bool False"),
    ],
    ids=["mnist1d-seed", "mnist1d-cache", "mnist1d-num_samples", "digits-stratify", "digits-seed"],
)
def test_dataset_loaders_take_no_bool_for_a_count_nor_a_string_for_a_flag(call, match):
    # (seed=True loaded seed 1's data; stratify="no" and cache="no" did as True)
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: data.load_digits(test_fraction=None), "test_fraction must be a real number, got None"),
        (lambda: data.load_digits(test_fraction="0.3"), "test_fraction must be a real number, got '0.3'"),
        (lambda: data.load_digits(test_fraction=True), "test_fraction must be a real number, got True"),
        (lambda: data.load_mnist1d(train_split=None, cache=False), "train_split must be a real number, got None"),
        (lambda: data.load_mnist1d(train_split="0.8", cache=False), "train_split must be a real number, got '0.8'"),
    ],
    ids=["digits-None", "digits-str", "digits-bool", "mnist1d-None", "mnist1d-str"],
)  # fmt: skip
def test_dataset_loaders_take_a_real_number_for_a_fraction(call, match):
    # (None failed in float() with a message naming no argument; a string was parsed)
    with pytest.raises(TypeError, match=match):
        call()


# -- digits ---------------------------------------------------------------------------------------
def test_digits_shapes_scale_and_stratified_split():
    d = data.load_digits()
    assert d["x_train"].shape == (1438, 64) and d["x_test"].shape == (359, 64)
    assert d["x_train"].dtype == np.float32 and d["y_train"].dtype == np.int64
    x = np.concatenate([d["x_train"], d["x_test"]])
    assert x.min() == 0.0 and x.max() == 1.0
    counts_test = np.bincount(d["y_test"], minlength=10)
    counts_all = np.bincount(np.concatenate([d["y_train"], d["y_test"]]))
    assert counts_all.sum() == 1797 and set(np.unique(d["y_train"])) == set(range(10))
    # Stratified: each class holds out round(20%) of its examples.
    np.testing.assert_array_equal(counts_test, np.round(0.2 * counts_all).astype(int))
    # Train and test together are exactly the original rows, each once.
    from sklearn.datasets import load_digits as sk_load_digits

    original = sorted(r.tobytes() for r in (sk_load_digits().data / 16.0).astype(np.float32))
    assert sorted(r.tobytes() for r in x) == original


def test_digits_split_is_seeded():
    a, b, c = data.load_digits(seed=1), data.load_digits(seed=1), data.load_digits(seed=2)
    np.testing.assert_array_equal(a["y_test"], b["y_test"])
    np.testing.assert_array_equal(a["x_train"], b["x_train"])
    assert not np.array_equal(a["x_train"], c["x_train"])


def test_digits_plain_split_and_errors():
    d = data.load_digits(test_fraction=0.5, stratify=False)
    assert len(d["y_test"]) == 898 and len(d["y_train"]) == 899
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        data.load_digits(test_fraction=0.0)
