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
