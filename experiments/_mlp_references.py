"""``bench_parallel.py``'s references for the MLP: the step written by hand in numpy, whole
(``_numpy_mlp.py``'s, BLAS on every core) and with its products and large elementwise passes
split over a :class:`~asyncnn.backends.ComputeTeam`; asyncnn's plain ``value_and_grad`` loop,
without and with the team; PyTorch eager on every core, when torch is installed. Each in
samples/s of SGD."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

import _common
import _numpy_mlp
import numpy as np

from asyncnn import nn, optim
from asyncnn.backends import ComputeTeam, elementwise, matmul, using_team


def cores() -> int:
    return len(os.sched_getaffinity(0))


def data(sizes: list[int], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, sizes[0]), dtype=np.float32), "y": rng.integers(0, 10, n)}


def relu_grad(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    return g * (h > 0)


def sgd_update(w: np.ndarray, gw: np.ndarray, lr: float) -> np.ndarray:
    return w - lr * gw


def numpy_step_on_team(
    params: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray, lr: float
) -> float:
    """``_numpy_mlp.sgd_step`` with its products and large elementwise passes (bias, ReLU, the
    ReLU gradient, the weight update) through the backend's ``matmul``/``elementwise``."""
    acts = [x]
    h = x
    for i, (w, b) in enumerate(params):
        h = elementwise(np.add, matmul(h, w), b)
        if i < len(params) - 1:
            h = elementwise(np.maximum, h, 0)
        acts.append(h)
    loss, g = _numpy_mlp.softmax_cross_entropy(acts[-1], y)
    for i in range(len(params) - 1, -1, -1):
        w, b = params[i]
        gw = matmul(acts[i].T, g)
        gb = g.sum(axis=0)
        if i > 0:
            g = elementwise(relu_grad, matmul(g, w.T), acts[i])
        params[i] = (elementwise(sgd_update, w, gw, lr), b - lr * gb)
    return loss


def _median_rate(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def by_hand(sizes: list[int], batch: int, steps: int, team: ComputeTeam | None) -> float:
    d = data(sizes, batch)
    params = _numpy_mlp.init(sizes)
    if team is None:
        spc = _common.seconds_per_call(
            lambda: _numpy_mlp.sgd_step(params, d["x"], d["y"], 0.01), steps
        )
    else:
        with using_team(team):
            spc = _common.seconds_per_call(
                lambda: numpy_step_on_team(params, d["x"], d["y"], 0.01), steps
            )
    return batch / spc


def value_and_grad_loop(
    sizes: list[int], batch: int, steps: int, team: ComputeTeam | None
) -> float:
    d = data(sizes, batch)
    model = nn.Sequential(*_common.mlp_modules(sizes))
    step = _common.plain_step(model, nn.CrossEntropyLoss(), optim.SGD(lr=0.01))
    with using_team(team):
        return batch / _common.seconds_per_call(lambda: step(d["x"], d["y"]), steps)


def torch_eager(sizes: list[int], batch: int, steps: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(cores())
    layers: list[Any] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    d = data(sizes, batch)
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return batch / _common.seconds_per_call(step, steps)
