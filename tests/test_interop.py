"""Weights in and out: torch state dicts (a torch MLP and a Conv1d net give the same logits
here), safetensors files written by torch, and DLPack zero-copy exchange; and, at the end,
``asyncnn.testing``'s gradient check (that a wrong gradient fails it)."""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import warnings

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import _interop, _safetensors_io, dynamic, nn, ops, optim, policies
from asyncnn.backends import BFLOAT16
from asyncnn.interop import (
    from_dlpack,
    from_torch,
    load_safetensors,
    save_safetensors,
    to_torch,
    to_torch_tensor,
    torch_names,
)
from asyncnn.ops import Primitive
from asyncnn.testing import check_grads

from _reference import assert_params_equal


def _mlp_graph() -> ann.Graph:
    return ann.Graph.sequential(
        [nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(), stages=[2, 3], input_shape=(None, 5),
    )  # fmt: skip


def _conv_graph() -> ann.Graph:
    return ann.Graph.sequential(
        [nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 3)],
        loss=nn.CrossEntropyLoss(), stages=[2, 2], input_shape=(None, 2, 10),
    )  # fmt: skip


def _trainer(graph: ann.Graph) -> ann.Trainer:
    return ann.Trainer(graph, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")


def test_names_follow_one_torch_sequential():
    assert torch_names(_mlp_graph()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias",
    ]  # fmt: skip
    names = torch_names(_mlp_graph(), names={"stage0": "body", "stage1": "head"})
    assert names == ["body.0.weight", "body.0.bias", "head.0.weight", "head.0.bias",
                     "head.2.weight", "head.2.bias"]  # fmt: skip
    assert torch_names(nn.Linear(2, 3)) == ["weight", "bias"]


def test_round_trip_without_torch_is_exact(tmp_path):
    tr = _trainer(_mlp_graph())
    tr.fit({"x": np.ones((4, 5)), "y": np.array([0, 1, 2, 0])}, batch_size=4)
    state = to_torch(tr.params, tr.graph)
    assert state["0.weight"].shape == (16, 5)  # torch's (out, in)
    np.testing.assert_array_equal(state["0.weight"], tr.params["stage0"][0]["weight"].T)
    assert_params_equal(from_torch(state, tr.graph), tr.params)
    save_safetensors(state, tmp_path / "w.safetensors")
    assert_params_equal(
        from_torch(load_safetensors(tmp_path / "w.safetensors"), tr.graph), tr.params
    )


def test_weights_are_copied_not_shared():
    # every entry, transposed or not: a later in-place change on one side (torch training on,
    # load_state_dict(..., assign=True)) must not reach the other
    module = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Flatten(), nn.Linear(6, 2))
    state = to_torch(module.init(0, dtype="float64"), module)
    params = from_torch(state, module)
    kept = to_torch(params, module)
    for v in state.values():
        v += 1.0
    for k, v in to_torch(params, module).items():
        np.testing.assert_array_equal(v, kept[k], err_msg=k)
    for v in kept.values():
        v += 1.0
    for k, v in to_torch(params, module).items():
        np.testing.assert_array_equal(v + 1.0, kept[k], err_msg=k)


def test_mismatches_are_named(tmp_path):
    g = _mlp_graph()
    state = to_torch(_trainer(g).params, g)
    with pytest.raises(ValueError, match=r"missing \['4.bias'\]"):
        from_torch({k: v for k, v in state.items() if k != "4.bias"}, g)
    with pytest.raises(ValueError, match=r"unexpected \['5.weight'\]"):
        from_torch({**state, "5.weight": state["4.weight"]}, g)
    with pytest.raises(
        ValueError, match=r"'2.weight' has shape \(8, 15\); layer 'stage1' needs \(8, 16\)"
    ):
        from_torch({**state, "2.weight": np.zeros((8, 15))}, g)
    with pytest.raises(ValueError, match="names has no torch prefix for layer 'stage1'"):
        torch_names(g, names={"stage0": "a"})
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        load_safetensors(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not really")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        load_safetensors(tmp_path / "bad.safetensors")


def _torch_same_logits(graph, model, x):
    torch = pytest.importorskip("torch")
    model = model.double()
    tr = _trainer(graph)
    tr.params = from_torch(model.state_dict(), graph)
    ours = tr.predict({"x": x})["logits"]
    theirs = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)
    # and back: asyncnn -> torch -> asyncnn is exact
    back = to_torch(tr.params, graph, tensors=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    assert_params_equal(from_torch(back, graph), tr.params)
    return tr


def test_a_torch_mlp_gives_the_same_logits():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tn = torch.nn
    model = tn.Sequential(tn.Linear(5, 16), tn.Tanh(), tn.Linear(16, 8), tn.ReLU(), tn.Linear(8, 3))
    # trained a little in torch first, so the weights are not just an initialisation
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 5)
    y = torch.randint(0, 3, (32,))
    for _ in range(5):
        opt.zero_grad()
        tn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    rng = np.random.default_rng(0)
    _torch_same_logits(_mlp_graph(), model, rng.standard_normal((7, 5)))


def test_a_torch_conv1d_net_gives_the_same_logits():
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    tn = torch.nn
    model = tn.Sequential(tn.Conv1d(2, 4, 3), tn.ReLU(), tn.Flatten(), tn.Linear(4 * 8, 3))
    rng = np.random.default_rng(1)
    _torch_same_logits(_conv_graph(), model, rng.standard_normal((6, 2, 10)))


