"""Max pools' ``return_indices`` and their inverse, the max unpools (``ops.max_unpool1d/2d``,
``nn.MaxUnpool1d/2d``): indices and values against torch (ties, -inf, NaN, padding, dilation,
ceil_mode), gradients against torch and finite differences, errors, and graphs."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies, vjp
from asyncnn._math._autodiff import Tracer
from asyncnn.backends import BFLOAT16, Backend, to_numpy
from asyncnn.testing import check_grads


def _inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Inputs that make a max pool choose: ties (a few levels), -inf (whole windows of it next
    to the padding, too) and NaN (one and several in a window)."""
    ties = rng.integers(0, 3, shape).astype(np.float64)
    infs = ties.copy()
    infs[rng.random(shape) < 0.6] = -np.inf
    nans = ties.copy()
    nans[rng.random(shape) < 0.3] = np.nan
    return [ties, infs, nans, np.full(shape, -np.inf), rng.standard_normal(shape)]


def _torch_pool(torch: Any, x: np.ndarray, *args: Any) -> tuple[np.ndarray, np.ndarray]:
    f = torch.nn.functional
    pool = f.max_pool1d if x.ndim == 3 else f.max_pool2d
    values, indices = pool(torch.tensor(x), *args, return_indices=True)
    return values.numpy(), indices.numpy()


def _check_against_torch(
    torch: Any, x: np.ndarray, k: Any, s: Any, p: Any, d: Any, c: bool
) -> bool:
    """Compares values and indices with torch's where asyncnn takes the geometry; False where it
    refuses it (torch must then refuse it too, or give no window)."""
    pool = ops.max_pool1d if x.ndim == 3 else ops.max_pool2d
    try:
        values, indices = pool(x, k, s, p, d, c, return_indices=True)
    except ValueError:
        return False
    want_values, want_indices = _torch_pool(torch, x, k, s, p, d, c)
    where = f"kernel {k}, stride {s}, padding {p}, dilation {d}, ceil_mode {c}, x {x.tolist()}"
    assert indices.dtype == np.int64, where
    np.testing.assert_array_equal(values, want_values, err_msg=where)
    np.testing.assert_array_equal(indices, want_indices, err_msg=where)
    return True


