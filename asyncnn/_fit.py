"""One ``Trainer.fit`` call, running: the run it drives epoch by epoch (:class:`_FitState`),
what it keeps when it stops (the state of the last completed update), the callbacks it calls
between steps and at epoch ends, and its progress display. Its plan (the arguments checked) is
``_fit_plan.py``'s, its checkpoints ``_fit_checkpoints.py``'s, and the call around the run (the
callbacks' start and end, the trace path) ``_fit_run.py``'s."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ._callback_states import deliver_epoch_end
from ._callbacks import wants_epoch_end, wants_step_end
from ._errors import ActorError
from ._fit_checkpoints import _checkpoint_epochs as _checkpoint_epochs
from ._fit_checkpoints import _save_rotating
from ._fit_checkpoints import check_checkpoint_dir as check_checkpoint_dir
from ._fit_kept import LayerStates, updates_once_per_minibatch
from ._fit_plan import _FitPlan
from ._fit_plan import epoch_layout as epoch_layout
from ._history import History
from ._math._pytree import tree_copy
from ._runtime._graph import Graph
from ._runtime._loss_actor import sums_over_rows
from ._runtime._open_run import open_run
from ._runtime._run import Run, RunState
from ._runtime._run_actors import NamedOnLoss
from ._runtime._run_guards import checked_split

if TYPE_CHECKING:
    from ._train import Trainer


#: how the error of :meth:`_FitState.on_loss`, if it raised, names it (the run's default
#: names a function given to ``open_run``, which the caller of ``fit`` never gave)
_OWN_ON_LOSS = (
    "Trainer.fit's own on_loss function (its record of each minibatch's loss for the history, "
    "the step hooks and the progress bar)"
)


class _FitState:
    """One ``fit`` going: feeds the run, keeps the state of the last completed update, calls the
    callbacks between steps, and hands what it kept to the trainer however the fit ends."""

    def __init__(self, trainer: Trainer, plan: _FitPlan, history: History) -> None:
        self.tr = trainer
        self.plan = plan
        self.history = history
        self.bar: _Progress | None = None
        self.run: Run | None = None
        self.rows = 0
        self.first_mb = trainer.state.minibatches
        self.losses: dict[int, float] = {}
        self.loss_rows: dict[int, int] = {}  # minibatch -> its rows (the weight of its loss)
        self.mb_epoch: dict[int, int] = {}
        self.epoch_start: dict[
            int, tuple[int, int]
        ] = {}  # epoch -> (first mb here, batches before)
        self.reported: list[int] = []  # minibatches whose step-end callbacks are due
        self.in_process = trainer.cluster is None
        self.flush = trainer.policy.flush
        self.step_hooks = wants_step_end(plan.callbacks)
        # validation's batches: a router's capacity holds per batch there, as per key in the
        # run, so a routed graph is validated in batches of the run's largest key (a batch of
        # 256 overflowed a capacity its keys never did); others in batches of 256
        routed = any(n.role == "router" for n in trainer.graph.nodes.values())
        split = checked_split(trainer.policy, plan.batch_size) if routed else [(0, 256)]
        self.validation_rows = max(hi - lo for lo, hi in split)
        # (streaming policies only) whether each layer applies one update per minibatch: then
        # what a stopped fit keeps is the latest state every layer was seen to hold (_keep)
        self.once_per_minibatch = not self.flush and updates_once_per_minibatch(trainer.policy)
        self.epoch_hooks = bool(
            plan.validation_data is not None
            or plan.checkpoint_every
            or wants_epoch_end(plan.callbacks)
        )
        self.position = (trainer.epochs_done, trainer.epoch_batches)  # the next batch to run
        self.stepped = self.first_mb  # minibatches whose keys were all admitted
        self.known = self.first_mb  # minibatches whose losses, and all before, are known
        # {minibatch: keys admitted before it}: a state kept after `mb` minibatches goes on
        # numbering keys from there, as a run that stopped there would
        self.keys_before: dict[int, int] = {self.first_mb: trainer.state.keys}
        # under a streaming policy that updates once per minibatch: each layer's recent states
        # (set when the run starts, where it applies)
        self.layer_states: LayerStates | None = None
        # the epochs whose end has begun in this fit: with epoch-end hooks, an epoch whose
        # minibatches are all done counts as done only then (see _commit)
        self.ended: set[int] = set()
        self.per_epoch = plan.dataset.num_batches(plan.batch_size, plan.drop_last)
        self.layout = plan.epoch_layout(trainer.seed)
        # the known losses of the minibatches that an earlier fit ran of the epoch this one
        # goes on with, with their rows (see _epoch_loss); a checkpoint of an asyncnn that kept
        # no rows gives them by the minibatch's place in the epoch, as this fit's layout has it
        # (it goes on with that epoch only in the layout it was counted in, or one taken as it
        # comes)
        carried = list(trainer._epoch_losses) if trainer.epoch_batches else []
        size, total = plan.batch_size, len(plan.dataset)
        self.carried = (
            trainer.epochs_done,
            [
                (loss, min(size, total - i * size) if rows is None else rows)
                for i, (loss, rows) in enumerate(carried)
            ],
        )
        # the epoch's loss is over its rows, as evaluate's: a loss of reduction="sum" sums
        self.sums = all(sums_over_rows(trainer.graph.nodes[n].module) for n in trainer.graph.losses)
        # the history's losses as last handed over (see _history_losses)
        self._losses_list: list[float] = []
        self._losses_upto = self.first_mb
        self._losses_whole = False  # rebuilt at the first commit
        # while the fit is kept after a stop (keep): the errors of the custom actors whose
        # actor_state raised, by layer, whose states the kept state leaves out (None: a state
        # read raises such an error, as the run's own)
        self.unread: dict[str, ActorError] | None = None

    # -- during the run --------------------------------------------------------------------------
    def on_loss(self, minibatch: int, loss: float, rows: int) -> None:
        self.losses[minibatch] = loss
        self.loss_rows[minibatch] = rows
        self.rows += rows
        self.reported.append(minibatch)
        while self.known in self.losses:
            self.known += 1
        if self.run is not None:
            self._see_layers(self.run)
        if self.bar is not None and self.bar.on_loss is not None:
            self.bar.on_loss(minibatch, loss, rows)

    async def main(self, trace_path: str | None) -> None:
        tr, plan = self.tr, self.plan
        async with open_run(
            tr.graph,
            tr.optimizer,
            tr.policy,
            state=tr.state,
            on_loss=NamedOnLoss(self.on_loss, _OWN_ON_LOSS),
            validated=True,
            cluster=tr.cluster,
            config=tr.config.replace(trace=trace_path),
        ) as run:
            if plan.checkpoint_every and self.in_process:
                _check_savable_actor_states(run)  # (before self.run: a refusal keeps no state)
            self.run = run
            if (
                self.in_process
                and not run.cuda_graphs_active  # (captured updates write in place)
                and self.once_per_minibatch  # (a streaming policy's)
            ):
                self.layer_states = LayerStates(tr.state)
            if self.bar is not None:
                self.bar.run = run
            epoch, skip = self.position
            for _ in range(plan.epochs):
                self.epoch_start[epoch] = (run.minibatches, skip)
                # from the first minibatch not done: those before are not read (an h5py file
                # read again up to the resumed position); the same order, from (seed, epoch)
                batches = plan.dataset.batches(
                    plan.batch_size, plan.shuffle, tr.seed, epoch, plan.drop_last, start=skip
                )
                for i, batch in enumerate(batches, start=skip):
                    await self._step_point(run, (epoch, i))
                    if tr.stop_training:
                        break
                    # fit checked all of its data before the run (check_data), or was told not to
                    mb = await run.step(batch, check_data=False)
                    self.stepped = run.minibatches  # every key of `mb` admitted
                    self.keys_before[mb + 1] = run.next_key
                    self.mb_epoch[mb] = epoch
                    self.position = (epoch, i + 1)
                skip = 0
                if tr.stop_training:
                    break
                epoch += 1
                self.position = (epoch, 0)
                if self.epoch_hooks:
                    await self._settle(run)
                    self._end_epoch(run, epoch - 1)
                if tr.stop_training:
                    break
            self.history.stopped_early = tr.stop_training
            await run.drain()
            # the custom actors' own states read once inside the block (the state is committed
            # after it): an actor_state that raises fails the run here, where its trace records
            # the actor's error as for any other; after the block the trace has closed as a
            # run that went well. (Those of this process: a cluster's workers read theirs as
            # they send their state back.)
            run._read_state()
        # the run has ended well: its state is complete (with a cluster, the workers' too)
        self._commit(run.state())
        # (a cluster's weights are back: the step hooks still due may save them)
        self.tr._weights_pending = False
        self._deliver_steps()
        self._record_epochs(self.position[0])
        self.history.statistics = run.statistics()

    def _record_epochs(self, before: int) -> None:
        """Gives :attr:`History.epochs` an entry for each epoch of this fit before ``before``
        that has none (epoch-end hooks record theirs as they go)."""
        recorded = {int(e["epoch"]) for e in self.history.epochs}
        # (every epoch this fit touched has a start, one whose end was pending included)
        for e in sorted(self.epoch_start):
            if e < before and e not in recorded:
                self.history.epochs.append({"epoch": e, "loss": self._epoch_loss(e)})

    async def _step_point(self, run: Run, position: tuple[int, int]) -> None:
        """Before each step: under a flush policy in this process, waits for the previous
        minibatch's updates (as the step itself would) and keeps that state; then delivers the
        step-end callbacks whose losses have come. Where it keeps no state then (on a cluster,
        whose weights stay on the workers; with captured CUDA graphs), a flush policy with step
        hooks still waits for the previous minibatch and its loss, so that its hooks come before
        the next minibatch is admitted, as they do here: a stop there trains what it does in one
        process. Under a streaming policy the pipeline runs on: before the callbacks, the
        trainer holds what a fit stopped here would keep (so a hook's ``trainer.save`` writes
        what ``_keep`` would)."""
        if self.tr._interrupt.is_set():  # Ctrl-C in a notebook, seen by the waiting thread
            raise KeyboardInterrupt
        # (captured CUDA graphs update in place: a snapshot would be a copy each step, so
        # there the state is kept at epoch ends and when the run stops between minibatches)
        keeps_now = self.in_process and not run.cuda_graphs_active
        if self.flush and keeps_now and run.minibatches > self.first_mb:
            await run.wait_idle()
            self._snapshot(run)
        elif self.flush and self.step_hooks and run.minibatches > self.first_mb:
            # (the next minibatch's admission waits for this one's updates anyway; a loss
            # computed on a worker comes back a moment after them, which the hooks need)
            await run.wait_idle(losses=True)
        if not self.flush and keeps_now and self.reported and self.step_hooks:
            self._commit_streaming(run)  # (which sees the layers first)
        else:
            self._see_layers(run)
        self._deliver_steps()

    def _see_layers(self, run: Run) -> None:
        """Notes each layer's state now, where the fit keeps :class:`LayerStates`."""
        states = self.layer_states
        if states is not None:
            states.see(self._run_state(run), self.known - self.first_mb)

    def _run_state(self, run: Run) -> RunState:
        """``run.state()``; while the fit is kept after a stop, a layer whose ``actor_state``
        raises is left out of its ``actor_states`` (noted in :attr:`unread`) instead: raised
        again there, its error would hide the one that stopped the fit, and the trainer would
        keep nothing of what the fit trained."""
        unread = self.unread
        return run.state() if unread is None else run._read_state(unread)

    async def _settle(self, run: Run) -> None:
        """Every admitted minibatch done and its loss known (a continuous policy's pipeline
        cools down: the next epoch starts a new stream)."""
        if self.flush:
            await run.wait_idle(losses=True)
        else:
            await run.drain()
        if run.cuda_graphs_active:
            # a key counts as done once its work is queued: the snapshot copies the weights
            # that captured updates write on the actors' streams only after those have run
            await run.wait_for_devices()

    @trio.lowlevel.enable_ki_protection  # Ctrl-C waits: the trainer never holds half a state
    def _snapshot(self, run: Run) -> None:
        """Hands the run's current state, consistent at this point, to the trainer."""
        if not self.in_process:
            return  # the workers' weights come back only at the end of the run
        state = run.state()
        if run.cuda_graphs_active:  # captured updates write in place: keep copies
            state.params = {n: tree_copy(p) for n, p in state.params.items()}
            state.opt_states = {n: tree_copy(p) for n, p in state.opt_states.items()}
        self._commit(state)

    @trio.lowlevel.enable_ki_protection
    def _commit(self, state: RunState) -> None:
        tr = self.tr
        tr.state = state
        done = state.minibatches
        epoch, skip = self.position
        # where the next fit continues: the epoch and batch of minibatch `done` (epochs are
        # entered in increasing order: the latest one begun at or before `done` holds it)
        layout = tr._epoch_layout  # no epoch begun here (epochs=0): the position as it was
        for e in reversed(self.epoch_start):
            first, before = self.epoch_start[e]
            if first <= done:
                # counted in this fit's minibatches (a position counted in others was reset)
                epoch, skip, layout = e, before + done - first, self.layout
                # an epoch with all its minibatches done is done once its end has begun;
                # until then its end is pending (epoch_batches is the epoch's minibatches),
                # and the next fit runs it first
                if skip >= self.per_epoch and (e in self.ended or not self.epoch_hooks):
                    epoch, skip = epoch + 1, 0
                break
        if not skip:
            tr._epoch_losses = []
        elif epoch in self.epoch_start:  # (else the position as it was, and its losses)
            # listed when read: here, at every step, it would be quadratic in the epoch's length
            # (the losses of minibatches before `done` are known and never change)
            tr._epoch_losses_later = functools.partial(self._epoch_losses, epoch, done)
        tr.epochs_done, tr.epoch_batches = epoch, skip
        # (kept at an epoch's start too, as the last epoch's: a save records the batch size the
        # run went in, which `asyncnn train --resume` goes on with)
        tr._epoch_layout = layout
        self._history_losses(done)

    def _history_losses(self, done: int) -> None:
        """The history's losses: those known of minibatches ``first_mb .. done - 1``, in order.
        Extended in place when the list so far has every earlier one (a snapshot each step would
        otherwise rebuild it: quadratic in the fit's length), rebuilt otherwise."""
        losses = self.losses
        upto = self._losses_upto
        if self._losses_whole and upto <= done and self.history.losses is self._losses_list:
            new = range(upto, done)
            self._losses_list.extend(losses[mb] for mb in new if mb in losses)
            self._losses_whole = all(mb in losses for mb in new)
        else:
            kept = range(self.first_mb, done)
            self._losses_list = [losses[mb] for mb in kept if mb in losses]
            self._losses_whole = all(mb in losses for mb in kept)
            self.history.losses = self._losses_list
        self._losses_upto = done

    def _deliver_steps(self) -> None:
        if not self.reported:
            return
        due = self.reported
        due.sort(reverse=True)  # (the earliest last: popped from the end)
        while due:
            # one at a time: where a callback raises, the later steps stay due (a fit stopping
            # delivers them still, see keep); this one is not delivered again
            mb = due.pop()
            logs = {"loss": self.losses[mb], "epoch": self.mb_epoch.get(mb, self.position[0])}
            for cb in self.plan.callbacks:
                cb.on_step_end(self.tr, mb, logs)

    def _epoch_losses(self, epoch: int, before: int | None = None) -> list[tuple[float, int]]:
        """The known losses of ``epoch``'s minibatches (before minibatch ``before``), in order,
        each with its rows: those an earlier fit ran of it, then this fit's."""
        first, _ = self.epoch_start[epoch]
        mbs = range(first, self.stepped if before is None else before)
        carried_epoch, carried = self.carried
        values = list(carried) if epoch == carried_epoch else []
        values += [
            (self.losses[mb], self.loss_rows[mb])
            for mb in mbs
            if self.mb_epoch.get(mb) == epoch and mb in self.losses
        ]
        return values

    def _epoch_loss(self, epoch: int) -> float:
        """``epoch``'s loss, also over the minibatches an interrupted fit ran of it: the mean
        over its rows (each minibatch's mean loss weighted by its rows, as ``evaluate`` weighs
        its batches: a short last minibatch counts for its rows only), or for losses of
        ``reduction="sum"`` the sum over its minibatches, as ``evaluate`` gives. (With loss
        nodes of both kinds the weighted mean: a minibatch's loss is their sum, which no
        weight splits.)"""
        values = self._epoch_losses(epoch)
        if not values:
            return float("nan")
        if self.sums:
            return math.fsum(loss for loss, _ in values)
        return math.fsum(loss * rows for loss, rows in values) / sum(r for _, r in values)

    @trio.lowlevel.enable_ki_protection
    def _end_epoch(self, run: Run, epoch: int) -> None:
        """Keeps the state after ``epoch``'s minibatches, delivers the step-end callbacks still
        due, then runs its end: validation, the history's row, ``on_epoch_end`` and the
        checkpoint.

        Ctrl-C waits for the end (it stops the fit at the next step, as it does in a notebook):
        the kept state counts the epoch as done, so an epoch end cut short would never run,
        leaving a gap in the callbacks' logs, no checkpoint of that epoch, or half of one.
        A Ctrl-C before the end begins (while the last minibatches are settling) keeps the
        epoch not done, as one mid-epoch does: its minibatches all done, its end pending
        (:attr:`Trainer.epoch_batches` is the epoch's minibatches), which the next ``fit``
        runs first, as the one epoch of its ``epochs`` it finishes. So does an error in the
        step hooks of its last minibatches: they come before its end, which has not begun (a
        hook's ``trainer.save`` there writes the epoch with its end pending, as a stop keeps
        it)."""
        self._snapshot(run)  # (what the step hooks see and a stop in them keeps)
        self._deliver_steps()
        self.ended.add(epoch)
        if self.in_process:  # the same state (the run is idle), the epoch now done
            self._commit(self.tr.state)
        self._epoch_end(epoch)

    def _epoch_end(self, epoch: int) -> None:
        tr, plan = self.tr, self.plan
        _synchronize(tr.graph, tr.cluster)  # GPU updates done before validation or a checkpoint
        logs: dict[str, float] = {"epoch": epoch, "loss": self._epoch_loss(epoch)}
        if plan.validation_data is not None:
            for name, value in tr._evaluate(plan.validation_data, self.validation_rows).items():
                logs[f"val_{name}"] = value
        self.history.epochs.append(dict(logs))
        # (noting which callbacks have not had it yet: a save from an earlier one's hook, or
        # after an error there, records it as still due to them)
        deliver_epoch_end(tr, plan.callbacks, epoch, logs)
        every = plan.checkpoint_every
        if every and plan.checkpoint_dir is not None and (epoch + 1) % every == 0:
            _save_rotating(tr, plan.checkpoint_dir, epoch + 1, plan.keep_checkpoints)

    # -- when the fit stops early ------------------------------------------------------------------
    def keep(self) -> None:
        """After an interrupt or an error: what the trainer keeps (see ``docs/workflow.md``)."""
        run = self.run
        if run is None or not self.in_process:
            return  # nothing ran, or the workers' weights never came back: the state before
        self.unread = {}
        try:
            self._keep(run)
        finally:  # the epochs the kept state finished, as a fit that ends well records them
            unread, self.unread = self.unread, None
            _note_unread(unread or {}, self.tr.state)
            self._record_epochs(self.tr.epochs_done)
            self._deliver_kept_steps()

    def _deliver_kept_steps(self) -> None:
        """The step-end callbacks still due of the minibatches the kept state has applied
        (their losses are in the history, and a resumed fit starts after them): a fit stopped
        between two steps has not delivered them yet. A callback's error here is added to the
        error that stops the fit, as a note (as ``on_fit_end``'s are)."""
        kept = self.tr.state.minibatches
        self.reported = [mb for mb in self.reported if mb < kept]
        propagating = sys.exception()  # what stops the fit (keep runs in its handler)
        # step hooks may not set the weights here either (the run has closed, but a hook's
        # trainer.params = ... must not hold only where the fit happened to stop)
        self.tr._stopping_step_hooks = True
        try:
            self._deliver_steps()
        except BaseException as exc:  # noqa: BLE001 - the fit's own error goes on
            if propagating is None:
                raise
            propagating.add_note(
                "a callback's on_step_end raised too, while this was raised:\n"
                + "".join(traceback.format_exception(exc, chain=False)).rstrip()
            )
        finally:
            self.tr._stopping_step_hooks = False

    def _keep(self, run: Run) -> None:
        with contextlib.suppress(Exception):  # a broken device must not hide the first error
            _synchronize(self.tr.graph, self.tr.cluster)
        if run.in_flight == 0 and run.minibatches == self.stepped:
            # stopped between minibatches (not inside a step, which counts its minibatch
            # before admitting its keys): everything admitted is applied
            self._commit(self._run_state(run))
            return
        if self.flush:
            return  # the last snapshot: every layer after the same last completed minibatch
        self._commit_streaming(run)

    @trio.lowlevel.enable_ki_protection
    def _commit_streaming(self, run: Run) -> None:
        """Under a policy that streams keys (no flush between minibatches), in this process:
        hands the trainer what a fit stopped now keeps (``docs/workflow.md``'s table)."""
        if self.once_per_minibatch:
            # (PipeDream2BW, also under a remedy) each layer's own last state would hold part of
            # the gradient sum of an unfinished minibatch, which the next fit would add into
            # another minibatch's update, and the layers would stand after different
            # minibatches (under a remedy that corrects updates, one of them half-updated):
            # every layer after the same minibatches, the latest seen everywhere, with no
            # partial sum; the next fit redoes the rest
            states = self.layer_states
            if states is None:  # (captured CUDA graphs): the last state committed
                return
            self._see_layers(run)
            done = self.first_mb + states.common
            if done <= self.tr.state.minibatches:
                return  # no later than what is kept already (the state before, an epoch end)
            kept = states.kept
            self._commit(
                RunState(
                    params={n: p for n, (p, _, _, _) in kept.items()},
                    opt_states={n: o for n, (_, o, _, _) in kept.items()},
                    versions={
                        n: states.start[n] + (states.common if n in states.seen else 0)
                        for n in kept
                    },
                    minibatches=done,
                    keys=self.keys_before.get(done, run.next_key),
                    actor_states={n: a for n, (_, _, a, _) in kept.items() if a is not None},
                    # (each layer's version before the latest, seen with the weights kept: the
                    # next fit's first forwards use it, as the unbroken fit's would)
                    earlier_params={n: e for n, (_, _, _, e) in kept.items() if e},
                )
            )
            return
        # other continuous policies: each layer's own last update; the counters stop at the
        # first minibatch whose loss is not known
        state = self._run_state(run)
        state.minibatches = self.known
        state.keys = self.keys_before.get(self.known, state.keys)
        self._commit(state)


