"""Errors of the ops in asyncnn.ops that say what to fix: shapes, axes, dtypes, labels and
embedding ids."""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import ops

from conftest import HAS_CUDA


# -- errors that say what to fix ------------------------------------------------------------------
def test_conv_errors_name_the_shapes() -> None:
    x, w = np.zeros((2, 3, 8)), np.zeros((4, 2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3, 8\) has 3 channels.*\(4, 2, 3\) expects 2"):
        ops.conv1d(x, w)
    with pytest.raises(ValueError, match=r"larger than the padded input.*\(2, 3, 8\)"):
        ops.conv1d(x, np.zeros((4, 3, 9)))
    with pytest.raises(ValueError, match="larger than the padded input"):
        ops.conv2d(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), dilation=2)
    with pytest.raises(ValueError, match=r"input must have shape \(N, C, H, W\), got \(3, 4, 4\)"):
        ops.conv2d(np.zeros((3, 4, 4)), np.zeros((1, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        ops.conv1d(x, np.zeros((4, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.conv1d(x, np.zeros((4, 3, 3)), stride=0)
    with pytest.raises(ValueError, match="tuple of 2 ints"):
        ops.conv2d(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 2, 2)), padding=(1, 1, 1))


def test_pool_errors() -> None:
    with pytest.raises(ValueError, match="padding .* at most half"):
        ops.max_pool1d(np.zeros((1, 1, 8)), 2, padding=2)
    # torch's rule: half of the kernel's cells, however far dilation spreads them
    with pytest.raises(ValueError, match=r"max_pool2d: padding \(2, 0\) must be at most half"):
        ops.max_pool2d(np.zeros((1, 1, 9, 9)), 3, padding=(2, 0), dilation=3)
    with pytest.raises(ValueError, match="pooling window .* larger than the padded input"):
        ops.max_pool1d(np.zeros((1, 1, 4)), 3, dilation=2)
    with pytest.raises(ValueError, match="pooling window .* larger than the padded input"):
        ops.avg_pool2d(np.zeros((1, 1, 2, 8)), 3)
    with pytest.raises(ValueError, match=r"\(N, C, L\)"):
        ops.max_pool1d(np.zeros((4, 8)), 2)


_X1, _W1 = np.zeros((1, 1, 6)), np.zeros((1, 1, 3))
_X2, _W2 = np.zeros((1, 1, 6, 6)), np.zeros((1, 1, 3, 3))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ops.conv2d(_X2, _W2, stride=1.5), "conv2d: stride must be an int or a tuple of 2 ints, got 1.5"),
        (lambda: ops.conv2d(_X2, _W2, stride=None), "conv2d: stride must be an int or a tuple of 2 ints, got None"),
        (lambda: ops.conv1d(_X1, _W1, dilation=1.0), "conv1d: dilation must be an int or a tuple of 1 ints, got 1.0"),
        (lambda: ops.max_pool2d(_X2, 2.0), "max_pool2d: kernel_size must be an int or a tuple of 2 ints, got 2.0"),
        (lambda: ops.max_pool2d(_X2, 2, stride=1.5), "max_pool2d: stride must be an int or a tuple of 2 ints, got 1.5"),
        (lambda: ops.max_pool1d(_X1, 2, dilation=None), "max_pool1d: dilation must be an int or a tuple of 1 ints, got None"),
        (lambda: ops.max_pool2d(_X2, 2, dilation=(2, 2, 2)), r"max_pool2d: dilation must be an int or a tuple of 2 ints, got \(2, 2, 2\)"),
        (lambda: ops.avg_pool1d(_X1, 2, padding=0.0), "avg_pool1d: padding must be an int or a tuple of 1 ints, got 0.0"),
        (lambda: ops.avg_pool2d(_X2, (2, 2.0)), r"avg_pool2d: kernel_size must be an int or a tuple of 2 ints, got \(2, 2.0\)"),
    ],
)  # fmt: skip
def test_a_size_that_is_not_an_int_names_the_op_and_the_argument(call: Any, message: str) -> None:
    # a float or None (not iterable) failed inside the check with "'float' object is not
    # iterable", naming neither; a tuple of the wrong length got this message already
    with pytest.raises(ValueError, match=message):
        call()


def test_cross_entropy_errors_say_what_to_pass() -> None:
    logits = np.zeros((3, 4))
    with pytest.raises(TypeError, match=r"integer class indices.*astype\(np.int64\)"):
        ops.cross_entropy(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"label 4 is outside \[0, 4\)"):
        ops.cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"label -1 is outside"):
        ops.cross_entropy(logits, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"\(3, 4\) and labels of shape \(3, 1\)"):
        ops.cross_entropy(logits, np.zeros((3, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.cross_entropy(logits, np.array([0, 1, 2]), reduction="avg")
    # with an ignore_index, that label is taken and any other outside the classes still named
    with pytest.raises(
        ValueError, match=r"label 7 is outside \[0, 4\) .* not ignore_index \(-100\)"
    ):
        ops.cross_entropy(logits, np.array([-100, 7, 1]), ignore_index=-100)
    with pytest.raises(TypeError, match=r"ignore_index must be an int or None, got 1.5"):
        ops.cross_entropy(logits, np.array([0, 1, 2]), ignore_index=1.5)  # type: ignore[arg-type]
    # logits of a sequence layer, (N, T, C), against one label per sequence: the way out named
    with pytest.raises(ValueError, match=r"\(N, T, C\) from a sequence layer\? .*output=\"last\""):
        ops.cross_entropy(np.zeros((2, 7, 5)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"put the classes on axis 1, \(N, C, T\)"):
        ops.cross_entropy(np.zeros((2, 7, 5)), np.zeros((2, 7), np.int64))
    with pytest.raises(ValueError, match=r"ignore_index 9223372036854775808 does not fit"):
        ops.cross_entropy(logits, np.array([0, 1, 2]), ignore_index=2**63)


_I4 = np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4) % 7  # int64 images
_F4 = _I4.astype(np.float32)
_K = np.ones((2, 3, 3, 3), np.float32)
_Y = np.array([0, 1, 2, 3])


def _refused(op: str, arg: str, dtype: str, arrays: list[Any], call: Any) -> Any:
    """A call of ``op`` on host ``arrays`` whose argument ``arg`` (of ``dtype``) is refused."""
    return pytest.param(op, arg, dtype, arrays, call, id=f"{op}-{arg}-{dtype}")


@pytest.mark.parametrize(
    ("op", "arg", "dtype", "arrays", "call"),
    [
        _refused("cross_entropy", "logits", "int64", [_I4[0, 0], _Y], ops.cross_entropy),
        _refused("cross_entropy", "logits", "bool", [_I4[0, 0] > 2, _Y], ops.cross_entropy),
        _refused("conv2d", "x", "int64", [_I4, _K], ops.conv2d),
        _refused("conv2d", "x", "int64", [_I4, _K.astype(np.int64)], ops.conv2d),
        _refused("conv2d", "weight", "int32", [_F4, _K.astype(np.int32)], ops.conv2d),
        _refused("conv2d", "bias", "int64", [_F4, _K, np.zeros(2, np.int64)], ops.conv2d),
        _refused("conv1d", "x", "bool", [_I4[:, :, 0] > 3, _K[:, :, 0]], ops.conv1d),
        _refused("layer_norm", "x", "int64", [_I4[0]], ops.layer_norm),
        _refused("layer_norm", "weight", "int64", [_F4[0], np.ones(4, np.int64)], ops.layer_norm),
        _refused("layer_norm", "bias", "uint8", [_F4[0], _F4[0, 0, 0], _I4[0, 0, 0].astype(np.uint8)],
                 ops.layer_norm),
        _refused("group_norm", "x", "int64", [_I4], lambda x: ops.group_norm(x, 3)),
        _refused("group_norm", "weight", "int64", [_F4, np.ones(3, np.int64)],
                 lambda x, w: ops.group_norm(x, 3, w)),
        _refused("group_norm", "bias", "bool", [_F4, np.ones(3, bool)],
                 lambda x, b: ops.group_norm(x, 1, None, b)),
        _refused("var", "x", "int64", [_I4], ops.var),
        _refused("std", "x", "bool", [_I4 > 2], ops.std),
        _refused("mse_loss", "pred", "int64", [_I4, _F4], ops.mse_loss),
        _refused("gelu", "x", "int8", [_I4.astype(np.int8)], ops.gelu),
    ],
)  # fmt: skip
def test_ops_that_compute_in_floating_point_refuse_integer_and_bool_inputs(
    backend: Any, op: str, arg: str, dtype: str, arrays: list[Any], call: Any
) -> None:
    # as the layers do (nn.Conv2d, nn.LayerNorm, nn.CrossEntropyLoss, nn.MSELoss, nn.GELU): numpy
    # promoted them, an int64 image into a float32 convolution giving float64 (and two int64
    # arrays an integer convolution), with no gradient for the integer argument
    args = [backend.asarray(a) for a in arrays]
    with pytest.raises(TypeError) as info:
        call(*args)
    message = str(info.value)
    assert message.startswith(f"{op}: {arg} must be floating point, got dtype {dtype} "), message
    shape = tuple(arrays[[a.dtype == np.dtype(dtype) for a in arrays].index(True)].shape)
    assert f"(shape {shape})" in message and ".astype(np.float32)" in message, message
    # (and inside a trace, where the refused argument may be the traced one)
    with pytest.raises(TypeError, match=f"^{op}: {arg} must be floating point"):
        ann.vjp(lambda *a: call(*a), *args)


def test_cross_entropy_takes_labels_of_an_ndarray_subclass(tmp_path: Any) -> None:
    # a memory-mapped dataset's labels are an np.memmap: checked on the host as numpy labels
    # are, and never taken for a GPU's (whose range check is a kernel of the cupy backend)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4))
    labels = np.array([0, 3, 1, 2, 2, 0])
    path = tmp_path / "labels.npy"
    np.save(path, labels)
    mapped = np.load(path, mmap_mode="r")
    assert type(mapped) is np.memmap
    for reduction in ("mean", "sum", "none"):
        want = ops.cross_entropy(logits, labels, reduction)
        np.testing.assert_array_equal(ops.cross_entropy(logits, mapped, reduction), want)
        np.testing.assert_array_equal(
            ops.cross_entropy(logits[1:], mapped[1:], reduction)[...],
            ops.cross_entropy(logits[1:], labels[1:], reduction)[...],
        )
    value, pullback = ann.vjp(lambda z: ops.cross_entropy(z, mapped), logits)
    _, want_pullback = ann.vjp(lambda z: ops.cross_entropy(z, labels), logits)
    np.testing.assert_array_equal(pullback(1.0)[0], want_pullback(1.0)[0])
    with pytest.raises(ValueError, match=r"label 4 is outside \[0, 4\)"):
        bad = np.load(path, mmap_mode="r+")
        bad[1] = 4
        ops.cross_entropy(logits, bad)


def test_other_errors() -> None:
    with pytest.raises(ValueError, match=r"mse_loss: pred of shape \(3, 1\) and target of shape"):
        ops.mse_loss(np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(ValueError, match=r"weight of shape \(3,\) must match .* \(4,\)"):
        ops.layer_norm(np.zeros((2, 4)), np.ones(3))
    with pytest.raises(TypeError, match="ids must be an integer array"):
        ops.embedding(np.zeros((5, 2)), np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="axis must be one int"):
        ops.softmax(np.zeros((2, 2)), axis=(0, 1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        # torch: "Expected number of channels in input to be divisible by num_groups, but got
        # input of shape [2, 6, 4] and num_groups=4"
        (lambda: ops.group_norm(np.zeros((2, 6, 4)), 4), ValueError,
         r"^group_norm: x of shape \(2, 6, 4\) has 6 channels \(axis 1\), which num_groups=4 "
         r"does not divide"),
        (lambda: ops.group_norm(np.zeros(6), 2), ValueError,
         r"^group_norm: x must have shape \(N, C, \*\) .*got \(6,\)"),
        (lambda: ops.group_norm(np.zeros((2, 6, 4)), 2, np.ones(4)), ValueError,
         r"^group_norm: weight of shape \(4,\) must have shape \(6,\), one per channel of x "
         r"\(shape \(2, 6, 4\)\)"),
        (lambda: ops.group_norm(np.zeros((2, 6, 4)), 2, None, np.ones((6, 1))), ValueError,
         r"^group_norm: bias of shape \(6, 1\) must have shape \(6,\)"),
        (lambda: ops.group_norm(np.zeros((2, 6)), 0), ValueError,
         r"^group_norm: num_groups must be an int >= 1, got 0"),
        (lambda: ops.group_norm(np.zeros((2, 6)), 2.0), ValueError,
         r"^group_norm: num_groups must be an int >= 1, got 2.0"),
        (lambda: ops.var(np.zeros((2, 3)), ddof="1"), TypeError,
         r"^var: ddof must be a number, got str '1'"),
        (lambda: ops.std(np.zeros((2, 3)), ddof=np.zeros(1)), TypeError,
         r"^std: ddof must be a number, got ndarray"),
        (lambda: ops.std(np.zeros((2, 3)), ddof=float("nan")), ValueError,
         r"^std: ddof must be a finite number, got nan"),
        (lambda: ops.var(np.zeros((2, 3)), axis=2), ValueError,
         r"^var: axis 2 is out of range for an array of 2 dimensions"),
        (lambda: ops.std(np.zeros((2, 3)), axis=(0, -2)), ValueError,
         r"^std: axis \(0, -2\) names an axis twice"),
    ],
)  # fmt: skip
def test_group_norm_var_and_std_errors_say_what_to_fix(call: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("op", ["var", "std"])
def test_var_and_std_warn_when_ddof_leaves_no_degrees_of_freedom(op: str) -> None:
    # as numpy and torch (inf, NaN for a constant group), with a warning that says why
    fn = getattr(ops, op)
    with pytest.warns(RuntimeWarning, match=rf"^{op}: ddof=2 leaves no degrees of freedom"):
        out = fn(np.array([[1.0, 2.0], [3.0, 3.0]]), axis=1, ddof=2)
    np.testing.assert_array_equal(out, [np.inf, np.nan])
    with pytest.warns(RuntimeWarning, match="no degrees of freedom"):
        assert np.isnan(fn(np.zeros((3, 0)), axis=1)).all()
    # the gradients of torch's x.var(1, correction=2) and x.std(1, correction=2), and of one
    # entry's std with ddof=1 (NaN, torch's x.std(1) too)
    x = np.array([[1.0, 2.0], [3.0, 3.0]])
    with pytest.warns(RuntimeWarning, match="no degrees of freedom"):
        (g,) = ann.vjp(lambda x: fn(x, axis=1, ddof=2), x)[1](np.ones(2))
    want = [[-np.inf, np.inf], [np.nan, np.nan]] if op == "var" else np.full((2, 2), np.nan)
    np.testing.assert_array_equal(g, want)
    with pytest.warns(RuntimeWarning, match="ddof=1 leaves no degrees of freedom"):
        out, pullback = ann.vjp(lambda x: fn(x, axis=1, ddof=1), np.array([[5.0], [1.0]]))
    assert np.isnan(out).all() and np.isnan(pullback(np.ones(2))[0]).all()
    # past the count, torch's x.var(1, correction=3) still divides by n - correction = -1 (a
    # finite gradient of the other sign), and x.std(1, correction=3) gives 0 (NaN where the std
    # is NaN, a constant group)
    with pytest.warns(RuntimeWarning, match="ddof=3 leaves no degrees of freedom"):
        (g,) = ann.vjp(lambda x: fn(x, axis=1, ddof=3), x)[1](np.ones(2))
    want = [[1.0, -1.0], [0.0, 0.0]] if op == "var" else [[0.0, 0.0], [np.nan, np.nan]]
    np.testing.assert_array_equal(g, want)


@pytest.mark.parametrize("op", ["var", "std"])
@pytest.mark.parametrize(
    ("axis", "ddof"), [(1, 3), (1, 4), (1, 3.5), ((0, 1), 6), ((0, 1), 7), (None, 6.5), (0, 5)]
)
def test_var_and_std_gradients_without_degrees_of_freedom_are_torch_s(
    op: str, axis: Any, ddof: float
) -> None:
    # torch's gradient with a dim, torch.var(x, dim, correction=ddof): 2 * g * (x - mean) /
    # (n - ddof) even where n - ddof <= 0 (the value is inf or NaN). axis=None reduces every
    # axis, torch's dim=(0, 1): torch's torch.var(x, correction=ddof) without a dim gives g * inf
    # at every entry instead, a form of its own that this op does not follow
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    with pytest.warns(RuntimeWarning, match="leaves no degrees of freedom"):
        out, pullback = ann.vjp(lambda x: getattr(ops, op)(x, axis=axis, ddof=ddof), x)
    cotangent = np.random.default_rng(0).standard_normal(np.shape(out))
    (got,) = pullback(cotangent)
    tx = torch.tensor(x, requires_grad=True)
    with warnings.catch_warnings():  # (torch's "degrees of freedom is <= 0")
        warnings.simplefilter("ignore", UserWarning)
        ty = getattr(torch, op)(tx, (0, 1) if axis is None else axis, correction=ddof)
        ty.backward(torch.tensor(cotangent))
    assert tx.grad is not None
    np.testing.assert_array_equal(out, ty.detach().numpy())
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("op", ["var", "std"])
def test_var_and_std_take_a_bool_ddof_as_numpy_does(op: str) -> None:
    # (True was refused, where numpy's var(x, ddof=True) and torch's var(x, correction=True) are
    # the unbiased estimate)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for flag in (True, np.True_, False, np.False_):
        got = getattr(ops, op)(x, axis=1, ddof=flag)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, getattr(ops, op)(x, axis=1, ddof=int(flag)))
        np.testing.assert_allclose(got, getattr(np, op)(x, axis=1, ddof=flag), rtol=1e-6)


def test_an_axis_out_of_range_is_refused_not_wrapped_around() -> None:
    x = np.arange(6.0).reshape(2, 3)
    for call, op, axis in [
        (lambda: ops.take(x, np.array([0]), axis=2), "take", 2),
        (lambda: ops.concatenate([x, x], axis=2), "concatenate", 2),
        (lambda: ops.stack([x, x], axis=-4), "stack", -4),
        (lambda: ops.unstack(x, axis=2), "unstack", 2),
        (lambda: ops.expand_dims(x, 3), "expand_dims", 3),
        (lambda: ops.sum(x, axis=(0, 2)), "sum", 2),
        (lambda: ops.max(x, axis=-3), "max", -3),
        (lambda: ops.softmax(x, axis=2), "softmax", 2),
    ]:
        with pytest.raises(ValueError, match=rf"{op}: axis {axis} is out of range"):
            call()
    with pytest.raises(TypeError, match=r"mean: axis must be an int, got 1.0"):
        ops.mean(x, axis=1.0)  # type: ignore[arg-type]
    # numpy integers are axes, as in numpy
    np.testing.assert_array_equal(ops.mean(x, axis=np.int64(1)), x.mean(axis=1))
    np.testing.assert_array_equal(ops.sum(x, axis=(np.int64(0), -1)), x.sum())
    np.testing.assert_array_equal(ops.take(x, np.array([2]), axis=np.int64(-1)), x[:, 2:])
    # an axis named twice is a mistake, as in numpy (it was silently one axis)
    with pytest.raises(ValueError, match=r"sum: axis \(1, -1\) names an axis twice"):
        ops.sum(x, axis=(1, -1))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.cumsum(np.zeros((2, 3)), 2), ValueError,
         r"^cumsum: axis 2 is out of range for an array of 2 dimensions \(valid: -2 to 1\)"),
        (lambda: ops.cumsum(np.zeros((2, 3)), axis=-3), ValueError,
         r"^cumsum: axis -3 is out of range for an array of 2 dimensions"),
        (lambda: ops.cumsum(np.zeros((2, 3)), 1.0), TypeError,
         r"^cumsum: axis must be an int, got 1\.0"),
        (lambda: ops.cumsum(np.zeros((2, 3)), (0, 1)), TypeError,
         r"^cumsum: axis must be one int or None, got \(0, 1\): a running sum goes along one "
         r"axis.*ops\.reshape"),
        (lambda: ops.cumsum(np.array(1.5), 0), ValueError,
         r"^cumsum: axis 0: the array is 0-d \(a scalar\), which has no axis"),
    ],
)  # fmt: skip
def test_cumsum_errors_name_the_axis(call: Any, error: type, match: str) -> None:
    # (numpy wraps nothing either, but takes axis=0 of a 0-d array as its flattened (1,): the
    # other ops' axes refuse a 0-d array, and so does this one; axis=None flattens it)
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.prod(np.zeros((2, 3)), 2), ValueError,
         r"^prod: axis 2 is out of range for an array of 2 dimensions \(valid: -2 to 1\); x has "
         r"shape \(2, 3\)$"),
        (lambda: ops.prod(np.zeros((2, 3)), axis=(0, -3)), ValueError,
         r"^prod: axis -3 is out of range .*; x has shape \(2, 3\)$"),
        (lambda: ops.prod(np.zeros((2, 3)), (1, -1)), ValueError,
         r"^prod: axis \(1, -1\) names an axis twice; x has shape \(2, 3\)$"),
        (lambda: ops.prod(np.zeros((2, 3)), 1.0), TypeError, r"^prod: axis must be an int, got 1\.0"),
        (lambda: ops.cumprod(np.zeros((2, 3)), -3), ValueError,
         r"^cumprod: axis -3 is out of range for an array of 2 dimensions \(valid: -2 to 1\); "
         r"x has shape \(2, 3\)$"),
        (lambda: ops.cumprod(np.zeros((2, 3)), (0, 1)), TypeError,
         r"^cumprod: axis must be one int or None, got \(0, 1\): a running product goes along "
         r"one axis.*ops\.reshape"),
        (lambda: ops.cumprod(np.array(1.5), 0), ValueError,
         r"^cumprod: axis 0: the array is 0-d \(a scalar\), which has no axis"),
    ],
)  # fmt: skip
def test_prod_and_cumprod_errors_name_the_axis_and_the_shape(
    call: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


_X = np.zeros((2, 3))
_OUT_OF_RANGE_2 = "axis 2 is out of range for an array of 2 dimensions (valid: -2 to 1)"


#: every op that takes an axis, given one out of range (or named twice), and its whole message:
#: the input's shape after the axis, as prod's and cumprod's (the others named only the number
#: of dimensions, leaving which array and why unsaid)
AXIS_ERRORS = [
    *[
        (name, lambda op=op: op(_X, 2), f"{name}: {_OUT_OF_RANGE_2}; x has shape (2, 3)")
        for name, op in [
            ("sum", ops.sum), ("mean", ops.mean), ("max", ops.max), ("min", ops.min),
            ("var", ops.var), ("std", ops.std), ("prod", ops.prod), ("cumsum", ops.cumsum),
            ("cumprod", ops.cumprod), ("squeeze", ops.squeeze), ("unstack", ops.unstack),
            ("softmax", ops.softmax), ("log_softmax", ops.log_softmax),
            ("logsumexp", ops.logsumexp),
        ]
    ],
    ("sum-twice", lambda: ops.sum(_X, (1, -1)),
     "sum: axis (1, -1) names an axis twice; x has shape (2, 3)"),
    ("mean-negative", lambda: ops.mean(_X, (0, -3)),
     "mean: axis -3 is out of range for an array of 2 dimensions (valid: -2 to 1); x has shape "
     "(2, 3)"),
    ("max-twice", lambda: ops.max(_X, (0, 0)),
     "max: axis (0, 0) names an axis twice; x has shape (2, 3)"),
    ("var-twice", lambda: ops.var(_X, (0, -2)),
     "var: axis (0, -2) names an axis twice; x has shape (2, 3)"),
    ("take", lambda: ops.take(_X, [0], axis=2), f"take: {_OUT_OF_RANGE_2}; x has shape (2, 3)"),
    ("expand_dims", lambda: ops.expand_dims(_X, 3),
     "expand_dims: axis 3 is out of range for an array of 3 dimensions (valid: -3 to 2); x has "
     "shape (2, 3)"),
    ("expand_dims-0-d", lambda: ops.expand_dims(np.array(1.0), 1),
     "expand_dims: axis 1 is out of range for an array of 1 dimensions (valid: -1 to 0); x has "
     "shape ()"),
    ("concatenate", lambda: ops.concatenate([_X, _X], 2),
     f"concatenate: {_OUT_OF_RANGE_2}; the 2 arrays have shape (2, 3)"),
    ("concatenate-mixed", lambda: ops.concatenate([_X, np.zeros((2, 3, 4))], 2),
     f"concatenate: {_OUT_OF_RANGE_2}; the arrays have shapes (2, 3), (2, 3, 4)"),
    ("stack", lambda: ops.stack([_X, _X, _X], -4),
     "stack: axis -4 is out of range for an array of 3 dimensions (valid: -3 to 2); the 3 "
     "arrays have shape (2, 3)"),
    ("swapaxes-traced", lambda: ann.grad(lambda t: ops.sum(np.swapaxes(t, 0, 2)))(_X),
     f"swapaxes: {_OUT_OF_RANGE_2}; x has shape (2, 3)"),
    ("flip", lambda: ops.flip(_X, 2), f"flip: {_OUT_OF_RANGE_2}; x has shape (2, 3)"),
    ("repeat", lambda: ops.repeat(_X, 2, axis=2), f"repeat: {_OUT_OF_RANGE_2}; x has shape (2, 3)"),
    ("take_along_axis", lambda: ops.take_along_axis(_X, np.zeros((2, 3), int), 2),
     f"take_along_axis: {_OUT_OF_RANGE_2}; x has shape (2, 3)"),
    ("transpose", lambda: ops.transpose(_X, (0, 2)),
     "transpose: axes (0, 2) are not a permutation of the 2 axes of x (shape (2, 3)): name "
     "each axis once, e.g. (1, 0)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "message"), [c[1:] for c in AXIS_ERRORS], ids=[c[0] for c in AXIS_ERRORS]
)
def test_every_axis_error_names_the_shape_of_the_input(call: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_an_axis_error_names_the_shapes_of_many_arrays_briefly() -> None:
    arrays = [np.zeros((2, i + 1)) for i in range(8)]
    with pytest.raises(ValueError) as info:
        ops.concatenate(arrays, 2)
    assert str(info.value) == (
        f"concatenate: {_OUT_OF_RANGE_2}; the arrays have shapes (2, 1), (2, 2), (2, 3), (2, 4), "
        "(2, 5) and 3 more"
    )
    # a 0-d array's message says so already
    with pytest.raises(ValueError) as info:
        ops.sum(np.array(1.0), 0)
    assert str(info.value).endswith(
        "which has no axis; give it one first (x.reshape(1) or x[None])"
    )


def test_broadcast_errors_name_the_op_and_the_shapes() -> None:
    a, b = np.zeros((3, 4)), np.zeros(3)
    for name in ("add", "subtract", "multiply", "divide", "power", "maximum", "minimum"):
        with pytest.raises(ValueError, match=rf"{name}: shapes \(3, 4\) and \(3,\) do not broad"):
            getattr(ops, name)(a, b)
    with pytest.raises(ValueError, match=r"add: shapes \(3, 4\) and \(3,\) do not broadcast"):
        ann.vjp(lambda a: a + b, a)  # traced, through the operator
    with pytest.raises(ValueError, match=r"where: shapes \(2,\) and \(3, 4\) and \(3, 4\)"):
        ops.where(np.array([True, False]), a, a)
    with pytest.raises(ValueError, match=r"matmul: .* batch dimensions \(2,\) and \(3,\)"):
        ops.matmul(np.zeros((2, 3, 4)), np.zeros((3, 4, 2)))


def test_shape_errors_name_the_op_and_the_shapes() -> None:
    x = np.zeros((2, 3))
    for call, said in [
        (lambda: ops.reshape(x, (4, 2)),
         r"reshape: x of shape \(2, 3\) \(size 6\) cannot take shape \(4, 2\)"),
        (lambda: ops.reshape(x, (-1, -1)), r"reshape: .* one entry may be -1"),
        (lambda: ops.transpose(x, (0, 0)),
         r"transpose: axes \(0, 0\) are not a permutation .* \(2, 3\)"),
        (lambda: ops.transpose(x, (0, 1, 2)), r"transpose: axes \(0, 1, 2\) are not"),
        (lambda: ops.broadcast_to(x, (4, 3)),
         r"broadcast_to: x of shape \(2, 3\) cannot be broadcast to \(4, 3\)"),
        (lambda: ops.broadcast_to(x, (3,)), r"broadcast_to: x of shape \(2, 3\) cannot"),
        (lambda: ops.concatenate([x, np.zeros((2, 2))]),
         r"concatenate: shapes \(2, 3\), \(2, 2\) differ outside axis 0"),
        (lambda: ops.concatenate([x, np.zeros(3)]), r"concatenate: shapes \(2, 3\), \(3,\) differ"),
        (lambda: ops.stack([x, x, np.zeros((3, 2))]),
         r"stack: shapes \(2, 3\), \(2, 3\), \(3, 2\) differ"),
        (lambda: ops.max(np.zeros((0, 3)), axis=0),
         r"max: axis 0 of x \(shape \(0, 3\)\) has length 0"),
        (lambda: ops.min(np.zeros((2, 0))), r"min: axis 1 of x \(shape \(2, 0\)\) has length 0"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=said):
            call()
    with pytest.raises(ValueError, match=r"concatenate: shapes \(2, 3\), \(2, 2\) differ"):
        ann.vjp(lambda a: ops.concatenate([a, np.zeros((2, 2))]), x)  # traced, too
    assert ops.max(np.zeros((0, 3)), axis=1).shape == (0,)  # no rows: nothing to refuse
    assert ops.transpose(np.zeros((2, 3, 4)), (-1, 0, 1)).shape == (4, 2, 3)  # as numpy


def test_integer_input_to_a_float_op_says_to_convert() -> None:
    ints = np.arange(6).reshape(2, 3)
    for name in ("softmax", "log_softmax", "logsumexp"):
        with pytest.raises(TypeError, match=rf"{name}: x must be floating point, got dtype int64"):
            getattr(ops, name)(ints)
    with pytest.raises(TypeError, match="avg_pool1d: x must be floating point"):
        ops.avg_pool1d(ints[None], 2)


def test_embedding_ids_out_of_range_are_refused() -> None:
    weight = np.arange(10.0).reshape(5, 2)
    with pytest.raises(IndexError, match=r"embedding: id 5 is outside \[0, 5\) .* \(5, 2\)"):
        ops.embedding(weight, np.array([0, 5]))
    with pytest.raises(IndexError, match=r"id -1 is outside"):  # not the last row, as in torch
        ops.embedding(weight, np.array([[-1, 2]]))
    with pytest.raises(ValueError, match=r"weight must have shape \(n, d\), got \(5,\)"):
        ops.embedding(np.zeros(5), np.array([1]))


@pytest.mark.parametrize(("bad", "said"), [(-1, "-1"), (5, "5")])
def test_a_numpy_scalar_embedding_id_out_of_range_is_refused(bad: int, said: str) -> None:
    # (np.int64(-1) read the last row without a word, as an array of ids does not)
    weight = np.arange(10.0).reshape(5, 2)
    with pytest.raises(IndexError, match=rf"embedding: id {said} is outside \[0, 5\)"):
        ops.embedding(weight, np.int64(bad))
    np.testing.assert_array_equal(ops.embedding(weight, np.int64(4)), weight[4])


def _ids_as_on_a_gpu(monkeypatch: Any) -> None:
    """In ``monkeypatch``'s context numpy ids take the path of GPU ids, not read back to the
    host: the array code that cupy runs without its fused kernels."""
    from asyncnn._math import _ops_nn

    monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)


@pytest.mark.parametrize(
    ("dtype", "big"), [("int64", 5), ("int32", 7), ("uint8", 255), ("uint64", 2**63 + 4)]
)
def test_embedding_gives_gpu_ids_outside_the_table_nan_rows_and_no_gradient(
    dtype: str, big: int, monkeypatch: Any
) -> None:
    # cupy's take wraps an id: 5 read row 0 and -1 row 4 of five, and the gradient went there
    _ids_as_on_a_gpu(monkeypatch)
    weight = np.arange(10.0).reshape(5, 2)
    neg = 0 if dtype.startswith("u") else -1  # (no negative unsigned id)
    ids = np.array([[0, big, 4], [neg, 4, 2]], dtype=dtype)
    out, pullback = ann.vjp(lambda w: ops.embedding(w, ids), weight)
    good = (ids >= 0) & (ids < 5)
    assert np.isnan(out[~good]).all() and out.shape == (2, 3, 2)
    np.testing.assert_array_equal(out[good], weight[ids[good]])
    (grad,) = pullback(np.ones_like(out))
    want = np.zeros_like(weight)
    np.add.at(want, ids[good], 1.0)  # each good id's row once per use; the bad ones nowhere
    np.testing.assert_array_equal(grad, want)
    assert ann.vjp(lambda w: ops.embedding(w, ids[:0]), weight)[0].shape == (0, 3, 2)


def test_embedding_of_gpu_ids_into_an_integer_table_checks_them_on_the_host(
    monkeypatch: Any,
) -> None:
    # an integer row has no NaN to mark a bad id with: it would come out as another row's ints
    _ids_as_on_a_gpu(monkeypatch)
    table = np.arange(10).reshape(5, 2)
    for bad in (5, -1):
        with pytest.raises(IndexError, match=rf"embedding: id {bad} is outside \[0, 5\)"):
            ops.embedding(table, np.array([0, bad, 2]))
    np.testing.assert_array_equal(ops.embedding(table, np.array([4, 0])), table[[4, 0]])


def test_a_0_d_array_has_no_axis_and_dropout_needs_a_number() -> None:
    # ("axis -1 is out of range for an array of 0 dimensions (valid: 0 to -1)", and a bare
    # "'<=' not supported between instances of 'int' and 'str'")
    for op in (ops.softmax, ops.log_softmax, ops.logsumexp):
        with pytest.raises(ValueError, match=r": axis -1: the array is 0-d \(a scalar\)"):
            op(np.array(1.0))
    with pytest.raises(TypeError, match=r"^dropout: p must be a number in \[0, 1\], got '0.5'"):
        ops.dropout(np.ones(3), "0.5", np.random.default_rng(0))  # type: ignore[arg-type]
    assert ops.dropout(np.ones(3), np.float32(0.0), None).shape == (3,)  # numpy numbers pass
    assert ops.dropout(np.ones(3), np.array(0.5), None).shape == (3,)  # and 0-d arrays
    for bad in (True, np.True_, np.array("0.5")):
        with pytest.raises(TypeError, match=r"^dropout: p must be a number"):
            ops.dropout(np.ones(3), bad, None)  # type: ignore[arg-type]


class _GpuArray:
    """Enough of a cupy array for the device checks (``is_cupy_array`` reads the module)."""

    __module__ = "cupy._core.core"

    def __init__(self, shape: tuple[int, ...], dtype: str, device: int = 0) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.device = type("Device", (), {"id": device})()

    def __ge__(self, other: Any) -> _GpuArray:
        return _GpuArray(self.shape, "bool", self.device.id)

    __array_ufunc__ = None  # (numpy defers to it, as to a cupy array)

    def __add__(self, other: Any) -> Any:
        if type(other) is np.ndarray:  # what cupy says of a host operand
            raise TypeError(f"Unsupported type {type(other)}")
        return NotImplemented

    __radd__ = __add__


def test_an_op_on_arrays_of_two_devices_names_each_and_its_device() -> None:
    # (cupy refuses a numpy operand with a bare "TypeError: Unsupported type <class
    # 'numpy.ndarray'>", naming no op: e.g. numpy labels of a cross-entropy of cupy logits)
    from asyncnn._math._autodiff_args import _mixed_devices

    logits, labels = _GpuArray((8, 5), "float32"), np.zeros(8, np.int64)
    error = _mixed_devices("cross_entropy", [logits, labels], {"reduction": "mean"})
    assert isinstance(error, TypeError)
    assert str(error).startswith(
        "cross_entropy: its arrays are on different devices: argument 1 (8, 5) float32 on cuda:0 "
        "(cupy); argument 2 (8,) int64 on the host (numpy). Move them to one device first"
    )
    error = _mixed_devices("dropout", [_GpuArray((2,), "float32", 1)], {"scale": np.ones(2)})
    assert "argument 1 (2,) float32 on cuda:1 (cupy); scale (2,) float64 on the host" in str(error)
    two_gpus = _mixed_devices(
        "add", [_GpuArray((2,), "float32"), _GpuArray((2,), "float32", 1)], {}
    )
    assert "on cuda:0 (cupy); argument 2 (2,) float32 on cuda:1 (cupy)" in str(two_gpus)
    # one device, or numbers beside it: the op failed for another reason, whose error stands
    assert _mixed_devices("add", [np.ones(2), np.ones(3), 2.0, np.float32(1)], {}) is None
    assert _mixed_devices("add", [_GpuArray((2,), "float32"), 2.0], {"axis": 0}) is None


def test_an_op_that_fails_on_arrays_of_two_devices_says_so_naming_them() -> None:
    # the op's own failure (cupy's bare TypeError) becomes the error naming the devices; any
    # other failure stands as it was
    with pytest.raises(
        TypeError, match=r"^add: its arrays are on different devices: argument 1 \(2,\) "
        r"float32 on cuda:0 \(cupy\); argument 2 \(2,\) float32 on the host \(numpy\)",
    ) as caught:  # fmt: skip
        ops.add(_GpuArray((2,), "float32"), np.ones(2, np.float32))
    assert "Unsupported type" in str(caught.value.__cause__)
    with pytest.raises(ValueError, match=r"add: shapes \(2,\) and \(3,\)"):
        ops.add(np.ones(2), np.ones(3))


def test_dropout_with_a_generator_of_another_device_says_so() -> None:
    class GpuGenerator:
        def random(self, shape: tuple[int, ...]) -> _GpuArray:
            return _GpuArray(shape, "float64")

    with pytest.raises(
        TypeError,
        match=r"^dropout: rng \(GpuGenerator\) draws on another device than x \(2, 3\), which "
        r"is on the host: pass a generator on x's device \(numpy's\)",
    ):
        ops.dropout(np.ones((2, 3)), 0.5, GpuGenerator())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")
def test_ops_on_a_gpu_given_host_constants_name_them() -> None:
    from asyncnn.backends import get_backend

    gpu = get_backend("cupy")
    logits = gpu.asarray(np.zeros((4, 3), np.float32))
    with pytest.raises(
        TypeError, match=r"^cross_entropy: its arrays are on different devices: argument 1 "
        r"\(4, 3\) float32 on cuda:0 \(cupy\); argument 2 \(4,\) int64 on the host \(numpy\)",
    ):  # fmt: skip
        ops.cross_entropy(logits, np.zeros(4, np.int64))
    with pytest.raises(TypeError, match=r"^add: its arrays are on different devices"):
        ops.add(logits, np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match=r"^dropout: rng \(Generator\) draws on another device"):
        ops.dropout(logits, 0.5, np.random.default_rng(0))
    assert ops.dropout(logits, 0.5, gpu.rng(0)).shape == (4, 3)  # the backend's own generator


def test_a_conv_weight_of_no_output_channels_is_refused_naming_its_shape() -> None:
    # (torch refuses it too; ours ran the forward, and its pullback failed in a reshape)
    for op, x, w in (
        (ops.conv1d, np.zeros((2, 3, 5)), np.zeros((0, 3, 2))),
        (ops.conv2d, np.zeros((1, 2, 4, 4)), np.zeros((0, 2, 3, 3))),
    ):
        with pytest.raises(
            ValueError, match=rf"^{op.__name__}: weight of shape {re.escape(str(w.shape))} "
            r"has 0 output channels",
        ):  # fmt: skip
            op(x, w)


@pytest.mark.parametrize(
    ("indices", "said"),
    [(np.array([1.0]), "dtype float64"), (np.array([True, False]), "dtype bool"),
     ([0.0, 1.0], "dtype float64"), (1.0, "float"), (True, "bool")],
)  # fmt: skip
def test_take_of_non_integer_indices_names_the_op(indices: Any, said: str) -> None:
    # (numpy's "Cannot cast array data from dtype('float64') to dtype('int64')" named neither
    # the op nor the argument)
    with pytest.raises(TypeError, match=rf"^take: indices must be integers, got {said}; "):
        ops.take(np.zeros((3, 2)), indices)


def test_take_of_an_empty_list_takes_nothing() -> None:
    assert ops.take(np.zeros((3, 2)), [], axis=1).shape == (3, 0)  # (numpy makes [] float64)
    assert ops.embedding(np.zeros((3, 2)), []).shape == (0, 2)  # ("ids ... got float64")


@pytest.mark.parametrize("op", [ops.relu, ops.sum, ops.mean, ops.max, ops.gelu, ops.exp])
def test_an_op_of_a_python_number_takes_it_as_a_0_d_array(op: Any) -> None:
    # (relu, sum, mean and gelu failed on the number's missing dtype, max on its missing max)
    assert float(op(2.0)) == float(op(np.array(2.0)))
    assert ann.grad(lambda x: op(x))(2.0) == ann.grad(lambda x: op(x))(np.array(2.0))


def test_a_list_of_traced_arrays_given_to_an_op_says_to_stack_them() -> None:
    with pytest.raises(TypeError, match=r"^add: got a list holding traced arrays.*ops\.stack"):
        ann.grad(lambda x: ops.sum(ops.add([x, x], 1.0)))(np.ones(2))
    with pytest.raises(TypeError, match=r"^exp: got a tuple holding traced arrays"):
        ann.grad(lambda x: ops.sum(ops.exp((x, x))))(np.ones(2))


def test_a_ragged_list_given_to_an_op_names_the_op() -> None:
    with pytest.raises(ValueError, match=r"^add: the list given is not an array: .*inhomogeneous"):
        ops.add([[1.0, 2.0], [3.0]], 1.0)


def test_a_shape_may_be_one_int_as_in_numpy_and_anything_else_is_named() -> None:
    # before: "'int' object is not iterable" (numpy takes an int shape)
    x = np.arange(6.0).reshape(2, 3)
    assert ops.reshape(x, 6).shape == np.reshape(x, 6).shape == (6,)
    assert ops.reshape(x, np.int64(-1)).shape == (6,)
    assert ops.broadcast_to(np.array(1.0), 3).shape == np.broadcast_to(1.0, 3).shape == (3,)
    assert ops.broadcast_to(np.array([1.0]), np.int32(2)).shape == (2,)
    g = ann.grad(lambda x: ops.sum(ops.reshape(x, 6) * np.arange(6.0)))(x)
    np.testing.assert_array_equal(g, np.arange(6.0).reshape(2, 3))
    g = ann.grad(lambda v: ops.sum(ops.broadcast_to(v, 3)))(np.array(2.0))
    assert g == 3.0
    for op in ("reshape", "broadcast_to"):
        for bad in (6.0, "6", (2, 3.0), None):
            with pytest.raises(TypeError, match=rf"^{op}: shape must be an int or a sequence of "
                               rf"ints, got {re.escape(repr(bad))}"):  # fmt: skip
                getattr(ops, op)(x, bad)


def test_a_complex_mse_target_is_refused_not_a_complex_loss() -> None:
    # (it gave a complex "loss", and grad a real gradient with numpy's ComplexWarning)
    for target in (np.ones(3) * 1j, np.ones(3, np.complex64)):
        with pytest.raises(TypeError, match=r"mse_loss: target is complex \(complex"):
            ops.mse_loss(np.ones(3), target)
        with pytest.raises(TypeError, match="mse_loss: target is complex"):
            ann.grad(lambda p, t=target: ops.mse_loss(p, t))(np.ones(3))
    assert float(ops.mse_loss(np.ones(3), np.arange(3))) == pytest.approx(2 / 3)  # (ints pass)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: ops.clip(x), ValueError,
         r"clip: give min, max or both \(torch.clamp and numpy's clip need one too\)"),
        (lambda x: ops.clip(x, np.zeros(3)), TypeError,
         r"clip: min must be a number or None, got an array of shape \(3,\).*ops.maximum"),
        (lambda x: ops.clip(x, None, "1"), TypeError,
         "clip: max must be a number or None, got str '1'"),
        (lambda x: ops.clip(x, max=[1.0]), TypeError, "clip: max must be a number or None"),
    ],
)  # fmt: skip
def test_clip_refuses_what_is_no_bound(call: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(np.array([0.5, -1.0, 2.0]))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: np.clip(t, "1", None), TypeError,
         r"^clip: min must be a number or None, got str '1'$"),
        (lambda t: np.clip(t, None, np.zeros(3)), TypeError,
         r"^clip: max must be a number or None, got an array of shape \(3,\).*ops.maximum"),
        (lambda t: np.clip(t, [0.0], 1.0), TypeError,
         r"^clip: min must be a number or None, got an array of shape \(1,\)"),
        (lambda t: np.clip(t, 0.0, 1.0, out=np.empty(3)), TypeError,
         r"^clip of a traced array cannot write into out=; use the result$"),
        (lambda t: np.clip(t, None, None), ValueError, r"^clip: give min, max or both"),
    ],
)  # fmt: skip
def test_numpy_s_clip_of_a_traced_array_says_what_is_wrong_with_its_bounds(
    call: Any, error: type, match: str
) -> None:
    # np.clip(t, ...) calls t.clip, and numpy retries a TypeError of it by converting t: the
    # conversion's refusal ("a traced array cannot be turned into a numpy array") hid the reason
    x = np.array([0.5, -1.0, 2.0])
    for differentiate in (ann.grad, ann.value_and_grad):
        with pytest.raises(error, match=match):
            differentiate(lambda t: ops.sum(call(t)))(x)


