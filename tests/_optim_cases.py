"""A problem (parameters and gradients), how to run an optimizer on it, and the optimizers and
schedules shared by tests/test_optim*.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from asyncnn import optim
from asyncnn._math._pytree import tree_leaves, tree_map
from asyncnn.backends import Backend

STEPS = 5


def _tree_of(rng: np.random.Generator, scale: float = 1.0) -> Any:
    return {
        "w": rng.normal(size=(3, 4)) * scale,
        "layers": [rng.normal(size=(5,)) * scale, {"b": rng.normal(size=(2, 2)) * scale}],
        "scalar": np.asarray(rng.normal() * scale),
    }


def _torch_steps(
    make: Any, params: Any, grads: list[Any], dtype: str, sched: Any = None
) -> tuple[list[Any], Any]:
    """torch's optimizer ``make(leaves)`` stepped over ``grads`` from ``params`` in float
    ``dtype`` (each step's gradients clipped first, as torch's ``clip_grad_norm_``, where the
    optimizer carries an ``_asyncnn_clip``; ``sched(opt)``'s scheduler stepped after each):
    the parameters' tensors and the optimizer."""
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
    return leaves, opt


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


SCHEDULES = {
    "step": optim.StepLR(0.1, step_size=2, gamma=0.5),
    "cosine": optim.CosineAnnealing(0.1, total_steps=4, min_lr=0.01),
    "warmup": optim.LinearWarmup(optim.CosineAnnealing(0.1, total_steps=6), warmup_steps=3),
}


ALL_OPTIMIZERS = [
    optim.SGD(lr=0.1),
    optim.SGD(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1, clip_norm=1.0),
    optim.SGD(lr=SCHEDULES["warmup"], momentum=0.9, nesterov=True, weight_decay=0.1),
    optim.Adam(lr=0.1, weight_decay=0.1, clip_norm=1.0),
    optim.Adam(lr=SCHEDULES["step"], amsgrad=True),
    optim.AdamW(lr=0.1, amsgrad=True, clip_norm=0.5),
]


def _half(backend: Backend, name: str) -> Any:
    if name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    return backend.dtype(name)