def _note_unread(unread: dict[str, ActorError], kept: RunState) -> None:
    """Adds to the error that stops the fit (``keep`` runs in its handler) a note naming each
    layer whose own state the trainer does not keep (``kept`` has none for it), its
    ``actor_state`` having raised. (A state kept from before, whose weights are as old, keeps
    that layer's state of then: nothing to say.)"""
    propagating = sys.exception()
    if propagating is None:
        return
    for name, error in unread.items():
        if name in kept.actor_states:
            continue
        cause = error.__cause__  # (the hook's own exception, as _read_state sets it)
        propagating.add_note(
            f"layer {name!r}: its own state is not kept (its actor_state raised "
            f"{type(cause).__name__}: {cause}): the trainer keeps what a failed fit keeps "
            "(docs/workflow.md, 'Stopping early keeps what finished') with no state for that "
            f"actor (tr.state.actor_states has no {name!r}), so a next fit starts it from its "
            "setup alone"
        )


def _check_savable_actor_states(run: Run) -> None:
    """Refuses, before the fit trains, a custom actor's state (as ``setup``, or the state it was
    given, left it) that ``checkpoint_every``'s saves could not hold: the first save refused it
    only after a whole epoch. A state that becomes one only later is refused by that save.

    Raises:
        TypeError: the save's own message (naming the layer and the place in its state), and
            that the fit checked it as it started.
    """
    from ._checkpoint_save import split_actor_state

    for name, state in run.state().actor_states.items():
        try:
            # (a GPU's arrays are copied to the host, as a save copies them, and dropped)
            split_actor_state(name, state, {})
        except TypeError as exc:
            raise TypeError(
                f"{exc} (checked as the fit starts, before any training: checkpoint_every saves "
                "this state with every checkpoint)"
            ) from None


