"""The synchronous face: :class:`Trainer` runs a graph's actors for ``fit``/``evaluate``/
``predict`` and keeps weights, optimizer state and counters between calls."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import trio

from ._callbacks import Callback, wants_epoch_end
from ._datacheck import check_labels, check_params, require_inputs
from ._math._data import ArrayDataset
from ._math._pytree import tree_map
from ._notebook import run_outside_loop
from ._runtime._checks import check_cuda_graphs
from ._runtime._forward import forward_pass
from ._runtime._graph import Graph
from ._runtime._policies import Policy
from ._runtime._run import Run, RunState, check_batch, init_state, open_run, validate
from ._runtime._statistics import ActorStatistics
from .backends import to_numpy, tune_allocator

__all__ = ["History", "Trainer"]


@dataclass
class History:
    """What ``fit`` measured.

    Attributes:
        losses: one mean loss per minibatch, in minibatch order (per key for ``Async``, whose
            keys are minibatches).
        epochs: one dict per epoch finished: ``"epoch"``, ``"loss"`` (its mean minibatch loss)
            and, with ``validation_data``, ``"val_loss"`` (and ``"val_accuracy"``).
        samples_per_second: training throughput over the whole call.
        seconds: wall time of the call.
        statistics: per-actor counters at the end of the call.
        stopped_early: a callback ended the fit (``trainer.stop_training``).
    """

    losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    samples_per_second: float = 0.0
    seconds: float = 0.0
    statistics: dict[str, ActorStatistics] = field(default_factory=dict, repr=False)
    stopped_early: bool = False

    @property
    def metrics(self) -> dict[str, list[float]]:
        """The epoch metrics as ``{name: one value per epoch}`` (``"loss"``, ``"val_loss"``...)."""
        out: dict[str, list[float]] = {}
        for entry in self.epochs:
            for name, value in entry.items():
                if name != "epoch":
                    out.setdefault(name, []).append(value)
        return out

    def utilisation(self) -> dict[str, float]:
        """Busy fraction of each actor over the call."""
        out = {}
        for name, s in self.statistics.items():
            total = s.busy_seconds + s.idle_seconds
            out[name] = s.busy_seconds / total if total > 0 else 0.0
        return out

    def __repr__(self) -> str:
        parts = [f"{len(self.losses)} minibatches", f"{len(self.epochs)} epochs"]
        if self.losses:
            parts.append(f"loss {self.losses[0]:.4g} -> {self.losses[-1]:.4g}")
        last = self.epochs[-1] if self.epochs else {}
        parts += [f"{k} {v:.4g}" for k, v in last.items() if k.startswith("val_")]
        parts.append(f"{self.samples_per_second:.0f} samples/s")
        if self.stopped_early:
            parts.append("stopped early")
        return f"History({', '.join(parts)})"


class Trainer:
    """Trains a graph of actors under a policy.

    Example:
        >>> g = ann.Graph.sequential([nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10)],
        ...                          loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 40))
        >>> tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(microbatches=4))
        >>> hist = tr.fit({"x": X, "y": Y}, epochs=1, batch_size=32)
        >>> tr.evaluate({"x": X, "y": Y})
        {'loss': ..., 'accuracy': ...}

    Args:
        graph: the network (see :class:`~asyncnn.Graph`).
        optimizer: an ``asyncnn.optim`` optimizer (each layer keeps its own state).
        policy: an ``asyncnn.policies`` policy.
        seed: seeds the weights (per node), the shuffling and dropout.
        dtype: floating dtype of weights and float inputs.
        trace: write a message trace of each ``fit`` to this path (the first ``fit``; later ones
            to ``NAME.1.EXT``, ``NAME.2.EXT``, ...). Read it with ``asyncnn.trace.read``, replay
            it with ``asyncnn.replay``.
        trace_payloads: which tensors a trace keeps besides their digests: ``"inputs"`` (enough
            to replay), ``"all"`` (enough to replay one actor alone), ``"none"``.
        cluster: run on worker processes (``ann.cluster.LocalCluster(workers=N)`` or
            ``RayCluster``); place nodes with ``g.layer(..., worker=i)``. Without a cluster,
            ``worker=`` is ignored and everything runs in this process. ``evaluate`` and
            ``predict`` run in this process on the gathered weights.
        progress: show a live progress bar (rich) with the loss and samples/s.
        stall_timeout: seconds without progress, with keys in flight, before a StallError.
        check_finite: check every tensor for NaN/Inf and name the first actor producing one.
        tune_allocator: raise glibc's mmap/trim thresholds once, so that large arrays are reused
            instead of page-faulting afresh each step (DESIGN.md section 7); False leaves the
            allocator alone.
        cuda_graphs: on GPU actors, capture the forward, backward and update as CUDA graphs once
            the shapes repeat and replay them (see ``docs/gpus.md``); used under ``Sync`` and
            ``GPipe(1)`` without a trace, elsewhere (and on the CPU) the run stays eager.

    Raises:
        TypeError: ``cuda_graphs`` is not a bool.
        ValueError: ``cuda_graphs=True`` with a ``cluster``.

    Attributes:
        history: the :class:`History` of the latest ``fit``, also of one that was interrupted
            or failed (then with the losses of the updates the trainer kept).
        epochs_done: epochs trained in all.
        epoch_batches: minibatches done of an epoch that an interrupted ``fit`` left
            unfinished (the next ``fit`` finishes it first); 0 otherwise.
        stop_training: set to True (by a callback) to end the current ``fit`` after its step.
        traces: the trace files written so far, one per ``fit``.
    """

    def __init__(
        self,
        graph: Graph,
        optimizer: Any,
        policy: Policy,
        seed: int = 0,
        dtype: str = "float32",
        trace: str | None = None,
        cluster: Any = None,
        trace_payloads: str = "inputs",
        progress: bool = False,
        stall_timeout: float = 60.0,
        check_finite: bool = False,
        tune_allocator: bool = True,
        cuda_graphs: bool = False,
    ) -> None:
        from ._runtime._recorder import PAYLOAD_MODES

        if trace_payloads not in PAYLOAD_MODES:
            raise ValueError(
                f"trace_payloads must be one of {PAYLOAD_MODES}, got {trace_payloads!r}"
            )
        self.trace = None if trace is None else str(trace)
        self.trace_payloads = trace_payloads
        self.traces: list[str] = []  # the trace files written so far, one per fit
        if cluster is not None and not callable(getattr(cluster, "open_run", None)):
            raise TypeError(
                "cluster must be an asyncnn.cluster cluster (e.g. "
                f"ann.cluster.LocalCluster(workers=2)), got {cluster!r}"
            )
        self.cluster = cluster
        if not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be an asyncnn.policies policy (e.g. policies.Sync()), got {policy!r}"
            )
        self.graph = graph
        self.optimizer = optimizer
        self.policy = policy
        self.seed = seed
        self.dtype = str(np.dtype(dtype))
        self.progress = progress
        self.stall_timeout = stall_timeout
        self.check_finite = check_finite
        check_cuda_graphs(cuda_graphs, cluster)
        self.cuda_graphs = cuda_graphs
        if tune_allocator:
            _tune_allocator()
        self.shapes = validate(graph, self.dtype)
        self.state: RunState = init_state(
            graph, optimizer, seed, self.dtype, placed_on_host=cluster is not None
        )
        self.epochs_done = 0
        #: minibatches done of the epoch an interrupted fit left unfinished (the next fit
        #: finishes that epoch first)
        self.epoch_batches = 0
        #: the History of the latest fit, kept also when it was interrupted or failed
        self.history = History()
        #: set to True (by a callback) to end the current fit after its current step
        self.stop_training = False
        self._interrupt = threading.Event()

    # -- reading -----------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        """``{node name: params}`` as numpy arrays, at the current version."""
        return {n: tree_map(to_numpy, p) for n, p in self.state.params.items()}

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        """Replaces the weights of the layers named in ``value`` (others keep theirs), checked
        against the graph first: each layer's structure, array shapes and real dtypes.

        Raises:
            KeyError: no layer of that name.
            ValueError: naming the layer, the place in its parameters and what differs.
        """
        from .backends import get_backend

        for name, p in value.items():
            node = self.graph.nodes.get(name)
            if node is None or node.kind != "layer":
                raise KeyError(f"no layer named {name!r}; layers: {self.graph.layers}")
            check_params(name, self.state.params[name], p)
        for name, p in value.items():
            backend = get_backend(self.graph.nodes[name].device)
            self.state.params[name] = tree_map(
                lambda a, backend=backend: backend.asarray(
                    np.asarray(to_numpy(a)), dtype=self.dtype
                ),
                p,
            )

    @property
    def versions(self) -> dict[str, int]:
        """The parameter version of each layer (updates applied so far)."""
        return dict(self.state.versions)

    # -- training ----------------------------------------------------------------------------------
    def fit(
        self,
        data: Mapping[str, Any] | ArrayDataset,
        epochs: int = 1,
        batch_size: int = 32,
        shuffle: bool = False,
        drop_last: bool = False,
        *,
        validation_data: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callback] = (),
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 3,
        check_data: bool = True,
    ) -> History:
        """Trains for ``epochs`` passes over ``data`` (a dict of arrays named like the graph's
        inputs). Shuffling depends on ``(seed, epoch)`` only, so a resumed run continues the same
        sequence. Returns a :class:`History` (also kept as :attr:`history`).

        What is kept when the fit stops early: on ``KeyboardInterrupt`` or an error, the trainer
        keeps the state of the last update that completed everywhere (weights, optimizer state,
        versions, counters, :attr:`history`) and the exception is raised; the next ``fit``
        finishes the interrupted epoch first. See ``docs/workflow.md`` for each policy.

        Inside a running event loop (a notebook) the fit runs on a worker thread and this call
        waits for it.

        Args:
            data: the training data.
            epochs: epochs to train; an epoch left unfinished by an interrupted fit counts as
                one (it is finished first).
            batch_size: rows per minibatch.
            shuffle: a new order each epoch (from the seed and the epoch number).
            drop_last: skip each epoch's last, smaller minibatch.
            validation_data: evaluated after each epoch; ``val_loss`` (and ``val_accuracy``)
                go into :attr:`History.epochs` and the callbacks' logs.
            callbacks: :class:`~asyncnn.callbacks.Callback` objects (early stopping, loggers).
            checkpoint_dir: where ``checkpoint_every`` writes checkpoints
                (``epoch-0001/``... each a :meth:`save` folder).
            checkpoint_every: save every this many epochs.
            keep_checkpoints: how many of the latest checkpoints to keep (0: all).
            check_data: check the data before any compute: NaN/Inf in float inputs, integer
                labels against the loss's class count. False skips these passes over the data.

        Raises:
            ValueError: bad data (naming the input and the row) or arguments.
        """
        dataset = data if isinstance(data, ArrayDataset) else ArrayDataset(data)
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        callbacks = list(callbacks)
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be asyncnn.callbacks.Callback objects, got {cb!r}")
        if (checkpoint_every is None) != (checkpoint_dir is None):
            raise ValueError(
                "checkpoint_every and checkpoint_dir go together: give both or neither"
            )
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 (epochs), got {checkpoint_every}")
        if self.cluster is not None and (validation_data is not None or checkpoint_every):
            raise ValueError(
                "validation_data and checkpoint_every need the weights during fit, which worker "
                "processes send back only at its end: with a cluster, call fit one epoch at a "
                "time and evaluate or save between calls"
            )
        check_batch(self.graph, dataset.arrays, check_data or self.check_finite)
        if check_data:
            check_labels(self.graph, self.shapes, dataset.arrays)
        if validation_data is not None:
            require_inputs(self.graph, validation_data, self.graph.losses, "validation_data")
            check_batch(self.graph, validation_data, check_data)
            if check_data:
                check_labels(self.graph, self.shapes, validation_data)
        plan = _FitPlan(
            dataset, epochs, batch_size, shuffle, drop_last, validation_data, callbacks,
            None if checkpoint_dir is None else os.fspath(checkpoint_dir), checkpoint_every,
            keep_checkpoints,
        )  # fmt: skip
        self._interrupt.clear()
        return run_outside_loop(lambda: self._fit(plan), on_interrupt=self._interrupt.set)

    def _fit(self, plan: _FitPlan) -> History:
        dataset = plan.dataset
        per_epoch = dataset.num_batches(plan.batch_size, plan.drop_last)
        if self.epoch_batches and self.epoch_batches >= per_epoch:
            self.epoch_batches = 0  # other data or sizes: that epoch starts over
        total = plan.epochs * per_epoch - (self.epoch_batches if plan.epochs else 0)
        history = History()
        self.history = history
        self.stop_training = False
        fit = _FitState(self, plan, history)
        trace_path = self._next_trace_path()
        start = time.perf_counter()
        for cb in plan.callbacks:
            cb.on_fit_start(self)
        try:
            with _Progress(self.progress, total) as bar:
                fit.bar = bar
                anyio.run(fit.main, trace_path, backend="trio")
        except BaseException:
            fit.keep()
            raise
        finally:
            if trace_path is not None:
                self.traces.append(trace_path)
            history.seconds = time.perf_counter() - start
            history.samples_per_second = fit.rows / history.seconds if history.seconds > 0 else 0.0
            for cb in plan.callbacks:
                cb.on_fit_end(self, history)
        return history

    def _next_trace_path(self) -> str | None:
        if self.trace is None:
            return None
        if not self.traces:
            return self.trace
        import os

        stem, ext = os.path.splitext(self.trace)
        return f"{stem}.{len(self.traces)}{ext}"

    def _params_on_devices(self) -> dict[str, Any]:
        # weights that came back from worker processes are host arrays: each layer's go to its
        # device once per call (a no-op for those already there)
        from .backends import get_backend

        out = {}
        for name, p in self.state.params.items():
            backend = get_backend(self.graph.nodes[name].device)
            with backend.activate():
                out[name] = tree_map(backend.asarray, p)
        return out

    # -- inference ---------------------------------------------------------------------------------
    def predict(self, data: Mapping[str, Any], batch_size: int = 256) -> dict[str, np.ndarray]:
        """The graph's outputs (``g.output``) for ``data``, as numpy arrays.

        Raises:
            ValueError: an input the outputs need is missing (named), or has the wrong shape.
        """
        outputs = list(self.graph.outputs.values())
        require_inputs(self.graph, data, outputs, "predict")
        dataset = ArrayDataset(data)
        params = self._params_on_devices()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.graph.outputs}
        for batch in dataset.batches(batch_size):
            outs = forward_pass(self.graph, params, batch, self.dtype)
            for name, src in self.graph.outputs.items():
                parts[name].append(np.asarray(to_numpy(outs[src])))
        return {name: np.concatenate(p) for name, p in parts.items()}

    def evaluate(self, data: Mapping[str, Any], batch_size: int = 256) -> dict[str, float]:
        """Mean loss over ``data``, and accuracy for a classifier (a loss reading integer labels).

        Raises:
            ValueError: an input the losses need (the labels too) is missing (named).
        """
        require_inputs(self.graph, data, self.graph.losses, "evaluate")
        return self._evaluate(data, batch_size)

    def _evaluate(self, data: Mapping[str, Any], batch_size: int = 256) -> dict[str, float]:
        dataset = ArrayDataset(data)
        params = self._params_on_devices()
        n = len(dataset)
        loss_sum = 0.0
        correct = 0
        labelled = 0
        classify = None
        for batch in dataset.batches(batch_size):
            rows = len(next(iter(batch.values())))
            outs = forward_pass(self.graph, params, batch, self.dtype, losses=True)
            for name in self.graph.losses:
                loss_sum += float(to_numpy(outs[name])) * rows
                node = self.graph.nodes[name]
                if len(node.inputs) == 2 and self.graph.nodes[node.inputs[1]].kind == "input":
                    labels = np.asarray(to_numpy(batch[node.inputs[1]]))
                    if labels.dtype.kind in "iu":
                        logits = np.asarray(to_numpy(outs[node.inputs[0]]))
                        correct += int((logits.argmax(axis=1) == labels).sum())
                        labelled += labels.size  # one label per row, or per position
                        classify = True
        result = {"loss": loss_sum / n}
        if classify:
            result["accuracy"] = correct / labelled
        return result

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes a checkpoint folder: weights and optimizer state in safetensors, the rest (graph,
        policy, optimizer, counters) as a msgpack spec, and where the current epoch stands in
        ``fit.json``. :meth:`load` resumes from it."""
        from ._checkpoint import save_checkpoint

        path = os.fspath(path)
        save_checkpoint(self, path)
        tmp = os.path.join(path, _FIT_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"epoch_batches": self.epoch_batches}, f)
        os.replace(tmp, os.path.join(path, _FIT_FILE))

    @classmethod
    def load(cls, path: str | os.PathLike[str], **overrides: Any) -> Trainer:
        """A trainer resumed from :meth:`save`'s folder; deterministic policies then continue
        bit-identically (also from a fit that was interrupted mid-epoch). ``overrides`` replace
        constructor arguments (e.g. ``progress=True``)."""
        from ._checkpoint import load_checkpoint

        path = os.fspath(path)
        trainer = load_checkpoint(cls, path, **overrides)
        fit_file = os.path.join(path, _FIT_FILE)
        if os.path.exists(fit_file):
            with open(fit_file, encoding="utf-8") as f:
                trainer.epoch_batches = int(json.load(f).get("epoch_batches", 0))
        return trainer


