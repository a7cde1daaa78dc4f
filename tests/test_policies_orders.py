"""Each policy's order of work per stage: DESIGN.md's 1F1B formula, and PyTorch's schedules
(GPipe, 1F1B, interleaved 1F1B, interleaved zero bubble) as a second reference."""

from __future__ import annotations

import pytest

from asyncnn import policies
from asyncnn.policies import OneFOneBOrder

from _reference import one_f_one_b_order


def test_order_formula_matches_design():
    # DESIGN.md: w = min(K - s - 1, M) warm-ups, then F(w+i), B(i), then the rest of the Bs.
    for k in range(1, 5):
        for s in range(k):
            for m in range(1, 9):
                order = OneFOneBOrder(k - s - 1, flush=True)
                seq = []
                for _ in range(2 * m):
                    op = order.next()
                    seq.append(("F" if op[0] == "forward" else "B", op[1]))
                    order.done(op, m)
                assert seq == one_f_one_b_order(s, k, m), (k, s, m)
                # the next minibatch starts over with the next keys
                assert order.next() == ("forward", m)


# -- interleaved 1F1B ----------------------------------------------------------------------------
def _torch_device_orders(devices, virtual, m):
    """PyTorch's ScheduleInterleaved1F1B order of each rank, without a process group (its own
    schedule visualizer instantiates the schedule on mocked stages), idle slots left out."""
    pytest.importorskip("torch")
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B

    ranks = get_schedule_ops(ScheduleInterleaved1F1B, devices, m, virtual)
    kinds = {"FORWARD": "forward", "FULL_BACKWARD": "backward"}
    return [
        [(kinds[a.computation_type.name], a.stage_index, a.microbatch_index) for a in r if a]
        for r in ranks
    ]


@pytest.mark.parametrize(
    "d,v,m",
    [(2, 2, 4), (2, 2, 6), (2, 3, 8), (3, 2, 3), (3, 2, 6), (4, 2, 8), (4, 3, 4), (4, 2, 2)],
)
def test_interleaved_1f1b_order_equals_pytorchs(d, v, m):
    assert policies.interleaved_1f1b_schedule(d, v, m) == _torch_device_orders(d, v, m)


def test_interleaved_1f1b_stages_follow_their_part_of_the_device_order():
    d, v, m = 2, 2, 4
    policy = policies.Interleaved1F1B(m, virtual=v)
    names = [f"s{i}" for i in range(d * v)]
    orders = policy.orders(names)
    device_ops = policies.interleaved_1f1b_schedule(d, v, m)
    for first_key in (0, 4):  # two minibatches: the part restarts with the next keys
        for i, name in enumerate(names):
            want = [(k, first_key + mb) for k, st, mb in device_ops[i % d] if st == i]
            got = []
            for _ in range(2 * m):
                op = orders[name].next()
                got.append(op)
                orders[name].done(op, m)
            assert got == want, name
    with pytest.raises(ValueError, match="multiple of the rounds"):
        policies.interleaved_1f1b_schedule(2, 2, 5)
    with pytest.raises(ValueError, match="not a multiple of virtual=2"):
        policy.orders(names[:3])
    assert policies.policy_from_spec(policy.to_spec()) == policy


@pytest.mark.parametrize(
    "d,v,m", [(2, 2, 4), (2, 3, 6), (3, 2, 3), (3, 2, 6), (4, 2, 8), (4, 3, 2)]
)
def test_interleaved_zero_bubble_order_equals_pytorchs(d, v, m):
    pytest.importorskip("torch")
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import ScheduleInterleavedZeroBubble

    kinds = {
        "FORWARD": "forward",
        "BACKWARD_INPUT": "backward_input",
        "BACKWARD_WEIGHT": "backward_weight",
    }
    ranks = get_schedule_ops(ScheduleInterleavedZeroBubble, d, m, v)
    want = [
        [(kinds[a.computation_type.name], a.stage_index, a.microbatch_index) for a in r if a]
        for r in ranks
    ]
    assert policies.interleaved_zero_bubble_schedule(d, v, m) == want


def _torch_schedule_ops(schedule_class, devices, virtual, m):
    """Each rank's order under one of PyTorch's multi-stage schedules, made on mocked stages
    (as its visualizer does, but for any ``virtual`` >= 1), idle slots left out."""
    from unittest import mock

    from torch.distributed.pipelining.stage import PipelineStage

    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = 0, devices, None
    stage.num_stages = devices * virtual
    sched = schedule_class([stage] * virtual, m)
    kinds = {
        "FORWARD": "forward",
        "FULL_BACKWARD": "backward",
        "BACKWARD_INPUT": "backward_input",
        "BACKWARD_WEIGHT": "backward_weight",
    }
    return [
        [
            (kinds[a.computation_type.name], a.stage_index, a.microbatch_index)
            for a in sched.pipeline_order[rank]
            if a is not None and a.computation_type.name in kinds
        ]
        for rank in range(devices)
    ]


