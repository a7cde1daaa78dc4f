"""The gradients and the optimizer update of a GPU layer actor's CUDA graphs (``_capture.py``).

Under a flush each key of a minibatch leaves its parameter gradients in its own backward graph's
buffers, which stay as they are until the next minibatch: their sum waits for the update. Where
the update is captured, it reads those buffers itself and sums them in its own kernels (one graph
per set of buffers: the slots' backward graphs, the same at every minibatch); else the sum is made
in one pass (:meth:`UpdateGraphs.sum_gradients`) into buffers the captured update reads as they
are. The update is captured per what it depends on besides the arrays
(:func:`_update_token`): SGD's first step, and its learning rate where that is a constant; one
graph for every later step of SGD under a learning-rate schedule, and for every step of Adam and
AdamW, whose step-dependent scalars are written on the device before each launch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple

from asyncnn._math._optim import SGD
from asyncnn._math._optim_adam import Adam, AdamW
from asyncnn._math._optim_rms import Adagrad, RMSprop
from asyncnn._math._pytree import tree_copy, tree_flatten, tree_leaves, tree_unflatten
from asyncnn._math._schedules import Schedule

from ._weight_versions import WeightVersions, _fold, _tree_scale

if TYPE_CHECKING:
    import collections

    from ._actors import LayerActor
    from ._capture import _Entry, _Graphs

__all__ = ["MAX_SIGNATURES", "CapturedUpdate", "UpdateGraphs", "step_scalars"]

#: input signatures captured per actor (each holds its graphs' memory, once per slot), and the
#: update graphs summing gradients kept (one per set of backward graphs whose gradients it reads)
MAX_SIGNATURES = 4

# the built-in optimizers whose update reads the gradients and keeps none of them (every buffer
# and result a fresh array): they may be given a captured backward's buffers as they are, where
# an optimizer of the user's own gets a copy
_KEEP_NO_GRADIENTS = (SGD, Adam, AdamW, RMSprop, Adagrad)


class CapturedUpdate(NamedTuple):
    """One captured optimizer update."""

    graph: Any
    grads: list[Any]  # the gradient leaves it reads (a backward graph's outputs, as a rule)
    keep: Any  # what must live as long as the graph (its memory pool, its workspace)
    tree: Any  # the gradient tree it was captured with
    terms: list[list[Any]] | None  # the backward graphs' gradients a summing update reads
    #: the state the update's Python saw at the capture, its step kept current at each launch
    #: (a CUDA graph reads none of it: what reruns the Python, the CPU stand-in of the tests,
    #: computes that step's learning rate from it)
    frozen: dict[str, Any]


class UpdateGraphs:
    """The gradient sums and the captured update of :class:`~._capture.ActorGraphs`."""

    # (ActorGraphs' own)
    base: _Graphs
    actor: LayerActor
    entries: collections.OrderedDict[Any, _Entry]
    params: list[Any] | None
    params_def: Any
    params_tree: Any  # the tree of the static parameters handed to the actor

    def _init_update(self) -> None:
        # (cupy: imported for GPU actors only)
        from asyncnn.backends import _fused_sum

        self.fused_sum = _fused_sum
        #: update token (or, for a summing update, its token and terms) -> its captured update
        self.updates: dict[Any, CapturedUpdate] = {}
        self.state: dict[str, list[Any]] = {}  # static optimizer buffers, by name
        #: the step-dependent scalars of Adam (and of SGD under a schedule), on the device
        #: (float64 x 3), and the values last written there
        self.scalars: Any = None
        self.scalars_written: tuple[float, float, float] | None = None
        # where a flush's keys' gradients are summed, which the captured update reads as it is
        # (:meth:`sum_gradients`): its leaves, their tree and its structure
        self.grad_sum: list[Any] = []
        self.grad_sum_tree: Any = None
        self.grad_sum_def: Any = None
        #: the parameters' gradients of the backward graph launched last (:meth:`keeps_gradients`)
        self.last_grads: Any = None
        #: the sum :meth:`sum_gradients` left to the update: (terms' leaves, scale), or None
        self.pending: tuple[list[list[Any]], float] | None = None

    def _static_params(self) -> bool:
        # the actor holds the very tree handed out (an eager update replaces it)
        return self.params_tree is not None and self.actor.params is self.params_tree

    # -- the gradients of a minibatch -----------------------------------------------------------
    def keeps_gradients(self, grads: Any) -> bool:
        """Whether ``grads`` (a backward's parameter gradients) are a captured backward's
        buffers that stay as they are until the minibatch's end: under a flush, where a slot's
        graphs run again only in a later minibatch. Their sum can then wait for the update
        (:meth:`sum_gradients`)."""
        return grads is self.last_grads and not self.base.streaming

    def sum_gradients(self, acc: Any, owed: tuple[Any, ...], scale: float) -> Any:
        """``((acc + owed[0]) + owed[1] ...) * scale`` (``acc`` None: from ``owed[0]``), the
        gradients an update applies, computed in one pass (adding each key's as it came took a
        pass per key, the scaling another and the captured update a copy). The result lies in
        buffers of this actor, the same at every call, which the captured update reads as they
        are (where the captured update sums them itself, :attr:`pending`, those buffers are
        not written: the result is then only for the next :meth:`update` to be given); it is
        ``owed[0]`` itself where that is the whole sum. Gradients the one-pass sum
        does not take (16-bit) are added and scaled as they were, into fresh arrays. An
        optimizer of the user's own may keep the gradients it is given: it gets fresh arrays
        (a copy where ``owed[0]`` is the whole sum), which no later sum or backward writes."""
        self.pending = None
        keeps_none = type(self.actor.ctx.optimizer) in _KEEP_NO_GRADIENTS
        if acc is None and len(owed) == 1 and scale == 1.0:
            return owed[0] if keeps_none else tree_copy(owed[0])
        terms = [tree_flatten(t) for t in ((acc, *owed) if acc is not None else owed)]
        flat = [t[0] for t in terms]
        if not self.fused_sum.sums(flat):
            total = _fold(owed[0], owed[1:]) if acc is None else _fold(acc, owed)
            return total if scale == 1.0 else _tree_scale(total, scale)
        leaves, treedef = terms[0]
        if not keeps_none:
            out = [self.base.xp.empty_like(x) for x in leaves]
            self.fused_sum.sum_into(out, flat, scale)
            return tree_unflatten(treedef, out)
        out = self.grad_sum
        if treedef != self.grad_sum_def or any(
            o.shape != x.shape or o.dtype != x.dtype for o, x in zip(out, leaves, strict=True)
        ):
            out = self.grad_sum = [self.base.xp.empty_like(x) for x in leaves]
            self.grad_sum_def = treedef
            self.grad_sum_tree = tree_unflatten(treedef, out)
            self.base.changed()
        if acc is None and self._update_sums(len(terms)):
            # the captured update sums them (or :meth:`update` sums them here first)
            self.pending = (flat, scale)
        else:
            self.fused_sum.sum_into(out, flat, scale)
        return self.grad_sum_tree

    def _update_sums(self, count: int) -> bool:
        """Whether the (built-in) optimizer's update may read a sum of ``count`` graphs'
        gradients itself: without clipping (its kernels then read each gradient once), on the
        static parameters, with no correction of the update reading the gradients after it,
        and where the gradients go straight to the update: an actor's own ``apply_gradients``
        may read or change them first (its sum's buffers would be read unwritten)."""
        return (
            count <= self.fused_sum.MAX_TERMS
            and type(self.actor).apply_gradients is WeightVersions.apply_gradients
            and self.actor.ctx.optimizer.clip_norm is None
            and not self.actor.corrects_updates
            and self._static_params()
        )

    def reuses_gradients(self, minibatch_done: bool) -> bool:
        """Whether the parameter gradients a backward returned may be written over by a later
        backward before the next one's are added to them: a sum that keeps them must copy."""
        return self.base.streaming or minibatch_done

    # -- the optimizer update -------------------------------------------------------------------
    def update(self, params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        """``optimizer.update`` through a graph where one is (or can now be) captured."""
        opt = self.actor.ctx.optimizer
        token = _update_token(opt, state)
        base = self.base
        pending, self.pending = self.pending, None
        if pending is not None and grads is self.grad_sum_tree:
            if token is not None and self._static_params():
                terms, scale = pending
                sig = ("summed", token, scale, tuple(id(x) for leaves in terms for x in leaves))
                if self._run_graph(
                    sig, state, lambda: self._capture_update(grads, state, token, pending)
                ):
                    return self._state_after(state)
            self.fused_sum.sum_into(self.grad_sum, *pending)  # (as sum_gradients would have)
        if token is None or not self._static_params():
            return opt.update(params, grads, state)

        def reload(captured: CapturedUpdate) -> None:
            if grads is not captured.tree:  # else they are the captured buffers already
                base._load(captured.grads, tree_leaves(grads))

        if not self._run_graph(
            ("update", token), state, lambda: self._capture_update(grads, state, token), reload
        ):
            return opt.update(params, grads, state)
        return self._state_after(state)

    def _run_graph(self, sig: Any, state: Any, capture: Any, reload: Any = None) -> bool:
        """Launches the update graph of ``sig``, captured by ``capture()`` on its second
        sighting (``reload(captured)`` loads a replay's gradients); False where there is none
        (yet, or for good: its capture failed), launching nothing. The graphs summing
        gradients are kept least recently used first, at most :data:`MAX_SIGNATURES`."""
        base, opt = self.base, self.actor.ctx.optimizer
        token = sig[1]
        on_device = _reads_scalars(token)
        captured = self.updates.get(sig)
        if captured is None:
            if not base._due(sig):
                return False
            if on_device:  # (the warm-up before the capture reads them too)
                self._write_scalars(opt, state)
            try:
                captured = capture()
            except (base.g.CaptureError, self.fused_sum.NotSummed) as exc:
                base._fail(sig, exc)
                return False
            self.updates[sig] = captured
            summing = [k for k in self.updates if k[0] == "summed"]
            for old in summing[: max(0, len(summing) - MAX_SIGNATURES)]:
                del self.updates[old]
            base.changed()
        else:
            self.updates[sig] = self.updates.pop(sig)  # (the most recently used last)
            if reload is not None:
                reload(captured)
            for name, leaves in self.state.items():
                base._load(leaves, tree_leaves(state[name]))
            if on_device:
                self._write_scalars(opt, state)
            captured.frozen["step"] = state["step"]
            base.stats.replays += 1
        captured.graph.launch(self.actor.stream)
        return True

    def _write_scalars(self, opt: Any, state: Any) -> None:
        """This step's scalars where the update's graph reads them (:func:`step_scalars`),
        unless the buffer holds them already (a schedule's rate held for many steps)."""
        fused = self.base.fused
        if self.scalars is None:
            self.scalars = self.base.xp.zeros(3, dtype=self.base.xp.float64)
        values = step_scalars(fused, opt, int(state["step"]))
        if values != self.scalars_written:
            fused.set_scalars(self.scalars, values)
            self.scalars_written = values

    def _state_after(self, state: Any) -> tuple[Any, Any]:
        new: dict[str, Any] = {"step": state["step"] + 1}
        for name, leaves in self.state.items():
            new[name] = tree_unflatten(self.params_def, leaves)
        return self.actor.params, new

    def _capture_update(
        self, grads: Any, state: Any, token: Any, pending: Any = None
    ) -> CapturedUpdate:
        """The update of ``grads`` captured (with ``pending``: of the sum it names, read in
        place of ``grads``)."""
        opt, base = self.actor.ctx.optimizer, self.base
        fused = base.fused
        names = [n for n in state if n != "step"]
        for name in names:
            leaves = tree_leaves(state[name])
            if name not in self.state:
                self.state[name] = [b.copy() for b in leaves]
            else:
                base._load(self.state[name], leaves)
        g_static = tree_leaves(grads)  # the backward graph's outputs, as a rule: no copy then
        params = tree_unflatten(self.params_def, self.params or [])
        frozen = {"step": state["step"]}
        for name in names:
            frozen[name] = tree_unflatten(self.params_def, self.state[name])
        g_tree = tree_unflatten(self.params_def, g_static)

        def on_device() -> Any:  # the kernels read the step's scalars from the device
            if not _reads_scalars(token):
                return contextlib.nullcontext()
            return fused.scalars_on_device(self.scalars)

        def summing() -> Any:
            if pending is None:
                return contextlib.nullcontext()
            return self.fused_sum.summed(g_static, *pending)

        def warm() -> None:  # (loads the very kernels the capture will launch)
            with on_device(), summing():
                opt.update(params, g_tree, frozen)

        def step() -> None:
            # the fused kernels write over the static buffers: then the loads below copy nothing
            with fused.in_place(), on_device(), summing():
                new_p, new_s = opt.update(params, g_tree, frozen)
            base._load(self.params or [], tree_leaves(new_p))
            for name in names:
                base._load(self.state[name], tree_leaves(new_s[name]))

        graph, _, keep = base._capture(step, warm)
        # (a summing graph's key holds its terms' ids: the arrays stay as long as the graph, so
        # that no other array takes an id of them; the memory is their backward graphs')
        terms = None if pending is None else pending[0]
        return CapturedUpdate(graph, g_static, keep, grads, terms, frozen)


def _update_token(opt: Any, state: Any) -> Any:
    """What a captured update depends on besides the arrays, or None (never capture it).

    The built-in SGD's kernels depend on whether this is the first step (momentum starts its
    buffer then) and take a constant learning rate as an argument; under a schedule they read
    it from the device (the token's learning rate None), written before each launch, as the
    built-in Adam and AdamW read what changes from step to step (bias corrections, the
    learning rate): one graph serves every step. Clipping by the global norm is left eager.
    """
    if not isinstance(state, dict) or "step" not in state:
        return None
    if type(opt) is SGD:
        step = int(state["step"])
        return ("sgd", None if isinstance(opt.lr, Schedule) else float(opt.lr), step == 0)
    if type(opt) in (Adam, AdamW) and opt.clip_norm is None:
        return ("adam",)
    return None


def step_scalars(fused: Any, opt: Any, step: int) -> tuple[float, float, float]:
    """What the captured update of the built-in ``opt`` (SGD under a schedule, Adam, AdamW)
    reads from the device at ``step``, as ``fused.set_scalars`` takes it."""
    lr = opt.learning_rate(step)
    if type(opt) is SGD:
        return fused.sgd_step_scalars(lr)
    return fused.adam_step_scalars(step, lr, opt.betas, opt.weight_decay, type(opt) is AdamW)


def _reads_scalars(token: Any) -> bool:
    """Whether the update of ``token`` reads its step's scalars from the device."""
    return token[0] == "adam" or (token[0] == "sgd" and token[1] is None)
