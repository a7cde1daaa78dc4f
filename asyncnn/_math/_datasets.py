"""Small real datasets generated or read locally: MNIST-1D and scikit-learn's digits.

Nothing here touches the network. MNIST-1D is generated with the ``mnist1d`` package's
``make_dataset`` (never its ``get_dataset``, which downloads); scikit-learn's digits ship with it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import random
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ._data import _check_flag, _check_index
from ._optim_checks import _real

__all__ = ["default_cache_dir", "load_digits", "load_mnist1d"]

# make_dataset reseeds numpy's and python's global RNGs; we restore them afterwards, and this lock
# keeps two of our own generations from interleaving their save/restore.
_global_rng_lock = threading.Lock()

# Bump when the cached file layout or the dtype conversion changes, so stale files are ignored.
_CACHE_FORMAT = 1
_SPLITS = ("x_train", "y_train", "x_test", "y_test")
_SEQ_LENGTH = 40  # make_dataset's default final_seq_length, which load_mnist1d always uses


def default_cache_dir() -> Path:
    """Where generated datasets are cached on disk.

    ``$ASYNCNN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/asyncnn`` where that is an absolute
    path (the XDG specification says to ignore a relative one), else ``~/.cache/asyncnn``.
    """
    env = os.environ.get("ASYNCNN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or ".").expanduser()
    # (a relative one would put the cache under whatever folder the process started in)
    base = xdg if xdg.is_absolute() else Path.home() / ".cache"
    return base / "asyncnn"


def _copy(arrays: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    # The cached arrays are shared between calls: hand out copies so a caller normalizing its
    # data in place cannot change what the next caller gets.
    return {k: v.copy() for k, v in arrays.items()}


def _generate_mnist1d(num_samples: int, train_split: float, seed: int) -> dict[str, Any]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_split
    args.seed = seed
    with _global_rng_lock:
        np_state = np.random.get_state()
        py_state = random.getstate()
        try:
            raw = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    return {
        "x_train": np.ascontiguousarray(raw["x"], dtype=np.float32),
        "y_train": np.ascontiguousarray(raw["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(raw["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(raw["y_test"], dtype=np.int64),
    }


def _mnist1d_cache_file(cache_dir: Path, num_samples: int, train_split: float, seed: int) -> Path:
    version = importlib.metadata.version("mnist1d")
    name = f"mnist1d-{version}-f{_CACHE_FORMAT}-n{num_samples}-split{train_split!r}-seed{seed}.npz"
    return cache_dir / name


def _read_npz(path: Path, n_train: int, n_test: int) -> dict[str, np.ndarray[Any, Any]] | None:
    """The cached splits at ``path``, or None where the file is missing, damaged or not what
    this call would generate (the caller then regenerates and overwrites it)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        # (an empty file, which a crash soon after the rename can leave, raised EOFError here)
        return None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return None  # a lone .npy array (np.load has no file left open for it)
    try:
        with loaded as f:
            arrays = {k: f[k] for k in _SPLITS}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error):
        return None
    return arrays if _is_mnist1d(arrays, n_train, n_test) else None


def _is_mnist1d(arrays: dict[str, np.ndarray[Any, Any]], n_train: int, n_test: int) -> bool:
    """Whether ``arrays`` have the shapes, dtypes and label range :func:`load_mnist1d` returns
    (a whole file of other content, copied or written over the name, is never handed out)."""
    for split, rows in (("train", n_train), ("test", n_test)):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape != (rows, _SEQ_LENGTH) or x.dtype != np.float32 or not np.isfinite(x).all():
            return False
        if y.shape != (rows,) or y.dtype != np.int64 or y.min() < 0 or y.max() > 9:
            return False
    return True


