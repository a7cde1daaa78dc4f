"""Which modules are stochastic (``Module.stochastic``): a user module whose ``__call__`` reads
its ``rng``, or one holding a stochastic module in a field (a tuple or a list); and what a run
gives such a layer: a seeded Generator per key in training, None in evaluate and predict, and no
CUDA-graph capture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._math._nn import _module

from _reference import assert_params_equal


@dataclass(frozen=True)
class DropLinear(nn.Module):
    """A user module that draws its own dropout from the rng it is given."""

    n_in: int
    n_out: int

    def init_params(self, init: nn.Initializer) -> Any:
        return nn.Linear(self.n_in, self.n_out).init_params(init)

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        SEEN.append((x.shape[0], type(rng).__name__))
        return ops.dropout(nn.Linear(self.n_in, self.n_out)(params, x), 0.5, rng)


#: the rows and the type of rng of each call of DropLinear, in call order
SEEN: list[tuple[int, str]] = []


@dataclass(frozen=True)
class Noisy(nn.Module):
    """Adds noise when given an rng, tested with ``is not None``."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if rng is not None:
            return x + rng.standard_normal(x.shape)
        return x


@dataclass(frozen=True)
class Accepts(nn.Module):
    """Takes an rng and never reads it: deterministic."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.tanh(x)


@dataclass(frozen=True)
class InClosure(nn.Module):
    """Reads its rng only inside a nested function."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        def drop(y: Any) -> Any:
            return ops.dropout(y, 0.1, rng)

        return drop(x)


@dataclass(frozen=True)
class NotStochastic(Noisy):
    """Reads its rng, and says it draws nothing: the class's own answer wins."""

    stochastic = False


@dataclass(frozen=True)
class HoldsList(nn.Module):
    """Holds its modules in a list field, passing the rng on to them."""

    layers: list[nn.Module]

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        for m in self.layers:
            x = m({}, x, rng=rng)
        return x

    @property
    def stochastic(self) -> bool:  # as its modules (it only passes the rng on)
        return any(m.stochastic for m in self.layers)


@dataclass(frozen=True)
class ListHolder(nn.Module):
    """Holds its modules in a list field (its __call__ reads no rng)."""

    layers: list[nn.Module]

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return x


@dataclass(frozen=True)
class Wider(nn.Linear):
    """A user subclass of a built-in with no __call__ of its own: as the built-in."""


@dataclass(frozen=True)
class KwDrop(nn.Module):
    """Takes its rng through ``**kwargs``."""

    p: float = 0.5

    def __call__(self, params: Any, x: Any, **kw: Any) -> Any:
        SEEN.append((x.shape[0], type(kw.get("rng")).__name__))
        return ops.dropout(x, self.p, kw.get("rng"))


@dataclass(frozen=True)
class KwUnread(nn.Module):
    """Accepts keywords and never reads them: deterministic."""

    def __call__(self, params: Any, x: Any, **_: Any) -> Any:
        return ops.tanh(x)


@dataclass(frozen=True)
class KwDeclared(KwDrop):
    """Takes keywords, and says it draws nothing: the class's own answer wins."""

    stochastic = False


