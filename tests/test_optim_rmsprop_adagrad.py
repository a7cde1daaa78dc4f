"""RMSprop and Adagrad: trajectories and state against torch.optim, defaults, specs, argument
checks, 16-bit weights, schedules, clipping, and a Trainer (fit, checkpoints, captured updates).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import warnings
from typing import Any

import msgpack
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn._math._optim import state_dtype
from asyncnn._math._pytree import tree_leaves
from asyncnn.backends import Backend

from _optim_cases import _host, _to, _torch_steps, _tree_of
from _reference import (
    assert_params_close,
    assert_params_equal,
    chain_graph,
    classification_data,
    minibatches,
    plain_sgd,
)

STEPS = 20

#: every combination of the options that change RMSprop's update
RMSPROP_CASES = [
    {"lr": 0.01, "momentum": m, "centered": c, "weight_decay": wd}
    for m, c, wd in itertools.product([0.0, 0.9], [False, True], [0.0, 0.1])
] + [{"lr": 0.02, "alpha": 0.9, "eps": 1e-3, "momentum": 0.5, "centered": True}]

#: every combination of the options that change Adagrad's update
ADAGRAD_CASES = [
    {"lr": 0.05, "lr_decay": d, "initial_accumulator_value": a, "weight_decay": wd}
    for d, a, wd in itertools.product([0.0, 0.1], [0.0, 0.3], [0.0, 0.1])
] + [{"lr": 0.1, "eps": 1e-3, "lr_decay": 0.02}]

CASES = [("RMSprop", kw) for kw in RMSPROP_CASES] + [("Adagrad", kw) for kw in ADAGRAD_CASES]

#: the names torch gives each option's state buffers (its "step" is our state's "step")
TORCH_BUFFERS = {
    "RMSprop": ("square_avg", "momentum_buffer", "grad_avg"),
    "Adagrad": ("sum",),
}


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    kind, kw = case
    return kind + "-" + ",".join(f"{k}={v}" for k, v in kw.items() if k != "lr")


def _problem(seed: int, steps: int = STEPS) -> tuple[Any, list[Any]]:
    rng = np.random.default_rng(seed)
    params = _tree_of(rng)
    return params, [_tree_of(rng, 0.5 + t % 4) for t in range(steps)]


def _torch_run(
    kind: str,
    kw: dict[str, Any],
    params: Any,
    grads: list[Any],
    dtype: str,
    sched: Any = None,
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """torch's parameters after the steps, and its state of each parameter."""
    torch = pytest.importorskip("torch")
    kw = dict(kw)
    clip = kw.pop("clip_norm", None)

    def make(leaves: list[Any]) -> Any:
        opt = getattr(torch.optim, kind)(leaves, **kw)
        opt._asyncnn_clip = clip
        return opt

    leaves, opt = _torch_steps(make, params, grads, dtype, sched)
    states = [
        {k: (v.item() if k == "step" else v.detach().numpy()) for k, v in opt.state[t].items()}
        for t in leaves
    ]
    return [t.detach().numpy() for t in leaves], states


def _ours(
    opt: optim.Optimizer, backend: Backend, params: Any, grads: list[Any], dtype: str
) -> tuple[Any, dict[str, Any]]:
    p = _to(backend, params, dtype)
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, _to(backend, g, dtype), state)
    return p, state


