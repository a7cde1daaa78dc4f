"""Dense layers: Linear and Embedding."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncnn.backends import to_numpy

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from ._args import store_sizes
from ._module import (
    Initializer,
    Module,
    Shape,
    check_flags,
    check_params,
    fan_in_bound,
    float_input_error,
)

__all__ = ["Embedding", "Linear"]

_MATMUL = ops.PRIMITIVES["matmul"]
_ADD = ops.PRIMITIVES["add"]
_BIAS_RELU = ops.PRIMITIVES["bias_relu"]


@dataclass(frozen=True)
class Linear(Module):
    """``y = x @ weight + bias`` on the last axis of ``x``.

    Params: ``{"weight": (in_features, out_features), "bias": (out_features,)}``; the weight is
    stored (in, out), the transpose of torch's. Initialized as torch does:
    ``U(-1/sqrt(in_features), 1/sqrt(in_features))`` for both. The sizes may be numpy integers
    (``Linear(np.prod(shape), k)`` after a Flatten), stored as plain ints, as every module's
    integer arguments are.
    """

    in_features: int
    out_features: int
    bias: bool = True

    def __post_init__(self) -> None:
        store_sizes(self, "in_features", "out_features")
        check_flags(self, "bias")

    def _expected(self) -> dict[str, Shape]:
        shapes: dict[str, Shape] = {"weight": (self.in_features, self.out_features)}
        if self.bias:
            shapes["bias"] = (self.out_features,)
        return shapes

    def init_params(self, init: Initializer) -> Any:
        bound = fan_in_bound(self.in_features)
        params = {"weight": init.uniform((self.in_features, self.out_features), bound)}
        if self.bias:
            params["bias"] = init.uniform((self.out_features,), bound)
        return params

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        y = self._product(params, x)
        return _ADD(y, params["bias"]) if self.bias else y

    def _then_relu(self, params: Any, x: Any) -> Any:
        """``relu(self(params, x))``, the bias add and the ReLU in one op where the product and
        the bias are of one dtype (what :class:`~asyncnn.nn.Sequential` calls for a Linear with
        a bias followed by a ReLU): one kernel and one node of the trace fewer, for an eager
        GPU step bound by its launches and its Python; the same bits as the two ops."""
        y = self._product(params, x)
        b = params["bias"]
        if y.dtype == b.dtype:
            try:
                return _BIAS_RELU(y, b)
            except (TypeError, ValueError):
                pass  # (the add below says what was wrong, in its own name, as the Linear does)
        return ops.relu(_ADD(y, b))

    def _product(self, params: Any, x: Any) -> Any:
        """``x @ weight``, once ``params`` and ``x`` are checked."""
        check_params(self, params, self._expected())
        shape = tuple(getattr(x, "shape", ()))
        if not shape or shape[-1] != self.in_features:
            raise ValueError(
                f"Linear({self.in_features} -> {self.out_features}) got input of shape {shape}: "
                f"the last dimension must be {self.in_features}"
            )
        if x.dtype.kind in "iub":  # ints, bools: numpy would promote them (int64 to float64)
            raise float_input_error(self, x, params["weight"])
        # the primitives themselves: the checks above leave ops.matmul's and ops.add's nothing
        # to find (a 2-D weight of in_features rows, a bias of the output's last axis)
        return _MATMUL(x, params["weight"])

    def flops(self, *input_shapes: Any) -> int:
        rows = math.prod(int(d) for d in input_shapes[0][1:-1]) if input_shapes else 1
        return 2 * rows * self.in_features * self.out_features

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return (*input_shapes[0][:-1], self.out_features)


@dataclass(frozen=True)
class Embedding(Module):
    """Looks up rows of a table: integer ids of any shape -> ``ids.shape + (embedding_dim,)``.

    Params: ``{"weight": (num_embeddings, embedding_dim)}``, initialized ``N(0, 1)`` as in torch.
    Ids are an integer array (any signed or unsigned width) with every entry in
    ``[0, num_embeddings)``; as in torch, a negative id is an error, not counted from the end.
    Rows looked up more than once get the sum of their gradients.

    numpy ids are checked here. GPU ids are not read back, which would stop the host on every
    step: the row of an id outside the table comes out NaN instead (so the loss is NaN) and its
    gradient reaches no row of the table. ``Trainer.fit``, ``evaluate`` and ``predict`` check
    the ids of an input read by an Embedding before any compute (``check_data``), ``run.step``
    those of host arrays at each step (of GPU arrays with ``check_data=True``), and with
    ``check_finite=True`` the run fails on the NaN with this module's ``IndexError``.

    Args:
        num_embeddings: the rows of the table (the vocabulary's size).
        embedding_dim: the length of each row.
        padding_idx: a row that gets no gradient (a zero one), as torch's: it is initialized
            to zeros and keeps the value it is initialized or loaded with (a padding token's
            vector; an optimizer's weight decay still shrinks it, as in torch); looking it up
            gives the row as any other. A negative one counts from the end, as in torch, and
            is kept as the row's index (``padding_idx=-1`` is ``num_embeddings - 1``). None
            (the default): every row trains.

    Raises:
        TypeError: ids that are not an integer array (floats, bools, Python lists), naming the
            module and the ids' dtype; a ``padding_idx`` that is not an int or None.
        ValueError: a ``padding_idx`` outside ``[-num_embeddings, num_embeddings)``.
        IndexError: an id outside ``[0, num_embeddings)`` (numpy ids), naming the module, the
            id and its position in ``ids``.
    """

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None

    def __post_init__(self) -> None:
        store_sizes(self, "num_embeddings", "embedding_dim")
        index, n = self.padding_idx, self.num_embeddings
        if index is None:
            return
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"Embedding: padding_idx must be an int or None, got {index!r}")
        if not -n <= index < n:
            raise ValueError(
                f"Embedding: padding_idx must be in [{-n}, {n}) (a row of the table; a negative "
                f"one counts from the end), got {index!r}"
            )
        object.__setattr__(self, "padding_idx", int(index) % n)

    def __repr__(self) -> str:
        # padding_idx only where set: messages name the plain table as they always have
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"{type(self).__name__}(num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}{padding})"
        )

    def init_params(self, init: Initializer) -> Any:
        shape = (self.num_embeddings, self.embedding_dim)
        if self.padding_idx is None:
            return {"weight": init.normal(shape)}
        # the draws of init.normal, so the other rows are those of a table without padding_idx
        return {"weight": init.zero_rows(init.normal(shape), [self.padding_idx])}

    def __call__(self, params: Any, ids: Any, *, rng: Any = None) -> Any:
        check_params(self, params, {"weight": (self.num_embeddings, self.embedding_dim)})
        value = ops.raw(ids)
        kind = getattr(getattr(value, "dtype", None), "kind", None)
        if kind not in ("i", "u"):
            raise self._ids_type_error(value)
        try:
            rows = ops_nn.embedding(params["weight"], ids)
        except IndexError:
            # the op checked them but cannot name the module or the position: said again here,
            # only on the way to the error (a second pass over the ids every forward otherwise)
            if ops_nn.ids_on_host(value):
                self.check_ids(value)
            raise
        if self.padding_idx is None:
            return rows
        # the padding row's lookups as constants: their gradient reaches no row of the table
        # (on the looked-up rows, the size of the output, not the whole table)
        padding = ops.namespace_of(value).expand_dims(value == self.padding_idx, -1)
        return ops.where(padding, ops.raw(rows), rows)

    def check_ids(self, ids: Any) -> None:
        """Checks integer ``ids`` (numpy or GPU: read on the host, one copy) against the table.

        Raises:
            IndexError: an id outside ``[0, num_embeddings)``, naming the module, the id and its
                position in ``ids``.
        """
        value = ops.raw(ids)
        if not value.size:
            return
        lo, hi = ops_nn.id_range(value)
        if lo < 0 or hi >= self.num_embeddings:
            host = np.asarray(to_numpy(value))
            raise self._ids_range_error(host, lo if lo < 0 else hi)

    def _ids_type_error(self, ids: Any) -> TypeError:
        dtype = getattr(ids, "dtype", None)
        if dtype is None:
            got = f"a value of type {type(ids).__name__}"
            fix = "pass them as an array: np.asarray(ids, dtype=np.int64)"
        else:
            got = f"an array of dtype {dtype} and shape {tuple(ids.shape)}"
            fix = "cast them if they hold whole numbers: ids.astype(np.int64)"
        return TypeError(f"{self!r} takes integer ids, got {got}; {fix}")

    def _ids_range_error(self, ids: np.ndarray[Any, Any], bad: int) -> IndexError:
        where = tuple(int(i) for i in np.argwhere(ids == bad)[0])
        at = f"ids[{', '.join(map(str, where))}]" if where else "ids"
        negative = " (a negative id is not counted from the end, as in torch)" if bad < 0 else ""
        return IndexError(
            f"{self!r} got id {bad} at {at} (ids of shape {tuple(ids.shape)}), outside "
            f"[0, {self.num_embeddings}){negative}; every id must index a row of the table: "
            "map the ids into that range, or make num_embeddings as large as the vocabulary"
        )

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return (*input_shapes[0], self.embedding_dim)


def first_embedding(module: Any) -> Embedding | None:
    """The Embedding that reads ``module``'s first input: ``module`` itself, or the first module
    of a Sequential (nested ones too); None if there is none."""
    from ._containers import Sequential

    while isinstance(module, Sequential) and module.modules:
        module = module.modules[0]
    return module if isinstance(module, Embedding) else None
