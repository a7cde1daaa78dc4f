"""safetensors files of numpy arrays: :func:`load_safetensors` (bfloat16 entries only with
``ml_dtypes``, named otherwise) and :func:`save_safetensors` (written whole or not at all).
Apart from ``_interop.py``, which maps weights to and from torch's names, because it is one
file format's reading and writing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._interop import _as_numpy
from .backends import BFLOAT16
from .backends._registry import host_array

__all__ = ["load_safetensors", "save_safetensors"]


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (one torch wrote too) as numpy arrays.

    Raises:
        FileNotFoundError: no such file. ValueError: not a safetensors file (naming it).
        TypeError: a bfloat16 entry without the ``ml_dtypes`` package, which numpy needs to
            hold one (naming the entries).
    """
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    if BFLOAT16 is None:  # (safetensors would call the whole file unreadable)
        bf16 = _bfloat16_entries(path)
        if bf16:
            names = ", ".join(repr(k) for k in bf16[:5]) + (", ..." if len(bf16) > 5 else "")
            what = f"entry {names} is" if len(bf16) == 1 else f"entries {names} are"
            raise TypeError(
                f"{path}: {what} bfloat16: numpy holds bfloat16 only with the "
                "ml_dtypes package installed (pip install ml_dtypes); or read the file with "
                "safetensors.torch.load_file and convert it first with .float()"
            )
    try:
        return dict(load_file(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def _bfloat16_entries(path: str) -> list[str]:
    """The names of a safetensors file's bfloat16 entries, read from its header by safetensors
    (no tensor is read); none for a file whose header cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            return [k for k in f.keys() if f.get_slice(k).get_dtype() == "BF16"]
    except Exception:  # noqa: BLE001 - safetensors' own errors: load_file names what is wrong
        return []


def save_safetensors(arrays: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes ``{name: array}`` (e.g. :func:`to_torch`'s) as a safetensors file, which
    ``safetensors.torch.load_file`` reads back as tensors, of their shapes (0-d ones too).

    The file is written whole or not at all: beside ``path``, then renamed into place. It gets
    the mode a file made by ``open()`` gets (0o666 less the umask), not the 0600 of the
    temporary file safetensors writes through.

    Raises:
        TypeError: ``arrays`` not a mapping, a name that is not a str, or an entry that is no
            array of numbers (a nested pytree such as ``tr.params``, None, strings), naming
            it; nothing is written then.
        OSError: the disk refused the file (a full disk, a missing or read-only folder),
            naming ``path``; a file there before is left as it was.
    """
    from safetensors.numpy import save_file

    from ._checkpoint_files import give_open_mode, naming_safetensors, write_failed

    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"save_safetensors takes a mapping {{name: array}}, got {type(arrays).__name__}"
        )
    entries = {k: _file_array(k, v) for k, v in arrays.items()}
    path = os.fspath(path)
    target = os.path.realpath(path)  # (a symlink's file is replaced, as it was written through)
    tmp = f"{target}.{os.getpid()}.tmp"
    hint = f"; {path} is left as it was"
    try:
        # (safetensors' error of a full disk is no OSError and names no file)
        with naming_safetensors(path, hint):
            save_file(entries, tmp)
        give_open_mode(tmp)  # (safetensors made it 0600: others could not read it)
        try:
            os.replace(tmp, target)
        except OSError as exc:  # (it names the temporary file)
            raise write_failed(exc.errno, exc.strerror or str(exc), path, hint) from exc
    except BaseException:  # a full disk, Ctrl-C: no cut-off file is left beside it
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _file_array(key: Any, value: Any) -> np.ndarray:
    """One entry of :func:`save_safetensors` as a C-ordered host array of its own shape."""
    if not isinstance(key, str):
        raise TypeError(
            f"save_safetensors: the name {key!r} is not a str ({type(key).__name__}); a "
            "safetensors file names its entries with strings"
        )
    flatten = (
        "a safetensors file holds a flat {name: array}; flatten a trainer's params with "
        "interop.to_torch(tr.params, tr.graph) first"
    )
    if value is None or isinstance(value, Mapping):
        what = "None" if value is None else f"a {type(value).__name__} (a nested pytree)"
        raise TypeError(f"save_safetensors: entry {key!r} is {what}, not an array; {flatten}")
    try:
        arr = host_array(_as_numpy(value, f"entry {key!r}"))  # (a 0-d array stays 0-d)
    except ValueError as exc:  # numpy: a ragged list
        raise TypeError(
            f"save_safetensors: entry {key!r}, a {type(value).__name__}, is not an array ({exc}); "
            f"{flatten}"
        ) from exc
    # (no safetensors dtype; ml_dtypes' bfloat16 is of kind "V" too, but no np.void)
    if arr.dtype.kind in "OSUmM" or arr.dtype.type is np.void:
        raise TypeError(
            f"save_safetensors: entry {key!r} is a {type(value).__name__} that makes a numpy "
            f"array of dtype {arr.dtype}, not one of numbers; {flatten}"
        )
    return arr
