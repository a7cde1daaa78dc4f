"""Plain (non-actor) references the runtime is checked against, written independently of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, optim
from asyncnn._math._pytree import tree_leaves
from asyncnn._runtime._run import init_state

#: the optimizers the equivalence tests run under, by name
OPTIMIZERS = {
    "sgd-momentum": lambda: optim.SGD(lr=0.1, momentum=0.9),
    "adam": lambda: optim.Adam(lr=0.01),
}


def classification_data(
    n: int, features: int = 5, classes: int = 3, seed: int = 0
) -> dict[str, np.ndarray]:
    """``n`` rows of normal features ``"x"`` and integer labels ``"y"``."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, features)), "y": rng.integers(0, classes, n)}


def minibatches(data: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """``data`` cut into consecutive minibatches of ``batch_size`` rows (the last may be short)."""
    n = len(data["y"])
    return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]


def chain_graph(
    k: int, width: int = 6, features: int = 5, classes: int = 3, loss: Any = None
) -> ann.Graph:
    """A K-stage chain: K Linear+Tanh stages, the last ending in a Linear to the classes, and
    ``loss`` (``CrossEntropyLoss()`` by default)."""
    modules: list[Any] = []
    sizes = []
    for s in range(k):
        out = classes if s == k - 1 else width
        stage: list[nn.Module] = [nn.Linear(features if s == 0 else width, out)]
        if s < k - 1:
            stage.append(nn.Tanh())
        modules += stage
        sizes.append(len(stage))
    loss = nn.CrossEntropyLoss() if loss is None else loss
    return ann.Graph.sequential(modules, loss=loss, stages=sizes, input_shape=(None, features))


def composed_loss(graph: ann.Graph, params_list: list[Any], x: Any, y: Any) -> Any:
    """The graph's loss of the chain's layers composed, on the whole of ``x`` (the graph's own
    loss module, with its reduction)."""
    h = x
    for name, p in zip(graph.layers, params_list, strict=True):
        h = graph.nodes[name].module(p, h)
    return graph.nodes[graph.losses[0]].module({}, h, y)


def plain_sgd(
    graph: ann.Graph, params: dict[str, Any], opt: Any, batches: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[float]]:
    """Minibatch training of the composed model with one optimizer over all parameters.

    Returns the final parameters by layer name and the loss of each minibatch before its step.
    """
    plist = [params[n] for n in graph.layers]
    state = opt.init(plist)
    losses = []
    for b in batches:
        loss, g = ann.value_and_grad(lambda p, b=b: composed_loss(graph, p, b["x"], b["y"]))(plist)
        plist, state = opt.update(plist, g, state)
        losses.append(float(loss))
    return dict(zip(graph.layers, plist, strict=True)), losses


def microbatched_sgd(
    params: dict[str, Any],
    batches: list[dict[str, Any]],
    microbatches: int,
    key_loss: Callable[[dict[str, Any], dict[str, Any], int, int], Any],
    lr: float = 0.1,
) -> dict[str, Any]:
    """Plain SGD, one step per minibatch, on the gradient of the minibatch's mean loss, split
    like numpy.array_split into ``microbatches`` keys (the runtime's): ``key_loss(q, b, lo, hi)``
    is the mean loss of rows ``lo:hi`` of minibatch ``b`` (of ``len(b["y"])`` rows) at ``q``."""
    p = dict(params)
    opt = optim.SGD(lr=lr)
    state = opt.init(p)
    for b in batches:
        n = len(b["y"])

        def loss(q: dict[str, Any], b: dict[str, Any] = b, n: int = n) -> Any:
            total = 0.0
            for part in np.array_split(np.arange(n), min(microbatches, n)):
                lo, hi = int(part[0]), int(part[-1]) + 1
                total = total + key_loss(q, b, lo, hi) * ((hi - lo) / n)
            return total

        p, state = opt.update(p, ann.grad(loss)(p), state)
    return p


def one_f_one_b_order(stage: int, k: int, total: int) -> list[tuple[str, int]]:
    """DESIGN.md's 1F1B order for stage ``stage`` of ``k`` over ``total`` microbatches."""
    w = min(k - stage - 1, total)
    order = [("F", i) for i in range(w)]
    for i in range(total - w):
        order += [("F", w + i), ("B", i)]
    order += [("B", i) for i in range(total - w, total)]
    return order