def _write_npz(path: Path, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    # Write to a private name, then rename: a reader never sees half a file, and two processes
    # generating at once each rename a whole one.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
        os.replace(tmp, path)
    except BaseException as exc:
        # removed whatever stopped the write (Ctrl-C too): no later run would, its name holding
        # this process's pid
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        # A read-only or full disk only costs the next process a regeneration; the rest goes on.
        if not isinstance(exc, OSError):
            raise


@functools.lru_cache(maxsize=8)
def _mnist1d_cached(
    num_samples: int, train_split: float, seed: int, cache_dir: str | None
) -> dict[str, np.ndarray[Any, Any]]:
    path = None
    if cache_dir is not None:
        path = _mnist1d_cache_file(Path(cache_dir), num_samples, train_split, seed)
        n_train = int(num_samples * train_split)  # (as make_dataset splits)
        arrays = _read_npz(path, n_train, num_samples - n_train)
        if arrays is not None:
            return arrays
    arrays = _generate_mnist1d(num_samples, train_split, seed)
    if path is not None:
        _write_npz(path, arrays)
    return arrays


def load_mnist1d(
    num_samples: int = 5000,
    train_split: float = 0.8,
    seed: int = 42,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray[Any, Any]]:
    """The MNIST-1D dataset (Greydanus, 2020), generated locally.

    The defaults reproduce the published dataset: 4,000 training and 1,000 test sequences of
    length 40, ten balanced classes. Generation runs ``mnist1d.data.make_dataset`` with its
    default arguments and leaves numpy's and python's global random state as it found them.
    Results are cached in memory, and on disk as ``.npz`` unless ``cache=False`` (generating
    takes about two seconds including the import of ``mnist1d``; reading the cache, milliseconds).
    A cache file that cannot be read, or whose arrays are not those this call returns (shapes,
    dtypes, finite values, labels ``0..9``), is regenerated and written over.

    Args:
        num_samples: total number of examples, a positive multiple of 10 (one tenth per class).
        train_split: fraction of examples in the training split, in (0, 1).
        seed: the generator's seed.
        cache: read and write the on-disk cache.
        cache_dir: the cache folder; by default :func:`default_cache_dir`.

    Returns:
        ``{"x_train": float32 (n_train, 40), "y_train": int64 (n_train,), "x_test": float32
        (n_test, 40), "y_test": int64 (n_test,)}``, labels in ``0..9``; fresh copies each call.

    Raises:
        TypeError: ``num_samples`` or ``seed`` is not an int (a bool is not one either),
            ``train_split`` is not a real number, or ``cache`` is not a bool.
        ValueError: an argument is out of its range (named, with the value).
    """
    # (a bool was read as 0 or 1: seed=True gave seed 1's data; cache="no" cached)
    num_samples = _check_index(num_samples, "num_samples", 0)
    cache = _check_flag(cache, "cache")
    if num_samples < 10 or num_samples % 10:
        raise ValueError(
            f"num_samples must be a positive multiple of 10 (one tenth per digit), got {num_samples}"
        )
    # (None failed in float() naming no argument; a string was parsed)
    train_split = _real("load_mnist1d", "train_split", train_split)
    # (a NaN or an inf failed in int() below with a message naming neither)
    split_ix = int(num_samples * train_split) if 0.0 < train_split < 1.0 else 0
    if not 0 < split_ix < num_samples:
        raise ValueError(
            f"train_split={train_split} leaves an empty split of {num_samples} samples; "
            "choose a fraction strictly between 0 and 1"
        )
    seed = _check_index(seed, "seed", 0)
    if seed >= 2**32:
        raise ValueError(f"seed must be in [0, 2**32) (numpy's legacy seeding), got {seed}")
    folder = None
    if cache:
        folder = str(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
    return _copy(_mnist1d_cached(num_samples, train_split, seed, folder))


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    # Pixels are integers 0..16: scale to [0, 1].
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y


def load_digits(
    test_fraction: float = 0.2, seed: int = 0, stratify: bool = True
) -> dict[str, np.ndarray[Any, Any]]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, bundled; no download).

    Args:
        test_fraction: fraction of examples held out for testing, in (0, 1).
        seed: seed of the split (a numpy ``default_rng``).
        stratify: hold out ``round(test_fraction * count)`` examples of each class, so both
            splits have the class proportions of the whole; otherwise a plain random split.

    Returns:
        ``{"x_train": float32 (n_train, 64) in [0, 1], "y_train": int64 (n_train,), "x_test",
        "y_test"}``, labels in ``0..9``; rows in shuffled order.

    Raises:
        TypeError: ``test_fraction`` is not a real number, ``seed`` is not an int (a bool is
            not one either), or ``stratify`` is not a bool.
        ValueError: ``test_fraction`` is not strictly between 0 and 1, or leaves a split empty.
    """
    # (None failed in float() naming no argument; a string was parsed)
    test_fraction = _real("load_digits", "test_fraction", test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    seed = _check_index(seed, "seed", 0)
    stratify = _check_flag(stratify, "stratify")  # ("no" stratified)
    x, y = _digits_raw()
    rng = np.random.default_rng(seed)
    if stratify:
        test_parts = []
        for label in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == label))
            test_parts.append(rows[: int(round(test_fraction * len(rows)))])
        is_test = np.zeros(len(y), dtype=bool)
        is_test[np.concatenate(test_parts)] = True
        # Shuffle each split so classes are interleaved, not in blocks.
        test_rows = rng.permutation(np.flatnonzero(is_test))
        train_rows = rng.permutation(np.flatnonzero(~is_test))
    else:
        order = rng.permutation(len(y))
        n_test = int(round(test_fraction * len(y)))
        test_rows, train_rows = order[:n_test], order[n_test:]
    if len(test_rows) == 0 or len(train_rows) == 0:
        raise ValueError(f"test_fraction={test_fraction} leaves an empty split")
    return {
        "x_train": x[train_rows],
        "y_train": y[train_rows],
        "x_test": x[test_rows],
        "y_test": y[test_rows],
    }
