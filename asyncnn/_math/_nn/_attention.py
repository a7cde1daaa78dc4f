"""Multi-head scaled dot-product attention on batch-first input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from asyncnn.backends import is_floating

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from .._optim_checks import _real
from ._args import store_sizes
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

#: the masks a call takes (by name, or positionally when named in ``mask_inputs``)
_MASKS = ("key_padding_mask", "attn_mask")


@dataclass(frozen=True)
class MultiHeadAttention(Module):
    """Multi-head attention as ``torch.nn.MultiheadAttention(batch_first=True)``.

    ``m(params, x)`` is self-attention on ``x`` of shape (batch, seq, embed_dim);
    ``m(params, query, key, value)`` attends from ``query`` (batch, L, E) to ``key``/``value``
    (batch, S, E). ``causal=True`` lets position i attend to positions <= i only. ``dropout``
    applies to the attention weights when the call gets an ``rng``.

    Masks follow torch's ``MultiheadAttention``: a bool mask is True where attention is *not*
    allowed, a float mask (of the attention's dtype) is added to the scores (``-inf`` masks).
    Pass them by name, ``m(params, x, key_padding_mask=pad)``, or, in a graph (whose layers get
    positional inputs only), name them in ``mask_inputs`` and give them as inputs after the
    query (and key, value): ``g.layer("attn", nn.MultiHeadAttention(64, 4,
    mask_inputs=("key_padding_mask",)), x, pad)`` with ``pad = g.input("pad", shape=(None, S),
    dtype="bool")``. All masks combine (with ``causal`` too). A bool mask gets no gradient, a
    float one does.

    - ``key_padding_mask``: (batch, S), True (or ``-inf``) at keys to ignore (padding).
    - ``attn_mask``: (L, S), one mask for every sample and head; torch's (batch * num_heads,
      L, S); or (batch, num_heads, L, S) or (batch, 1, L, S), per sample. In a graph give one
      of the last two (batch first): a graph splits its inputs into microbatches along the
      first axis, which an (L, S) mask does not have and a (batch * heads, ...) one splits
      wrongly.

    A query whose every key is masked (a wholly padded sample, a row of ``attn_mask`` that is
    all True or ``-inf``) gets zero attention weights: its attention output is 0 (the layer's
    output is ``out_proj_bias``) and no gradient flows through that row. That is what torch's
    ``scaled_dot_product_attention`` gives, and ``MultiheadAttention`` on its usual path (in
    training, or with ``need_weights=False``); torch's inference fast path and
    ``need_weights=True`` give NaN there instead.

    Params (weights stored (in, out) like :class:`Linear`, i.e. transposed from torch):

    - ``"in_proj_weight"``: (E, 3E); columns ``[0:E]`` project queries, ``[E:2E]`` keys,
      ``[2E:3E]`` values (torch's ``in_proj_weight.T``). Xavier-uniform, as torch.
    - ``"in_proj_bias"``: (3E,), zeros.
    - ``"out_proj_weight"``: (E, E) (torch's ``out_proj.weight.T``), ``U(-1/sqrt(E), 1/sqrt(E))``.
    - ``"out_proj_bias"``: (E,), zeros.

    With ``bias=False`` the two biases are absent.

    Attributes:
        embed_dim: E, the features of query, key, value and output.
        num_heads: the heads; ``embed_dim`` must be divisible by it.
        bias: whether the projections have biases.
        causal: a fixed mask letting query i attend to keys j <= i only (top-left aligned when
            L != S, as ``torch.triu(ones(L, S), 1)``).
        dropout: the drop probability of the attention weights, in training.
        mask_inputs: the masks the call takes as positional inputs, in this order, after the
            query (and key, value): ``("key_padding_mask",)``, ``("attn_mask",)`` or both.
            For graphs, whose inputs are positional; a direct call may pass masks by name
            instead. A list is stored as a tuple.
    """

    embed_dim: int
    num_heads: int
    bias: bool = True
    causal: bool = False
    dropout: float = 0.0
    mask_inputs: tuple[str, ...] = ()

    @property
    def stochastic(self) -> bool:
        # (and a subclass of one's own whose __call__ reads its rng, as Module.stochastic says)
        return bool(self.dropout) or _reads_rng(type(self))

    def __post_init__(self) -> None:
        store_sizes(self, "embed_dim", "num_heads")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"MultiHeadAttention: embed_dim {self.embed_dim} is not divisible by num_heads "
                f"{self.num_heads}; each head gets embed_dim // num_heads features"
            )
        # a type first: a string failed comparing ('<=' not supported), True was taken as 1
        dropout = _real("MultiHeadAttention", "dropout", self.dropout)
        if not 0 <= dropout <= 1:
            raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1], got {self.dropout!r}")
        object.__setattr__(self, "dropout", dropout)
        check_flags(self, "bias", "causal")
        names = self.mask_inputs
        if not isinstance(names, tuple | list):
            raise ValueError(
                f"MultiHeadAttention: mask_inputs must be a tuple of names, got {names!r}; "
                "e.g. mask_inputs=('key_padding_mask',)"
            )
        for i, name in enumerate(names):
            if name not in _MASKS:
                raise ValueError(
                    "MultiHeadAttention: mask_inputs entries must be 'key_padding_mask' or "
                    f"'attn_mask', got {name!r}"
                )
            if name in names[:i]:
                raise ValueError(f"MultiHeadAttention: mask_inputs names {name!r} twice")
        object.__setattr__(self, "mask_inputs", tuple(names))  # (a spec gives back a list)

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
        self,
        params: Any,
        query: Any,
        *inputs: Any,
        key: Any = None,
        value: Any = None,
        attn_mask: Any = None,
        key_padding_mask: Any = None,
        rng: Any = None,
    ) -> Any:
        """Attends from ``query`` to ``key``/``value`` (or to itself).

        Args:
            params: this module's parameters.
            query: (batch, L, E).
            *inputs: ``key, value`` (both or neither), then the masks named in
                ``mask_inputs``, in that order.
            key: (batch, S, E), by name instead of positionally.
            value: (batch, S, E), by name instead of positionally.
            attn_mask: see the class docstring; None for none.
            key_padding_mask: (batch, S); None for none.
            rng: a Generator turns dropout on (training); None is evaluation.

        Returns:
            (batch, L, E).
        """
        check_params(self, params, self._expected())
        key, value, masks = self._inputs(inputs, key, value, attn_mask, key_padding_mask)
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
        dead = None
        if masks:
            scores, dead = self._masked(scores, masks, b, lq, lk)
        weights = ops_nn.softmax(scores, axis=-1)
        if dead is not None:
            weights = ops.where(dead, 0.0, weights)
        if self.dropout and rng is not None:
            weights = ops_nn.dropout(weights, float(self.dropout), rng)
        out = ops.matmul(weights, self._heads(v, b, lk))  # (b, heads, lq, d)
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, lq, e))
        out = ops.matmul(out, params["out_proj_weight"])
        return ops.add(out, params["out_proj_bias"]) if self.bias else out

    def _inputs(
        self, inputs: tuple[Any, ...], key: Any, value: Any, attn_mask: Any, key_padding_mask: Any
    ) -> tuple[Any, Any, dict[str, Any]]:
        """``(key, value, {mask name: mask})`` from the positional inputs after the query and
        the keywords; the masks that are None left out."""
        n = len(self.mask_inputs)
        if len(inputs) not in (n, n + 2):
            if n == 0 and len(inputs) == 1:
                raise ValueError(f"{self!r}: pass both key and value, or neither (self-attention)")
            takes = f"query, then its mask_inputs {self.mask_inputs}" if n else "query"
            hint = (
                ""
                if n
                else "; to give masks as inputs (a graph's layer gets positional inputs only) "
                "name them in the module, e.g. nn.MultiHeadAttention(..., "
                "mask_inputs=('key_padding_mask',)), or pass them by name: "
                "m(params, x, key_padding_mask=pad)"
            )
            raise ValueError(
                f"{self!r} takes {takes} ({1 + n} inputs) or query, key, value"
                f"{', then ' + str(self.mask_inputs) if n else ''} ({3 + n} inputs); got "
                f"{1 + len(inputs)} inputs{hint}"
            )
        if len(inputs) == n + 2:
            if key is not None or value is not None:
                raise ValueError(f"{self!r}: key and value given twice, positionally and by name")
            key, value = inputs[0], inputs[1]
        masks = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask}
        for name, mask in zip(self.mask_inputs, inputs[len(inputs) - n :], strict=True):
            if masks[name] is not None:
                raise ValueError(
                    f"{self!r}: {name} given twice, as an input (mask_inputs) and by name"
                )
            masks[name] = mask
        return key, value, {k: m for k, m in masks.items() if m is not None}

    def _masked(
        self, scores: Any, masks: dict[str, Any], b: int, lq: int, lk: int
    ) -> tuple[Any, Any]:
        """``scores`` (b, heads, lq, lk) with the masks applied, and the rows every key of which
        is masked (b, heads, lq, 1) as a raw bool array: softmax would give them NaN, so their
        scores become 0 here and their weights 0 after it (torch's safe softmax)."""
        h = self.num_heads
        xp = ops.namespace_of(scores)
        dtype = ops.raw(scores).dtype
        kpm_shape = (b, lk)
        attn_shapes = [(lq, lk), (b * h, lq, lk), (b, h, lq, lk), (b, 1, lq, lk)]
        blocked: Any = None  # the bool masks, or-ed
        for name, mask in masks.items():
            if not hasattr(mask, "shape"):  # a nested list: read as an array, as numpy would
                mask = xp.asarray(mask)
            shape = tuple(mask.shape)
            if name == "key_padding_mask":
                if shape != kpm_shape:
                    raise ValueError(
                        f"{self!r}: key_padding_mask has shape {shape}, expected {kpm_shape} "
                        "(batch, key length), True at keys to ignore"
                    )
                view: tuple[int, ...] = (b, 1, 1, lk)
            else:
                if shape not in attn_shapes:
                    want = (
                        f"{attn_shapes[0]}, {attn_shapes[1]} (batch * heads, L, S) or "
                        f"{attn_shapes[2]} or {attn_shapes[3]} (per sample, batch first, as a "
                        "graph input needs)"
                    )
                    raise ValueError(f"{self!r}: attn_mask has shape {shape}, expected {want}")
                view = (b, h, lq, lk) if len(shape) == 3 else shape
            mask_dtype = getattr(mask, "dtype", None)
            if mask_dtype is not None and mask_dtype.kind == "b":
                m = xp.asarray(ops.raw(mask)).reshape(view)
                blocked = m if blocked is None else blocked | m
            elif mask_dtype is not None and is_floating(mask_dtype) and mask_dtype == dtype:
                scores = ops.add(scores, ops.reshape(mask, view))
            else:
                what = type(mask).__name__ if mask_dtype is None else mask_dtype
                raise TypeError(
                    f"{self!r}: {name} of dtype {what} and shape {shape}: a mask is bool "
                    "(True: masked, as torch) or float of the attention's dtype (added to the "
                    f"scores); the attention computes in {dtype}: cast it, e.g. "
                    f"{name}.astype(bool) or .astype({str(dtype)!r})"
                )
        if blocked is not None:
            scores = ops.add(scores, xp.where(blocked, -xp.inf, 0.0).astype(dtype))
        if lk == 0:
            return scores, None
        dead = xp.max(ops.raw(scores), axis=-1, keepdims=True) == -xp.inf
        return ops.where(dead, 0.0, scores), dead

    def flops(self, *input_shapes: Any) -> int:
        lq = int(input_shapes[0][1])
        # (the masks named in mask_inputs come last and cost no product)
        cross = len(input_shapes) - len(self.mask_inputs) > 1
        lk = int(input_shapes[1][1]) if cross else lq
        e = self.embed_dim
        projections = 2 * e * e * (lq + 2 * lk) + 2 * e * e * lq
        return projections + 2 * 2 * lq * lk * e

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return input_shapes[0]
