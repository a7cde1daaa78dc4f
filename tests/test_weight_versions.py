"""A layer's updates (asyncnn/_runtime/_weight_versions.py): the new weights, optimizer state
and version of an update are published together, after the policy's correction of it."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn._math._pytree import tree_leaves

from _reference import chain_graph, classification_data, minibatches

pytestmark = pytest.mark.timeout(60)

#: stage 0's weights after each of its corrected updates: {the update's step: weights}
_CORRECTED: dict[int, Any] = {}


class _Stop(Exception):
    """An error raised inside a correction."""


def _is_stage0(weights: Any) -> bool:
    return any(w.shape == (5, 6) for w in tree_leaves(weights))  # chain_graph(3)'s first Linear


@dataclasses.dataclass(frozen=True)
class _StopInStage0Correction(policies.Remedy):
    """The wrapped policy, whose correction of stage 0's third update (step 2) stops the run
    (Ctrl-C with ``interrupt``, else an error); notes stage 0's weights after each correction
    before it."""

    interrupt: bool = True
    name: ClassVar[str] = "_StopInStage0Correction"
    corrects: ClassVar[bool] = False
    adjusts: ClassVar[bool] = True

    def correct_update(
        self, new: Any, old: Any, grads: Any, delay: float, optimizer: Any, step: int
    ) -> Any:
        new = super().correct_update(new, old, grads, delay, optimizer, step)
        if _is_stage0(new):
            if step == 2:
                raise KeyboardInterrupt if self.interrupt else _Stop("stopped in a correction")
            _CORRECTED[step] = [np.array(w) for w in tree_leaves(new)]
        return new

    def adjust(
        self, new: Any, old: Any, grads: Any, delay: float, optimizer: Any, step: int
    ) -> Any:
        return new


def _assert_stage0_kept_whole(params: Any, opt_state: Any, version: int) -> None:
    # two updates done, the third stopped in its correction: the version, the optimizer's
    # count and the weights are those of the second, as corrected
    assert version == 2 and opt_state["step"] == 2
    for got, want in zip(tree_leaves(params), _CORRECTED[1], strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(
    "remedy",
    [lambda p: policies.PipeMareLR(p, warmup_updates=100), policies.SpikeCompensation],
    ids=["pipemare", "spike"],
)
def test_a_pipedream_fit_stopped_in_a_correction_keeps_the_update_before(remedy):
    # (before: stage 0 kept version 3 and the optimizer's step 3 with the weights of the
    # optimizer's uncorrected update; the next fit went on from them)
    _CORRECTED.clear()
    policy = _StopInStage0Correction(remedy(policies.PipeDream(2)))
    tr = ann.Trainer(
        chain_graph(3), optimizer=optim.SGD(lr=0.1, momentum=0.9), policy=policy, seed=3
    )
    with pytest.raises(KeyboardInterrupt):
        tr.fit(classification_data(40), epochs=1, batch_size=8)
    state = tr.state
    _assert_stage0_kept_whole(
        state.params["stage0"], state.opt_states["stage0"], state.versions["stage0"]
    )


@pytest.mark.anyio
async def test_an_async_run_failing_in_a_correction_holds_the_update_before(anyio_backend):
    _CORRECTED.clear()
    inner = policies.PipeMareLR(policies.Async(max_active_keys=3), warmup_updates=100)
    policy = _StopInStage0Correction(inner, interrupt=False)
    opt = optim.SGD(lr=0.1, momentum=0.9)
    with pytest.raises(ann.ActorError, match="stage0") as info:
        async with ann.open_run(chain_graph(3), opt, policy, seed=3) as run:
            for batch in minibatches(classification_data(48), 8):
                await run.step(batch)
            await run.drain()
    assert isinstance(info.value.__cause__, _Stop)
    state = run.state()
    _assert_stage0_kept_whole(
        state.params["stage0"], state.opt_states["stage0"], state.versions["stage0"]
    )


@pytest.mark.parametrize(
    "policy,peaks",
    [
        # K - s keys in flight at stage s of K, each holding the weights its pullback saw
        (policies.PipeDream(3), [4, 3, 2, 1]),
        # no stash: each key keeps its inputs only, the backward recomputes at the latest
        (policies.PipeDream(3, stash=False), [1, 1, 1, 1]),
        (policies.Async(3, 1, stash=False), [1, 1, 1, 1]),
        # no stash, but the correction keeps the weights each key's forward saw
        (policies.DelayCompensation(policies.PipeDream(3, stash=False)), [4, 3, 2, 1]),
    ],
    ids=str,
)
def test_versions_held_counts_the_weights_kept_in_memory(policy, peaks):
    # (stash=False reported as many versions as stash=True, though only the latest weights
    # were alive: the stored keys' version numbers, kept for their delays, were counted)
    tr = ann.Trainer(chain_graph(4), optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
    hist = tr.fit(classification_data(48), epochs=1, batch_size=8)
    got = [hist.statistics[name].peak_versions_held for name in tr.graph.layers]
    assert got == peaks
    assert all(hist.statistics[name].versions_held == 1 for name in tr.graph.layers)


def test_delays_count_the_gradients_each_update_applied(tmp_path):
    # Async(F=2) over 3 keys a fit: each fit leaves a gradient accumulated, applied by the next
    # fit's first update; a fit's statistics count the delays of the gradients its updates
    # applied, as its trace's update events list them (never one still pending at its end)
    data = classification_data(24)
    policy = policies.Async(max_active_keys=1, min_update_frequency=2)
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policy, trace=tmp_path / "run.trace"
    )
    for _ in range(2):
        hist = tr.fit(data, epochs=1, batch_size=8)
        events = ann.trace.read(tr.traces[-1]).events
        for name in tr.graph.layers:
            listed = [d for e in events if e["a"] == name and e["ev"] == "update"
                      for d in e["m"]["delays"]]  # fmt: skip
            assert hist.statistics[name].delays == dict(Counter(listed)), name
    # (the gradient carried into the second fit is applied there without its delay, which
    # RunState.pending_grads does not carry: counted in neither fit, see docs/stale_gradients.md)
    first = ann.trace.read(tr.traces[0]).events
    assert [e["m"]["delays"] for e in first if e["a"] == "stage0" and e["ev"] == "update"] == [
        [0, 0]
    ]


@pytest.mark.parametrize(
    "recompute,stash,rows",
    [
        # (PipeDream(2): 4-row microbatches of the 8-row minibatches; Async: one key each)
        (policies.PipeDream(2, stash=False), policies.PipeDream(2), 4),
        (policies.Async(3, 1, stash=False), policies.Async(3, 1, stash=True), 8),
        # no stash, but the correction keeps the weights each key's forward saw (not counted)
        (
            policies.DelayCompensation(policies.PipeDream(2, stash=False)),
            policies.DelayCompensation(policies.PipeDream(2)),
            4,
        ),
    ],
    ids=lambda p: p if isinstance(p, int) else p.name,
)
def test_stored_bytes_count_only_the_inputs_a_recomputing_forward_keeps(recompute, stash, rows):
    # (stash=False reported the inputs plus the output of each stored key, as stash=True does,
    # though it keeps no output: the same figures for both, where the memory held differs 2-3x)
    widths = [5, 6, 6, 6, 3]  # chain_graph(4)'s features between its stages
    stats = {}
    for policy in (recompute, stash):
        tr = ann.Trainer(
            chain_graph(4), optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64"
        )
        hist = tr.fit(classification_data(48), epochs=1, batch_size=8)
        stats[policy] = [hist.statistics[name] for name in tr.graph.layers]
    for s, (kept, stashed) in enumerate(zip(stats[recompute], stats[stash], strict=True)):
        assert kept.peak_stored == stashed.peak_stored > 0
        # a recomputing forward keeps its inputs only: exactly their bytes
        assert kept.peak_stored_bytes == kept.peak_stored * rows * widths[s] * 8
        # a kept pullback holds the inputs and the output (and more: the residuals)
        per_key = rows * (widths[s] + widths[s + 1]) * 8
        assert stashed.peak_stored_bytes == stashed.peak_stored * per_key
        assert kept.peak_stored_bytes < stashed.peak_stored_bytes
        assert kept.stored_bytes == stashed.stored_bytes == 0  # all let go by the end
