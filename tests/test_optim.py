"""Optimizers and schedules: trajectories against float64 formulas, dtypes, state, and updates
cut over a team."""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import threading
import warnings
from inspect import ismodule
from typing import Any, cast

import numpy as np
import pytest

from asyncnn import optim
from asyncnn._math._optim import state_dtype
from asyncnn._math._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from asyncnn.backends import Backend, get_backend

from _optim_cases import ALL_OPTIMIZERS, SCHEDULES, _half, _host, _problem, _run, _to

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


SGD_CASES: list[dict[str, Any]] = [
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


ADAM_CASES: list[dict[str, Any]] = [
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


def _cast(tree: Any, dtype: Any) -> Any:
    return tree_map(lambda x: x.astype(dtype) if hasattr(x, "dtype") else x, tree)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("opt", ALL_OPTIMIZERS, ids=repr)
def test_a_16_bit_update_is_the_float32_update_rounded_once(
    backend: Backend, opt: optim.Optimizer, name: str
) -> None:
    # as the GPU kernels compute it; numpy in 16 bits rounded every intermediate (and eps=1e-8
    # to 0 in float16, beta2=0.999 to 1 in bfloat16); the buffers rounded to the dtype they are
    # kept in (float32 for Adam's moments of float16)
    dt = _half(backend, name)
    keep = state_dtype(opt, dt)
    assert (keep == np.float32) == (name == "float16" and isinstance(opt, optim.Adam))
    params, grads = _problem(7)
    p = q = _to(backend, params, dt)
    state = expected_state = opt.init(p)
    # clipping is of the 16-bit gradients
    unclipped = dataclasses.replace(cast(Any, opt), clip_norm=None)
    for g_host in grads:
        g = _to(backend, g_host, dt)
        p, state = opt.update(p, g, state)
        if opt.clip_norm is not None:
            g = optim.clip_grad_norm(g, opt.clip_norm)[0]
        wide_p, wide_state = unclipped.update(*_cast((q, g, expected_state), np.float32))
        q, expected_state = _cast(wide_p, dt), _cast(wide_state, keep)
    for a, b in zip(tree_leaves((p, state)), tree_leaves((q, expected_state)), strict=True):
        assert getattr(a, "dtype", None) == getattr(b, "dtype", None)
        # (bit for bit: the bytes of 16-bit and float32 leaves, 0-d ones too)
        np.testing.assert_array_equal(np.asarray(backend.to_numpy(a)).tobytes()
                                      if hasattr(a, "dtype") else a,
                                      np.asarray(backend.to_numpy(b)).tobytes()
                                      if hasattr(b, "dtype") else b)  # fmt: skip


def test_float16_adam_keeps_its_eps(backend: Backend) -> None:
    # g = 1e-4: g * g underflows to 0 in float16, as eps=1e-8 does: the update divided by 0
    opt = optim.Adam(lr=1e-2)
    p = {"w": backend.asarray(np.zeros(3, np.float16))}
    g = {"w": backend.asarray(np.full(3, 1e-4, np.float16))}
    new, _ = opt.update(p, g, opt.init(p))
    # float64: m_hat = g, sqrt(v_hat) = |g|, so the first step is lr * g / (|g| + eps) ~ lr
    np.testing.assert_allclose(backend.to_numpy(new["w"]), -1e-2 / (1 + 1e-4), rtol=1e-3)


_FLOAT16_ADAMS = [
    optim.Adam(lr=1e-3),
    optim.Adam(lr=1e-3, weight_decay=0.1, amsgrad=True),
    optim.AdamW(lr=1e-3, amsgrad=True),
]


@pytest.mark.parametrize("opt", _FLOAT16_ADAMS, ids=repr)
def test_float16_adam_keeps_its_moments_in_float32(backend: Backend, opt: optim.Optimizer) -> None:
    # (1 - beta2) * g**2 underflows float16 for |g| < ~5e-3, the usual gradient size: stored in
    # float16 the second moment was 0, and the next step with a small or no gradient (an
    # embedding row not in the batch) divided by eps=1e-8, moving a weight by up to 1e5 * lr
    p = {"w": backend.asarray(np.zeros(3, np.float16))}
    state = opt.init(p)
    for name in opt.buffer_names():
        assert state[name]["w"].dtype == np.float32, name
    for g in ([1e-3, 1e-2, 0.1], [0.0, 0.0, 0.0]):
        p, state = opt.update(p, {"w": backend.asarray(np.array(g, np.float16))}, state)
        assert p["w"].dtype == np.float16
        for name in opt.buffer_names():
            assert state[name]["w"].dtype == np.float32, name
    got = np.asarray(backend.to_numpy(p["w"]), np.float64)
    # the float32 update, the parameter rounded to float16 once a step
    q = {"w": np.zeros(3, np.float32)}
    wide = opt.init(q)
    for g in ([1e-3, 1e-2, 0.1], [0.0, 0.0, 0.0]):
        q, wide = opt.update(q, {"w": np.array(g, np.float16).astype(np.float32)}, wide)
        q = {"w": q["w"].astype(np.float16).astype(np.float32)}
    np.testing.assert_array_equal(got, q["w"])
    assert np.abs(got).max() < 3e-3  # two steps of about lr each (it was 47.4)


@pytest.mark.parametrize("opt", _FLOAT16_ADAMS, ids=repr)
def test_float16_adam_takes_a_float16_state_and_widens_it(
    backend: Backend, opt: optim.Optimizer
) -> None:
    # a state of an asyncnn that kept float16 moments (an older checkpoint or trace, or one cast
    # to the run's dtype) is still updated: in float32, its buffers float32 from then on
    params, grads = _problem(3)
    p = _to(backend, params, "float16")
    old = _to(backend, {"step": 0, **{n: params for n in opt.buffer_names()}}, "float16")
    old = {**old, "step": 2}
    old = tree_map(lambda x: abs(x) if hasattr(x, "dtype") else x, old)  # (second moments >= 0)
    new_p, new_s = opt.update(p, _to(backend, grads[0], "float16"), old)
    wide_s = {**_cast(old, np.float32), "step": 2}
    want_p, want_s = opt.update(_cast(p, np.float32), _cast(_to(backend, grads[0], "float16"),
                                                            np.float32), wide_s)  # fmt: skip
    for a, b in zip(tree_leaves(new_p), tree_leaves(want_p), strict=True):
        assert a.dtype == np.float16
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b.astype(np.float16)))
    assert new_s["step"] == 3
    for name in opt.buffer_names():
        for a, b in zip(tree_leaves(new_s[name]), tree_leaves(want_s[name]), strict=True):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


