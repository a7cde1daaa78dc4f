"""torch.optim and its schedulers as a second reference, non-finite gradients included."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest

from asyncnn import optim
from asyncnn.backends import Backend

from _optim_cases import _host, _problem, _run, _torch_steps


def _torch_run(
    backend: Backend, make: Any, params: Any, grads: list[Any], dtype: str, sched: Any = None
) -> list[np.ndarray]:
    leaves, _ = _torch_steps(make, params, grads, dtype, sched)
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