def test_a_safetensors_file_written_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    tn = torch.nn
    model = tn.Sequential(tn.Conv1d(2, 4, 3), tn.ReLU(), tn.Flatten(), tn.Linear(4 * 8, 3)).double()
    save_file(model.state_dict(), str(tmp_path / "torch.safetensors"))
    graph = _conv_graph()
    params = from_torch(load_safetensors(tmp_path / "torch.safetensors"), graph)
    np.testing.assert_array_equal(params["stage1"][1]["weight"], model[3].weight.detach().numpy().T)
    save_safetensors(to_torch(params, graph), tmp_path / "back.safetensors")
    back = load_file(str(tmp_path / "back.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_a_torch_multihead_attention():
    torch = pytest.importorskip("torch")
    torch.manual_seed(2)
    theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
    ours = nn.MultiHeadAttention(8, 2)
    params = from_torch(theirs.state_dict(), ours)
    q = np.random.default_rng(2).standard_normal((2, 4, 8))
    t = torch.from_numpy(q)
    np.testing.assert_allclose(
        ours(params, q), theirs(t, t, t, need_weights=False)[0].detach().numpy(), atol=1e-10
    )


def test_torch_weights_are_copied_and_torch_modules_are_refused():
    torch = pytest.importorskip("torch")
    theirs = torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, 2), torch.nn.Flatten(), torch.nn.Linear(6, 2)
    )
    theirs = theirs.double()
    ours = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Flatten(), nn.Linear(6, 2))
    params = from_torch(theirs.state_dict(), ours)
    kept = {k: v.clone() for k, v in theirs.state_dict().items()}
    with torch.no_grad():  # torch trains on after the import
        for p in theirs.parameters():
            p.add_(1.0)
    back = to_torch(params, ours, tensors=True)
    for k, v in kept.items():
        assert torch.equal(back[k], v), k
    for v in back.values():  # and the tensors handed out are torch's own
        v.add_(1.0)
    for k, v in to_torch(params, ours, tensors=True).items():
        assert torch.equal(v, kept[k]), k
    with pytest.raises(TypeError, match=r"got the torch module Sequential.*\.state_dict\(\)"):
        from_torch(theirs, ours)
    with pytest.raises(
        TypeError, match="target must be an asyncnn Graph or nn.Module, got .*Linear"
    ):
        from_torch(theirs.state_dict(), theirs[2])
    with pytest.raises(TypeError, match="target must be an asyncnn Graph or nn.Module"):
        to_torch(params, theirs)


def test_tied_torch_weights_are_named_in_a_warning():
    # an embedding tied to the output layer came out as two copies that train apart without a
    # word, and loading to_torch's result back into the tied model silently kept one of them
    torch = pytest.importorskip("torch")
    theirs = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    theirs[1].weight = theirs[0].weight  # tied
    ours = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    with pytest.warns(UserWarning, match=r"'0\.weight' and '1\.weight' are one tensor"):
        params = from_torch(theirs.state_dict(), ours)
    assert np.array_equal(params[1]["weight"], params[0]["weight"].T)  # two equal copies
    untied = theirs.state_dict()
    untied["1.weight"] = untied["1.weight"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_torch(untied, ours)  # equal values in separate memory: no warning
        from_torch({k: v.numpy() for k, v in untied.items()}, ours)
        # empty tensors all read the null pointer: not tied
        _interop._warn_tied({"a": torch.empty(0, 3), "b": torch.empty(0, 3)}, ["a", "b"])
        _interop._warn_tied({"a": np.empty((0, 3)), "b": np.empty((0, 3))}, ["a", "b"])
    arrays = {k: v.numpy() for k, v in theirs.state_dict().items()}  # numpy views of one tensor
    with pytest.warns(UserWarning, match="tied weights"):
        from_torch(arrays, ours)


def test_dlpack_shares_memory():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float64)
    a = from_dlpack({"w": [t]})["w"][0]
    assert isinstance(a, np.ndarray)
    t[0] = 42.0  # one buffer: a write on one side shows on the other
    assert a[0] == 42.0
    back = to_torch_tensor({"w": a})["w"]
    back[1] = -1.0
    assert t[1] == -1.0 and a[1] == -1.0
    assert from_dlpack(3) == 3  # leaves that are not arrays pass through


_LINEAR = {"weight": np.zeros((3, 2)), "bias": np.zeros(2)}
_MHA = nn.MultiHeadAttention(4, 2)


@pytest.mark.parametrize(
    "target, params, match",
    [
        (nn.Linear(3, 2), {**_LINEAR, "extra": np.zeros(2)}, r"unexpected params\['extra'\]"),
        (nn.Linear(3, 2, bias=False), _LINEAR, r"unexpected params\['bias'\]"),
        (nn.Linear(3, 2), {"weight": _LINEAR["weight"]}, r"missing params\['bias'\]"),
        (nn.Linear(3, 2), {**_LINEAR, "weight": _LINEAR["weight"].T}, r"\(2, 3\), the target"),
        (nn.Sequential(nn.Linear(3, 2), nn.ReLU()), [{}], r"missing params\[0\]\['weight'\]"),
        (_MHA, {**_MHA.init(0), "k": 1.0}, r"unexpected params\['k'\]"),
    ],
)  # fmt: skip
def test_to_torch_refuses_params_that_do_not_fit(target, params, match):
    # (they were written out as given: a stray key, a bias the target lacks, a missing one, a
    # weight of any shape transposed, or failed in zip or on a KeyError)
    with pytest.raises(ValueError, match="to_torch: params do not fit .*" + match):
        to_torch(params, target)