# Against torch


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("kind", "kw"), CASES, ids=[_case_id(c) for c in CASES])
def test_trajectory_and_state_match_torch(
    backend: Backend, kind: str, kw: dict[str, Any], dtype: str
) -> None:
    params, grads = _problem(1)
    want, torch_states = _torch_run(kind, kw, params, grads, dtype)
    opt = getattr(optim, kind)(**kw)
    p, state = _ours(opt, backend, params, grads, dtype)
    tol = 1e-12 if dtype == "float64" else 2e-5
    for a, b in zip(_host(backend, p), want, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    # the buffers are torch's, under torch's names, and the step count too
    assert state["step"] == STEPS
    assert set(opt.buffer_names()) <= set(TORCH_BUFFERS[kind])
    for i, theirs in enumerate(torch_states):
        assert int(theirs["step"]) == STEPS
        assert set(theirs) == {"step", *opt.buffer_names()}
        for name in opt.buffer_names():
            mine = _host(backend, state[name])[i]
            np.testing.assert_allclose(mine, theirs[name], rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("kind", ["RMSprop", "Adagrad"])
def test_defaults_are_torchs(kind: str) -> None:
    torch = pytest.importorskip("torch")
    theirs = inspect.signature(getattr(torch.optim, kind)).parameters
    ours = {f.name: f.default for f in dataclasses.fields(getattr(optim, kind))}
    assert ours.pop("clip_norm") is None
    assert ours, kind
    for name, default in ours.items():
        assert theirs[name].default == default, name
    # and the defaults train as torch's do
    params, grads = _problem(2, steps=8)
    want, _ = _torch_run(kind, {}, params, grads, "float64")
    from asyncnn.backends import get_backend

    numpy = get_backend("numpy")
    got = _host(numpy, _ours(getattr(optim, kind)(), numpy, params, grads, "float64")[0])
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def _torch_schedulers() -> list[tuple[str, Any, Any]]:
    torch = pytest.importorskip("torch")
    sch = torch.optim.lr_scheduler
    return [
        ("step", optim.StepLR(0.05, step_size=3, gamma=0.5), lambda o: sch.StepLR(o, 3, 0.5)),
        (
            "warmup+cosine",
            optim.LinearWarmup(optim.CosineAnnealing(0.05, 12), warmup_steps=3, start_factor=0.5),
            lambda o: sch.ChainedScheduler(
                [sch.LinearLR(o, start_factor=0.5, total_iters=3), sch.CosineAnnealingLR(o, 12)]
            ),
        ),
    ]


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("RMSprop", {"momentum": 0.9, "centered": True}),
        ("Adagrad", {"lr_decay": 0.1, "weight_decay": 0.1}),
    ],
    ids=["RMSprop", "Adagrad"],
)
@pytest.mark.parametrize("index", range(2))
def test_schedules_drive_the_learning_rate_as_torchs_schedulers(
    backend: Backend, kind: str, kw: dict[str, Any], index: int
) -> None:
    name, schedule, make_sched = _torch_schedulers()[index]
    params, grads = _problem(3, steps=12)
    want, _ = _torch_run(kind, {"lr": 0.05, **kw}, params, grads, "float64", sched=make_sched)
    opt = getattr(optim, kind)(lr=schedule, **kw)
    got = _host(backend, _ours(opt, backend, params, grads, "float64")[0])
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    ("kind", "kw"),
    [("RMSprop", {"momentum": 0.5, "clip_norm": 1.0}), ("Adagrad", {"clip_norm": 0.5})],
    ids=["RMSprop", "Adagrad"],
)
def test_clip_norm_clips_as_torchs_clip_grad_norm(
    backend: Backend, kind: str, kw: dict[str, Any]
) -> None:
    params, grads = _problem(4, steps=10)
    want, _ = _torch_run(kind, kw, params, grads, "float64")
    got = _host(backend, _ours(getattr(optim, kind)(**kw), backend, params, grads, "float64")[0])
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