# -- max pools' indices ---------------------------------------------------------------------------
def test_max_pool1d_indices_match_torch_over_small_geometries() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    checked = 0
    for size, k, s, d in itertools.product(range(1, 8), range(1, 5), range(1, 4), range(1, 4)):
        for p, c in itertools.product(range(k // 2 + 1), (False, True)):
            for x in _inputs(rng, (1, 2, size)):
                checked += _check_against_torch(torch, x, k, s, p, d, c)
    assert checked > 2000  # (most geometries fit; those that do not are refused by both)


def test_max_pool2d_indices_match_torch_over_small_geometries() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(700):
        size = tuple(int(v) for v in rng.integers(1, 6, 2))
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 3, 2))
        p = tuple(int(rng.integers(0, ki // 2 + 1)) for ki in k)
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        c = bool(rng.integers(0, 2))
        for x in _inputs(rng, (2, 1, *size)):
            checked += _check_against_torch(torch, x, k, s, p, d, c)
    assert checked > 1500


def test_a_window_of_padding_only_has_torchs_index() -> None:
    # a dilated window that steps over the whole input: -inf, and torch's index of the cell
    # past the input where it started looking (in 2-d it may even name a real cell)
    torch = pytest.importorskip("torch")
    x1 = np.array([[[1.0, 2.0]]])
    x2 = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    for ceil_mode in (False, True):
        assert _check_against_torch(torch, x1, 2, 1, 1, 3, ceil_mode)
        for k, p, d in [(2, 1, 3), ((1, 2), (0, 1), (1, 3)), ((2, 1), (1, 0), (3, 1))]:
            assert _check_against_torch(torch, x2, k, 1, p, d, ceil_mode)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32", "int8", "uint8"])
def test_max_pool_indices_of_other_dtypes_match_torch(dtype: str) -> None:
    # an int8 window of -128s beside the padding (which is -128 too) names its first real cell
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    rows = rng.integers(-3, 3, (2, 3, 7))
    if dtype == "int8":
        rows[0, 0, :3] = -128
    x = rows.astype(dtype)
    for k, s, p in [(3, 2, 1), (2, 1, 1), (3, 1, 0), (2, 2, 1)]:
        for ceil_mode in (False, True):
            values, indices = ops.max_pool1d(x, k, s, p, 1, ceil_mode, return_indices=True)
            tv, ti = torch.nn.functional.max_pool1d(
                torch.tensor(x), k, s, p, 1, ceil_mode, return_indices=True
            )
            assert values.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(values, tv.numpy())
            np.testing.assert_array_equal(indices, ti.numpy())
            x2 = np.stack([x, x[:, ::-1]], axis=3)  # (2, 3, 7, 2)
            values, indices = ops.max_pool2d(x2, (k, 2), (s, 1), (p, 1), 1, ceil_mode, True)
            tv, ti = torch.nn.functional.max_pool2d(
                torch.tensor(x2), (k, 2), (s, 1), (p, 1), 1, ceil_mode, return_indices=True
            )
            np.testing.assert_array_equal(values, tv.numpy())
            np.testing.assert_array_equal(indices, ti.numpy())


def test_max_pool_indices_by_hand(backend: Backend) -> None:
    x = backend.asarray(np.array([[[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]]]))
    values, indices = ops.max_pool1d(x, 3, 2, return_indices=True)
    # windows [3 1 4] [4 1 5] [5 9 2]; ceil_mode adds [2 6]
    assert to_numpy(values).tolist() == [[[4.0, 5.0, 9.0]]]
    assert to_numpy(indices).tolist() == [[[2, 4, 5]]]
    assert to_numpy(indices).dtype == np.int64
    _, indices = ops.max_pool1d(x, 3, 2, ceil_mode=True, return_indices=True)
    assert to_numpy(indices).tolist() == [[[2, 4, 5, 7]]]
    # 2-d: flat h * W + w in the plane; a tie goes to the first in row-major order
    x2 = backend.asarray(np.array([[[[1.0, 7.0, 7.0], [7.0, 0.0, 2.0], [3.0, 8.0, 8.0]]]]))
    _, indices = ops.max_pool2d(x2, 2, 1, return_indices=True)
    assert to_numpy(indices).tolist() == [[[[1, 1], [7, 7]]]]  # ([7 7; 0 2]: its first 7)


def test_max_pool_values_gradient_is_unchanged_and_indices_are_constants(backend: Backend) -> None:
    rng = np.random.default_rng(3)
    x = backend.asarray(rng.integers(0, 3, (2, 3, 6, 5)).astype(np.float64))
    ct = backend.asarray(rng.standard_normal((2, 3, 3, 3)))
    seen: list[Any] = []

    def pooled(x: Any) -> Any:
        values, indices = ops.max_pool2d(x, 3, 2, 1, return_indices=True)
        seen.append(indices)
        return values

    out, pullback = vjp(pooled, x)
    ref, ref_pullback = vjp(lambda x: ops.max_pool2d(x, 3, 2, 1), x)
    np.testing.assert_array_equal(to_numpy(out), to_numpy(ref))
    np.testing.assert_array_equal(to_numpy(pullback(ct)[0]), to_numpy(ref_pullback(ct)[0]))
    assert type(seen[0]) is not Tracer  # (a raw integer array: no gradient flows through it)
    assert to_numpy(seen[0]).dtype == np.int64
    check_grads(lambda x: ops.max_pool1d(x, 2, 1, 1, return_indices=True)[0],
                backend.asarray(rng.standard_normal((2, 2, 5))))  # fmt: skip


def test_max_pool_modules_take_torchs_arguments_in_torchs_order() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(4).standard_normal((2, 3, 9, 8))
    # torch's MaxPool2d(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
    ours = nn.MaxPool2d(3, 2, 1, 1, True, True)
    theirs = torch.nn.MaxPool2d(3, 2, 1, 1, True, True)
    assert ours == nn.MaxPool2d(3, 2, 1, return_indices=True, ceil_mode=True)
    values, indices = ours({}, x)
    tv, ti = theirs(torch.tensor(x))
    np.testing.assert_array_equal(values, tv.numpy())
    np.testing.assert_array_equal(indices, ti.numpy())
    values, indices = nn.MaxPool1d(3, 2, 1, 2, True)({}, x[:, :, 0])
    tv, ti = torch.nn.MaxPool1d(3, 2, 1, 2, True)(torch.tensor(x[:, :, 0]))
    np.testing.assert_array_equal(indices, ti.numpy())
    # without it, one array as before
    assert isinstance(nn.MaxPool2d(2)({}, x), np.ndarray)
    assert nn.from_spec(nn.to_spec(ours)) == ours


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: nn.MaxPool2d(2, return_indices=1), TypeError,
         "MaxPool2d: return_indices must be True or False, got int 1"),
        (lambda: ops.max_pool1d(np.ones((1, 1, 4)), 2, return_indices="yes"), TypeError,
         "max_pool1d: return_indices must be True or False, got str 'yes'"),
        (lambda: nn.MaxPool2d(2, return_indices=True)._output_shape((1, 1, 4, 4)), ValueError,
         r"MaxPool2d\(.*return_indices=True.*\) returns \(values, indices\).*"
         "return_indices=False"),
    ],
)  # fmt: skip
def test_return_indices_refuses_what_is_not_a_bool(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_a_graph_refuses_a_layer_returning_values_and_indices_naming_it() -> None:
    g = ann.Graph()
    x = g.input("x", shape=(None, 1, 4, 4))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("pool", nn.MaxPool2d(2, return_indices=True), x)
    out = g.layer("head", nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), h)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    with pytest.raises(ann.GraphError, match=r"layer 'pool' \(MaxPool2d\(.*\)\) returned a "
                       r"tuple, not one array.*return_indices=False in a graph"):  # fmt: skip
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    # inside a stage's Sequential the pair would reach the next module, which takes a tuple of
    # arrays for an array (stacked: the indices trained on as values): refused as it is built
    with pytest.raises(ValueError, match=r"Sequential: module 0, MaxPool2d\(.*return_indices="
                       r"True.*\), gives \(values, indices\), which module 1 \(Flatten"):  # fmt: skip
        ann.Graph.sequential(
            [nn.MaxPool2d(2, return_indices=True), nn.Flatten(), nn.Linear(4, 2)],
            loss=nn.CrossEntropyLoss(), stages=1, input_shape=(None, 1, 4, 4),
        )  # fmt: skip


