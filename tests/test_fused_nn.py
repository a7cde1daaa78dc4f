"""The fused cross-entropy kernels on the GPU (``backends/_fused_nn.py``) against the array code
they replace, which the same op runs with the fused kernels turned off: every reduction, 2-D and
spatial logits, every float dtype, views, labels outside the classes, rows too long for them;
and the fused ReLU gradient and 16-bit sums against their array code. Skips without cupy and a
GPU (run it with ``bash experiments/device_tests.sh``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops
from asyncnn.backends import BFLOAT16

from conftest import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")]


def _counting(m: Any, name: str) -> list[int]:
    """Counts, in ``m``'s context, the calls of the fused kernel ``name`` (of the module the
    runtime's cupy backend hands out: ``asyncnn.backends._fused_nn``; ``backends._fused_nn``,
    imported under the folder's name, would be a second copy the runtime never calls)."""
    from asyncnn.backends import _fused_nn

    return _counting_in(m, _fused_nn, name)


def _counting_in(m: Any, module: Any, name: str) -> list[int]:
    """Counts, in ``m``'s context, the calls of ``module``'s function ``name``."""
    calls: list[int] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    m.setattr(module, name, spy)
    return calls


def _unfused(m: Any) -> None:
    """In ``m``'s context the cupy backend has no fused kernels: the array code runs."""
    from asyncnn.backends._cupy import CupyBackend

    m.setattr(CupyBackend, "fused_nn_kernels", lambda self: None)


def _value_and_grad(logits: Any, labels: Any, reduction: str, fused: bool, mp: Any) -> Any:
    import cupy

    from asyncnn.backends import _fused_nn

    with mp.context() as m:
        calls = _counting(m, "cross_entropy_rows")
        if not fused:
            _unfused(m)
        loss, pullback = ann.vjp(lambda x: ops.cross_entropy(x, labels, reduction), logits)
        seed = loss.copy() if reduction == "none" else None
        if seed is not None:
            # (cupy takes no numpy array on the right of an assignment)
            seed[...] = cupy.linspace(0.5, 1.5, seed.size).reshape(seed.shape).astype(seed.dtype)
        (grad,) = pullback(1.0 if seed is None else seed)
    # the fused kernels ran exactly where asked (and where the rows fit them)
    assert len(calls) == (1 if fused and logits.shape[1] <= _fused_nn.MAX_CLASSES else 0)
    return loss, grad


def _close(got: Any, want: Any, dtype: str) -> None:
    import cupy

    tol = {"float64": 1e-13, "float32": 1e-6}.get(dtype, 1e-6)
    got, want = cupy.asnumpy(got).astype(np.float64), cupy.asnumpy(want).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def _fused_and_array(mp: Any, kernel: str, fn: Any) -> tuple[Any, Any]:
    """``fn()`` with the fused kernels, then with the array code; the fused kernel ``kernel``
    must run once in the first and not at all in the second."""
    results = []
    for fused in (True, False):
        with mp.context() as m:
            calls = _counting(m, kernel)
            if not fused:
                _unfused(m)
            results.append(fn())
        assert len(calls) == int(fused)
    return results[0], results[1]


def _same_bits_but_nan_payloads(got: Any, want: Any) -> int:
    """Asserts that two float arrays of one dtype hold the same bits wherever ``want`` is not
    NaN, and NaN where it is (payloads may differ); returns how many NaNs."""
    import cupy

    bits = {2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}[want.dtype.itemsize]
    got, want = cupy.ascontiguousarray(got), cupy.ascontiguousarray(want)
    nan = cupy.isnan(want.astype(cupy.float64))
    assert bool((cupy.isnan(got.astype(cupy.float64)) == nan).all())
    assert bool(((got.view(bits) == want.view(bits)) | nan).all())
    return int(nan.sum())


