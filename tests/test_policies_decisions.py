"""What each policy decides, one method each; its spec, and the arguments it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from asyncnn import policies
from asyncnn.policies import OneFOneBOrder


def test_policy_specs_round_trip_and_validate():
    for p in [
        policies.Sync(),
        policies.GPipe(3),
        policies.OneFOneB(2),
        policies.PipeDream(4, stash=False),
        policies.Async(8, 2, stash=True),
    ]:
        assert policies.policy_from_spec(p.to_spec()) == p
    with pytest.raises(ValueError, match="microbatches"):
        policies.GPipe(0)
    with pytest.raises(ValueError, match="max_active_keys"):
        policies.Async(max_active_keys=0)
    # a string such as "no" is truthy: it would silently mean stash=True
    with pytest.raises(ValueError, match=r"PipeDream\(stash='no'\): stash must be True or False"):
        policies.PipeDream(4, stash="no")
    with pytest.raises(ValueError, match=r"Async\(stash=0\): stash must be True or False"):
        policies.Async(stash=0)


def test_policy_counts_and_flags_take_numpy_values_as_plain_ones():
    # (a numpy integer, as a sweep over np.arange gives, was refused with "microbatches must be
    # an int >= 1", though Graph.sequential's stages and fit's batch_size take one)
    import json

    made = [
        (policies.GPipe(np.int64(4)), policies.GPipe(4)),
        (policies.OneFOneB(np.int32(3)), policies.OneFOneB(3)),
        (policies.PipeDream(np.int64(2), stash=np.False_), policies.PipeDream(2, stash=False)),
        (policies.PipeDream2BW(np.uint8(3)), policies.PipeDream2BW(3)),
        (policies.Async(np.int64(3), np.int16(2), np.True_), policies.Async(3, 2, True)),
        (policies.Interleaved1F1B(np.int64(4), np.int64(2)), policies.Interleaved1F1B(4, 2)),
        (policies.ZeroBubbleH1(np.int64(4), np.int64(2)), policies.ZeroBubbleH1(4, 2)),
    ]
    for got, want in made:
        assert got == want and got.to_spec() == want.to_spec()
        args = got.to_spec()["args"]
        assert all(type(v) in (int, bool) for v in args.values()), args
        assert policies.policy_from_spec(json.loads(json.dumps(got.to_spec()))) == want
    assert policies.interleaved_1f1b_schedule(
        np.int64(2), np.int64(2), np.int64(4)
    ) == policies.interleaved_1f1b_schedule(2, 2, 4)
    for bad in [True, np.True_, 0, np.int64(0), -1, 2.0, None, "4"]:
        with pytest.raises(ValueError, match=r"GPipe\(microbatches=.*\): microbatches must be"):
            policies.GPipe(bad)
        with pytest.raises(ValueError, match=r"ZeroBubbleH1\(virtual=.*\): virtual must be"):
            policies.ZeroBubbleH1(4, virtual=bad)
    with pytest.raises(ValueError, match=r"Async\(min_update_frequency=np.False_\)"):
        policies.Async(4, np.False_)
    with pytest.raises(ValueError, match=r"PipeDream\(stash=np.int64\(1\)\): stash must be"):
        policies.PipeDream(2, stash=np.int64(1))


@pytest.mark.parametrize("warmup", [-1, -3, 1.0, True, "2"])
def test_a_1f1b_order_refuses_a_warmup_that_is_not_a_count(warmup):
    # (a negative warm-up planned a backward before its forward: the run stalled, and a policy
    # such as docs/policies.md's OneFOneBWarm with extra=-1 failed only after stall_timeout)
    with pytest.raises(ValueError, match=r"OneFOneBOrder\(warmup=.*\): warmup must be None"):
        OneFOneBOrder(warmup, flush=True)
    with pytest.raises(ValueError, match=r"OneFOneBOrder\(flush='no'\)"):
        OneFOneBOrder(1, flush="no")
    assert OneFOneBOrder(np.int64(0), flush=True).next() == ("forward", 0)


def test_split_refuses_a_minibatch_of_no_rows():
    # (split(0) divided by zero; a run refuses an empty batch before it asks)
    for p in [policies.GPipe(3), policies.Sync(), policies.Interleaved1F1B(4, 2)]:
        with pytest.raises(ValueError, match=r"split\(rows=0\): rows must be an int >= 1"):
            p.split(0)
    assert policies.GPipe(3).split(np.int64(7)) == [(0, 3), (3, 5), (5, 7)]


# -- what each policy decides is one of its methods ----------------------------------------------
@pytest.mark.parametrize("rows", [1, 5, 8, 64, 67])
@pytest.mark.parametrize("m", [1, 3, 4, 8])
def test_split_follows_numpy_array_split(rows, m):
    parts = policies.GPipe(microbatches=m).split(rows)
    sizes = [len(a) for a in np.array_split(np.arange(rows), min(m, rows))]
    assert [hi - lo for lo, hi in parts] == sizes
    assert parts[0][0] == 0 and parts[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))


def test_policy_methods_state_each_decision():
    assert policies.Sync().keeps_pullback() and policies.Sync().waits_between_minibatches()
    assert policies.PipeDream(4, stash=True).keeps_pullback()
    assert not policies.PipeDream(4, stash=False).keeps_pullback()
    assert (
        not policies.Async(4).keeps_pullback() and not policies.Async(4).waits_between_minibatches()
    )
    assert policies.Sync().allows_capture(3, traced=False)
    assert policies.OneFOneB(1).allows_capture(3, traced=False)
    assert policies.Sync().allows_capture(3, traced=True)  # the trace copies behind the graphs
    assert policies.GPipe(4).allows_capture(3, traced=False)  # flushes: graphs per key
    assert policies.OneFOneB(4).allows_capture(3, traced=False)
    # keys streaming: the latest weights (recomputed) or a stash (a slot per key in flight)
    assert policies.PipeDream(1).allows_capture(3, traced=False)  # stashes: a slot per key
    assert policies.PipeDream(1, stash=False).allows_capture(3, traced=False)
    assert policies.Async(1).allows_capture(3, traced=False)
    assert policies.Async(1, stash=True).allows_capture(3, traced=False)
    assert policies.Async(1).allows_capture(3, traced=True)
    assert policies.Sync().minibatch_done(2, 2) and not policies.Sync().minibatch_done(1, 2)


def test_capture_needs_forwards_and_backwards_at_the_latest_weights():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Predicting(policies.Async):
        def predicts_weights(self) -> bool:
            return True

    @dataclass(frozen=True)
    class Averaging(policies.Async):
        def weight_change_decay(self) -> float | None:
            return 0.9

    @dataclass(frozen=True)
    class UpdatingInside(policies.OneFOneB):  # a flush, but updates within the minibatch
        def update_due(self, backwards_since_update: int, minibatch_done: bool) -> bool:
            return True

    assert policies.Async(2).allows_capture(3, traced=False)
    assert not UpdatingInside(4).allows_capture(3, traced=False)
    assert UpdatingInside(1).allows_capture(3, traced=False)  # one key: nothing in between
    assert not Predicting(2).allows_capture(3, traced=False)
    assert not Averaging(2).allows_capture(3, traced=False)
    assert not policies.PipeDream2BW(4).allows_capture(3, traced=False)  # pinned versions
    assert not policies.ZeroBubbleH1(4).allows_capture(3, traced=False)  # split backward
    # a wrapper keeps its wrapped policy's answer and the general rule over its own decisions
    assert not policies.WeightPrediction(policies.Async(2)).allows_capture(3, traced=False)


def test_replay_policy_keeps_the_recorded_meaning_and_orders():
    seen = []
    recorded = policies.PipeDream(microbatches=3, stash=False)
    ops = [("forward", 0), ("forward", 1), ("backward", 0)]
    rp = policies.Replay(recorded, {"stage0": ops}, keys=9, isolated="stage0",
                         on_op=lambda *a: seen.append(a))  # fmt: skip
    assert rp.split(7) == recorded.split(7) and rp.microbatches == 3 and not rp.stash
    assert rp.max_in_flight(2) == 9 and not rp.keeps_pullback()
    assert rp.update_due(1, False) and rp.loss_cotangent(2, 6) == recorded.loss_cotangent(2, 6)
    assert not rp.waits_between_minibatches()
    # captured as the recorded run was (the same order: the same captures)
    assert rp.allows_capture(1, traced=True) == recorded.allows_capture(1, traced=True)
    assert not policies.Replay(policies.PipeDream2BW(2), {}).allows_capture(1, traced=True)
    assert not rp.delivers("stage0") and policies.Replay(recorded, {}).delivers("stage0")
    assert rp.to_spec() == recorded.to_spec()
    order = rp.order_for("stage0", 0, 2)
    for op in ops:
        assert order.next() == op
        order.done(op, 3)
    assert order.next() == ("forward", -1)  # afterwards: nothing more
    assert seen == [("stage0", i, k, key) for i, (k, key) in enumerate(ops)]
    assert rp.order_for("stage1", 1, 2).next() == ("forward", -1)


def test_replay_delegates_the_stale_gradient_decisions():
    recorded = policies.DelayCompensation(policies.PipeDream2BW(4), strength=0.5)
    rp = policies.Replay(recorded, {})
    assert rp.corrects_gradients() and rp.needs_forward_weights()
    assert rp.versions_kept() == 1 and rp.forward_version(3, 0, 3) == 2
    assert not rp.predicts_weights()
    g = {"w": np.ones(2)}
    w, w0 = {"w": np.full(2, 3.0)}, {"w": np.ones(2)}
    np.testing.assert_array_equal(rp.correct_gradient(g, 1, 5, w, w0)["w"], [2.0, 2.0])
    assert rp.predict_weights(w, w0, 2) is w  # no prediction: the latest weights
    wp = policies.Replay(policies.WeightPrediction(policies.PipeDream(2)), {})
    np.testing.assert_array_equal(wp.predict_weights(w, w0, 2)["w"], [7.0, 7.0])


@pytest.mark.parametrize("too_many", [2**63, 2**64, np.uint64(2**63)])
def test_policy_counts_have_an_upper_bound(too_many):
    # (a count of 2**64 or more was taken, and then failed a traced fit with "writing the trace
    # failed" and Trainer.save with a bare OverflowError, naming no field)
    for make, label in [
        (lambda n: policies.GPipe(n), r"GPipe\(microbatches=.*\): microbatches"),
        (
            lambda n: policies.Async(max_active_keys=n),
            r"Async\(max_active_keys=.*\): max_active_keys",
        ),
        (lambda n: policies.Async(4, n), r"Async\(min_update_frequency=.*\): min_update_frequency"),
        (lambda n: policies.ZeroBubbleH1(4, virtual=n), r"ZeroBubbleH1\(virtual=.*\): virtual"),
        (
            lambda n: policies.PipeMareLR(policies.PipeDream(2), warmup_updates=n),
            r"PipeMareLR\(warmup_updates=.*\): warmup_updates",
        ),
        (
            lambda n: policies.interleaved_1f1b_schedule(2, 2, n),
            r"interleaved_1f1b_schedule\(microbatches=.*\): microbatches",
        ),
    ]:
        with pytest.raises(
            ValueError, match=rf"^{label} must be an int >= 1 and at most 2\*\*63 - 1"
        ):
            make(too_many)
    assert policies.GPipe(2**63 - 1).microbatches == 2**63 - 1  # the largest: kept
    assert policies.GPipe(np.int64(2**63 - 1)).to_spec()["args"]["microbatches"] == 2**63 - 1