def test_graph_params_that_do_not_fit_are_named():
    g = _mlp_graph()
    params = _trainer(g).params
    params["stage1"][2]["bias"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"params\['stage1'\]\[2\]\['bias'\] has shape \(4,\)"):
        to_torch(params, g)


def test_batch_norm_statistics_and_unmapped_modules_are_refused_by_name():
    # what a torch Linear + BatchNorm1d's state dict holds, read as Linear + LayerNorm
    ours = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    state = to_torch(ours.init(0), ours)
    state |= {"1.running_mean": np.zeros(4), "1.running_var": np.ones(4)}
    state["1.num_batches_tracked"] = np.array(3)
    with pytest.raises(ValueError, match=r"torch module\(s\) \['1'\] hold batch-norm running"):
        from_torch(state, ours)
    with pytest.raises(ValueError, match="no torch name mapping for RNNCell"):
        torch_names(dynamic.RNNCell(2, 3))


def test_dlpack_refuses_reversed_views_and_keeps_namedtuples():
    # torch.from_dlpack aborted the whole process on a negative stride
    with pytest.raises(ValueError, match=r"negative strides \(-8,\).*ascontiguousarray"):
        to_torch_tensor({"w": np.arange(5.0)[::-1]})
    pair = collections.namedtuple("pair", "w b")(np.ones(2), 3)
    back = from_dlpack(pair)
    assert type(back) is type(pair) and back.b == 3
    np.testing.assert_array_equal(back.w, pair.w)


def test_unusual_torch_tensors_convert():
    torch = pytest.importorskip("torch")
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch._neg_view(torch.randn(4, dtype=torch.float64)[::2])  # a negative-bit view
    params = from_torch({"weight": w.t(), "bias": b}, nn.Linear(3, 2))  # transposed, strided
    np.testing.assert_array_equal(params["weight"], w.detach().numpy())
    np.testing.assert_array_equal(params["bias"], b.resolve_neg().numpy())
    assert params["weight"].flags["C_CONTIGUOUS"]