@dataclass(frozen=True)
class NamedRngAndKw(nn.Module):
    """Reads other keywords; its rng, a parameter of its own, never reaches them."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None, **kw: Any) -> Any:
        return x * kw.get("scale", 1.0)


def _bare_decorator(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:  # (no functools.wraps: fn is hidden)
        return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class Decorated(nn.Module):
    """Reads its rng behind a decorator that hides the function it wraps."""

    @_bare_decorator
    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.dropout(x, 0.5, rng)


def test_a_user_module_that_may_read_its_rng_through_kwargs_is_stochastic() -> None:
    # KwDrop was not: a run passed it rng=None and its dropout never applied, without a word
    assert KwDrop().stochastic and Decorated().stochastic
    assert nn.Sequential(nn.Linear(2, 2), KwDrop()).stochastic
    assert not KwUnread().stochastic  # its keywords never read: it cannot reach an rng
    assert not NamedRngAndKw().stochastic  # rng is a parameter of its own, never read
    assert not KwDeclared().stochastic  # an explicit answer wins
    graph = ann.Graph.sequential(
        [nn.Linear(4, 8), KwDrop(), nn.Linear(8, 2)], loss=nn.CrossEntropyLoss(), stages=2,
        input_shape=(None, 4),
    )  # fmt: skip
    tr = ann.Trainer(graph, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0)
    SEEN.clear()
    tr.fit(_data(), batch_size=4)
    assert SEEN and {t for rows, t in SEEN if rows == 4} == {"Generator"}


def test_a_user_module_that_reads_its_rng_is_stochastic() -> None:
    # its dropout or noise was silently off for a whole fit: the runtime passed rng=None to a
    # layer not stochastic, and the default said no unless a field held a Dropout
    assert DropLinear(2, 3).stochastic and Noisy().stochastic and InClosure().stochastic
    assert nn.Sequential(nn.Linear(2, 2), Noisy()).stochastic
    assert nn.Residual(Noisy()).stochastic
    assert not Accepts().stochastic  # a parameter accepted, never read
    assert not NotStochastic().stochastic  # an explicit answer wins
    assert not Wider(2, 3).stochastic
    # the built-ins keep their own answers: containers pass the rng on and draw nothing
    assert not nn.Sequential(nn.Linear(2, 2), nn.ReLU()).stochastic
    assert not nn.Residual(nn.Linear(2, 2)).stochastic
    assert not nn.MultiHeadAttention(4, 2).stochastic
    assert NoisyAttention(4, 2).stochastic  # (a built-in's own answer no longer hides it)


@dataclass(frozen=True)
class NoisyAttention(nn.MultiHeadAttention):
    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        out = super().__call__(params, x, rng=rng)
        return out if rng is None else out + rng.normal(size=out.shape)


def test_a_read_inside_a_comprehension_counts() -> None:
    # from 3.12 a comprehension is inlined, and 3.13 fuses a store and a load of the next name
    # into one instruction (STORE_FAST_LOAD_FAST): its read of rng was missed there
    src = (
        "def call(self, params, xs, *, rng=None):\n"
        "    return [rng.normal() + t for t in xs]\n"
        "def call2(self, params, xs, *, rng=None):\n"
        "    out = [t for t in xs]\n"
        "    return [rng.normal(size=t.shape) for t in out]\n"
        "def call3(self, params, xs, *, rng=None):\n"
        "    return [t for t in xs]\n"
    )
    scope: dict[str, Any] = {}
    exec(compile(src, "<module source>", "exec"), scope)
    assert _module._code_reads(scope["call"], "rng")
    assert _module._code_reads(scope["call2"], "rng")
    assert not _module._code_reads(scope["call3"], "rng")


def test_modules_held_in_a_list_field_are_scanned() -> None:
    # (only tuple fields were: a Dropout in a list was not seen)
    assert ListHolder([nn.Linear(2, 2), nn.Dropout(0.5)]).stochastic
    assert not ListHolder([nn.Linear(2, 2), nn.ReLU()]).stochastic
    assert HoldsList([Noisy()]).stochastic and not HoldsList([Accepts()]).stochastic


def test_the_bytecode_is_read_once_per_class(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True)
    class Fresh(nn.Module):
        def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
            return ops.dropout(x, 0.5, rng)

    reads = []
    real = _module.dis.get_instructions

    def counted(code: Any) -> Any:
        reads.append(code)
        return real(code)

    monkeypatch.setattr(_module.dis, "get_instructions", counted)
    assert all(Fresh().stochastic for _ in range(3))
    assert len(reads) == 1


def _graph(first: nn.Module) -> ann.Graph:
    return ann.Graph.sequential(
        [first, nn.Linear(8, 2)], loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 4)
    )


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((8, 4)).astype(np.float32), "y": rng.integers(0, 2, 8)}


def test_a_trainer_gives_a_user_module_reading_its_rng_a_generator_in_training_only() -> None:
    def train() -> tuple[dict[str, Any], list[tuple[int, str]]]:
        tr = ann.Trainer(
            _graph(DropLinear(4, 8)), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
            seed=0,
        )  # fmt: skip
        SEEN.clear()
        tr.fit(_data(), batch_size=4)
        trained = list(SEEN)
        SEEN.clear()
        tr.evaluate(_data())
        tr.predict({"x": _data()["x"]})
        assert SEEN and {t for _, t in SEEN} == {"NoneType"}  # evaluation mode: no dropout
        return tr.params, trained

    (first, trained), (second, _) = train(), train()
    # (the graph's check of one row, in evaluation mode, then the two minibatches: these got
    # None too)
    assert trained == [(1, "NoneType"), (4, "Generator"), (4, "Generator")]
    assert_params_equal(first, second)  # seeded per key: bit-identical run to run
    # and the dropout did act: the run differs from the same model with none
    plain = ann.Trainer(_graph(nn.Linear(4, 8)), optimizer=optim.SGD(lr=0.1),
                        policy=policies.Sync(), seed=0)  # fmt: skip
    assert_params_equal(plain.params, ann.Trainer(_graph(DropLinear(4, 8)), optim.SGD(lr=0.1),
                                                  policies.Sync(), seed=0).params)  # fmt: skip
    plain.fit(_data(), batch_size=4)
    assert not np.array_equal(first["stage0"][0]["weight"], plain.params["stage0"][0]["weight"])


def test_a_layer_reading_its_rng_is_a_stochastic_actor_kept_out_of_capture() -> None:
    # the actor draws a Generator per key for it, and CUDA graphs (which would replay one
    # draw for every key) never capture it
    seen = {}

    async def main() -> None:
        async with ann.open_run(
            _graph(DropLinear(4, 8)), optim.SGD(lr=0.1), policies.Sync(), seed=0
        ) as run:
            for name in ("stage0", "stage1"):
                seen[name] = run.local[name].stochastic
            seen["rng"] = [type(r).__name__ for r in run.local["stage0"]._rng(0)]

    anyio.run(main)
    assert seen == {"stage0": True, "stage1": False, "rng": ["Generator"]}


def test_a_user_module_in_a_plain_loop_draws_from_the_seeded_rng() -> None:
    # (train_loop passes its rng to any model: the same module, stochastic or not)
    model = nn.Sequential(DropLinear(4, 8), nn.Linear(8, 2))
    params = model.init(0)
    SEEN.clear()
    ann.train_loop(model, nn.CrossEntropyLoss(), params, optim.SGD(lr=0.1), _data(), epochs=1,
                   batch_size=4, rng_seed=0)  # fmt: skip
    assert SEEN == [(4, "Generator"), (4, "Generator")]