def test_a_sequential_refuses_a_pool_giving_indices_to_the_next_module() -> None:
    # the next module took the pair for one array: ReLU of np.asarray((values, indices)), a
    # (2, N, C, H, W) float array, the indices mixed into the activations (torch raises)
    with pytest.raises(ValueError, match=r"Sequential: module 1, MaxPool1d\(.*\), gives "
                       r"\(values, indices\), which module 2 \(ReLU\(\)\) would take for one "
                       r"array; give it return_indices=False, or call the pool yourself"):  # fmt: skip
        nn.Sequential(nn.Identity(), nn.MaxPool1d(2, return_indices=True), nn.ReLU())
    # the last module may: the Sequential gives the pair, as its call of the pool would
    seq = nn.Sequential(nn.ReLU(), nn.MaxPool1d(2, return_indices=True))
    values, indices = seq([{}, {}], np.array([[[3.0, -1.0, 2.0, 5.0]]]))
    assert values.tolist() == [[[3.0, 5.0]]] and indices.tolist() == [[[0, 3]]]


# -- max unpools ----------------------------------------------------------------------------------
#: (spatial dims, kernel, stride, padding, input size): disjoint windows, overlapping ones (an
#: entry the maximum of several: duplicate indices), and padding
UNPOOL_GEOMETRIES = [
    (1, 2, None, 0, 8),
    (1, 3, 2, 1, 9),
    (1, 3, 1, 1, 6),
    (2, 2, None, 0, (4, 6)),
    (2, (3, 2), (2, 1), (1, 0), (7, 5)),
    (2, 3, 1, 1, (4, 5)),
]