def test_torch_bfloat16_without_ml_dtypes_is_named(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(_interop, "BFLOAT16", None)
    state = torch.nn.Linear(3, 2).to(torch.bfloat16).state_dict()
    with pytest.raises(TypeError, match="'weight' is a torch.bfloat16 tensor: .*ml_dtypes"):
        from_torch(state, nn.Linear(3, 2))
    with pytest.raises(TypeError, match="torch.bfloat16 tensor: .*ml_dtypes"):
        from_dlpack(state["bias"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_16_and_32_bit_torch_weights_round_trip_bit_for_bit(dtype):
    torch = pytest.importorskip("torch")
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")  # numpy's bfloat16
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    state = model.to(getattr(torch, dtype)).state_dict()
    ours = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = from_torch(state, ours)
    assert params[0]["weight"].dtype == np.dtype(dtype)
    for k, v in to_torch(params, ours, tensors=True).items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    t = state["0.bias"].clone()
    a = from_dlpack(t)  # one buffer both ways
    t[0] = 7.0
    assert a[0] == 7.0 and a.dtype == np.dtype(dtype)
    to_torch_tensor(a)[1] = -3.0
    assert t[1] == -3.0


# asyncnn.testing.check_grads: a wrong gradient must fail it, a right one pass at any dtype


def _square(vjp_rule):
    return Primitive("square", lambda x: (x * x, x), vjp_rule)


_RIGHT = _square(lambda ct, x, needs: (2 * x * ct,))
_X = np.random.default_rng(0).standard_normal((3, 4))


@pytest.mark.parametrize(
    "rule, match",
    [
        (lambda ct, x, needs: ((2 * x * ct).astype(np.float32),), "gradient dtype float32, the"),
        (lambda ct, x, needs: (2 * x * ct * (1 + 1e-5),), r"args\[0\]: vjp and finite differ"),
        (lambda ct, x, needs: (2 * x,), "vjp and finite differences differ"),
        (lambda ct, x, needs: ((2 * x * ct)[:1],), r"gradient shape \(1, 4\)"),
        (lambda ct, x, needs: (-2 * x * ct,), "vjp and finite differences differ"),
        (lambda ct, x, needs: (0 * x * ct,), "vjp and finite differences differ"),
        (lambda ct, x, needs: (2 * x * ct + np.nan,), "vjp and finite differences differ"),
        (lambda ct, x, needs: (None,), "vjp and finite differences differ"),  # (zeros)
    ],
)  # fmt: skip
def test_check_grads_fails_a_wrong_gradient(rule, match):
    check_grads(_RIGHT, _X)
    with pytest.raises(AssertionError, match=match):
        check_grads(_square(rule), _X)


_RNG = np.random.default_rng(1)
_A, _B = _RNG.standard_normal((64, 64)), _RNG.standard_normal((64, 64))
_CUBE_X = 10 * _RNG.standard_normal(200)
_SQUARES_X = _RNG.standard_normal(2000)
# (fn, args, its exact vjp rule off by 1e-5 relative, where one makes a Primitive of it)
_BIG_FLOAT64_CASES = {
    "matmul 64x64": (ops.matmul, (_A, _B)),
    "x**3 of 200 at scale 10": (lambda v: v * v * v, (_CUBE_X,)),
    "sum(x**2) of 2000": (lambda v: ops.sum(v * v), (_SQUARES_X,)),
}


@pytest.mark.parametrize("case", sorted(_BIG_FLOAT64_CASES))
def test_check_grads_passes_right_float64_gradients_whatever_the_output_size(case):
    # (these exact gradients failed at the default tolerances: the finite differences of
    # <ct, fn(x)> lost |<ct, fn(x)>| * 2.2e-16 / eps to rounding, 1e-7 for a 64x64 matmul, and
    # the tolerance did not count it)
    fn, args = _BIG_FLOAT64_CASES[case]
    check_grads(fn, *args)


def test_check_grads_still_fails_a_float64_gradient_1e5_off_where_outputs_are_large():
    def wrong_matmul_vjp(ct, res, needs):
        a, b = res
        return (ct @ b.T * (1 + 1e-5), a.T @ ct)

    wrong_matmul = Primitive("matmul", lambda a, b: (a @ b, (a, b)), wrong_matmul_vjp)
    with pytest.raises(AssertionError, match=r"args\[0\]: vjp and finite differences differ"):
        check_grads(wrong_matmul, _A, _B)
    cube = Primitive("cube", lambda x: (x**3, x), lambda ct, x, needs: (3.00003 * x**2 * ct,))
    with pytest.raises(AssertionError, match="vjp and finite differences differ"):
        check_grads(cube, _CUBE_X)
    square_sum = Primitive(
        "square_sum", lambda x: (np.sum(x * x), x), lambda ct, x, needs: (2.00002 * x * ct,)
    )
    with pytest.raises(AssertionError, match="vjp and finite differences differ"):
        check_grads(square_sum, _SQUARES_X)
    # a dense op's thousand outputs near 1000 (their rounding bound, summed as worst cases,
    # let this pass: it is a root sum of squares)
    w = np.random.default_rng(4).standard_normal((16, 1024))
    x = np.random.default_rng(5).standard_normal((2, 16))
    shifted = Primitive(
        "shifted", lambda a: (a @ w + 1000.0, a), lambda ct, a, needs: (ct @ w.T * (1 + 1e-5),)
    )
    with pytest.raises(AssertionError, match="vjp and finite differences differ"):
        check_grads(shifted, x)
    right = Primitive("right", lambda a: (a @ w + 1000.0, a), lambda ct, a, needs: (ct @ w.T,))
    check_grads(right, x)


def test_check_grads_takes_the_step_that_float64_can_make_at_large_arguments():
    # 1e10 + 1e-6 is 1e10 + 1.9e-6 in float64: dividing by 2e-6 gave a gradient 90% off
    x = np.array([1e10 + 0.5, 1e10 - 0.25, 2.0])
    check_grads(lambda v: ops.tanh(v - 1e10), x)
    with pytest.raises(ValueError, match=r"eps=1e-06 is below the spacing of float64 at args\[0\]"):
        check_grads(lambda v: v * 2.0, np.array([1e11, 1.0]))
    with pytest.raises(ValueError, match=r"args\[0\] flat index 1 is inf; finite differences"):
        check_grads(lambda v: v * 2.0, np.array([1.0, np.inf]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_check_grads_passes_right_gradients_below_float64(dtype):
    # finite differences taken in the arguments' dtype were 7% off in float32 (a step of 1e-6
    # rounded away) and 0 in float16, whatever the tolerance; bfloat16 leaves were "not floats"
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.LogSoftmax())
    x = _X.astype(dtype)
    check_grads(lambda p, x: m(p, x), m.init(0, dtype=dtype), x)
    check_grads(lambda x: ops.sum(ops.exp(x) * x), x)
    if dtype == "float32":  # and still fails a gradient 1% off
        with pytest.raises(AssertionError, match="differ"):
            check_grads(_square(lambda ct, x, needs: (2 * x * ct * np.float32(1.01),)), x)


def test_check_grads_takes_python_floats_names_leaves_and_refuses_complex():
    check_grads(lambda a, s: a * s, _X, 2.0)  # vjp differentiates a Python float too
    wrong = _square(lambda ct, x, needs: (3 * x * ct,))
    with pytest.raises(AssertionError, match=r"args\[1\]\['w'\]: vjp and finite"):
        check_grads(lambda a, p: a * wrong(p["w"]), _X, {"w": _X, "n": np.arange(3)})
    with pytest.raises(TypeError, match=r"args\[0\] is complex"):
        check_grads(lambda z: z * z, _X + 1j)


def test_names_that_give_two_layers_one_torch_name_are_refused():
    # (the second layer's entries replaced the first's: from_torch left 'stage0' at the
    # template's random weights, and to_torch dropped its trained ones, without a word)
    g = ann.Graph.sequential(
        [nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)], loss=nn.MSELoss(), stages=[2, 1],
        input_shape=(None, 4), label_shape=(None, 4), label_dtype="float32",
    )  # fmt: skip
    names = {"stage0": "enc", "stage1": "enc"}
    says = r"layers 'stage0' and 'stage1' both map to the torch name 'enc\.0\.weight'"
    with pytest.raises(ValueError, match=says):
        torch_names(g, names=names)
    state = {"enc.0.weight": np.ones((4, 4)), "enc.0.bias": np.ones(4)}
    with pytest.raises(ValueError, match=says):
        from_torch(state, g, names=names)
    with pytest.raises(ValueError, match=says):
        to_torch(_trainer(g).params, g, names=names)
    distinct = {"stage0": "enc", "stage1": "head"}
    params = from_torch(to_torch(_trainer(g).params, g, names=distinct), g, names=distinct)
    assert_params_equal(params, _trainer(g).params)


def test_names_of_layers_the_graph_lacks_are_refused():
    # (a misspelt layer's prefix was ignored without a word)
    g = ann.Graph.sequential(
        [nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)], loss=nn.MSELoss(), stages=[2, 1],
        input_shape=(None, 4), label_shape=(None, 4), label_dtype="float32",
    )  # fmt: skip
    names = {"stage0": "enc", "stage1": "head", "stage_1": "typo"}
    with pytest.raises(ValueError, match=r"names gives torch prefixes for \['stage_1'\], which"):
        torch_names(g, names=names)


def test_from_torch_takes_a_big_endian_state_dict_into_native_arrays():
    # (kept as '>f8', to_torch(..., tensors=True) then failed on torch's bare byte-order error)
    g = ann.Graph.sequential([nn.Linear(3, 2)], loss=nn.MSELoss(), input_shape=(None, 3),
                             label_shape=(None, 2), label_dtype="float64")  # fmt: skip
    w = np.arange(6.0).reshape(2, 3)
    state = {"0.weight": w.astype(">f8"), "0.bias": np.ones(2).astype(">f8")}
    params = from_torch(state, g)
    stage = params["stage0"]
    leaf = (stage[0] if isinstance(stage, list) else stage)["weight"]
    assert leaf.dtype.isnative and leaf.dtype == np.float64
    np.testing.assert_array_equal(leaf, w.T)


def test_to_torch_tensor_converts_numpy_scalars_as_0d_arrays():
    # (a numpy scalar, which has no __dlpack__, came back unconverted)
    torch = pytest.importorskip("torch")
    out = to_torch_tensor({"a": np.float32(3.0), "b": np.array(2.0), "c": [np.int64(4)], "d": 5})
    assert isinstance(out["a"], torch.Tensor) and out["a"].dtype == torch.float32
    assert out["a"].shape == () and float(out["a"]) == 3.0
    assert isinstance(out["b"], torch.Tensor) and out["b"].shape == ()
    assert out["c"][0].dtype == torch.int64 and int(out["c"][0]) == 4
    assert out["d"] == 5  # a Python number is no array: it passes through
    if BFLOAT16 is not None:  # (ml_dtypes' scalars are numpy scalars but no np.number)
        (bf,) = to_torch_tensor([BFLOAT16.type(1.5)])
        assert isinstance(bf, torch.Tensor) and bf.dtype == torch.bfloat16 and float(bf) == 1.5
        import ml_dtypes  # (a scalar of a dtype DLPack has not passes through, as before)

        f8 = ml_dtypes.float8_e4m3fn(1.5)
        assert to_torch_tensor([f8])[0] is f8


def test_to_torch_tensor_refuses_read_only_arrays():
    # (torch has no read-only tensors: to_torch_tensor(tr.params), read-only views of the
    # trainer's live weights, gave writable tensors over them, and an in-place torch op changed
    # the trainer's weights without a word; an immutable bytes object was rewritten the same way)
    torch = pytest.importorskip("torch")
    tr = _trainer(_mlp_graph())
    kept = tr.params["stage0"][0]["weight"].copy()
    with pytest.raises(
        ValueError,
        match=r"to_torch_tensor: tree\['stage0'\]\[0\]\['bias'\] is a read-only array of "
        r"shape \(16,\).*x\.copy\(\).*to_torch\(tr\.params, tr\.graph, tensors=True\)",
    ):
        to_torch_tensor(tr.params)
    frozen = np.frombuffer(bytes(16), dtype=np.float64)
    with pytest.raises(ValueError, match=r"the array is a read-only array of shape \(2,\)"):
        to_torch_tensor(frozen)
    np.testing.assert_array_equal(tr.params["stage0"][0]["weight"], kept)
    copy = frozen.copy()  # a writable array is shared as before
    to_torch_tensor(copy)[0] = 5.0
    assert copy[0] == 5.0 and isinstance(to_torch_tensor(np.float64(2.0)), torch.Tensor)


def test_from_dlpack_refuses_negative_bit_views():
    # (torch exports a negative-bit view's memory without its lazy negation: z.conj().imag
    # came back with every sign flipped)
    torch = pytest.importorskip("torch")
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex128)
    v = z.conj().imag  # values [-2, 4]; its memory holds [2, -4]
    assert v.is_neg()
    with pytest.raises(ValueError, match=r"from_dlpack: tree\['v'\] is a torch negative-bit .*"
                       r"resolve_neg\(\)"):  # fmt: skip
        from_dlpack({"v": v})
    np.testing.assert_array_equal(from_dlpack(v.resolve_neg()), [-2.0, 4.0])


def test_safetensors_files_keep_0d_shapes(tmp_path):
    # (a 0-d array, torch's num_batches_tracked or a step count, came back of shape (1,))
    f = tmp_path / "s.safetensors"
    save_safetensors({"step": np.array(7), "s": np.float32(2.5), "w": np.ones((2, 3))}, f)
    back = load_safetensors(f)
    assert back["step"].shape == () and back["step"] == 7
    assert back["s"].shape == () and back["s"].dtype == np.float32 and back["s"] == 2.5
    assert back["w"].shape == (2, 3)
    try:
        import safetensors.torch as st
        import torch
    except ImportError:
        return
    save_safetensors({"n": torch.tensor(3)}, f)
    assert st.load_file(f)["n"].shape == ()


def test_save_safetensors_names_an_entry_that_is_no_array(tmp_path):
    # (a nested pytree, tr.params for to_torch's flat dict, or a None value failed with
    # safetensors' bare 'Unknown dtype "object"', naming neither the entry nor the remedy)
    f = tmp_path / "w.safetensors"
    save_safetensors({"ok": np.ones(2)}, f)
    tr = _trainer(_mlp_graph())
    flatten = r"flatten .*interop\.to_torch\(tr\.params, tr\.graph\)"
    with pytest.raises(TypeError, match=r"save_safetensors: entry 'stage0' is a list .*" + flatten):
        save_safetensors(tr.params, f)
    with pytest.raises(TypeError, match=r"entry 'w' is None.*" + flatten):
        save_safetensors({"w": None}, f)
    with pytest.raises(TypeError, match=r"entry 'w' is a dict.*" + flatten):
        save_safetensors({"w": {"a": np.ones(2)}}, f)
    with pytest.raises(TypeError, match=r"entry 's' .* dtype <U3"):
        save_safetensors({"s": "abc"}, f)
    with pytest.raises(TypeError, match=r"save_safetensors: the name 3 is not a str"):
        save_safetensors({3: np.ones(2)}, f)
    np.testing.assert_array_equal(load_safetensors(f)["ok"], np.ones(2))  # left as it was
    save_safetensors({"n": [1.0, 2.0]}, f)  # a list of numbers is an array, as before
    np.testing.assert_array_equal(load_safetensors(f)["n"], [1.0, 2.0])


def test_load_safetensors_of_bfloat16_without_ml_dtypes_gives_the_advice(tmp_path, monkeypatch):
    # (a valid bfloat16 file, as torch writes one, was "not a readable safetensors file")
    import json
    import struct

    header = json.dumps({"0.weight": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}})
    header += " " * (-len(header) % 8)
    f = tmp_path / "bf16.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\x80\x3f\x00\x40")
    if BFLOAT16 is not None:  # the file is fine: 1.0 and 2.0
        np.testing.assert_array_equal(load_safetensors(f)["0.weight"].astype(float), [1, 2])
    monkeypatch.setattr(_safetensors_io, "BFLOAT16", None)
    with pytest.raises(TypeError, match=r"bf16\.safetensors: entry '0\.weight' is bfloat16.*"
                       r"pip install ml_dtypes"):  # fmt: skip
        load_safetensors(f)


