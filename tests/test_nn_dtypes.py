"""Tests of the input dtypes asyncnn.nn's modules take: a layer that computes in floating point
refuses integer and bool input (numpy would promote it silently: int64 @ float32 is float64),
naming itself, the input and the fix; integer ids and labels still go where they belong; float
input of another float dtype keeps numpy's promotion in a direct call, and a run casts it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._math._autodiff import Trace
from asyncnn.backends import Backend, to_numpy


def _put(backend: Backend, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _put(backend, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_put(backend, v) for v in tree]
    return backend.asarray(tree)


# (module, input shape, the class the message names): every built-in layer that computes in
# floating point, alone and inside the containers that pass their input on
FLOAT_LAYERS = [
    (nn.Linear(4, 3), (2, 4), "Linear"),
    (nn.Linear(4, 3, bias=False), (2, 5, 4), "Linear"),
    (nn.Conv1d(2, 3, 3), (2, 2, 5), "Conv1d"),
    (nn.Conv2d(2, 3, 3, padding=1), (1, 2, 4, 4), "Conv2d"),
    (nn.MultiHeadAttention(4, 2), (2, 3, 4), "MultiHeadAttention"),
    (nn.LayerNorm(4), (2, 4), "LayerNorm"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (2, 4), "Linear"),
    (nn.Residual(nn.Linear(4, 4)), (2, 4), "Linear"),
]
INTEGRAL = ["int64", "int32", "uint8", "bool"]


def _case_id(value: Any) -> str:
    return type(value).__name__ if isinstance(value, nn.Module) else str(value)


@pytest.mark.parametrize("dtype", INTEGRAL)
@pytest.mark.parametrize(("module", "shape", "named"), FLOAT_LAYERS, ids=_case_id)
def test_float_layers_refuse_integer_and_bool_input(
    backend: Backend, module: nn.Module, shape: tuple[int, ...], named: str, dtype: str
) -> None:
    params = module.init(0, backend=backend)
    x = backend.asarray(np.ones(shape, dtype=dtype))
    with pytest.raises(TypeError) as info:
        module(params, x)
    msg = str(info.value)
    assert msg.startswith(f"{named}("), msg  # the module, by its repr
    what = "query" if named == "MultiHeadAttention" else "input"
    assert f"got {what} of dtype {dtype} and shape {shape}" in msg, msg
    assert "its parameters are float32" in msg, msg
    assert ".astype('float32')" in msg and "nn.Embedding" in msg, msg


@pytest.mark.parametrize("dtype", INTEGRAL)
def test_an_rnn_cell_refuses_integer_steps(backend: Backend, dtype: str) -> None:
    from asyncnn.dynamic import RNNCell

    cell = RNNCell(3, 4)
    params = cell.init(0, backend=backend)
    h = backend.asarray(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match=rf"^RNNCell\(.* got input of dtype {dtype} and shape"):
        cell(params, h, backend.asarray(np.ones((2, 3), dtype=dtype)))
    out = cell(params, h, backend.asarray(np.ones((2, 3), np.float32)))
    assert out.dtype == np.float32 and out.shape == (2, 4)


def test_the_message_in_full_names_the_parameter_dtype() -> None:
    m = nn.Linear(4, 3)
    with pytest.raises(TypeError) as info:
        m(m.init(0, dtype="float64"), np.arange(8).reshape(2, 4))
    assert str(info.value) == (
        "Linear(in_features=4, out_features=3, bias=True) got input of dtype int64 and shape "
        "(2, 4), but its parameters are float64 and it takes floating-point input only: cast "
        "the input, e.g. x.astype('float64'), or, if they are integer ids (tokens, categories), "
        "look them up with nn.Embedding first"
    )
    # LayerNorm without its affine parameters computes in floating point all the same
    with pytest.raises(TypeError, match=r"^LayerNorm\(.*got input of dtype int64.*but it takes "):
        nn.LayerNorm(4, elementwise_affine=False)({}, np.ones((2, 4), dtype=np.int64))


@pytest.mark.parametrize("which", ["key", "value"])
def test_attention_names_the_integer_key_or_value(backend: Backend, which: str) -> None:
    m = nn.MultiHeadAttention(4, 2)
    params = m.init(0, backend=backend)
    q = backend.asarray(np.ones((2, 3, 4), dtype=np.float32))
    kv = {"key": q, "value": q, which: backend.asarray(np.ones((2, 5, 4), dtype=np.int64))}
    kv["value" if which == "key" else "key"] = backend.asarray(np.ones((2, 5, 4), np.float32))
    with pytest.raises(TypeError, match=rf"got {which} of dtype int64 and shape \(2, 5, 4\).*"
                                        rf"{which}\.astype\('float32'\)"):  # fmt: skip
        m(params, q, kv["key"], kv["value"])


class _DeviceArray:
    """What the check reads of a device array (cupy's): a shape and a numpy dtype, no numpy."""

    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape = shape
        self.dtype = np.dtype(dtype)


@pytest.mark.parametrize(("module", "shape", "named"), FLOAT_LAYERS, ids=_case_id)
def test_the_check_reads_only_the_dtype_of_a_raw_or_traced_array(
    module: nn.Module, shape: tuple[int, ...], named: str
) -> None:
    params = module.init(0)
    # an array of another library (as a cupy array is): refused before any compute
    with pytest.raises(TypeError, match=rf"^{named}\(.*dtype int32"):
        module(params, _DeviceArray(shape, "int32"))
    # a traced array answers with its value's dtype
    traced = Trace().leaf(np.ones(shape, dtype=np.int64))
    with pytest.raises(TypeError, match=rf"^{named}\(.*dtype int64"):
        module(params, traced)
    # under vjp, integer arguments are not traced: the raw array reaches the layer and is refused
    with pytest.raises(TypeError, match=rf"^{named}\(.*dtype int64"):
        ann.vjp(lambda p, x: module(p, x), params, np.ones(shape, dtype=np.int64))
    # float input is traced and differentiated as before
    out, pullback = ann.vjp(lambda p, x: module(p, x), params, np.ones(shape, dtype=np.float32))
    grads, gx = pullback(np.ones_like(out))
    assert out.dtype == gx.dtype == np.float32


# -- integers where they belong -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8"])
def test_integer_ids_and_labels_still_work(backend: Backend, dtype: str) -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 4))
    params = model.init(1, backend=backend)
    ids = backend.asarray(np.array([[0, 4], [4, 4], [2, 1]], dtype=dtype))
    logits = model(params, ids)
    assert logits.dtype == np.float32 and tuple(logits.shape) == (3, 4)
    rows = to_numpy(params[0]["weight"])[to_numpy(ids).astype(np.int64)]
    np.testing.assert_array_equal(to_numpy(model[0](params[0], ids)), rows)
    labels = backend.asarray(np.array([3, 0, 1], dtype=dtype))
    loss = nn.CrossEntropyLoss()({}, logits, labels)
    assert loss.dtype == np.float32 and np.isfinite(float(loss))
    g = ann.grad(lambda p: nn.CrossEntropyLoss()({}, model(p, ids), labels))(params)
    assert g[2]["weight"].dtype == np.float32
    # an integer regression target is a label too: MSELoss takes it (numpy's promotion decides
    # the loss's dtype; the gradient comes back in the prediction's)
    target = backend.asarray(np.ones((3, 4), dtype=dtype))
    assert np.isfinite(float(nn.MSELoss()({}, logits, target)))
    g = ann.grad(lambda p: nn.MSELoss()({}, model(p, ids), target))(params)
    assert g[2]["weight"].dtype == np.float32


