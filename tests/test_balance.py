"""How Graph.sequential measures its modules to balance stages (asyncnn/_runtime/_balance.py):
what balance="flops" does with a module that does not count its own FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

import asyncnn as ann
from asyncnn import nn
from asyncnn._runtime._balance import module_costs


@dataclass(frozen=True)
class Dense(nn.Module):
    """A user's matrix product that defines no ``flops``."""

    n_in: int
    n_out: int

    def init_params(self, init: Any) -> Any:
        return {"w": init.normal((self.n_in, self.n_out), 0.05)}

    def __call__(self, params: Any, x: Any, rng: Any = None) -> Any:
        return x @ params["w"]


@dataclass(frozen=True)
class CountedDense(Dense):
    def flops(self, *input_shapes: Any) -> int:
        return 2 * self.n_in * self.n_out


@dataclass(frozen=True)
class Square(nn.Module):
    """A user's elementwise module: no parameters, no ``flops``."""

    def __call__(self, params: Any, x: Any, rng: Any = None) -> Any:
        return x * x


def _chain(first: nn.Module) -> list[nn.Module]:
    return [first, nn.ReLU(), nn.Linear(64, 64), Square(), nn.Linear(64, 10)]


@pytest.mark.parametrize(
    "first,place",
    [
        (Dense(64, 64), "modules[0]"),
        (nn.Sequential(nn.Linear(64, 64), Dense(64, 64)), "modules[0].modules[1]"),
        (nn.Residual(Dense(64, 64)), "modules[0].module"),
    ],
    ids=["alone", "in-a-sequential", "in-a-residual"],
)
def test_balance_by_flops_refuses_a_module_with_parameters_that_counts_none(
    first: nn.Module, place: str
) -> None:
    # (it counted 0 FLOPs, nn.Module's default: the chain was cut as if the products of such
    # modules cost nothing, [5, 2] for [Dense, ReLU, Dense, ReLU, Linear, ReLU, Linear])
    with pytest.raises(ann.GraphError) as info:
        ann.Graph.sequential(_chain(first), loss=nn.CrossEntropyLoss(), stages=2,
                             input_shape=(None, 64), balance="flops")  # fmt: skip
    said = str(info.value)
    assert said.startswith("sequential: balance='flops' cannot count the FLOPs of Dense(")
    assert f"({place}): it has 4096 parameters" in said
    assert "parameters and its class defines no flops(), so it would count 0" in said
    assert "define Dense.flops(self, *input_shapes)" in said
    assert "balance='time'" in said and "'params'" in said
    # the other balances need no flops
    for balance in ("params", "time"):
        g = ann.Graph.sequential(_chain(first), loss=nn.CrossEntropyLoss(), stages=2,
                                 input_shape=(None, 64), balance=balance, balance_rows=4)  # fmt: skip
        assert len(g.layers) == 2


def test_balance_by_flops_counts_a_module_that_defines_flops_and_zero_for_elementwise_ones() -> (
    None
):
    mods = _chain(CountedDense(64, 64))
    costs = module_costs(mods, "flops", (None, 64))
    assert costs == [2 * 64 * 64, 0.0, 2 * 64 * 64, 0.0, 2 * 64 * 10]
    g = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 64),
                             balance="flops")  # fmt: skip
    assert [len(g.nodes[n].module) for n in g.layers] == [1, 4]  # (as [2, 3]: the first)


#: the times the stand-in timer gives (in any unit): by the module's class, a pair as "pair"
_Timing = dict[str, float]


def _timed_by(times: _Timing, timed: list[Any]) -> Any:
    """A stand-in for the balance's timer: runs the step once (its output is the next input)
    and gives the time of what it runs from ``times``, noting what that was in ``timed``."""

    def fake(what: Any, step: Any) -> tuple[Any, float]:
        out = step()
        timed.append((what, tuple(getattr(out, "shape", ()))))
        name = "pair" if isinstance(what, nn.Sequential) else type(what).__name__
        return out, times[name]

    return fake


@pytest.mark.parametrize(
    "times,sizes",
    [
        # the ReLU alone as dear as the pair's saving: alone, [Linear | ReLU, Tanh] took
        # 10 | 13 for [Linear, ReLU | Tanh]'s 14 | 9, where the stage of the pair takes 10
        ({"Linear": 10.0, "ReLU": 4.0, "pair": 10.0, "Tanh": 9.0}, [2, 1]),
        # a cut between them is the best cut (10 | 10.5, not 10.9 | 9.5): not kept out
        ({"Linear": 10.0, "ReLU": 1.0, "pair": 10.9, "Tanh": 9.5}, [1, 2]),
    ],
    ids=["kept-together", "cut-between"],
)
def test_balance_by_time_times_a_linear_and_its_relu_as_one_fused_op(
    times: _Timing, sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stage applies a Linear with a bias and the ReLU after it as one op (bias_relu): the
    # balance timed each alone, and gave a stage holding both a time it does not take
    from asyncnn._runtime import _balance

    timed: list[Any] = []
    monkeypatch.setattr(_balance, "_timed", _timed_by(times, timed))
    fused: list[int] = []
    real = nn.Linear._then_relu

    def then_relu(self: nn.Linear, params: Any, x: Any) -> Any:
        fused.append(self.in_features)
        return real(self, params, x)

    monkeypatch.setattr(nn.Linear, "_then_relu", then_relu)
    mods = [nn.Linear(6, 5), nn.ReLU(), nn.Tanh()]
    g = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 6),
                             balance="time", balance_rows=3)  # fmt: skip
    assert [len(g.nodes[n].module) for n in g.layers] == sizes
    # each module alone, then the pair as a Sequential runs it (fused: its Linear's _then_relu),
    # on the Linear's input
    pair = [w for w, _ in timed if isinstance(w, nn.Sequential)]
    assert [type(w).__name__ for w, _ in timed] == ["Linear", "ReLU", "Tanh", "Sequential"]
    assert pair == [nn.Sequential(mods[0], mods[1])] and timed[-1][1] == (3, 5)
    assert fused == [6]  # (once: the step the stand-in runs)


def test_balance_by_time_times_no_pair_where_a_stage_would_not_fuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncnn._runtime import _balance

    @dataclass(frozen=True)
    class MyReLU(nn.ReLU):
        """A subclass: a Sequential applies it on its own (it may compute otherwise)."""

    timed: list[Any] = []
    monkeypatch.setattr(_balance, "_timed", _timed_by({"Linear": 1.0, "MyReLU": 1.0}, timed))
    mods = [nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 5), MyReLU(), nn.Linear(5, 4)]
    assert _balance.fused_pair_times(mods, (None, 6), "float32", 2) == {}
    assert not timed
    # and the partition of costs without pairs is the plain one
    assert _balance.balanced_partition([1.0, 1.0, 1.0, 1.0, 4.0], 2, {}) == [4, 1]
    # with one: the pair 0, 1 held whole costs 2.5, not 4, so [3, 1] (3.5 | 3) beats [2, 2]
    # (4 | 4), the best cut of the costs alone
    assert _balance.balanced_partition([2.0, 2.0, 1.0, 3.0], 2) == [2, 2]
    assert _balance.balanced_partition([2.0, 2.0, 1.0, 3.0], 2, {0: 2.5}) == [3, 1]
