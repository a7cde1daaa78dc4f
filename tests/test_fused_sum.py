"""The one-pass sum of a flush's gradients on the GPU (``backends/_fused_sum.py``) against the
eager sum it replaces (``a + b`` key by key, then ``* scale``): bit for bit in float32 and
float64, with more terms than one kernel reads and strided views; 16-bit gradients are left to
the eager sum. Skips without cupy and a GPU (run it with ``bash experiments/device_tests.sh``)."""

from __future__ import annotations

import numpy as np
import pytest

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
