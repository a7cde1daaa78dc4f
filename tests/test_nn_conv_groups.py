"""Grouped convolutions (``groups=`` of nn.Conv1d and nn.Conv2d): layouts, torch's init, values
and gradients (finite differences in float64; torch where installed), errors, specs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from asyncnn import nn, ops, vjp
from asyncnn._math._nn._module import shape_of
from asyncnn.backends import Backend, to_numpy
from asyncnn.testing import check_grads


def _ref(conv: Any, x: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """The grouped convolution as one ungrouped ops.conv per group, concatenated."""
    g = conv.groups
    cin, cout = conv.in_channels // g, conv.out_channels // g
    fn = ops.conv1d if x.ndim == 3 else ops.conv2d
    outs = [
        fn(
            x[:, i * cin : (i + 1) * cin],
            params["weight"][i * cout : (i + 1) * cout],
            None if "bias" not in params else params["bias"][i * cout : (i + 1) * cout],
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )
        for i in range(g)
    ]
    return np.concatenate([to_numpy(o) for o in outs], axis=1)


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Conv1d(4, 6, 3, groups=2), (6, 2, 3)),
        (nn.Conv2d(4, 6, (3, 2), groups=2), (6, 2, 3, 2)),
        (nn.Conv2d(6, 12, 3, groups=6), (12, 1, 3, 3)),  # depthwise, 2 kernels per channel
    ],
)
def test_grouped_weight_shape_and_torch_fan_in(module: Any, shape: tuple[int, ...]) -> None:
    p = module.init(0, dtype="float64")
    assert p["weight"].shape == shape and p["bias"].shape == (shape[0],)
    # torch: fan_in = in_channels / groups * prod(kernel) for the weight and the bias
    bound = 1 / math.sqrt(math.prod(shape[1:]))
    for leaf in (p["weight"], p["bias"]):
        assert np.abs(leaf).max() <= bound
    assert np.abs(p["weight"]).max() > 0.8 * bound


def test_groups_1_is_the_ungrouped_module_bit_for_bit() -> None:
    assert nn.Conv2d(3, 4, 3) == nn.Conv2d(3, 4, 3, groups=1)
    c = nn.Conv2d(3, 4, 3, padding=1)
    p = c.init(0, dtype="float32")
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    direct = ops.conv2d(x, p["weight"], p["bias"], stride=1, padding=1, dilation=1)
    np.testing.assert_array_equal(c(p, x), direct)


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7)),
        (nn.Conv1d(3, 3, 2, groups=3, bias=False), (2, 3, 5)),
        (nn.Conv2d(4, 2, (2, 3), padding=(1, 0), dilation=(1, 2), groups=2), (2, 4, 5, 6)),
        (nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3), (1, 3, 5, 5)),
    ],
    ids=["conv1d", "conv1d-depthwise-nobias", "conv2d", "conv2d-depthwise"],
)
def test_grouped_forward_and_gradients(backend: Backend, module: Any, shape: Any) -> None:
    params = module.init(0, backend=backend.name, dtype="float64")
    x = backend.asarray(np.random.default_rng(1).standard_normal(shape))
    out = module(params, x)
    host = {k: to_numpy(v) for k, v in params.items()}
    np.testing.assert_allclose(to_numpy(out), _ref(module, to_numpy(x), host), rtol=1e-12)
    assert tuple(out.shape)[1:] == shape_of(module, (None, *shape[1:]))[1:]
    check_grads(lambda p, x: module(p, x), params, x, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("spatial", [1, 2])
@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_matches_torch_values_and_gradients(spatial: int, groups: int) -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(groups)
    cls = nn.Conv1d if spatial == 1 else nn.Conv2d
    m = cls(4, 8, 3, stride=2, padding=1, dilation=1, groups=groups)
    p = m.init(3, dtype="float64")
    x = rng.standard_normal((2, 4, 7) if spatial == 1 else (2, 4, 6, 5))
    out, pullback = vjp(lambda p, x: m(p, x), p, x)
    ct = rng.standard_normal(out.shape)
    gp, gx = pullback(ct)

    tw, tb, tx = (torch.tensor(a, requires_grad=True) for a in (p["weight"], p["bias"], x))
    conv = f.conv1d if spatial == 1 else f.conv2d
    ref = conv(tx, tw, tb, stride=2, padding=1, groups=groups)
    ref.backward(torch.tensor(ct))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gp["weight"], tw.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gp["bias"], tb.grad.numpy(), rtol=1e-10, atol=1e-12)
    # torch's init bound for the same module: fan_in = in / groups * prod(kernel)
    tm = (torch.nn.Conv1d if spatial == 1 else torch.nn.Conv2d)(4, 8, 3, groups=groups)
    assert tuple(tm.weight.shape) == p["weight"].shape


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: nn.Conv2d(3, 4, 3, groups=2),
            r"Conv2d: in_channels 3 is not divisible by "
            r"groups 2",
        ),
        (
            lambda: nn.Conv1d(4, 6, 3, groups=4),
            r"Conv1d: out_channels 6 is not divisible by "
            r"groups 4",
        ),
        (lambda: nn.Conv2d(4, 4, 3, groups=0), r"Conv2d: groups must be an int >= 1, got 0"),
        (lambda: nn.Conv2d(4, 4, 3, groups=True), r"groups must be an int >= 1, got True"),
        (lambda: nn.Conv1d(4, 4, 3, groups=2.0), r"groups must be an int >= 1, got 2.0"),
    ],
    ids=["in", "out", "zero", "bool", "float"],
)
def test_groups_that_do_not_divide_the_channels_are_named(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_grouped_params_of_the_ungrouped_shape_are_refused_by_shape() -> None:
    m = nn.Conv2d(4, 4, 3, groups=2)
    wrong = nn.Conv2d(4, 4, 3).init(0)
    with pytest.raises(ValueError, match=r"params\['weight'\] has shape \(4, 4, 3, 3\), "
                       r"expected \(4, 2, 3, 3\)"):  # fmt: skip
        m(wrong, np.zeros((1, 4, 5, 5), np.float32))


def test_grouped_flops_spec_and_repr() -> None:
    m = nn.Conv2d(4, 8, 3, padding=1, groups=4)
    # each output sums in / groups * 9 products: a quarter of the ungrouped conv's work
    assert m.flops((None, 4, 6, 6)) * 4 == nn.Conv2d(4, 8, 3, padding=1).flops((None, 4, 6, 6))
    assert nn.from_spec(nn.to_spec(m)) == m
    assert "groups=4" in repr(m)
    assert nn.Conv2d(4, 8, 3) != m
