"""Every op in asyncnn.ops: gradients against finite differences, float32 and integer inputs,
and hypothesis properties over random shapes (forward values: test_ops_forward.py; error
messages: test_ops_errors.py)."""

from __future__ import annotations

import itertools
import math
import operator
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import asyncnn as ann
from asyncnn import ops
from asyncnn.backends import to_numpy
from asyncnn.testing import check_grads

from _ops_cases import ref_conv


# -- input specs: how each argument of a case is made ---------------------------------------------
class Spec:
    """A float64 input: standard normal, positive (for log/sqrt/pow), or away from 0 (kinks)."""

    def __init__(self, shape: tuple[int, ...], kind: str = "normal") -> None:
        self.shape = shape
        self.kind = kind

    def make(self, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "pos":
            return rng.uniform(0.5, 2.0, self.shape)
        if self.kind == "away":  # |x| >= 0.2: keeps relu/abs/division off their kinks
            return rng.choice([-1.0, 1.0], self.shape) * rng.uniform(0.2, 2.0, self.shape)
        x = rng.standard_normal(self.shape)
        if self.kind == "zeros":  # entries 1, 4, 7, 11 (those there are) set to 0
            x.reshape(-1)[[i for i in (1, 4, 7, 11) if i < x.size]] = 0.0
        return x

    def __repr__(self) -> str:
        return f"{self.kind}{self.shape}"


def N(*shape: int) -> Spec:  # noqa: N802 - short names keep each case on one line
    return Spec(shape)


def P(*shape: int) -> Spec:  # noqa: N802
    return Spec(shape, "pos")


def A(*shape: int) -> Spec:  # noqa: N802
    return Spec(shape, "away")


def Z(*shape: int) -> Spec:  # noqa: N802
    """Normal, with zeros: in a (3, 4) array one in row 0, two in row 1, none in row 2, and two
    in column 3; in a (2, 3, 4) array one or two along each axis."""
    return Spec(shape, "zeros")


def build(backend: Any, specs: tuple[Any, ...], seed: int = 0, dtype: Any = np.float64) -> list:
    """Backend arrays for the specs; numpy constants (int labels, masks) pass through as given."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        if isinstance(s, Spec):
            out.append(backend.asarray(s.make(rng).astype(dtype)))
        elif isinstance(s, np.ndarray):
            out.append(backend.asarray(s))
        else:
            out.append(s)
    return out


I = np.array  # integer / boolean constants  # noqa: E741


def case(name: str, fn: Callable[..., Any], *specs: Any) -> Any:
    return pytest.param(fn, specs, id=name)


# -- one line per op and variant ------------------------------------------------------------------
GRAD_CASES = [
    # elementwise binary, with broadcasting and scalars
    case("add", ops.add, N(3, 4), N(3, 4)),
    case("add-bcast-3x1-1x4", ops.add, N(3, 1), N(1, 4)),
    case("add-bcast-4-234", ops.add, N(4), N(2, 3, 4)),
    case("add-0d", ops.add, N(2, 3), N()),
    case("add-pyscalar", lambda a: ops.add(a, 2.5), N(2, 3)),
    case("radd-operator", lambda a: 1.5 + a, N(3)),
    case("subtract", ops.subtract, N(3, 1), N(1, 4)),
    case("subtract-4-234", ops.subtract, N(2, 3, 4), N(4)),
    case("rsub-operator", lambda a: 2.0 - a, N(3)),
    case("multiply", ops.multiply, N(3, 1), N(1, 4)),
    case("multiply-4-234", ops.multiply, N(4), N(2, 3, 4)),
    case("multiply-0d", ops.multiply, N(), N(2, 3)),
    case("multiply-pyscalar", lambda a: a * 3.0, N(2, 2)),
    case("divide", ops.divide, N(3, 1), A(1, 4)),
    case("divide-4-234", ops.divide, N(2, 3, 4), A(4)),
    case("rdivide-pyscalar", lambda b: 2.0 / b, A(3)),
    case("negative", ops.negative, N(2, 3)),
    case("square", ops.square, N(2, 3)),
    case("power", ops.power, P(3, 4), N(3, 4)),
    case("power-bcast", ops.power, P(3, 1), N(4)),
    case("power-int-exponent", lambda a: ops.power(a, 3), N(2, 3)),
    case("power-operator-float", lambda a: a**2.5, P(2, 3)),
    case("rpow", lambda b: 2.0**b, N(3)),
    case("power-0-to-the-0", lambda a: (a * 0) ** 0 + a, N(3)),  # d/da a**0 is 0 at a == 0 too
    case("power-0-to-array-0", lambda a: ops.power(a * 0, ops.raw(a) * 0) + a, N(3)),
    # elementwise unary
    case("exp", ops.exp, N(2, 3)),
    case("log", ops.log, P(2, 3)),
    case("tanh", ops.tanh, N(2, 3)),
    case("sigmoid", ops.sigmoid, N(2, 3)),
    case("relu", ops.relu, A(3, 4)),
    case("gelu", ops.gelu, N(3, 4)),
    case("gelu-tanh", lambda x: ops.gelu(x, approximate="tanh"), N(3, 4)),
    case("sqrt", ops.sqrt, P(2, 3)),
    case("abs", ops.abs, A(2, 3)),
    case("log1p", ops.log1p, P(2, 3)),
    case("expm1", ops.expm1, N(2, 3)),
    case("sin", ops.sin, N(2, 3)),
    case("cos", ops.cos, N(2, 3)),
    case("clip", lambda x: ops.clip(x, -0.7, 0.9), N(3, 4)),
    case("clip-min-only", lambda x: ops.clip(x, min=-0.3), N(3, 4)),
    case("clip-max-only", lambda x: ops.clip(x, max=0.4), N(3, 4)),
    case("leaky_relu", ops.leaky_relu, A(3, 4)),
    case("leaky_relu-slope", lambda x: ops.leaky_relu(x, negative_slope=0.2), A(3, 4)),
    case("elu", ops.elu, A(3, 4)),
    case("elu-alpha", lambda x: ops.elu(x, alpha=0.5), A(3, 4)),
    case("silu", ops.silu, N(3, 4)),
    case("softplus", ops.softplus, N(3, 4)),
    case("softplus-beta-threshold", lambda x: ops.softplus(x, beta=2.0, threshold=1.5), N(3, 4)),
    case("maximum", ops.maximum, N(3, 1), N(1, 4)),
    case("minimum", ops.minimum, N(2, 3, 4), N(4)),
    case("where", lambda c, a, b: ops.where(c, a, b), I([[True], [False]]), N(2, 3), N(3)),
    # reductions
    case("sum-all", ops.sum, N(2, 3, 4)),
    case("sum-axis0", lambda x: ops.sum(x, axis=0), N(2, 3, 4)),
    case("sum-axis-1-keepdims", lambda x: ops.sum(x, axis=-1, keepdims=True), N(2, 3, 4)),
    case("sum-tuple", lambda x: ops.sum(x, axis=(0, 2)), N(2, 3, 4)),
    case("sum-method", lambda x: x.sum(axis=1), N(2, 3)),
    case("sum-numpy-function", lambda x: np.sum(x, axis=0), N(2, 3)),
    case("mean-numpy-function", lambda x: np.mean(x, axis=(0, 1), keepdims=True), N(2, 3)),
    case("max-numpy-function", lambda x: np.max(x, axis=1), N(2, 3)),
    case("min-method", lambda x: x.min(axis=0), N(2, 3)),
    case("mean-all", ops.mean, N(2, 3, 4)),
    case("mean-axis1", lambda x: ops.mean(x, axis=1), N(2, 3, 4)),
    case("mean-tuple-keepdims", lambda x: ops.mean(x, (0, 2), keepdims=True), N(2, 3, 4)),
    case("max-all", ops.max, N(2, 3, 4)),
    case("max-axis1", lambda x: ops.max(x, axis=1), N(2, 3, 4)),
    case("max-tuple-keepdims", lambda x: ops.max(x, (0, 2), keepdims=True), N(2, 3, 4)),
    case("min-all", ops.min, N(2, 3, 4)),
    case("min-axis-1", lambda x: ops.min(x, axis=-1), N(2, 3, 4)),
    case("min-tuple", lambda x: ops.min(x, axis=(1, 2), keepdims=True), N(2, 3, 4)),
    case("var-all", ops.var, N(2, 3, 4)),
    case("var-axis1-ddof1", lambda x: ops.var(x, axis=1, ddof=1), N(2, 3, 4)),
    case("var-tuple-keepdims", lambda x: ops.var(x, (0, 2), ddof=0.5, keepdims=True), N(2, 3, 4)),
    case("std-all", ops.std, N(2, 3, 4)),
    case("std-axis-1-ddof1", lambda x: ops.std(x, axis=-1, ddof=1), N(2, 3, 4)),
    case("std-tuple-keepdims", lambda x: ops.std(x, (0, 1), keepdims=True), N(2, 3, 4)),
    case("var-ddof-true", lambda x: ops.var(x, axis=1, ddof=True), N(2, 3, 4)),  # (numpy's 1)
    case("std-ddof-np-true", lambda x: ops.std(x, axis=0, ddof=np.True_), N(2, 3, 4)),
    case("var-ddof-near-n", lambda x: ops.var(x, axis=1, ddof=2.5), N(2, 3, 4)),
    case("std-ddof-near-n", lambda x: ops.std(x, axis=-1, ddof=3.5), N(2, 3, 4)),
    case("cumsum-axis0", lambda x: ops.cumsum(x, 0), N(3, 4)),
    case("cumsum-axis1", lambda x: ops.cumsum(x, axis=1), N(2, 3, 4)),
    case("cumsum-axis-1", lambda x: ops.cumsum(x, -1), N(2, 3, 4)),
    case("cumsum-axis-3", lambda x: ops.cumsum(x, -3), N(2, 3, 4)),
    case("cumsum-flattened", ops.cumsum, N(2, 3, 4)),  # (axis=None: numpy's flattened sums)
    case("cumsum-0d", ops.cumsum, N()),
    case("cumsum-empty", lambda x: ops.cumsum(x, 1), N(2, 0, 3)),
    case("cumsum-numpy-function", lambda x: np.cumsum(x, 1), N(2, 3)),
    case("cumsum-method", lambda x: x.cumsum(), N(2, 3)),
    # (products with zeros: multilinear, so finite differences hold at a zero too)
    case("prod-all", ops.prod, N(2, 3, 4)),
    case("prod-axis1", lambda x: ops.prod(x, axis=1), Z(3, 4)),
    case("prod-axis0-keepdims", lambda x: ops.prod(x, 0, keepdims=True), Z(3, 4)),
    case("prod-axis-1", lambda x: ops.prod(x, -1), Z(2, 3, 4)),
    case("prod-tuple", lambda x: ops.prod(x, (0, 2)), Z(2, 3, 4)),
    case("prod-tuple-keepdims", lambda x: ops.prod(x, (-1, 0), keepdims=True), N(2, 3, 4)),
    case("prod-all-one-zero", ops.prod, Z(2, 2)),
    case("prod-all-zeros", ops.prod, Z(3, 4)),
    case("prod-no-axis", lambda x: ops.prod(x, ()), N(2, 3)),
    case("prod-0d", ops.prod, N()),
    case("prod-empty", lambda x: ops.prod(x, 1), N(2, 0, 3)),
    case("prod-numpy-function", lambda x: np.prod(x, 1), Z(3, 4)),
    case("prod-method", lambda x: x.prod(axis=0, keepdims=True), Z(3, 4)),
    case("cumprod-axis0", lambda x: ops.cumprod(x, 0), Z(3, 4)),
    case("cumprod-axis1", lambda x: ops.cumprod(x, axis=1), Z(3, 4)),
    case("cumprod-axis-1", lambda x: ops.cumprod(x, -1), Z(2, 3, 4)),
    case("cumprod-axis-3", lambda x: ops.cumprod(x, -3), N(2, 3, 4)),
    case("cumprod-flattened", ops.cumprod, Z(2, 3, 4)),  # (axis=None: numpy's, flattened)
    case("cumprod-long", lambda x: ops.cumprod(x, 1), Z(2, 13)),  # (a scan of 4 rounds)
    case("cumprod-0d", ops.cumprod, N()),
    case("cumprod-empty", lambda x: ops.cumprod(x, 1), N(2, 0, 3)),
    case("cumprod-numpy-function", lambda x: np.cumprod(x, 1), Z(3, 4)),
    case("cumprod-method", lambda x: x.cumprod(), Z(3, 4)),
    # shapes and indexing
    case("reshape", lambda x: ops.reshape(x, (6, 4)), N(2, 3, 4)),
    case("reshape-minus1", lambda x: x.reshape(-1), N(2, 3, 4)),
    case("transpose", ops.transpose, N(2, 3, 4)),
    case("transpose-axes", lambda x: ops.transpose(x, (1, 0, 2)), N(2, 3, 4)),
    case("transpose-T", lambda x: x.T, N(2, 3)),
    case("getitem-slices", lambda x: x[1:, ::2], N(3, 5)),
    case("getitem-int", lambda x: x[1], N(3, 4)),
    case("getitem-ellipsis-none", lambda x: x[..., None, 1:3], N(2, 3, 4)),
    case("getitem-int-array-repeats", lambda x, i: x[i], N(3, 4), I([0, 2, 0, 0])),
    case("getitem-2d-int-array", lambda x, i: ops.getitem(x, i), N(4, 2), I([[0, 3], [3, 3]])),
    case("getitem-array-pair", lambda x, i, j: x[i, j], N(3, 4), I([0, 1, 0]), I([2, 2, 2])),
    case("getitem-bool-mask", lambda x, m: x[m], N(2, 3),
         I([[True, False, True], [0, 1, 1]], bool) ),
    case("take-axis0", lambda x, i: ops.take(x, i), N(4, 3), I([3, 0, 3])),
    case("take-axis1-2d", lambda x, i: ops.take(x, i, axis=1), N(2, 4, 3), I([[1, 1], [0, 3]])),
    case("take-list", lambda x: ops.take(x, [2, -1, 0], axis=1), N(2, 3)),
    case("take-int", lambda x: ops.take(x, 1), N(3, 2)),
    case("pad-constant", lambda x: ops.pad(x, 1), N(2, 3)),
    case("pad-constant-pairs", lambda x: ops.pad(x, ((0, 2), (1, 0)), constant_values=1.5), N(2, 3)),
    case("pad-edge", lambda x: ops.pad(x, ((2, 1), (0, 3)), mode="edge"), N(2, 3)),
    case("pad-edge-one-pair", lambda x: ops.pad(x, (1, 2), "edge"), N(2, 3, 2)),
    case("pad-reflect", lambda x: ops.pad(x, ((2, 1), (3, 0)), mode="reflect"), N(3, 4)),
    case("pad-reflect-past-the-length", lambda x: ops.pad(x, (7, 5), mode="reflect"), N(3)),
    case("pad-reflect-length-1", lambda x: ops.pad(x, ((0, 0), (2, 1)), "reflect"), N(2, 1)),
    case("pad-empty-axis-unpadded", lambda x: ops.pad(x, ((0, 0), (1, 2)), "edge"), N(0, 3)),
    case("pad-numpy-function", lambda x: np.pad(x, ((1, 0), (2, 2)), mode="reflect"), N(2, 3)),
    case("flip-all", ops.flip, N(2, 3, 4)),
    case("flip-axis", lambda x: ops.flip(x, 1), N(2, 3, 4)),
    case("flip-tuple", lambda x: ops.flip(x, (0, -1)), N(2, 3, 4)),
    case("flip-0d", ops.flip, N()),
    case("flip-numpy-function", lambda x: np.flip(x, -2), N(2, 3)),
    case("take_along_axis-axis1", lambda x, i: ops.take_along_axis(x, i, 1), N(3, 4),
         I([[0, 3, 3], [1, 1, 1], [2, 0, -1]])),
    case("take_along_axis-axis0", lambda x, i: ops.take_along_axis(x, i, axis=0), N(3, 4),
         I([[2, 0, 1, 1], [2, 2, 0, -3]])),
    case("take_along_axis-broadcast", lambda x, i: ops.take_along_axis(x, i, -1), N(2, 3, 4),
         I([[[3, 3]], [[0, 1]]])),
    case("take_along_axis-flattened", lambda x, i: ops.take_along_axis(x, i, None), N(2, 3),
         I([5, 0, 5, 2])),
    case("take_along_axis-numpy-function", lambda x, i: np.take_along_axis(x, i, 0), N(3, 2),
         I([[1, 1], [0, 2]])),
    case("repeat-int", lambda x: ops.repeat(x, 3, axis=1), N(2, 3, 2)),
    case("repeat-counts", lambda x: ops.repeat(x, [2, 0, 3], 0), N(3, 4)),
    case("repeat-one-count", lambda x: ops.repeat(x, [2], axis=-1), N(2, 3)),
    case("repeat-flattened", lambda x: ops.repeat(x, 2), N(2, 3)),
    case("repeat-numpy-function", lambda x: np.repeat(x, [1, 3], axis=0), N(2, 3)),
    case("tile", lambda x: ops.tile(x, (2, 3)), N(2, 3)),
    case("tile-int", lambda x: ops.tile(x, 2), N(2, 3)),
    case("tile-more-reps", lambda x: ops.tile(x, (2, 1, 3)), N(2, 3)),
    case("tile-fewer-reps", lambda x: ops.tile(x, (3,)), N(2, 2, 3)),
    case("tile-zero", lambda x: ops.tile(x, (0, 2)), N(2, 3)),
    case("tile-numpy-function", lambda x: np.tile(x, (2, 1)), N(2, 3)),
    case("concatenate-axis0", lambda a, b: ops.concatenate([a, b]), N(2, 3), N(1, 3)),
    case("concatenate-axis-1", lambda a, b, c: ops.concatenate([a, b, c], -1), N(2, 1), N(2, 3),
         N(2, 2)),
    case("stack-axis0", lambda a, b: ops.stack([a, b]), N(2, 3), N(2, 3)),
    case("stack-axis-1", lambda a, b: ops.stack([a, b], axis=-1), N(2, 3), N(2, 3)),
    # (pieces 2 and 0 back, piece 1 none: its gradient is zeros)
    case("unstack-axis1", lambda x: ops.stack(ops.unstack(x, axis=1)[::-2]), N(2, 3, 4)),
    case("unstack-axis0-reused", lambda x: (lambda p: p[0] * p[0] + p[1])(ops.unstack(x)),
         N(2, 3)),
    case("squeeze", ops.squeeze, N(2, 1, 3, 1)),
    case("squeeze-axis", lambda x: ops.squeeze(x, 1), N(2, 1, 3)),
    case("expand_dims", lambda x: ops.expand_dims(x, 1), N(2, 3)),
    case("expand_dims-last", lambda x: ops.expand_dims(x, -1), N(2, 3)),
    case("broadcast_to", lambda x: ops.broadcast_to(x, (2, 3, 4)), N(3, 1)),
    # matrix products
    case("matmul-2d", ops.matmul, N(3, 4), N(4, 5)),
    case("matmul-batched", ops.matmul, N(2, 3, 4), N(2, 4, 5)),
    case("matmul-bcast-batch", ops.matmul, N(2, 1, 3, 4), N(3, 4, 2)),
    case("matmul-matrix-batch", ops.matmul, N(3, 4), N(2, 4, 2)),
    case("matmul-vec-vec", ops.matmul, N(4), N(4)),
    case("matmul-vec-mat", ops.matmul, N(4), N(4, 5)),
    case("matmul-mat-vec", ops.matmul, N(3, 4), N(4)),
    case("matmul-batch-vec", ops.matmul, N(2, 3, 4), N(4)),
    case("matmul-operator", lambda a, b: a @ b, N(2, 3), N(3, 2)),
    # softmax family
    case("softmax", ops.softmax, N(3, 5)),
    case("softmax-axis0", lambda x: ops.softmax(x, axis=0), N(3, 4)),
    case("log_softmax", ops.log_softmax, N(3, 5)),
    case("log_softmax-axis1", lambda x: ops.log_softmax(x, axis=1), N(2, 3, 4)),
    case("logsumexp", ops.logsumexp, N(3, 5)),
    case("logsumexp-keepdims", lambda x: ops.logsumexp(x, axis=1, keepdims=True), N(2, 3, 4)),
    # convolutions: (x, weight, bias)
    case("conv1d", ops.conv1d, N(2, 3, 7), N(4, 3, 3), N(4)),
    case("conv1d-nobias", ops.conv1d, N(2, 3, 7), N(4, 3, 3)),
    case("conv1d-s2-p1", lambda x, w, b: ops.conv1d(x, w, b, stride=2, padding=1), N(2, 2, 8),
         N(3, 2, 3), N(3)),
    case("conv1d-p2-d2", lambda x, w: ops.conv1d(x, w, padding=2, dilation=2), N(1, 2, 6),
         N(3, 2, 3) ),
    case("conv1d-s3-d2", lambda x, w: ops.conv1d(x, w, stride=3, dilation=2), N(2, 1, 11),
         N(2, 1, 2) ),
    case("conv2d", ops.conv2d, N(2, 2, 5, 4), N(3, 2, 3, 2), N(3)),
    case("conv2d-s2-p1", lambda x, w, b: ops.conv2d(x, w, b, 2, 1), N(1, 2, 5, 5), N(2, 2, 3, 3),
         N(2)),
    case("conv2d-pairs", lambda x, w: ops.conv2d(x, w, None, (1, 2), (2, 0), (2, 1)),
         N(2, 1, 4, 6), N(2, 1, 2, 3)),
    case("conv2d-empty-batch", ops.conv2d, N(0, 2, 4, 4), N(3, 2, 2, 2), N(3)),
    # pools
    case("max_pool1d", lambda x: ops.max_pool1d(x, 2), N(2, 3, 8)),
    case("max_pool1d-s1-p1", lambda x: ops.max_pool1d(x, 3, stride=1, padding=1), N(2, 2, 5)),
    case("max_pool2d", lambda x: ops.max_pool2d(x, 2), N(2, 2, 4, 5)),
    case("max_pool2d-overlap-pad", lambda x: ops.max_pool2d(x, 3, 2, 1), N(1, 2, 5, 6)),
    case("max_unpool1d", lambda x, i: ops.max_unpool1d(x, i, 2), N(1, 2, 3),
         I([[[0, 3, 5], [1, 2, 4]]])),
    case("max_unpool2d-pad", lambda x, i: ops.max_unpool2d(x, i, 3, 2, 1), N(1, 1, 2, 2),
         I([[[[0, 2], [6, 8]]]])),
    case("avg_pool1d", lambda x: ops.avg_pool1d(x, 3), N(2, 3, 7)),
    case("avg_pool1d-s2-p1", lambda x: ops.avg_pool1d(x, 3, 2, 1), N(2, 2, 6)),
    case("avg_pool2d", lambda x: ops.avg_pool2d(x, (2, 3)), N(1, 2, 4, 6)),
    case("avg_pool2d-pad", lambda x: ops.avg_pool2d(x, 3, (2, 1), (1, 0)), N(2, 1, 5, 4)),
    # normalization, losses, lookups
    case("layer_norm-plain", ops.layer_norm, N(3, 5)),
    case("layer_norm", ops.layer_norm, N(2, 3, 4), N(4), N(4)),
    case("layer_norm-2d-weight", lambda x, w: ops.layer_norm(x, w), N(2, 3, 4), N(3, 4)),
    case("layer_norm-bias-only", lambda x, b: ops.layer_norm(x, None, b, eps=0.1), N(2, 4), N(4)),
    case("group_norm", lambda x, w, b: ops.group_norm(x, 2, w, b), N(2, 4, 3), N(4), N(4)),
    case("group_norm-plain", lambda x: ops.group_norm(x, 3, eps=0.1), N(2, 6)),
    case("group_norm-2d-weight-only", lambda x, w: ops.group_norm(x, 2, w), N(2, 4, 3, 2), N(4)),
    case("group_norm-one-group-bias", lambda x, b: ops.group_norm(x, 1, None, b), N(3, 2, 5), N(2)),
    case("cross_entropy", ops.cross_entropy, N(4, 3), I([0, 2, 1, 2])),
    case("cross_entropy-sum", lambda x, y: ops.cross_entropy(x, y, "sum"), N(3, 4), I([3, 0, 1])),
    case("cross_entropy-none", lambda x, y: ops.cross_entropy(x, y, "none"), N(3, 4), I([3, 0, 0])),
    case("cross_entropy-spatial", ops.cross_entropy, N(2, 3, 4), I([[0, 1, 2, 2], [1, 1, 0, 2]])),
    case("cross_entropy-2x-none", lambda x, y: ops.cross_entropy(x, y, reduction="none"),
         N(2, 3, 2, 2), I([[[0, 1], [2, 2]], [[1, 1], [0, 2]]])),
    case("cross_entropy-ignore", lambda x, y: ops.cross_entropy(x, y, ignore_index=-100),
         N(4, 3), I([0, -100, 1, 2])),
    case("cross_entropy-ignore-class-sum", lambda x, y: ops.cross_entropy(x, y, "sum", 2),
         N(4, 3), I([0, 2, 1, 2])),
    case("cross_entropy-ignore-none", lambda x, y: ops.cross_entropy(x, y, "none", -1),
         N(2, 3, 4), I([[0, -1, 2, 2], [-1, 1, 0, 2]])),
    case("mse_loss", ops.mse_loss, N(3, 4), N(3, 4)),
    case("mse_loss-sum", lambda a, b: ops.mse_loss(a, b, "sum"), N(5), N(5)),
    case("mse_loss-none", lambda a, b: ops.mse_loss(a, b, reduction="none"), N(2, 3), N(2, 3)),
    case("embedding", ops.embedding, N(5, 3), I([[0, 4, 4], [2, 0, 4]])),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "specs"), GRAD_CASES)
def test_grad(backend: Any, fn: Callable[..., Any], specs: tuple[Any, ...]) -> None:
    check_grads(fn, *build(backend, specs), rtol=1e-6)


@pytest.mark.parametrize(("fn", "specs"), GRAD_CASES)
def test_float32_gives_float32_gradients(
    backend: Any, fn: Callable[..., Any], specs: tuple[Any, ...]
) -> None:
    args = build(backend, specs, dtype=np.float32)
    out, pullback = ann.vjp(fn, *args)
    assert out.dtype == np.float32
    grads = pullback(backend.xp.ones(out.shape, dtype=np.float32))
    for a, g in zip(args, grads, strict=True):
        if isinstance(a, float) or getattr(a, "dtype", None) == np.float32:
            assert g.dtype == np.float32 and g.shape == a.shape
        else:
            assert g is None  # integer and boolean inputs get no gradient


def test_every_public_op_has_a_gradient_case() -> None:
    tested = set()
    for p in GRAD_CASES:
        fn = p.values[0]
        tested.add(fn.__name__ if fn.__name__ != "<lambda>" else p.id.split("-")[0])
    # raw, astype, dropout have their own tests below; Primitive is the class ops are made of
    missing = set(ops.__all__) - tested - {"raw", "astype", "dropout", "Primitive"}
    assert not missing, f"no gradient case for {sorted(missing)}"


def test_astype_gradient_comes_back_in_the_input_dtype(backend: Any) -> None:
    x = backend.asarray(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    w = backend.asarray(np.array([0.5, -1.0, 2.0]))
    out, pullback = ann.vjp(lambda x: ops.sum(ops.astype(x, np.float64) * w), x)
    assert out.dtype == np.float64
    (g,) = pullback(1.0)
    assert g.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(g), [0.5, -1.0, 2.0])
    # and down: a float64 input cast to float32 gets a float64 gradient
    x64 = backend.asarray(np.array([1.0, 2.0]))
    (g64,) = ann.vjp(lambda x: ops.astype(x, np.float32) * 3.0, x64)[1](np.ones(2, np.float32))
    assert g64.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(g64), [3.0, 3.0])
    assert ops.astype(x64, np.float64) is x64  # no-op casts record nothing


def test_a_cast_to_a_wider_or_narrower_float_keeps_its_gradient() -> None:
    # the run's dtype setting refuses a long double or a float8, but the math differentiates
    # through a cast to one (a quantisation simulated by x.astype(float8).astype(float32)): a
    # narrowing of what counts as floating cut that gradient to zeros
    x = np.array([1.0, 2.0])
    g = ann.grad(lambda x: ops.sum(ops.astype(x * x, np.longdouble)))(x)
    np.testing.assert_array_equal(g, [2.0, 4.0])
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q = ann.grad(lambda x: ops.sum(ops.astype(ops.astype(x, ml_dtypes.float8_e5m2), np.float64)))
    np.testing.assert_array_equal(q(x), [1.0, 1.0])


@pytest.mark.parametrize("join", [ops.concatenate, ops.stack])
def test_joined_float32_and_float64_get_gradients_of_their_dtypes(backend: Any, join: Any) -> None:
    a32, a64 = backend.asarray(np.ones((2, 3), np.float32)), backend.asarray(np.ones((2, 3)))
    grads = ann.grad(lambda a, b: ops.sum(join([a, b, a])), argnums=(0, 1))(a32, a64)
    assert [g.dtype for g in grads] == [np.float32, np.float64]  # as in torch


@pytest.mark.parametrize("dtype", [np.int64, np.int8, bool])
def test_astype_to_integers_or_bools_is_a_constant(backend: Any, dtype: Any) -> None:
    x = backend.asarray(np.array([0.3, 1.7, -2.2]))  # a step function: no gradient, as in torch
    np.testing.assert_array_equal(to_numpy(ann.grad(lambda x: ops.sum(x.astype(dtype) * x))(x)),
                                  to_numpy(x.astype(dtype)).astype(float))  # fmt: skip


def test_dropout(backend: Any) -> None:
    x = backend.asarray(np.random.default_rng(1).standard_normal((4, 50)))
    check_grads(lambda x: ops.dropout(x, 0.3, backend.rng(0)), x)
    out = to_numpy(ops.dropout(x, 0.3, backend.rng(0)))
    keep = to_numpy(backend.rng(0).random(x.shape)) >= 0.3
    np.testing.assert_allclose(out, np.where(keep, to_numpy(x) / 0.7, 0.0), rtol=1e-15)
    assert 0.5 < keep.mean() < 0.9
    assert ops.dropout(x, 0.3, None) is x and ops.dropout(x, 0.0, backend.rng(0)) is x
    x32 = x.astype(np.float32)
    out32, pullback = ann.vjp(lambda x: ops.dropout(x, 0.5, backend.rng(2)), x32)
    assert out32.dtype == np.float32 and pullback(out32)[0].dtype == np.float32
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
            ops.dropout(x, p, backend.rng(0))
    ints = backend.asarray(np.arange(8).reshape(2, 4))  # 1 / 0.7 would be truncated to 1
    for rng in (backend.rng(0), None):
        with pytest.raises(TypeError, match="dropout: x must be floating point, got dtype int64"):
            ops.dropout(ints, 0.3, rng)


def test_integer_inputs_get_no_gradient(backend: Any) -> None:
    logits = backend.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    labels = backend.asarray(np.array([1, 0, 3]))
    g_logits, g_labels = ann.vjp(ops.cross_entropy, logits, labels)[1](1.0)
    assert g_labels is None and g_logits.shape == (3, 4)
    # the gradient of the mean cross-entropy is (softmax - onehot) / N
    p = to_numpy(ops.softmax(logits))
    p[np.arange(3), [1, 0, 3]] -= 1
    np.testing.assert_allclose(to_numpy(g_logits), p / 3, rtol=1e-12)


# -- cumsum: numpy's values and dtypes, torch's 16-bit sums and gradients ------------------------
@pytest.mark.parametrize("axis", [0, 1, -1, -3, None])
@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "int32", "int8", "uint8", "bool"])
def test_cumsum_is_numpy_s(backend: Any, axis: Any, dtype: str) -> None:
    # (no cumulative sum at all: np.cumsum(t, 1) of a traced array was refused, and torch's
    # cumsum had no op to port to.) Integers and bools sum in numpy's dtypes, as ops.sum: int64
    # (uint64 for unsigned), where torch gives int64 for every integer
    host = np.arange(-11, 13).reshape(2, 3, 4) % 5 - 1
    host = host.astype(dtype)
    got = ops.cumsum(backend.asarray(host), axis)
    want = np.cumsum(host, axis)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(to_numpy(got), want)


def test_cumsum_of_a_0d_or_an_empty_array_is_numpy_s(backend: Any) -> None:
    for host, axis in ((np.array(2.5), None), (np.zeros((2, 0, 3)), 1), (np.zeros((0,)), None)):
        got = ops.cumsum(backend.asarray(host), axis)
        assert got.shape == np.cumsum(host, axis).shape
        np.testing.assert_array_equal(to_numpy(got), np.cumsum(host, axis))


def test_cumsum_gradient_is_the_reversed_cumulative_sum_of_the_cotangent(backend: Any) -> None:
    x = backend.asarray(np.arange(12.0).reshape(3, 4))
    ct = np.arange(1.0, 13.0).reshape(3, 4)
    for axis in (0, 1, -1):
        (g,) = ann.vjp(lambda x, axis=axis: ops.cumsum(x, axis), x)[1](backend.asarray(ct))
        want = np.flip(np.cumsum(np.flip(ct, axis), axis), axis)
        np.testing.assert_array_equal(to_numpy(g), want)
    (g,) = ann.vjp(ops.cumsum, x)[1](backend.asarray(ct.reshape(-1)))  # (flattened: reshaped)
    np.testing.assert_array_equal(to_numpy(g), np.cumsum(ct.reshape(-1)[::-1])[::-1].reshape(3, 4))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("axis", [1, -2, None])
def test_cumsum_value_and_gradient_match_torch(backend: Any, dtype: str, axis: Any) -> None:
    torch = pytest.importorskip("torch")
    from asyncnn.backends import BFLOAT16

    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(3)
    host = rng.standard_normal((3, 40)).astype(dt)
    ct = rng.standard_normal((3, 40) if axis is not None else (120,)).astype(dt)
    out, pullback = ann.vjp(lambda x: ops.cumsum(x, axis), backend.asarray(host))
    (g,) = pullback(backend.asarray(ct))
    assert out.dtype == g.dtype == dt  # (torch's cumsum keeps a 16-bit dtype)
    # (through float64, which holds every entry of each dtype exactly)
    tx = torch.tensor(host.astype(np.float64), dtype=getattr(torch, dtype), requires_grad=True)
    ty = torch.cumsum(tx.reshape(-1) if axis is None else tx, 0 if axis is None else axis)
    ty.backward(torch.tensor(ct.astype(np.float64), dtype=getattr(torch, dtype)))
    assert tx.grad is not None
    tol = {"float64": 1e-12, "float32": 1e-5}.get(dtype, 1e-2)
    for got, want in ((out, ty), (g, tx.grad)):
        want64 = want.detach().double().numpy()
        np.testing.assert_allclose(to_numpy(got).astype(np.float64), want64, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_cumsum_accumulates_in_float32_and_rounds_once(backend: Any, dtype: str) -> None:
    # as torch: a float16 running sum of 3000 entries of 0.1 stalls at 256 (0.1 is below half
    # a float16 step there), where torch's is 300
    from asyncnn.backends import BFLOAT16

    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    x = backend.asarray(np.full(3000, 0.1, dtype=dt))
    want = np.cumsum(np.full(3000, 0.1, dtype=dt).astype(np.float32)).astype(dt)
    out, pullback = ann.vjp(ops.cumsum, x)
    assert out.dtype == dt
    np.testing.assert_array_equal(to_numpy(out).astype(np.float32), want.astype(np.float32))
    (g,) = pullback(x)  # the reversed running sums of the same entries
    np.testing.assert_array_equal(to_numpy(g).astype(np.float32), want[::-1].astype(np.float32))


# -- prod and cumprod: numpy's values and dtypes, torch's gradients, exact at zeros ---------------
@pytest.mark.parametrize("axis", [0, 1, -1, -3, None])
@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "int32", "int8", "uint8", "bool"])
def test_prod_and_cumprod_are_numpy_s(backend: Any, axis: Any, dtype: str) -> None:
    # (no product at all: np.prod(t) of a traced array was refused through multiply.reduce,
    # np.cumprod(t) converted it.) Integers and bools multiply in numpy's dtypes, as ops.sum
    host = (np.arange(-11, 13).reshape(2, 3, 4) % 5 - 1).astype(dtype)
    for op, ref in ((ops.prod, np.prod), (ops.cumprod, np.cumprod)):
        got = op(backend.asarray(host), axis)
        want = ref(host, axis)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(to_numpy(got), want)
    got = ops.prod(backend.asarray(host), axis, keepdims=True)
    assert got.shape == np.prod(host, axis, keepdims=True).shape


def test_prod_and_cumprod_of_a_0d_or_an_empty_array_are_numpy_s(backend: Any) -> None:
    # (the product of nothing is 1)
    for host, axis in ((np.array(2.5), None), (np.zeros((2, 0, 3)), 1), (np.zeros((0,)), None)):
        for op, ref in ((ops.prod, np.prod), (ops.cumprod, np.cumprod)):
            got = op(backend.asarray(host), axis)
            assert got.shape == ref(host, axis).shape
            np.testing.assert_array_equal(to_numpy(got), ref(host, axis))
    np.testing.assert_array_equal(to_numpy(ops.prod(backend.asarray(np.ones((2, 3))), ())), 1.0)


def _prod_grad(x: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """The gradient of the product of each row of ``x``: the others' product, by brute force."""
    return np.array(
        [[c * np.prod(np.delete(r, i)) for i in range(r.size)] for r, c in zip(x, ct, strict=True)]
    )


def _cumprod_grad(x: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """The gradient of each row's running product: sum over j >= i of ct[j] times the product
    of entries 0..j but i, by brute force."""
    n = x.shape[1]
    return np.array([
        [sum(c[j] * np.prod(np.delete(r[: j + 1], i)) for j in range(i, n)) for i in range(n)]
        for r, c in zip(x, ct, strict=True)
    ])  # fmt: skip


# rows: one zero, two zeros, a zero at each end, none
_ZEROS = np.array([[2.0, 0.0, 3.0, 4.0, -1.0], [0.0, 5.0, 0.0, 2.0, 3.0],
                   [0.0, 2.0, 3.0, 4.0, 0.0], [1.0, -2.0, 3.0, 4.0, 0.5]])  # fmt: skip


def test_prod_and_cumprod_gradients_are_exact_at_zeros(backend: Any) -> None:
    # never a division by the input: the product of the others is 24, not 0 * 24 / 0
    x = backend.asarray(_ZEROS)
    ct = np.array([1.0, -2.0, 0.5, 3.0])
    (g,) = ann.vjp(lambda x: ops.prod(x, axis=1), x)[1](backend.asarray(ct))
    np.testing.assert_array_equal(to_numpy(g), _prod_grad(_ZEROS, ct))
    assert to_numpy(g)[0, 1] == -24.0 and not to_numpy(g)[1].any()  # (two zeros: all 0)
    (g,) = ann.vjp(lambda x: ops.prod(x, axis=0), x.T)[1](backend.asarray(ct))
    np.testing.assert_array_equal(to_numpy(g), _prod_grad(_ZEROS, ct).T)
    cts = np.arange(1.0, 21.0).reshape(4, 5) * np.array([1.0, -1.0, 0.5, 2.0, -0.25])
    (g,) = ann.vjp(lambda x: ops.cumprod(x, axis=-1), x)[1](backend.asarray(cts))
    np.testing.assert_array_equal(to_numpy(g), _cumprod_grad(_ZEROS, cts))
    (g,) = ann.vjp(ops.cumprod, x)[1](backend.asarray(cts.reshape(-1)))  # (flattened)
    want = _cumprod_grad(_ZEROS.reshape(1, -1), cts.reshape(1, -1)).reshape(4, 5)
    np.testing.assert_array_equal(to_numpy(g), want)


def test_prod_gradient_survives_a_product_that_underflows(backend: Any) -> None:
    # no zero, but the product underflows to 0: the others' product divided out of it was 0
    # (torch's prod backward divides where no entry is 0: it gives 0 here)
    host = np.array([1e-200, 1e-200, 1e200])
    g = ann.grad(lambda x: ops.prod(x))(backend.asarray(host))
    np.testing.assert_allclose(to_numpy(g), [1.0, 1.0, 0.0], rtol=1e-12)  # (1e-400 is 0)


def _exact_grad(op: str, x: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """The gradient of ``op`` (prod or cumprod of a row ``x``) in exact rationals, rounded once
    to ``x``'s dtype (inf past its range)."""
    from fractions import Fraction

    xs, cs = [Fraction(float(v)) for v in x], [Fraction(float(c)) for c in np.ravel(ct)]
    n = len(xs)

    def others(i: int, upto: int) -> Fraction:  # the product of entries 0..upto but i
        return math.prod((xs[k] for k in range(upto + 1) if k != i), start=Fraction(1))

    if 0 in xs:  # (by the definition: rows of a few entries)
        if op == "prod":
            exact = [cs[0] * others(i, n - 1) for i in range(n)]
        else:
            exact = [
                sum((cs[j] * others(i, j) for j in range(i, n)), Fraction(0)) for i in range(n)
            ]
    else:  # the product, or each later running product c[j] * out[j], over x[i]
        outs = list(itertools.accumulate(xs, operator.mul))
        tails = [cs[0] * outs[-1]] * n if op == "prod" else [Fraction(0)] * n
        for i in reversed(range(n) if op == "cumprod" else ()):
            tails[i] = cs[i] * outs[i] + (tails[i + 1] if i + 1 < n else 0)
        exact = [t / v for t, v in zip(tails, xs, strict=True)]

    def rounded(v: Fraction) -> float:  # (past float64's range: inf)
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf

    with np.errstate(over="ignore"):  # (past float32's: inf too)
        return np.array([rounded(v) for v in exact]).astype(x.dtype)


# rows whose product and gradient are finite, but whose partial products are not
_WIDE_RANGE = {
    "float32-down-and-up": np.array([0.5] * 120 + [2.0] * 130, np.float32),
    "float64-down-and-up": np.array([0.5] * 1000 + [2.0] * 1010),
    "float32-tiny-first": np.array([1e-30, 1.0, 1e30, 1e30], np.float32),
    "float64-tiny-first": np.array([1e-200, 1.0, 1e200, 1e200]),
    "float32-tiny-ends": np.array([1e-20, 2.0, 1e20, 1e20, 1e-20], np.float32),
    "float64-up-and-down": np.array([2.0] * 1000 + [0.5] * 1010),
}


@pytest.mark.parametrize("name", list(_WIDE_RANGE))
@pytest.mark.parametrize("op", ["prod", "cumprod"])
def test_prod_and_cumprod_gradients_do_not_overflow_where_they_are_finite(
    backend: Any, op: str, name: str
) -> None:
    # (the running products from the other end overflowed: float32 [0.5]*120 + [2]*130 has a
    # product of 1024, yet its gradient was inf at 122 entries, with numpy's overflow warning,
    # an error here; torch's is finite)
    torch = pytest.importorskip("torch")
    x = _WIDE_RANGE[name]
    out, pullback = ann.vjp(getattr(ops, op), backend.asarray(x))
    ct = np.random.default_rng(3).uniform(0.5, 1.5, out.shape).astype(x.dtype)
    (g,) = pullback(backend.asarray(ct))
    got = to_numpy(g)
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, _exact_grad(op, x, ct), rtol=tol)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.prod(tx) if op == "prod" else torch.cumprod(tx, 0)
    ty.backward(torch.tensor(ct))
    assert tx.grad is not None
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=tol)


#: rows whose product underflows (or overflows) while the products before an entry underflow
#: and those after it overflow: 0 * inf, NaN, where the gradient is a number or +-inf
_UNDER_AND_OVER = {
    "float64": np.array([1e-200] * 3 + [1e200] * 3),
    "float32": np.array([1e-38] * 9 + [3e38] * 10, np.float32),
}


@pytest.mark.parametrize("dtype", list(_UNDER_AND_OVER))
def test_prod_gradient_of_a_product_that_under_and_overflows_has_no_nan(
    backend: Any, dtype: str
) -> None:
    # the product of the others in each entry's exponent and mantissa apart: exact, or +-inf
    # where the gradient itself is past the dtype (float32's small entries: about 6e79)
    x = _UNDER_AND_OVER[dtype]
    out, pullback = ann.vjp(ops.prod, backend.asarray(x))
    ct = np.ones(out.shape, x.dtype)
    with np.errstate(over="ignore"):
        (g,) = pullback(backend.asarray(ct))
    got = to_numpy(g)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, _exact_grad("prod", x, ct), rtol=1e-5)