@pytest.mark.parametrize("schedule", ["ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble"])
def test_interleaved_orders_and_refusals_equal_pytorchs_over_a_grid(schedule):
    # every D <= 4, V <= 3 (V = 1: ZB-H1 and 1F1B's interleaved form), M <= 10: M below D, not
    # a multiple of D, 1; each order equals PyTorch's and each M PyTorch refuses is refused
    pytest.importorskip("torch")
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, schedule)
    ours = {
        "ScheduleInterleaved1F1B": policies.interleaved_1f1b_schedule,
        "ScheduleInterleavedZeroBubble": policies.interleaved_zero_bubble_schedule,
    }[schedule]
    refused = 0
    for d in range(1, 5):
        for v in range(1, 4):
            for m in range(1, 11):
                try:
                    want = _torch_schedule_ops(cls, d, v, m)
                except ValueError as exc:
                    assert "multiple of the number of rounds" in str(exc)
                    with pytest.raises(ValueError, match="multiple of the rounds"):
                        ours(d, v, m)
                    refused += 1
                    continue
                assert ours(d, v, m) == want, (d, v, m)
    assert refused == 18  # M = 5, 7, 9 on 2 devices, M = 7, 10 on 3, M = 9 on 4, for each V


def _torch_single_stage_order(schedule_class, k, s, m):
    """The order PyTorch's ScheduleGPipe or Schedule1F1B runs at stage ``s`` of ``k`` (its
    ``_step_microbatches`` on a mocked stage that records each forward and backward; its
    ``pipeline_order`` of the last stage of Schedule1F1B starts at microbatch 1)."""
    from unittest import mock

    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining.stage import PipelineStage

    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = s, k, None
    stage.num_stages, stage.stage_index = k, s
    stage.is_first, stage.is_last = s == 0, s == k - 1
    seen = []
    stage.forward_one_chunk.side_effect = lambda i, *a, **kw: seen.append(("F", i))
    stage.backward_one_chunk.side_effect = lambda i, *a, **kw: seen.append(("B", i))
    sched = schedule_class(stage, m)
    quiet = [mock.patch.object(schedules, "_batch_p2p", lambda *a, **kw: [])]
    quiet.append(mock.patch.object(schedules, "_wait_batch_p2p", lambda *a, **kw: None))
    for name in ("_initialize_stage", "_maybe_compute_loss", "_maybe_get_loss", "_update_losses"):
        quiet.append(mock.patch.object(sched, name))
    for patch in quiet:
        patch.start()
    try:
        sched._step_microbatches([() for _ in range(m)], [{} for _ in range(m)])
    finally:
        for patch in quiet:
            patch.stop()
    return seen


@pytest.mark.parametrize("name", ["GPipe", "OneFOneB"])
def test_gpipe_and_1f1b_orders_equal_pytorchs(name):
    # every stage of K <= 5 with M <= 9 (M below K only for GPipe: PyTorch's 1F1B refuses it;
    # ours caps the warm-up at M, test_order_formula_matches_design)
    pytest.importorskip("torch")
    from torch.distributed.pipelining import schedules

    cls = {"GPipe": schedules.ScheduleGPipe, "OneFOneB": schedules.Schedule1F1B}[name]
    for k in range(1, 6):
        for m in range(1 if name == "GPipe" else k, 10):
            for s in range(k):
                order = getattr(policies, name)(m).stage_order(s, k)
                got = []
                for _ in range(2 * m):
                    op = order.next()
                    got.append(("F" if op[0] == "forward" else "B", op[1]))
                    order.done(op, m)
                assert got == _torch_single_stage_order(cls, k, s, m), (k, s, m)


# -- stage_order's arguments ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy",
    [
        policies.Sync(),
        policies.GPipe(3),
        policies.OneFOneB(3),
        policies.PipeDream(3),
        policies.PipeDream2BW(3),
        policies.Async(),
        policies.Interleaved1F1B(4, virtual=2),
        policies.ZeroBubbleH1(4, virtual=2),
    ],
    ids=lambda p: type(p).__name__,
)
@pytest.mark.parametrize("stage", [4, 7, -1])
def test_stage_order_refuses_a_stage_outside_the_pipeline(policy, stage):
    # (OneFOneB(3).stage_order(3, 3) named a warm-up of -1 the user never gave, stage -1 was
    # taken as a warm-up of 4, and an interleaved order failed later with a bare KeyError)
    name = type(policy).__name__
    with pytest.raises(
        ValueError, match=rf"{name}.stage_order\(stage={stage}, num_stages=4\): stage must be an "
        r"int in 0\.\.3"
    ):  # fmt: skip
        policy.stage_order(stage, 4)
    with pytest.raises(ValueError, match=r"num_stages=0\): num_stages must be an int >= 1"):
        policy.stage_order(0, 0)
    policy.stage_order(3, 4)  # the last stage is one
