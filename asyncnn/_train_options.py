"""The run options of a :class:`~asyncnn.Trainer` as its attributes (``seed``, ``trace``...,
read from and written to its :class:`RunConfig`, checked as a new config is), the check of a
trace path made when it is given, and the allocator's tuning, once per process. Apart from
``_train.py`` because none of it is training: it is what the constructor and the attributes
check and set up."""

from __future__ import annotations

import errno
import os
from typing import Any

from ._runtime._checks import check_cuda_graphs
from ._runtime._recorder import trace_path_error
from .backends import tune_allocator


class _Option:
    """A :class:`Trainer` attribute kept in its :class:`RunConfig` (reads and writes go there,
    checked as a new config is)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.config, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.config = obj.config.replace(**{self.name: value})


class _TraceOption(_Option):
    """:attr:`Trainer.trace`: a path checked before it is set (see :func:`_check_trace_path`)."""

    def __set__(self, obj: Any, value: Any) -> None:
        config = obj.config.replace(trace=value)
        _check_trace_path(config.trace)
        obj.config = config


class _CudaGraphsOption(_Option):
    """:attr:`Trainer.cuda_graphs`: ``True`` refused on a trainer with a cluster, at once, as
    the constructor refuses it (else only the next fit would)."""

    def __set__(self, obj: Any, value: Any) -> None:
        config = obj.config.replace(cuda_graphs=value)
        check_cuda_graphs(config.cuda_graphs, getattr(obj, "cluster", None))
        obj.config = config


def _check_trace_path(path: str | None) -> None:
    """Refuses a trace path that the recorder could not open when a ``fit`` starts, with the
    recorder's words and exception classes (``_recorder.trace_path_error``; an empty path
    ``RunConfig`` refuses before), so that the mistake shows where it was made rather than at
    the first fit. The file itself is left alone: the
    recorder creates or empties it at the fit. Later fits' traces (``NAME.1.EXT``...) go in the
    same folder.

    Raises:
        FileNotFoundError: its folder does not exist.
        NotADirectoryError: its folder is a file.
        IsADirectoryError: the path is a folder (or ends with a separator).
    """
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or path.endswith((os.sep, "/")):
        error: type[OSError] = IsADirectoryError
        code = errno.EISDIR
        why = (
            "it is a folder" if os.path.isdir(path) else "it names a folder (a trailing separator)"
        )
    elif os.path.isdir(folder):
        return
    elif os.path.exists(folder):
        error, code, why = NotADirectoryError, errno.ENOTDIR, f"its folder {folder!r} is a file"
    else:
        error, code = FileNotFoundError, errno.ENOENT
        why = f"its folder {folder!r} does not exist"
    raise trace_path_error(error, code, path, why)


_allocator_tuned = False


def _tune_allocator() -> None:
    global _allocator_tuned
    if not _allocator_tuned:
        tune_allocator()
        _allocator_tuned = True