_FIT_FILE = "fit.json"


@dataclass
class _FitPlan:
    """The arguments of one ``fit``, checked."""

    dataset: ArrayDataset
    epochs: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    validation_data: Mapping[str, Any] | None
    callbacks: list[Callback]
    checkpoint_dir: str | None
    checkpoint_every: int | None
    keep_checkpoints: int


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
        self.mb_epoch: dict[int, int] = {}
        self.epoch_start: dict[
            int, tuple[int, int]
        ] = {}  # epoch -> (first mb here, batches before)
        self.reported: list[int] = []  # minibatches whose step-end callbacks are due
        self.in_process = trainer.cluster is None
        self.flush = trainer.policy.flush
        self.epoch_hooks = bool(
            plan.validation_data is not None
            or plan.checkpoint_every
            or wants_epoch_end(plan.callbacks)
        )
        self.position = (trainer.epochs_done, trainer.epoch_batches)  # the next batch to run
        self.stepped = self.first_mb  # minibatches whose keys were all admitted

    # -- during the run --------------------------------------------------------------------------
    def on_loss(self, minibatch: int, loss: float, rows: int) -> None:
        self.losses[minibatch] = loss
        self.rows += rows
        self.reported.append(minibatch)
        if self.bar is not None and self.bar.on_loss is not None:
            self.bar.on_loss(minibatch, loss, rows)

    async def main(self, trace_path: str | None) -> None:
        tr, plan = self.tr, self.plan
        async with open_run(
            tr.graph,
            tr.optimizer,
            tr.policy,
            tr.seed,
            tr.dtype,
            state=tr.state,
            stall_timeout=tr.stall_timeout,
            check_finite=tr.check_finite,
            on_loss=self.on_loss,
            validated=True,
            trace=trace_path,
            trace_payloads=tr.trace_payloads,
            cluster=tr.cluster,
            cuda_graphs=tr.cuda_graphs,
        ) as run:
            self.run = run
            if self.bar is not None:
                self.bar.run = run
            epoch, skip = self.position
            for _ in range(plan.epochs):
                self.epoch_start[epoch] = (run.minibatches, skip)
                batches = plan.dataset.batches(
                    plan.batch_size, plan.shuffle, tr.seed, epoch, plan.drop_last
                )
                for i, batch in enumerate(batches):
                    if i < skip:
                        continue
                    await self._step_point(run, (epoch, i))
                    if tr.stop_training:
                        break
                    mb = await run.step(batch)
                    self.stepped = run.minibatches  # every key of `mb` admitted
                    self.mb_epoch[mb] = epoch
                    self.position = (epoch, i + 1)
                skip = 0
                if tr.stop_training:
                    break
                epoch += 1
                self.position = (epoch, 0)
                if self.epoch_hooks:
                    await self._settle(run)
                    self._snapshot(run)
                    self._deliver_steps()
                    self._epoch_end(epoch - 1)
                if tr.stop_training:
                    break
            self.history.stopped_early = tr.stop_training
            await run.drain()
        # the run has ended well: its state is complete (with a cluster, the workers' too)
        self._commit(run.state())
        self._deliver_steps()
        recorded = {int(e["epoch"]) for e in self.history.epochs}
        for e in sorted(set(self.mb_epoch.values())):
            epoch_done = e < self.position[0]
            if epoch_done and e not in recorded:
                self.history.epochs.append({"epoch": e, "loss": self._epoch_loss(e)})
        self.history.statistics = run.statistics()

    async def _step_point(self, run: Run, position: tuple[int, int]) -> None:
        """Before each step: under a flush policy in this process, waits for the previous
        minibatch's updates (as the step itself would) and keeps that state; then delivers the
        step-end callbacks whose losses have come."""
        if self.tr._interrupt.is_set():  # Ctrl-C in a notebook, seen by the waiting thread
            raise KeyboardInterrupt
        # (captured CUDA graphs update in place: a snapshot would be a copy each step, so
        # there the state is kept at epoch ends and when the run stops between minibatches)
        if (
            self.flush
            and self.in_process
            and not run.cuda_graphs_active
            and run.minibatches > self.first_mb
        ):
            await run._wait_until(lambda: run.in_flight == 0)
            self._snapshot(run)
        self._deliver_steps()

    async def _settle(self, run: Run) -> None:
        """Every admitted minibatch done and its loss known (a continuous policy's pipeline
        cools down: the next epoch starts a new stream)."""
        if self.flush:
            await run._wait_until(lambda: run.in_flight == 0 and not run._pending)
        else:
            await run.drain()

    @trio.lowlevel.enable_ki_protection  # Ctrl-C waits: the trainer never holds half a state
    def _snapshot(self, run: Run) -> None:
        """Hands the run's current state, consistent at this point, to the trainer."""
        if not self.in_process:
            return  # the workers' weights come back only at the end of the run
        state = run.state()
        if run.cuda_graphs_active:  # captured updates write in place: keep copies
            state.params = {n: tree_map(_copy, p) for n, p in state.params.items()}
            state.opt_states = {n: tree_map(_copy, p) for n, p in state.opt_states.items()}
        self._commit(state)

    @trio.lowlevel.enable_ki_protection
    def _commit(self, state: RunState) -> None:
        tr = self.tr
        tr.state = state
        done = state.minibatches
        epoch, skip = self.position
        # where the next fit continues: the epoch and batch of minibatch `done`
        for e, (first, before) in sorted(self.epoch_start.items()):
            if first <= done:
                epoch, skip = e, before + done - first
        per_epoch = self.plan.dataset.num_batches(self.plan.batch_size, self.plan.drop_last)
        if skip >= per_epoch:
            epoch, skip = epoch + 1, 0
        tr.epochs_done, tr.epoch_batches = epoch, skip
        self.history.losses = [
            self.losses[mb] for mb in range(self.first_mb, done) if mb in self.losses
        ]

    def _deliver_steps(self) -> None:
        if not self.reported:
            return
        due, self.reported = sorted(self.reported), []
        for mb in due:
            logs = {
                "loss": self.losses[mb],
                "epoch": float(self.mb_epoch.get(mb, self.position[0])),
            }
            for cb in self.plan.callbacks:
                cb.on_step_end(self.tr, mb, logs)

    def _epoch_loss(self, epoch: int) -> float:
        values = [v for mb, v in self.losses.items() if self.mb_epoch.get(mb) == epoch]
        return float(np.mean(values)) if values else float("nan")

    def _epoch_end(self, epoch: int) -> None:
        tr, plan = self.tr, self.plan
        _synchronize(tr.graph)  # GPU updates done before validation or a checkpoint reads them
        logs: dict[str, float] = {"epoch": epoch, "loss": self._epoch_loss(epoch)}
        if plan.validation_data is not None:
            for name, value in tr._evaluate(plan.validation_data).items():
                logs[f"val_{name}"] = value
        self.history.epochs.append(dict(logs))
        for cb in plan.callbacks:
            cb.on_epoch_end(tr, epoch, dict(logs))
        every = plan.checkpoint_every
        if every and plan.checkpoint_dir is not None and (epoch + 1) % every == 0:
            _save_rotating(tr, plan.checkpoint_dir, epoch + 1, plan.keep_checkpoints)

    # -- when the fit stops early ------------------------------------------------------------------
    def keep(self) -> None:
        """After an interrupt or an error: what the trainer keeps (see ``docs/workflow.md``)."""
        run = self.run
        if run is None or not self.in_process:
            return  # nothing ran, or the workers' weights never came back: the state before
        with contextlib.suppress(Exception):  # a broken device must not hide the first error
            _synchronize(self.tr.graph)
        if run.in_flight == 0 and run.minibatches == self.stepped:
            # stopped between minibatches (not inside a step, which counts its minibatch
            # before admitting its keys): everything admitted is applied
            self._commit(run.state())
            return
        if self.flush:
            return  # the last snapshot: every layer after the same last completed minibatch
        # continuous policies: each layer's own last update; the counters stop at the first
        # minibatch whose loss is not known
        state = run.state()
        done = self.first_mb
        while done in self.losses:
            done += 1
        state.minibatches = done
        self._commit(state)


def _synchronize(graph: Graph) -> None:
    """Waits for the work queued on each GPU that holds a layer (nothing to do on the CPU)."""
    from .backends import get_backend

    for device in sorted({graph.nodes[n].device for n in graph.layers} - {"cpu"}):
        get_backend(device).synchronize()


def _copy(a: Any) -> Any:
    return a.copy() if hasattr(a, "copy") else a


def _save_rotating(trainer: Trainer, folder: str, epochs_done: int, keep: int) -> None:
    """Saves ``trainer`` to ``folder/epoch-NNNN`` and removes all but the ``keep`` latest."""
    import shutil

    os.makedirs(folder, exist_ok=True)
    trainer.save(os.path.join(folder, f"epoch-{epochs_done:04d}"))
    if keep <= 0:
        return
    saved = sorted(d for d in os.listdir(folder) if d.startswith("epoch-") and d[6:].isdigit())
    for old in saved[:-keep]:
        shutil.rmtree(os.path.join(folder, old), ignore_errors=True)


_allocator_tuned = False


def _tune_allocator() -> None:
    global _allocator_tuned
    if not _allocator_tuned:
        tune_allocator()
        _allocator_tuned = True


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
