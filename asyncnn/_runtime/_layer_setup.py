"""What a layer actor works out once, at its set-up, from its node and the run's policy: its
module's forward FLOPs per sample (what the pool weighs an operation by), whether the module
draws random numbers and, for a stage of a chain, each module's place for its random streams;
and the set-up's checks that refuse a placement or a custom class the policy cannot run. Apart
from ``_actors.py``, which holds what each operation computes, because none of it runs after
the set-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncnn._math._nn import Sequential

if TYPE_CHECKING:
    from ._context import ActorContext
    from ._node import Node
    from ._turns import DeviceTurns

__all__ = [
    "check_device_mates", "check_split_overrides", "draw_places", "flops_per_sample",
    "is_stochastic",
]  # fmt: skip


def check_device_mates(name: str, turns: DeviceTurns, ctx: ActorContext) -> None:
    """The stages that take turns on one device (``turns``, layer ``name``'s) must be placed
    together (one worker, one device): turns are passed within a process."""
    mates = [n for n, o in ctx.orders.items() if o.device_turns() is turns]
    for attr in ("worker", "device"):
        places = {n: getattr(ctx.graph.nodes[n], attr) for n in mates}
        if len(set(places.values())) > 1:
            raise ValueError(
                f"layer {name!r}: the policy {ctx.policy.name} runs layers {mates} on "
                f"one device, taking turns, but they are placed on different {attr}s "
                f"{places}; place them on one {attr} (see docs/policies.md)"
            )


def check_split_overrides(cls: type, name: str, ctx: ActorContext, base: type) -> None:
    """Refuses an actor class ``cls`` (of layer ``name``) that overrides ``on_backward`` of
    ``base`` (``LayerActor``) but not both halves of a split backward."""
    # The base halves read a layer's stored pullback: a class that keeps its own state in
    # on_backward must give the halves that read it (a half alone may wrap the base's).
    mine = [
        hook
        for hook in ("on_backward", "on_backward_input", "on_backward_weight")
        if getattr(cls, hook) is not getattr(base, hook)
    ]
    if "on_backward" in mine and len(mine) < 3:
        missing = [h for h in ("on_backward_input", "on_backward_weight") if h not in mine]
        raise TypeError(
            f"layer {name!r}: the policy {ctx.policy.name} splits each backward into "
            f"an input and a weight half, but {cls.__name__} overrides {' and '.join(mine)} "
            f"only; override {' and '.join(missing)} too (each may wrap the base's), or use "
            "another policy"
        )


def flops_per_sample(module: Any, graph: Any, node: Node) -> float:
    """The FLOPs of ``module``'s forward per sample, by its own ``flops(*input shapes)`` where it
    has one and the graph knows the shapes; else 0 (the actor counts 2 per parameter)."""
    shapes = [graph.shapes.get(src) for src in node.inputs] if graph.shapes else []
    flops = getattr(module, "flops", None)
    if not shapes or any(s is None for s in shapes) or not callable(flops):
        return 0.0
    try:
        return float(flops(*shapes))
    except Exception:  # noqa: BLE001 - an estimate only: fall back to the parameter count
        return 0.0


def draw_places(node: Node) -> list[int | None] | None:
    """For a stage of ``Graph.sequential``: each module's place in the whole chain (None where
    it draws nothing), so its masks do not depend on where the chain is cut; else None."""
    module, offset = node.module, node.init_offset
    if offset is None or not isinstance(module, Sequential):
        return None
    return [offset + i if is_stochastic(m) else None for i, m in enumerate(module)]


def is_stochastic(module: Any) -> bool:
    # a module says whether it draws random numbers; one that cannot (not an nn.Module
    # dataclass) gets an rng, to be safe
    try:
        return bool(module.stochastic)
    except Exception:  # noqa: BLE001
        return True
