"""Staleness remedies: policy wrappers that correct the stale gradients of another policy.

Under ``PipeDream`` and ``Async`` a stage applies a gradient computed ``delay`` updates ago (the
stage's version at the update minus the version its forward used; each actor records it, see
``ActorStatistics.delays``). A remedy wraps such a policy: every decision stays the wrapped
policy's, and each gradient passes through :meth:`Remedy.correct_gradient` before the stage
accumulates it (``DelayCompensation``, ``StalenessScaledLR``: the gradient the update applies of
a minibatch, the sum of its keys' where the policy sums them into one update, as
``PipeDream2BW``), or each update's result through
:meth:`Remedy.correct_update` (``PipeMareLR``, ``SpikeCompensation``), or the remedy gives
forwards (``WeightPrediction``) or recomputing backwards (``DiscrepancyCorrection``) their
weights. Remedies nest (``DelayCompensation(StalenessScaledLR(PipeDream(4)))``: the inner
correction first) and do nothing to a gradient of delay 0, so under a flushing policy they
change nothing.

``StalenessScaledLR`` scales each gradient, as Zhang et al.'s rule scales each gradient of an
averaged update; for SGD without momentum or weight decay that is scaling the learning rate, with
momentum the scaled gradient enters the velocity, and Adam is nearly invariant to it.
``PipeMareLR`` reschedules the learning rate itself, as PipeMare does: it scales the optimizer's
step (:meth:`Policy.correct_update`), which is scaling the learning rate of that update for every
built-in optimizer (SGD with momentum and weight decay, Adam, AdamW, RMSprop, Adagrad).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from asyncnn._math._optim import SGD
from asyncnn._math._pytree import tree_map

from ._policies import _BUILTIN, PipeDream, Policy, _check_fields, policy_from_spec
from ._wrapped import WrappedPolicy

__all__ = [
    "DelayCompensation",
    "DiscrepancyCorrection",
    "PipeMareLR",
    "Remedy",
    "SpikeCompensation",
    "StalenessScaledLR",
    "WeightPrediction",
]


@dataclass(frozen=True)
class Remedy(WrappedPolicy):
    """A policy that corrects the stale gradients of ``policy`` and otherwise is ``policy``.

    Subclass it (as a frozen dataclass) and implement :meth:`correct`; every other decision is
    delegated to the wrapped policy.

    A remedy corrects the gradient a stage applies of each minibatch, as the papers' rules are
    written. Where the policy cuts a minibatch into keys and sums their gradients into one
    update (``PipeDream2BW(M)``), the stage sums the keys whose forwards used one version (so
    of one delay: under ``PipeDream2BW``, all of them) and :meth:`correct_gradient` receives
    that sum, once, when the minibatch's last key is done at the stage (or an update comes
    first). Where each key is a minibatch of its own (``Async``, with any
    ``min_update_frequency``: each gradient is corrected, then the update takes their mean) or
    an update of its own (``PipeDream(M)``), it receives each key's gradient.

    Attributes:
        policy: the wrapped policy (a spec dict, as :meth:`Policy.to_spec` gives, is rebuilt).
    """

    policy: Policy = field(default_factory=lambda: PipeDream(2))
    name: ClassVar[str] = "Remedy"
    #: whether this remedy corrects gradients (:meth:`correct`)
    corrects: ClassVar[bool] = True
    #: whether this remedy predicts the weights forwards use (:meth:`predict`)
    predicts: ClassVar[bool] = False
    #: whether this remedy changes each stale update's step (:meth:`adjust`)
    adjusts: ClassVar[bool] = False

    def __post_init__(self) -> None:
        inner: Any = self.policy
        if isinstance(inner, dict):
            inner = policy_from_spec(inner)
            object.__setattr__(self, "policy", inner)
        if not isinstance(inner, Policy):
            raise TypeError(
                f"{type(self).__name__}(policy={inner!r}): policy must be a Policy, e.g. "
                f"{type(self).__name__}(policies.PipeDream(4))"
            )
        if self.predicts_weights() and self.needs_forward_weights():
            # the correction needs the weights a gradient was computed at: under a prediction
            # those are the predicted ones, which a stage does not keep (it keeps each version's
            # true weights), so the correction would start from the wrong point
            raise ValueError(
                f"{self._chain()}: a remedy that reads the weights a key's forward used "
                "(DelayCompensation) cannot be combined with WeightPrediction, whose forwards "
                "use predicted weights that a stage does not keep; use one or the other"
            )
        if self.predicts_weights() and self.versions_kept():
            # a forward takes the prediction where there is one, so the pinned version (the
            # wrapped policy's whole rule) would be dropped without a word after the first update
            raise ValueError(
                f"{self._chain()}: WeightPrediction gives forwards predicted weights, but the "
                "wrapped policy pins them to an earlier version (PipeDream2BW); the two cannot "
                "both hold: use one or the other"
            )

    def _chain(self) -> str:
        """This remedy and the remedies it wraps, for messages: ``A(B(PipeDream))``."""
        inner = self.policy
        inside = inner._chain() if isinstance(inner, Remedy) else inner.name
        return f"{type(self).__name__}({inside})"

    # -- the remedy ------------------------------------------------------------------------------
    def correct(
        self, grads: Any, delay: int, version: int, weights: Any, forward_weights: Any
    ) -> Any:
        """This remedy's correction of a gradient (arguments as :meth:`correct_gradient`)."""
        raise NotImplementedError

    def uses_forward_weights(self) -> bool:
        """Whether :meth:`correct` reads ``forward_weights``."""
        return False

    def corrects_gradients(self) -> bool:
        return self.corrects or self.policy.corrects_gradients()

    def predicts_weights(self) -> bool:
        return self.predicts or self.policy.predicts_weights()

    def predict_weights(self, weights: Any, previous: Any, horizon: float) -> Any:
        if self.predicts:
            return self.predict(weights, previous, horizon)
        return self.policy.predict_weights(weights, previous, horizon)

    def predict(self, weights: Any, previous: Any, horizon: float) -> Any:
        """This remedy's prediction of the weights forwards use (with :attr:`predicts`)."""
        raise NotImplementedError

    def needs_forward_weights(self) -> bool:
        return self.uses_forward_weights() or self.policy.needs_forward_weights()

    def corrects_updates(self) -> bool:
        return self.adjusts or self.policy.corrects_updates()

    def correct_update(
        self, new: Any, old: Any, grads: Any, delay: float, optimizer: Any, step: int
    ) -> Any:
        inner = self.policy
        if inner.corrects_updates():
            new = inner.correct_update(new, old, grads, delay, optimizer, step)
        if delay == 0 or not self.adjusts:
            return new
        return self.adjust(new, old, grads, delay, optimizer, step)

    def adjust(
        self, new: Any, old: Any, grads: Any, delay: float, optimizer: Any, step: int
    ) -> Any:
        """This remedy's change of an update's result (with :attr:`adjusts`; arguments as
        :meth:`Policy.correct_update`)."""
        raise NotImplementedError

    def correct_gradient(
        self, grads: Any, delay: int, version: int, weights: Any, forward_weights: Any
    ) -> Any:
        inner = self.policy
        if inner.corrects_gradients():
            grads = inner.correct_gradient(grads, delay, version, weights, forward_weights)
        if delay == 0 or not self.corrects:
            return grads
        return self.correct(grads, delay, version, weights, forward_weights)

    # -- everything else is the wrapped policy's (WrappedPolicy delegates it) -----------------
    @property
    def wrapped(self) -> Policy:
        return self.policy

    def allows_capture(self, num_stages: int, traced: bool) -> bool:
        return False  # a correction per gradient: eager

    def to_spec(self) -> dict[str, Any]:
        spec = super().to_spec()
        args = {k: v for k, v in asdict(self).items() if k != "policy"}
        spec["args"] = {"policy": self.policy.to_spec(), **args}
        return spec


