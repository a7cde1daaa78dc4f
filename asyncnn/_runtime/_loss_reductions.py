"""The check that each loss of a run is the reduction over rows the runtime takes it for
(:func:`check_loss_reductions`): a mean of its rows' losses, unless it declares
``reduction = "sum"`` (``sums_over_rows``).

A flush (``GPipe(M)``, ``OneFOneB(M)``) weights each key's loss by its share of the
minibatch's rows (``_loss_weights``), as a mean's; a sum taken for a mean trains at ``1/M``
of ``Sync``'s speed, silently: the check refuses it as the run opens. Apart from the loss
actor and its weights because it runs once, before any actor, on the graph alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._errors import GraphError

from ._loss_actor import sums_over_rows

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node
    from ._policies import Policy

__all__ = ["check_loss_reductions"]


#: relative difference within which a loss's value on two rows counts as the mean (or the sum)
#: of its values on each row alone; far above float64 rounding, far below the factor of 2
#: between the two
_RTOL = 1e-6


def check_loss_reductions(
    graph: Graph, policy: Policy, shapes: Mapping[str, Sequence[int]] | None = None
) -> None:
    """Checks that each loss of ``graph`` is the reduction over rows the run takes it for,
    where ``policy`` would train or report otherwise.

    The runtime takes a loss for a mean over its rows unless it declares ``reduction = "sum"``
    (a field or a class attribute; :func:`~asyncnn._runtime._loss_actor.sums_over_rows`). Each
    loss is evaluated once on two rows of seeded random data of its inputs' shapes (integer
    labels in ``[0, C)``), and on each row alone: the two-row value is the mean of the one-row
    values (weighted by ``mean_weight`` where the loss has one), their sum, or neither.

    - A loss that behaves as a sum without declaring it, or declares a sum and behaves as a
      mean, under a policy that splits a minibatch into keys and scales each key's gradient by
      its share of the rows (``GPipe(M)``, ``OneFOneB(M)``, ``PipeDream2BW(M)``, M > 1): refused,
      since it would train at ``1/M`` (or ``M`` times) the speed of ``Sync``. Elsewhere
      (``Sync``, ``PipeDream``, ``Async``), where each key's gradient is its own loss's, training
      is exact but the losses the run combines (the minibatch's, the epoch's, ``evaluate``'s)
      are combined as the wrong reduction: a warning.
    - A loss that is neither (a batch-level loss: in-batch negatives, a batch statistic) under a
      policy that splits a minibatch: each key's loss is of its own rows, so the minibatch's is
      not the loss of all its rows at once, as under ``Sync``: a warning (a loss per microbatch
      may be meant). Under no split it is exact: nothing.

    A loss that cannot be evaluated so (it fails, gives NaN, or an input's size is unknown) and
    the policy of a replay (which does what the recorded run did) are left alone.

    Args:
        graph: the network, checked (``validate``) already.
        policy: the run's policy.
        shapes: each node's output shape, as ``validate`` returns it; by default
            ``graph.shapes``, which it sets.

    Raises:
        GraphError: naming the loss, its module, the policy and the fix.
    """
    from ._wrapped import Replay  # (the policies import the graph's machinery)

    if isinstance(policy, Replay):
        return
    shapes = graph.shapes if shapes is None else shapes
    split, scaled = _splits(policy)
    for name in graph.losses:
        node = graph.nodes[name]
        behaves = _row_reduction(graph, node, shapes)
        if behaves is None or behaves == "mean" and not _declares_sum(node.module):
            continue
        if behaves == "sum" and _declares_sum(node.module):
            continue
        if behaves == "neither":
            if split:
                _warn(
                    f"loss {name!r} ({node.module!r}) is neither a mean nor a sum of its rows' "
                    "losses (on two rows of random data it came out as neither: a batch-level "
                    f"loss); {policy!r} splits each minibatch into microbatches and computes "
                    "this loss on each microbatch's rows alone, the minibatch's loss being "
                    "their mean weighted by rows, so training differs from Sync's and depends "
                    "on the microbatches. Use a policy of one microbatch (Sync, or "
                    "microbatches=1) for the loss of the whole minibatch, or filter this "
                    "warning where a loss per microbatch is meant"
                )
            continue
        _mismatch(name, node.module, behaves, policy, refuse=split and scaled)


def _declares_sum(module: Any) -> bool:
    return sums_over_rows(module)


def _splits(policy: Policy) -> tuple[bool, bool]:
    """Whether ``policy`` cuts a minibatch into several keys, and whether it scales each key's
    loss gradient by its share of the minibatch's rows (its ``loss_cotangent``)."""
    try:
        split = len(policy.split(64)) > 1
    except Exception:  # (a custom split that refuses 64 rows: its microbatches say)
        split = getattr(policy, "microbatches", 1) != 1
    try:
        scaled = float(policy.loss_cotangent(1.0, 2.0)) != 1.0
    except Exception:  # (the run will say what is wrong with it)
        scaled = True
    return split, scaled


def _mismatch(name: str, module: Any, behaves: str, policy: Policy, refuse: bool) -> None:
    """Refuses (or, where training is exact, warns of) a loss whose declared reduction over its
    rows is not what its value is."""
    cls = getattr(type(module), "__name__", "the loss")
    m = getattr(policy, "microbatches", None)
    m = str(m) if type(m) is int and m > 1 else "M"
    if behaves == "sum":
        what = (
            f"loss {name!r} ({module!r}) sums over its rows: on two rows of random data its value "
            "came out as the sum of its rows' losses, not their mean; but it does not declare "
            "reduction='sum', so the run takes it for a mean"
        )
        fix = (
            f"Declare it: give {cls} a field or class attribute reduction = 'sum' (as "
            "nn.MSELoss(reduction='sum')), or divide by the rows (ops.mean, or the sum / "
            "pred.shape[0]) to make it a mean"
        )
        trains, reports = f"1/{m} of Sync's speed", f"1/{m} of"
    else:
        what = (
            f"loss {name!r} ({module!r}) declares reduction='sum' but its value is the mean of "
            "its rows' losses (on two rows of random data), not their sum"
        )
        fix = (
            "Make it a sum (ops.sum over the rows), or drop the declaration (reduction='mean', "
            "the default) to have it taken for the mean it is"
        )
        trains, reports = f"{m} times Sync's speed", f"{m} times"
    if refuse:
        raise GraphError(
            f"{what}. {policy!r} splits each minibatch into {m} microbatches and weights each "
            f"one's loss by its share of the rows (as a mean's), so this loss would train at "
            f"{trains}, and report {reports} its loss. {fix}"
        )
    _warn(
        f"{what}. Training under {policy!r} is exact (each key's gradient is its own loss's), "
        "but the losses the run combines (a minibatch's keys', an epoch's minibatches', "
        "Trainer.evaluate's batches') are combined as the wrong reduction, and a policy that "
        f"splits minibatches (GPipe(M), OneFOneB(M)) would refuse it. {fix}"
    )


def _warn(message: str) -> None:
    from ._lifecycle import _user_stacklevel  # (late: it imports the run's machinery)

    warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())


def _row_reduction(graph: Graph, node: Node, shapes: Mapping[str, Sequence[int]]) -> str | None:
    """How loss ``node`` reduces over its rows: ``"mean"``, ``"sum"`` or ``"neither"``, found by
    evaluating it on two rows of seeded random data and on each row alone; None where that
    cannot tell (an input's shape unknown, the loss failing or not finite, or each row's loss
    0 or the two cancelling)."""
    args = _probe_inputs(graph, node, shapes)
    if args is None:
        return None
    module = node.module
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            both = _scalar(module({}, *args))
            rows = [_scalar(module({}, *[a[i : i + 1] for a in args])) for i in (0, 1)]
            weights = _mean_weights(module, args)
    except Exception:  # (a loss that refuses the probe: the run will say, under its own name)
        return None
    if both is None or None in rows:
        return None
    one, two = rows[0], rows[1]
    assert one is not None and two is not None
    total = one + two
    scale = max(abs(one), abs(two), abs(both))
    if not np.isfinite([both, one, two]).all() or abs(total) <= 1e3 * _RTOL * scale:
        return None  # (a sum and a mean of 0 look alike)
    w0, w1 = weights
    mean = (w0 * one + w1 * two) / (w0 + w1)
    if abs(both - mean) <= _RTOL * scale:
        return "mean"
    if abs(both - total) <= _RTOL * scale:
        return "sum"
    return "neither"


def _probe_inputs(
    graph: Graph, node: Node, shapes: Mapping[str, Sequence[int]]
) -> list[np.ndarray[Any, Any]] | None:
    """Two rows of seeded random data for each input of loss ``node``: floats in
    ``[0.1, 0.9)`` (probabilities, logits, targets alike), in float64 whatever the run's dtype
    (the comparison is of float64 roundings); integers in ``[0, C)``, ``C`` the smallest size
    past the batch dimension of its float inputs (the classes, for class-index labels: a
    sequence's length is no larger a bound there); None where a shape is unknown."""
    found = []
    for src in node.inputs:
        shape = shapes.get(src)
        if shape is None or len(shape) == 0 or 0 in tuple(shape)[1:]:
            return None
        source = graph.nodes[src]
        dtype = np.dtype(source.dtype) if source.kind == "input" else np.dtype(np.float64)
        found.append(((2, *tuple(shape)[1:]), dtype))
    rng = np.random.default_rng(0)
    sizes = [d for shape, dtype in found if dtype.kind == "f" for d in shape[1:]]
    classes = max(1, min(sizes, default=2))
    args: list[np.ndarray[Any, Any]] = []
    for shape, dtype in found:
        if dtype.kind == "f":
            args.append(rng.uniform(0.1, 0.9, shape))
        elif dtype.kind == "b":
            args.append(rng.integers(0, 2, shape).astype(bool))
        elif dtype.kind in "iu":
            args.append(rng.integers(0, classes, shape).astype(dtype))
        else:
            return None
    return args


def _scalar(value: Any) -> float | None:
    from asyncnn.backends import to_numpy

    out = np.asarray(to_numpy(value))
    return float(out) if out.size == 1 and out.dtype.kind in "fiu" else None


def _mean_weights(module: Any, args: list[np.ndarray[Any, Any]]) -> tuple[float, float]:
    """What each row weighs in the loss's mean: its labels' weight where the loss says what its
    mean divides by (``mean_weight``, as the run weighs a key), else 1."""
    weigh = getattr(module, "mean_weight", None)
    if callable(weigh) and len(args) == 2:
        w = [weigh(args[1][i : i + 1]) for i in (0, 1)]
        if None not in w and w[0] + w[1]:
            return float(w[0]), float(w[1])
    return 1.0, 1.0