@pytest.mark.parametrize("name", ["float32", "float64", "bfloat16"])
def test_adam_keeps_its_moments_in_the_dtype_of_other_parameters(
    backend: Backend, name: str
) -> None:
    # only float16 (whose range is narrow) keeps them in float32: bfloat16 has float32's range,
    # and its state keeps torch's dtypes
    dt = _half(backend, name) if name == "bfloat16" else np.dtype(name)
    opt = optim.Adam(amsgrad=True)
    p = {"w": backend.asarray(np.ones(3, np.float32)).astype(dt)}
    p, state = opt.update(p, {"w": p["w"]}, opt.init(p))
    for buf in opt.buffer_names():
        assert state[buf]["w"].dtype == dt


def test_sgd_keeps_its_float16_momentum_in_float16(backend: Backend) -> None:
    # a momentum buffer sums gradients (it is never smaller than them, nor divided by): float16
    # holds it as well as the gradients themselves, as torch does
    opt = optim.SGD(lr=0.1, momentum=0.9)
    p = {"w": backend.asarray(np.zeros(3, np.float16))}
    p, state = opt.update(p, {"w": backend.asarray(np.full(3, 1e-5, np.float16))}, opt.init(p))
    assert state["momentum_buffer"]["w"].dtype == np.float16


NUMPY = get_backend("numpy")


class _OnDevice(np.ndarray):
    """A numpy array standing in for a GPU's (not ``np.ndarray`` itself: no numpy fast path)."""