_SOME = [
    optim.RMSprop(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
    optim.RMSprop(),
    optim.Adagrad(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2, weight_decay=0.1),
    optim.Adagrad(),
]


@pytest.mark.parametrize("opt", _SOME, ids=repr)
def test_non_finite_gradients_go_through_as_in_torch_without_a_warning(
    backend: Backend, opt: optim.Optimizer
) -> None:
    params = {"w": np.array([1.0, 2.0, 3.0, 4.0, 0.5])}
    grads = [
        {"w": np.array([math.inf, -math.inf, math.nan, 1.0, 0.0])},
        {"w": np.array([1.0, 1.0, 1.0, -math.inf, 0.0])},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = _host(backend, _ours(opt, backend, params, grads, "float64")[0])
    kw = {f.name: getattr(opt, f.name) for f in dataclasses.fields(opt)}  # type: ignore[arg-type]
    del kw["clip_norm"]
    (want,), _ = _torch_run(type(opt).__name__, kw, params, grads, "float64")
    assert not np.isfinite(got[:4]).all()  # the case is not vacuous
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# The optimizer's own contract


@pytest.mark.parametrize("opt", _SOME, ids=repr)
def test_update_never_mutates_inputs_and_float32_stays_float32(
    backend: Backend, opt: optim.Optimizer
) -> None:
    params, grads = _problem(5, steps=3)
    p = _to(backend, params, "float32")
    state = opt.init(p)
    for g_host in grads:
        g = _to(backend, g_host, "float32")
        before = [np.array(x, copy=True) for x in _host(backend, (p, g, state))]
        new_p, new_state = opt.update(p, g, state)
        after = _host(backend, (p, g, state))
        for x, y in zip(before, after, strict=True):
            np.testing.assert_array_equal(x, y)
        for leaf in tree_leaves((new_p, {k: v for k, v in new_state.items() if k != "step"})):
            assert leaf.dtype == np.float32
        p, state = new_p, new_state


def test_adagrad_starts_its_sum_at_the_initial_accumulator_value(backend: Backend) -> None:
    opt = optim.Adagrad(initial_accumulator_value=0.25)
    p = {"w": backend.asarray(np.zeros((2, 3), np.float32)), "b": backend.asarray(np.zeros(()))}
    state = opt.init(p)
    assert state["step"] == 0 and set(state) == {"step", "sum"}
    np.testing.assert_array_equal(backend.to_numpy(state["sum"]["w"]), np.full((2, 3), 0.25))
    assert state["sum"]["w"].dtype == np.float32 and state["sum"]["b"].dtype == np.float64
    assert float(backend.to_numpy(state["sum"]["b"])) == 0.25


def test_buffer_names_follow_the_options() -> None:
    assert optim.RMSprop().buffer_names() == ("square_avg",)
    assert optim.RMSprop(momentum=0.9).buffer_names() == ("square_avg", "momentum_buffer")
    assert optim.RMSprop(centered=True).buffer_names() == ("square_avg", "grad_avg")
    both = optim.RMSprop(momentum=0.1, centered=True)
    assert both.buffer_names() == ("square_avg", "momentum_buffer", "grad_avg")
    assert optim.Adagrad(lr_decay=0.1).buffer_names() == ("sum",)


@pytest.mark.parametrize("opt", _SOME, ids=repr)
def test_float16_weights_keep_float32_state_and_update_as_float32_rounded_once(
    backend: Backend, opt: optim.Optimizer
) -> None:
    # g * g underflows float16 for |g| below ~2.4e-4 (and (1 - alpha) g**2 for |g| < ~2.5e-3):
    # in float16 buffers RMSprop's average and Adagrad's sum were 0, and a step divided by eps
    assert state_dtype(opt, np.float16) == np.float32
    assert state_dtype(opt, np.float32) == np.float32
    assert state_dtype(opt, np.float64) == np.float64
    p = {"w": backend.asarray(np.zeros(4, np.float16))}
    state = opt.init(p)
    for name in opt.buffer_names():
        assert state[name]["w"].dtype == np.float32, name
    q = {"w": np.zeros(4, np.float32)}
    wide = opt.init(q)
    for g in ([1e-4, 1e-3, 1e-2, 0.1], [0.0, 1e-4, 0.0, -0.1], [2e-4, 0.0, 0.0, 0.0]):
        g16 = np.array(g, np.float16)
        p, state = opt.update(p, {"w": backend.asarray(g16)}, state)
        assert p["w"].dtype == np.float16
        for name in opt.buffer_names():
            assert state[name]["w"].dtype == np.float32, name
        q, wide = opt.update(q, {"w": g16.astype(np.float32)}, wide)
        q = {"w": q["w"].astype(np.float16).astype(np.float32)}
        for name in opt.buffer_names():
            np.testing.assert_array_equal(backend.to_numpy(state[name]["w"]), wide[name]["w"])
    got = np.asarray(backend.to_numpy(p["w"]), np.float32)
    np.testing.assert_array_equal(got, q["w"])
    assert np.isfinite(got).all() and np.abs(got).max() < 1.0


def test_a_large_leaf_cut_over_a_team_is_bit_identical() -> None:
    from asyncnn.backends import ComputeTeam, using_team

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(512, 300)), "b": rng.normal(size=(300,))}
    grads = {"w": rng.normal(size=(512, 300)), "b": rng.normal(size=(300,))}
    for opt in _SOME:
        assert opt.elementwise_update
        state = opt.init(params)
        first = opt.update(params, grads, state)
        whole = opt.update(first[0], grads, first[1])
        with ComputeTeam(2, part_elements=1024) as team, using_team(team):
            buffers = tuple(state[name]["w"] for name in opt.buffer_names())
            assert opt._team_cut(team, params["w"], grads["w"], buffers) is not None  # it is cut
            first = opt.update(params, grads, state)
            cut = opt.update(first[0], grads, first[1])
        for a, b in zip(tree_leaves(whole), tree_leaves(cut), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Specs and errors


@pytest.mark.parametrize(
    "opt",
    [*_SOME, optim.RMSprop(lr=optim.StepLR(0.1, 2, 0.5), clip_norm=1.0),
     optim.Adagrad(lr=optim.CosineAnnealing(0.1, 10), clip_norm=2.0)],
    ids=repr,
)  # fmt: skip
def test_spec_round_trip(opt: optim.Optimizer) -> None:
    spec = opt.to_spec()
    assert spec["name"] == type(opt).__name__  # a built-in, by name
    wire = msgpack.unpackb(msgpack.packb(spec))
    again = optim.from_spec(wire)
    assert again == opt and type(again) is type(opt)
    assert again.to_spec() == spec


def test_public_names() -> None:
    assert {"RMSprop", "Adagrad"} <= set(optim.__all__)
    assert optim.RMSprop.__module__.startswith("asyncnn.")


BAD = [
    (optim.RMSprop, {"lr": -1e-3}, ValueError, "RMSprop: invalid learning rate"),
    (optim.RMSprop, {"alpha": -0.1}, ValueError, r"RMSprop: invalid alpha value -0.1: it must "),
    (optim.RMSprop, {"alpha": 1.5}, ValueError, r"RMSprop: invalid alpha value 1.5: .*\[0, 1\]"),
    (optim.RMSprop, {"alpha": "0.9"}, TypeError, "RMSprop: alpha must be a real number"),
    (optim.RMSprop, {"eps": -1e-8}, ValueError, "RMSprop: invalid eps value"),
    (optim.RMSprop, {"eps": float("nan")}, ValueError, "RMSprop: invalid eps value nan"),
    (optim.RMSprop, {"momentum": -0.9}, ValueError, "RMSprop: invalid momentum value -0.9"),
    (optim.RMSprop, {"weight_decay": -1}, ValueError, "RMSprop: invalid weight_decay value -1"),
    (optim.RMSprop, {"centered": 1}, TypeError, "RMSprop: centered must be a bool, got 1"),
    (optim.RMSprop, {"clip_norm": 0}, ValueError, "RMSprop: clip_norm must be > 0"),
    (optim.Adagrad, {"lr": float("nan")}, ValueError, "Adagrad: invalid learning rate"),
    (optim.Adagrad, {"lr_decay": -0.1}, ValueError, "Adagrad: invalid lr_decay value -0.1"),
    (
        optim.Adagrad,
        {"initial_accumulator_value": -1.0},
        ValueError,
        "Adagrad: invalid initial_accumulator_value value -1.0",
    ),
    (optim.Adagrad, {"weight_decay": True}, TypeError, "Adagrad: weight_decay must be a real"),
    (optim.Adagrad, {"eps": -1e-10}, ValueError, "Adagrad: invalid eps value"),
    (optim.Adagrad, {"clip_norm": "big"}, TypeError, "Adagrad: clip_norm must be a real number"),
]


@pytest.mark.parametrize(("cls", "kw", "exc", "match"), BAD, ids=[b[3][:40] for b in BAD])
def test_bad_hyperparameters_name_the_optimizer_and_field(
    cls: type, kw: dict[str, Any], exc: type, match: str
) -> None:
    with pytest.raises(exc, match=match):
        cls(**kw)


@pytest.mark.parametrize("opt", _SOME, ids=repr)
def test_a_state_of_other_options_or_parameters_is_refused(opt: optim.Optimizer) -> None:
    p = {"w": np.zeros(3, np.float32)}
    g = {"w": np.ones(3, np.float32)}
    name = type(opt).__name__
    other = optim.SGD(momentum=0.9).init(p)
    with pytest.raises(ValueError, match=rf"{name}.update: state must be a dict with keys"):
        opt.update(p, g, other)
    wider = opt.init({"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=rf"{name}.update: state\[.*shape \(2, 3\), but its "):
        opt.update(p, g, wider)


# In a Trainer


def _equivalence_optimizers() -> list[optim.Optimizer]:
    return [
        optim.RMSprop(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
        optim.RMSprop(lr=optim.StepLR(0.01, 2, 0.5)),
        optim.Adagrad(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=0.01),
    ]


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("policy", [policies.Sync(), policies.GPipe(3)], ids=["sync", "gpipe3"])
def test_trainer_fit_equals_the_plain_loop(index: int, policy: policies.Policy) -> None:
    data = classification_data(24)
    g = chain_graph(2)
    tr = ann.Trainer(g, optimizer=_equivalence_optimizers()[index], policy=policy, dtype="float64")
    start = tr.params
    hist = tr.fit(data, epochs=2, batch_size=10)
    ref, ref_losses = plain_sgd(
        g, start, _equivalence_optimizers()[index], minibatches(data, 10) * 2
    )
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hist.losses, ref_losses, rtol=1e-10)


@pytest.mark.parametrize("index", [0, 2])
def test_checkpoint_mid_training_resumes_bit_identically(tmp_path: Any, index: int) -> None:
    data = classification_data(40)

    def trainer() -> ann.Trainer:
        return ann.Trainer(
            chain_graph(3), optimizer=_equivalence_optimizers()[index],
            policy=policies.OneFOneB(3), seed=3,
        )  # fmt: skip

    straight = trainer()
    straight.fit(data, epochs=1, batch_size=8, shuffle=True)
    straight.fit(data, epochs=2, batch_size=8, shuffle=True)

    first = trainer()
    first.fit(data, epochs=1, batch_size=8, shuffle=True)
    first.save(str(tmp_path / "ckpt"))
    resumed = ann.Trainer.load(str(tmp_path / "ckpt"))
    assert resumed.optimizer == first.optimizer and type(resumed.optimizer) is type(first.optimizer)
    assert resumed.versions == first.versions and resumed.epochs_done == 1
    resumed.fit(data, epochs=2, batch_size=8, shuffle=True)
    assert_params_equal(resumed.params, straight.params)


@pytest.mark.parametrize("index", [0, 2])
@pytest.mark.parametrize("policy", [policies.Sync(), policies.GPipe(3)], ids=["sync", "gpipe3"])
def test_cuda_graphs_leave_the_update_eager_and_train_as_without(
    emulated: Any, index: int, policy: policies.Policy
) -> None:
    # (no fused kernel of theirs: the captured forwards and backwards run, the update eagerly;
    # under Sync it reads one backward graph's gradient buffers as they are, uncopied)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((12, 5)), "y": rng.integers(0, 3, 12)} for _ in range(5)]
    out = {}
    for graphs in (False, True):

        async def main(graphs: bool = graphs) -> None:
            async with ann.open_run(
                chain_graph(3), _equivalence_optimizers()[index], policy,
                dtype="float64", cuda_graphs=graphs,
            ) as run:  # fmt: skip
                for b in batches:
                    await run.step(b)
                await run.drain()
                if graphs:
                    assert run.cuda_graphs_active
                    layers = [a for a in emulated["actors"] if hasattr(a.graphs, "updates")]
                    assert layers and all(not a.graphs.updates for a in layers)
                out[graphs] = run.state().params

        import anyio

        anyio.run(main)
    assert_params_equal(out[True], out[False])


@pytest.mark.parametrize("index", [0, 2])
def test_a_float16_trainer_keeps_float32_state_through_a_checkpoint(
    tmp_path: Any, index: int
) -> None:
    data = classification_data(16)
    data["x"] = data["x"].astype(np.float16)
    tr = ann.Trainer(
        chain_graph(2), optimizer=_equivalence_optimizers()[index], policy=policies.GPipe(2),
        dtype="float16", seed=0,
    )  # fmt: skip
    tr.fit(data, epochs=1, batch_size=8)
    tr.save(str(tmp_path / "ckpt"))
    for trainer in (tr, ann.Trainer.load(str(tmp_path / "ckpt"))):
        for layer, state in trainer.state.opt_states.items():
            assert state["step"] == 2, layer
            assert tree_leaves(trainer.params[layer])[0].dtype == np.float16
            for name in trainer.optimizer.buffer_names():
                for leaf in tree_leaves(state[name]):
                    assert leaf.dtype == np.float32, (layer, name)


def _torch_rmsprop_loop(
    g: ann.Graph, start: dict[str, Any], batches: list[Any], momenta: list[float]
) -> dict[str, Any]:
    """torch's RMSprop over the composed model, one step a minibatch, its param group's
    momentum set to ``momenta[i]`` before step ``i`` (on the one optimizer, its state kept)."""
    torch = pytest.importorskip("torch")
    from asyncnn._math._pytree import tree_flatten, tree_unflatten

    from _reference import composed_loss

    leaves, treedef = tree_flatten([start[n] for n in g.layers])
    ts = [torch.tensor(np.array(x, dtype=np.float64), requires_grad=True) for x in leaves]
    opt = torch.optim.RMSprop(ts, lr=0.01, momentum=momenta[0])
    for b, momentum in zip(batches, momenta, strict=True):
        opt.param_groups[0]["momentum"] = momentum
        p = tree_unflatten(treedef, [t.detach().numpy().copy() for t in ts])
        _, grads = ann.value_and_grad(lambda q, b=b: composed_loss(g, q, b["x"], b["y"]))(p)
        for t, grad in zip(ts, tree_leaves(grads), strict=True):
            t.grad = torch.tensor(np.asarray(grad))
        opt.step()
    done = tree_unflatten(treedef, [t.detach().numpy() for t in ts])
    return dict(zip(g.layers, done, strict=True))


def test_switching_momentum_keeps_the_square_averages_as_torch_does() -> None:
    # tr.optimizer = RMSprop(momentum=0) after RMSprop(momentum=0.9) (or the reverse) made
    # every layer's state fresh: the square averages and the step count were dropped, where
    # torch's RMSprop, its group's momentum changed, goes on with them
    data = classification_data(24)
    g = chain_graph(2)
    tr = ann.Trainer(g, optimizer=optim.RMSprop(lr=0.01, momentum=0.9), policy=policies.Sync(),
                     dtype="float64")  # fmt: skip
    start = tr.params
    tr.fit(data, epochs=1, batch_size=8)
    held = tr.state.opt_states
    tr.optimizer = optim.RMSprop(lr=0.01)  # momentum off: its buffer goes, as torch ignores it
    for name, before in held.items():
        now = tr.state.opt_states[name]
        assert set(now) == {"step", "square_avg"} and now["step"] == before["step"] == 3
        assert_params_equal({name: now["square_avg"]}, {name: before["square_avg"]})
    tr.fit(data, epochs=1, batch_size=8)
    want = _torch_rmsprop_loop(g, start, minibatches(data, 8) * 2, [0.9] * 3 + [0.0] * 3)
    assert_params_close(tr.params, want, rtol=1e-10, atol=1e-12)
    # and on again (torch has no buffer to go on with: a KeyError), from a zero buffer, as an
    # RMSprop with momentum starts one; the square averages and the step go on
    held = tr.state.opt_states
    tr.optimizer = optim.RMSprop(lr=0.01, momentum=0.5, centered=True)  # (grad_avg: zeros)
    for name, before in held.items():
        now = tr.state.opt_states[name]
        assert set(now) == {"step", "square_avg", "momentum_buffer", "grad_avg"}
        assert now["step"] == before["step"] == 6
        assert_params_equal({name: now["square_avg"]}, {name: before["square_avg"]})
        for buffer in ("momentum_buffer", "grad_avg"):
            assert all(not np.any(x) for x in tree_leaves(now[buffer])), buffer
            assert [x.shape for x in tree_leaves(now[buffer])] == [
                x.shape for x in tree_leaves(before["square_avg"])
            ]
    # another optimizer's state is no RMSprop's: fresh, as before
    tr.optimizer = optim.Adagrad(lr=0.01)
    assert all(s["step"] == 0 for s in tr.state.opt_states.values())


@pytest.mark.parametrize(
    ("saved_with", "loaded_with"),
    [({"momentum": 0.9}, {}), ({}, {"momentum": 0.5, "centered": True})],
    ids=["momentum-off", "momentum-and-centered-on"],
)
def test_loading_with_another_momentum_keeps_the_square_averages_as_the_setter_does(
    tmp_path: Any, saved_with: dict[str, Any], loaded_with: dict[str, Any]
) -> None:
    # Trainer.load(path, optimizer=RMSprop(momentum=0)) of a checkpoint saved with
    # RMSprop(momentum=0.9) started every layer's state fresh (the square averages and the step
    # dropped), where the optimizer setter, as torch, goes on with them
    data = classification_data(24)
    g = chain_graph(2)
    tr = ann.Trainer(g, optimizer=optim.RMSprop(lr=0.01, **saved_with), policy=policies.Sync(),
                     dtype="float64")  # fmt: skip
    start = tr.params
    tr.fit(data, epochs=1, batch_size=8)
    tr.save(str(tmp_path / "ckpt"))
    held = tr.state.opt_states
    loaded = ann.Trainer.load(
        str(tmp_path / "ckpt"), optimizer=optim.RMSprop(lr=0.01, **loaded_with)
    )
    new = set(loaded.optimizer.buffer_names()) - set(tr.optimizer.buffer_names())
    for name, before in held.items():
        now = loaded.state.opt_states[name]
        assert set(now) == {"step", *loaded.optimizer.buffer_names()}
        assert now["step"] == before["step"] == 3
        assert_params_equal({name: now["square_avg"]}, {name: before["square_avg"]})
        for buffer in new:  # (one only the new optimizer uses: zeros, as its first step's)
            assert all(not np.any(x) for x in tree_leaves(now[buffer])), buffer
            assert [x.shape for x in tree_leaves(now[buffer])] == [
                x.shape for x in tree_leaves(before["square_avg"])
            ]
    loaded.fit(data, epochs=1, batch_size=8)
    # the setter's rule: the saved optimizer's trainer, the new one assigned, trains on alike
    swapped = ann.Trainer.load(str(tmp_path / "ckpt"))
    swapped.optimizer = optim.RMSprop(lr=0.01, **loaded_with)
    swapped.fit(data, epochs=1, batch_size=8)
    assert_params_equal(loaded.params, swapped.params)
    if loaded_with.get("centered"):  # (torch has no buffers to go on with: a KeyError)
        return
    momenta = [saved_with.get("momentum", 0.0)] * 3 + [loaded_with.get("momentum", 0.0)] * 3
    want = _torch_rmsprop_loop(g, start, minibatches(data, 8) * 2, momenta)
    assert_params_close(loaded.params, want, rtol=1e-10, atol=1e-12)
