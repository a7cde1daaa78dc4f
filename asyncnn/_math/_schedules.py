"""Learning-rate schedules: frozen records called with the number of updates already done.

``schedule(step)`` is the learning rate of update number ``step + 1``: an optimizer asks its
schedule with ``state["step"]`` (0 on the first update), which is torch's ``scheduler.step()``
called once after every ``optimizer.step()``. The formulas are torch's closed forms, so a schedule
carries no state of its own and any step can be asked for in any order (resuming, replaying).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from ._imports import import_by_path

__all__ = [
    "CosineAnnealing",
    "LinearWarmup",
    "Schedule",
    "StepLR",
    "check_dataclass",
    "check_lr",
    "schedule_from_spec",
]


def _number(owner: str, name: str, value: Any) -> float:
    # bool is an int to Python, but passing True as a rate is always a mistake
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    return float(value)


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def _step(owner: str, step: Any) -> int:
    """``step`` checked as the number of updates already done: an int >= 0 (numpy's too)."""
    # a negative step read the formulas outside their domain (StepLR(0.1, 3, 0.5)(-1) was 0.2,
    # above lr; with gamma=0 a ZeroDivisionError), and NaN gave NaN
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(
            f"{owner}: step must be an int >= 0 (the number of updates already done), got {step!r}"
        )
    return int(step)


def check_dataclass(obj: Any, base: str) -> None:
    """Refuses ``obj`` unless its class is a frozen dataclass: ``to_spec`` lists its fields,
    which saving a checkpoint and tracing a run need, and ``from_spec`` rebuilds it from them;
    a run takes them as fixed.

    Args:
        obj: a schedule or an optimizer.
        base: the public base class it subclasses, named in the message (``"Schedule"``).

    Raises:
        TypeError: naming the class and saying to decorate it.
    """
    cls = type(obj)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(
            f"{cls.__name__} subclasses optim.{base} but is not a dataclass: decorate it with "
            "@dataclasses.dataclass(frozen=True) so that it is saved, traced and rebuilt by "
            "its fields (a checkpoint, a trace and from_spec need them)"
        )
    params = getattr(cls, "__dataclass_params__", None)
    if params is not None and not params.frozen:
        raise TypeError(
            f"{cls.__name__} subclasses optim.{base} but is not frozen: decorate it with "
            "@dataclasses.dataclass(frozen=True); a run, its trace and its checkpoints take its "
            "fields as fixed (one changed in place mid-run would train on values no trace "
            "records)"
        )


class Schedule(abc.ABC):
    """A learning rate as a function of the number of updates already done.

    Subclasses are frozen dataclasses; :meth:`to_spec` lists their fields, so a subclass whose
    fields are numbers (or nested schedules) serialises with no extra code. One that is not a
    dataclass is refused where an optimizer (or a schedule) takes it.
    """

    @abc.abstractmethod
    def __call__(self, step: int) -> float:
        """The learning rate for the update that follows ``step`` updates.

        Args:
            step: the number of updates already done, an int >= 0 (numpy's ints too).

        Raises:
            ValueError: (the built-in schedules) a step that is not an int >= 0: a negative,
                float, NaN or bool one, naming the schedule and the step.
        """

    def to_spec(self) -> dict[str, Any]:
        """A plain dict (msgpack-able) that :func:`schedule_from_spec` turns back into this."""
        check_dataclass(self, "Schedule")
        spec: dict[str, Any] = {"name": _spec_name(type(self))}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            spec[field.name] = value.to_spec() if isinstance(value, Schedule) else value
        return spec


def check_lr(owner: str, lr: Any) -> float | Schedule:
    """``lr`` checked as a learning rate: a non-negative number (made a float) or a Schedule.

    Raises:
        TypeError: for anything that is neither, or a schedule that is not a dataclass.
        ValueError: for a negative number.
    """
    if isinstance(lr, Schedule):
        # here, not at the first save or trace=, after a whole fit
        check_dataclass(lr, "Schedule")
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(
            f"{owner}: lr must be a float or a schedule such as StepLR(0.1, step_size=10), "
            f"got {lr!r}"
        )
    value = float(lr)
    if not value >= 0.0:  # written so that NaN fails too
        raise ValueError(f"{owner}: invalid learning rate lr={lr!r}: it must be >= 0")
    return value


def _base(lr: float | Schedule, step: int) -> float:
    return lr(step) if isinstance(lr, Schedule) else lr


@dataclass(frozen=True)
class StepLR(Schedule):
    """``lr * gamma ** (step // step_size)``: decays by ``gamma`` every ``step_size`` updates.

    Args:
        lr: the learning rate of the first ``step_size`` updates.
        step_size: number of updates between two decays.
        gamma: the factor of each decay, >= 0 (0 drops the rate to 0 at the first decay and
            above 1 the rate grows, up to inf, as torch's ``StepLR`` does).
    """

    lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        lr = check_lr("StepLR", self.lr)
        if isinstance(lr, Schedule):
            raise TypeError("StepLR: lr must be a float; to chain schedules use LinearWarmup")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "step_size", _positive_int("StepLR", "step_size", self.step_size))
        gamma = _number("StepLR", "gamma", self.gamma)
        if not gamma >= 0.0:
            raise ValueError(f"StepLR: gamma must be >= 0, got {gamma!r}")
        object.__setattr__(self, "gamma", gamma)

    def __call__(self, step: int) -> float:
        step = _step("StepLR", step)
        try:
            factor = self.gamma ** (step // self.step_size)
        except OverflowError:  # gamma > 1 after very many updates: inf, as torch's rate grows to
            return math.inf if self.lr else 0.0  # (0 stays 0 there, not 0 * inf = nan)
        return self.lr * factor


@dataclass(frozen=True)
class CosineAnnealing(Schedule):
    """Half a cosine from ``lr`` down to ``min_lr`` over ``total_steps`` updates.

    ``min_lr + (lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2``, torch's
    ``CosineAnnealingLR(T_max=total_steps, eta_min=min_lr)``. Unlike torch, whose formula rises
    again past ``T_max``, the rate stays at ``min_lr`` once ``total_steps`` updates are done.

    Args:
        lr: the learning rate of the first update.
        total_steps: the number of updates the rate takes to reach ``min_lr``.
        min_lr: the final learning rate.
    """

    lr: float
    total_steps: int
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        lr = check_lr("CosineAnnealing", self.lr)
        if isinstance(lr, Schedule):
            raise TypeError(
                "CosineAnnealing: lr must be a float; to add a warm-up write "
                "LinearWarmup(CosineAnnealing(lr, total_steps), warmup_steps)"
            )
        object.__setattr__(self, "lr", lr)
        total = _positive_int("CosineAnnealing", "total_steps", self.total_steps)
        object.__setattr__(self, "total_steps", total)
        min_lr = _number("CosineAnnealing", "min_lr", self.min_lr)
        if not 0.0 <= min_lr <= lr:
            raise ValueError(f"CosineAnnealing: min_lr must lie in [0, lr={lr}], got {min_lr!r}")
        object.__setattr__(self, "min_lr", min_lr)

    def __call__(self, step: int) -> float:
        step = _step("CosineAnnealing", step)
        if step >= self.total_steps:
            return self.min_lr
        cosine = 1.0 + math.cos(math.pi * step / self.total_steps)
        return self.min_lr + (self.lr - self.min_lr) * cosine / 2.0


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """Multiplies a learning rate (or a schedule) by a factor rising linearly to 1.

    The factor is ``start_factor + (1 - start_factor) * min(step, warmup_steps) / warmup_steps``,
    torch's ``LinearLR(start_factor, end_factor=1.0, total_iters=warmup_steps)``; the wrapped
    schedule is asked at the same step, as torch's ``ChainedScheduler`` of the two would. So
    ``LinearWarmup(CosineAnnealing(1e-3, 1000), 100)`` warms up while the cosine already runs.
    (The rate is always this product; torch's chain gives the same rates except around a
    ``CosineAnnealing`` with ``min_lr > 0``, whose recursive form torch does not multiply through.)

    Args:
        schedule: the learning rate (float) or the schedule to warm up.
        warmup_steps: the number of updates until the factor reaches 1.
        start_factor: the factor of the first update, in ``[0, 1]`` (default 0: the first
            update's rate is 0; torch's ``LinearLR`` defaults to 1/3 and refuses 0).
    """

    schedule: float | Schedule
    warmup_steps: int
    start_factor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", check_lr("LinearWarmup", self.schedule))
        warmup = _positive_int("LinearWarmup", "warmup_steps", self.warmup_steps)
        object.__setattr__(self, "warmup_steps", warmup)
        start = _number("LinearWarmup", "start_factor", self.start_factor)
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"LinearWarmup: start_factor must lie in [0, 1], got {start!r}")
        object.__setattr__(self, "start_factor", start)

    def __call__(self, step: int) -> float:
        step = _step("LinearWarmup", step)
        done = min(step, self.warmup_steps) / self.warmup_steps
        factor = self.start_factor + (1.0 - self.start_factor) * done
        return _base(self.schedule, step) * factor