DTYPES = ["float64", "float32", "float16"] + (["bfloat16"] if BFLOAT16 is not None else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(64, 10), (5, 3, 4, 2)], ids=["rows", "spatial"])
def test_fused_cross_entropy_equals_the_array_code(
    dtype: str, reduction: str, shape: tuple[int, ...], monkeypatch: Any
) -> None:
    import cupy

    rng = np.random.default_rng(0)
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    logits = cupy.asarray((3 * rng.standard_normal(shape)).astype(np.float32)).astype(dt)
    labels = cupy.asarray(rng.integers(0, shape[1], (shape[0], *shape[2:])))
    loss, grad = _value_and_grad(logits, labels, reduction, True, monkeypatch)
    want_loss, want_grad = _value_and_grad(logits, labels, reduction, False, monkeypatch)
    assert loss.dtype == want_loss.dtype and loss.shape == want_loss.shape
    assert grad.dtype == want_grad.dtype == logits.dtype and grad.shape == logits.shape
    _close(loss, want_loss, dtype)
    # 16-bit gradients: the same float32 value rounded once, or one rounding apart
    if dtype in ("float64", "float32"):
        _close(grad, want_grad, dtype)
    else:
        g, w = (cupy.asnumpy(a.astype(np.float32)) for a in (grad, want_grad))
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-3)


def test_views_int32_labels_and_long_rows(monkeypatch: Any) -> None:
    import cupy

    from asyncnn.backends import _fused_nn

    rng = np.random.default_rng(1)
    wide = cupy.asarray(rng.standard_normal((32, 24)))
    view = wide[:, ::2]  # not contiguous: read through a copy
    labels = cupy.asarray(rng.integers(0, 12, 32).astype(np.int32))
    loss, grad = _value_and_grad(view, labels, "mean", True, monkeypatch)
    want_loss, want_grad = _value_and_grad(view, labels, "mean", False, monkeypatch)
    _close(loss, want_loss, "float64")
    _close(grad, want_grad, "float64")
    # rows longer than the kernels take go through the array code, still right
    long_rows = cupy.asarray(rng.standard_normal((4, _fused_nn.MAX_CLASSES + 1)))
    assert not _fused_nn.fits(long_rows, labels[:4])
    loss, _ = _value_and_grad(long_rows, labels[:4], "sum", True, monkeypatch)
    z = cupy.asnumpy(long_rows)
    y = cupy.asnumpy(labels[:4])
    want = (np.log(np.exp(z).sum(1)) - z[np.arange(4), y]).sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "array"])
def test_a_label_outside_the_classes_makes_its_loss_nan(fused: bool, monkeypatch: Any) -> None:
    import cupy

    from asyncnn.backends import _fused_nn, _graphs

    logits = cupy.asarray(np.random.default_rng(2).standard_normal((4, 3)))
    labels = cupy.asarray(np.array([0, 3, 1, -1]))
    _, rows = _fused_nn.cross_entropy_rows(logits, labels, logits.dtype)
    got = cupy.asnumpy(rows)
    assert np.isnan(got[[1, 3]]).all() and np.isfinite(got[[0, 2]]).all()
    with monkeypatch.context() as m:
        poisons = _counting_in(m, _graphs, "label_poison")
        if not fused:
            _unfused(m)
        for reduction in ("mean", "sum"):
            assert np.isnan(float(ops.cross_entropy(logits, labels, reduction)))
            good = float(ops.cross_entropy(logits, cupy.asarray([0, 2, 1, 0]), reduction))
            assert np.isfinite(good)
        # the whole loss, every row, as on the array code
        assert bool(cupy.isnan(ops.cross_entropy(logits, labels, "none")).all())
    # the fused rows carry the NaN themselves: no poison kernel but for "none"
    assert len(poisons) == (1 if fused else 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0, 3, 64], ids=["none-ignored", "some", "all"])