class _OneTypeKernels:
    """A stand-in for the GPU's fused optimizer kernels (``backends/_fused.py``): one type for
    every array of a launch, as the real ones (``T``), 16-bit values computed in float32 and
    rounded once on the store. Records the dtype of each leaf launched."""

    def __init__(self) -> None:
        self.launched: list[np.dtype] = []

    def adam_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float, betas: Any,
                  eps: float, weight_decay: float, amsgrad: bool, decoupled: bool) -> Any:  # fmt: skip
        arrays = [np.asarray(a) for a in (p, g, *buffers)]
        assert len({a.dtype for a in arrays}) == 1, [a.dtype for a in arrays]
        cls = optim.AdamW if decoupled else optim.Adam
        opt = cls(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        c = np.float32 if p.dtype.itemsize == 2 else p.dtype
        wide = [a.astype(c) for a in arrays]
        new_p, new_bs = opt._update_array(np, wide[0], wide[1], tuple(wide[2:]), step, lr)
        self.launched.append(p.dtype)
        out = [a.astype(p.dtype).view(_OnDevice) for a in (new_p, *new_bs)]
        return out[0], tuple(out[1:])

    def adam_many(self, ps: Any, gs: Any, buffers: Any, *rest: Any) -> Any:
        new_ps: list[Any] = []
        new_bufs: list[list[Any]] = [[] for _ in buffers]
        for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
            new_p, new_bs = self.adam_leaf(p, g, tuple(b[i] for b in buffers), *rest)
            new_ps.append(new_p)
            for out, b in zip(new_bufs, new_bs, strict=True):
                out.append(b)
        return new_ps, new_bufs


@pytest.mark.parametrize("opt", _FLOAT16_ADAMS, ids=repr)
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_a_backend_whose_kernels_take_one_type_updates_float16_adam_in_float32(
    monkeypatch: pytest.MonkeyPatch, opt: optim.Optimizer, dtype: str
) -> None:
    # the GPU's path (tests/test_gpu_dtypes.py runs it on cupy), on the CPU: a float16 leaf
    # with float32 moments is widened and updated by the float32 kernel, leaf by leaf, as the
    # CPU computes it; other leaves go to the kernels as they are; an older float16 state too
    from asyncnn._math import _optim_leaf

    dt = _half(NUMPY, dtype)
    kernels = _OneTypeKernels()

    class _Backend:
        @staticmethod
        def fused_kernels() -> _OneTypeKernels:
            return kernels

    monkeypatch.setattr(_optim_leaf, "backend_of", lambda *xs: _Backend)
    params, grads = _problem(5)
    host = _to(NUMPY, params, dt)
    dev = tree_map(lambda a: a.view(_OnDevice), host)
    host_state, dev_state = opt.init(host), opt.init(dev)
    old = dict(host_state, step=1)  # (as an asyncnn before kept it: in the parameter's dtype)
    for name in opt.buffer_names():
        old[name] = tree_map(lambda a: np.abs(a).astype(dt), params)
    old_dev = {k: v if k == "step" else tree_map(lambda a: a.view(_OnDevice), v)
               for k, v in old.items()}  # fmt: skip
    for start_host, start_dev in ((host_state, dev_state), (old, old_dev)):
        h, hs, d, ds = host, start_host, dev, start_dev
        for g in grads:
            h, hs = opt.update(h, _to(NUMPY, g, dt), hs)
            d, ds = opt.update(d, tree_map(lambda a: a.view(_OnDevice), _to(NUMPY, g, dt)), ds)
        for a, b in zip(tree_leaves((h, hs)), tree_leaves((d, ds)), strict=True):
            if hasattr(a, "dtype"):
                assert a.dtype == b.dtype
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
            else:
                assert a == b
        for name in opt.buffer_names():
            want = np.float32 if dtype == "float16" else dt
            assert {leaf.dtype for leaf in tree_leaves(ds[name])} == {np.dtype(want)}
    assert set(kernels.launched) == {np.dtype(np.float32) if dtype == "float16" else dt}


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


def _spy_on_parts(monkeypatch: pytest.MonkeyPatch, team: Any) -> list[tuple[int, set[int]]]:
    """Records each ``team.run_parts`` call as ``(parts, ids of the threads that ran them)``.

    The first two parts of a call wait for each other (a barrier, not a sleep): they must run
    side by side, so one of them runs on a team's worker however fast the caller takes parts.
    """
    calls: list[tuple[int, set[int]]] = []
    real = team.run_parts

    def run_parts(fn: Any, parts: int) -> None:
        threads: set[int] = set()
        calls.append((parts, threads))
        both = threading.Barrier(2, timeout=30)

        def part(i: int) -> None:
            threads.add(threading.get_ident())
            if parts > 1 and i < 2:
                both.wait()
            fn(i)

        real(part, parts)

    monkeypatch.setattr(team, "run_parts", run_parts)
    return calls


def _assert_cut(calls: list[tuple[int, set[int]]], updates: int) -> None:
    # one split per update, of the large leaf only (the small one is updated whole), its parts
    # run on two threads: the update was cut, not just planned to be
    assert [parts > 1 for parts, _ in calls] == [True] * updates, calls
    assert all(len(threads) >= 2 for _, threads in calls), calls


@pytest.mark.parametrize(
    "opt",
    [
        optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
        optim.Adam(lr=1e-2, amsgrad=True),
        optim.AdamW(lr=1e-2, weight_decay=0.1),
    ],  # fmt: skip
    ids=lambda o: type(o).__name__,
)
def test_a_large_leaf_update_cut_over_a_team_is_bit_identical(
    opt: optim.Optimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncnn.backends import ComputeTeam, using_team

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(512, 300)), "b": rng.normal(size=(300,))}
    grads = {"w": rng.normal(size=(512, 300)), "b": rng.normal(size=(300,))}
    state = opt.init(params)
    whole = opt.update(params, grads, state)
    whole = opt.update(whole[0], grads, whole[1])
    with ComputeTeam(2, part_elements=1024) as team, using_team(team):
        assert len(team.row_bounds(512, 512 * 300 * 4)) > 2  # the update is cut
        calls = _spy_on_parts(monkeypatch, team)
        cut = opt.update(params, grads, state)
        cut = opt.update(cut[0], grads, cut[1])
    _assert_cut(calls, 2)
    for a, b in zip(tree_leaves(whole), tree_leaves(cut), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_non_finite_gradient_cut_over_a_team_warns_of_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
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
            calls = _spy_on_parts(monkeypatch, team)
            cut, _ = opt.update(params, {"w": g}, opt.init(params))
    _assert_cut(calls, 1)
    np.testing.assert_array_equal(cut["w"], whole["w"])
    assert np.isnan(cut["w"][[0, 400, 300], [0, 5, 7]]).all()


#: the modules whose optimizers call the one-pass update (SGD's; Adam's and AdamW's)
_OPTIMIZER_MODULES = [
    importlib.import_module("asyncnn._math._optim"),
    importlib.import_module("asyncnn._math._optim_adam"),
]


def _spy_on_numpy_many(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each update from now on, whether the one-pass path took its leaves."""
    taken: list[bool] = []
    real = _OPTIMIZER_MODULES[0]._numpy_many

    def spy(*args: Any) -> Any:
        out = real(*args)
        taken.append(out is not None)
        return out

    for module in _OPTIMIZER_MODULES:
        monkeypatch.setattr(module, "_numpy_many", spy)
    return taken


@pytest.mark.parametrize("opt", ALL_OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_leaves_updated_at_once_equal_their_update_leaf_by_leaf(
    opt: optim.Optimizer, dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # numpy leaves take one pass over every leaf under one error state (_numpy_many); the
    # leaf-by-leaf path is the reference, bit for bit, non-finite gradients included and
    # warning of nothing in either
    rng = np.random.default_rng(5)
    params = [{"w": rng.normal(size=(6, 4)).astype(dtype), "b": rng.normal(size=4).astype(dtype)},
              {}, {"w": rng.normal(size=(4, 3)).astype(dtype)}]  # fmt: skip
    grads = [tree_map(lambda x: rng.normal(size=x.shape).astype(dtype), p) for p in params]
    grads[0]["w"][1, 2], grads[2]["w"][0, 0] = math.inf, math.nan

    def three_steps() -> Any:
        p, s = params, opt.init(params)
        for _ in range(3):
            p, s = opt.update(p, grads, s)
        return p, s

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        taken = _spy_on_numpy_many(monkeypatch)
        at_once = three_steps()
        for module in _OPTIMIZER_MODULES:
            monkeypatch.setattr(module, "_numpy_many", lambda *args: None)
        one_by_one = three_steps()
    assert taken == [True] * 3  # every update went through it
    for a, b in zip(tree_leaves(at_once), tree_leaves(one_by_one), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype


@pytest.mark.parametrize(
    "a",
    [np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(6.0).reshape(3, 2).T,
     np.ones(3, np.float16), np.array(2.5, np.float32), np.ones(4, ">f4"),
     np.ones((0, 3), np.float32)],
    ids=["float32", "transposed-float64", "float16", "0-d", "big-endian", "empty"],
)  # fmt: skip
@pytest.mark.parametrize("b", [0.1, -3.0, 1e300, math.inf], ids=str)
def test_a_fresh_result_is_the_out_form_bit_for_bit(a: np.ndarray, b: float) -> None:
    # _fresh skips out= on numpy arrays where the ufunc gives a's dtype itself; its result must
    # be what out=empty_like(a) gives: the same dtype, bytes and (0-d) an array, not a scalar
    from asyncnn._math._optim_leaf import _fresh

    with np.errstate(over="ignore", invalid="ignore"):
        got = _fresh(np, np.multiply, a, b)
        want = np.multiply(a, b, out=np.empty_like(a))
    assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def test_a_gradient_of_an_equal_but_other_dtype_object_is_accepted() -> None:
    # the gradient check's fast path asks for the very dtype object; an equal dtype made apart
    # (a byte order spelled out, a dtype with metadata) must still pass through its full check
    p = {"w": np.ones(3, np.float32)}
    g = {"w": np.ones(3, dtype=np.dtype("float32", metadata={"made": "apart"}))}
    assert g["w"].dtype is not p["w"].dtype and g["w"].dtype == p["w"].dtype
    opt = optim.SGD(lr=0.5)
    new, _ = opt.update(p, g, opt.init(p))
    np.testing.assert_array_equal(new["w"], np.full(3, 0.5, np.float32))
    with pytest.raises(TypeError, match="gradient leaf 0 .* is float64"):
        opt.update(p, {"w": np.ones(3)}, opt.init(p))


def test_small_numpy_leaves_are_updated_at_once_under_a_team_and_large_ones_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a team current on the thread (an actor's update on a shared pool) cuts large leaves by
    # rows; where it would cut none, the leaves are updated at once there too
    from asyncnn.backends import ComputeTeam, using_team

    taken = _spy_on_numpy_many(monkeypatch)
    opt = optim.SGD(lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    small = {"w": rng.normal(size=(8, 8)), "b": rng.normal(size=8)}
    large = {"w": rng.normal(size=(512, 300)), "b": rng.normal(size=300)}
    whole = [opt.update(t, t, opt.init(t))[0] for t in (small, large)]
    with ComputeTeam(2, part_elements=1024) as team, using_team(team):
        cut = [opt.update(t, t, opt.init(t))[0] for t in (small, large)]
    assert taken == [True, True, True, False]
    for a, b in zip(tree_leaves(whole), tree_leaves(cut), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_optimizer_with_its_own_leaf_update_keeps_it_on_numpy_leaves() -> None:
    calls = []

    @dataclasses.dataclass(frozen=True)
    class Halved(optim.SGD):
        def update_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float) -> Any:
            calls.append(p.shape)
            return super().update_leaf(p, g * 0.5, buffers, step, lr)

    params = {"w": np.ones((2, 3)), "b": np.ones(3)}
    new, _ = Halved(lr=1.0).update(params, params, Halved(lr=1.0).init(params))
    assert calls == [(3,), (2, 3)]
    np.testing.assert_array_equal(new["w"], np.full((2, 3), 0.5))

    @dataclasses.dataclass(frozen=True)
    class Logged(optim.Adam):  # (the private per-leaf step, overridden: kept too)
        def _update_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float) -> Any:
            calls.append("leaf")
            return super()._update_leaf(p, g, buffers, step, lr)

    calls.clear()
    Logged(lr=1.0).update(params, params, Logged(lr=1.0).init(params))
    assert calls == ["leaf", "leaf"]


def test_public_namespace() -> None:
    # __all__ is the documented surface (docs/api/optim.md renders it): exactly the module's
    # public names, functions included, each once
    public = {n for n, v in vars(optim).items() if not n.startswith("_") and not ismodule(v)}
    assert len(set(optim.__all__)) == len(optim.__all__), optim.__all__
    assert public - set(optim.__all__) == set(), "public, but not in __all__"
    assert set(optim.__all__) - public == set(), "in __all__, but not defined"
    for name in optim.__all__:
        obj = getattr(optim, name)
        # the object defined under that name (not a stand-in or an alias), with a docstring of
        # its own rather than the signature a dataclass writes when there is none
        assert obj.__name__ == name and obj.__module__.startswith("asyncnn."), name
        assert getattr(sys.modules[obj.__module__], obj.__qualname__) is obj, name
        doc = obj.__doc__ or ""
        assert doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"


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


@dataclasses.dataclass(frozen=True)
class _LARS(optim.SGD):
    """A trust ratio of whole-leaf norms: an update that is not elementwise."""

    def update_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float) -> Any:
        # (norms as numpy's sums, not BLAS's, whose threads inside a team sum in another order)
        trust = float(np.sqrt((p * p).sum()) / (np.sqrt((g * g).sum()) + 1e-12))
        return super().update_leaf(p, g, buffers, step, lr * trust)


@dataclasses.dataclass(frozen=True)
class _Elementwise(optim.Adam):
    """Its own update_leaf, said to be elementwise in its own body."""

    elementwise_update = True

    def update_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float) -> Any:
        return super().update_leaf(p, g * 0.5, buffers, step, lr)


def test_a_subclass_with_its_own_update_leaf_is_not_elementwise_unless_it_says_so() -> None:
    # SGD and Adam say their updates are elementwise; a subclass's own update_leaf (LARS,
    # LAMB, gradient centralisation) inherited that, and was cut by rows over a team, each
    # part getting its own trust ratio, without a word
    assert optim.SGD.elementwise_update and optim.Adam.elementwise_update
    assert optim.AdamW.elementwise_update  # (no update_leaf of its own: still cut)
    assert _LARS.elementwise_update is False
    assert _Elementwise.elementwise_update is True

    @dataclasses.dataclass(frozen=True)
    class Heavier(_LARS):  # (inherits LARS's update_leaf and its answer)
        pass

    assert Heavier.elementwise_update is False

    class TrustRatio:  # a mixin's update_leaf, before SGD's in the MRO: not SGD's answer
        def update_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float) -> Any:
            trust = float(np.sqrt((p * p).sum()) / (np.sqrt((g * g).sum()) + 1e-12))
            return super().update_leaf(p, g, buffers, step, lr * trust)  # type: ignore[misc]

    @dataclasses.dataclass(frozen=True)
    class MixedLARS(TrustRatio, optim.SGD):
        pass

    assert MixedLARS.elementwise_update is False


def test_a_subclass_with_its_own_update_leaf_is_updated_whole_under_a_team(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncnn.backends import ComputeTeam, using_team

    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((512, 512))}
    g = {"w": rng.standard_normal((512, 512)) * np.linspace(0.1, 10, 512)[:, None]}
    opt = _LARS(lr=0.1)
    plain, _ = opt.update(p, g, opt.init(p))
    with ComputeTeam(4, part_elements=1000) as team, using_team(team):
        calls = _spy_on_parts(monkeypatch, team)
        whole, _ = opt.update(p, g, opt.init(p))
    assert calls == []  # not cut (it was: max |difference| 0.48)
    np.testing.assert_array_equal(whole["w"], plain["w"])
    # one that says its own update is elementwise is still cut, bit for bit
    ew = _Elementwise(lr=1e-2)
    plain, _ = ew.update(p, g, ew.init(p))
    with ComputeTeam(4, part_elements=1000) as team, using_team(team):
        calls = _spy_on_parts(monkeypatch, team)
        cut, _ = ew.update(p, g, ew.init(p))
    assert calls and calls[0][0] > 1
    np.testing.assert_array_equal(cut["w"], plain["w"])


def test_a_subclass_with_its_own_update_leaf_trains_in_a_trainer_as_in_the_plain_loop() -> None:
    # a Trainer's update runs on the shared pool's team whenever it is large: a 2048 x 2048
    # leaf was updated as row halves, each with its own trust ratio (max |difference| 2e-5
    # against a step of 8.5e-3)
    import asyncnn as ann
    from asyncnn import nn, policies

    rng = np.random.default_rng(0)
    d = 2048
    data = {"x": rng.standard_normal((64, d)), "y": rng.integers(0, 10, 64)}
    layers = [nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 10)]
    graph = ann.Graph.sequential(
        layers, loss=nn.CrossEntropyLoss(), stages=1, input_shape=(None, d)
    )
    tr = ann.Trainer(graph, optimizer=_LARS(lr=0.1), policy=policies.Sync(), seed=0,
                     dtype="float64")  # fmt: skip
    start = tr.params["stage0"]
    tr.fit(data, batch_size=64)
    ref, _, _ = ann.train_loop(
        nn.Sequential(*layers), nn.CrossEntropyLoss(), start, _LARS(lr=0.1), data, epochs=1,
        batch_size=64,
    )  # fmt: skip
    moved = np.abs(ref[0]["weight"] - start[0]["weight"]).max()
    assert moved > 1e-3
    np.testing.assert_allclose(tr.params["stage0"][0]["weight"], ref[0]["weight"], rtol=0,
                               atol=1e-9 * moved)  # fmt: skip
