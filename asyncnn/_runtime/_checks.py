"""Checks of what a run is given, before compute: a batch against the graph's inputs (names,
shapes, dtypes; NaN, Inf and values that overflow the run's dtype, read in chunks of rows), the
ids, labels and loop lengths it holds against their range (:func:`range_checks`), a tree of
arrays for NaN (:func:`first_not_finite`), the run's optimizer and ``cuda_graphs``, and the
numbers, flags and orders a policy's hooks return (:func:`checked_scale`,
:func:`checked_flag`, :func:`checked_orders`). The
check of the graph itself, :func:`validate`, is ``_graph_checks.py``'s (imported from here too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._math._data import has_numpy_dtype
from asyncnn._math._ops_nn import id_range
from asyncnn.backends import array_namespace, is_cupy_array, is_floating, to_numpy

# (the graph's check, also named here: the runtime, the trainer and the cluster import it so)
from ._graph_checks import _rows as _rows
from ._graph_checks import check_layer_rows, validate
from ._policies import is_stage_order

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node

__all__ = [
    "RangeCheck",
    "check_batch",
    "checked_flag",
    "checked_orders",
    "checked_scale",
    "check_cuda_graphs",
    "check_input",
    "check_layer_rows",
    "check_ranges",
    "first_not_finite",
    "range_checks",
    "upstream",
    "validate",
]


def _checkable(dtype: Any) -> bool:
    # floats, bfloat16 (a numpy extension dtype, kind "V") and complex numbers can hold NaN
    return dtype.kind == "c" or is_floating(dtype)


def check_cuda_graphs(cuda_graphs: bool | None, cluster: Any) -> None:
    """Checks that ``cuda_graphs`` (as :class:`RunConfig` checked it) goes with the run's
    placement.

    Raises:
        ValueError: ``cuda_graphs=True`` with a ``cluster`` (graphs need one process).
    """
    if cuda_graphs is True and cluster is not None:
        raise ValueError(
            "cuda_graphs=True needs the actors in this process: pass cluster=None, or leave "
            "cuda_graphs at its default (None) or False with a cluster, whose workers run eagerly"
        )


def check_input(node: Node, arr: Any, prefix: str = "") -> tuple[int, ...]:
    """Checks one array against its input node's declared shape and dtype; returns its shape.

    Raises:
        ValueError: naming the input (after ``prefix``, such as ``"predict: "``) and what was
            wrong with it.
        TypeError: naming an input that is not an array (a list, say).
    """
    name = node.name
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
        # a list's shape would read as () and its dtype as float64: say what it is instead
        raise TypeError(
            f"{prefix}input {name!r} is a {type(arr).__name__}, not an array: pass an array "
            f"(numpy.asarray(batch[{name!r}]), or a cupy array on a GPU)"
        )
    if not has_numpy_dtype(arr):  # (np.dtype would fail with "Cannot interpret ...")
        raise TypeError(
            f"{prefix}input {name!r} is a {type(arr).__name__} of dtype {arr.dtype}, which numpy "
            f"does not know: pass a numpy array (numpy.asarray(batch[{name!r}]), or "
            "tensor.numpy() for a torch tensor), or a cupy array on a GPU"
        )
    shape = tuple(arr.shape)
    want = node.shape or ()
    if len(shape) != len(want) or any(
        w is not None and s != w for s, w in zip(shape, want, strict=True)
    ):
        raise ValueError(
            f"{prefix}input {name!r}: got shape {shape}, the graph declares {want} "
            "(None is the batch dimension)"
        )
    kind = np.dtype(node.dtype).kind
    got = np.dtype(arr.dtype)
    if kind in "iu" and got.kind not in "iu":
        raise ValueError(
            f"{prefix}input {name!r} is declared {node.dtype} but got {got} data: "
            + _integer_input_fixes(name, arr, got)
        )
    if kind == "f" and got.kind not in "fiub" and not is_floating(got):
        raise ValueError(f"{prefix}input {name!r} is declared {node.dtype} but got {got} data")
    return shape


def _integer_input_fixes(name: str, arr: Any, got: np.dtype[Any]) -> str:
    """The ways out for non-integer data given to input ``name``, declared integer (on the
    error path only): a cast where it holds class labels or ids, a float declaration where it
    holds real values, such as a regression's targets with ``Graph.sequential``'s
    ``label_dtype`` left at int64. A cast truncates those without a word, so where the first
    rows hold a value that is no whole number the declaration comes first."""
    cast = (
        f"if {name!r} holds class labels or ids (CrossEntropyLoss, Embedding), pass integers "
        f"(e.g. {name}.astype(np.int64))"
    )
    declare = (
        f"if {name!r} holds real-valued targets (MSELoss), declare it float: "
        f"Graph.sequential(..., {'input' if name == 'x' else 'label'}_dtype='float32') or "
        f"g.input({name!r}, shape, dtype='float32')"
    )
    fraction = _first_fraction(arr) if is_floating(got) else None
    if fraction is None:
        return f"{cast}; {declare} (a cast to integers would truncate them)"
    row, value = fraction
    return (
        f"it holds {value:g} in row {row}, which a cast to integers would truncate: "
        f"{declare}; {cast}"
    )


def _first_fraction(arr: Any) -> tuple[int, float] | None:
    """The first row of float data ``arr`` (its first chunk of rows, see :func:`row_chunks`)
    holding a finite value that is no whole number, and that value; None if there is none."""
    for _, chunk in row_chunks(arr):
        values = np.asarray(to_numpy(chunk), dtype=np.float64)
        values = values.reshape(len(values), -1)
        bad = np.isfinite(values) & (values != np.trunc(values))
        if not bad.any():
            return None
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        return row, float(values[row][np.flatnonzero(bad[row])[0]])
    return None


def check_batch(
    graph: Graph,
    batch: Mapping[str, Any],
    check_finite: bool = False,
    dtype: Any = None,
    what: str | None = None,
) -> int:
    """Checks a batch against the graph's inputs (names, shapes, dtypes, NaN); returns its rows.

    Args:
        graph: the network.
        batch: ``{input name: array}``.
        check_finite: also check float inputs for NaN and Inf, read in chunks of rows.
        dtype: the run's floating dtype, which it casts float inputs to: with
            ``check_finite``, a value that overflows it (1e39 in float64 data of a float32
            run) is refused as the Inf the run would compute on. None: the values as given.
            Data of the run's dtype (or narrower) costs nothing more.
        what: names the data for the error of no rows (``"fit"``: ``fit: the data has 0
            rows``); None: a batch's (``the batch is empty``).

    Raises:
        ValueError: naming the input and what was wrong with it.
        TypeError: a batch that is not a dict of input name to array (a tuple ``(X, Y)``, say),
            or naming an input that is not an array (a list, say).
    """
    names = graph.inputs
    if not callable(getattr(batch, "items", None)):
        # a tuple read as a dict failed with "'tuple' object has no attribute 'items'"
        example = ", ".join(f"{n!r}: ..." for n in names)
        count = f" of {len(batch)}" if isinstance(batch, tuple | list) else ""
        raise TypeError(
            f"a batch must be a dict of input name to array, got a {type(batch).__name__}"
            f"{count}; the graph's inputs are {names}: pass {{{example}}}"
        )
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(
            f"the batch has no {missing}; the graph's inputs are {names}, the batch gave "
            f"{sorted(batch, key=str)}"
        )
    extra = [k for k in batch if k not in names]
    if extra:
        raise ValueError(f"the batch has {extra}, which the graph has no input for ({names})")
    rows = None
    masks = mask_inputs(graph) if check_finite else ()
    for name in names:
        arr = batch[name]
        shape = check_input(graph.nodes[name], arr)
        got = np.dtype(arr.dtype)
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise ValueError(
                f"inputs disagree on the batch size: {name!r} has {shape[0]} rows, others {rows}"
            )
        if not check_finite:
            continue
        if name in masks:  # a float mask's -inf is what it means: NaN and +inf are not
            _check_mask(name, arr, what, overflow_cast(graph.nodes[name], arr, dtype))
            continue
        cast = overflow_cast(graph.nodes[name], arr, dtype)
        if is_floating(got) or cast is not None:
            bad = _first_nonfinite_row(arr, cast)
            if bad is not None:
                raise ValueError(
                    f"{what + ': ' if what else ''}{_nonfinite_message(name, arr, bad, cast)} "
                    "(check_data=False skips this check, unless check_finite=True)"
                )
    if not rows:
        raise ValueError(f"{what}: the data has 0 rows" if what else "the batch is empty (0 rows)")
    return int(rows)


def mask_inputs(graph: Graph) -> frozenset[str]:
    """The graph inputs read only as attention masks (the trailing ``mask_inputs`` of a
    ``MultiHeadAttention`` layer): a float mask's ``-inf`` (attention not allowed) is no data
    gone bad, so :func:`check_batch` leaves them out of its check for NaN and Inf."""
    found = set()
    for name in graph.inputs:
        consumers = graph.nodes[name].consumers
        if consumers and all(_reads_as_mask(graph, c, slot) for c, slot in consumers):
            found.add(name)
    return frozenset(found)


def _check_mask(name: str, arr: Any, what: str | None, cast: Any = None) -> None:
    """Refuses a NaN or a +inf in the float mask ``arr`` (input ``name``), read in chunks of
    rows, as the run casts it (``cast``: the run's dtype where a value may overflow it, 1e39
    becoming +inf in float32); ``-inf`` (attention not allowed there) and bool masks pass."""
    if not is_floating(np.dtype(arr.dtype)):
        return
    for start, chunk in row_chunks(arr):
        xp = array_namespace(chunk)
        values = xp.asarray(chunk) if cast is None else _cast(chunk, cast)
        bad = xp.isnan(values) | xp.isposinf(values)
        if bool(bad.any()):
            row = start + int(xp.argmax(bad.reshape(len(values), -1).any(axis=1)))
            raise ValueError(
                f"{what + ': ' if what else ''}input {name!r} (an attention mask) holds NaN or "
                f"+inf{'' if cast is None else f' as the run casts it to {np.dtype(cast)}'}, "
                f"first in row {row}: a float mask holds 0 where attention is allowed, "
                "-inf (or a large negative number) where it is not; or give a bool mask"
            )


def _reads_as_mask(graph: Graph, consumer: str, slot: int) -> bool:
    node = graph.nodes[consumer]
    n = len(getattr(node.module, "mask_inputs", ()) or ())
    return node.kind == "layer" and n > 0 and slot >= len(node.inputs) - n


#: how many bytes of an input :func:`check_batch` checks for NaN (and ``check_labels`` checks
#: for labels out of range) at a time: the mask of a whole 100 GB memory-mapped dataset would
#: take 25 GB (an array this size or smaller: one pass)
_FINITE_CHUNK_BYTES = 16 << 20


def row_chunks(arr: Any) -> Iterator[tuple[int, Any]]:
    """``(start, rows)``: ``arr`` (with a batch axis) in chunks of whole rows of about
    :data:`_FINITE_CHUNK_BYTES`, so that a check over them takes bounded memory whatever the
    size of ``arr`` (a memory map, an h5py dataset); ``arr`` itself when it is no larger."""
    rows = int(arr.shape[0])
    row_bytes = math.prod(arr.shape[1:]) * np.dtype(arr.dtype).itemsize
    step = max(1, _FINITE_CHUNK_BYTES // max(1, row_bytes))
    # an array whole where it fits one chunk; anything else (an h5py dataset, a lazily read
    # field without __array__) is read by rows, as the run reads it, even then
    whole = type(arr) is np.ndarray or is_cupy_array(arr)
    for start in range(0, rows, step):
        yield start, arr if whole and step >= rows else arr[start : start + step]


def _first_nonfinite_row(arr: Any, dtype: Any = None, overflows_only: bool = False) -> int | None:
    """The first row of ``arr`` (with a batch axis) holding a NaN or an Inf, as cast to
    ``dtype`` where given (a finite value that overflows it counts), or None; read in chunks
    (:func:`row_chunks`). With ``overflows_only``: only a finite value that overflows
    ``dtype`` counts (NaN and Inf in the data do not)."""
    xp = array_namespace(arr)
    for start, chunk in row_chunks(arr):
        if dtype is not None:
            chunk = xp.asarray(chunk)  # (read once: a lazily read input is the chunk itself)
        seen = chunk if dtype is None else _cast(chunk, dtype)
        if overflows_only:
            bad = ~xp.isfinite(seen) & xp.isfinite(chunk)
            if bool(bad.any()):
                return start + _first_true_row(bad)
        elif not bool(xp.isfinite(seen).all()):
            return start + _first_bad_row(seen)
    return None


def _first_bad_row(arr: Any) -> int:
    """The first row of ``arr`` holding a NaN or an Inf (on the error path only)."""
    return _first_true_row(~np.isfinite(np.asarray(to_numpy(arr))))


def _first_true_row(mask: Any) -> int:
    """The first row of ``mask`` (with a batch axis) holding a True (on the error path only)."""
    mask = np.asarray(to_numpy(mask))  # (check_input gave it a batch axis)
    return int(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0])


def overflow_cast(node: Node, arr: Any, dtype: Any) -> Any:
    """``dtype``, the run's, where the run casts input ``node``'s data ``arr`` to it and the
    cast may make a finite value Inf (float64 data of a float32 run); else None (an input not
    declared float, such as ids and labels, is not cast; data of ``dtype`` or narrower cannot
    overflow it)."""
    if dtype is None or np.dtype(node.dtype).kind != "f":
        return None
    return dtype if _may_overflow(np.dtype(arr.dtype), dtype) else None


def overflow_error(name: str, arr: Any, dtype: Any) -> str | None:
    """What the cast of input ``name``'s data ``arr`` to ``dtype`` makes Inf first (its row and
    value), or None: NaN and Inf in the data itself do not count (see :func:`overflow_cast`)."""
    bad = _first_nonfinite_row(arr, dtype, overflows_only=True)
    return None if bad is None else _nonfinite_message(name, arr, bad, dtype)


def _cast(chunk: Any, dtype: Any) -> Any:
    """``chunk`` (rows of an input: numpy, cupy, or read lazily) cast to ``dtype`` as the run
    casts it, a value beyond ``dtype``'s range becoming Inf without numpy's warning (the check
    reports it)."""
    xp = array_namespace(chunk)
    with np.errstate(over="ignore", invalid="ignore"):
        return xp.asarray(chunk).astype(dtype)


def _may_overflow(got: np.dtype[Any], dtype: Any) -> bool:
    """Whether data of dtype ``got`` may hold a finite value beyond the range of ``dtype`` (the
    run's), which the run's cast makes Inf: float64 data in a float32 run, float32 or integers
    beyond 65504 in a float16 one; never data of ``dtype`` itself, nor narrower."""
    if got == np.dtype(dtype) or got.kind == "b":
        return False
    try:
        largest = np.iinfo(got).max if got.kind in "iu" else np.finfo(got).max
    except (TypeError, ValueError):  # (a dtype finfo does not know: checked as cast)
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return not bool(np.isfinite(np.asarray(largest, dtype=got).astype(dtype)))


def _nonfinite_message(name: str, arr: Any, row: int, dtype: Any = None) -> str:
    """What :func:`_first_nonfinite_row` found in ``row`` of input ``name``: a NaN or Inf in
    the data, or a finite value that overflows ``dtype`` (read again, that row alone: on the
    error path only)."""
    values = np.asarray(to_numpy(arr[row : row + 1])).reshape(-1)
    if dtype is not None:
        bad = ~np.isfinite(_cast(values, dtype)) & np.isfinite(values)
        if bad.any():
            value = values[int(np.flatnonzero(bad)[0])]
            try:
                largest = f" (its largest value is {float(np.finfo(dtype).max):g})"
            except (TypeError, ValueError):
                largest = ""
            wider = (
                ", or run in a wider dtype (dtype='float64' on the Trainer or open_run)"
                if np.dtype(dtype).itemsize < 8
                else ""
            )
            return (
                f"input {name!r} has {value:g} in row {row}, which overflows the run's dtype "
                f"{np.dtype(dtype)} to {'-' if value < 0 else ''}Inf{largest}: scale the "
                f"data{wider}"
            )
    return f"input {name!r} contains NaN or Inf, first in row {row}: clean the data"


def first_not_finite(tree: Any, path: str = "") -> str | None:
    """The path (``[0]['weight']``) of the first floating leaf of ``tree`` holding a NaN or
    an Inf, in the order of ``tree_leaves``; None if there is none."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            found = first_not_finite(tree[k], f"{path}[{k!r}]")
            if found is not None:
                return found
        return None
    if isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            found = first_not_finite(v, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if tree is None or not hasattr(tree, "dtype") or not _checkable(tree.dtype):
        return None
    return None if bool(array_namespace(tree).isfinite(tree).all()) else path


@dataclass(frozen=True)
class RangeCheck:
    """A graph input of integers that must each be in ``[0, size)``: the ids a layer starting
    with an Embedding reads, the class labels of a cross-entropy loss, or the ``lengths`` of a
    loop (see :func:`range_checks`)."""

    #: the graph input holding them
    input: str
    #: how many values are valid (the table's rows, the loss's classes, a loop's steps + 1)
    size: int
    #: what one is called in the message: ``"id"``, ``"label"`` or ``"length"``
    what: str
    #: the node that reads them, described (``"layer 'stage0' (Embedding(...))"``)
    reader: str
    #: how to mend them
    fix: str
    #: a value outside ``[0, size)`` that is allowed all the same (a cross-entropy loss's
    #: ``ignore_index``: such a label is no class, and its position is left out), or None
    ignored: int | None = None


def upstream(graph: Graph, targets: Iterable[str]) -> set[str]:
    """The nodes that ``targets`` (node names) depend on, themselves included."""
    seen: set[str] = set()
    stack = list(targets)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph.nodes[name].inputs)
    return seen


def range_checks(
    graph: Graph, shapes: Mapping[str, tuple[int, ...]], targets: Iterable[str] | None = None
) -> list[RangeCheck]:
    """The :class:`RangeCheck` of each input read as ids by a layer starting with an Embedding
    (on a GPU an id out of range is no error there: its row comes out NaN), of each input
    read as labels by a cross-entropy loss whose logits have a class axis in ``shapes`` (the
    output shapes :func:`validate` found), and of each input read as a loop's ``lengths``
    (each in ``[0, steps]``); only of the nodes ``targets`` need, where given.
    Made once per run or data set: :func:`check_ranges` applies them."""
    from asyncnn._math._nn import CrossEntropyLoss
    from asyncnn._math._nn._linear import first_embedding

    needed = None if targets is None else upstream(graph, targets)
    checks = []
    for name, node in graph.nodes.items():
        if (needed is not None and name not in needed) or not node.inputs:
            continue
        if node.role == "loop" and node.module.has_lengths:
            check = _lengths_check(graph, node, shapes)
            if check is not None:
                checks.append(check)
        elif node.kind == "layer":
            embedding = first_embedding(node.module)
            source = node.inputs[0]
            if embedding is None or graph.nodes[source].kind != "input":
                continue
            n = embedding.num_embeddings
            fix = (
                f"ids must be in 0..{n - 1}; map them into that range, or make num_embeddings "
                "as large as the vocabulary"
            )
            checks.append(RangeCheck(source, n, "id", f"layer {name!r} ({embedding!r})", fix))
        elif (
            node.kind == "loss"
            and isinstance(node.module, CrossEntropyLoss)
            and len(node.inputs) == 2
        ):
            logits, labels = node.inputs
            shape = shapes.get(logits)
            if graph.nodes[labels].kind != "input" or shape is None or len(shape) < 2:
                continue
            classes = int(shape[1])
            reader = (
                f"loss {name!r} ({type(node.module).__name__} over the {classes} classes of "
                f"{logits!r})"
            )
            fix, ignored = _label_rule(node.module, classes)
            checks.append(RangeCheck(labels, classes, "label", reader, fix, ignored))
    return checks


def _label_rule(loss: Any, classes: int) -> tuple[str, int | None]:
    """How a cross-entropy loss's labels are mended, and the label it ignores (its
    ``ignore_index``) where that is outside the classes: on any device (the fused GPU kernels
    of a loss at its defaults skip it too, see ``CrossEntropyLoss``)."""
    fix = f"labels must be in 0..{classes - 1}"
    index = getattr(loss, "ignore_index", None)
    if not isinstance(index, int) or 0 <= index < classes:
        return fix, None  # (an ignore_index among the classes is in range anyway)
    return f"{fix}, or {index} (the loss's ignore_index)", index


def _lengths_check(
    graph: Graph, node: Node, shapes: Mapping[str, tuple[int, ...]]
) -> RangeCheck | None:
    """The :class:`RangeCheck` of a loop's ``lengths`` read from a graph input: each in
    ``[0, steps]`` (the steps of its ``xs`` / ``max_steps``), so that a bad one is refused before
    any compute, naming the data row (the loop actor's own check, which stays for data that
    does not come through these checks, names a row of a key, after earlier keys trained)."""
    loop = node.module
    source = node.inputs[-1]
    xs = node.inputs[1] if loop.has_xs else None
    if graph.nodes[source].kind != "input" or (xs is not None and xs not in shapes):
        return None
    steps = loop.steps_of(None if xs is None else tuple(shapes[xs]))
    bound = (
        f"its max_steps={steps}"
        if xs is None or (loop.max_steps is not None and loop.max_steps < shapes[xs][1])
        else f"the {steps} steps of its xs {xs!r}"
    )
    reader = f"loop {node.name!r} (at most {bound})"
    fix = (
        f"lengths must be in 0..{steps} (each row's number of steps); fix that row, or give "
        "the loop more steps (longer xs, or a larger max_steps)"
    )
    return RangeCheck(source, steps + 1, "length", reader, fix)


def check_ranges(
    checks: Iterable[RangeCheck], data: Mapping[str, Any], device: bool = True
) -> None:
    """Applies ``checks`` to ``data`` (a batch, or a data set's arrays, rows first): one
    vectorised min and max per input and chunk of rows, read on the host (two numbers from a
    GPU; ``device=False`` leaves GPU arrays alone); the first value out of range is looked for
    only once there is one. Float data is left alone (the graph's checks refuse it where
    integers are declared).

    Raises:
        ValueError: naming the input, the value, where it is (``row 5``, or ``index (5, 2)``),
            the node reading it and the valid range.
    """
    for check in checks:
        if check.input not in data:
            continue
        values = data[check.input]
        if np.dtype(values.dtype).kind not in "iu" or (not device and is_cupy_array(values)):
            continue
        found = _first_outside(values, check.size, check.ignored)
        if found is not None:
            value, where = found
            raise ValueError(
                f"input {check.input!r}: {check.what} {value} at {where} is out of range for "
                f"{check.reader}: {check.fix}"
            )


def _first_outside(values: Any, n: int, ignored: int | None = None) -> tuple[int, str] | None:
    """The first integer of ``values`` (rows first) outside ``[0, n)`` and other than
    ``ignored``, and where it is, or None; read in chunks of rows (:func:`row_chunks`), so that
    the memory it takes is bounded whatever the size of ``values`` (a memory map, an h5py data
    set)."""
    for start, chunk in row_chunks(values):
        if type(chunk) is not np.ndarray and not is_cupy_array(chunk):
            chunk = np.asarray(chunk)  # (an h5py data set read whole)
        if not chunk.size:
            continue
        lo, hi = id_range(chunk)
        if lo >= 0 and hi < n:
            continue
        part = np.asarray(to_numpy(chunk))  # (only here: a GPU chunk comes to the host)
        outside = (part < 0) | (part >= n)
        if ignored is not None:
            outside &= part != ignored
            if not outside.any():
                continue
        index = np.unravel_index(int(np.argmax(outside)), part.shape)
        at = (start + int(index[0]), *(int(i) for i in index[1:]))
        return int(part[index]), (f"row {at[0]}" if len(at) == 1 else f"index {at}")
    return None


def check_optimizer(optimizer: Any, who: str = "") -> None:
    """Refuses what is not an optimizer, as the policy is refused (``who``: the caller's name
    and a colon, ``"open_run: "``, or nothing for the trainer): a class given for an instance
    (``optimizer=optim.Adam``) failed later inside the weights' set-up, as ``Optimizer.init()
    missing 1 required positional argument: 'params'``. Anything with ``init`` and ``update``
    is taken.

    Raises:
        TypeError: ``optimizer`` is a class, or has no ``init`` and ``update``.
    """
    if isinstance(optimizer, type):
        name = optimizer.__name__
        where = "optim." if optimizer.__module__.startswith("asyncnn.") else ""
        raise TypeError(
            f"{who}optimizer must be an instance, got the class {name}; call it with its "
            f"options: optimizer={where}{name}(...)"
        )
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"{who}optimizer must be an asyncnn.optim optimizer (e.g. optim.Adam(lr=1e-3)), got "
            f"{optimizer!r}"
        )


