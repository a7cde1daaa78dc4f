"""The weight versions of a layer actor: which versions stored keys still reference, the
earlier weights a policy keeps (PipeDream's stash, PipeDream2BW's double buffer, a remedy's
forward weights), the weights a key's forward computes with, the delay of each gradient, the
gradients summed until the policy says an update is due, and the optimizer update that makes a new
version (with the policy's corrections and predictions).

:class:`WeightVersions` is a base of :class:`~asyncnn._runtime._actors.LayerActor` (through
``_serving.Serving``), which sets the attributes declared here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from asyncnn._errors import ActorError
from asyncnn._math._pytree import tree_copy, tree_leaves, tree_map

from ._actor_base import _Actor, _nbytes
from ._checks import checked_flag, checked_scale, first_not_finite
from ._messages import BACKWARD

if TYPE_CHECKING:
    from ._capture import ActorGraphs

__all__ = ["WeightVersions"]

_UNKNOWN: Any = object()  # (a value not asked yet)


class WeightVersions(_Actor):
    """What a layer actor does with its weights' versions (see the module's docstring)."""

    params: Any
    opt_state: Any
    version: int
    param_size: int
    graphs: ActorGraphs | None
    #: key -> (pullback, version, inputs) of the keys whose backward is still to come
    store: dict[int, tuple[Any, int, Any]]
    held_bytes: dict[int, int]
    #: version -> stored keys that reference it (whether or not their entries keep weights of
    #: it: a key kept without its pullback notes its forward's version for the gradient's delay)
    version_refs: dict[int, int]
    #: whether a forward keeps its pullback (which holds the weights it computed with), else
    #: its inputs only (:meth:`Policy.keeps_pullback`)
    keep_pullback: bool
    weights_by_version: dict[int, Any]
    versions_back: int
    keeps_forward_weights: bool
    pending_delays: list[int]
    change_decay: float | None
    weight_change: Any
    predicted: Any
    #: how many keys the parameter gradients summed since the last update (:attr:`acc`) sum
    acc_count: int
    _acc: Any = None
    #: parameter gradients still to add to ``_acc``, in order: captured backwards' buffers,
    #: which stay as they are until the minibatch's end (``ActorGraphs.keeps_gradients``)
    _owed: tuple[Any, ...] = ()
    #: minibatch -> its keys whose backward this actor has done (until the minibatch is)
    mb_backwards: dict[int, int]
    #: the keys whose forward was skipped (no rows came), their backward still to come
    skipped: set[int]
    run_start: tuple[int, int] | None
    #: the versions directly below the latest that the run's state held for this layer
    #: (``RunState.earlier_params``): the run counts as begun that many minibatches earlier
    held_back: int
    forward_weights_asked: bool
    corrects_gradients: bool
    corrects_updates: bool
    predicts_weights: bool
    #: the gradients the policy sums into one update (see :func:`gradients_per_update`),
    #: asked at the first prediction
    _per_update: Any = _UNKNOWN
    #: whether the policy's gradient correction is a remedy's, which corrects the gradient a
    #: stage applies of each minibatch (see :meth:`_note_delay`), asked at the first correction
    _corrects_sums: Any = _UNKNOWN
    #: the gradients of a minibatch's keys that a remedy corrects as one, summed so far:
    #: ``(minibatch, forward version, delay, forward weights, sum)`` (None: none open)
    _group: tuple[int, int, int, Any, Any] | None = None

    def _hold(self, key: int, entry: tuple[Any, int, Any], inputs: Any, out: Any) -> None:
        self.store[key] = entry
        st = self.stats
        st.stored = len(self.store)
        st.peak_stored = max(st.peak_stored, st.stored)
        # without a pullback the entry keeps the inputs alone (the backward recomputes the
        # output); with one, the inputs and output stand for its residuals
        held = _nbytes(inputs) if entry[0] is None else _nbytes(inputs) + _nbytes(out)
        self.held_bytes[key] = held
        st.stored_bytes += held
        st.peak_stored_bytes = max(st.peak_stored_bytes, st.stored_bytes)
        self.version_refs[entry[1]] = self.version_refs.get(entry[1], 0) + 1
        self._count_versions()

    def _unhold(self, key: int) -> tuple[Any, int, Any]:
        """Takes a key's entry out of the store (what :meth:`_hold` put in)."""
        entry = self.store.pop(key)
        self._release(entry[1])
        self.stats.stored = len(self.store)
        self.stats.stored_bytes -= self.held_bytes.pop(key, 0)
        return entry

    def _release(self, version: int) -> None:
        n = self.version_refs[version] - 1
        if n:
            self.version_refs[version] = n
        else:
            del self.version_refs[version]

    def _count_versions(self) -> None:
        """Counts the parameter versions alive in memory (``ActorStatistics.versions_held``):
        the latest, those the stored keys' pullbacks hold (where forwards keep them), and the
        earlier weights kept besides (:attr:`weights_by_version`: a correction's forward
        weights, ``PipeDream2BW``'s pinned version). A key stored without its pullback holds
        its inputs, not weights: its version, noted for the delay, is not counted."""
        kept = self.weights_by_version  # (every version in it is below the latest)
        if self.keep_pullback:
            refs = self.version_refs
            held = len(refs) + (self.version not in refs)
            if kept:
                held += sum(1 for v in kept if v not in refs)
        else:
            held = 1 + len(kept)
        self.stats.versions_held = held
        if held > self.stats.peak_versions_held:
            self.stats.peak_versions_held = held

    async def apply_gradients(self, grads: Any) -> None:
        """One optimizer update of this actor's parameters; the version goes up by one.

        The new parameters, optimizer state and version are published together, once the
        policy's correction of the update (:meth:`Policy.correct_update`) is made: a run
        stopped or cancelled while the update or its correction computes keeps the version
        before, whole, and nothing reads the optimizer's uncorrected result under the new
        version (a run's state, a trace event)."""
        update = self.ctx.optimizer.update if self.graphs is None else self.graphs.update
        old = self.params
        step = self.opt_state.get("step", 0) if isinstance(self.opt_state, dict) else 0
        params, opt_state = await self.compute(
            update, old, grads, self.opt_state, cost=4.0 * self.param_size
        )
        delays = list(self.pending_delays)  # (cleared once the update is published)
        policy = self.ctx.policy
        if delays and self.corrects_updates:
            params = await self.compute(
                policy.correct_update,
                params,
                old,
                grads,
                sum(delays) / len(delays),
                self.ctx.optimizer,
                int(step),
                cost=4.0 * self.param_size,
            )
        # (from here to the version's increment nothing awaits: the update is published whole)
        if self.versions_back or (self.keeps_forward_weights and self.version in self.version_refs):
            self.weights_by_version[self.version] = old  # forwards still use it
        self.params, self.opt_state = params, opt_state
        self.version += 1
        self.stats.updates += 1
        del self.pending_delays[: len(delays)]  # (any noted meanwhile go to the next update)
        # counted here, not as accumulated: a gradient still pending when the run ends (carried
        # into the next fit by RunState.pending_grads) is not applied by this run
        for delay in delays:
            self.stats.note_delay(delay)
        if self.versions_back:
            self._prune_versions()
        if self.change_decay is not None:
            self.weight_change = await self.compute(
                _average_change, self.weight_change, self.params, old, self.change_decay, cost=0
            )
        if self.predicts_weights:
            self.predicted = await self.compute(
                policy.predict_weights,
                self.params,
                old,
                self._prediction_horizon(),
                cost=2.0 * self.param_size,
            )
        rec = self.ctx.recorder
        if rec is not None:
            meta = {"delays": delays} if delays else None
            # the new weights' digests (never their bytes), so that a replay checks the last
            # update too, whose weights no later send shows; on a GPU, host copies queued
            # behind the update, read by the trace's writer (the actor does not wait)
            computing = self.computing
            rec.event(
                self.name, "update", "", -1 if computing is None else computing[1],
                self.version, "", self.seq, self._for_trace(tuple(tree_leaves(self.params))),
                meta=meta,
            )  # fmt: skip
        self.ctx.touch()

    async def _settle(
        self, param_grads: Any, meta: dict[str, Any], forward_version: int | None = None
    ) -> None:
        """The end of a key's backward: accumulates its parameter gradients (a layer without
        parameters has nothing to update) and counts the versions still held.

        ``forward_version`` is the parameter version of the key's forward (where known: it
        gives the gradient's delay, see :meth:`accumulate`)."""
        if param_grads is not None and self.ctx.checks_finite:
            await self._check_param_grads(param_grads)
        if self.param_size:
            await self.accumulate(param_grads, meta, forward_version)
        self._count_versions()

    async def _check_param_grads(self, param_grads: Any) -> None:
        """With ``check_finite``: fails on a NaN or Inf parameter gradient, naming the parameter
        (it would otherwise be seen only a step later, as a NaN forward; in a first layer, whose
        input gradient is not formed, not at all before then)."""
        await self.wait_for_device()
        bad = first_not_finite(param_grads)
        if bad is not None:
            computing = self.computing  # (the backward, or its weight half, running now)
            key = -1 if computing is None else computing[1]
            raise ActorError(
                self.name, BACKWARD, key,
                f"actor {self.name!r} produced NaN or Inf in the gradient of its parameter "
                f"params{bad} in its backward of key {key} (the first actor to do so in "
                "this run; check_finite=True found it)",
            )  # fmt: skip

    async def accumulate(
        self, param_grads: Any, meta: dict[str, Any], forward_version: int | None = None
    ) -> None:
        """Adds a key's parameter gradients; applies them when the policy says an update is due.

        With ``forward_version`` (the version the key's forward used), the gradient's delay
        (this actor's version now, which is its version at the update, minus the forward's) is
        noted for the update that applies it (its trace event and statistics), and a policy
        that corrects stale gradients (:meth:`Policy.corrects_gradients`) corrects it before it
        is added.
        """
        policy = self.ctx.policy
        if param_grads is not None and forward_version is not None:
            if self.corrects_gradients:
                # (None: summed with its minibatch's other keys, corrected with them below)
                param_grads = await self._note_delay(param_grads, forward_version, meta)
            else:
                self._record_delay(forward_version)
        # the sums and scalings run through compute: on a GPU they must be queued on this
        # actor's stream, after the kernels that made the gradients (the host thread's own
        # stream would race them)
        graphs = self.graphs
        if param_grads is not None:  # None: a skipped key, whose gradient is zero
            if graphs is not None and graphs.keeps_gradients(param_grads):
                # summed at the update, all at once (one pass instead of one per key)
                self._owed += (param_grads,)
            elif self._owed:  # (an eager key among captured ones: the sum keeps its order)
                await self._fold_owed(param_grads)
            elif self._acc is None:
                self._acc = param_grads
            else:
                self._acc = await self.compute(_tree_add, self._acc, param_grads, cost=0)
        self.acc_count += 1
        mb = int(meta.get("minibatch", 0))
        done = self.mb_backwards.get(mb, 0) + 1
        keys = int(meta.get("mb_keys", 1))
        mb_done = policy.minibatch_done(done, keys)
        # (a custom policy's flags are checked to be bools, tested cheaply per key: an
        # update_due that forgot its return gave None, and no update was ever made)
        if mb_done is not True and mb_done is not False:
            mb_done = checked_flag(policy, "minibatch_done", (done, keys), mb_done)
        if mb_done:
            self.mb_backwards.pop(mb, None)
        else:
            self.mb_backwards[mb] = done
        due = policy.update_due(self.acc_count, mb_done)
        if due is not True and due is not False:
            due = checked_flag(policy, "update_due", (self.acc_count, mb_done), due)
        if self._group is not None and (due or mb_done):
            await self._close_group()  # (its minibatch is done here, or the update applies it)
        if due:
            n = self.acc_count
            scale = checked_scale(policy, "gradient_scale", (n,), policy.gradient_scale(n))
            acc, owed = self._acc, self._owed
            if owed:  # (only a GPU actor's graphs leave gradients owed)
                assert graphs is not None
                grads = await self.compute(graphs.sum_gradients, acc, owed, scale, cost=0)
            else:
                if acc is None:
                    acc = await self.compute(tree_map, _zeros_like, self.params, cost=0)
                grads = acc if scale == 1.0 else await self.compute(_tree_scale, acc, scale, cost=0)
            self._acc, self._owed, self.acc_count = None, (), 0
            await self.apply_gradients(grads)
        elif self._owed and mb_done:
            # the graphs write those buffers again in the next minibatch: sum them now
            await self._fold_owed()
        elif self._acc is param_grads and graphs is not None and graphs.reuses_gradients(mb_done):
            # a graph's buffers, which a later backward writes over before the next sum
            self._acc = await self.compute(tree_copy, param_grads, cost=0)

    async def _fold_owed(self, *extra: Any) -> None:
        """Adds the gradients still owed, then ``extra``, to :attr:`acc`'s sum, in order."""
        self._acc = await self.compute(_fold, self._acc, (*self._owed, *extra), cost=0)
        self._owed = ()

    def settle_owed(self) -> None:
        """Adds the gradients still owed to :attr:`acc`'s sum, queued on this actor's stream
        (before any later work of it)."""
        if self._owed:
            with self.backend.activate(self.stream):
                self._acc, self._owed = _fold(self._acc, self._owed), ()

    @property
    def acc(self) -> Any:
        """The parameter gradients summed since the last update (None: none yet), as a run's
        state records them: any sum still owed is made here, and waited for (a host copy
        of the result, on another stream, would not wait for this actor's)."""
        if self._owed:
            self.settle_owed()
            if self.stream is not None:
                self.stream.synchronize()
        if self._group is not None:
            # the keys of a minibatch summed so far, corrected as their update would if it came
            # now; the group stays open, so the keys still to come are corrected with them
            # (a fit reads the state at every step: it must not cut a minibatch in two)
            with self.backend.activate(self.stream):
                total = self._group_added(self._acc, self._group)
            if self.stream is not None:
                self.stream.synchronize()
            return total
        return self._acc

    @acc.setter
    def acc(self, value: Any) -> None:
        self._acc, self._owed, self._group = value, (), None

    def _prediction_horizon(self) -> float:
        """How many updates the gradients of this stage's coming forwards will lag, on average:
        ``n / F``, ``n`` the gradients still due here (the keys forwarded whose backward is to
        come, which come back before the next key's) and ``F`` the gradients the policy sums
        into one update. The ``j``-th forward after an update (``j < F``, one forward per
        backward as in a full pipeline) waits for ``(n + j) // F`` updates, whose mean over the
        ``F`` forwards that use the prediction is ``n / F``.

        So the papers' stage delay from a stage's first update of a run on: ``K - s - 1`` for
        stage ``s`` of ``K`` under ``PipeDream`` (its warm-up's keys are in flight), and
        ``n / F`` under ``Async(min_update_frequency=F)``; the delay of the last gradient
        applied lags behind (0, 1, ... over a warm-up). 0 under a policy that updates only
        when a minibatch is done (a flush, after which nothing is in flight).
        """
        in_flight = len(self.store) + len(self.skipped)
        if not in_flight:
            return 0
        per_update = self._per_update
        if per_update is _UNKNOWN:
            per_update = self._per_update = gradients_per_update(self.ctx.policy)
        if per_update is None:
            return 0
        return in_flight if per_update == 1 else in_flight / per_update

    def _prune_versions(self) -> None:
        """Drops the kept weights of versions no stored key references and the policy does not
        keep (:meth:`Policy.versions_kept`)."""
        oldest = self.version - self.versions_back
        for v in [v for v in self.weights_by_version if v < oldest and v not in self.version_refs]:
            del self.weights_by_version[v]

    def load_earlier(self, earlier: Mapping[int, Any] | None) -> None:
        """Holds the earlier versions of this layer's parameters that a run starts from
        (``RunState.earlier_params``), those the policy keeps below the latest
        (:meth:`Policy.versions_kept`; others are left out), so that the run's forwards are
        pinned as in one unbroken run: with the ``j`` versions directly below the latest held,
        :meth:`Policy.forward_version` is asked as if the run had begun ``j`` minibatches
        earlier, at the version ``j`` below (the run that left them, which made one update per
        minibatch, did). Nothing where the policy pins no forwards or this layer has no
        parameters."""
        if not earlier or not self.versions_back or not self.param_size or self.predicts_weights:
            return
        oldest = self.version - self.versions_back
        kept = {int(v): w for v, w in earlier.items() if oldest <= v < self.version}
        self.weights_by_version.update(kept)
        held = 0
        while self.version - held - 1 in kept:
            held += 1
        self.held_back = held

    def earlier_weights(self) -> dict[int, Any]:
        """``{version: parameters}`` of the earlier versions this layer keeps for forwards
        pinned to them (:meth:`Policy.versions_kept` below the latest; not those kept only
        while stored keys reference them), for a run's state: what :meth:`load_earlier` takes
        back. Empty where the policy pins no forwards."""
        if not self.versions_back or not self.param_size or self.predicts_weights:
            return {}
        oldest = self.version - self.versions_back
        return {
            v: self.weights_by_version[v]
            for v in sorted(self.weights_by_version)
            if oldest <= v < self.version
        }

    def forward_weights(self, key: int, meta: dict[str, Any]) -> tuple[Any, int]:
        """The parameters a key's forward computes with, and their version.

        The latest (:attr:`params`, :attr:`version`), unless the policy predicts the weights
        (:meth:`Policy.predicts_weights`: the prediction made at the last update, with the
        latest version) or pins an earlier version (:meth:`Policy.forward_version`:
        ``PipeDream2BW``'s forwards of a minibatch use the version before the last update).
        """
        self.forward_weights_asked = True
        if self.predicted is not None:
            return self.predicted, self.version
        if not self.versions_back or not self.param_size:
            # (a layer without parameters never updates: its one version serves every forward)
            return self.params, self.version
        if self.run_start is None:
            back = self.held_back  # (versions held from the state: begun that much earlier)
            self.run_start = (int(meta.get("minibatch", 0)) - back, self.version - back)
        v = self._pinned_version(meta)
        if v == self.version:
            return self.params, v
        weights = self.weights_by_version.get(v)
        if weights is None:
            minibatch = int(meta.get("minibatch", 0))
            raise RuntimeError(
                f"layer {self.name!r}: the policy pins key {key} (minibatch {minibatch}) to "
                f"version {v}, but the layer holds versions {sorted(self.weights_by_version)} and "
                f"{self.version} (raise Policy.versions_kept, or split minibatches into more keys)"
            )
        return weights, v

    def _forward_version(self, meta: dict[str, Any]) -> int:
        """The parameter version a forward of a key with ``meta`` computes with (what
        :meth:`forward_weights` returns with the weights): the latest, unless the policy pins
        an earlier one. O(1), and changes nothing (a trace asks it of a forward that may never
        ask :meth:`forward_weights`: a skipped key's)."""
        if not self.versions_back or not self.param_size or self.predicted is not None:
            # (a layer without parameters never updates: its one version serves every forward)
            return self.version
        return self._pinned_version(meta)

    def _pinned_version(self, meta: dict[str, Any]) -> int:
        """The version the policy pins a forward with ``meta`` to (under a policy that keeps
        earlier versions, for a layer with parameters and no prediction)."""
        minibatch = int(meta.get("minibatch", 0))
        back = self.held_back
        first, start_version = self.run_start or (minibatch - back, self.version - back)
        return self.ctx.policy.forward_version(minibatch - first, start_version, self.version)

    def _record_delay(self, forward_version: int) -> int:
        """Notes (for the update that applies it: its trace event, the mean delay of a
        correction, the statistics) and returns the delay of a key's gradient computed at
        ``forward_version``."""
        delay = self.version - forward_version
        self.pending_delays.append(delay)
        return delay

    async def _note_delay(
        self, param_grads: Any, forward_version: int, meta: Mapping[str, Any]
    ) -> Any:
        """Records the delay of a key's gradient, computed with parameters its forward saw at
        ``forward_version``, and returns the gradient as the policy corrects it (called where
        the policy corrects gradients; elsewhere :meth:`_record_delay` alone).

        A remedy (``asyncnn.policies.Remedy``) corrects the gradient the update applies of
        each minibatch: where a minibatch is cut into several keys whose gradients the stage
        sums into one update (``PipeDream2BW``), the keys of one forward version (so of one
        delay) are summed first, and their sum is corrected once, when the minibatch is done
        here or an update is due (:meth:`_close_group`): this returns None then. DC-ASGD's
        ``g * g`` is quadratic: each key's share of the minibatch's gradient, corrected alone,
        summed to about ``1 / M`` of the minibatch gradient's correction. Where each key is a
        minibatch of its own (``Async``, ``PipeDream(1)``) or an update of its own
        (``PipeDream(M)``: its group closes at once), each key's gradient is corrected alone.
        """
        delay = self._record_delay(forward_version)
        grouped = int(meta.get("mb_keys", 1)) != 1 and self._remedy_corrects()
        group = self._group
        if group is not None and grouped:
            mb = int(meta.get("minibatch", 0))
            if group[0] == mb and group[1] == forward_version:
                total = await self.compute(_tree_add, group[4], param_grads, cost=0)
                self._group = (*group[:4], total)
                return None
        if group is not None:  # (a key of another minibatch or version: that group is whole)
            await self._close_group()
        forward_weights = None
        if self.keeps_forward_weights:
            forward_weights = (
                self.params
                if forward_version == self.version
                else self.weights_by_version[forward_version]
            )
            self._prune_versions()
        if grouped:
            mb = int(meta.get("minibatch", 0))
            self._group = (mb, forward_version, delay, forward_weights, param_grads)
            return None
        return await self.compute(
            self.ctx.policy.correct_gradient,
            param_grads,
            delay,
            self.version,
            self.params,
            forward_weights,
            cost=0,
        )

    def _remedy_corrects(self) -> bool:
        """Whether the policy's gradient correction is a remedy's (asked once): a remedy corrects
        the gradient a stage applies of each minibatch (:meth:`_note_delay`); a policy that
        overrides :meth:`Policy.correct_gradient` itself, each key's gradient."""
        known = self._corrects_sums
        if known is _UNKNOWN:
            known = self._corrects_sums = _is_remedy(self.ctx.policy)
        return bool(known)

    def _corrected_group(self, group: tuple[int, int, int, Any, Any]) -> Any:
        """The summed gradients of a group of keys (:attr:`_group`) as the policy corrects them,
        at the stage's weights now (the group's keys were all summed at this version: an update
        closes the group first)."""
        _, _, delay, forward_weights, total = group
        return self.ctx.policy.correct_gradient(
            total, delay, self.version, self.params, forward_weights
        )

    async def _close_group(self) -> None:
        """Corrects the open group of keys' summed gradients (:attr:`_group`) and adds them to
        :attr:`acc`."""
        group = self._group
        assert group is not None
        # (one compute, both set after it: a stop while it runs keeps the group whole, and a
        # state read meanwhile sees the group still open)
        total = await self.compute(self._group_added, self._acc, group, cost=0)
        self._acc, self._group = total, None

    def _group_added(self, acc: Any, group: tuple[int, int, int, Any, Any]) -> Any:
        """``acc`` plus a group of keys' summed gradients as the policy corrects them."""
        return _add_to(acc, self._corrected_group(group))


