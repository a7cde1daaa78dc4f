"""Errors of asyncnn.nn that name what is wrong: shapes, sizes, dims, rngs, dtypes and embedding
ids, in a module and in a run."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest

from asyncnn import dynamic, nn
from asyncnn._math._nn._module import shape_of

from _nn_cases import Scale, _np


# -- errors ---------------------------------------------------------------------------------------
def test_error_messages() -> None:
    lin = nn.Linear(40, 64)
    p = lin.init(0)
    with pytest.raises(ValueError) as info:
        lin(p, np.zeros((32, 30), np.float32))
    assert str(info.value) == (
        "Linear(40 -> 64) got input of shape (32, 30): the last dimension must be 40"
    )
    with pytest.raises(ValueError, match=r"Linear\(in_features=40.*expects params.*'bias'"):
        lin({"weight": p["weight"]}, np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match=r"params\['weight'\] has shape \(64, 40\)"):
        lin({"weight": p["weight"].T, "bias": p["bias"]}, np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="list of 2 entries"):
        nn.Sequential(nn.Linear(2, 2), nn.ReLU())([{}], np.zeros((1, 2)))
    with pytest.raises(TypeError, match="integer"):
        nn.CrossEntropyLoss()({}, np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="channels"):
        nn.Conv2d(3, 4, 3)(nn.Conv2d(3, 4, 3).init(0), np.zeros((1, 2, 5, 5)))
    bad = [
        lambda: nn.Linear(-1, 3), lambda: nn.Dropout(1.5), lambda: nn.MultiHeadAttention(10, 3),
        lambda: nn.Conv2d(1, 2, 0), lambda: nn.Embedding(0, 2), lambda: nn.GELU("fast"),
        lambda: nn.MSELoss("avg"), lambda: nn.LayerNorm(0),
    ]  # fmt: skip
    for make in bad:
        with pytest.raises(ValueError):
            make()
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        nn.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="seed"):
        nn.Linear(2, 2).init(-1)
    with pytest.raises(ValueError, match="floating point"):
        nn.Linear(2, 2).init(0, dtype="int32")
    with pytest.raises(TypeError, match="not an nn.Module"):
        nn.Sequential(nn.ReLU(), lambda x: x)  # type: ignore[arg-type]

    class NotDataclass(nn.Module):
        pass

    with pytest.raises(TypeError, match="dataclass"):
        NotDataclass().init(0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.LayerNorm(4, eps="1e-5"), "LayerNorm: eps must be a real number, got '1e-5'"),
        (lambda: nn.LayerNorm(4, eps=True), "LayerNorm: eps must be a real number, got True"),
        (lambda: nn.LayerNorm(4, eps=None), "LayerNorm: eps must be a real number, got None"),
        (lambda: nn.GroupNorm(2, 4, eps="0"), "GroupNorm: eps must be a real number, got '0'"),
        (lambda: nn.MultiHeadAttention(4, 2, dropout="0.1"),
         "MultiHeadAttention: dropout must be a real number, got '0.1'"),
        (lambda: nn.MultiHeadAttention(4, 2, dropout=True),
         "MultiHeadAttention: dropout must be a real number, got True"),
    ],
    ids=["eps-str", "eps-bool", "eps-None", "gn-eps-str", "dropout-str", "dropout-bool"],
)  # fmt: skip
def test_hyperparameters_are_real_numbers_checked_before_compared(make: Any, match: str) -> None:
    # a string failed comparing with "'>' not supported between instances of 'str' and 'int'",
    # naming neither the module nor the argument; eps=True was taken
    with pytest.raises(TypeError, match=re.escape(match)):
        make()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.Linear(4, 3, bias="no"), r"Linear: bias must be True or False, got str 'no'"),
        (lambda: nn.Conv1d(2, 3, 3, bias=0), r"Conv1d: bias must be True or False, got int 0"),
        (lambda: nn.Conv2d(2, 3, 3, bias=None), r"Conv2d: bias must be True or False"),
        (lambda: nn.LayerNorm(4, elementwise_affine="yes"), r"LayerNorm: elementwise_affine"),
        (lambda: nn.LayerNorm(4, bias=1.0), r"LayerNorm: bias must be True or False"),
        (lambda: nn.GroupNorm(2, 4, affine="yes"), r"GroupNorm: affine must be True or False"),
        (lambda: nn.GroupNorm(2, 4, bias=0), r"GroupNorm: bias must be True or False"),
        (lambda: nn.MultiHeadAttention(4, 2, causal="no"), r"MultiHeadAttention: causal must"),
        (lambda: nn.MultiHeadAttention(4, 2, bias="False"), r"MultiHeadAttention: bias must"),
    ],
    ids=[
        "linear",
        "conv1d",
        "conv2d",
        "ln-affine",
        "ln-bias",
        "gn-affine",
        "gn-bias",
        "mha-causal",
        "mha-bias",
    ],
)
def test_flags_must_be_bools(make: Any, match: str) -> None:
    # a string or a number was taken for its truth: bias="no" made a bias, causal="no" a mask
    with pytest.raises(TypeError, match=match):
        make()


def test_numpy_bool_flags_are_kept_as_bools() -> None:
    m = nn.Linear(4, 3, bias=np.bool_(False))
    assert m.bias is False and "bias" not in m.init(0)
    assert nn.MultiHeadAttention(4, 2, causal=np.True_).causal is True


def test_real_hyperparameters_are_kept_as_floats() -> None:
    # (numpy numbers too, which a spec could not carry)
    assert nn.LayerNorm(4, eps=np.float32(0.5)).eps == 0.5
    assert type(nn.LayerNorm(4, eps=np.float64(1e-3)).eps) is float
    assert type(nn.MultiHeadAttention(4, 2, dropout=np.float64(0.25)).dropout) is float
    assert nn.MultiHeadAttention(4, 2, dropout=0).dropout == 0.0
    with pytest.raises(ValueError, match="LayerNorm: eps must be > 0"):
        nn.LayerNorm(4, eps=float("nan"))
    with pytest.raises(ValueError, match=r"MultiHeadAttention: dropout must be in \[0, 1\]"):
        nn.MultiHeadAttention(4, 2, dropout=float("nan"))
    with pytest.raises(ValueError, match=r"MultiHeadAttention: dropout must be in \[0, 1\]"):
        nn.MultiHeadAttention(4, 2, dropout=1.5)


@pytest.mark.parametrize(
    ("h", "x"),
    [((4,), (2, 3)), ((1, 4), (2, 3)), ((2, 4), (1, 3)), ((2, 5), (2, 3)), ((2, 4), (2, 2))],
)
def test_rnn_cell_refuses_shapes_numpy_would_broadcast(
    h: tuple[int, ...], x: tuple[int, ...]
) -> None:
    cell = dynamic.RNNCell(3, 4)
    with pytest.raises(ValueError, match=rf"RNNCell\(.* got state h of shape {re.escape(str(h))}"):
        cell(cell.init(0), np.zeros(h, np.float32), np.zeros(x, np.float32))


def test_rnn_cell_checks_its_sizes_and_params() -> None:
    with pytest.raises(ValueError, match="RNNCell: input_size must be an int >= 1, got 0"):
        dynamic.RNNCell(0, 4)
    with pytest.raises(ValueError, match=r"RNNCell\(.*expects params .*'w_h'"):
        dynamic.RNNCell(3, 4)({"w_x": np.zeros((3, 4))}, np.zeros((2, 4)), np.zeros((2, 3)))


def test_modules_say_whether_they_draw_random_numbers() -> None:
    assert nn.Dropout(0.1).stochastic and nn.Dropout(0.0).stochastic
    assert not nn.Linear(2, 3).stochastic and not nn.ReLU().stochastic
    assert nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5)).stochastic
    assert nn.Residual(nn.Sequential(nn.Dropout(0.5))).stochastic
    assert not nn.Sequential(nn.Linear(2, 3), nn.Tanh()).stochastic
    assert nn.MultiHeadAttention(8, 2, dropout=0.1).stochastic
    assert not nn.MultiHeadAttention(8, 2).stochastic
    assert not Scale(2, inner=nn.Tanh()).stochastic and Scale(2, inner=nn.Dropout(0.2)).stochastic


@pytest.mark.parametrize(
    ("module", "shape"),
    [(nn.Conv1d(1, 4, 3), (1,)), (nn.Conv2d(1, 4, 3), (2, 1, 5)), (nn.MaxPool1d(2), (2, 3))],
)
def test_conv_and_pool_shapes_of_another_rank_are_named(module: Any, shape: Any) -> None:
    # (the shape walk of Graph.sequential's balance and flops: an IndexError before)
    with pytest.raises(ValueError, match=r"takes \(N, C, .*\) input, \d dimensions; got the shape"):
        shape_of(module, shape)


# -- Flatten, Residual, init: checks that name what is wrong -------------------------------------
@pytest.mark.parametrize("dims", [(None, -1), (1, 2.0), ("1", -1), (True, -1)])
def test_flatten_refuses_dims_that_are_not_ints(dims: Any) -> None:
    with pytest.raises(ValueError, match=r"Flatten: (start|end)_dim must be an int"):
        nn.Flatten(*dims)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.Linear(True, 3), "Linear: in_features must be an int >= 1, got True"),
        (lambda: nn.Linear(np.True_, 3), "Linear: in_features must be an int >= 1, got np.True_"),
        (lambda: nn.Linear(16.0, 3), "Linear: in_features must be an int >= 1, got 16.0"),
        (lambda: nn.Linear(np.float64(16), 3), "Linear: in_features must be an int >= 1, got np.float64(16.0)"),
        (lambda: nn.Linear(np.int64(0), 3), "Linear: in_features must be an int >= 1, got np.int64(0)"),
        (lambda: nn.Linear(np.array([16]), 3), "Linear: in_features must be an int >= 1, got array([16])"),
        (lambda: nn.Embedding(10, np.bool_(True)), "Embedding: embedding_dim must be an int >= 1, got np.True_"),
        (lambda: nn.Conv2d(3, 8, (np.True_, 3)), "Conv2d: kernel_size must be an int or 2 ints >= 1, got (np.True_, 3)"),
        (lambda: nn.Conv1d(np.int64(3), 8, 3.0), "Conv1d: kernel_size must be an int >= 1, got 3.0"),
        (lambda: nn.Conv1d(2, 4, 3, groups=True), "Conv1d: groups must be an int >= 1, got True"),
        (lambda: nn.MaxPool2d(np.int64(2), padding=np.int64(-1)), "MaxPool2d: padding must be an int or 2 ints >= 0, got np.int64(-1)"),
        (lambda: nn.LayerNorm(np.True_), "LayerNorm: normalized_shape must be an int or a tuple of ints >= 1, got np.True_"),
        (lambda: nn.LayerNorm((4, 5.0)), "LayerNorm: normalized_shape must be an int or a tuple of ints >= 1, got (4, 5.0)"),
        (lambda: nn.GroupNorm(2.0, 4), "GroupNorm: num_groups must be an int >= 1, got 2.0"),
        (lambda: nn.GroupNorm(2, np.True_), "GroupNorm: num_channels must be an int >= 1, got np.True_"),
        (lambda: nn.MultiHeadAttention(8, True), "MultiHeadAttention: num_heads must be an int >= 1, got True"),
        (lambda: nn.LSTM(3, 4, num_layers=np.True_), "LSTM: num_layers must be an int >= 1, got np.True_"),
        (lambda: nn.GRUCell(3.0, 4), "GRUCell: input_size must be an int >= 1, got 3.0"),
        (lambda: dynamic.RNNCell(np.True_, 4), "RNNCell: input_size must be an int >= 1, got np.True_"),
        (lambda: nn.Flatten(np.True_), "Flatten: start_dim must be an int (an axis; negative counts from the end), got np.True_"),
        (lambda: nn.Sequential().init(0, offset=True), "Sequential.init: offset must be an int >= 0, got True"),
    ],
)  # fmt: skip
def test_integer_arguments_refuse_bools_and_floats(make: Any, match: str) -> None:
    # numpy integers are taken (test_nn.py); bools, numpy bools and floats such as 16.0 are not
    with pytest.raises(ValueError, match=f"^{re.escape(match)}$"):
        make()


def test_residual_shape_rule_refuses_a_module_that_changes_the_shape() -> None:
    model = nn.Sequential(nn.Residual(nn.Linear(3, 4)), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"Residual: Linear\(.*maps shape \(1, 3\) to \(1, 4\)"):
        model.flops((None, 3))
    assert nn.Sequential(nn.Residual(nn.Linear(3, 3)), nn.Linear(3, 2)).flops((None, 3)) == 30


def test_init_names_the_module_for_a_dtype_it_cannot_make() -> None:
    with pytest.raises(ValueError, match=r"Linear.init: unknown dtype 'float17'; use dtype="):
        nn.Linear(2, 2).init(0, dtype="float17")
    try:
        np.dtype("bfloat16")
    except TypeError:  # without ml_dtypes: say where bfloat16 comes from
        with pytest.raises(ValueError, match=r"Sequential.init: .*ml_dtypes"):
            nn.Sequential(nn.Linear(2, 2)).init(0, dtype="bfloat16")


# -- Embedding ids outside the table in a run ----------------------------------------------------
def _token_model() -> Any:
    import asyncnn as ann

    return ann.Graph.sequential(
        [nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2)], loss=nn.CrossEntropyLoss(),
        input_shape=(None, 4), input_dtype="int64",
    )  # fmt: skip


def _token_data(bad: int) -> dict[str, Any]:
    x = np.arange(32).reshape(8, 4) % 10
    x[5, 2] = bad  # row 1 of the second minibatch of 4
    return {"x": x, "y": np.zeros(8, dtype=np.int64)}


@pytest.mark.parametrize("bad", [10, -1])
def test_the_trainer_checks_embedding_ids_before_any_compute(bad: int) -> None:
    # (on a GPU a bad id is no error in the layer: its row is NaN, and the loss with it)
    import asyncnn as ann
    from asyncnn import optim, policies

    tr = ann.Trainer(_token_model(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0)
    before = _np(tr.params)
    want = (
        rf"input 'x': id {bad} at index \(5, 2\) is out of range for layer 'stage0' "
        r"\(Embedding\(num_embeddings=10, embedding_dim=3\)\): ids must be in 0\.\.9"
    )
    with pytest.raises(ValueError, match=want):
        tr.fit(_token_data(bad), batch_size=4)
    with pytest.raises(ValueError, match=want):
        tr.evaluate(_token_data(bad), batch_size=4)
    np.testing.assert_array_equal(tr.params["stage0"][0]["weight"], before["stage0"][0]["weight"])


def test_check_finite_names_the_embedding_ids_that_made_gpu_rows_nan(monkeypatch: Any) -> None:
    import asyncnn as ann
    from asyncnn import optim, policies
    from asyncnn._math import _ops_nn

    # ids as on a GPU, not read back by the layer: the row of a bad id comes out NaN
    monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)
    kw: dict[str, Any] = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync(), "seed": 0}
    hist = ann.Trainer(_token_model(), **kw).fit(_token_data(-1), batch_size=4, check_data=False)
    losses = hist.losses
    assert np.isfinite(losses[0]) and np.isnan(losses[1])
    tr = ann.Trainer(_token_model(), check_finite=True, **kw)
    with pytest.raises(ann.ActorError) as info:
        tr.fit(_token_data(-1), batch_size=4, check_data=False)
    err = info.value
    assert (err.actor, err.kind, err.key) == ("stage0", "forward", 1)
    assert isinstance(err.__cause__, IndexError)
    assert str(err).startswith("actor 'stage0' produced NaN or Inf in its forward of key 1")
    assert "Embedding(num_embeddings=10, embedding_dim=3) got id -1 at ids[1, 2]" in str(err)


# -- CrossEntropyLoss options, Embedding padding_idx ----------------------------------------------
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: nn.CrossEntropyLoss(weight=[[1.0, 2.0]]), ValueError,
         "CrossEntropyLoss: weight must be 1-D, one entry per class, got shape (1, 2)"),
        (lambda: nn.CrossEntropyLoss(weight=2.0), ValueError,
         "CrossEntropyLoss: weight must be 1-D, one entry per class, got shape ()"),
        (lambda: nn.CrossEntropyLoss(weight=[]), ValueError,
         "CrossEntropyLoss: weight must be 1-D, one entry per class, got shape (0,)"),
        (lambda: nn.CrossEntropyLoss(weight=["a", "b"]), TypeError,
         "CrossEntropyLoss: weight must hold real numbers, got dtype <U1"),
        (lambda: nn.CrossEntropyLoss(weight=[True, False]), TypeError,
         "CrossEntropyLoss: weight must hold real numbers, got dtype bool"),
        (lambda: nn.CrossEntropyLoss(weight=[1.0, float("nan")]), ValueError,
         "CrossEntropyLoss: weight must be finite, got nan at weight[1]"),
        (lambda: nn.CrossEntropyLoss(label_smoothing=1.5), ValueError,
         "CrossEntropyLoss: label_smoothing must be in [0, 1], got 1.5"),
        (lambda: nn.CrossEntropyLoss(label_smoothing=-0.1), ValueError,
         "CrossEntropyLoss: label_smoothing must be in [0, 1], got -0.1"),
        (lambda: nn.CrossEntropyLoss(label_smoothing=float("nan")), ValueError,
         "CrossEntropyLoss: label_smoothing must be in [0, 1], got nan"),
        (lambda: nn.CrossEntropyLoss(label_smoothing="0.1"), TypeError,
         "CrossEntropyLoss: label_smoothing must be a real number, got '0.1'"),
        (lambda: nn.CrossEntropyLoss(label_smoothing=True), TypeError,
         "CrossEntropyLoss: label_smoothing must be a real number, got True"),
        (lambda: nn.CrossEntropyLoss(ignore_index=1.0), TypeError,
         "CrossEntropyLoss: ignore_index must be an int, got 1.0"),
        (lambda: nn.CrossEntropyLoss(ignore_index=True), TypeError,
         "CrossEntropyLoss: ignore_index must be an int, got True"),
        (lambda: nn.Embedding(5, 2, padding_idx=5), ValueError,
         "Embedding: padding_idx must be in [-5, 5) (a row of the table; a negative one counts "
         "from the end), got 5"),
        (lambda: nn.Embedding(5, 2, padding_idx=-6), ValueError,
         "Embedding: padding_idx must be in [-5, 5)"),
        (lambda: nn.Embedding(5, 2, padding_idx=1.0), TypeError,
         "Embedding: padding_idx must be an int or None, got 1.0"),
        (lambda: nn.Embedding(5, 2, padding_idx=False), TypeError,
         "Embedding: padding_idx must be an int or None, got False"),
    ],
    ids=["weight-2d", "weight-0d", "weight-empty", "weight-str", "weight-bool", "weight-nan",
         "smooth-high", "smooth-low", "smooth-nan", "smooth-str", "smooth-bool", "ignore-float",
         "ignore-bool", "padding-high", "padding-low", "padding-float", "padding-bool"],
)  # fmt: skip
def test_cross_entropy_and_embedding_options_are_checked(
    make: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=re.escape(match)):
        make()


def test_cross_entropy_options_name_a_weight_or_label_that_does_not_fit() -> None:
    logits = np.zeros((2, 4, 3))
    with pytest.raises(ValueError) as info:
        nn.CrossEntropyLoss(weight=(1.0, 2.0, 3.0))({}, logits, np.zeros((2, 3), np.int64))
    assert str(info.value) == (
        "CrossEntropyLoss: weight has 3 entries but the logits of shape (2, 4, 3) have 4 classes "
        "(axis 1); give one weight per class"
    )
    labels = np.array([[0, -100, 3], [2, 4, -100]])
    with pytest.raises(ValueError) as info:
        nn.CrossEntropyLoss(label_smoothing=0.1)({}, logits, labels)
    assert str(info.value) == (
        "CrossEntropyLoss: label 4 at labels[1, 1] is outside [0, 4) for logits of shape "
        "(2, 4, 3), and is not the ignore_index (-100); labels must be class indices or "
        "ignore_index"
    )
    with pytest.raises(ValueError, match=r"logits of shape \(2, 4, 3\) and labels of shape \(2,"):
        nn.CrossEntropyLoss(ignore_index=0)({}, logits, np.zeros((2,), np.int64))
    with pytest.raises(TypeError, match="labels must be integer class indices, got dtype float64"):
        nn.CrossEntropyLoss(ignore_index=0)({}, logits, np.zeros((2, 3)))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: nn.LeakyReLU("0.1"), TypeError,
         "LeakyReLU: negative_slope must be a number, got str '0.1'"),
        (lambda: nn.LeakyReLU(float("nan")), ValueError, "LeakyReLU: negative_slope is NaN"),
        (lambda: nn.LeakyReLU(True), TypeError,
         "LeakyReLU: negative_slope must be a number, got bool True"),
        (lambda: nn.ELU(alpha=None), TypeError, "ELU: alpha must be a number, got NoneType None"),
        (lambda: nn.ELU(math.nan), ValueError, "ELU: alpha is NaN"),
        (lambda: nn.Softplus(beta=[1.0]), TypeError, r"Softplus: beta must be a number, got list"),
        (lambda: nn.Softplus(threshold=math.nan), ValueError, "Softplus: threshold is NaN"),
        (lambda: nn.Hardtanh(min_val="-1"), TypeError,
         "Hardtanh: min_val must be a number, got str '-1'"),
        (lambda: nn.Hardtanh(max_val=math.nan), ValueError, "Hardtanh: max_val is NaN"),
        (lambda: nn.Hardtanh(2.0, 1.0), ValueError,
         r"Hardtanh: min_val \(2.0\) must be less than max_val \(1.0\)"),
        (lambda: nn.Hardtanh(0.5, 0.5), ValueError,
         r"Hardtanh: min_val \(0.5\) must be less than max_val \(0.5\)"),
    ],
)  # fmt: skip
def test_activations_refuse_bad_hyperparameters(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_activation_hyperparameters_are_kept_as_plain_floats() -> None:
    # (a numpy scalar or an int in a field: kept as a Python float, which a spec carries)
    m = nn.Hardtanh(np.float32(-0.5), 2)
    assert (type(m.min_val), type(m.max_val)) == (float, float) and m == nn.Hardtanh(-0.5, 2.0)
    assert type(nn.LeakyReLU(np.float64(0.2)).negative_slope) is float
    assert nn.to_spec(nn.Softplus(np.float32(2.0), 5)) == {
        "type": "Softplus", "args": {"beta": 2.0, "threshold": 5.0}
    }  # fmt: skip


@pytest.mark.parametrize("module", [nn.LeakyReLU(), nn.ELU(), nn.SiLU(), nn.Softplus()])
def test_activations_computing_in_floating_point_refuse_integer_input(module: nn.Module) -> None:
    with pytest.raises(
        TypeError, match=rf"^{type(module).__name__}\(.*\) got input of dtype int64"
    ):
        module({}, np.arange(6).reshape(2, 3))


def test_hardtanh_keeps_integers_as_torch() -> None:
    out = nn.Hardtanh(-1, 2)({}, np.arange(-3, 4))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [-1, -1, -1, 0, 1, 2, 2])


def test_group_norm_refuses_what_torch_refuses_naming_both_sizes() -> None:
    # torch: "num_channels (6) must be divisible by num_groups (4)"
    with pytest.raises(ValueError, match=r"^GroupNorm: num_channels \(6\) must be divisible by "
                       r"num_groups \(4\)"):  # fmt: skip
        nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="GroupNorm: eps must be > 0"):
        nn.GroupNorm(2, 4, eps=0.0)
    gn = nn.GroupNorm(2, 4)
    with pytest.raises(ValueError, match=r"^GroupNorm\(.*\) got input of shape \(3, 6, 5\): it "
                       r"takes \(N, 4, \*\)"):  # fmt: skip
        gn(gn.init(0), np.zeros((3, 6, 5), np.float32))
    with pytest.raises(ValueError, match=r"got input of shape \(4,\): it takes \(N, 4, \*\)"):
        gn(gn.init(0), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match=r"^GroupNorm\(.*got input of dtype int64"):
        gn(gn.init(0), np.zeros((3, 4), np.int64))