def test_parameterless_layers_keep_their_integer_behaviour() -> None:
    # layers without parameters that compute no floats of their own pass integers on as before
    x = np.arange(-4, 4).reshape(2, 4)
    assert nn.ReLU()({}, x).dtype == x.dtype
    assert nn.Identity()({}, x) is x
    assert nn.Flatten()({}, x.reshape(2, 2, 2)).dtype == x.dtype
    assert nn.MaxPool1d(2)({}, x.reshape(2, 1, 4)).dtype == x.dtype


# -- float input of another float dtype -----------------------------------------------------------
def test_other_float_dtypes_follow_numpy_in_a_call_and_are_cast_in_a_run() -> None:
    m = nn.Linear(4, 3)
    params = m.init(0)  # float32
    x64 = np.random.default_rng(0).standard_normal((2, 4))
    # a direct call keeps numpy's promotion (not refused: no precision is lost) ...
    out, pullback = ann.vjp(lambda p, x: m(p, x), params, x64)
    assert out.dtype == np.float64
    grads, gx = pullback(np.ones_like(out))
    # ... and each gradient comes back in its argument's dtype
    assert grads["weight"].dtype == grads["bias"].dtype == np.float32 and gx.dtype == np.float64
    assert m(params, x64.astype(np.float16)).dtype == np.float32
    # a run casts float data to its dtype before any layer sees it
    g = ann.Graph.sequential([m], loss=nn.MSELoss(), input_shape=(None, 4), label_shape=(None, 3),
                             label_dtype="float32")  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    (pred,) = tr.predict({"x": x64}).values()
    assert pred.dtype == np.float32


def test_a_graph_that_feeds_integers_to_a_float_layer_fails_when_checked() -> None:
    # an input declared int64 (ids) wired to a Linear instead of an Embedding: the graph's check
    # on a batch of zeros names the layer, its module and the fix
    g = ann.Graph.sequential([nn.Linear(4, 2)], loss=nn.CrossEntropyLoss(), input_shape=(None, 4),
                             input_dtype="int64")  # fmt: skip
    with pytest.raises(ann.GraphError, match=r"Linear\(in_features=4.*dtype int64.*nn.Embedding"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    # with an Embedding first the same ids train
    g = ann.Graph.sequential([nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2)],
                             loss=nn.CrossEntropyLoss(), input_shape=(None, 4),
                             input_dtype="int64")  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    rng = np.random.default_rng(0)
    hist = tr.fit({"x": rng.integers(0, 10, (16, 4)), "y": rng.integers(0, 2, 16)}, epochs=1,
                  batch_size=8)  # fmt: skip
    assert np.isfinite(hist.losses[-1])