def _unpool_pair(n: int) -> tuple[Any, Any]:
    return (ops.max_pool1d, ops.max_unpool1d) if n == 1 else (ops.max_pool2d, ops.max_unpool2d)


@pytest.mark.parametrize(("n", "k", "s", "p", "size"), UNPOOL_GEOMETRIES)
def test_max_unpool_values_and_gradients_match_torch(
    n: int, k: Any, s: Any, p: Any, size: Any
) -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    pool, unpool = _unpool_pair(n)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 3, (2, 3, *((size,) if n == 1 else size))).astype(np.float64)
    values, indices = pool(x, k, s, p, return_indices=True)
    values = values + rng.standard_normal(values.shape)  # (distinct values at duplicate indices)
    out, pullback = vjp(lambda v: unpool(v, indices, k, s, p, output_size=x.shape), values)
    tv = torch.tensor(values, requires_grad=True)
    tunpool = f.max_unpool1d if n == 1 else f.max_unpool2d
    ref = tunpool(tv, torch.tensor(indices), k, s, p, output_size=x.shape)
    ct = rng.standard_normal(out.shape)
    ref.backward(torch.tensor(ct))
    # where an index repeats, torch's choice of value differs between its versions (2.13's CPU
    # kernel keeps the last written, as asyncnn on every backend: checked below)
    once = _written_once(indices, out.shape)
    np.testing.assert_array_equal(out[once], ref.detach().numpy()[once])
    np.testing.assert_array_equal(out, _last_written(values, indices, out.shape))
    np.testing.assert_array_equal(pullback(ct)[0], tv.grad.numpy())
    # the module, called as unpool(params, x, indices, output_size=None)
    module = (nn.MaxUnpool1d if n == 1 else nn.MaxUnpool2d)(k, s, p)
    tmodule = (torch.nn.MaxUnpool1d if n == 1 else torch.nn.MaxUnpool2d)(k, s, p)
    got = module({}, values, indices, output_size=x.shape[2:])
    want = tmodule(torch.tensor(values), torch.tensor(indices), output_size=x.shape[2:])
    np.testing.assert_array_equal(got[once], want.numpy()[once])
    np.testing.assert_array_equal(got, out)
    default = module({}, values, indices)
    assert default.shape == tuple(tmodule(torch.tensor(values), torch.tensor(indices)).shape)
    assert default.shape == module._output_shape(values.shape, indices.shape)


#: disjoint windows (stride at least the kernel): no index repeats, so the rule is the
#: output's derivative (where one repeats, each entry gets the gradient at its index, torch's
#: rule, though the output keeps one of them)
UNPOOL_FD_GEOMETRIES = [
    (1, 2, None, 0, 8),
    (1, 3, 3, 1, 9),
    (2, 2, None, 0, (4, 6)),
    (2, (3, 2), (3, 2), (1, 0), (7, 5)),
]


@pytest.mark.parametrize(("n", "k", "s", "p", "size"), UNPOOL_FD_GEOMETRIES)
def test_max_unpool_gradients_by_finite_differences(
    backend: Backend, n: int, k: Any, s: Any, p: Any, size: Any
) -> None:
    pool, unpool = _unpool_pair(n)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 2, *((size,) if n == 1 else size)))
    values, indices = pool(backend.asarray(x), k, s, p, return_indices=True)
    check_grads(lambda v: unpool(v, indices, k, s, p, output_size=x.shape), values)
    # pool then unpool: the gradient reaches each window's maximum only
    check_grads(
        lambda x: unpool(*pool(x, k, s, p, return_indices=True), k, s, p, output_size=x.shape),
        backend.asarray(x),
    )


