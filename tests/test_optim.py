"""Optimizers, schedules, clipping: trajectories against float64 formulas and torch.optim."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

from asyncnn import optim
from asyncnn._math._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from asyncnn.backends import Backend

STEPS = 5


def _tree_of(rng: np.random.Generator, scale: float = 1.0) -> Any:
    return {
        "w": rng.normal(size=(3, 4)) * scale,
        "layers": [rng.normal(size=(5,)) * scale, {"b": rng.normal(size=(2, 2)) * scale}],
        "scalar": np.asarray(rng.normal() * scale),
    }


def _problem(seed: int = 0) -> tuple[Any, list[Any]]:
    rng = np.random.default_rng(seed)
    params = _tree_of(rng)
    grads = [_tree_of(rng, scale=0.5 + t) for t in range(STEPS)]
    return params, grads


def _to(backend: Backend, tree: Any, dtype: str) -> Any:
    return tree_map(lambda x: backend.asarray(np.asarray(x, dtype=dtype)), tree)


def _host(backend: Backend, tree: Any) -> list[np.ndarray]:
    return [np.asarray(backend.to_numpy(x)) for x in tree_leaves(tree)]


def _run(opt: optim.Optimizer, backend: Backend, params: Any, grads: list[Any], dtype: str) -> Any:
    p = _to(backend, params, dtype)
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, _to(backend, g, dtype), state)
    assert state["step"] == len(grads)
    return p


# Independent references: one leaf list, the formulas of the torch docs, float64.


def _lr_at(lr: Any, t: int) -> float:
    return lr(t) if callable(lr) else lr


def _ref_clip(grads: list[np.ndarray], max_norm: float | None) -> list[np.ndarray]:
    if max_norm is None:
        return grads
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    coef = min(max_norm / (norm + 1e-6), 1.0)
    return [g * coef for g in grads]


def _ref_sgd(params: Any, grads_seq: list[Any], **kw: Any) -> list[np.ndarray]:
    lr, momentum = kw.get("lr", 0.1), kw.get("momentum", 0.0)
    dampening, wd = kw.get("dampening", 0.0), kw.get("weight_decay", 0.0)
    ps = [np.array(p, dtype=np.float64) for p in tree_leaves(params)]
    bufs: list[Any] = [None] * len(ps)
    for t, grads in enumerate(grads_seq):
        gs = _ref_clip([np.asarray(g, np.float64) for g in tree_leaves(grads)], kw.get("clip_norm"))
        for i, g in enumerate(gs):
            d = g + wd * ps[i]
            if momentum:
                bufs[i] = d.copy() if bufs[i] is None else momentum * bufs[i] + (1 - dampening) * d
                d = d + momentum * bufs[i] if kw.get("nesterov") else bufs[i]
            ps[i] = ps[i] - _lr_at(lr, t) * d
    return ps


def _ref_adam(params: Any, grads_seq: list[Any], decoupled: bool, **kw: Any) -> list[np.ndarray]:
    lr = kw.get("lr", 1e-3)
    b1, b2 = kw.get("betas", (0.9, 0.999))
    eps, wd = kw.get("eps", 1e-8), kw.get("weight_decay", 1e-2 if decoupled else 0.0)
    ps = [np.array(p, dtype=np.float64) for p in tree_leaves(params)]
    m = [np.zeros_like(p) for p in ps]
    v = [np.zeros_like(p) for p in ps]
    vmax = [np.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_seq):
        gs = _ref_clip([np.asarray(g, np.float64) for g in tree_leaves(grads)], kw.get("clip_norm"))
        a = _lr_at(lr, t)
        n = t + 1
        for i, g in enumerate(gs):
            if decoupled:
                ps[i] = ps[i] * (1 - a * wd)
            else:
                g = g + wd * ps[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            vmax[i] = np.maximum(vmax[i], v[i])
            second = vmax[i] if kw.get("amsgrad") else v[i]
            m_hat = m[i] / (1 - b1**n)
            ps[i] = ps[i] - a * m_hat / (np.sqrt(second) / math.sqrt(1 - b2**n) + eps)
    return ps


SCHEDULES = {
    "step": optim.StepLR(0.1, step_size=2, gamma=0.5),
    "cosine": optim.CosineAnnealing(0.1, total_steps=4, min_lr=0.01),
    "warmup": optim.LinearWarmup(optim.CosineAnnealing(0.1, total_steps=6), warmup_steps=3),
}

SGD_CASES = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"weight_decay": 0.1},
    {"momentum": 0.8, "dampening": 0.5, "weight_decay": 0.1},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"momentum": 0.9, "clip_norm": 1.0},
    {"momentum": 0.9, "weight_decay": 0.05, "clip_norm": 2.0},
    {"lr": SCHEDULES["step"], "momentum": 0.9},
    {"lr": SCHEDULES["cosine"], "weight_decay": 0.1},
    {"lr": SCHEDULES["warmup"], "momentum": 0.5, "nesterov": True},
]

ADAM_CASES = [
    {},
    {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3},
    {"weight_decay": 0.1},
    {"amsgrad": True},
    {"amsgrad": True, "weight_decay": 0.2, "lr": 0.02},
    {"betas": (0.0, 0.5)},
    {"clip_norm": 1.0, "lr": 0.01},
    {"lr": SCHEDULES["step"]},
    {"lr": SCHEDULES["cosine"], "weight_decay": 0.3},
    {"lr": SCHEDULES["warmup"], "amsgrad": True, "clip_norm": 3.0},
]


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [",".join(f"{k}={v!r}"[:24] for k, v in c.items()) or "defaults" for c in cases]


@pytest.mark.parametrize("kw", SGD_CASES, ids=_ids(SGD_CASES))
def test_sgd_matches_reference(backend: Backend, kw: dict[str, Any]) -> None:
    params, grads = _problem()
    got = _run(optim.SGD(**kw), backend, params, grads, "float64")
    for a, b in zip(_host(backend, got), _ref_sgd(params, grads, **kw), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
@pytest.mark.parametrize("kw", ADAM_CASES, ids=_ids(ADAM_CASES))
def test_adam_matches_reference(backend: Backend, cls: type, kw: dict[str, Any]) -> None:
    params, grads = _problem(1)
    got = _run(cls(**kw), backend, params, grads, "float64")
    ref = _ref_adam(params, grads, decoupled=cls is optim.AdamW, **kw)
    for a, b in zip(_host(backend, got), ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_adamw_differs_from_adam_only_through_weight_decay(backend: Backend) -> None:
    params, grads = _problem(2)
    adam = _host(backend, _run(optim.Adam(lr=0.1, weight_decay=0.1), backend, params, grads, "f8"))
    adamw = _host(
        backend, _run(optim.AdamW(lr=0.1, weight_decay=0.1), backend, params, grads, "f8")
    )
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(adam, adamw, strict=True)) > 1e-4
    plain = _host(backend, _run(optim.Adam(lr=0.1), backend, params, grads, "f8"))
    no_wd = _host(
        backend, _run(optim.AdamW(lr=0.1, weight_decay=0.0), backend, params, grads, "f8")
    )
    for a, b in zip(plain, no_wd, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sgd_first_momentum_step_is_undamped(backend: Backend) -> None:
    p = {"x": backend.asarray(np.array([1.0, 2.0]))}
    g = {"x": backend.asarray(np.array([0.5, -1.0]))}
    opt = optim.SGD(lr=1.0, momentum=0.9, dampening=0.5)
    p1, s1 = opt.update(p, g, opt.init(p))
    np.testing.assert_array_equal(backend.to_numpy(s1["momentum_buffer"]["x"]), [0.5, -1.0])
    np.testing.assert_array_equal(backend.to_numpy(p1["x"]), [0.5, 3.0])
    _, s2 = opt.update(p1, g, s1)
    # 0.9 * 0.5 + 0.5 * 0.5, 0.9 * -1 + 0.5 * -1
    np.testing.assert_allclose(backend.to_numpy(s2["momentum_buffer"]["x"]), [0.7, -1.4])


ALL_OPTIMIZERS = [
    optim.SGD(lr=0.1),
    optim.SGD(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1, clip_norm=1.0),
    optim.SGD(lr=SCHEDULES["warmup"], momentum=0.9, nesterov=True, weight_decay=0.1),
    optim.Adam(lr=0.1, weight_decay=0.1, clip_norm=1.0),
    optim.Adam(lr=SCHEDULES["step"], amsgrad=True),
    optim.AdamW(lr=0.1, amsgrad=True, clip_norm=0.5),
]


@pytest.mark.parametrize("opt", ALL_OPTIMIZERS, ids=repr)
def test_update_never_mutates_inputs(backend: Backend, opt: optim.Optimizer) -> None:
    params, grads = _problem(3)
    p = _to(backend, params, "float32")
    state = opt.init(p)
    for g_host in grads[:3]:
        g = _to(backend, g_host, "float32")
        before = [_host(backend, t) for t in (p, g)] + [_host(backend, state)]
        new_p, new_state = opt.update(p, g, state)
        after = [_host(backend, t) for t in (p, g)] + [_host(backend, state)]
        for x, y in zip(before, after, strict=True):
            for a, b in zip(x, y, strict=True):
                np.testing.assert_array_equal(a, b)
        old_arrays = {id(x) for x in tree_leaves((p, g, state))}
        new_arrays = [x for x in tree_leaves((new_p, new_state)) if not isinstance(x, int)]
        assert not any(id(x) in old_arrays for x in new_arrays)
        p, state = new_p, new_state


@pytest.mark.parametrize("opt", ALL_OPTIMIZERS, ids=repr)
def test_float32_stays_float32(backend: Backend, opt: optim.Optimizer) -> None:
    params, grads = _problem(4)
    p = _to(backend, params, "float32")
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, _to(backend, g, "float32"), state)
    for leaf in tree_leaves((p, state)):
        if not isinstance(leaf, int):
            assert leaf.dtype == np.float32
    f64 = _host(backend, _run(opt, backend, params, grads, "float64"))
    for a, b in zip(_host(backend, p), f64, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _half(backend: Backend, name: str) -> Any:
    if name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    return backend.dtype(name)


def _cast(tree: Any, dtype: Any) -> Any:
    return tree_map(lambda x: x.astype(dtype) if hasattr(x, "dtype") else x, tree)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("opt", ALL_OPTIMIZERS, ids=repr)
def test_a_16_bit_update_is_the_float32_update_rounded_once(
    backend: Backend, opt: optim.Optimizer, name: str
) -> None:
    # as the GPU kernels compute it; numpy in 16 bits rounded every intermediate (and eps=1e-8
    # to 0 in float16, beta2=0.999 to 1 in bfloat16)
    dt = _half(backend, name)
    params, grads = _problem(7)
    p = q = _to(backend, params, dt)
    state = expected_state = opt.init(p)
    unclipped = dataclasses.replace(opt, clip_norm=None)  # clipping is of the 16-bit gradients
    for g_host in grads:
        g = _to(backend, g_host, dt)
        p, state = opt.update(p, g, state)
        if opt.clip_norm is not None:
            g = optim.clip_grad_norm(g, opt.clip_norm)[0]
        wide = unclipped.update(*_cast((q, g, expected_state), np.float32))
        q, expected_state = _cast(wide, dt)
    for a, b in zip(tree_leaves((p, state)), tree_leaves((q, expected_state)), strict=True):
        assert getattr(a, "dtype", None) == getattr(b, "dtype", None)
        np.testing.assert_array_equal(np.asarray(backend.to_numpy(a)).view(np.uint16)
                                      if hasattr(a, "dtype") else a,
                                      np.asarray(backend.to_numpy(b)).view(np.uint16)
                                      if hasattr(b, "dtype") else b)  # fmt: skip


def test_float16_adam_keeps_its_eps(backend: Backend) -> None:
    # g = 1e-4: g * g underflows to 0 in float16, as eps=1e-8 does: the update divided by 0
    opt = optim.Adam(lr=1e-2)
    p = {"w": backend.asarray(np.zeros(3, np.float16))}
    g = {"w": backend.asarray(np.full(3, 1e-4, np.float16))}
    new, _ = opt.update(p, g, opt.init(p))
    # float64: m_hat = g, sqrt(v_hat) = |g|, so the first step is lr * g / (|g| + eps) ~ lr
    np.testing.assert_allclose(backend.to_numpy(new["w"]), -1e-2 / (1 + 1e-4), rtol=1e-3)


def test_state_is_a_pytree_of_arrays_and_ints(backend: Backend) -> None:
    params, grads = _problem()
    p = _to(backend, params, "float32")
    opt = optim.AdamW(amsgrad=True)
    state = opt.init(p)
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
    _, treedef = tree_flatten(p)
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert tree_flatten(state[name])[1] == treedef
    assert sorted(optim.SGD(momentum=0.9).init(p)) == ["momentum_buffer", "step"]
    assert optim.SGD().init(p) == {"step": 0}
    _, state = opt.update(p, _to(backend, grads[0], "float32"), state)
    leaves, state_def = tree_flatten(state)
    rebuilt = tree_unflatten(state_def, leaves)
    assert rebuilt["step"] == 1 and type(rebuilt["step"]) is int


# Clipping


def test_clip_grad_norm_hand_values(backend: Backend) -> None:
    grads = {"a": backend.asarray(np.array([3.0])), "b": [backend.asarray(np.array([[4.0]]))]}
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert float(norm) == pytest.approx(5.0, rel=1e-15)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(backend.to_numpy(clipped["a"]), [3.0 * coef], rtol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(clipped["b"][0]), [[4.0 * coef]], rtol=1e-15)
    np.testing.assert_array_equal(backend.to_numpy(grads["a"]), [3.0])  # not modified
    unclipped, norm = optim.clip_grad_norm(grads, 10.0)
    assert float(norm) == pytest.approx(5.0, rel=1e-15)
    np.testing.assert_array_equal(backend.to_numpy(unclipped["b"][0]), [[4.0]])
    assert unclipped["a"] is not grads["a"]


def test_clip_grad_norm_keeps_float32_and_handles_empty(backend: Backend) -> None:
    grads = [backend.asarray(np.full((4, 4), 2.0, np.float32))]
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert clipped[0].dtype == np.float32 and norm.dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(clipped[0]), np.full((4, 4), 0.25), rtol=1e-6)
    empty, norm = optim.clip_grad_norm({}, 1.0)
    assert empty == {} and float(norm) == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm(grads, -1.0)


def test_clip_grad_norm_many_leaves(backend: Backend) -> None:
    grads = [backend.asarray(np.full(2, 0.5)) for _ in range(100)]
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert float(norm) == pytest.approx(math.sqrt(50.0), rel=1e-14)
    np.testing.assert_allclose(backend.to_numpy(clipped[99]), 0.5 / (math.sqrt(50.0) + 1e-6))


CLIP_CASES = {
    # name: (gradient leaves, max_norm, expected total norm, expected clipped leaves)
    "zero": ([[0.0, 0.0], [0.0]], 1.0, 0.0, [[0.0, 0.0], [0.0]]),
    "max_norm 0": ([[3.0], [4.0]], 0.0, 5.0, [[0.0], [0.0]]),
    "inf": ([[math.inf, 1.0], [2.0]], 1.0, math.inf, [[math.nan, 0.0], [0.0]]),
    "-inf": ([[-math.inf], [2.0]], 1.0, math.inf, [[math.nan], [0.0]]),
    "nan": ([[math.nan, 1.0], [2.0]], 1.0, math.nan, [[math.nan, math.nan], [math.nan]]),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CLIP_CASES)
def test_clip_grad_norm_edge_cases(backend: Backend, case: str, dtype: str) -> None:
    # as torch's default: nothing raised, and with filterwarnings=error no numpy warning either
    leaves, max_norm, norm, expected = CLIP_CASES[case]
    grads = [backend.asarray(np.asarray(g, dtype)) for g in leaves]
    clipped, total = optim.clip_grad_norm(grads, max_norm)
    np.testing.assert_array_equal(float(total), norm)
    for a, e in zip(clipped, expected, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), np.asarray(e, dtype))
    torch = pytest.importorskip("torch")
    ts = [torch.zeros(len(g), dtype=getattr(torch, dtype), requires_grad=True) for g in leaves]
    for t, g in zip(ts, leaves, strict=True):
        t.grad = torch.tensor(g, dtype=getattr(torch, dtype))
    np.testing.assert_array_equal(torch.nn.utils.clip_grad_norm_(ts, max_norm).item(), norm)
    for t, a in zip(ts, clipped, strict=True):
        np.testing.assert_array_equal(t.grad.numpy(), backend.to_numpy(a))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_clip_grad_norm_sums_16_bit_squares_in_float32(backend: Backend, name: str) -> None:
    # 256 * 16**2 = 65536 overflows float16 (max 65504): the norm was inf, the gradients zeroed
    dt = _half(backend, name)
    grads = [backend.asarray(np.full(256, 16.0, dt)), backend.asarray(np.ones((), dt))]
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert norm.dtype == np.float32 and float(norm) == pytest.approx(math.sqrt(65537.0), 1e-7)
    coef = 1.0 / (math.sqrt(65537.0) + 1e-6)
    for a, g in zip(clipped, [16.0, 1.0], strict=True):
        assert a.dtype == dt
        np.testing.assert_allclose(np.asarray(backend.to_numpy(a), np.float64), g * coef, 4e-3)
    if name == "float16":  # torch's norm accumulates in float32 too
        torch = pytest.importorskip("torch")
        ts = [torch.zeros(256, dtype=torch.float16, requires_grad=True)]
        ts[0].grad = torch.full((256,), 16.0, dtype=torch.float16)
        assert torch.nn.utils.clip_grad_norm_(ts, 1.0).item() == 256.0


# Schedules


def test_schedules_closed_forms() -> None:
    step = optim.StepLR(0.1, step_size=3, gamma=0.5)
    assert [step(t) for t in range(7)] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]
    # gamma > 1 grows the rate up to inf, as torch's does (was a bare OverflowError)
    grow = optim.StepLR(0.1, step_size=1, gamma=2.0)
    assert grow(10) == 0.1 * 2**10 and grow(10**6) == math.inf
    assert optim.StepLR(0.0, step_size=1, gamma=2.0)(10**6) == 0.0
    assert optim.StepLR(0.1, step_size=1, gamma=0.5)(10**6) == 0.0
    cos = optim.CosineAnnealing(1.0, total_steps=4, min_lr=0.2)
    expected = [1.0, 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, 0.6, None, 0.2, 0.2]
    for t, e in enumerate(expected):
        if e is not None:
            assert cos(t) == pytest.approx(e, rel=1e-15)
    warm = optim.LinearWarmup(0.4, warmup_steps=4)
    assert [warm(t) for t in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    warm_step = optim.LinearWarmup(step, warmup_steps=2, start_factor=0.5)
    assert [warm_step(t) for t in range(5)] == pytest.approx([0.05, 0.075, 0.1, 0.05, 0.05])


def test_schedule_drives_the_optimizer_lr(backend: Backend) -> None:
    # plain SGD with unit gradients moves each parameter by exactly the lr of that step
    sched = optim.StepLR(1.0, step_size=2, gamma=0.5)
    opt = optim.SGD(lr=sched)
    p = {"x": backend.asarray(np.zeros(1))}
    g = {"x": backend.asarray(np.ones(1))}
    state = opt.init(p)
    moves = []
    for _ in range(5):
        new, state = opt.update(p, g, state)
        moves.append(float(backend.to_numpy(p["x"])[0] - backend.to_numpy(new["x"])[0]))
        p = new
    assert moves == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert [opt.learning_rate(t) for t in range(5)] == moves


# Specs


@pytest.mark.parametrize("opt", ALL_OPTIMIZERS + [optim.AdamW(), optim.Adam()], ids=repr)
def test_spec_round_trip(opt: optim.Optimizer) -> None:
    spec = opt.to_spec()
    assert spec["name"] == type(opt).__name__
    wire = msgpack.unpackb(msgpack.packb(spec))
    assert wire == spec
    again = optim.from_spec(wire)
    assert again == opt and type(again) is type(opt)
    assert again.to_spec() == spec


def test_schedule_spec_round_trip() -> None:
    for sched in SCHEDULES.values():
        spec = msgpack.unpackb(msgpack.packb(sched.to_spec()))
        assert optim.schedule_from_spec(spec) == sched


def test_from_spec_errors() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'Lion'.*'SGD'"):
        optim.from_spec({"name": "Lion", "lr": 1.0})
    with pytest.raises(ValueError, match="bad SGD spec.*betas"):
        optim.from_spec({"name": "SGD", "betas": [0.9, 0.99]})
    with pytest.raises(ValueError, match="dict with a 'name' key"):
        optim.from_spec({"lr": 0.1})
    with pytest.raises(ValueError, match="cannot import the optimizer"):
        optim.from_spec({"name": "no_such_module_xyz:Opt"})
    with pytest.raises(ValueError, match="not a Optimizer subclass"):
        optim.from_spec({"name": "asyncnn.optim:StepLR"})
    with pytest.raises(ValueError, match="unknown schedule 'Exp'"):
        optim.from_spec({"name": "SGD", "lr": {"name": "Exp"}})


# Bad hyperparameters and bad inputs


BAD = [
    (optim.SGD, {"lr": -0.1}, ValueError, "invalid learning rate lr=-0.1"),
    (optim.SGD, {"lr": float("nan")}, ValueError, "invalid learning rate"),
    (optim.SGD, {"lr": "0.1"}, TypeError, "lr must be a float or a schedule"),
    (optim.SGD, {"momentum": -0.5}, ValueError, "invalid momentum value -0.5"),
    (optim.SGD, {"weight_decay": -1}, ValueError, "invalid weight_decay value -1"),
    (optim.SGD, {"nesterov": True}, ValueError, "Nesterov momentum requires a momentum"),
    (optim.SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "zero damp"),
    (optim.SGD, {"clip_norm": 0.0}, ValueError, "clip_norm must be > 0"),
    (optim.Adam, {"lr": -1e-3}, ValueError, "invalid learning rate"),
    (optim.Adam, {"betas": (1.0, 0.999)}, ValueError, "invalid beta parameter at index 0: 1.0"),
    (optim.Adam, {"betas": (0.9, -0.1)}, ValueError, "invalid beta parameter at index 1"),
    (optim.Adam, {"betas": 0.9}, TypeError, "betas must be a pair"),
    (optim.Adam, {"eps": -1e-8}, ValueError, "invalid eps value"),
    (optim.AdamW, {"weight_decay": -0.01}, ValueError, "AdamW: invalid weight_decay"),
    (optim.AdamW, {"amsgrad": 1}, TypeError, "amsgrad must be a bool"),
    (optim.AdamW, {"clip_norm": "big"}, TypeError, "clip_norm must be a real number"),
    (optim.StepLR, {"lr": 0.1, "step_size": 0}, ValueError, "step_size must be a positive"),
    (optim.StepLR, {"lr": 0.1, "step_size": 2, "gamma": -1}, ValueError, "gamma must be >= 0"),
    (optim.CosineAnnealing, {"lr": 0.1, "total_steps": 1.5}, ValueError, "total_steps"),
    (optim.CosineAnnealing, {"lr": 0.1, "total_steps": 9, "min_lr": 0.2}, ValueError, "min_lr"),
    (optim.LinearWarmup, {"schedule": -1.0, "warmup_steps": 3}, ValueError, "learning rate"),
    (
        optim.LinearWarmup,
        {"schedule": 0.1, "warmup_steps": 3, "start_factor": 2},
        ValueError,
        "0, 1",
    ),
]


@pytest.mark.parametrize(("cls", "kw", "exc", "match"), BAD, ids=[b[3][:30] for b in BAD])
def test_bad_hyperparameters(cls: type, kw: dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        cls(**kw)


def test_bad_update_inputs(backend: Backend) -> None:
    p = {"w": backend.asarray(np.zeros((2, 3), np.float32))}
    opt = optim.SGD(lr=0.1, momentum=0.9)
    state = opt.init(p)
    with pytest.raises(ValueError, match="grads have structure"):
        opt.update(p, {"v": p["w"]}, state)
    with pytest.raises(ValueError, match=r"shape \(3, 2\), but its parameter has shape \(2, 3\)"):
        opt.update(p, {"w": backend.asarray(np.zeros((3, 2), np.float32))}, state)
    with pytest.raises(TypeError, match=r"is float64, but its parameter is float32.*astype"):
        opt.update(p, {"w": backend.asarray(np.zeros((2, 3)))}, state)
    with pytest.raises(ValueError, match="is None"):
        opt.update(p, {"w": None}, state)
    with pytest.raises(ValueError, match=r"keys \['momentum_buffer', 'step'\].*got \['step'\]"):
        opt.update(p, p, optim.SGD().init(p))
    with pytest.raises(ValueError, match="was the state made for other parameters"):
        opt.update(p, p, {"step": 1, "momentum_buffer": [p["w"]]})
    with pytest.raises(ValueError, match="int >= 0"):
        opt.update(p, p, {"step": -1, "momentum_buffer": p})


BAD_LEAVES = [
    ("int", lambda: np.ones(3, np.int64), "is int64; only float16/32/64 and bfloat16 arrays"),
    ("bool", lambda: np.ones(3, bool), "is bool; only float"),
    ("complex", lambda: np.ones(3, np.complex128), "is complex128; only float"),
    ("python float", lambda: 1.5, "is float, not an array"),
]


@pytest.mark.parametrize(("kind", "make", "match"), BAD_LEAVES, ids=[b[0] for b in BAD_LEAVES])
@pytest.mark.parametrize("opt", ALL_OPTIMIZERS[:4], ids=repr)
def test_leaves_that_are_not_float_arrays_are_refused(
    opt: optim.Optimizer, kind: str, make: Any, match: str
) -> None:
    # they failed deep in a ufunc, or (complex) Adam computed g * g for |g|^2 without a word
    with pytest.raises(TypeError, match=r"update: parameter leaf 0 of \[\*\] " + match):
        opt.update([make()], [make()], opt.init([np.ones(3)]))
    # an int gradient was clipped to zeros
    with pytest.raises(TypeError, match=r"clip_grad_norm: gradient leaf 0 of \[\*\] " + match):
        optim.clip_grad_norm([make()], 1.0)


@pytest.mark.parametrize(
    "opt",
    [optim.SGD(momentum=0.9), optim.Adam(), optim.AdamW(amsgrad=True)],
    ids=lambda o: type(o).__name__,
)
def test_state_made_for_other_parameters_is_refused(backend: Backend, opt: optim.Optimizer) -> None:
    # same structure, other shapes or dtypes: broadcasting used to reshape the parameters or
    # promote float32 ones to float64 without a word
    p = {"w": backend.asarray(np.zeros(3, np.float32))}
    g = {"w": backend.asarray(np.ones(3, np.float32))}
    name = type(opt).__name__
    wider = dict(opt.init({"w": backend.asarray(np.zeros((2, 3), np.float32))}), step=1)
    with pytest.raises(ValueError, match=rf"{name}.update: state\[.*shape \(2, 3\), but its "):
        opt.update(p, g, wider)
    f64 = dict(opt.init({"w": backend.asarray(np.zeros(3))}), step=1)
    with pytest.raises(TypeError, match=rf"{name}.update: state\[.*float64, but its parameter is "):
        opt.update(p, g, f64)
    missing = dict(opt.init(p), step=1)
    missing[opt.buffer_names()[0]] = {"w": None}
    with pytest.raises(ValueError, match="is None.*other parameters"):
        opt.update(p, g, missing)


@dataclass(frozen=True)
class _LinearDecay(optim.Schedule):
    """A user schedule that forgets to stop at zero."""

    lr: float
    total_steps: int

    def __call__(self, step: int) -> float:
        return self.lr * (1.0 - step / self.total_steps)


def test_a_schedule_giving_a_negative_rate_is_an_error(backend: Backend) -> None:
    opt = optim.SGD(lr=_LinearDecay(1.0, 2))
    p = {"w": backend.asarray(np.zeros(2))}
    state = opt.init(p)
    for _ in range(3):  # rates 1, 0.5, 0
        p, state = opt.update(p, p, state)
    with pytest.raises(ValueError, match=r"_LinearDecay.*-0.5 for step 3.*>= 0"):
        opt.update(p, p, state)


def test_public_namespace() -> None:
    for name in optim.__all__:
        assert getattr(optim, name) is not None
    public = {n for n in vars(optim) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(optim.__all__)


# torch.optim as a second reference


def _torch_run(
    backend: Backend, make: Any, params: Any, grads: list[Any], dtype: str, sched: Any = None
) -> list[np.ndarray]:
    torch = pytest.importorskip("torch")
    leaves = [torch.tensor(np.asarray(x, dtype=dtype)) for x in tree_leaves(params)]
    for t in leaves:
        t.requires_grad_(True)
    opt = make(leaves)
    scheduler = sched(opt) if sched is not None else None
    clip = getattr(opt, "_asyncnn_clip", None)
    for grads_t in grads:
        for t, g in zip(leaves, tree_leaves(grads_t), strict=True):
            t.grad = torch.tensor(np.asarray(g, dtype=dtype))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(leaves, clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return [t.detach().numpy() for t in leaves]


def _torch_opt(kind: str, kw: dict[str, Any]) -> Any:
    torch = pytest.importorskip("torch")
    kw = dict(kw)
    clip = kw.pop("clip_norm", None)
    kw.pop("lr_schedule", None)
    cls = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[kind]

    def make(leaves: list[Any]) -> Any:
        opt = cls(leaves, **kw)
        opt._asyncnn_clip = clip
        return opt

    return make


TORCH_CASES = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
    ("SGD", {"lr": 0.2, "clip_norm": 1.0}),
    ("Adam", {"lr": 0.05, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.05, "amsgrad": True, "betas": (0.8, 0.95), "eps": 1e-4}),
    ("AdamW", {"lr": 0.05, "weight_decay": 0.1, "clip_norm": 2.0}),
    ("AdamW", {"lr": 0.05, "amsgrad": True}),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("kind", "kw"), TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch(backend: Backend, kind: str, kw: dict[str, Any], dtype: str) -> None:
    params, grads = _problem(5)
    expected = _torch_run(backend, _torch_opt(kind, kw), params, grads, dtype)
    got = _host(backend, _run(getattr(optim, kind)(**kw), backend, params, grads, dtype))
    tol = 1e-12 if dtype == "float64" else 2e-6
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _torch_schedulers() -> list[tuple[str, Any, Any]]:
    torch = pytest.importorskip("torch")
    sch = torch.optim.lr_scheduler
    return [
        ("step", optim.StepLR(0.1, step_size=2, gamma=0.3), lambda o: sch.StepLR(o, 2, 0.3)),
        (
            "cosine",
            optim.CosineAnnealing(0.1, total_steps=5, min_lr=0.01),
            lambda o: sch.CosineAnnealingLR(o, T_max=5, eta_min=0.01),
        ),
        (
            "linear",
            optim.LinearWarmup(0.1, warmup_steps=3, start_factor=0.25),
            lambda o: sch.LinearLR(o, start_factor=0.25, total_iters=3),
        ),
        (
            "warmup+step",
            optim.LinearWarmup(optim.StepLR(0.1, 2, 0.5), warmup_steps=3, start_factor=0.2),
            lambda o: sch.ChainedScheduler(
                [sch.LinearLR(o, start_factor=0.2, total_iters=3), sch.StepLR(o, 2, 0.5)]
            ),
        ),
        (
            "warmup+cosine",
            optim.LinearWarmup(optim.CosineAnnealing(0.1, 5), warmup_steps=2, start_factor=0.5),
            lambda o: sch.ChainedScheduler(
                [sch.LinearLR(o, start_factor=0.5, total_iters=2), sch.CosineAnnealingLR(o, 5)]
            ),
        ),
    ]


@pytest.mark.parametrize("index", range(5))
def test_schedules_match_torch(backend: Backend, index: int) -> None:
    name, ours, make_sched = _torch_schedulers()[index]
    params, grads = _problem(6)
    make = _torch_opt("SGD", {"lr": 0.1, "momentum": 0.9})
    expected = _torch_run(backend, make, params, grads, "float64", sched=make_sched)
    got = _host(backend, _run(optim.SGD(lr=ours, momentum=0.9), backend, params, grads, "f8"))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    "opt",
    [
        optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
        optim.Adam(lr=1e-2, amsgrad=True),
        optim.AdamW(lr=1e-2, weight_decay=0.1),
    ],  # fmt: skip
    ids=lambda o: type(o).__name__,
)
def test_a_large_leaf_update_cut_over_a_team_is_bit_identical(opt):
    from asyncnn.backends import ComputeTeam, using_team

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(512, 300)), "b": rng.normal(size=(300,))}
    grads = {"w": rng.normal(size=(512, 300)), "b": rng.normal(size=(300,))}
    state = opt.init(params)
    whole = opt.update(params, grads, state)
    whole = opt.update(whole[0], grads, whole[1])
    with ComputeTeam(2, part_elements=1024) as team, using_team(team):
        assert len(team.row_bounds(512, 512 * 300 * 4)) > 2  # the update is cut
        cut = opt.update(params, grads, state)
        cut = opt.update(cut[0], grads, cut[1])
    for a, b in zip(tree_leaves(whole), tree_leaves(cut), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


NON_FINITE_CASES = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adam", {"lr": 0.1, "weight_decay": 0.1, "amsgrad": True}),
    ("Adam", {"lr": 0.1, "eps": 0.0}),  # a zero gradient divides 0 by 0
    ("AdamW", {"lr": 0.1, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize(("kind", "kw"), NON_FINITE_CASES, ids=[c[0] for c in NON_FINITE_CASES])
def test_non_finite_gradients_go_through_as_in_torch_without_a_warning(
    backend: Backend, kind: str, kw: dict[str, Any], dtype: str
) -> None:
    """inf and NaN gradients give torch's inf and NaN (inf - inf, inf / inf, a square that
    overflows), and numpy warns of none of it: with warnings as errors the update runs."""
    inf, nan = math.inf, math.nan
    # a gradient whose square overflows (in float16: its second moment)
    big = {"float64": 1e200, "float32": 1e30, "float16": 6e4}[dtype]
    params = {"w": np.array([1.0, 2.0, 3.0, 4.0, -1.0, 0.5])}
    grads = [
        {"w": np.array([inf, -inf, nan, 1.0, big, 0.0])},
        {"w": np.array([1.0, 1.0, 1.0, -inf, 1.0, 0.0])},  # meets the inf buffers
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = _host(backend, _run(getattr(optim, kind)(**kw), backend, params, grads, dtype))
    assert not np.isfinite(got[:4]).all()  # the case is not vacuous
    if dtype == "float16":  # (its state is rounded to 16 bits: torch's float32 run differs)
        (want,) = _host(backend, _run(getattr(optim, kind)(**kw), backend, params, grads, "f4"))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        return
    (want,) = _torch_run(backend, _torch_opt(kind, kw), params, grads, dtype)
    tol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)  # the same inf and NaN too


def test_a_non_finite_gradient_cut_over_a_team_warns_of_nothing() -> None:
    # numpy's error state is per thread: the team's threads must set it too
    from asyncnn.backends import ComputeTeam, using_team

    opt = optim.Adam(lr=1e-2)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(512, 300))}
    g = rng.normal(size=(512, 300))
    g[0, 0], g[400, 5], g[300, 7] = math.inf, -math.inf, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole, _ = opt.update(params, {"w": g}, opt.init(params))
        with ComputeTeam(2, part_elements=1024) as team, using_team(team):
            assert len(team.row_bounds(512, 512 * 300 * 4)) > 2  # the update is cut
            cut, _ = opt.update(params, {"w": g}, opt.init(params))
    np.testing.assert_array_equal(cut["w"], whole["w"])
    assert np.isnan(cut["w"][[0, 400, 300], [0, 5, 7]]).all()
