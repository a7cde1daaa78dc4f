"""Graph.sequential: stage names and sizes, balance by parameters, FLOPs or measured time, the
checks of its arguments, and weights and dropout masks that do not depend on where the chain is
cut."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import fresh_params


def test_sequential_names_and_stage_sizes() -> None:
    mods = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)]
    g = ann.Graph.sequential(
        mods, loss=nn.CrossEntropyLoss(), stages=[2, 2, 1], input_shape=(None, 4)
    )
    assert g.layers == ["stage0", "stage1", "stage2"]
    assert g.inputs == ["x", "y"] and g.losses == ["loss"] and g.outputs == {"logits": "stage2"}
    assert [len(g.nodes[n].module) for n in g.layers] == [2, 2, 1]


def test_sequential_balances_by_parameter_count() -> None:
    mods = [
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
        nn.ReLU(),
        nn.Linear(10, 10),
        nn.Linear(10, 2),
    ]
    g = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 100))
    # the big first Linear alone outweighs everything after it
    assert [len(g.nodes[n].module) for n in g.layers] == [1, 5]
    with pytest.raises(ann.GraphError, match="add up"):
        ann.Graph.sequential(
            mods, loss=nn.CrossEntropyLoss(), stages=[2, 2], input_shape=(None, 100)
        )
    with pytest.raises(ann.GraphError, match="stages=9"):
        ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=9, input_shape=(None, 100))


def test_sequential_checks_its_stages_devices_and_workers_arguments() -> None:
    mods = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)]
    loss = nn.CrossEntropyLoss()
    assert ann.Graph.sequential(mods, loss, stages=np.int64(2)).layers == ["stage0", "stage1"]  # type: ignore[arg-type]
    assert len(ann.Graph.sequential(mods, loss, stages=np.array([1, 2])).layers) == 2  # type: ignore[arg-type]
    for stages in (True, [1.5, 1.5], "2", 2.0):
        with pytest.raises(ann.GraphError, match=r"sequential: stages=.*give the number"):
            ann.Graph.sequential(mods, loss, stages=stages)  # type: ignore[arg-type]
    with pytest.raises(ann.GraphError, match=r"devices='cpu'; give a list .* \(2 stages\)"):
        ann.Graph.sequential(mods, loss, stages=2, devices="cpu")
    with pytest.raises(ann.GraphError, match=r"workers=0; give a list .* \(2 stages\)"):
        ann.Graph.sequential(mods, loss, stages=2, workers=0)  # type: ignore[arg-type]
    with pytest.raises(ann.GraphError, match="2 stages but 1 devices"):
        ann.Graph.sequential(mods, loss, stages=2, devices=["cpu"])


def test_sequential_balances_by_flops() -> None:
    from asyncnn._runtime._balance import balanced_partition as _balanced_partition
    from asyncnn._runtime._balance import module_costs as _module_costs

    # A conv with few parameters but many FLOPs per sample, then a dense layer.
    mods = [nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)]
    assert _module_costs(mods, "params", (None, 1, 64)) == [48, 0, 0, 2052]
    assert _module_costs(mods, "flops", (None, 1, 64)) == [
        mods[0].flops((None, 1, 64)),
        0,
        0,
        mods[3].flops((None, 512)),
    ]
    assert _balanced_partition([1.0, 1.0, 1.0, 1.0, 4.0], 2) == [4, 1]
    with pytest.raises(ann.GraphError, match="balance"):
        ann.Graph.sequential(
            mods, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 1, 64), balance="x"
        )


def _cut(g: ann.Graph) -> list[list[Any]]:
    return [list(g.nodes[n].module.modules) for n in g.layers]


def _is_balanced(
    costs: Sequence[float],
    cut: list[list[Any]],
    modules: list[Any],
    fused: dict[int, float] | None = None,
) -> bool:
    """Whether ``cut`` is ``modules`` in order, cut where its largest stage cost is the least of
    every cut into as many stages (by trying them all, not as the balance computes it); a pair
    ``j, j + 1`` of ``fused`` (a Linear and its ReLU) that a stage holds whole costs
    ``fused[j]`` there, not ``costs[j] + costs[j + 1]``."""
    if [m for stage in cut for m in stage] != modules or not all(cut):
        return False
    sizes = [len(stage) for stage in cut]
    pairs = fused or {}

    def stage(lo: int, hi: int) -> float:
        whole = [j for j in pairs if lo <= j and j + 1 < hi]
        return sum(costs[lo:hi]) - sum(costs[j] + costs[j + 1] - pairs[j] for j in whole)

    def largest(bounds: tuple[int, ...]) -> float:
        return max(stage(lo, hi) for lo, hi in itertools.pairwise(bounds))

    ends = itertools.accumulate(sizes)
    best = min(
        largest((0, *inner, len(costs)))
        for inner in itertools.combinations(range(1, len(costs)), len(cut) - 1)
    )
    # (with room for rounding: the balance sums its costs in another order)
    return largest((0, *ends)) <= best * (1 + 1e-12)


def _spy_on_times(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[tuple[tuple[Any, ...], list[float]]], list[dict[int, float]]]:
    """Records each ``module_times`` call of the balance (its arguments and the times), and
    the times of each ``fused_pair_times`` call (a Linear and its ReLU as one op)."""
    from asyncnn._runtime import _balance

    calls: list[tuple[tuple[Any, ...], list[float]]] = []
    pairs: list[dict[int, float]] = []
    real, real_pairs = _balance.module_times, _balance.fused_pair_times

    def module_times(*args: Any) -> list[float]:
        times = real(*args)
        calls.append((args, times))
        return times

    def fused_pair_times(*args: Any) -> dict[int, float]:
        pairs.append(real_pairs(*args))
        return pairs[-1]

    monkeypatch.setattr(_balance, "module_times", module_times)
    monkeypatch.setattr(_balance, "fused_pair_times", fused_pair_times)
    return calls, pairs


@pytest.mark.parametrize("balance", ["params", "flops", "time"])
def test_sequential_balances_a_chain_of_token_ids(
    balance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an Embedding first reads integer ids: the modules are run on ids of the input's dtype
    seen: list[tuple[Any, tuple[int, ...]]] = []

    @dataclass(frozen=True)
    class SeenIds(nn.Embedding):
        def __call__(self, params: Any, ids: Any, *, rng: Any = None) -> Any:
            seen.append((ids.dtype, tuple(ids.shape)))
            return super().__call__(params, ids, rng=rng)

    times, pairs = _spy_on_times(monkeypatch)
    mods = [SeenIds(50, 8), nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 4)]
    g = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 6),
                             input_dtype="int64", balance=balance, balance_rows=8)  # fmt: skip
    assert sum(len(g.nodes[n].module.modules) for n in g.layers) == len(mods) == 5
    costs: dict[str, Sequence[float]] = {
        # weights and biases: the Linear(48, 64) outweighs the rest ([1, 4] or [2, 3])
        "params": [50 * 8, 0, 48 * 64 + 64, 0, 64 * 4 + 4],
        # multiply-adds of one sample: an Embedding's lookup counts none ([3, 2] or [4, 1])
        "flops": [0, 0, 2 * 48 * 64, 0, 2 * 64 * 4],
    }
    if balance == "time":
        assert len(times) == 1 and times[0][0][2:] == ("int64", 8)
        costs["time"] = times[0][1]
        assert len(pairs) == 1 and set(pairs[0]) == {2}  # (the Linear(48, 64) and its ReLU)
    else:
        assert not times and not pairs
    fused = pairs[0] if pairs else None
    assert _is_balanced(costs[balance], _cut(g), mods, fused), (costs[balance], fused, _cut(g))
    # a parameter count runs no module; the others ran the Embedding on the declared ids
    rows = {"params": None, "flops": 1, "time": 8}[balance]
    assert set(seen) == (set() if rows is None else {(np.dtype("int64"), (rows, 6))})


def test_sequential_checks_balance_and_measures_nothing_when_the_cut_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncnn._runtime import _balance

    def measured(*args: Any) -> Any:
        raise AssertionError(f"measured {args}")

    monkeypatch.setattr(_balance, "module_costs", measured)
    monkeypatch.setattr(_balance, "module_times", measured)
    conv = [nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(152, 10)]
    for balance in ("flops", "time"):  # one stage, or one module a stage: no input is guessed
        for stages in (1, 3):
            g = ann.Graph.sequential(conv, loss=nn.CrossEntropyLoss(), stages=stages,
                                     balance=balance)  # fmt: skip
            assert len(g.layers) == stages
    for balance in ("params", "flops", "time"):  # on an input it could measure too
        given: list[tuple[int | list[int], list[int]]] = [
            (1, [3]), (3, [1, 1, 1]), ([1, 2], [1, 2]), ([2, 1], [2, 1]),
        ]  # fmt: skip
        for cut, sizes in given:
            g = ann.Graph.sequential(conv, loss=nn.CrossEntropyLoss(), stages=cut,
                                     input_shape=(None, 1, 40), balance=balance)  # fmt: skip
            assert [len(s) for s in _cut(g)] == sizes
    with pytest.raises(ann.GraphError, match="'params', 'flops' or 'time', got 'speed'"):
        ann.Graph.sequential(conv, loss=nn.CrossEntropyLoss(), stages=[1, 2], balance="speed")
    with pytest.raises(ann.GraphError, match=r"stages=4 but there are 3 modules.*between 1 and 3"):
        ann.Graph.sequential(conv, loss=nn.CrossEntropyLoss(), stages=4)


def test_sequential_weights_do_not_depend_on_the_stage_cut() -> None:
    # a chain's modules are seeded by their place in the whole chain: a balance that cuts it
    # elsewhere (by measured time, which varies from run to run) starts from the same weights
    mods = [nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    flat = []
    for stages in ([5], [1, 4], [2, 2, 1], [3, 1, 1]):
        g = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=stages)
        params = fresh_params(g)
        flat.append([x for n in g.layers for x in ann._math._pytree.tree_leaves(params[n])])
    for other in flat[1:]:
        assert len(other) == len(flat[0])
        for a, b in zip(flat[0], other, strict=True):
            assert np.array_equal(a, b)
    # and one stage is the whole Sequential's own init, at the first layer's seed
    one = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=1)
    g2 = ann.Graph.from_spec(one.to_spec())
    assert g2.nodes["stage0"].init_offset == 0
    bad = one.to_spec()
    bad["nodes"][2]["init_offset"] = -2
    with pytest.raises(ann.GraphError, match="init_offset"):
        ann.Graph.from_spec(bad)


def _dropout_chain(chain: str, p: float) -> list[Any]:
    """A chain with dropout: one between Linear layers, or two that a cut may keep together."""
    if chain == "two in a stage":
        return [nn.Linear(5, 8), nn.Dropout(p), nn.Tanh(), nn.Dropout(p), nn.Linear(8, 3)]
    return [nn.Linear(5, 8), nn.ReLU(), nn.Dropout(p), nn.Linear(8, 8), nn.Linear(8, 3)]


@pytest.mark.anyio
@pytest.mark.parametrize("chain", ["one", "two in a stage"])
async def test_sequential_dropout_masks_do_not_depend_on_the_stage_cut(chain: str) -> None:
    # each module draws its masks by its place in the whole chain (as its weights are seeded):
    # a cut elsewhere (balance="time" varies from run to run) trains to the same bits
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((8, 5)), "y": rng.integers(0, 3, 8)} for _ in range(3)]

    async def train(p: float, stages: int | list[int]) -> list[Any]:
        g = ann.Graph.sequential(_dropout_chain(chain, p), nn.CrossEntropyLoss(), stages)
        async with ann.open_run(
            g, optimizer=optim.SGD(lr=0.5), policy=policies.Sync(), seed=3, dtype="float64"
        ) as run:
            for batch in batches:
                await run.step(batch)
            await run.drain()
        return [x for n in g.layers for x in ann._math._pytree.tree_leaves(run.params[n])]

    whole = await train(0.5, 1)
    for stages in ([1, 4], [3, 2], 2, 4):
        cut = await train(0.5, stages)
        assert len(cut) == len(whole)
        for a, b in zip(whole, cut, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"stages={stages}")
    # the masks took effect: at p=0 the weights end elsewhere
    plain = await train(0.0, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(whole, plain, strict=True))


def test_sequential_balances_stages_by_measured_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncnn._runtime import _balance
    from asyncnn._runtime._balance import module_times as _module_times

    heavy, light = nn.Linear(512, 512), nn.ReLU()
    times = _module_times([heavy, light], (None, 512), "float32", 256)
    assert all(t > 0 for t in times) and times[0] > times[1]  # a product against one pass
    modules = [nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4)]
    calls, pairs = _spy_on_times(monkeypatch)
    g = ann.Graph.sequential(
        modules, loss=nn.CrossEntropyLoss(), stages=3, input_shape=(None, 32), balance="time"
    )
    stages = [g.nodes[n].module for n in g.layers]
    assert len(stages) == 3 and sum(len(s.modules) for s in stages) == len(modules)
    # the cut is the best for the times measured (which vary from run to run), on float32
    # rows of the declared input, as many as balance_rows (64 by default)
    assert [args[1:] for args, _ in calls] == [((None, 32), "float32", 64)]
    # a numpy int as a plain one (as stages= takes it)
    ann.Graph.sequential(modules, loss=nn.CrossEntropyLoss(), stages=np.int64(3),
                         input_shape=(None, 32), balance="time", balance_rows=np.int64(8))  # fmt: skip
    assert calls[-1][0][1:] == ((None, 32), "float32", 8) and type(calls[-1][0][3]) is int
    # (each Linear with a bias and its ReLU also timed as the one op a stage applies them as)
    assert len(pairs) == 2 and set(pairs[0]) == {0, 2}
    assert _is_balanced(calls[0][1], _cut(g), modules, pairs[0]), (calls[0][1], _cut(g))
    # and it follows the times: given other times, the cut moves with them
    monkeypatch.setattr(_balance, "module_times", lambda *args: [4.0, 4.0, 1.0, 1.0, 4.0])
    monkeypatch.setattr(_balance, "fused_pair_times", lambda *args: {0: 8.0, 2: 2.0})
    g = ann.Graph.sequential(
        modules, loss=nn.CrossEntropyLoss(), stages=3, input_shape=(None, 32), balance="time"
    )
    assert _cut(g) == [modules[:1], modules[1:3], modules[3:]]  # the only cut of largest 5
    with pytest.raises(ann.GraphError, match="balance_rows must be an int >= 1"):
        ann.Graph.sequential(modules, loss=nn.CrossEntropyLoss(), stages=2,
                             input_shape=(None, 32), balance="time", balance_rows=0)  # fmt: skip
    with pytest.raises(ann.GraphError, match="'params', 'flops' or 'time'"):
        ann.Graph.sequential(modules, loss=nn.CrossEntropyLoss(), stages=2,
                             input_shape=(None, 32), balance="speed")  # fmt: skip


def test_sequential_measures_time_with_one_blas_thread_whichever_thread_set_blas(
    monkeypatch: Any,
) -> None:
    # threadpoolctl (3.8) lets only the thread that first set a pthreads OpenBLAS's count set
    # it while that thread lives: the measurement's threadpool_limits(1) then did nothing, and
    # the modules were timed with that thread's count (2 here)
    import threading

    import threadpoolctl
    from threadpoolctl import threadpool_info, threadpool_limits

    from asyncnn._runtime import _balance

    def blas_threads() -> int:
        return int(
            next(lib for lib in threadpool_info() if lib["user_api"] == "blas")["num_threads"]
        )

    if blas_threads() < 2:
        pytest.skip("needs a BLAS that may take 2 threads")
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:  # sets BLAS's count, so holds threadpoolctl's control while it lives
        controller = getattr(threadpoolctl, "OpenBLASController", None)
        getattr(controller, "clear_controlling_thread", lambda force: None)(force=True)
        limiter = threadpool_limits(2, user_api="blas")
        holding.set()
        done.wait(10)
        limiter.restore_original_limits()

    holder = threading.Thread(target=hold)
    holder.start()
    seen: list[int] = []
    real_vjp = _balance.vjp

    def vjp(*args: Any) -> Any:
        seen.append(blas_threads())
        return real_vjp(*args)

    monkeypatch.setattr(_balance, "vjp", vjp)
    try:
        assert holding.wait(10)
        _balance.module_times([nn.Linear(8, 8), nn.ReLU()], (None, 8), "float32", 4)
        after = blas_threads()
    finally:
        done.set()
        holder.join(10)
    assert seen and set(seen) == {1}
    assert after == 2  # the count from before the measurement


def test_sequential_infers_a_linear_input_and_says_how_to_declare_others() -> None:
    g = ann.Graph.sequential([nn.Linear(64, 10)], loss=nn.CrossEntropyLoss())
    assert g.nodes["x"].shape == (None, 64)
    conv = ann.Graph.sequential(
        [nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(152, 10)], loss=nn.CrossEntropyLoss()
    )
    with pytest.raises(
        ann.GraphError,
        match=r"input 'x' is declared as shape \(None,\).*input_shape=\(None, \.\.\.\)",
    ):
        ann.Trainer(conv, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_sequential_names_a_module_that_is_not_one_and_a_shape_it_cannot_measure() -> None:
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ann.GraphError, match=r"modules\[1\] is the class ReLU, not a module"):
        ann.Graph.sequential([nn.Linear(4, 3), nn.ReLU, nn.Linear(3, 2)], loss, stages=2)
    with pytest.raises(ann.GraphError, match=r"modules\[1\] is int \(3\), not an nn.Module"):
        ann.Graph.sequential([nn.Linear(4, 3), 3], loss)
    with pytest.raises(ann.GraphError, match=r"modules=Linear.*; give a list of modules"):
        ann.Graph.sequential(nn.Linear(4, 3), loss)  # type: ignore[arg-type]
    # (flops on a convolution given the default (None,) input: an IndexError from its flops)
    conv = [nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(152, 10)]
    for balance in ("flops", "time"):
        with pytest.raises(ann.GraphError, match=r"Conv1d.* expects \(N, C, L\) input.*declared "
                           r"\(None,\): give Graph.sequential the input_shape"):  # fmt: skip
            ann.Graph.sequential(conv, loss, stages=2, balance=balance, balance_rows=4)
    with pytest.raises(ann.GraphError, match="balance_rows must be an int >= 1, got 0"):
        ann.Graph.sequential(conv, loss, stages=2, balance="params", balance_rows=0)
    with pytest.raises(ann.GraphError, match="balance_rows must be an int >= 1, got True"):
        ann.Graph.sequential(conv, loss, stages=2, balance="params", balance_rows=True)
