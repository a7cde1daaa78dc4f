"""CUDA graphs of GPU actors: capture a forward, its backward and the update once, replay after.

At small batches a GPU step is bound by kernel launches (about 14 µs of host time each), and by the
Python that traces the layer. With CUDA graphs active (``Run.cuda_graphs_active``: by default on
one GPU) a GPU layer actor whose input shapes repeat captures its forward (the ``vjp``: output and
residuals), the matching backward (the pullback) and the optimizer update into CUDA graphs, and
afterwards replays each with one launch; a loss actor captures its loss and gradient likewise. A
signature (input shapes and dtypes) is captured the second time it is seen (the first runs eagerly
and loads every kernel), up to :data:`MAX_SIGNATURES` per slot of an actor, least recently used
dropped; anything a capture cannot hold (a host sync, a batched product, randomness) makes that
signature run eagerly for good.

A graph writes into the same buffers on every launch: its outputs are handed to the consumers
as they are, and the next launch overwrites them. So each key of a minibatch has graphs of its
own at each actor, a *slot*: the keys of a minibatch take slots 0, 1, ... in the order of their
forwards at that actor, and a slot's graphs run again only in a later minibatch. That is safe
when flushes separate the minibatches, so that every consumer of a minibatch's buffers is done
before the next minibatch begins (``Sync``, ``GPipe(M)``, ``OneFOneB(M)``); streaming
policies take the ways below, and :meth:`Policy.allows_capture` says where any of them is
safe. The parameters live in buffers owned by the capture, shared by the slots, updated in
place by the captured update (or copied in after an eager one): no update comes between a
minibatch's forwards and its backwards under a flush.

Where keys stream on without flushes (``Async``, ``PipeDream``), no consumer's reads are
ordered before the next launch, so what leaves the actor is copied out of the graphs' buffers
(a forward's output, the inputs' gradients, a loss's gradients: activations, not weights).
Without a stash (``PipeDream(stash=False)``, ``Async()``) every forward and every backward
computes at the latest weights (the backward recomputes the vjp from the kept inputs): each
graph has one set of buffers and reads the weights in place, at the moment it runs, as the
eager run reads them at the moment it computes. With a stash (``PipeDream(M)``,
``Async(stash=True)``) a key's backward must use the weights its forward used: each key in
flight at the actor takes a free slot at its forward and gives it back at its backward, and a
slot holds a copy of the weights (written just before its forward graph runs) that its forward
and backward graphs read, besides its residuals; a slot's graphs of every input signature share
that copy, since a slot serves one key at a time. A run admits at most ``max_in_flight`` keys,
so an actor never needs more slots than that.

The parameter gradients' sums and the captured optimizer update are ``_capture_update.py``'s.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asyncnn._math._pytree import tree_copy, tree_flatten, tree_leaves, tree_map, tree_unflatten

from ._capture_update import MAX_SIGNATURES, UpdateGraphs

if TYPE_CHECKING:
    from ._actors import LayerActor

__all__ = ["ActorGraphs"]


#: the sightings an actor's graphs remember, and the signatures whose capture failed (see
#: ``_Graphs._due``)
_SEEN_KEPT = 4096
#: the failures' messages kept in the statistics (the latest)
_FAILURES_KEPT = 64


class _Stats:
    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0
        self.eager = 0
        self.failures: list[str] = []


class _Graphs:
    """What layer and loss graphs share: the backend, the stream and the capture helper."""

    def __init__(self, actor: Any) -> None:
        # (cupy: imported for GPU actors only)
        from asyncnn.backends import _fused, _graphs

        self.g = _graphs
        self.fused = _fused
        self.actor = actor
        self.xp = actor.backend.xp
        self.stats = _Stats()
        self.seen: dict[Any, int] = {}
        self.failed: set[Any] = set()
        #: keys stream on without flushes: one set of buffers, outputs copied out of it
        self.streaming = not actor.ctx.policy.waits_between_minibatches()
        #: streaming with a stash: a slot per key in flight, taken at its forward (see above)
        self.stashes = self.streaming and actor.ctx.policy.keeps_pullback()
        self.busy: set[int] = set()  # the slots whose key's backward has not run yet
        self.memory: Callable[[], int] = lambda: 0  # the owner's bytes held, for the stats
        #: called at the first forward of a minibatch, before its graphs run (the owner's)
        self.new_minibatch: Callable[[], None] = lambda: None
        self.minibatch: Any = None  # the minibatch whose keys take slots now
        self.next_slot = 0
        self.slots = 1  # the most slots a minibatch has taken

    def slot(self, meta: dict[str, Any]) -> int:
        """The slot of the key whose forward comes now (see the module docstring): its place
        among its minibatch's keys at this actor (always 0 when streaming); -1 for a key of no
        minibatch (admitted by hand), which runs eagerly: no flush orders it."""
        if self.streaming:
            return 0
        mb = meta.get("minibatch")
        if mb is None or int(mb) < 0:
            return -1
        if mb != self.minibatch:
            self.minibatch, self.next_slot = mb, 0
            self.new_minibatch()
        slot = self.next_slot
        self.next_slot += 1
        if slot >= self.slots:
            self.slots = slot + 1
        return slot

    def take_slot(self) -> int:
        """A free slot for the key whose forward comes now (stashing: see the module
        docstring), the lowest one, so the fewest graphs are captured."""
        slot = 0
        while slot in self.busy:
            slot += 1
        self.busy.add(slot)
        if slot >= self.slots:
            self.slots = slot + 1
        return slot

    def _signature(self, inputs: list[Any]) -> tuple[Any, ...] | None:
        """The inputs' shapes and dtypes; None unless every input is an array of this device."""
        local = self.actor.backend.is_local
        if not all(local(x) for x in inputs):
            return None
        return tuple((x.shape, x.dtype.str) for x in inputs)

    def _due(self, sig: Any) -> bool:
        """Whether ``sig`` is to be captured now (its second sighting)."""
        if sig in self.failed:
            return False
        n = self.seen.get(sig, 0) + 1
        if n == 1 and len(self.seen) >= _SEEN_KEPT:
            # a run whose input shapes never repeat the same way: the sightings grew by one a
            # step for good (what a clear costs: the signatures seen once wait for two more
            # sightings)
            self.seen.clear()
        self.seen[sig] = n
        return n >= 2

    def lookup(
        self,
        entries: collections.OrderedDict[Any, Any],
        sig: Any,
        capture: Callable[[], Any],
        reload: Callable[[Any], None],
    ) -> Any:
        """The entry of ``sig`` in ``entries`` (least recently used first), to launch; None to
        run eagerly (each counted).

        A cached entry is moved to the end, ``reload(entry)`` copies the call's arrays into its
        buffers and it counts as a replay; an unseen ``sig`` (or None: no signature) runs
        eagerly; on its second sighting ``capture()`` makes its entry, at most
        :data:`MAX_SIGNATURES` per slot are kept, and a capture that fails runs eagerly for good.
        """
        entry = None if sig is None else entries.get(sig)
        if entry is not None:
            entries.move_to_end(sig)
            reload(entry)
            self.stats.replays += 1
            return entry
        if sig is None or not self._due(sig):
            self.stats.eager += 1
            return None
        try:
            entry = capture()
        except self.g.CaptureError as exc:
            self._fail(sig, exc)
            self.stats.eager += 1
            return None
        entries[sig] = entry
        while len(entries) > MAX_SIGNATURES * self.slots:
            entries.popitem(last=False)
        self.changed()
        return entry

    def changed(self) -> None:
        """After a capture or an eviction: the memory held, into the actor's statistics."""
        self.actor.stats.graph_bytes = self.memory()

    def _capture(self, fn: Callable[[], Any], warm: Callable[[], Any] | None = None) -> Any:
        """``(graph, result, keep)`` of ``fn`` captured on the actor's stream, after an eager
        run of ``warm`` (by default ``fn`` itself)."""
        xp = self.xp
        pool = xp.cuda.MemoryPool()
        workspace = xp.empty(self.g.WORKSPACE_BYTES, dtype=xp.uint8)
        # an eager run first, in the capture's pool: the capture then finds its blocks cached
        self.g.run_in_pool(fn if warm is None else warm, pool)
        graph, result = self.g.capture(fn, self.actor.stream, pool, workspace)
        self.stats.captures += 1
        return graph, result, (pool, workspace)

    @staticmethod
    def held(keeps: list[Any]) -> int:
        """Bytes held by captures' ``keep`` (memory pool, workspace) pairs."""
        return sum(int(pool.total_bytes()) + int(workspace.nbytes) for pool, workspace in keeps)

    def _fail(self, sig: Any, exc: BaseException) -> None:
        if len(self.failed) >= _SEEN_KEPT:
            # as the sightings: a run whose shapes never repeat the same way (what a clear
            # costs: each signature failed before fails once more, an eager run and a capture)
            self.failed.clear()
        self.failed.add(sig)
        failures = self.stats.failures
        failures.append(f"{sig}: {exc}")
        del failures[:-_FAILURES_KEPT]

    def copied(self, tree: Any) -> Any:
        """``tree`` with a fresh copy of each array leaf, made on the current stream (a
        replay's outputs leave the graph's buffers this way: :func:`_graphs.copy_of` is
        cheaper on the host than ``ndarray.copy``)."""
        copy = self.g.copy_of
        return tree_map(lambda a: copy(a) if hasattr(a, "copy") else a, tree)

    def _load(self, dst: list[Any], src: list[Any]) -> None:
        copy = self.g.copy_into
        for d, s in zip(dst, src, strict=True):
            if d is not s:
                copy(d, s)