@dataclasses.dataclass(frozen=True)
class _Scale(nn.Module):
    """A module with weights and no torch name mapping."""

    n: int

    def init_params(self, init):
        return {"s": init.ones((self.n,))}

    def __call__(self, params, x, *, rng=None):
        return x * params["s"]


def test_a_module_without_a_torch_mapping_is_named_by_layer_and_path():
    # (the error named the module's class only: with two layers holding one, no telling which)
    g = ann.Graph()
    x = g.input("x", shape=(None, 4))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("enc", nn.Sequential(nn.Linear(4, 4), nn.ReLU()), x)
    inner = nn.Residual(nn.Sequential(nn.ReLU(), _Scale(4)))
    h = g.layer("dec", nn.Sequential(nn.Linear(4, 4), inner, nn.Linear(4, 3)), h)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    g.output("logits", h)
    says = (
        r"no torch name mapping for _Scale \(layer 'dec', at "
        r"graph\.nodes\['dec'\]\.module\.modules\[1\]\.module\.modules\[1\]\)"
    )
    params = _trainer(g).params
    for call in (
        lambda: torch_names(g),
        lambda: torch_names(g, names={"enc": "e", "dec": "d"}),
        lambda: to_torch(params, g),
        lambda: from_torch({}, g),
    ):
        with pytest.raises(ValueError, match=says):
            call()
    with pytest.raises(ValueError, match=r"for _Scale \(at target\.modules\[1\]\):"):
        torch_names(nn.Sequential(nn.Linear(2, 2), _Scale(2)))
    with pytest.raises(ValueError, match=r"for _Scale:"):
        torch_names(_Scale(2))