def test_a_traced_array_is_not_converted_after_a_clip_error_that_was_caught() -> None:
    # (the clip's error speaks for numpy's retry of np.clip only, not for a later conversion)
    def fn(t: Any) -> Any:
        try:
            np.clip(t, "1", None)
        except TypeError:
            return ops.sum(np.asarray(t))
        raise AssertionError("np.clip took a str bound")

    with pytest.raises(TypeError, match="^a traced array cannot be turned into a numpy array"):
        ann.grad(fn)(np.array([0.5, -1.0, 2.0]))


@pytest.mark.parametrize("op", ["leaky_relu", "elu", "silu", "softplus"])
def test_the_activations_refuse_integer_input(op: str) -> None:
    with pytest.raises(TypeError, match=f"^{op}: x must be floating point, got dtype int32"):
        getattr(ops, op)(np.arange(3, dtype=np.int32))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: ops.leaky_relu(x, "0.1"), "leaky_relu: negative_slope must be a number, got str"),
        (lambda x: ops.elu(x, alpha=None), "elu: alpha must be a number, got NoneType None"),
        (lambda x: ops.softplus(x, beta=np.ones(2)), "softplus: beta must be a number, got"),
        (lambda x: ops.softplus(x, threshold="20"), "softplus: threshold must be a number, got"),
    ],
)  # fmt: skip
def test_the_activations_refuse_hyperparameters_that_are_no_numbers(call: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        call(np.array([0.5, -1.0]))


_X23 = np.zeros((2, 3))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.pad(_X23, 1.5), TypeError,
         r"^pad: pad_width must be ints, got 1\.5: an int, a pair \(before, after\) or one pair "
         r"per axis"),
        (lambda: ops.pad(_X23, [[1, 2], [3]]), TypeError, r"^pad: pad_width must be ints"),
        (lambda: ops.pad(_X23, ((1, 0), (0, -2))), ValueError,
         r"^pad: pad_width must not be negative, got \(\(1, 0\), \(0, -2\)\)$"),
        (lambda: ops.pad(_X23, ((1, 2), (3, 4), (5, 6))), ValueError,
         r"^pad: pad_width \(\(1, 2\), \(3, 4\), \(5, 6\)\) is not an int, a pair or one pair "
         r"per axis for x of shape \(2, 3\) \(2 axes\)$"),
        (lambda: ops.pad(_X23, 1, "wrap"), ValueError,
         r"^pad: mode must be one of 'constant', 'edge', 'reflect', got 'wrap'$"),
        (lambda: ops.pad(_X23, 1, "replicate"), ValueError,
         r"got 'replicate' \(torch's \"replicate\" is numpy's \"edge\"\)$"),
        (lambda: ops.pad(_X23, 1, "edge", constant_values=2), ValueError,
         r"^pad: constant_values is for mode='constant' only, got 2 with mode='edge'"),
        (lambda: ops.pad(np.zeros((0, 3)), 1, "reflect"), ValueError,
         r"^pad: mode='reflect' cannot pad axis 0 of x \(shape \(0, 3\)\), which has length 0 "
         r"and no entry to copy"),
        (lambda: ops.pad(_X23, 1, constant_values=(1, 2)), TypeError,
         r"^pad: constant_values must be one number, got \(1, 2\); .*pad one axis at a time"),
        (lambda: ops.flip(_X23, 2), ValueError,
         r"^flip: axis 2 is out of range for an array of 2 dimensions \(valid: -2 to 1\); x has "
         r"shape \(2, 3\)$"),
        (lambda: ops.flip(_X23, (0, -2)), ValueError, r"^flip: axis \(0, -2\) names an axis twice"),
        (lambda: ops.take_along_axis(_X23, np.zeros((2, 3)), 1), TypeError,
         r"^take_along_axis: indices must be an array of integers, got dtype float64; convert "
         r"them first"),
        (lambda: ops.take_along_axis(_X23, np.zeros((2, 3), bool), 0), TypeError,
         r"^take_along_axis: indices must be an array of integers, got dtype bool"),
        (lambda: ops.take_along_axis(_X23, np.zeros(3, int), 1), ValueError,
         r"^take_along_axis: indices must have as many axes as x: x has shape \(2, 3\), the "
         r"indices \(3,\)"),
        (lambda: ops.take_along_axis(_X23, np.zeros((3, 3), int), 1), ValueError,
         r"^take_along_axis: indices of shape \(3, 3\) do not broadcast with x of shape \(2, 3\) "
         r"along axis 0 \(3 and 2\)"),
        (lambda: ops.take_along_axis(_X23, np.full((2, 3), 3), 1), IndexError,
         r"^take_along_axis: index 3 is out of bounds for axis 1 with size 3 \(x of shape "
         r"\(2, 3\)\); valid indices are -3 to 2"),
        (lambda: ops.take_along_axis(_X23, np.full((1, 3), -3), 0), IndexError,
         r"^take_along_axis: index -3 is out of bounds for axis 0 with size 2"),
        (lambda: ops.take_along_axis(_X23, np.zeros((2, 3), int), None), ValueError,
         r"^take_along_axis: axis=None takes from the flattened x, with 1-d indices; got "
         r"indices of shape \(2, 3\)$"),
        (lambda: ops.take_along_axis(_X23, np.zeros((2, 3), int), 2), ValueError,
         r"^take_along_axis: axis 2 is out of range .*; x has shape \(2, 3\)$"),
        (lambda: ops.repeat(_X23, -1), ValueError, r"^repeat: repeats must not be negative, got -1$"),
        (lambda: ops.repeat(_X23, [1, 2], 1), ValueError,
         r"^repeat: 2 counts for axis 1 of x \(shape \(2, 3\)\), which has 3 entries: give one "
         r"count per entry, or one int$"),
        (lambda: ops.repeat(_X23, [1, 2]), ValueError,
         r"^repeat: 2 counts for the flattened x \(shape \(2, 3\)\), which has 6 entries"),
        (lambda: ops.repeat(_X23, 1.5), TypeError,
         r"^repeat: repeats must be an int or a 1-d array of ints, got 1\.5"),
        (lambda: ops.repeat(_X23, [[1]]), TypeError, r"^repeat: repeats must be an int or a 1-d"),
        (lambda: ops.repeat(_X23, 2, 3), ValueError, r"^repeat: axis 3 is out of range"),
        (lambda: ops.tile(_X23, (2, -1)), ValueError,
         r"^tile: reps must not be negative, got \(2, -1\)$"),
        (lambda: ops.tile(_X23, 1.5), TypeError,
         r"^tile: reps must be an int or a sequence of ints, got 1\.5; e\.g\. \(2, 1, 3\)$"),
        (lambda: ops.tile(_X23, (True, 2)), TypeError, r"^tile: reps must be an int or a sequence"),
    ],
)  # fmt: skip
def test_pad_flip_take_along_axis_repeat_and_tile_errors_name_the_op(
    call: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        call()