@pytest.mark.parametrize("classes", [10, 1100], ids=["fused", "long-rows"])
def test_ignore_index_on_the_gpu_equals_the_host(
    dtype: str, reduction: str, ignored: int, classes: int, monkeypatch: Any
) -> None:
    # the op's ignore_index (a loss at its defaults passes -100 for GPU labels): the fused
    # kernels and the array code on the GPU, against the op on the host; with nothing ignored,
    # the same bits as without ignore_index; every label ignored: a NaN mean, a 0 gradient
    import cupy

    rng = np.random.default_rng(6)
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    host = (3 * rng.standard_normal((64, classes))).astype(np.float32).astype(dt)
    y = rng.integers(0, classes, 64).astype(np.int32)  # (int32: read as such by the kernels)
    y[rng.permutation(64)[:ignored]] = -100
    logits, labels = cupy.asarray(host), cupy.asarray(y)
    ct = np.linspace(0.5, 1.5, 64) if reduction == "none" else np.float64(0.75)

    def value_and_grad(x: Any, lab: Any, ignore: Any) -> tuple[Any, Any]:
        loss, pullback = ann.vjp(lambda z: ops.cross_entropy(z, lab, reduction, ignore), x)
        seed = ct.astype(loss.dtype)
        (grad,) = pullback(cupy.asarray(seed) if isinstance(x, cupy.ndarray) else seed)
        return cupy.asnumpy(loss).astype(np.float64), cupy.asnumpy(grad).astype(np.float64)

    want_loss, want_grad = value_and_grad(host, y, -100)
    tol = {"float64": 1e-12, "float32": 1e-5}.get(dtype, 2e-2)
    for fused in (True, False):
        with monkeypatch.context() as m:
            if not fused:
                _unfused(m)
            loss, grad = value_and_grad(logits, labels, -100)
            if not ignored and fused and classes <= 1024:  # (the array code's mean may add
                # in another order than its sum over the rows kept: close, not the same bits)
                plain_loss, plain_grad = value_and_grad(logits, labels, None)
                np.testing.assert_array_equal(loss, plain_loss)
                np.testing.assert_array_equal(grad, plain_grad)
        if ignored == 64 and reduction == "mean":
            assert np.isnan(loss) and np.isnan(want_loss)
        else:
            np.testing.assert_allclose(loss, want_loss, rtol=tol, atol=tol)
        np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol)
        assert not grad[y == -100].any()  # an ignored row's gradient is 0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [1, 256, 16_384, 16_385])
def test_the_mean_of_the_kept_losses_counts_them_on_the_device(dtype: str, n: int) -> None:
    import cupy

    from asyncnn.backends import _fused_nn

    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(dtype)
    y = rng.integers(0, 3, n).astype(np.int32)
    y[::3] = -100
    x[y == -100] = 0  # (the rows' losses, as the forward kernel leaves them)
    mean, kept = _fused_nn.mean_of_kept(cupy.asarray(x), cupy.asarray(y), -100)
    assert mean.shape == kept.shape == () and mean.dtype == kept.dtype == np.dtype(dtype)
    assert float(kept) == np.count_nonzero(y != -100)
    want = x.astype(np.float64).sum() / max(1, np.count_nonzero(y != -100))
    tol = 1e-12 if dtype == "float64" else 1e-5
    if n > 1:
        np.testing.assert_allclose(float(mean), want, rtol=tol, atol=tol)
    else:  # one label, ignored: 0 / 0
        assert np.isnan(float(mean)) and float(kept) == 0
    if n <= _fused_nn.LOSS_SUM_ROWS:  # nothing ignored: the bits of reduce_losses' mean
        plain = _fused_nn.mean_of_kept(cupy.asarray(x), cupy.asarray(y * 0), -100)[0]
        assert float(plain) == float(_fused_nn.reduce_losses(cupy.asarray(x), "mean"))