def forward_versions_1f1b(stages: int, total: int) -> list[list[int]]:
    """Under PipeDream, stage ``s`` runs key ``i`` forward after the backwards its 1F1B order
    puts before it: that many updates, ``[stage][key]``."""
    out = []
    for s in range(stages):
        order = one_f_one_b_order(s, stages, total)
        before = [order[: order.index(("F", i))] for i in range(total)]
        out.append([sum(op[0] == "B" for op in ops_) for ops_ in before])
    return out


def pipedream_reference(
    graph: ann.Graph,
    params: dict[str, Any],
    opt: Any,
    microbatches: list[dict[str, Any]],
    stash: bool,
) -> tuple[dict[str, Any], list[dict[int, int]]]:
    """A sequential re-enactment of PipeDream on a chain: every stage follows its 1F1B order
    over the whole stream and updates after each backward with that microbatch's gradient.

    Returns the final parameters and, per stage, {microbatch: version used by its backward}.
    """
    names = graph.layers
    k = len(names)
    total = len(microbatches)
    p = [params[n] for n in names]
    states = [opt.init(q) for q in p]
    versions = [0] * k
    orders = [one_f_one_b_order(s, k, total) for s in range(k)]
    pos = [0] * k
    acts: dict[tuple[int, int], Any] = {}  # (stage, mb) -> input to that stage
    grads: dict[tuple[int, int], Any] = {}  # (stage, mb) -> gradient of its output
    stored: dict[tuple[int, int], Any] = {}
    backward_versions: list[dict[int, int]] = [{} for _ in range(k)]
    forward_versions: list[dict[int, int]] = [{} for _ in range(k)]
    for i, mb in enumerate(microbatches):
        acts[(0, i)] = mb["x"]
    progressed = True
    while progressed:
        progressed = False
        for s in range(k):
            if pos[s] == len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            module = graph.nodes[names[s]].module
            if kind == "F" and (s, i) in acts:
                x = acts.pop((s, i))
                out, pb = ann.vjp(lambda q, x=x, module=module: module(q, x), p[s], x)
                stored[(s, i)] = (pb, x)
                forward_versions[s][i] = versions[s]
                if s + 1 < k:
                    acts[(s + 1, i)] = out
                else:
                    y = microbatches[i]["y"]
                    _, lpb = ann.vjp(lambda o, y=y: nn.CrossEntropyLoss()({}, o, y), out)
                    grads[(s, i)] = lpb(1.0)[0]
            elif kind == "B" and (s, i) in grads:
                g = grads.pop((s, i))
                pb, x = stored.pop((s, i))
                if stash:
                    backward_versions[s][i] = forward_versions[s][i]
                else:
                    _, pb = ann.vjp(lambda q, x, module=module: module(q, x), p[s], x)
                    backward_versions[s][i] = versions[s]
                gp, gx = pb(g)
                if s > 0:
                    grads[(s - 1, i)] = gx
                p[s], states[s] = opt.update(p[s], gp, states[s])
                versions[s] += 1
            else:
                continue
            pos[s] += 1
            progressed = True
    assert all(pos[s] == len(orders[s]) for s in range(k)), "reference deadlocked"
    return dict(zip(names, p, strict=True)), backward_versions


def assert_params_close(a: dict[str, Any], b: dict[str, Any], rtol: float, atol: float = 0) -> None:
    for name in a:
        la = tree_leaves(a[name])
        lb = tree_leaves(b[name])
        for x, y in zip(la, lb, strict=True):
            np.testing.assert_allclose(
                np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=name
            )


def assert_params_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name in a:
        la = tree_leaves(a[name])
        lb = tree_leaves(b[name])
        for x, y in zip(la, lb, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def fresh_params(graph: ann.Graph, dtype: str = "float64") -> dict[str, Any]:
    """The parameters a run of ``graph`` with seed 0 starts from."""
    return init_state(graph, optim.SGD(lr=0.1), 0, dtype).params
