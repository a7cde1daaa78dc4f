"""What a stopped ``fit`` keeps under a policy that streams keys and has each layer apply one
update per minibatch (``PipeDream2BW``, also wrapped in a remedy): the latest state that every
layer was seen to hold after the same minibatches. Apart from ``_fit.py`` because it is one rule
with its own bookkeeping, seen at each loss and each step."""

from __future__ import annotations

from typing import Any

from ._math._pytree import tree_leaves
from ._runtime._checks import checked_flag
from ._runtime._policies import Policy
from ._runtime._run import RunState
from ._runtime._weight_versions import gradients_per_update


def updates_once_per_minibatch(policy: Policy) -> bool:
    """Whether ``policy`` streams keys (no flush between minibatches) and has each layer apply
    one update per minibatch, once its part of the minibatch is done (``PipeDream2BW``, alone
    or under a remedy), so that a layer's version counts the minibatches it has applied."""
    if policy.waits_between_minibatches():
        return False
    # (asked about as many keys as a minibatch may have: a policy that updates after some
    # keys, or not at each minibatch's end, says so within them)
    most = max(int(policy.microbatches), 64)
    return gradients_per_update(policy, most) is None and all(
        checked_flag(policy, "update_due", (n, True), policy.update_due(n, True))
        for n in range(1, most + 1)
    )


#: a layer's state as :class:`LayerStates` keeps it: its parameters, optimizer state, actor
#: state (None: none) and earlier versions (``RunState.earlier_params``'s, ``{}``: none)
LayerState = tuple[Any, Any, Any, dict[int, Any]]


class LayerStates:
    """The recent states of each layer of a run under a policy that streams keys and updates
    once per minibatch (:func:`updates_once_per_minibatch`). There the layers of a running
    pipeline stand a minibatch or two apart, each holding part of a minibatch's gradient sum:
    no moment has them all after the same minibatches. Each layer's state is seen as the fit
    goes (at each loss and each step: references, as an update makes new arrays), and
    :attr:`kept` is the latest state seen at every layer after the same minibatches.

    Layers without parameters never update (their one state is that of any minibatch)."""

    def __init__(self, start: RunState) -> None:
        self.start = dict(start.versions)
        self.layers = [n for n, p in start.params.items() if tree_leaves(p)]
        #: layer -> {minibatches of this fit applied: its state then}
        self.seen: dict[str, dict[int, LayerState]] = {n: {} for n in self.layers}
        #: the minibatches of this fit that every layer of :attr:`kept` has applied
        self.common = 0
        #: layer -> its state after :attr:`common` minibatches (the fit's start: none kept)
        self.kept: dict[str, LayerState] = {}
        self._others = [n for n in start.params if n not in self.seen]

    def see(self, state: RunState, known: int) -> None:
        """Notes each layer's state now; ``known``: the minibatches of this fit whose losses
        (and all before) are known, the most a kept state may count. (A corrected update's
        weights and version are published together, once corrected: no state seen is half an
        update.)"""
        seen = self.seen
        if not seen:  # no layer updates: every state is that of the minibatches known
            if known > self.common:
                self.common = known
                self.kept = self._entries(state)
            return
        for n in self.layers:
            entries = seen[n]
            done = state.versions[n] - self.start[n]
            if done not in entries:
                entries[done] = _entry(state, n)
        lowest = min(state.versions[n] - self.start[n] for n in self.layers)
        common = set.intersection(*(set(e) for e in seen.values()))
        best = max((d for d in common if d <= known), default=0)
        if best > self.common:
            self.common = best
            self.kept = {n: seen[n][best] for n in self.layers}
            self.kept.update((n, e) for n, e in self._entries(state).items() if n in self._others)
        # no layer is seen again below `lowest`: what is not common there never will be
        for entries in seen.values():
            for d in [d for d in entries if d <= self.common or (d < lowest and d not in common)]:
                del entries[d]

    def _entries(self, state: RunState) -> dict[str, LayerState]:
        return {n: _entry(state, n) for n in state.params}


def _entry(state: RunState, name: str) -> LayerState:
    return (
        state.params[name], state.opt_states[name], state.actor_states.get(name),
        state.earlier_params.get(name, {}),
    )  # fmt: skip
