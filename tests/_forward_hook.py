"""``LayerActor.on_forward`` computing with ``LayerActor.forward_weights`` (the weights and version
the policy gives a forward): the one change in ``on_forward`` that ``PipeDream2BW`` and
``WeightPrediction`` need. Until the runtime's own ``on_forward`` makes it, the tests of those two
install this one (``monkeypatch``); afterwards it is the same method."""

from __future__ import annotations

from typing import Any

import pytest

from asyncnn._runtime._actors import LayerActor
from asyncnn._runtime._messages import FORWARD


async def on_forward(self: LayerActor, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
    rows = int(meta.get("rows", 1))
    params, version = self.forward_weights(key, meta)  # was: self.params, self.version
    if self.keep_pullback:
        vjp_fn = self._vjp if self.graphs is None else self.graphs.vjp
        out, pullback = await self.compute(
            vjp_fn, params, inputs, self._rng(key), cost=self._cost(rows)
        )
        self._hold(key, (pullback, version, None), inputs, out)
    else:
        out = await self.compute(self._apply, params, inputs, self._rng(key), cost=self._cost(rows))
        self._hold(key, (None, version, inputs), inputs, out)
    await self._check_finite(FORWARD, key, out)
    return out


@pytest.fixture
def forward_weights_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LayerActor, "on_forward", on_forward)