#: the most gradients per update :func:`gradients_per_update` asks a policy about
_MAX_PER_UPDATE = 1 << 12


def gradients_per_update(policy: Any, most: int = _MAX_PER_UPDATE) -> int | None:
    """How many gradients ``policy`` sums into one update by their count alone
    (:meth:`Policy.update_due` with no minibatch done, asked up to ``most``): 1 for
    ``PipeDream``, ``F`` for ``Async(min_update_frequency=F)``; None for a policy that updates
    only when a minibatch is done (the flushes, ``PipeDream2BW``)."""
    for count in range(1, most + 1):
        if checked_flag(policy, "update_due", (count, False), policy.update_due(count, False)):
            return count
    return None


def _average_change(average: Any, new: Any, old: Any, decay: float) -> Any:
    """``decay * average + (1 - decay) * (new - old)`` (``average`` ``None``: zero)."""
    if average is None:
        return tree_map(lambda n, o: (1.0 - decay) * (n - o), new, old)
    return tree_map(lambda a, n, o: decay * a + (1.0 - decay) * (n - o), average, new, old)


def _add(a: Any, b: Any) -> Any:
    return a + b


def _zeros_like(a: Any) -> Any:
    return a * 0


def _tree_add(a: Any, b: Any) -> Any:
    return tree_map(_add, a, b)


def _add_to(acc: Any, grads: Any) -> Any:
    """``acc + grads`` (``acc`` None: ``grads`` itself, as :meth:`WeightVersions.accumulate`
    starts a sum)."""
    return grads if acc is None else _tree_add(acc, grads)


def _is_remedy(policy: Any) -> bool:
    """Whether ``policy``'s gradient correction is a remedy's: a
    :class:`~asyncnn._runtime._remedies.Remedy`, or a wrapper (a replay) around one."""
    from ._remedies import Remedy  # (the remedies import the policies' machinery)
    from ._wrapped import WrappedPolicy

    while not isinstance(policy, Remedy):
        if not isinstance(policy, WrappedPolicy):
            return False
        policy = policy.wrapped
    return True


def _fold(acc: Any, terms: tuple[Any, ...]) -> Any:
    """``((acc + terms[0]) + terms[1]) ...`` (``acc`` None: from ``terms[0]``), in arrays of
    its own (never a term's, which a graph writes again)."""
    total = acc
    for t in terms:
        total = tree_copy(t) if total is None else _tree_add(total, t)
    return total


def _tree_scale(tree: Any, scale: float) -> Any:
    return tree_map(lambda a: a * scale, tree)
