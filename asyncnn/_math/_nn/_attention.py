"""Multi-head scaled dot-product attention on batch-first input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from .._optim_checks import _real
from ._module import (
    Initializer,
    Module,
    Shape,
    _reads_rng,
    check_flags,
    check_params,
    fan_in_bound,
    float_input_error,
)

__all__ = ["MultiHeadAttention"]


@dataclass(frozen=True)
class MultiHeadAttention(Module):
    """Multi-head attention as ``torch.nn.MultiheadAttention(batch_first=True)``.

    ``m(params, x)`` is self-attention on ``x`` of shape (batch, seq, embed_dim);
    ``m(params, query, key, value)`` attends from ``query`` (batch, L, E) to ``key``/``value``
    (batch, S, E). ``causal=True`` lets position i attend to positions <= i only. ``dropout``
    applies to the attention weights when the call gets an ``rng``.

    Params (weights stored (in, out) like :class:`Linear`, i.e. transposed from torch):

    - ``"in_proj_weight"``: (E, 3E); columns ``[0:E]`` project queries, ``[E:2E]`` keys,
      ``[2E:3E]`` values (torch's ``in_proj_weight.T``). Xavier-uniform, as torch.
    - ``"in_proj_bias"``: (3E,), zeros.
    - ``"out_proj_weight"``: (E, E) (torch's ``out_proj.weight.T``), ``U(-1/sqrt(E), 1/sqrt(E))``.
    - ``"out_proj_bias"``: (E,), zeros.

    With ``bias=False`` the two biases are absent.
    """

    embed_dim: int
    num_heads: int
    bias: bool = True
    causal: bool = False
    dropout: float = 0.0

    @property
    def stochastic(self) -> bool:
        # (and a subclass of one's own whose __call__ reads its rng, as Module.stochastic says)
        return bool(self.dropout) or _reads_rng(type(self))

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MultiHeadAttention: {name} must be an int >= 1, got {v!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"MultiHeadAttention: embed_dim {self.embed_dim} is not divisible by num_heads "
                f"{self.num_heads}; each head gets embed_dim // num_heads features"
            )
        # a type first: a string failed comparing ('<=' not supported), True was taken as 1
        dropout = _real("MultiHeadAttention", "dropout", self.dropout)
        if not 0 <= dropout < 1:
            raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", dropout)
        check_flags(self, "bias", "causal")

    def _expected(self) -> dict[str, Shape]:
        e = self.embed_dim
        shapes: dict[str, Shape] = {"in_proj_weight": (e, 3 * e), "out_proj_weight": (e, e)}
        if self.bias:
            shapes["in_proj_bias"] = (3 * e,)
            shapes["out_proj_bias"] = (e,)
        return shapes

    def init_params(self, init: Initializer) -> Any:
        e = self.embed_dim
        xavier = math.sqrt(6.0 / (e + 3 * e))
        params = {
            "in_proj_weight": init.uniform((e, 3 * e), xavier),
            "out_proj_weight": init.uniform((e, e), fan_in_bound(e)),
        }
        if self.bias:
            params["in_proj_bias"] = init.zeros((3 * e,))
            params["out_proj_bias"] = init.zeros((e,))
        return params

    def _check(self, params: Any, name: str, x: Any, batch: int | None = None) -> Shape:
        shape = tuple(getattr(x, "shape", ()))
        if (
            len(shape) != 3
            or shape[2] != self.embed_dim
            or (batch is not None and shape[0] != batch)
        ):
            want = f"({'batch' if batch is None else batch}, seq, {self.embed_dim})"
            raise ValueError(f"{self!r}: {name} has shape {shape}, expected {want}")
        if x.dtype.kind in "iub":  # ints, bools: numpy would promote them (int64 to float64)
            raise float_input_error(self, x, params["in_proj_weight"], name)
        return shape

    def _project(self, x: Any, params: Any, part: int) -> Any:
        e = self.embed_dim
        cols = slice(part * e, (part + 1) * e)
        y = ops.matmul(x, ops.getitem(params["in_proj_weight"], (slice(None), cols)))
        return ops.add(y, ops.getitem(params["in_proj_bias"], cols)) if self.bias else y

    def _heads(self, x: Any, batch: int, seq: int) -> Any:
        d = self.embed_dim // self.num_heads
        return ops.transpose(ops.reshape(x, (batch, seq, self.num_heads, d)), (0, 2, 1, 3))

    def __call__(
        self, params: Any, query: Any, key: Any = None, value: Any = None, *, rng: Any = None
    ) -> Any:
        check_params(self, params, self._expected())
        e = self.embed_dim
        b, lq, _ = self._check(params, "query", query)
        if key is None and value is None:
            qkv = ops.matmul(query, params["in_proj_weight"])  # one product for q, k and v
            if self.bias:
                qkv = ops.add(qkv, params["in_proj_bias"])
            q, k, v = (ops.getitem(qkv, (Ellipsis, slice(i * e, (i + 1) * e))) for i in range(3))
            lk = lq
        elif key is not None and value is not None:
            _, lk, _ = self._check(params, "key", key, b)
            if self._check(params, "value", value, b)[1] != lk:
                raise ValueError(
                    f"{self!r}: key and value need the same length, got {tuple(key.shape)} and "
                    f"{tuple(value.shape)}"
                )
            q, k, v = (self._project(t, params, i) for i, t in enumerate((query, key, value)))
        else:
            raise ValueError(f"{self!r}: pass both key and value, or neither (self-attention)")
        d = e // self.num_heads
        q = ops.multiply(self._heads(q, b, lq), 1.0 / math.sqrt(d))
        k = ops.transpose(ops.reshape(k, (b, lk, self.num_heads, d)), (0, 2, 3, 1))
        scores = ops.matmul(q, k)  # (b, heads, lq, lk)
        if self.causal:
            xp = ops.namespace_of(scores)
            dtype = ops.raw(scores).dtype
            mask = xp.triu(xp.full((lq, lk), -xp.inf, dtype=dtype), k=1)
            scores = ops.add(scores, mask)
        weights = ops_nn.softmax(scores, axis=-1)
        if self.dropout and rng is not None:
            weights = ops_nn.dropout(weights, float(self.dropout), rng)
        out = ops.matmul(weights, self._heads(v, b, lk))  # (b, heads, lq, d)
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, lq, e))
        out = ops.matmul(out, params["out_proj_weight"])
        return ops.add(out, params["out_proj_bias"]) if self.bias else out

    def flops(self, *input_shapes: Any) -> int:
        lq = int(input_shapes[0][1])
        lk = int(input_shapes[1][1]) if len(input_shapes) > 1 else lq
        e = self.embed_dim
        projections = 2 * e * e * (lq + 2 * lk) + 2 * e * e * lq
        return projections + 2 * 2 * lq * lk * e

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return input_shapes[0]