@pytest.mark.parametrize("dtype", list(_UNDER_AND_OVER))
def test_cumprod_gradient_of_running_products_that_under_and_overflow_has_no_nan(
    backend: Any, dtype: str
) -> None:
    # where the scan's products before an entry underflow and its sums after it overflow
    # (0 * inf), torch's answer (its division of running sums of g * out by x) where finite
    torch = pytest.importorskip("torch")
    x = _UNDER_AND_OVER[dtype]
    out, pullback = ann.vjp(ops.cumprod, backend.asarray(x))
    ct = np.ones(out.shape, x.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        (g,) = pullback(backend.asarray(ct))
    got = to_numpy(g)
    tx = torch.tensor(x, requires_grad=True)
    torch.cumprod(tx, 0).backward(torch.tensor(ct))
    assert tx.grad is not None
    want = tx.grad.numpy()
    assert not np.isnan(got[~np.isnan(want)]).any()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5)


@pytest.mark.parametrize("op", ["prod", "cumprod"])
def test_prod_and_cumprod_gradients_at_a_zero_do_not_overflow(backend: Any, op: str) -> None:
    # the zero's entry is (about) the product of the others, 1 here: the product before it,
    # 1e-60, underflowed float32, and the one after it, 1e60 (cumprod: the sum of the products
    # after it), overflowed: 0 * inf, NaN
    x = np.array([1e-30, 1e-30, 0.0, 1e30, 1e30], np.float32)
    out, pullback = ann.vjp(getattr(ops, op), backend.asarray(x))
    ct = np.ones(out.shape, np.float32)
    (g,) = pullback(backend.asarray(ct))
    np.testing.assert_allclose(to_numpy(g), _exact_grad(op, x, ct), rtol=1e-6)
    assert to_numpy(g)[2] == 1.0


