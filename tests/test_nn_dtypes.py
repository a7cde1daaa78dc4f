"""Tests of the input dtypes asyncnn.nn's modules take: a layer that computes in floating point
refuses integer and bool input (numpy would promote it silently: int64 @ float32 is float64),
naming itself, the input and the fix, and so do the parameterless modules whose output would be a
promoted float (Tanh, Sigmoid, GELU, the softmaxes) or wrong (Dropout), and the losses' prediction;
layers exact on integers keep them; integer ids and labels still go where they belong (an MSELoss
target is cast to the prediction's dtype); float input of another float dtype keeps numpy's
promotion in a direct call, and a run casts it."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._math._autodiff import Trace, primitive_vjp
from asyncnn.backends import Backend, to_numpy

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
    # an integer regression target is a label too: MSELoss takes it, in the prediction's dtype
    target = backend.asarray(np.ones((3, 4), dtype=dtype))
    loss = nn.MSELoss()({}, logits, target)
    assert loss.dtype == np.float32 and np.isfinite(float(loss))
    g = ann.grad(lambda p: nn.MSELoss()({}, model(p, ids), target))(params)
    assert g[2]["weight"].dtype == np.float32


def test_parameterless_layers_keep_their_integer_behaviour() -> None:
    # layers without parameters that compute no floats of their own pass integers on as before
    x = np.arange(-4, 4).reshape(2, 4)
    assert nn.ReLU()({}, x).dtype == x.dtype
    assert nn.Identity()({}, x) is x
    assert nn.Flatten()({}, x.reshape(2, 2, 2)).dtype == x.dtype
    assert nn.MaxPool1d(2)({}, x.reshape(2, 1, 4)).dtype == x.dtype


# -- parameterless modules ------------------------------------------------------------------------
# (module, input shape, its repr): the parameterless modules whose output for integer or bool input
# would be a float numpy promoted it to (Tanh gave float64, float16 for uint8; torch gives float32
# or refuses) or wrong (Dropout's 1/(1-p) truncated to 1), alone and inside containers
FLOAT_ONLY = [
    (nn.Tanh(), (2, 4), "Tanh()"),
    (nn.Sigmoid(), (2, 4), "Sigmoid()"),
    (nn.GELU(), (2, 4), "GELU(approximate='none')"),
    (nn.GELU("tanh"), (2, 3, 4), "GELU(approximate='tanh')"),
    (nn.Softmax(), (2, 4), "Softmax(dim=-1)"),
    (nn.LogSoftmax(1), (2, 3, 4), "LogSoftmax(dim=1)"),
    (nn.Dropout(0.25), (2, 4), "Dropout(p=0.25)"),
    (nn.Dropout(0.0), (2, 3, 4), "Dropout(p=0.0)"),
    (nn.Sequential(nn.Identity(), nn.Tanh()), (2, 4), "Tanh()"),
    (nn.Residual(nn.Sigmoid()), (2, 4), "Sigmoid()"),
]
ALL_INTEGRAL = ["int64", "int32", "int8", "uint8", "bool"]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", ALL_INTEGRAL)
@pytest.mark.parametrize(("module", "shape", "named"), FLOAT_ONLY, ids=_case_id)
def test_parameterless_float_modules_refuse_integer_and_bool_input(
    backend: Backend,
    module: nn.Module,
    shape: tuple[int, ...],
    named: str,
    dtype: str,
    training: bool,
) -> None:
    params = module.init(0, backend=backend)
    rng = backend.rng(0) if training else None  # Dropout refuses in evaluation too
    with pytest.raises(TypeError) as info:
        module(params, backend.asarray(np.ones(shape, dtype=dtype)), rng=rng)
    msg = str(info.value)
    assert msg.startswith(
        f"{named} got input of dtype {dtype} and shape {shape}, but it takes floating-point "
        "input only: cast the input, e.g. x.astype('float32'), or, if they are integer ids"
    ), msg
    assert "nn.Embedding" in msg, msg
    # float input goes through in its own dtype
    out = module(params, backend.asarray(np.ones(shape, dtype=np.float32)), rng=rng)
    assert out.dtype == np.float32 and tuple(out.shape) == shape


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_dropout_scales_float_input_in_its_own_dtype(backend: Backend, dtype: str) -> None:
    x = backend.asarray(np.full((50, 40), 3.0, dtype=dtype))
    y = nn.Dropout(0.25)({}, x, rng=backend.rng(0))
    assert y.dtype == np.dtype(dtype)
    kept = np.asarray(3 / np.float64(0.75)).astype(dtype)  # 4.0, exact in every float
    assert set(np.unique(to_numpy(y)).tolist()) == {0.0, float(kept)}


@pytest.mark.parametrize("op", ["avg_pool1d", "avg_pool2d"])
@pytest.mark.parametrize("dtype", ALL_INTEGRAL)
def test_average_pools_refuse_integer_and_bool_input(backend: Backend, op: str, dtype: str) -> None:
    # (refused by their op already, which the message names: a mean of integers is a float)
    module = nn.AvgPool1d(2) if op == "avg_pool1d" else nn.AvgPool2d(2)
    shape = (1, 2, 4) if op == "avg_pool1d" else (1, 2, 4, 4)
    with pytest.raises(TypeError, match=rf"^{op}: x must be floating point, got dtype {dtype} "):
        module({}, backend.asarray(np.ones(shape, dtype=dtype)))


def _ints(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    n = int(np.prod(shape))
    values = np.arange(n) % 3 == 0 if dtype == "bool" else np.arange(n) - n // 2  # uint8 wraps
    return values.astype(dtype).reshape(shape)


# (module, input shape, what it returns, computed with numpy in the input's dtype): the layers
# exact on integers keep them (ReLU gives int64 for bool, as numpy's maximum; torch refuses bool)
EXACT = [
    (nn.Identity(), (2, 6), lambda x: x),
    (nn.ReLU(), (2, 6), lambda x: np.maximum(x, x.dtype.type(0))),
    (nn.Flatten(), (2, 2, 3), lambda x: x.reshape(2, 6)),
    (nn.Flatten(0, 1), (2, 2, 3), lambda x: x.reshape(4, 3)),
    (nn.MaxPool1d(2), (2, 1, 6), lambda x: x.reshape(2, 1, 3, 2).max(-1)),
    (nn.MaxPool1d(3, stride=1), (1, 2, 5), lambda x: np.stack([x[..., i : i + 3].max(-1)
                                                               for i in range(3)], -1)),
    (nn.MaxPool2d(2), (1, 2, 4, 4), lambda x: x.reshape(1, 2, 2, 2, 2, 2).max((3, 5))),
    (nn.Sequential(nn.Flatten(), nn.ReLU()), (2, 2, 3), lambda x: np.maximum(x, 0).reshape(2, 6)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("module", "shape", "expected", "dtype"),
    [
        pytest.param(m, s, f, dt, id=f"{_case_id(m)}-{dt}")
        for m, s, f in EXACT
        for dt in ALL_INTEGRAL
        if not (dt == "bool" and "ReLU" in repr(m))
    ],
)
def test_layers_exact_on_integers_keep_their_dtype_and_values(
    backend: Backend, module: nn.Module, shape: tuple[int, ...], expected: Any, dtype: str
) -> None:
    x = _ints(shape, dtype)
    out = module(module.init(0, backend=backend), backend.asarray(x))
    assert out.dtype == x.dtype
    want = expected(x)
    assert want.dtype == x.dtype  # (the reference stays in the dtype too)
    np.testing.assert_array_equal(to_numpy(out), want)


@pytest.mark.parametrize(("module", "shape", "named"), FLOAT_ONLY, ids=_case_id)
def test_parameterless_modules_read_only_the_dtype_of_a_raw_or_traced_array(
    module: nn.Module, shape: tuple[int, ...], named: str
) -> None:
    params = module.init(0)
    rng = np.random.default_rng(0)
    # an array of another library (as a cupy array is): refused before any compute
    with pytest.raises(TypeError, match=rf"^{re.escape(named)} got input of dtype uint8"):
        module(params, _DeviceArray(shape, "uint8"), rng=rng)
    traced = Trace().leaf(np.ones(shape, dtype=np.int32))
    with pytest.raises(TypeError, match=rf"^{re.escape(named)} got input of dtype int32"):
        module(params, traced, rng=rng)
    with pytest.raises(TypeError, match=rf"^{re.escape(named)} got input of dtype int64"):
        ann.vjp(lambda p, x: module(p, x, rng=rng), params, np.ones(shape, dtype=np.int64))
    out, pullback = ann.vjp(lambda p, x: module(p, x, rng=rng), params, np.ones(shape, np.float32))
    _, gx = pullback(np.ones_like(out))
    assert out.dtype == gx.dtype == np.float32


# -- losses ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pred_dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("dtype", ALL_INTEGRAL)
def test_an_integer_mse_target_is_taken_in_the_predictions_dtype(
    backend: Backend, dtype: str, pred_dtype: str, reduction: str
) -> None:
    # torch casts it the same way (float32 - int64 is float32 there); numpy gave float64
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((3, 4)).astype(pred_dtype)
    target = (np.arange(12).reshape(3, 4) % 5).astype(dtype)  # (small: float16 holds sums)
    loss = nn.MSELoss(reduction)
    want = to_numpy(loss({}, backend.asarray(pred), backend.asarray(target.astype(pred_dtype))))
    value = loss({}, backend.asarray(pred), backend.asarray(target))
    assert value.dtype == np.dtype(pred_dtype)
    np.testing.assert_array_equal(to_numpy(value), want)  # the same as a float target's
    # the same as one primitive (the loss actor's path) and under vjp
    call = loss.primitive_call(backend.asarray(pred), backend.asarray(target))
    assert call is not None  # MSELoss itself is one primitive
    prim, args, kwargs = call
    out, direct = primitive_vjp(prim, args, kwargs, [0])
    assert out.dtype == np.dtype(pred_dtype)
    np.testing.assert_array_equal(to_numpy(out), want)
    (g,) = direct(backend.xp.ones(out.shape, dtype=out.dtype))
    assert g.dtype == np.dtype(pred_dtype)
    out, pullback = ann.vjp(lambda p: loss({}, p, backend.asarray(target)), backend.asarray(pred))
    assert out.dtype == np.dtype(pred_dtype)
    (g,) = pullback(backend.xp.ones(out.shape, dtype=out.dtype))
    assert g.dtype == np.dtype(pred_dtype)


REFUSED_PREDICTIONS = [
    pytest.param(nn.MSELoss(), "MSELoss(reduction='mean')", "pred", np.ones((3, 4), np.float32),
                 id="MSELoss-float-target"),
    pytest.param(nn.MSELoss("none"), "MSELoss(reduction='none')", "pred",
                 np.ones((3, 4), np.int64), id="MSELoss-int-target"),
    pytest.param(nn.CrossEntropyLoss(), "CrossEntropyLoss(reduction='mean')", "logits",
                 np.array([0, 1, 3]), id="CrossEntropyLoss"),
    pytest.param(nn.CrossEntropyLoss("sum"), "CrossEntropyLoss(reduction='sum')", "logits",
                 np.array([2, 2, 0]), id="CrossEntropyLoss-sum"),
]  # fmt: skip


@pytest.mark.parametrize("dtype", ALL_INTEGRAL)
@pytest.mark.parametrize(("loss", "named", "what", "second"), REFUSED_PREDICTIONS)
def test_losses_refuse_an_integer_prediction(
    backend: Backend,
    loss: nn.MSELoss | nn.CrossEntropyLoss,
    named: str,
    what: str,
    second: Any,
    dtype: str,
) -> None:
    # an integer prediction comes from no parameter (they are floats, and integers are not
    # traced), so no gradient would reach the model; torch refuses it too (or promotes it)
    pred = backend.asarray(np.ones((3, 4), dtype=dtype))
    for call in (lambda: loss({}, pred, backend.asarray(second)),
                 lambda: loss.primitive_call(pred, backend.asarray(second))):  # fmt: skip
        with pytest.raises(TypeError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(
            f"{named} got {what} of dtype {dtype} and shape (3, 4), but it takes floating-point "
            f"input only: cast the {what}, e.g. {what}.astype('float32')"
        ), msg


def test_a_float_mse_target_of_another_dtype_keeps_numpys_promotion() -> None:
    # as for the layers (and as torch): float32 with float64 is float64, with float16 float32
    pred = np.ones((2, 3), np.float32)
    assert nn.MSELoss()({}, pred, np.zeros((2, 3), np.float64)).dtype == np.float64
    assert nn.MSELoss()({}, pred, np.zeros((2, 3), np.float16)).dtype == np.float32


def test_a_graph_that_feeds_integers_to_a_float_activation_fails_when_checked() -> None:
    for module in (nn.Tanh(), nn.Dropout(0.5)):  # Dropout: the check runs it in evaluation
        g = ann.Graph.sequential([nn.Flatten(), module, nn.Linear(4, 2)],
                                 loss=nn.CrossEntropyLoss(), input_shape=(None, 4),
                                 input_dtype="int64")  # fmt: skip
        with pytest.raises(ann.GraphError, match=rf"{type(module).__name__}\(.*dtype int64"):
            ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    # an integer regression target trains
    g = ann.Graph.sequential([nn.Linear(4, 2)], loss=nn.MSELoss(), input_shape=(None, 4),
                             label_shape=(None, 2), label_dtype="int64")  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.01), policy=policies.Sync())
    rng = np.random.default_rng(0)
    hist = tr.fit({"x": rng.standard_normal((16, 4)), "y": rng.integers(0, 3, (16, 2))},
                  epochs=2, batch_size=8)  # fmt: skip
    assert np.isfinite(hist.losses).all()


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


@pytest.mark.parametrize(
    ("module", "shape"),
    [(nn.Conv1d(2, 3, 3), (2, 2, 6)), (nn.Conv2d(2, 3, 3), (2, 2, 5, 4))],
    ids=_case_id,
)
def test_conv_gradients_come_back_in_each_parameters_dtype(
    module: nn.Module, shape: tuple[int, ...]
) -> None:
    # float64 input to float32 parameters: the bias gradient came back float64 (the weight's
    # float32, as Linear's both), and the optimizer's update refused it
    params = module.init(0)  # float32
    x64 = np.random.default_rng(0).standard_normal(shape)
    out, pullback = ann.vjp(lambda p: module(p, x64), params)
    assert out.dtype == np.float64
    (grads,) = pullback(np.ones_like(out))
    assert grads["weight"].dtype == grads["bias"].dtype == np.float32
    # the values: the float64 parameters' gradients, rounded
    wide = {k: v.astype(np.float64) for k, v in params.items()}
    out64, pullback64 = ann.vjp(lambda p: module(p, x64), wide)
    (want,) = pullback64(np.ones_like(out64))
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(grads[k], want[k].astype(np.float32), err_msg=k)
    opt = optim.SGD(lr=0.1)
    new, _ = opt.update(params, grads, opt.init(params))
    assert {str(v.dtype) for v in new.values()} == {"float32"}


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


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_input_to_float32_parameters_follows_numpys_promotion(half: str) -> None:
    if half == "bfloat16":
        pytest.importorskip("ml_dtypes")
    model = nn.Sequential(
        nn.Residual(nn.Linear(4, 4)), nn.Dropout(0.2), nn.Flatten(), nn.Identity()
    )
    params = model.init(0)  # float32, and stays so
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(half)
    out, pullback = ann.vjp(lambda p, x: model(p, x, rng=np.random.default_rng(1)), params, x)
    assert out.dtype == np.float32  # x + Linear(x): the half input joins float32 values
    grads, gx = pullback(np.ones_like(out))
    assert grads[0]["weight"].dtype == grads[0]["bias"].dtype == np.float32
    assert gx.dtype == np.dtype(half)  # a gradient comes back in its argument's dtype
    # parameterless modules keep the half dtype
    for module in (nn.Dropout(0.2), nn.Flatten(), nn.Identity()):
        assert module({}, x, rng=np.random.default_rng(1)).dtype == np.dtype(half)
    # an Embedding's rows come out in its table's dtype, whatever the ids' width
    emb = nn.Embedding(5, 2)
    table = emb.init(0, dtype="float16")
    assert emb(table, np.array([[4, 0]], dtype=np.uint8)).dtype == np.float16


@pytest.mark.parametrize(
    "loss",
    [nn.CrossEntropyLoss(), nn.CrossEntropyLoss("none", weight=(1, 2, 3), label_smoothing=0.1)],
    ids=["defaults", "options"],
)
def test_cross_entropy_of_half_logits_is_float32_with_its_options_too(
    loss: nn.CrossEntropyLoss,
) -> None:
    # the fused primitive computes 16-bit logits in float32; the options' path did it in
    # float16 (a float16 loss where the defaults gave float32)
    logits = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float16)
    labels = np.array([0, 2, 1, 1])
    out, pullback = ann.vjp(lambda x: loss({}, x, labels), logits)
    assert out.dtype == np.float32
    (g,) = pullback(np.ones_like(out))
    assert g.dtype == np.float16
    want = nn.CrossEntropyLoss(loss.reduction, **_options(loss))(
        {}, logits.astype(np.float32), labels
    )
    np.testing.assert_allclose(out, want, rtol=1e-6)


def _options(loss: nn.CrossEntropyLoss) -> dict[str, Any]:
    return {"weight": loss.weight, "label_smoothing": loss.label_smoothing}