def test_max_unpool_by_hand_and_duplicates_as_torchs_cpu(backend: Backend) -> None:
    x = backend.asarray(np.array([[[1.0, 2.0, 3.0]]]))
    idx = backend.asarray(np.array([[[3, 0, 3]]]))
    # the last value written at a repeated index stays, as torch's CPU kernel (on a GPU, which
    # one stays is not specified); the gradient goes to every entry that was written there
    out, pullback = vjp(lambda x: ops.max_unpool1d(x, idx, 2, 1), x)
    assert out.shape == (1, 1, 4)
    if backend.name == "numpy":
        assert to_numpy(out).tolist() == [[[2.0, 0.0, 0.0, 3.0]]]
    g = pullback(backend.asarray(np.array([[[10.0, 20.0, 30.0, 40.0]]])))[0]
    assert to_numpy(g).tolist() == [[[40.0, 10.0, 40.0]]]
    x2 = backend.asarray(np.arange(1.0, 5.0).reshape(1, 1, 2, 2))
    idx2 = backend.asarray(np.array([[[[0, 3], [10, 15]]]]))
    got = to_numpy(ops.max_unpool2d(x2, idx2, 2))
    want = np.zeros((1, 1, 4, 4))
    want.reshape(-1)[[0, 3, 10, 15]] = [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(got, want)


def _written_once(indices: Any, out_shape: tuple[int, ...]) -> Any:
    """Where the output of an unpool of ``indices`` was written at most once (a bool mask)."""
    n, c = out_shape[:2]
    counts = [np.bincount(np.ravel(i), minlength=int(np.prod(out_shape[2:]))) for i in
              np.reshape(to_numpy(indices), (n * c, -1))]  # fmt: skip
    return np.reshape(counts, out_shape) <= 1


def _last_written(x: Any, indices: Any, out_shape: tuple[int, ...]) -> Any:
    """An unpool by a loop: each entry written in order, so a repeated index keeps the last."""
    x, indices = to_numpy(x), to_numpy(indices)
    n, c = out_shape[:2]
    out = np.zeros((n * c, int(np.prod(out_shape[2:]))), dtype=x.dtype)
    for row, (xs, idx) in enumerate(zip(x.reshape(n * c, -1), indices.reshape(n * c, -1),
                                        strict=True)):  # fmt: skip
        for v, i in zip(xs, idx, strict=True):
            out[row, i] = v
    return out.reshape(out_shape)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "int32"])