@pytest.mark.parametrize(
    ("op", "dtype"), [("prod", "float32"), ("prod", "float64"), ("cumprod", "float64")]
)
def test_prod_and_cumprod_gradients_with_no_zero_are_torch_s_to_the_bit(
    backend: Any, op: str, dtype: str
) -> None:
    # where no entry is 0 and no product overflows, torch's own formula: g * (out / x) for
    # prod, the reversed running sum of g * out (summed in float64, as torch's CPU cumsum)
    # divided by x for cumprod. (Not cumprod in float32: torch's CPU one multiplies in
    # float64, so its running products, numpy's float32 ones here, differ in their last bits)
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = (rng.uniform(0.5, 1.5, (40, 9)) * rng.choice([-1.0, 1.0], (40, 9))).astype(dtype)
    out, pullback = ann.vjp(lambda t: getattr(ops, op)(t, 1), backend.asarray(x))
    ct = rng.standard_normal(out.shape).astype(dtype)
    (g,) = pullback(backend.asarray(ct))
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.prod(tx, 1) if op == "prod" else torch.cumprod(tx, 1)
    np.testing.assert_array_equal(to_numpy(out), ty.detach().numpy())
    ty.backward(torch.tensor(ct))
    assert tx.grad is not None
    np.testing.assert_array_equal(to_numpy(g), tx.grad.numpy())


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("axis", [1, -2, None])
@pytest.mark.parametrize("zeros", ["none", "one", "several"])
@pytest.mark.parametrize("op", ["prod", "cumprod"])
def test_prod_and_cumprod_value_and_gradient_match_torch(
    backend: Any, op: str, zeros: str, dtype: str, axis: Any
) -> None:
    torch = pytest.importorskip("torch")
    from asyncnn.backends import BFLOAT16

    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(5)
    host64 = rng.uniform(0.5, 1.5, (3, 8)) * rng.choice([-1.0, 1.0], (3, 8))
    if zeros == "one":
        host64[1, 3] = 0.0
    elif zeros == "several":  # one in row 0, two in row 1; two in column 5
        host64[0, 2] = host64[1, 1] = host64[1, 5] = host64[2, 5] = 0.0
    host = host64.astype(dt)
    ops_fn = getattr(ops, op)
    out, pullback = ann.vjp(lambda x: ops_fn(x, axis), backend.asarray(host))
    ct = rng.standard_normal(out.shape).astype(dt)
    (g,) = pullback(backend.asarray(ct))
    assert out.dtype == g.dtype == dt
    # (through float64, which holds every entry of each dtype exactly)
    tx = torch.tensor(host.astype(np.float64), dtype=getattr(torch, dtype), requires_grad=True)
    if op == "prod":
        ty = torch.prod(tx) if axis is None else torch.prod(tx, axis)
    else:
        ty = torch.cumprod(tx.reshape(-1) if axis is None else tx, 0 if axis is None else axis)
    ty.backward(torch.tensor(ct.astype(np.float64), dtype=getattr(torch, dtype)))
    assert tx.grad is not None
    tol = {"float64": 1e-12, "float32": 1e-5}.get(dtype, 2e-2)
    for got, want in ((out, ty), (g, tx.grad)):
        want64 = want.detach().double().numpy()
        np.testing.assert_allclose(to_numpy(got).astype(np.float64), want64, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_prod_accumulates_in_float32_and_rounds_once(backend: Any, dtype: str) -> None:
    # as torch's cumprod and torch's prod on a GPU: float16's 300 * 300 overflowed to inf
    # before the 1/300 (torch's CPU prod multiplies in float16 and gives inf)
    from asyncnn.backends import BFLOAT16

    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    if dtype == "float16":
        x = backend.asarray(np.array([300.0, 300.0, 1 / 300], dtype=dt))
        assert float(to_numpy(ops.prod(x))) == 300.0
        with warnings.catch_warnings():  # (numpy's cast to float16 warns of the overflow)
            warnings.simplefilter("ignore", RuntimeWarning)
            running = to_numpy(ops.cumprod(x)).astype(np.float32)
        # (the running product itself overflows float16 at 90000, as torch's does)
        np.testing.assert_array_equal(running, [300.0, np.inf, 300.0])
    # rounding: 400 entries near 1, each step rounded in the 16-bit dtype drifts
    host = (1 + np.random.default_rng(0).standard_normal(400) * 0.01).astype(dt)
    want = np.cumprod(host.astype(np.float32)).astype(dt).astype(np.float32)
    out, pullback = ann.vjp(ops.prod, backend.asarray(host))
    assert out.dtype == dt
    np.testing.assert_allclose(float(to_numpy(out).astype(np.float32)), want[-1], rtol=2**-7)
    got = to_numpy(ops.cumprod(backend.asarray(host))).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2**-7)
    drifted = np.cumprod(host)[-1] if dtype == "float16" else None  # (numpy's float16 steps)
    if drifted is not None:
        assert abs(float(drifted) - want[-1]) > 4 * abs(float(to_numpy(out)) - want[-1])