# -- names and shapes without drawing the weights; grouped convolutions -------------------------
def _peak_bytes(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_torch_names_to_torch_and_from_torch_draw_no_template_weights():
    # 2M parameters: a float64 template of them was 16 MB, drawn only to read names and shapes
    target = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Conv1d(4, 4, 3, groups=2))
    params = target.init(0, dtype="float32")
    nbytes = sum(a.nbytes for p in params for a in p.values())
    names, peak = _peak_bytes(lambda: torch_names(target))
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert peak < 1_000_000
    state, peak = _peak_bytes(lambda: to_torch(params, target))
    assert peak < 1.5 * nbytes  # its own copies of the weights, and no template beside them
    back, peak = _peak_bytes(lambda: from_torch(state, target))
    assert peak < 1.5 * nbytes
    assert_params_equal({"m": back}, {"m": params})
    assert all(a.dtype == np.float32 for p in back for a in p.values())
    # (an Embedding with a padding row drew its whole table: 410 MB for 400,000 rows of 128)
    table = nn.Embedding(200_000, 64, padding_idx=0)
    names, peak = _peak_bytes(lambda: torch_names(table))
    assert names == ["weight"] and peak < 1_000_000


def test_grouped_conv_weights_round_trip_with_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    tn = torch.nn
    model = tn.Sequential(tn.Conv2d(4, 8, 3, groups=2), tn.ReLU(), tn.Conv2d(8, 8, 1, groups=8))
    model = model.double()
    ours = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=8))
    params = from_torch(model.state_dict(), ours)
    assert params[0]["weight"].shape == (8, 2, 3, 3) and params[2]["weight"].shape == (8, 1, 1, 1)
    x = np.random.default_rng(3).standard_normal((2, 4, 5, 5))
    np.testing.assert_allclose(
        ours(params, x), model(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-12
    )
    for k, v in to_torch(params, ours).items():
        np.testing.assert_array_equal(v, model.state_dict()[k].numpy(), err_msg=k)
    # the weights of an ungrouped conv do not fit a grouped one: the shapes tell them apart
    plain = tn.Conv2d(4, 8, 3).double().state_dict()
    with pytest.raises(ValueError, match=r"'weight' has shape \(8, 4, 3, 3\); Conv2d needs "
                       r"\(8, 2, 3, 3\)"):  # fmt: skip
        from_torch(plain, nn.Conv2d(4, 8, 3, groups=2))


def test_save_safetensors_on_a_full_disk_raises_oserror_naming_the_file_and_keeps_the_old(
    tmp_path, monkeypatch
):
    # safetensors' SafetensorError (no OSError, naming no file) escaped, and the file it had
    # begun was left cut off in place of the one there before
    import errno

    import safetensors.numpy
    from safetensors import SafetensorError

    f = tmp_path / "w.safetensors"
    save_safetensors({"old": np.ones(2)}, f)
    before = f.read_bytes()

    def full(arrays, filename, *args, **kwargs):
        with open(filename, "wb") as out:
            out.write(b"\x00" * 10)  # what it wrote before the disk filled
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with pytest.raises(
        OSError, match=rf"writing {re.escape(str(f))} failed \(No space left"
    ) as info:
        save_safetensors({"new": np.zeros(3)}, f)
    assert info.value.errno == errno.ENOSPC
    assert isinstance(info.value.__cause__, SafetensorError)
    assert f.read_bytes() == before  # the file there before, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # and no debris

    # its other errors are no disk's: they go on as they are, and nothing is left either
    def bad(arrays, filename, *args, **kwargs):
        raise SafetensorError("Error while serializing: a shape mismatch")

    monkeypatch.setattr(safetensors.numpy, "save_file", bad)
    with pytest.raises(SafetensorError, match="a shape mismatch"):
        save_safetensors({"new": np.zeros(3)}, tmp_path / "n.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_save_safetensors_writes_through_a_temporary_file_renamed_into_place(tmp_path):
    f = tmp_path / "w.safetensors"
    save_safetensors({"a": np.arange(3.0)}, f)
    save_safetensors({"b": np.ones(2)}, str(f))  # over the one there
    assert list(load_safetensors(f)) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_save_safetensors_gives_the_file_the_mode_open_gives(tmp_path, umask):
    # (it was 0600, as safetensors makes its temporary file, whatever the umask: a file others
    # could not read where every file open() makes beside it was 0644)
    f = tmp_path / "w.safetensors"
    old = os.umask(umask)
    try:
        save_safetensors({"a": np.arange(3.0)}, f)
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask


# -- recurrent layers ------------------------------------------------------------------------------
def test_a_torch_lstm_models_weights_load_into_a_graph_by_name_and_back():
    torch = pytest.importorskip("torch")
    torch.manual_seed(5)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model = Model().double()
    g = ann.Graph()
    x = g.input("x", shape=(None, 5, 3))
    y = g.input("y", shape=(None, 5, 2))
    h = g.layer("rnn", nn.LSTM(3, 4, num_layers=2, bidirectional=True), x)
    out = g.layer("head", nn.Linear(8, 2), h)
    g.loss("loss", nn.MSELoss(), out, y)
    g.output("out", out)
    names = {"rnn": "rnn", "head": "head"}
    assert torch_names(g, names) == list(model.state_dict())
    params = from_torch(model.state_dict(), g, names)
    # (stored (in, out) as Linear's: the transpose of torch's (4 * hidden, in))
    assert params["rnn"]["weight_ih_l1_reverse"].shape == (8, 16)
    xs = np.random.default_rng(5).standard_normal((2, 5, 3))
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    tr.params = params
    np.testing.assert_allclose(
        tr.predict({"x": xs})["out"], model(torch.from_numpy(xs)).detach().numpy(), rtol=1e-10,
        atol=1e-12,
    )  # fmt: skip
    model.load_state_dict(to_torch(tr.params, g, names, tensors=True))
    for k, v in to_torch(params, g, names).items():
        np.testing.assert_array_equal(model.state_dict()[k].numpy(), v, err_msg=k)


def test_check_grads_allows_for_a_step_whose_change_rounds_away() -> None:
    # v[1]'s step moves sum(v**2) ~ 1e10 by 4e-9, below its last place: the finite difference
    # reads 0 against the right 2e-3, and failed a right rule
    check_grads(lambda v: ops.sum(v**2), np.array([1e5, 1e-3]))


def test_save_safetensors_into_a_missing_folder_says_so_naming_the_file(tmp_path):
    # (an I/O error, errno 5, naming safetensors' own temporary file)
    path = str(tmp_path / "nope" / "w.safetensors")
    with pytest.raises(FileNotFoundError, match=r"writing .*nope/w\.safetensors failed \(No such"):
        save_safetensors({"a": np.ones(2)}, path)


def _attribute_model(torch):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.rnn = torch.nn.LSTM(8, 16, batch_first=True)
            self.fc = torch.nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(self.rnn(self.emb(x))[0][:, -1])

    return Model().double()


def _sequence_graph() -> ann.Graph:
    mods = [nn.Embedding(20, 8), nn.LSTM(8, 16, output="last"), nn.Linear(16, 5)]
    return ann.Graph.sequential(
        mods, loss=nn.CrossEntropyLoss(), stages=[1, 2], input_shape=(None, 7),
        input_dtype="int64",
    )  # fmt: skip


def test_a_torch_model_of_named_attributes_loads_into_stages_by_one_prefix_per_module():
    # the usual torch model (self.emb, self.rnn, self.fc) is no nn.Sequential: names= gives one
    # prefix per module of a layer (a stage of two modules here), each module's names under it
    torch = pytest.importorskip("torch")
    torch.manual_seed(6)
    model = _attribute_model(torch)
    g = _sequence_graph()
    names = {"stage0": ["emb"], "stage1": ["rnn", "fc"]}
    assert torch_names(g, names) == list(model.state_dict())
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    tr.params = from_torch(model.state_dict(), g, names)
    xs = np.random.default_rng(6).integers(0, 20, (3, 7))
    np.testing.assert_allclose(
        tr.predict({"x": xs})["logits"], model(torch.from_numpy(xs)).detach().numpy(),
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    back = to_torch(tr.params, g, names)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    # a prefix of one string still numbers the layer's modules under it, as before
    assert torch_names(g, {"stage0": "a", "stage1": ["rnn", "fc"]})[0] == "a.0.weight"


def test_names_per_module_of_the_wrong_length_are_refused_naming_the_layers_modules():
    g = _sequence_graph()
    with pytest.raises(
        ValueError,
        match=r"names\['stage1'\] must be one torch prefix .* or a list "
        r"of one per module of the layer \(2: LSTM, Linear\), got \['rnn'\]",
    ):
        torch_names(g, {"stage0": ["emb"], "stage1": ["rnn"]})


def test_a_state_dict_of_attribute_names_says_to_give_names_per_module():
    # (it listed the missing and unexpected names only: nothing said how to map a model that
    # is no nn.Sequential, nor how the stages had cut the chain)
    torch = pytest.importorskip("torch")
    g = _sequence_graph()
    with pytest.raises(ValueError, match=re.escape(
        "give names= one torch prefix per module of each layer, in order: names={'stage0': "
        "[<Embedding's attribute>], 'stage1': [<LSTM's attribute>, <Linear's attribute>]}"
    )):  # fmt: skip
        from_torch(_attribute_model(torch).state_dict(), g)


def test_names_that_give_two_modules_of_one_layer_one_torch_name_say_so():
    # ("layers 'stage0' and 'stage0' both map to ...; give each layer a prefix of its own")
    g = ann.Graph.sequential(
        [nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)], loss=nn.MSELoss(), stages=1,
        input_shape=(None, 3), label_shape=(None, 2), label_dtype="float32",
    )  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(
        "names['stage0'] = ['fc', 'act', 'fc'] gives two of the layer's modules the torch name "
        "'fc.weight'; give each module a prefix of its own"
    )):  # fmt: skip
        torch_names(g, {"stage0": ["fc", "act", "fc"]})


def test_group_norm_weights_round_trip_with_torch():
    # torch's GroupNorm keeps weight and bias (C,), as asyncnn's: the same names and layouts
    torch = pytest.importorskip("torch")
    torch.manual_seed(4)
    tn = torch.nn
    model = tn.Sequential(tn.Conv2d(2, 6, 3), tn.GroupNorm(3, 6), tn.ReLU(), tn.GroupNorm(2, 6))
    model = model.double()
    with torch.no_grad():  # (trained-looking affine weights, not ones and zeros)
        for m in (model[1], model[3]):
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
    ours = nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.ReLU(), nn.GroupNorm(2, 6))
    assert torch_names(ours) == list(model.state_dict())
    params = from_torch(model.state_dict(), ours)
    x = np.random.default_rng(4).standard_normal((2, 2, 5, 4))
    np.testing.assert_allclose(
        ours(params, x), model(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-12
    )
    for k, v in to_torch(params, ours).items():
        np.testing.assert_array_equal(v, model.state_dict()[k].numpy(), err_msg=k)
    # a GroupNorm without affine has no weights, and neither side names any
    assert torch_names(nn.GroupNorm(2, 4, affine=False)) == []