def test_a_bad_label_beside_ignored_ones_still_makes_the_loss_nan(monkeypatch: Any) -> None:
    import cupy

    logits = cupy.asarray(np.random.default_rng(7).standard_normal((4, 3)))
    for fused in (True, False):
        with monkeypatch.context() as m:
            if not fused:
                _unfused(m)
            ignored = cupy.asarray(np.array([0, -100, 1, -100]))
            bad = cupy.asarray(np.array([0, -100, 3, -100]))
            for reduction in ("mean", "sum"):
                assert np.isfinite(float(ops.cross_entropy(logits, ignored, reduction, -100)))
                assert np.isnan(float(ops.cross_entropy(logits, bad, reduction, -100)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_ignored_row_holding_inf_or_nan_has_the_hosts_nan_gradient(
    reduction: str, monkeypatch: Any
) -> None:
    # its softmax is NaN, and so is torch's gradient there (and the host's); an ignored row of
    # finite logits gets +0; the fused kernels and the array code alike
    import cupy

    z = np.array([[0.0, np.inf, 1.0], [0.5, -0.2, 0.1], [2.0, 0.3, -1.0], [np.nan, 0.0, 1.0]])
    y = np.array([-100, 2, -100, -100])
    ct = np.array([0.5, 1.0, 1.5, 2.0]) if reduction == "none" else np.float64(0.75)

    def grad_of(x: Any, lab: Any, seed: Any) -> np.ndarray:
        _, pullback = ann.vjp(lambda v: ops.cross_entropy(v, lab, reduction, -100), x)
        return np.asarray(cupy.asnumpy(pullback(seed)[0]))

    want = grad_of(z, y, ct)
    assert np.isnan(want[[0, 3]]).all() and np.isfinite(want[[1, 2]]).all()
    for fused in (True, False):
        with monkeypatch.context() as m:
            calls = _counting(m, "cross_entropy_grad")
            if not fused:
                _unfused(m)
            got = grad_of(cupy.asarray(z), cupy.asarray(y), cupy.asarray(ct))
        assert len(calls) == (1 if fused else 0)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"{fused=}")
        assert not np.signbit(got[2]).any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_at_its_defaults_ignores_gpu_labels_as_host_ones(
    reduction: str,
) -> None:
    # the GPU labels holding -100 go to the fused kernels, which skip them; the host labels take
    # the composed path: the same loss and gradient
    import cupy

    rng = np.random.default_rng(8)
    logits = rng.standard_normal((12, 5))
    labels = rng.integers(0, 5, 12)
    labels[[1, 4, 5]] = -100
    loss = nn.CrossEntropyLoss(reduction)
    results = []
    for x, y in ((logits, labels), (cupy.asarray(logits), cupy.asarray(labels))):
        call = loss.primitive_call(x, y)
        assert (call is None) == isinstance(y, np.ndarray)  # the host's: composed
        value, pullback = ann.vjp(lambda z: loss({}, z, y), x)  # noqa: B023
        (grad,) = pullback(value * 0 + 1 if reduction == "none" else 1.0)
        results.append((cupy.asnumpy(value), cupy.asnumpy(grad)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 16_384, 16_385, 70_000])
def test_losses_reduced_in_one_kernel_in_a_fixed_order(dtype: str, n: int) -> None:
    import cupy

    from asyncnn.backends import _fused_nn

    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    losses = cupy.asarray(x)
    # rounding error grows with the sum of the magnitudes, not with the (cancelled) result
    scale = np.abs(x.astype(np.float64)).sum() * (1e-14 if dtype == "float64" else 1e-6)
    for reduction, want in (("mean", x.astype(np.float64).mean()), ("sum", x.sum(dtype=float))):
        got = _fused_nn.reduce_losses(losses, reduction)
        assert got.shape == () and got.dtype == losses.dtype
        tol = scale / n if reduction == "mean" else scale
        np.testing.assert_allclose(float(got), want, rtol=0, atol=tol)
        # the order depends on the length alone: the same bits every time
        assert float(_fused_nn.reduce_losses(losses, reduction)) == float(got)
    losses[n // 2] = np.nan
    assert np.isnan(float(_fused_nn.reduce_losses(losses, "mean")))
    assert np.isnan(float(_fused_nn.reduce_losses(losses[:0], "mean")))
    assert float(_fused_nn.reduce_losses(losses[:0], "sum")) == 0.0
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        _fused_nn.reduce_losses(losses, "none")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_fused_relu_equals_the_array_code_bit_for_bit(dtype: str, monkeypatch: Any) -> None:
    import cupy

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(4)
    x = cupy.asarray(rng.standard_normal((33, 70)), dtype=cupy.float32)
    x[0, :7] = cupy.asarray([np.nan, -0.0, 0.0, np.inf, -np.inf, 1e-30, -1e-30], cupy.float32)
    x = x.astype(dt)[:, ::-1]  # a view: the kernel takes any layout

    def relu() -> Any:
        out, pullback = ann.vjp(ops.relu, x)
        pullback(out)  # the gradient reads the output the fused kernel wrote
        return out

    got, want = _fused_and_array(monkeypatch, "relu", relu)
    assert got.dtype == want.dtype == dt and got.shape == want.shape
    # every value to the bit (-0 and the negative tiny become +0 on both), the NaN a NaN
    assert _same_bits_but_nan_payloads(got, want) == 1
    # and as numpy computes it on the CPU
    host = np.maximum(cupy.asnumpy(x.astype(cupy.float32)), np.float32(0))
    assert not np.signbit(cupy.asnumpy(got.astype(cupy.float32))).any()
    np.testing.assert_array_equal(cupy.asnumpy(got.astype(cupy.float32)), host)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_fused_relu_gradient_equals_the_array_code_bit_for_bit(
    dtype: str, monkeypatch: Any
) -> None:
    import cupy

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(5)
    x = cupy.asarray(rng.standard_normal((37, 65)), dtype=cupy.float32).astype(dt)
    x[0, :4] = 0  # relu's output is 0 there: no gradient
    seed = cupy.asarray(rng.standard_normal((37, 65)), dtype=cupy.float32).astype(dt)
    seed[1, :3] = cupy.asarray([np.nan, -0.0, np.inf], dtype=cupy.float32).astype(dt)
    seed = seed[:, ::-1]  # a view: the kernel takes any layout

    def grad() -> Any:
        _, pullback = ann.vjp(ops.relu, x)
        (g,) = pullback(seed)
        return g

    got, want = _fused_and_array(monkeypatch, "relu_grad", grad)
    assert got.dtype == want.dtype == dt and got.shape == want.shape
    # every value to the bit, the signs of zeros included (NaN payloads may differ)
    assert _same_bits_but_nan_payloads(got, want) >= 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("shape", "axis", "keepdims"),
    [((64, 4096), (0,), False), ((37, 65), 0, True), ((3, 5, 129), (0, 1), False),
     ((3, 5, 129), 2, False), ((16_385, 33), (0,), False), ((1, 7), 0, False)],
)  # fmt: skip
def test_16_bit_sums_in_one_kernel_equal_a_sum_and_a_cast(
    dtype: str, shape: tuple[int, ...], axis: Any, keepdims: bool, monkeypatch: Any
) -> None:
    import cupy

    from asyncnn.backends import _fused_nn, acc_sum

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    x = cupy.asarray(np.random.default_rng(6).standard_normal(shape), dtype=cupy.float32)
    x = x.astype(dt)
    # the raw column kernel built here (a build failure would fall back without a word)
    assert _fused_nn._column_sum(str(dt)) is not None
    with monkeypatch.context() as m:
        calls = _counting(m, "half_sum")
        got = acc_sum(x, axis, keepdims)
        assert len(calls) == 1
        _unfused(m)
        want = acc_sum(x, axis, keepdims)
        assert len(calls) == 1
    assert got.dtype == want.dtype == dt and got.shape == want.shape
    # the same float32 sum rounded once, or (where cupy's sum adds in another order, as CUB's
    # reductions may) one rounding apart: neighbouring 16-bit floats of one sign
    g_bits, w_bits = (cupy.asnumpy(a.view(cupy.uint16)).astype(np.int64) for a in (got, want))
    assert np.abs(g_bits - w_bits).max() <= 1
    # and it is the float32 sum, rounded once
    ref = cupy.asnumpy(x.astype(cupy.float32)).astype(np.float64).sum(axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(cupy.asnumpy(got.astype(cupy.float32)), ref, rtol=1e-2, atol=1e-2)
    # the same bits again: the order of the additions depends on the shape alone
    again = acc_sum(x, axis, keepdims)
    assert bool((again.view(cupy.uint16) == got.view(cupy.uint16)).all())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_column_sums_of_views_and_long_columns(dtype: str) -> None:
    import cupy

    from asyncnn.backends import _fused_nn

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    x = cupy.asarray(np.random.default_rng(7).standard_normal((300, 130)), cupy.float32)
    x = x.astype(dt)
    # views and an empty one: the reduction kernel takes them
    for view in (x[:, ::2], x[::3], x.T, x[:, :0]):
        assert view.size == 0 or not view.flags.c_contiguous
        got = _fused_nn.half_sum(view, (0,), False)
        ref = cupy.asnumpy(view.astype(cupy.float32)).astype(np.float64).sum(axis=0)
        assert got.shape == ref.shape and got.dtype == dt
        np.testing.assert_allclose(
            cupy.asnumpy(got.astype(cupy.float32)), ref, rtol=1e-2, atol=2e-2
        )
    # a column of many ones: float32 accumulation (bfloat16 would stop at 256)
    ones = cupy.ones((_fused_nn.COLUMN_SUM_ROWS, 3), dtype=dt)
    assert (
        cupy.asnumpy(_fused_nn.half_sum(ones, 0, False).astype(cupy.float32)).tolist()
        == [float(_fused_nn.COLUMN_SUM_ROWS)] * 3
    )


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "array"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_loss_primitive_on_gpu_labels_equals_its_trace(
    fused: bool, reduction: str, monkeypatch: Any
) -> None:
    """The loss actor's direct path (``primitive_call`` and ``primitive_vjp``, no trace) takes
    labels on the GPU too, with the same bits as tracing the loss, a bad label's NaN included."""
    import cupy

    rng = np.random.default_rng(4)
    logits = cupy.asarray(rng.standard_normal((6, 5)).astype(np.float32))
    loss = ann.nn.CrossEntropyLoss(reduction=reduction)
    for labels in (cupy.asarray([0, 4, 1, 2, 3, 0]), cupy.asarray([0, 5, 1, 2, 3, -1])):
        with monkeypatch.context() as m:
            if not fused:
                _unfused(m)
            call = loss.primitive_call(logits, labels)
            assert call is not None
            value, pullback = ann._math._autodiff.primitive_vjp(*call, [0])
            ref_value, ref_pullback = ann.vjp(lambda x, y=labels: loss({}, x, y), logits)
            seed = cupy.full(value.shape, 0.5, value.dtype)
            (grad,) = pullback(seed)
            (ref_grad,) = ref_pullback(seed)
        _same_bits_but_nan_payloads(value, ref_value)
        _same_bits_but_nan_payloads(grad, ref_grad)


# -- embedding rows of GPU ids ----------------------------------------------------------------------
def _embedding_value_and_grad(weight: Any, ids: Any) -> tuple[Any, Any]:
    import cupy

    out, pullback = ann.vjp(lambda w: ops.embedding(w, ids), weight)
    (grad,) = pullback(cupy.ones_like(out))  # (a bad id's row too: its gradient is dropped)
    return out, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", ["int64", "int32", "uint8"])
def test_fused_embedding_rows_equal_the_array_code_nan_for_ids_outside_the_table(
    dtype: str, id_dtype: str, monkeypatch: Any
) -> None:
    # cupy's take wraps an id (5 read row 0 of five, -1 row 4): a bad id trained another row
    import cupy

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    table = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32).astype(dt)
    weight = cupy.asarray(table)
    neg = 3 if id_dtype == "uint8" else -1
    host = np.array([[0, 5, 4, 200], [neg, 4, 2, 1]], dtype=id_dtype)
    ids = cupy.asarray(np.repeat(host, 2, axis=1))[:, ::2]  # host's ids as a view: via a copy
    (out, grad), (want_out, want_grad) = _fused_and_array(
        monkeypatch, "embedding_rows", lambda: _embedding_value_and_grad(weight, ids)
    )
    good = (host >= 0) & (host < 5)
    assert out.shape == (2, 4, 6) and out.dtype == weight.dtype == want_out.dtype
    assert _same_bits_but_nan_payloads(out, want_out) == 6 * int((~good).sum())
    got = cupy.asnumpy(out)
    assert np.isnan(got[~good].astype(np.float64)).all()
    np.testing.assert_array_equal(got[good], table[host[good]])
    assert _same_bits_but_nan_payloads(grad, want_grad) == 0
    counts = np.zeros(5)
    np.add.at(counts, host[good], 1.0)  # no gradient for a bad id, wrapped or not
    want = np.broadcast_to(counts[:, None], table.shape)
    np.testing.assert_array_equal(cupy.asnumpy(grad).astype(np.float64), want)


def test_an_embedding_of_gpu_ids_reads_nothing_back_to_the_host(monkeypatch: Any) -> None:
    import cupy

    from asyncnn._math import _ops_nn

    def no_read(ids: Any) -> Any:
        raise AssertionError("a GPU id was read back to the host")

    emb = nn.Embedding(4, 3)
    params = emb.init(0, backend="cupy")
    monkeypatch.setattr(_ops_nn, "id_range", no_read)
    out = cupy.asnumpy(emb(params, cupy.asarray([[1, 4], [-1, 0]])))
    assert np.isnan(out[[0, 1], [1, 0]]).all() and np.isfinite(out[[0, 1], [0, 1]]).all()
    with pytest.raises(AssertionError, match="read back"):  # but a numpy id is checked
        emb(params, np.array([5]))


def test_gpu_ids_into_an_integer_table_are_checked_on_the_host() -> None:
    import cupy

    table = cupy.arange(10).reshape(5, 2)  # no NaN for a bad id's row: checked instead
    for bad in (5, -1):
        with pytest.raises(IndexError, match=rf"embedding: id {bad} is outside \[0, 5\)"):
            ops.embedding(table, cupy.asarray([0, bad]))
    assert cupy.asnumpy(ops.embedding(table, cupy.asarray([4]))).tolist() == [[8, 9]]


def test_a_gpu_run_names_the_embedding_id_outside_its_table() -> None:
    from asyncnn import optim, policies

    def model() -> Any:
        return ann.Graph.sequential(
            [nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2)], loss=nn.CrossEntropyLoss(),
            input_shape=(None, 4), input_dtype="int64", devices=["cuda:0"],
        )  # fmt: skip

    x = np.arange(32).reshape(8, 4) % 10
    x[5, 2] = 10
    data = {"x": x, "y": np.zeros(8, dtype=np.int64)}
    kw: dict[str, Any] = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync(), "seed": 0}
    with pytest.raises(ValueError, match=r"input 'x': id 10 at index \(5, 2\) .* 'stage0'"):
        ann.Trainer(model(), **kw).fit(data, batch_size=4)  # the host's check of the data
    losses = ann.Trainer(model(), **kw).fit(data, batch_size=4, check_data=False).losses
    assert np.isfinite(losses[0]) and np.isnan(losses[1])  # the row's NaN, not another row
    with pytest.raises(ann.ActorError, match=r"'stage0' produced NaN.*got id 10 at ids\[1, 2\]"):
        ann.Trainer(model(), check_finite=True, **kw).fit(data, batch_size=4, check_data=False)