# -- pad, flip, take_along_axis, repeat, tile: numpy's values, torch's gradients -------------------
# (a port of torch's F.pad, flip, gather, repeat_interleave or tile, or of numpy's pad, flip,
# take_along_axis, repeat or tile, found no op: these are those, each with its gradient)
_MOVES: dict[str, Callable[[Any], Any]] = {
    "pad-constant": lambda x: ops.pad(x, ((1, 2), (0, 1)), constant_values=3),
    "pad-edge": lambda x: ops.pad(x, ((2, 0), (1, 3)), mode="edge"),
    "pad-reflect": lambda x: ops.pad(x, ((1, 5), (2, 2)), mode="reflect"),
    "flip": lambda x: ops.flip(x, 1),
    "take_along_axis": lambda x: ops.take_along_axis(x, np.array([[3, 0], [1, 1], [-1, 2]]), 1),
    "repeat": lambda x: ops.repeat(x, [0, 2, 1], axis=0),
    "repeat-flattened": lambda x: ops.repeat(x, 2),
    "tile": lambda x: ops.tile(x, (2, 1, 2)),
}
_NUMPY_MOVES: dict[str, Callable[[Any], Any]] = {
    "pad-constant": lambda x: np.pad(x, ((1, 2), (0, 1)), constant_values=3),
    "pad-edge": lambda x: np.pad(x, ((2, 0), (1, 3)), mode="edge"),
    "pad-reflect": lambda x: np.pad(x, ((1, 5), (2, 2)), mode="reflect"),
    "flip": lambda x: np.flip(x, 1),
    "take_along_axis": lambda x: np.take_along_axis(x, np.array([[3, 0], [1, 1], [-1, 2]]), 1),
    "repeat": lambda x: np.repeat(x, [0, 2, 1], axis=0),
    "repeat-flattened": lambda x: np.repeat(x, 2),
    "tile": lambda x: np.tile(x, (2, 1, 2)),
}