def _real(value: Any) -> float | None:
    """``value`` as a Python float where it is a real number (a numpy float32 from a sweep
    included; never a bool), else None."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # (an int past a float's range: not finite)
        return None


def _check_nonnegative(remedy: Any, name: str) -> None:
    """Refuses ``remedy``'s field ``name`` unless it is a finite real number >= 0, and keeps it
    as a Python float (a numpy float32 was refused as out of range; a float64 kept as numpy)."""
    value = getattr(remedy, name)
    real = _real(value)
    # (an infinite one would turn the first corrected gradient, and so the weights, into NaN)
    if real is None or not 0 <= real < math.inf:
        raise ValueError(
            f"{type(remedy).__name__}({name}={value!r}): {name} must be a finite number >= 0"
        )
    object.__setattr__(remedy, name, real)


@dataclass(frozen=True)
class DelayCompensation(Remedy):
    """DC-ASGD (Zheng et al. 2017): ``g + strength * g * g * (w_now - w_forward)``.

    A first-order Taylor correction of a stale gradient ``g`` towards the gradient at the
    current weights, with the Hessian approximated by ``strength * g * g`` (elementwise): the
    paper's DC-ASGD-c, whose ``lambda = 0.04`` is the default (its adaptive variant, DC-ASGD-a,
    which divides lambda by a running mean square of the gradients, is not offered). The stage
    keeps the weights of every version a stored key references. The corrected gradient is what
    the optimizer receives (momentum and Adam included), as in the paper's update
    ``w - lr * (g + lambda g g (w_now - w_forward))``.

    ``g`` is the gradient the update applies of a minibatch (see :class:`Remedy`): under
    ``PipeDream2BW(M)`` the minibatch's whole gradient, the sum of its ``M`` keys' (all
    computed at one version), corrected once, so the update is the same whatever ``M`` (with a
    mean loss or a ``reduction="sum"`` one alike: ``g`` is what the update applies). Under
    ``PipeDream`` it is each key's gradient, which its update applies alone; under
    ``Async(min_update_frequency=F)`` each key's (each a minibatch, of its own delay and
    forward weights), corrected before the update takes the mean of ``F``. (Before 2026-12-07
    each key of a 2BW minibatch was corrected alone: ``g * g`` being quadratic, the correction
    came out about ``1 / M`` of this one.)

    ``w_forward`` is the weights of the key's forward. Without stashing (``stash=False``) the
    backward recomputes the stage's vjp at the latest weights, so only the activations around
    the stage are stale; the correction still spans the whole ``w_now - w_forward``. It cannot
    be combined with :class:`WeightPrediction` (refused): its forwards use predicted weights.

    Attributes:
        policy: the wrapped policy.
        strength: lambda, the weight of the correction, a finite number >= 0 (0 changes
            nothing).
    """

    strength: float = 0.04
    name: ClassVar[str] = "DelayCompensation"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_nonnegative(self, "strength")

    def uses_forward_weights(self) -> bool:
        return True

    def correct(
        self, grads: Any, delay: int, version: int, weights: Any, forward_weights: Any
    ) -> Any:
        lam = self.strength
        return tree_map(
            lambda g, w, w0: g + lam * g * g * (w - w0), grads, weights, forward_weights
        )


@dataclass(frozen=True)
class StalenessScaledLR(Remedy):
    """The staleness-aware learning rate (Zhang et al. 2016): a gradient of delay ``d`` is
    scaled by ``1 / max(d, 1)``.

    The paper modulates the learning rate per gradient, ``lr / d`` (``lr`` for ``d = 0``), in an
    update that averages several gradients of different delays (``Async`` with
    ``min_update_frequency > 1``): each gradient is scaled by its own delay before the mean.
    For SGD without momentum or weight decay this is exactly the paper's update. With momentum
    the scaled gradient enters the velocity (the weight decay term is not scaled), and Adam,
    which divides by the gradients' running magnitude, is nearly invariant to the scaling: for
    a learning rate that shrinks with the delay under Adam, use :class:`PipeMareLR`.

    Attributes:
        policy: the wrapped policy.
    """

    name: ClassVar[str] = "StalenessScaledLR"

    def correct(
        self, grads: Any, delay: int, version: int, weights: Any, forward_weights: Any
    ) -> Any:
        scale = 1.0 / max(delay, 1)
        return tree_map(lambda g: g * scale, grads)


@dataclass(frozen=True)
class PipeMareLR(Remedy):
    """PipeMare's learning-rate rescheduling (Yang et al. 2021): an update ``k`` of a stage that
    applies a gradient of delay ``d`` steps with the learning rate ``lr * max(d, 1) ** -p``,
    ``p = 1 - min(k / T, 1)``.

    Early updates, when the weights move fastest, are damped by the delay; the damping fades
    out over ``T = warmup_updates`` updates of the stage. ``k`` is the stage's count of updates
    before this one (its optimizer state's ``"step"``) and ``d`` the delay of the gradient the
    update applies (the mean delay where it applies several, ``Async`` with
    ``min_update_frequency > 1``). PipeMare's delay is the stage's pipeline delay ``tau_i``;
    under ``PipeDream`` the gradients reach it (``K - s - 1``) from the stage's ``(K - s)``-th
    update on, and the warm-up's smaller delays are damped less (delay 0 or 1: not at all).

    The learning rate is rescheduled, not the gradient: the update's step is scaled,
    ``w_new = w + scale * (w_opt - w)``, ``w_opt`` the optimizer's result, which is that update
    with ``lr * scale`` for every built-in optimizer (SGD with momentum, weight decay or
    Nesterov, Adam, AdamW, RMSprop, Adagrad); the velocity or moment estimates stay as the optimizer made them.
    Combined with :class:`SpikeCompensation`, wrap it: ``PipeMareLR(SpikeCompensation(...))``
    (the other nesting is refused).

    Attributes:
        policy: the wrapped policy.
        warmup_updates: T, the updates over which the damping fades out.
    """

    warmup_updates: int = 100
    name: ClassVar[str] = "PipeMareLR"
    corrects: ClassVar[bool] = False
    adjusts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fields(self, ints=("warmup_updates",))  # as the policies' counts

    def scale(self, delay: float, step: int) -> float:
        """The factor on the learning rate of a stage's update ``step`` (0-based) that applies
        gradients of mean delay ``delay``."""
        p = 1.0 - min(step / self.warmup_updates, 1.0)
        return float(max(delay, 1.0)) ** -p

    def adjust(
        self, new: Any, old: Any, grads: Any, delay: float, optimizer: Any, step: int
    ) -> Any:
        scale = self.scale(delay, step)
        if scale == 1.0:
            return new
        return tree_map(lambda w, w0: w0 + scale * (w - w0), new, old)


@dataclass(frozen=True)
class WeightPrediction(Remedy):
    """Linear weight prediction (Kosson et al. 2020): forwards use the weights extrapolated
    along the last update step, ``w + D * (w - w_before)``, where ``D`` is the delay their
    gradients will have, so that a gradient is computed near the weights it will be applied to.

    For SGD with momentum the last step is ``-lr * v``, and this is Kosson et al.'s
    ``w - lr * D * v`` (and SpecTrain's ``w - s * lr * v``, Chen et al. 2018, whose ``v`` is the
    optimizer's smoothed gradient); with another optimizer it extrapolates that optimizer's
    last step. With ``stash=True`` the backward uses the predicted weights its forward used;
    with ``stash=False`` it recomputes at the latest weights, those the prediction aimed at (as
    SpecTrain's backward under 1F1B, whose horizon there is 0). The updates apply to the true
    weights, which are what a run returns. Before a stage's first update of a run (of a ``fit``
    call) forwards use the latest weights.

    ``D`` is ``n / F``: ``n`` the keys in flight at the stage after the update (forwarded,
    backward to come), whose gradients come back first, and ``F`` the gradients the policy sums
    into one update. Under ``PipeDream`` that is the papers' stage delay, ``K - s - 1`` for
    stage ``s`` of ``K``, from the stage's first update of a run on (the warm-up's keys are in
    flight); under ``Async(min_update_frequency=F)`` the ``j``-th forward after an update waits
    for ``(n + j) // F`` updates, ``n / F`` on average over the ``F`` forwards that use the
    prediction. Under a flush nothing is in flight at an update: ``D = 0``. It cannot wrap a
    policy that pins forwards to an earlier version (``PipeDream2BW``; a ``ValueError``).

    Attributes:
        policy: the wrapped policy.
    """

    name: ClassVar[str] = "WeightPrediction"
    corrects: ClassVar[bool] = False
    predicts: ClassVar[bool] = True

    def predict(self, weights: Any, previous: Any, horizon: float) -> Any:
        d = float(horizon)
        return tree_map(lambda w, w0: w + d * (w - w0), weights, previous)


@dataclass(frozen=True)
class SpikeCompensation(Remedy):
    """Spike compensation (Kosson et al. 2020), for SGD with momentum ``m``: an update that
    applies a gradient of delay ``D`` takes the step ``a v + b d`` instead of ``v``,

    ``w_new = w - lr * (m**D * v + (1 - m**D) / (1 - m) * d)``,

    ``d`` the gradient (plus ``weight_decay * w``) and ``v = m * v_before + d`` the momentum
    buffer, which is unchanged. Momentum spreads a gradient's effect over the following updates
    (``m**k`` at the ``k``-th); a gradient ``D`` updates late has missed the first ``D`` of them,
    so the update applies those at once (the spike, ``b = 1 + m + ... + m**(D-1)``) and damps
    the rest by ``a = m**D``: the gradient's total effect stays ``1 / (1 - m)``.

    The update's ``D`` is the mean delay of the gradients it applies (one gradient under
    ``PipeDream``). It needs ``optim.SGD`` without Nesterov momentum, dampening or clipping,
    and refuses any other optimizer at the first stale update, a subclass of ``optim.SGD``
    with its own update rule (``update_leaf`` or ``update`` overridden: a LARS) included.
    It cannot wrap a :class:`PipeMareLR` (its spike would use the unscaled learning rate):
    nest them the other way, ``PipeMareLR(SpikeCompensation(...))``.

    Attributes:
        policy: the wrapped policy.
    """

    name: ClassVar[str] = "SpikeCompensation"
    corrects: ClassVar[bool] = False
    adjusts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        inner: Policy = self.policy
        while isinstance(inner, Remedy):
            if isinstance(inner, PipeMareLR):
                raise ValueError(
                    f"{self._chain()}: SpikeCompensation's spike is lr * b * d at the "
                    "optimizer's learning rate, which an inner PipeMareLR has rescheduled; "
                    "nest them the other way, PipeMareLR(SpikeCompensation(...))"
                )
            inner = inner.policy

    def adjust(
        self, new: Any, old: Any, grads: Any, delay: float, optimizer: Any, step: int
    ) -> Any:
        m, lr, decay = _sgd_terms(optimizer, step)
        a = m**delay
        b = (1.0 - a) / (1.0 - m) if m != 1.0 else float(delay)
        if decay:
            grads = tree_map(lambda g, w0: g + decay * w0, grads, old)
        return tree_map(lambda w, w0, g: w0 + a * (w - w0) - (lr * b) * g, new, old, grads)


#: the methods of optim.SGD that make its step: a subclass overriding one has its own update rule
_SGD_UPDATE = ("update", "update_leaf", "_update_leaf", "_update_many", "_update_array")


def _sgd_terms(optimizer: Any, step: int) -> tuple[float, float, float]:
    """The momentum, learning rate (at ``step``) and weight decay of a plain SGD optimizer.

    Raises:
        TypeError: any other optimizer, an SGD subclass with its own update rule, or SGD with
            Nesterov momentum, dampening or clipping.
    """
    # the spike assumes the step lr * v of SGD's own rule: a subclass that changes the update (a
    # LARS trust ratio, a sign step) takes another step, which the correction would not match
    own = [m for m in _SGD_UPDATE if getattr(type(optimizer), m, None) is not getattr(SGD, m)]
    if isinstance(optimizer, SGD) and own:
        raise TypeError(
            f"SpikeCompensation corrects the step of optim.SGD; the run's optimizer "
            f"{type(optimizer).__qualname__} subclasses it with its own update rule "
            f"({', '.join(own)}), whose step the spike would not match: use optim.SGD, or "
            f"another remedy (PipeMareLR takes any optimizer)"
        )
    if (
        not isinstance(optimizer, SGD)
        or optimizer.nesterov
        or optimizer.dampening
        or optimizer.clip_norm is not None
    ):
        raise TypeError(
            f"SpikeCompensation corrects the step of optim.SGD(lr, momentum, weight_decay) "
            f"without Nesterov momentum, dampening or clip_norm; the run's optimizer is "
            f"{optimizer!r}"
        )
    return (
        float(optimizer.momentum),
        float(optimizer.learning_rate(step)),
        float(optimizer.weight_decay),
    )


@dataclass(frozen=True)
class DiscrepancyCorrection(Remedy):
    """PipeMare's discrepancy correction (Yang et al. 2021): without weight stashing, a backward
    recomputes at ``u = w - d * delta`` instead of the latest weights ``w``, ``d`` the key's delay
    and ``delta`` the stage's average weight change (``delta <- decay * delta + (1 - decay) *
    (w_new - w_old)`` at each update), an estimate of the weights its forward used that costs
    one copy of the weights instead of a stash of ``d``.

    Only a policy that recomputes (``stash=False``) reads it; with stashing the backward already
    uses the forward's weights. This is PipeMare's ``u = w - (tau_fwd - tau_bkwd) delta`` with
    the backward at the latest weights (``tau_bkwd = 0``) and ``tau_fwd`` the key's measured
    delay. ``delta`` starts at zero at each run (each ``fit`` call, and a fit resumed from a
    checkpoint or a run's state, which do not keep it): a stage's first update of the run makes
    it ``(1 - decay) (w_1 - w_0)``, and before that update, or for a key of delay 0, the backward
    uses the latest weights. So a fit per epoch is not one fit with an epoch-end hook here: each
    call's first backwards use a weaker correction until ``delta`` has grown back (with the
    default ``decay = 0.9``, the first update's ``delta`` is a tenth of a steady average).
    One ``decay`` serves every stage.

    Attributes:
        policy: the wrapped policy.
        decay: gamma, the average's decay.
    """

    decay: float = 0.9
    name: ClassVar[str] = "DiscrepancyCorrection"
    corrects: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        d = _real(self.decay)
        if d is None or not 0 <= d < 1:
            raise ValueError(
                f"DiscrepancyCorrection(decay={self.decay!r}): decay must be in [0, 1) (a real number)"
            )
        object.__setattr__(self, "decay", d)  # (a numpy float as a Python one, for its spec)

    def weight_change_decay(self) -> float | None:
        return float(self.decay)

    def backward_weights(self, weights: Any, weight_change: Any, delay: int) -> Any:
        weights = self.policy.backward_weights(weights, weight_change, delay)
        if weight_change is None or delay == 0:
            return weights
        d = float(delay)
        return tree_map(lambda w, v: w - d * v, weights, weight_change)


_BUILTIN.update(
    {
        p.name: p
        for p in (
            DelayCompensation,
            DiscrepancyCorrection,
            StalenessScaledLR,
            PipeMareLR,
            SpikeCompensation,
            WeightPrediction,
        )
    }
)