def checked_scale(policy: Any, hook: str, args: tuple[float, ...], value: Any) -> float:
    """``value``, what ``policy``'s ``hook`` (``"loss_cotangent"``) returned for ``args``, as a
    float, checked to be a finite real number: a custom policy's ``loss_cotangent`` that forgot
    its ``return`` gave ``None``, which the loss's seed took as NaN, and every weight trained to
    NaN without a word (a ``gradient_scale`` of ``None`` failed on a bare ``TypeError``).

    Raises:
        ValueError: naming the policy, the call and the value.
    """
    if type(value) is float and math.isfinite(value):  # (the built-in policies' every call)
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value[()]  # (a 0-d array, as numpy arithmetic on arrays gives: its number)
    if (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool | np.bool_)
        and math.isfinite(float(value))
    ):
        return float(value)
    raise ValueError(
        f"{type(policy).__name__}.{hook}({', '.join(map(str, args))}) returned {value!r:.40}: "
        "it must be a finite number (a float such as rows / minibatch_rows or 1.0); a hook "
        "that forgot its return gives None"
    )


def checked_flag(policy: Any, hook: str, args: tuple[Any, ...], value: Any) -> bool:
    """``value``, what ``policy``'s ``hook`` (``"update_due"``, ``"minibatch_done"``) returned
    for ``args``, as a bool, checked to be one (a numpy bool too): a custom policy's
    ``update_due`` that forgot its ``return`` gave ``None``, and the run made no update (a fit
    ran its epochs without moving a weight, without a word); ``"no"`` is truthy (an update after
    every backward). Callers test ``value is True`` / ``is False`` first: this is the rest.

    Raises:
        ValueError: naming the policy, the call and the value.
    """
    if type(value) is bool:
        return value
    if isinstance(value, np.bool_) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype == np.bool_
    ):
        return bool(value)
    raise ValueError(
        f"{type(policy).__name__}.{hook}({', '.join(map(str, args))}) returned {value!r:.40}: "
        "it must be a bool (True or False); a hook that forgot its return gives None"
    )


def checked_orders(policy: Any, layers: Sequence[str], orders: Any) -> Any:
    """``orders``, what ``policy.orders(layers)`` returned, checked to hold a stage order for
    each layer (an overridden ``orders`` that left one out failed in that layer's actor, as a
    bare ``KeyError`` or ``AttributeError``; the default ``orders`` checks each
    ``stage_order``'s answer itself, naming the stage).

    Raises:
        TypeError: naming the policy, the layer and what it was given.
    """
    call = f"{type(policy).__name__}.orders({list(layers)!r:.80})"
    if not isinstance(orders, Mapping):
        raise TypeError(
            f"{call} returned {orders!r:.60}: it must return a dict of layer name to StageOrder"
        )
    for name in layers:
        order = orders.get(name)
        if not is_stage_order(order):
            given = "no order" if name not in orders else f"{order!r:.60}"
            raise TypeError(
                f"{call} gave {given} for layer {name!r}: it must map every layer to a "
                "StageOrder (e.g. policies.OneFOneBOrder(None, flush=True))"
            )
    return orders
