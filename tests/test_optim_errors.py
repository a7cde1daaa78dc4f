"""Optimizer and schedule specs round trip; bad hyperparameters, inputs, states and specs are
refused with an error that names them."""

from __future__ import annotations

import re
from collections import OrderedDict, namedtuple
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

from asyncnn import optim
from asyncnn.backends import Backend

from _optim_cases import ALL_OPTIMIZERS, SCHEDULES

# Specs


@pytest.mark.parametrize("opt", ALL_OPTIMIZERS + [optim.AdamW(), optim.Adam()], ids=repr)
def test_spec_round_trip(opt: optim.Optimizer) -> None:
    spec = opt.to_spec()
    assert spec["name"] == type(opt).__name__
    wire = msgpack.unpackb(msgpack.packb(spec))
    assert wire == spec
    again = optim.from_spec(wire)
    assert again == opt and type(again) is type(opt)
    assert again.to_spec() == spec


def test_schedule_spec_round_trip() -> None:
    for sched in SCHEDULES.values():
        spec = msgpack.unpackb(msgpack.packb(sched.to_spec()))
        assert optim.schedule_from_spec(spec) == sched


def test_from_spec_errors() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'Lion'.*'SGD'"):
        optim.from_spec({"name": "Lion", "lr": 1.0})
    with pytest.raises(ValueError, match="bad SGD spec.*betas"):
        optim.from_spec({"name": "SGD", "betas": [0.9, 0.99]})
    with pytest.raises(ValueError, match="dict with a 'name' key"):
        optim.from_spec({"lr": 0.1})
    with pytest.raises(ValueError, match="cannot import the optimizer"):
        optim.from_spec({"name": "no_such_module_xyz:Opt"})
    with pytest.raises(ValueError, match="not a Optimizer subclass"):
        optim.from_spec({"name": "asyncnn.optim:StepLR"})
    with pytest.raises(ValueError, match="unknown schedule 'Exp'"):
        optim.from_spec({"name": "SGD", "lr": {"name": "Exp"}})


# Bad hyperparameters and bad inputs


BAD = [
    (optim.SGD, {"lr": -0.1}, ValueError, "invalid learning rate lr=-0.1"),
    (optim.SGD, {"lr": float("nan")}, ValueError, "invalid learning rate"),
    (optim.SGD, {"lr": "0.1"}, TypeError, "lr must be a float or a schedule"),
    (optim.SGD, {"momentum": -0.5}, ValueError, "invalid momentum value -0.5"),
    (optim.SGD, {"weight_decay": -1}, ValueError, "invalid weight_decay value -1"),
    (optim.SGD, {"nesterov": True}, ValueError, "Nesterov momentum requires a momentum"),
    (optim.SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "zero damp"),
    (optim.SGD, {"clip_norm": 0.0}, ValueError, "clip_norm must be > 0"),
    (optim.Adam, {"lr": -1e-3}, ValueError, "invalid learning rate"),
    (optim.Adam, {"betas": (1.0, 0.999)}, ValueError, "invalid beta parameter at index 0: 1.0"),
    (optim.Adam, {"betas": (0.9, -0.1)}, ValueError, "invalid beta parameter at index 1"),
    (optim.Adam, {"betas": 0.9}, TypeError, "betas must be a pair"),
    (optim.Adam, {"eps": -1e-8}, ValueError, "invalid eps value"),
    (optim.AdamW, {"weight_decay": -0.01}, ValueError, "AdamW: invalid weight_decay"),
    (optim.AdamW, {"amsgrad": 1}, TypeError, "amsgrad must be a bool"),
    (optim.AdamW, {"clip_norm": "big"}, TypeError, "clip_norm must be a real number"),
    (optim.StepLR, {"lr": 0.1, "step_size": 0}, ValueError, "step_size must be a positive"),
    (optim.StepLR, {"lr": 0.1, "step_size": 2, "gamma": -1}, ValueError, "gamma must be >= 0"),
    (optim.CosineAnnealing, {"lr": 0.1, "total_steps": 1.5}, ValueError, "total_steps"),
    (optim.CosineAnnealing, {"lr": 0.1, "total_steps": 9, "min_lr": 0.2}, ValueError, "min_lr"),
    (optim.LinearWarmup, {"schedule": -1.0, "warmup_steps": 3}, ValueError, "learning rate"),
    (
        optim.LinearWarmup,
        {"schedule": 0.1, "warmup_steps": 3, "start_factor": 2},
        ValueError,
        "0, 1",
    ),
]