@pytest.mark.parametrize("name", sorted(_MOVES))
@pytest.mark.parametrize(
    "dtype", ["float64", "float32", "float16", "bfloat16", "int64", "int8", "uint8", "bool"]
)
def test_pad_flip_take_along_axis_repeat_and_tile_are_numpy_s(
    backend: Any, name: str, dtype: str
) -> None:
    # values moved, never computed: numpy's, in every dtype (pad's constant cast to it as numpy
    # casts it)
    from asyncnn.backends import BFLOAT16

    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    host = (np.arange(12).reshape(3, 4) % 5 - 1.5).astype(dt)
    got = _MOVES[name](backend.asarray(host))
    want = _NUMPY_MOVES[name](host)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(to_numpy(got), want)


def test_pad_takes_numpy_s_pad_widths_and_modes(backend: Any) -> None:
    host = np.arange(24.0).reshape(2, 3, 4)
    for width in (0, 2, (3,), (1, 2), [(2, 1)], ((0, 1), (2, 0), (1, 3)), np.array([1, 0])):
        for mode in ("constant", "edge", "reflect"):
            got = ops.pad(backend.asarray(host), width, mode)
            np.testing.assert_array_equal(to_numpy(got), np.pad(host, width, mode))
    # (numpy's reflect again and again past the axis' length; an axis of length 1 repeats)
    for n, width in ((3, (7, 9)), (1, (2, 3)), (2, (5, 0))):
        line = np.arange(1.0, n + 1)
        got = ops.pad(backend.asarray(line), width, mode="reflect")
        np.testing.assert_array_equal(to_numpy(got), np.pad(line, width, mode="reflect"))
    got = ops.pad(backend.asarray(np.zeros((0, 2))), ((0, 0), (1, 1)), "edge")
    assert got.shape == (0, 4)
    np.testing.assert_array_equal(to_numpy(ops.pad(backend.asarray(np.float64(2.5)), 3)), 2.5)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
