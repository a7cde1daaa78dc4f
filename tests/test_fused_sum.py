"""The one-pass sum of a flush's gradients on the GPU (``backends/_fused_sum.py``) against the
eager sum it replaces (``a + b`` key by key, then ``* scale``): bit for bit in float32 and
float64, with more terms than one kernel reads and strided views; 16-bit gradients are left to
the eager sum. The optimizers' kernels reading such a sum in place of a gradient
(``_fused_sum.summed``) equal the sum followed by the update, bit for bit. Skips without cupy and
a GPU (run it with ``bash experiments/device_tests.sh``)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from asyncnn import optim

from conftest import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")]


def _eager(terms, scale):
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total if scale == 1.0 else total * scale


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("count", [1, 2, 4, 8, 11, 16])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3, 1 / 11])
def test_sum_into_equals_the_eager_sum_bit_for_bit(dtype, count, scale):
    import cupy as cp

    from asyncnn.backends import _fused_sum

    rng = np.random.default_rng(count)
    # values of many magnitudes, so that the order of the additions shows in the roundings
    host = [
        (rng.standard_normal((33, 70)) * 10.0 ** rng.integers(-3, 4, (33, 70))).astype(dtype)
        for _ in range(count)
    ]
    terms = [cp.asarray(h) for h in host]
    assert _fused_sum.sums([[t] for t in terms])
    out = [cp.empty_like(terms[0])]
    _fused_sum.sum_into(out, [[t] for t in terms], scale)
    want = _eager(terms, scale)
    assert out[0].dtype == want.dtype
    np.testing.assert_array_equal(
        cp.asnumpy(out[0]).view(np.uint8), cp.asnumpy(want).view(np.uint8)
    )


def test_sums_leaves_16_bit_and_mixed_gradients_to_the_eager_sum():
    import cupy as cp

    from asyncnn.backends import BFLOAT16, _fused_sum

    a = cp.ones((3, 4), cp.float32)
    assert not _fused_sum.sums([[a.astype(cp.float16)], [a.astype(cp.float16)]])
    assert not _fused_sum.sums([[a], [a.astype(cp.float64)]])
    assert not _fused_sum.sums([[a], [a[:2]]])
    assert not _fused_sum.sums([[a], [np.ones((3, 4), np.float32)]])
    if BFLOAT16 is not None:
        assert not _fused_sum.sums([[a.astype(BFLOAT16)], [a.astype(BFLOAT16)]])


def test_sum_into_reads_strided_views_and_several_leaves():
    import cupy as cp

    from asyncnn.backends import _fused_sum

    rng = np.random.default_rng(0)
    big = [cp.asarray(rng.standard_normal((20, 30)).astype(np.float32)) for _ in range(3)]
    small = [cp.asarray(rng.standard_normal(7)) for _ in range(3)]  # float64
    views = [b[::2, 1::3] for b in big]
    out = [cp.empty_like(views[0]), cp.empty_like(small[0])]
    _fused_sum.sum_into(out, [[v, s] for v, s in zip(views, small, strict=True)], 1 / 3)
    np.testing.assert_array_equal(cp.asnumpy(out[0]), cp.asnumpy(_eager(views, 1 / 3)))
    np.testing.assert_array_equal(cp.asnumpy(out[1]), cp.asnumpy(_eager(small, 1 / 3)))


_nothing = contextlib.nullcontext


def _leaves(rng, count, dtype):
    import cupy as cp

    shapes = [(33, 70), (70,), (5, 3)]
    return [
        [cp.asarray((rng.standard_normal(s) * 10.0 ** rng.integers(-2, 3, s)).astype(dtype))
         for s in shapes]
        for _ in range(count)
    ]  # fmt: skip


_OPTIMIZERS = {
    "sgd": lambda: optim.SGD(lr=0.1),
    "momentum-decay": lambda: optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.01, dampening=0.1),
    "nesterov": lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optim.Adam(lr=0.01),
    "adamw-amsgrad": lambda: optim.AdamW(lr=0.01, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("count", [2, 4, 8])
@pytest.mark.parametrize("name", list(_OPTIMIZERS))
@pytest.mark.parametrize("in_place", [False, True], ids=["fresh", "in-place"])
def test_an_update_reading_a_sum_equals_the_sum_then_the_update(dtype, count, name, in_place):
    import cupy as cp

    from asyncnn.backends import _fused, _fused_sum

    opt = _OPTIMIZERS[name]()
    rng = np.random.default_rng(count)
    terms = _leaves(rng, count, dtype)
    params = {"w": terms[0][0] * 0.5, "b": terms[0][1] * 0.25, "c": terms[0][2] + 1.0}
    state = opt.init(params)
    for step in range(3):  # the momentum's first step and later ones
        state["step"] = step
        scale = 1.0 / count
        sum_ = [cp.empty_like(x) for x in terms[0]]
        _fused_sum.sum_into(sum_, terms, scale)
        want_p, want_s = opt.update(params, {"w": sum_[0], "b": sum_[1], "c": sum_[2]}, state)
        # the gradients handed to the update: never read inside summed (NaN would show)
        stand_ins = [cp.full_like(x, np.nan) for x in terms[0]]
        ps = {k: v.copy() for k, v in params.items()}
        st = {
            k: v if k == "step" else {j: x.copy() for j, x in v.items()} for k, v in state.items()
        }
        with _fused.in_place() if in_place else _nothing():
            with _fused_sum.summed(stand_ins, terms, scale):
                got_p, got_s = opt.update(ps, dict(zip("wbc", stand_ins, strict=True)), st)
        for got, want in [(got_p, want_p), *((got_s[k], want_s[k]) for k in opt.buffer_names())]:
            for k in want:
                np.testing.assert_array_equal(
                    cp.asnumpy(got[k]).view(np.uint8), cp.asnumpy(want[k]).view(np.uint8)
                )
        params, state = want_p, want_s


def test_an_update_that_did_not_read_its_sum_is_told():
    import cupy as cp

    from asyncnn.backends import _fused_sum

    terms = _leaves(np.random.default_rng(1), 2, "float32")
    params = {"w": terms[0][0], "b": terms[0][1], "c": terms[0][2]}
    stand_ins = [cp.zeros_like(x) for x in terms[0]]
    opt = optim.SGD(lr=0.1, clip_norm=1.0)  # the clip reads the gradients themselves
    with pytest.raises(_fused_sum.NotSummed, match="3 of 3 gradient leaves"):
        with _fused_sum.summed(stand_ins, terms, 0.5):
            opt.update(params, dict(zip("wbc", stand_ins, strict=True)), opt.init(params))
    with pytest.raises(ValueError, match="at most 8 terms"):
        with _fused_sum.summed(stand_ins, terms * 5, 0.1):
            pass