_BUILTINS: dict[str, type[Schedule]] = {
    cls.__name__: cls for cls in (StepLR, CosineAnnealing, LinearWarmup)
}


def _spec_name(cls: type) -> str:
    if _BUILTINS.get(cls.__name__) is cls:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(spec: Any, builtins: dict[str, type], base: type, what: str) -> type:
    """The class a spec's ``"name"`` names: a built-in by name, else ``"module:Class"``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"a {what} spec is a dict with a 'name' key, got {spec!r}")
    name = spec["name"]
    if name in builtins:
        return builtins[name]
    if ":" in name:
        return import_by_path(name, base, what)
    raise ValueError(
        f"unknown {what} {name!r}: use one of {sorted(builtins)} or 'package.module:Class'"
    )


def build_from_spec(cls: type, kwargs: dict[str, Any], spec: Any) -> Any:
    """``cls(**kwargs)``, the object ``spec`` describes; keywords the class does not take, or
    one it needs and ``spec`` lacks, said as a ``ValueError`` naming the spec (a ``TypeError``
    of the constructor's own checks goes on as it is)."""
    try:
        return cls(**kwargs)
    except TypeError as exc:
        if "unexpected keyword" not in str(exc) and "missing" not in str(exc):
            raise
        raise ValueError(f"bad {cls.__name__} spec {spec!r}: {exc}") from exc


def schedule_from_spec(spec: dict[str, Any]) -> Schedule:
    """The schedule described by ``spec`` (from :meth:`Schedule.to_spec`)."""
    cls = resolve_class(spec, _BUILTINS, Schedule, "schedule")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    for key, value in kwargs.items():
        if isinstance(value, dict):
            kwargs[key] = schedule_from_spec(value)
    return build_from_spec(cls, kwargs, spec)