@pytest.mark.parametrize(("cls", "kw", "exc", "match"), BAD, ids=[b[3][:30] for b in BAD])
def test_bad_hyperparameters(cls: type, kw: dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        cls(**kw)


def test_bad_update_inputs(backend: Backend) -> None:
    p = {"w": backend.asarray(np.zeros((2, 3), np.float32))}
    opt = optim.SGD(lr=0.1, momentum=0.9)
    state = opt.init(p)
    with pytest.raises(ValueError, match="grads have structure"):
        opt.update(p, {"v": p["w"]}, state)
    with pytest.raises(ValueError, match=r"shape \(3, 2\), but its parameter has shape \(2, 3\)"):
        opt.update(p, {"w": backend.asarray(np.zeros((3, 2), np.float32))}, state)
    with pytest.raises(TypeError, match=r"is float64, but its parameter is float32.*astype"):
        opt.update(p, {"w": backend.asarray(np.zeros((2, 3)))}, state)
    with pytest.raises(ValueError, match="is None"):
        opt.update(p, {"w": None}, state)
    with pytest.raises(ValueError, match=r"keys \['momentum_buffer', 'step'\].*got \['step'\]"):
        opt.update(p, p, optim.SGD().init(p))
    with pytest.raises(ValueError, match="was the state made for other parameters"):
        opt.update(p, p, {"step": 1, "momentum_buffer": [p["w"]]})
    with pytest.raises(ValueError, match="int >= 0"):
        opt.update(p, p, {"step": -1, "momentum_buffer": p})


BAD_LEAVES = [
    ("int", lambda: np.ones(3, np.int64), "is int64; only float16/32/64 and bfloat16 arrays"),
    ("bool", lambda: np.ones(3, bool), "is bool; only float"),
    ("complex", lambda: np.ones(3, np.complex128), "is complex128; only float"),
    ("python float", lambda: 1.5, "is float, not an array"),
]


@pytest.mark.parametrize(("kind", "make", "match"), BAD_LEAVES, ids=[b[0] for b in BAD_LEAVES])
@pytest.mark.parametrize("opt", ALL_OPTIMIZERS[:4], ids=repr)
def test_leaves_that_are_not_float_arrays_are_refused(
    opt: optim.Optimizer, kind: str, make: Any, match: str
) -> None:
    # they failed deep in a ufunc, or (complex) Adam computed g * g for |g|^2 without a word
    with pytest.raises(TypeError, match=r"update: parameter leaf 0 of \[\*\] " + match):
        opt.update([make()], [make()], opt.init([np.ones(3)]))


@pytest.mark.parametrize(("kind", "make", "match"), BAD_LEAVES, ids=[b[0] for b in BAD_LEAVES])
def test_clip_grad_norm_refuses_leaves_that_are_not_float_arrays(
    kind: str, make: Any, match: str
) -> None:
    # an int gradient was clipped to zeros
    with pytest.raises(TypeError, match=r"clip_grad_norm: gradient leaf 0 of \[\*\] " + match):
        optim.clip_grad_norm([make()], 1.0)


@pytest.mark.parametrize(
    "opt",
    [optim.SGD(momentum=0.9), optim.Adam(), optim.AdamW(amsgrad=True)],
    ids=lambda o: type(o).__name__,
)
def test_state_made_for_other_parameters_is_refused(backend: Backend, opt: optim.Optimizer) -> None:
    # same structure, other shapes or dtypes: broadcasting used to reshape the parameters or
    # promote float32 ones to float64 without a word
    p = {"w": backend.asarray(np.zeros(3, np.float32))}
    g = {"w": backend.asarray(np.ones(3, np.float32))}
    name = type(opt).__name__
    wider = dict(opt.init({"w": backend.asarray(np.zeros((2, 3), np.float32))}), step=1)
    with pytest.raises(ValueError, match=rf"{name}.update: state\[.*shape \(2, 3\), but its "):
        opt.update(p, g, wider)
    f64 = dict(opt.init({"w": backend.asarray(np.zeros(3))}), step=1)
    with pytest.raises(TypeError, match=rf"{name}.update: state\[.*float64, but its parameter is "):
        opt.update(p, g, f64)
    missing = dict(opt.init(p), step=1)
    missing[opt.buffer_names()[0]] = {"w": None}
    with pytest.raises(ValueError, match="is None.*other parameters"):
        opt.update(p, g, missing)


_BUILTIN_SCHEDULES = [
    optim.StepLR(0.1, 3, 0.5),
    optim.StepLR(0.1, 3, 0.0),
    optim.CosineAnnealing(0.1, 10),
    optim.LinearWarmup(0.1, 5),
    optim.LinearWarmup(optim.StepLR(0.1, 3, 0.0), 5),
]


@pytest.mark.parametrize("sched", _BUILTIN_SCHEDULES, ids=repr)
@pytest.mark.parametrize("step", [-1, -7, np.int64(-2), float("nan"), 2.5, 3.0, True, None, "3"])
def test_a_schedule_refuses_a_step_that_is_not_a_count_of_updates(sched, step) -> None:
    # (StepLR(0.1, 3, 0.5)(-1) gave 0.2, above its lr; LinearWarmup(0.1, 5)(-1) a negative
    # rate; NaN gave NaN; StepLR(0.1, 3, 0.0)(-1) a bare ZeroDivisionError)
    name = type(sched).__name__
    with pytest.raises(ValueError, match=rf"^{name}: step must be an int >= 0 \(the number of "):
        sched(step)
    with pytest.raises(ValueError, match=rf"got {re.escape(repr(step))}$"):
        sched(step)


def test_a_schedule_takes_numpy_ints_and_step_lr_decays_to_zero_with_gamma_0() -> None:
    # gamma=0 is torch's StepLR too: lr for step_size updates, then 0
    zero = optim.StepLR(0.1, 3, 0.0)
    assert [zero(t) for t in range(8)] == [0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
    for sched in _BUILTIN_SCHEDULES:
        assert sched(np.int64(4)) == sched(4) and sched(np.uint8(0)) == sched(0)


@dataclass(frozen=True)
class _LinearDecay(optim.Schedule):
    """A user schedule that forgets to stop at zero."""

    lr: float
    total_steps: int

    def __call__(self, step: int) -> float:
        return self.lr * (1.0 - step / self.total_steps)


def test_a_schedule_giving_a_negative_rate_is_an_error(backend: Backend) -> None:
    opt = optim.SGD(lr=_LinearDecay(1.0, 2))
    p = {"w": backend.asarray(np.zeros(2))}
    state = opt.init(p)
    for _ in range(3):  # rates 1, 0.5, 0
        p, state = opt.update(p, p, state)
    with pytest.raises(ValueError, match=r"_LinearDecay.*-0.5 for step 3.*>= 0"):
        opt.update(p, p, state)


class _InvDecay(optim.Schedule):
    """A user schedule that forgets @dataclass(frozen=True)."""

    def __call__(self, step: int) -> float:
        return 0.1 / (1 + step)


class _Undecorated(optim.SGD):
    """A user optimizer that forgets @dataclass(frozen=True): its fields are SGD's."""


class _OwnInit(optim.Optimizer):
    """A user optimizer that is no dataclass at all."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr, self.clip_norm = lr, None

    def buffer_names(self) -> tuple[str, ...]:
        return ()

    def update_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float) -> Any:
        return p - lr * g, ()


def test_a_schedule_that_is_not_a_dataclass_is_refused_where_an_optimizer_takes_it() -> None:
    # it trained, then failed at save or trace= with dataclasses' bare "must be called with a
    # dataclass type or instance", naming neither the schedule nor the fix
    match = r"_InvDecay subclasses optim.Schedule but is not a dataclass.*dataclass\(frozen=True\)"
    for make in (
        lambda: optim.SGD(lr=_InvDecay()),
        lambda: optim.AdamW(lr=_InvDecay()),
        lambda: optim.LinearWarmup(_InvDecay(), warmup_steps=2),
        lambda: _InvDecay().to_spec(),
    ):
        with pytest.raises(TypeError, match=match):
            make()


def test_an_optimizer_that_is_not_a_dataclass_is_refused_at_init_and_to_spec() -> None:
    # (init: a run makes every layer's state when it opens, before any step)
    p = {"w": np.ones(2)}
    match = r"_OwnInit subclasses optim.Optimizer but is not a dataclass.*dataclass\(frozen=True\)"
    with pytest.raises(TypeError, match=match):
        _OwnInit().init(p)
    with pytest.raises(TypeError, match=match):
        _OwnInit().to_spec()
    # a subclass of a dataclass has its parent's fields: it makes a spec, and is rebuilt from it
    opt = _Undecorated(lr=0.5, momentum=0.9)
    assert optim.from_spec(opt.to_spec()) == opt and opt.init(p)["momentum_buffer"]["w"].shape


@dataclass
class _Unfrozen(optim.Optimizer):
    """A user optimizer decorated without frozen=True: its hyperparameters could change mid-run."""

    lr: float = 0.1
    clip_norm: float | None = None

    def buffer_names(self) -> tuple[str, ...]:
        return ()

    def update_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float) -> Any:
        return p - lr * g, ()


@dataclass
class _UnfrozenSchedule(optim.Schedule):
    def __call__(self, step: int) -> float:
        return 0.1


@dataclass(frozen=True)
class _NoClipNorm(optim.Optimizer):
    """A user optimizer without the clip_norm field that update reads."""

    lr: float = 0.1

    def buffer_names(self) -> tuple[str, ...]:
        return ()

    def update_leaf(self, p: Any, g: Any, buffers: Any, step: int, lr: float) -> Any:
        return p - lr * g, ()


def test_an_optimizer_or_schedule_that_is_not_frozen_is_refused_as_the_docs_say() -> None:
    # (docs/concepts.md: "one that is not is refused when it makes its state or spec"; it was
    # taken, its hyperparameters changeable in place mid-run, unhashable)
    p = {"w": np.ones(2)}
    match = r"_Unfrozen subclasses optim.Optimizer but is not frozen.*dataclass\(frozen=True\)"
    with pytest.raises(TypeError, match=match):
        _Unfrozen().init(p)
    with pytest.raises(TypeError, match=match):
        _Unfrozen().to_spec()
    match = r"_UnfrozenSchedule subclasses optim.Schedule but is not frozen"
    with pytest.raises(TypeError, match=match):
        optim.SGD(lr=_UnfrozenSchedule())


def test_an_optimizer_without_lr_or_clip_norm_is_refused_at_init_naming_the_field() -> None:
    # (it was taken, and the first update, after a whole forward and backward, failed on a bare
    # AttributeError: 'NoClip' object has no attribute 'clip_norm')
    with pytest.raises(TypeError, match=r"_NoClipNorm subclasses optim.Optimizer but has no "
                       r"field 'clip_norm'.*clip_norm: float \| None = None"):  # fmt: skip
        _NoClipNorm().init({"w": np.ones(2)})


Params = namedtuple("Params", "w b")

BAD_INIT = [
    ("namedtuple", lambda: Params(np.ones(2), np.ones(1)), TypeError,
     r"Adam.init: params hold arrays inside Params\(...\).*use x._asdict\(\) or tuple\(x\)"),
    ("OrderedDict", lambda: OrderedDict(w=np.ones(2)), TypeError,
     r"Adam.init: params hold arrays inside OrderedDict\(...\).*use dict\(x\)"),
    ("int", lambda: {"w": np.ones(3, int)}, TypeError,
     r"Adam.init: parameter leaf 0 of \{'w': \*\} is int64; only float16/32/64 and bfloat16"),
    ("None", lambda: {"w": np.ones(2), "b": None}, TypeError,
     r"Adam.init: parameter leaf 0 of \{'b': \*, 'w': \*\} is NoneType, not an array"),
    ("python float", lambda: [np.ones(2), 1.5], TypeError,
     r"Adam.init: parameter leaf 1 of \[\*, \*\] is float, not an array"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "make", "exc", "match"), BAD_INIT, ids=[b[0] for b in BAD_INIT])
def test_init_refuses_what_update_refuses(kind: str, make: Any, exc: type, match: str) -> None:
    # init checked nothing: a namedtuple failed deep in numpy ("inhomogeneous shape"), an
    # OrderedDict gave object-array buffers and an int leaf int buffers, without a word
    with pytest.raises(exc, match=match):
        optim.Adam().init(make())


def test_init_refuses_leaves_of_every_optimizer() -> None:
    for opt in ALL_OPTIMIZERS:
        with pytest.raises(TypeError, match=rf"{type(opt).__name__}.init: parameter leaf 0 "):
            opt.init([np.ones(3, bool)])


def test_update_names_the_fix_for_a_container_pytrees_keep_whole() -> None:
    # (it said "parameter leaf 0 of * is Params, not an array": the fix is vjp's)
    p = Params(np.ones(2), np.ones(1))
    with pytest.raises(TypeError, match=r"update: params hold arrays inside Params\(...\)"):
        optim.SGD().update(p, p, {"step": 0})


def test_adam_takes_betas_as_a_numpy_pair() -> None:
    # (refused as "must be a pair (beta1, beta2)", which a pair it was)
    opt = optim.Adam(lr=1e-3, betas=np.array([0.8, 0.99]))
    assert opt.betas == (0.8, 0.99) and all(type(b) is float for b in opt.betas)
    assert optim.from_spec(opt.to_spec()) == opt


def test_a_float16_adam_buffer_of_another_dtype_than_float32_or_float16_is_refused(
    backend: Backend,
) -> None:
    # a float16 parameter's moments are float32 (float16 in an older state, taken too); any
    # other dtype is refused, the message saying which dtypes the buffer may have
    opt = optim.Adam()
    p = {"w": backend.asarray(np.zeros(3, np.float16))}
    g = {"w": backend.asarray(np.ones(3, np.float16))}
    for dt in (np.float32, np.float16):
        state = {**opt.init(p), "exp_avg_sq": {"w": backend.asarray(np.zeros(3, dt))}}
        opt.update(p, g, state)
    f64 = {**opt.init(p), "exp_avg_sq": {"w": backend.asarray(np.zeros(3))}}
    said = (
        r"Adam.update: state\['exp_avg_sq'\] leaf 0 of .* is float64, but its parameter is "
        r"float16; Adam keeps the buffers of a float16 parameter in float32 \(float16 ones, "
        r"as an older state holds them, are taken too\)"
    )
    with pytest.raises(TypeError, match=said):
        opt.update(p, g, f64)
    # SGD's momentum buffer is kept in the parameter's dtype: a float32 one is another state's
    sgd = optim.SGD(momentum=0.9)
    wide = {"step": 1, "momentum_buffer": {"w": backend.asarray(np.zeros(3, np.float32))}}
    with pytest.raises(TypeError, match=r"is float32, but its parameter is float16; was the"):
        sgd.update(p, g, wide)