def _synchronize(graph: Graph, cluster: object | None = None) -> None:
    """Waits for the work queued on each GPU that holds a layer of this process (nothing to do
    on the CPU). With a ``cluster``, layers on workers are skipped: their weights come back as
    host arrays, and their GPUs may not exist here (a Ray worker's ``cuda:0``)."""
    from .backends import get_backend

    here = [n for n in graph.layers if cluster is None or graph.nodes[n].worker is None]
    for device in sorted({graph.nodes[n].device for n in here} - {"cpu"}):
        get_backend(device).synchronize()


class _Progress:
    """A rich progress bar fed by loss reports (does nothing when disabled). In a notebook
    without ipywidgets (which rich's live display needs there) it prints plain text lines
    instead, at most one a second and one at the end."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.run: Run | None = None
        self._bar: Any = None
        self._task: Any = None
        self._rows = 0
        self._done = 0
        self._loss = float("nan")
        self._plain = False
        self._printed = 0.0
        self._start = time.perf_counter()
        self.on_loss: Callable[[int, float, int], None] | None = self._on_loss if enabled else None

    def __enter__(self) -> _Progress:
        if self.enabled:
            if _plain_progress():
                self._plain = True
                return self
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[rate]:.0f} samples/s"),
                TimeRemainingColumn(),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, loss=float("nan"), rate=0.0)
        return self

    def _rate(self) -> float:
        return self._rows / max(time.perf_counter() - self._start, 1e-9)

    def _on_loss(self, minibatch: int, loss: float, rows: int) -> None:
        self._rows += rows
        self._done += 1
        self._loss = loss
        if self._plain:
            now = time.perf_counter()
            if now - self._printed >= 1.0:
                self._printed = now
                self._print_line()
            return
        self._bar.update(self._task, advance=1, loss=loss, rate=self._rate())

    def _print_line(self) -> None:
        print(
            f"train {self._done}/{self.total}  loss {self._loss:.4f}  {self._rate():.0f} samples/s",
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        if self._plain:
            self._print_line()
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _plain_progress() -> bool:
    """In a Jupyter kernel without ipywidgets: rich's live display would only warn there."""
    import importlib.util

    from rich.console import Console

    return Console().is_jupyter and importlib.util.find_spec("ipywidgets") is None