class _Entry:
    """The graphs of one input signature of a layer actor."""

    def __init__(self, owner: ActorGraphs, xs: list[Any]) -> None:
        self.owner = owner
        self.xs = xs  # static inputs
        self.forward: Any = None
        self.out: Any = None
        self.pullback: Any = None
        self.backward: Any = None
        self.g_leaves: list[Any] = []
        self.grads: Any = None
        self.keep: list[Any] = []
        self.params: list[Any] = []  # stashing: its slot's copy of the weights
        self.key: Any = None  # its key in the owner's entries: (signature, slot)

    def pull(self, g: Any) -> Any:
        """The pullback handed to the actor: replays (or captures) the backward graph."""
        return self.owner.backward(self, g)


class ActorGraphs(UpdateGraphs):
    """The CUDA graphs of one GPU layer actor (see the module docstring)."""

    def __init__(self, actor: LayerActor) -> None:
        self.base = _Graphs(actor)
        self.actor = actor
        self.entries: collections.OrderedDict[Any, _Entry] = collections.OrderedDict()
        self.params: list[Any] | None = None  # the static parameter leaves
        self.params_def: Any = None
        self.params_tree: Any = None  # the tree of them handed to the actor
        #: stashing: each slot's copy of the weights, which its graphs of every signature read
        self.slot_weights: dict[int, list[Any]] = {}
        # graphs of forwards that keep no pullback and of backwards that recompute (streaming):
        # signature -> (graph, static inputs, result, keep)
        self.applies: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.backwards: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._init_update()
        self.base.memory = self.memory
        # a policy that updates across minibatches (none built in does): what the last one's
        # keys left in their graphs' buffers is summed before those graphs run again
        self.base.new_minibatch = actor.settle_owed

    def memory(self) -> int:
        """Bytes of device memory this actor's graphs hold."""
        keeps = [k for e in self.entries.values() for k in e.keep]
        keeps += [e[3] for e in (*self.applies.values(), *self.backwards.values())]
        keeps += [c.keep for c in self.updates.values()]
        copies = sum(int(w.nbytes) for ws in self.slot_weights.values() for w in ws)
        copies += sum(int(g.nbytes) for g in self.grad_sum)
        return self.base.held(keeps) + copies

    @property
    def stats(self) -> _Stats:
        return self.base.stats

    def slot(self, meta: dict[str, Any]) -> int:
        """The slot of the key whose forward comes now (:meth:`_Graphs.slot`)."""
        return self.base.slot(meta)

    # -- parameters -----------------------------------------------------------------------------
    def _adopt(self) -> Any:
        """Makes the actor's parameters the static buffers (copying a newer version in)."""
        actor = self.actor
        leaves, treedef = tree_flatten(actor.params)
        if self.params is None or treedef != self.params_def:
            # buffers of our own: the caller's arrays are never written into
            self.params = [p.copy() for p in leaves]
            self.params_def = treedef
        else:
            self.base._load(self.params, leaves)
        tree = tree_unflatten(treedef, self.params)
        actor.params = self.params_tree = tree
        return tree

    # -- forward and backward -------------------------------------------------------------------
    def vjp(self, params: Any, inputs: list[Any], rng: Any, slot: int = 0) -> tuple[Any, Any]:
        """The actor's ``_vjp`` through a graph where one is (or can now be) captured, in the
        key's ``slot`` (:meth:`_Graphs.slot`)."""
        actor, base = self.actor, self.base
        xs = actor._to_device(inputs)
        if base.stashes:
            return self._vjp_stashed(params, xs, rng)
        if base.streaming or slot < 0:  # buffers the next key's forward could write over
            base.stats.eager += 1
            return actor._vjp(params, xs, rng)

        def reload(entry: _Entry) -> None:
            self._reload_params()
            base._load(entry.xs, xs)

        sig = base._signature(xs)
        entry = base.lookup(
            self.entries,
            None if sig is None else (sig, slot),
            lambda: self._capture_forward(xs, (sig, slot)),
            reload,
        )
        if entry is None:
            return actor._vjp(actor.params, xs, rng)
        entry.forward.launch(actor.stream)
        return entry.out, entry.pull

    def _vjp_stashed(self, params: Any, xs: list[Any], rng: Any) -> tuple[Any, Any]:
        """:meth:`vjp` under a stash: the key takes a free slot, whose weights are this
        forward's (copied in before the graph runs) until its backward gives the slot back."""
        actor, base = self.actor, self.base
        sig = base._signature(xs)
        slot = base.take_slot()

        def reload(entry: _Entry) -> None:
            self._reload_params()
            base._load(entry.params, self.params or [])
            base._load(entry.xs, xs)

        try:
            entry = base.lookup(
                self.entries,
                None if sig is None else (sig, slot),
                lambda: self._capture_forward(xs, (sig, slot), stash=True),
                reload,
            )
            if entry is not None:
                entry.forward.launch(actor.stream)
                return base.copied(entry.out), entry.pull
        except BaseException:
            base.busy.discard(slot)
            raise
        base.busy.discard(slot)
        # Eager: a pullback that holds the static buffers (a capture that failed has just
        # adopted them) would read the weights a later update writes there: use a copy.
        static = {id(p) for p in self.params or []}
        if any(id(leaf) in static for leaf in tree_leaves(params)):
            params = tree_copy(params)
        return actor._vjp(params, xs, rng)

    def _weights_of(self, slot: int) -> list[Any]:
        """The copy of the weights that ``slot``'s graphs read (stashing), made on first use."""
        weights = self.slot_weights.get(slot)
        master = self.params or []
        if weights is None or len(weights) != len(master):
            weights = self.slot_weights[slot] = [p.copy() for p in master]
            self.base.changed()
        else:
            self.base._load(weights, master)
        return weights

    def _capture_forward(self, xs: list[Any], key: Any, stash: bool = False) -> _Entry:
        actor, xp = self.actor, self.base.xp
        params = self._adopt()
        static = [xp.empty_like(x) for x in xs]
        self.base._load(static, xs)
        entry = _Entry(self, static)
        entry.key = key
        if stash:  # the slot's own weights, which the forward and the backward graphs read
            entry.params = self._weights_of(key[1])
            params = tree_unflatten(self.params_def, entry.params)

        graph, (out, pullback), keep = self.base._capture(lambda: actor._vjp(params, static, None))
        entry.forward, entry.out, entry.pullback = graph, out, pullback
        entry.keep.append(keep)
        return entry

    def backward(self, entry: _Entry, g: Any) -> Any:
        base = self.base
        if not base.stashes:
            return self._backward(entry, g)
        try:
            param_grads, input_grads = self._backward(entry, g)
        finally:
            base.busy.discard(entry.key[1])  # later launches on this stream come after this one
        # the graph writes the inputs' gradients again at the slot's next backward, which
        # nothing orders after the producer's use of them: they leave as copies
        return param_grads, base.copied(list(input_grads))

    def _backward(self, entry: _Entry, g: Any) -> Any:
        base = self.base
        leaves, treedef = tree_flatten(g)
        if entry.backward is None:
            entry.g_leaves = [self.base.xp.empty_like(x) for x in leaves]
            base._load(entry.g_leaves, leaves)
            gs = tree_unflatten(treedef, entry.g_leaves)
            actor = self.actor

            def warm() -> None:  # a fresh forward and backward, in the backward's pool
                actor._vjp(actor.params, entry.xs, None)[1](gs)

            try:
                graph, grads, keep = base._capture(lambda: entry.pullback(gs), warm)
            except base.g.CaptureError as exc:
                # the pullback is spent: forget the signature, recompute this key eagerly
                if self.entries.get(entry.key) is entry:
                    del self.entries[entry.key]
                    base.changed()  # (its forward graph's memory is no longer held)
                base._fail(entry.key, exc)
                params = self.actor.params  # the forward's own weights, where stashed
                if entry.params:
                    params = tree_unflatten(self.params_def, entry.params)
                _, pullback = self.actor._vjp(params, entry.xs, None)
                return pullback(g)
            entry.backward, entry.grads = graph, grads
            entry.pullback = None
            entry.keep.append(keep)
            base.changed()
        else:
            base._load(entry.g_leaves, leaves)
        entry.backward.launch(self.actor.stream)
        # (a backward graph's result: the parameters' gradients, then the inputs')
        self.last_grads = entry.grads[0]
        return entry.grads

    # -- a forward and a recomputing backward, at the latest weights -----------------------------
    def _reload_params(self) -> None:
        if not self._static_params():
            self._adopt()

    def apply(self, params: Any, inputs: list[Any], rng: Any) -> Any:
        """The actor's ``_apply`` (a forward that keeps no pullback) through a graph where one
        is (or can now be) captured; the output leaves as a copy."""
        actor, base = self.actor, self.base
        xs = actor._to_device(inputs)
        sig = base._signature(xs)

        def capture() -> tuple[Any, list[Any], Any, Any]:
            tree = self._adopt()
            static = [base.xp.empty_like(x) for x in xs]
            base._load(static, xs)
            graph, out, keep = base._capture(lambda: actor._apply(tree, static, None))
            return graph, static, out, keep

        def reload(entry: Any) -> None:
            self._reload_params()
            base._load(entry[1], xs)

        entry = base.lookup(self.applies, None if sig is None else ("apply", sig), capture, reload)
        if entry is None:
            return actor._apply(params, xs, rng)
        entry[0].launch(actor.stream)
        return base.copied(entry[2])

    def backward_latest(self, inputs: list[Any], g: Any) -> tuple[Any, Any]:
        """``(parameter gradients, input gradients)`` of the vjp at the latest weights, from
        a key's kept ``inputs`` and its output's gradient ``g``, through a graph where one is
        (or can now be) captured; the input gradients leave as copies, the parameter gradients
        in the graph's buffers (:meth:`reuses_gradients`)."""
        actor, base = self.actor, self.base
        xs = actor._to_device(inputs)
        g_leaves, g_def = tree_flatten(g)
        sig = base._signature(xs + g_leaves)

        def capture() -> tuple[Any, list[Any], Any, Any]:
            tree = self._adopt()
            static = [base.xp.empty_like(x) for x in xs + g_leaves]
            base._load(static, xs + g_leaves)
            sx, sg = static[: len(xs)], tree_unflatten(g_def, static[len(xs) :])
            graph, grads, keep = base._capture(lambda: actor._vjp(tree, sx, None)[1](sg))
            return graph, static, grads, keep

        def reload(entry: Any) -> None:
            self._reload_params()
            base._load(entry[1], xs + g_leaves)

        entry = base.lookup(
            self.backwards, None if sig is None else ("backward", sig), capture, reload
        )
        if entry is None:
            return actor._vjp(actor.params, xs, None)[1](g)
        entry[0].launch(actor.stream)
        param_grads, input_grads = entry[2]
        return param_grads, base.copied(list(input_grads))