# -- take and integer indexing with GPU indices (array code) ---------------------------------------
def _nan_equal(got: Any, want: np.ndarray) -> None:
    import cupy

    got = cupy.asnumpy(got)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(want))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("id_dtype", ["int64", "int32", "uint8"])
def test_take_and_getitem_of_gpu_indices_outside_the_axis_give_nan_and_no_gradient(
    dtype: str, id_dtype: str, monkeypatch: Any
) -> None:
    # cupy wraps an index (4 of four read entry 0, -5 entry 3) where numpy raises: it trained
    # another entry. The reference: the same ops on numpy, through the path of GPU indices
    # (tests/test_ops_index.py checks that path against numpy)
    import cupy

    from asyncnn._math import _ops_nn

    host = np.arange(48.0).reshape(4, 3, 4).astype(dtype)
    ids = np.array([[0, 4, 255], [2, 1, 3]] if id_dtype == "uint8" else [[0, 4, -1], [-5, -4, 3]])
    ids = ids.astype(id_dtype)
    cases = [
        lambda a, i: ops.take(a, i, axis=0),
        lambda a, i: ops.take(a, i, axis=-1),
        lambda a, i: a[i],
        lambda a, i: a[1, :, i],  # (the advanced axes go first, as in numpy)
        lambda a, i: a[i, 1:, i[::-1]],
    ]
    for fn in cases:
        with monkeypatch.context() as m:
            m.setattr(_ops_nn, "ids_on_host", lambda ids: False)
            want, pullback = ann.vjp(lambda a: fn(a, ids), host)  # noqa: B023
            (want_grad,) = pullback(np.ones_like(want))
        with monkeypatch.context() as m:
            m.setattr(_ops_nn, "id_range", lambda ids: pytest.fail("a GPU index was read back"))
            out, pullback = ann.vjp(lambda a: fn(a, cupy.asarray(ids)), cupy.asarray(host))  # noqa: B023
            (grad,) = pullback(cupy.ones_like(out))
        assert np.isnan(want).any()
        _nan_equal(out, want)
        _nan_equal(grad, want_grad)


def test_gpu_indices_into_an_integer_array_are_checked_on_the_host_too() -> None:
    import cupy

    table = cupy.arange(12).reshape(3, 4)  # no NaN for a bad index's entry: checked instead
    for bad in (3, -4):
        with pytest.raises(IndexError, match=rf"take: index {bad} is out of bounds for axis 0"):
            ops.take(table, cupy.asarray([0, bad]))
        with pytest.raises(IndexError, match=rf"getitem: index {bad} is out of bounds for axis 0"):
            ops.getitem(table, cupy.asarray([[bad]]))
    assert cupy.asnumpy(ops.take(table, cupy.asarray([-1]), axis=1)).tolist() == [[3], [7], [11]]


def test_cupy_asarray_of_an_unknown_dtype_names_it() -> None:
    from asyncnn.backends import get_backend

    backend = get_backend("cupy")
    with pytest.raises(ValueError, match=r"unknown dtype 'float33'"):
        backend.asarray([1.0], dtype="float33")
    if BFLOAT16 is None:
        with pytest.raises(ValueError, match=r"'bfloat16' needs .*pip install ml_dtypes"):
            backend.asarray([1.0], dtype="bfloat16")