def test_max_unpool_keeps_the_last_entry_written_on_every_backend(
    backend: Backend, dtype: str
) -> None:
    # neither numpy nor cupy promises which value an assignment to a repeated index keeps (a
    # GPU kept another than the last in some places): the entries are chosen before writing
    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    rng = np.random.default_rng(7)
    host = rng.standard_normal((3, 2, 40)) * 10
    idx = rng.integers(0, 9, (3, 2, 40))  # (every index repeated, many times)
    x = backend.asarray(host).astype(backend.dtype(dtype))
    got = to_numpy(ops.max_unpool1d(x, backend.asarray(idx), 2, 1, output_size=(41,)))
    np.testing.assert_array_equal(got, _last_written(x, idx, (3, 2, 41)))
    torch = pytest.importorskip("torch")
    if dtype == "float64" and backend.name == "numpy":  # (torch 2.13's CPU kernel: the same)
        want = torch.nn.functional.max_unpool1d(torch.tensor(host), torch.tensor(idx), 2, 1,
                                                output_size=(41,))  # fmt: skip
        if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
            np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ops.max_unpool2d(np.ones((1, 1, 2, 2)), np.zeros((1, 1, 2, 3), np.int64), 2),
         ValueError, r"max_unpool2d: indices of shape \(1, 1, 2, 3\) do not match x of shape "
         r"\(1, 1, 2, 2\)"),
        (lambda: ops.max_unpool2d(np.ones((1, 1, 2, 2)), np.full((1, 1, 2, 2), 16), 2),
         IndexError, r"max_unpool2d: index 16 is outside \[0, 16\), the output plane \(4, 4\) "
         r"of x of shape \(1, 1, 2, 2\)"),
        (lambda: ops.max_unpool1d(np.ones((1, 1, 2)), np.array([[[0, -1]]]), 2),
         IndexError, r"max_unpool1d: index -1 is outside \[0, 4\)"),
        (lambda: ops.max_unpool1d(np.ones((1, 1, 2)), np.zeros((1, 1, 2)), 2),
         TypeError, r"max_unpool1d: indices must be an integer array.*float64"),
        (lambda: ops.max_unpool2d(np.ones((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int64), 2,
                                  output_size=(7, 4)),
         ValueError, r"max_unpool2d: output_size \(7, 4\) is not one max_pool2d .*"
         r"\(kernel \(2, 2\), stride \(2, 2\), padding \(0, 0\)\).*between 3 and 5"),
        (lambda: ops.max_unpool2d(np.ones((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int64), 2,
                                  output_size=(4,)),
         ValueError, r"max_unpool2d: output_size must be 2 ints \(height, width\) or 4 "
         r"\(N, C, height, width\), got \(4,\)"),
        (lambda: ops.max_unpool1d(np.ones((1, 2)), np.zeros((1, 2), np.int64), 2),
         ValueError, r"max_unpool1d: input must have shape \(N, C, L\)"),
        (lambda: nn.MaxUnpool2d(0), ValueError, "MaxUnpool2d: kernel_size must be an int or 2 ints >= 1"),
        (lambda: nn.MaxUnpool1d(2)({}, np.ones((1, 1, 2)), np.zeros((1, 1, 2), np.int64), (9,)),
         ValueError, r"max_unpool1d: output_size \(9,\)"),
    ],
)  # fmt: skip
def test_max_unpool_refuses_bad_input_naming_shapes_and_values(
    make: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


def test_max_unpool_in_a_graph_takes_indices_as_a_second_input() -> None:
    # a layer of two inputs: the values and the integer indices, as attention's query and key
    rng = np.random.default_rng(8)
    pooled, indices = ops.max_pool2d(rng.standard_normal((8, 2, 4, 4)), 2, return_indices=True)
    g = ann.Graph()
    v = g.input("v", shape=(None, 2, 2, 2))
    i = g.input("i", shape=(None, 2, 2, 2), dtype="int64")
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("unpool", nn.MaxUnpool2d(2), v, i)
    out = g.layer("head", nn.Sequential(nn.Flatten(), nn.Linear(32, 3)), h)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0)
    data = {"v": pooled.astype(np.float32), "i": indices, "y": rng.integers(0, 3, 8)}
    hist = tr.fit(data, epochs=2, batch_size=4)
    assert np.all(np.isfinite(hist.losses))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_max_unpool_moves_16_bit_floats_exactly(backend: Backend, dtype: str) -> None:
    # (cupy has no bfloat16 kernels to scatter or gather: the rule moves the bits as uint16)
    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    x = np.random.default_rng(9).standard_normal((2, 3, 4, 6)).astype(dt)
    values, indices = ops.max_pool2d(backend.asarray(x), 2, return_indices=True)
    out, pullback = vjp(lambda v: ops.max_unpool2d(v, indices, 2), values)
    assert out.dtype == dt
    kept = to_numpy(out) != 0
    np.testing.assert_array_equal(to_numpy(out)[kept], x[kept])  # (bit for bit, in place)
    g = pullback(backend.asarray(np.arange(out.size).reshape(out.shape).astype(dt)))[0]
    assert g.dtype == dt
    want = np.arange(out.size).reshape(out.shape).astype(dt).reshape(2, 3, -1)
    want = np.take_along_axis(want, to_numpy(indices).reshape(2, 3, -1), axis=2)
    np.testing.assert_array_equal(to_numpy(g), want.reshape(values.shape))