def test_pad_gradient_adds_each_copy_back_to_its_entry(backend: Any, mode: str) -> None:
    host = np.arange(4.0)
    ct = np.arange(1.0, 15.0) ** 2  # (7 + 4 + 3 entries)
    (g,) = ann.vjp(lambda x: ops.pad(x, (7, 3), mode), backend.asarray(host))[1](
        backend.asarray(ct)
    )
    # the padded array is x's entries taken at these places
    where = (
        np.pad(np.arange(4), (7, 3), "constant", constant_values=-1)
        if mode == "constant"
        else np.pad(np.arange(4), (7, 3), mode)
    )
    want = np.zeros(4)
    np.add.at(want, where[where >= 0], ct[where >= 0])
    np.testing.assert_array_equal(to_numpy(g), want)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pad_value_and_gradient_match_torch_s_f_pad(
    backend: Any, dtype: str, mode: str, dims: int
) -> None:
    # numpy's "edge" is torch's "replicate", "reflect" torch's "reflect", over the trailing
    # axes of a (N, C, ...) batch as F.pad takes them
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(dims)
    shape = (2, 3, 5, 4, 6)[: 2 + dims]
    widths = ((1, 3), (2, 0), (3, 2))[:dims]
    host = rng.standard_normal(shape).astype(dtype)
    kwargs = {"constant_values": 0.5} if mode == "constant" else {}
    out, pullback = ann.vjp(
        lambda x: ops.pad(x, ((0, 0), (0, 0), *widths), mode, **kwargs), backend.asarray(host)
    )
    ct = rng.standard_normal(out.shape).astype(dtype)
    (g,) = pullback(backend.asarray(ct))
    tx = torch.tensor(host, requires_grad=True)
    flat = [w for pair in reversed(widths) for w in pair]  # (torch: the last axis first)
    torch_mode = {"edge": "replicate"}.get(mode, mode)
    ty = torch.nn.functional.pad(tx, flat, torch_mode, **({"value": 0.5} if kwargs else {}))
    ty.backward(torch.tensor(ct))
    assert tx.grad is not None and out.dtype == g.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(to_numpy(out), ty.detach().numpy())
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(to_numpy(g), tx.grad.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_flip_gather_repeat_interleave_and_tile_match_torch(backend: Any, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    host = rng.standard_normal((3, 4, 2)).astype(dtype)
    index = np.random.default_rng(6).integers(0, 4, (3, 5, 2))  # (repeats among them)
    counts = np.array([2, 0, 3, 1])
    pairs = [
        (lambda x: ops.flip(x, (0, 2)), lambda t: torch.flip(t, (0, 2))),
        (lambda x: ops.take_along_axis(x, index, 1),
         lambda t: torch.gather(t, 1, torch.tensor(index))),
        (lambda x: ops.repeat(x, counts, axis=1),
         lambda t: torch.repeat_interleave(t, torch.tensor(counts), dim=1)),
        (lambda x: ops.repeat(x, 3, -1), lambda t: torch.repeat_interleave(t, 3, dim=-1)),
        (lambda x: ops.tile(x, (2, 1, 3)), lambda t: t.repeat(2, 1, 3)),
        (lambda x: ops.tile(x, (2, 1, 1, 3)), lambda t: torch.tile(t, (2, 1, 1, 3))),
    ]  # fmt: skip
    for ours, theirs in pairs:
        out, pullback = ann.vjp(ours, backend.asarray(host))
        ct = rng.standard_normal(out.shape).astype(dtype)
        (g,) = pullback(backend.asarray(ct))
        tx = torch.tensor(host, requires_grad=True)
        ty = theirs(tx)
        ty.backward(torch.tensor(ct))
        assert tx.grad is not None and g.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(to_numpy(out), ty.detach().numpy())
        tol = 1e-12 if dtype == "float64" else 1e-5
        np.testing.assert_allclose(to_numpy(g), tx.grad.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "fn",
    [lambda x: ops.pad(x, (0, 2999), "edge"),
     lambda x: ops.pad(x, (3000, 3001), "reflect"),
     lambda x: ops.repeat(x, 3000),
     lambda x: ops.repeat(x, [3001, 1]),
     lambda x: ops.tile(x, 3000),
     lambda x: ops.take_along_axis(x, np.zeros(3000, dtype=np.int64), 0)],
    ids=["pad-edge", "pad-reflect", "repeat", "repeat-counts", "tile", "take_along_axis"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_gradients_of_copies_sum_in_float32_and_round_once(
    backend: Any, fn: Any, dtype: str
) -> None:
    # 3000 copies of one entry: a float16 sum of their cotangents of 1 stalls at 2048
    # (bfloat16 at 256), where their float32 sum, rounded once, is the count's nearest
    from asyncnn.backends import BFLOAT16

    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    host = np.array([0.5, 2.0])
    out, pullback = ann.vjp(fn, backend.asarray(host))
    counts = to_numpy(pullback(backend.xp.ones(out.shape))[0])  # (float64: exact)
    assert counts.max() >= 3000
    out, pullback = ann.vjp(fn, backend.asarray(host.astype(dt)))
    assert out.dtype == dt
    (g,) = pullback(backend.xp.ones(out.shape, dtype=dt))
    assert g.dtype == dt
    np.testing.assert_array_equal(
        to_numpy(g).astype(np.float32), counts.astype(dt).astype(np.float32)
    )


# -- properties over random shapes ----------------------------------------------------------------
PROPS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
BINARY = {
    "add": (ops.add, "normal"),
    "subtract": (ops.subtract, "normal"),
    "multiply": (ops.multiply, "normal"),
    "divide": (ops.divide, "away"),
    "maximum": (ops.maximum, "normal"),
    "minimum": (ops.minimum, "normal"),
    "power": (ops.power, "pos"),
}
UNARY = {
    "exp": (ops.exp, "normal"),
    "log": (ops.log, "pos"),
    "tanh": (ops.tanh, "normal"),
    "sigmoid": (ops.sigmoid, "normal"),
    "relu": (ops.relu, "away"),
    "gelu": (ops.gelu, "normal"),
    "sqrt": (ops.sqrt, "pos"),
    "abs": (ops.abs, "away"),
    "log1p": (ops.log1p, "pos"),
    "expm1": (ops.expm1, "normal"),
    "sin": (ops.sin, "normal"),
    "cos": (ops.cos, "normal"),
    "leaky_relu": (ops.leaky_relu, "away"),
    "elu": (ops.elu, "away"),
    "silu": (ops.silu, "normal"),
    "softplus": (ops.softplus, "normal"),
    "softmax": (ops.softmax, "normal"),
    "log_softmax": (ops.log_softmax, "normal"),
}


@PROPS
@given(
    name=st.sampled_from(sorted(BINARY)),
    shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
    seed=st.integers(0, 2**16),
)
def test_binary_ops_broadcast_gradients(backend: Any, name: str, shapes: Any, seed: int) -> None:
    fn, kind = BINARY[name]
    a, b = shapes.input_shapes
    first = Spec(a, "pos" if kind == "pos" else "normal")
    second = Spec(b, "normal" if kind == "pos" else kind)
    x, y = build(backend, (first, second), seed)
    out = fn(x, y)
    assert out.shape == shapes.result_shape
    check_grads(fn, x, y)


@PROPS
@given(
    name=st.sampled_from(sorted(UNARY)),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    seed=st.integers(0, 2**16),
)
def test_unary_ops_gradients(backend: Any, name: str, shape: Any, seed: int) -> None:
    fn, kind = UNARY[name]
    (x,) = build(backend, (Spec(shape, kind),), seed)
    assert fn(x).shape == shape
    check_grads(fn, x)


@PROPS
@given(
    data=st.data(),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=3),
    keepdims=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reductions_match_numpy_and_gradient_identities(
    backend: Any, data: Any, shape: Any, keepdims: bool, seed: int
) -> None:
    axes = data.draw(st.none() | st.lists(st.integers(0, len(shape) - 1), unique=True, min_size=1))
    axis = None if axes is None else tuple(axes)
    (x,) = build(backend, (N(*shape),), seed)
    host = to_numpy(x)
    count = host.size if axis is None else int(np.prod([shape[a] for a in axis]))
    for op, ref in ((ops.sum, np.sum), (ops.mean, np.mean), (ops.max, np.max), (ops.min, np.min)):
        out, pullback = ann.vjp(lambda x, op=op: op(x, axis=axis, keepdims=keepdims), x)
        expected = ref(host, axis=axis, keepdims=keepdims)
        np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-12)
        (g,) = pullback(backend.xp.ones(out.shape))
        g = to_numpy(g)
        if op is ops.sum:  # d sum / dx = 1, d mean / dx = 1 / count
            np.testing.assert_allclose(g, np.ones(shape))
        elif op is ops.mean:
            np.testing.assert_allclose(g, np.full(shape, 1 / count))
        else:  # one 1 per reduced group, at the extremum
            np.testing.assert_allclose(g, host == ref(host, axis=axis, keepdims=True))
    check_grads(lambda x: ops.max(x, axis=axis, keepdims=keepdims), x)


@PROPS
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    o=st.integers(1, 3),
    length=st.integers(1, 9),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_conv1d_matches_direct_reference(
    backend: Any, n: int, c: int, o: int, length: int, k: int, stride: int, padding: int,
    dilation: int, seed: int,
) -> None:  # fmt: skip
    x, w, b = build(backend, (N(n, c, length), N(o, c, k), N(o)), seed)
    if length + 2 * padding < dilation * (k - 1) + 1:
        with pytest.raises(ValueError, match="larger than the padded input"):
            ops.conv1d(x, w, b, stride, padding, dilation)
        return
    got = ops.conv1d(x, w, b, stride, padding, dilation)
    host = [to_numpy(a) for a in (x, w, b)]
    ref = ref_conv(host[0], host[1], host[2], (stride,), (padding,), (dilation,))
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-10, atol=1e-12)


# -- Python lists and tuples are arrays to every op -----------------------------------------------
_M = [[1.0, -2.0, 3.0], [0.5, 4.0, -1.5]]  # (2, 3)
_N = [[2.0, -2.0, 1.0], [0.5, 1.0, -3.0]]
_V = [0.25, -1.0, 2.0]
# each op called with its array arguments made by ``a`` (a list, a tuple or a numpy array)
LIST_CALLS: dict[str, Callable[[Callable[[Any], Any]], Any]] = {
    "abs": lambda a: ops.abs(a(_M)),
    "add": lambda a: ops.add(a(_M), a(_V)),
    "astype": lambda a: ops.astype(a(_M), np.float32),
    "avg_pool1d": lambda a: ops.avg_pool1d(a([_M]), 2),
    "avg_pool2d": lambda a: ops.avg_pool2d(a([[_M]]), 2),
    "broadcast_to": lambda a: ops.broadcast_to(a(_V), (2, 3)),
    "clip": lambda a: ops.clip(a(_M), -1.0, 2.0),
    "cos": lambda a: ops.cos(a(_M)),
    "elu": lambda a: ops.elu(a(_M)),
    "expm1": lambda a: ops.expm1(a(_M)),
    "leaky_relu": lambda a: ops.leaky_relu(a(_M)),
    "log1p": lambda a: ops.log1p(a(_V[::2])),
    "silu": lambda a: ops.silu(a(_M)),
    "sin": lambda a: ops.sin(a(_M)),
    "softplus": lambda a: ops.softplus(a(_M)),
    "concatenate": lambda a: ops.concatenate([a(_M), a(_N)], axis=1),
    "conv1d": lambda a: ops.conv1d(
        a([_M]), a([[[1.0, -1.0], [0.5, 2.0]], [[0.0, 1.0], [1.0, 0.0]]]), a([1.0, 0.0])
    ),
    "conv2d": lambda a: ops.conv2d(a([[_M]]), a([[[[1.0, 2.0]]]])),
    "cross_entropy": lambda a: ops.cross_entropy(a(_M), a([2, 0])),
    "cumprod": lambda a: ops.cumprod(a(_M), 1),
    "cumsum": lambda a: ops.cumsum(a(_M), 1),
    "divide": lambda a: ops.divide(a(_M), a(_N)),
    "dropout": lambda a: ops.dropout(a(_M), 0.5, None),
    "embedding": lambda a: ops.embedding(a(_M), a([1, 0, 1])),
    "exp": lambda a: ops.exp(a(_M)),
    "expand_dims": lambda a: ops.expand_dims(a(_M), 1),
    "flip": lambda a: ops.flip(a(_M), 1),
    "gelu": lambda a: ops.gelu(a(_M)),
    "getitem": lambda a: ops.getitem(a(_M), (1, slice(1, None))),
    "group_norm": lambda a: ops.group_norm(a([_M, _N]), 2, a([1.0, 2.0]), a([0.5, -1.0])),
    "layer_norm": lambda a: ops.layer_norm(a(_M), a(_V), a(_V)),
    "log": lambda a: ops.log(a(_V[::2])),
    "log_softmax": lambda a: ops.log_softmax(a(_M)),
    "logsumexp": lambda a: ops.logsumexp(a(_M), 0),
    "matmul": lambda a: ops.matmul(a(_M), a([_V, _V, _V])),
    "max": lambda a: ops.max(a(_M), 1),
    "max_pool1d": lambda a: ops.max_pool1d(a([_M]), 2, padding=1),
    "max_pool2d": lambda a: ops.max_pool2d(a([[_M]]), 2),
    "max_unpool1d": lambda a: ops.max_unpool1d(a([_M]), a([[[0, 3, 5], [1, 2, 4]]]), 2),
    "max_unpool2d": lambda a: ops.max_unpool2d(a([[_M]]), a([[[[5, 1, 2], [3, 4, 0]]]]), 1),
    "maximum": lambda a: ops.maximum(a(_M), a(_N)),
    "mean": lambda a: ops.mean(a(_M), 0),
    "min": lambda a: ops.min(a(_M)),
    "minimum": lambda a: ops.minimum(a(_M), a(_N)),
    "mse_loss": lambda a: ops.mse_loss(a(_M), a(_N)),
    "multiply": lambda a: ops.multiply(a(_M), a(_N)),
    "negative": lambda a: ops.negative(a(_M)),
    "pad": lambda a: ops.pad(a(_M), ((1, 0), (0, 2)), "reflect"),
    "power": lambda a: ops.power(a([_V[0], _V[2]]), a([2.0, 0.5])),
    "prod": lambda a: ops.prod(a(_M), 0),
    "relu": lambda a: ops.relu(a(_M)),
    "repeat": lambda a: ops.repeat(a(_M), a([1, 0, 2]), 1),
    "reshape": lambda a: ops.reshape(a(_M), (3, 2)),
    "sigmoid": lambda a: ops.sigmoid(a(_M)),
    "softmax": lambda a: ops.softmax(a(_M), 0),
    "sqrt": lambda a: ops.sqrt(a([4.0, 0.25])),
    "std": lambda a: ops.std(a(_M), 1, ddof=1),
    "square": lambda a: ops.square(a(_M)),
    "squeeze": lambda a: ops.squeeze(a([_V])),
    "stack": lambda a: ops.stack([a(_V), a(_V)], axis=1),
    "subtract": lambda a: ops.subtract(a(_M), a(_N)),
    "sum": lambda a: ops.sum(a(_M), -1),
    "take": lambda a: ops.take(a(_M), a([2, 0, 2]), axis=1),
    "take_along_axis": lambda a: ops.take_along_axis(a(_M), a([[2, 0], [1, 1]]), 1),
    "tanh": lambda a: ops.tanh(a(_M)),
    "tile": lambda a: ops.tile(a(_M), (2, 1)),
    "transpose": lambda a: ops.transpose(a(_M)),
    "unstack": lambda a: ops.unstack(a(_M), axis=1),
    "var": lambda a: ops.var(a(_M), 0, keepdims=True),
    "where": lambda a: ops.where(a([True, False, True]), a(_M), a(_N)),
}


def _tuples(x: Any) -> Any:
    return tuple(map(_tuples, x)) if isinstance(x, list) else x


def test_the_list_cases_cover_every_op() -> None:
    assert set(LIST_CALLS) == set(ops.__all__) - {"raw", "Primitive"}


@pytest.mark.parametrize("name", sorted(LIST_CALLS))
def test_lists_and_tuples_are_arrays_to_every_op(name: str) -> None:
    # as numpy's functions take them, and as ops.maximum and ops.exp did: ops.add of two lists
    # concatenated them and ops.multiply repeated one, while ops.sum, ops.relu and ops.matmul
    # failed with errors naming no op (a list's shape was taken to be ())
    want = LIST_CALLS[name](np.asarray)
    for made in (lambda x: x, _tuples):
        got = LIST_CALLS[name](made)
        assert type(got) is type(want) and np.shape(got) == np.shape(want)  # (unstack: a list)
        np.testing.assert_array_equal(got, want)


def test_a_named_tuple_or_a_list_subclass_is_an_array_to_the_arithmetic_ops() -> None:
    # (they escaped the identity test of lists that made the scalars' ops cheap again, and
    # ops.add joined them once more)
    import typing

    class Pair(typing.NamedTuple):
        a: float
        b: float

    class Row(list):  # type: ignore[type-arg]
        pass

    np.testing.assert_array_equal(ops.add(Pair(1.0, 2.0), Pair(3.0, 4.0)), [4.0, 6.0])
    np.testing.assert_array_equal(ops.multiply(Row([1.0, 2.0]), 2), [2.0, 4.0])
    np.testing.assert_array_equal(ops.subtract(Pair(1.0, 2.0), np.ones(2)), [0.0, 1.0])
    # a Python number beside a list stays a number: numpy's weak promotion keeps float32
    x = np.ones(3, np.float32)
    assert ops.where([True, False, True], x, 0.0).dtype == np.float32
    assert ops.where((True, False, True), 2.0, x).dtype == np.float32


def test_an_op_of_a_list_and_a_traced_array_differentiates_the_array() -> None:
    w = np.array([1.0, -2.0, 3.0])
    g = ann.grad(lambda w: ops.sum(ops.multiply([2.0, 0.5, -1.0], w)) + ops.sum(_M @ w))(w)
    np.testing.assert_array_equal(g, np.array([2.0, 0.5, -1.0]) + np.sum(_M, axis=0))


def test_unstack_gives_each_piece_and_its_pullback_one_array_of_the_input() -> None:
    x = np.arange(24.0).reshape(2, 3, 4)
    for axis in (0, 1, -1):
        pieces = ops.unstack(x, axis=axis)
        assert type(pieces) is list and len(pieces) == x.shape[axis]
        for i, piece in enumerate(pieces):
            np.testing.assert_array_equal(piece, np.take(x, i, axis=axis))
    # traced: the pieces' cotangents come back as one gradient, zeros where a piece gets none
    g = ann.grad(lambda x: ops.sum(ops.unstack(x, axis=1)[2] * 3.0) + ops.sum(x) * 0.0)(x)
    want = np.zeros_like(x)
    want[:, 2] = 3.0
    np.testing.assert_array_equal(g, want)
    out, pullback = ann.vjp(lambda x: ops.unstack(x, axis=2), x)
    (g,) = pullback([None, np.ones((2, 3)), None, np.full((2, 3), 2.0)])
    np.testing.assert_array_equal(g, np.stack([0 * x[..., 0], 1 + 0 * x[..., 0], 0 * x[..., 0],
                                               2 + 0 * x[..., 0]], axis=2))  # fmt: skip
    assert [o.shape for o in out] == [(2, 3)] * 4


@pytest.mark.parametrize("name", ["sin", "cos", "log1p", "expm1"])
def test_numpy_s_ufunc_of_a_traced_array_is_the_op(backend: Any, name: str) -> None:
    # (np.sin(x) in a traced function was refused: "cannot differentiate a traced array")
    x = backend.asarray(np.array([0.25, -0.5, 1.5]))
    fn = getattr(backend.xp, name)
    want = ann.grad(lambda x: ops.sum(getattr(ops, name)(x)))(x)
    got = ann.grad(lambda x: ops.sum(getattr(np, name)(x)))(x)
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    np.testing.assert_array_equal(to_numpy(getattr(ops, name)(x)), to_numpy(fn(x)))
