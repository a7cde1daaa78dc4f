"""The synchronous face: :class:`Trainer` runs a graph's actors for ``fit``/``evaluate``/
``predict`` and keeps weights, optimizer state and counters between calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from ._math._data import ArrayDataset
from ._math._pytree import tree_map
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
        samples_per_second: training throughput over the whole call.
        seconds: wall time of the call.
        statistics: per-actor counters at the end of the call.
    """

    losses: list[float] = field(default_factory=list)
    samples_per_second: float = 0.0
    seconds: float = 0.0
    statistics: dict[str, ActorStatistics] = field(default_factory=dict)

    def utilisation(self) -> dict[str, float]:
        """Busy fraction of each actor over the call."""
        out = {}
        for name, s in self.statistics.items():
            total = s.busy_seconds + s.idle_seconds
            out[name] = s.busy_seconds / total if total > 0 else 0.0
        return out


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

    # -- reading -----------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        """``{node name: params}`` as numpy arrays, at the current version."""
        return {n: tree_map(to_numpy, p) for n, p in self.state.params.items()}

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        for name, p in value.items():
            node = self.graph.nodes.get(name)
            if node is None or node.kind != "layer":
                raise KeyError(f"no layer named {name!r}; layers: {self.graph.layers}")
            from .backends import get_backend

            backend = get_backend(node.device)
            self.state.params[name] = tree_map(
                lambda a, backend=backend: backend.asarray(np.asarray(a), dtype=self.dtype), p
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
    ) -> History:
        """Trains for ``epochs`` passes over ``data`` (a dict of arrays named like the graph's
        inputs). Shuffling depends on ``(seed, epoch)`` only, so a resumed run continues the same
        sequence. Returns a :class:`History`."""
        dataset = data if isinstance(data, ArrayDataset) else ArrayDataset(data)
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        check_batch(self.graph, dataset.arrays, self.check_finite)  # all of it, before any compute
        history = History()
        total = epochs * dataset.num_batches(batch_size, drop_last)

        async def main() -> None:
            with _Progress(self.progress, total) as bar:
                epochs_done = self.epochs_done
                async with open_run(
                    self.graph,
                    self.optimizer,
                    self.policy,
                    self.seed,
                    self.dtype,
                    state=self.state,
                    stall_timeout=self.stall_timeout,
                    check_finite=self.check_finite,
                    on_loss=bar.on_loss,
                    validated=True,
                    trace=trace_path,
                    trace_payloads=self.trace_payloads,
                    cluster=self.cluster,
                    cuda_graphs=self.cuda_graphs,
                ) as run:
                    bar.run = run
                    for _ in range(epochs):
                        for batch in dataset.batches(
                            batch_size, shuffle, self.seed, epochs_done, drop_last
                        ):
                            await run.step(batch)
                        epochs_done += 1
                    await run.drain()
                # only a run that finished changes the trainer's state
                self._collect(run, history)
                self.epochs_done = epochs_done

        trace_path = self._next_trace_path()
        start = time.perf_counter()
        first = self.state.minibatches
        anyio.run(main, backend="trio")
        if trace_path is not None:
            self.traces.append(trace_path)
        history.seconds = time.perf_counter() - start
        n = len(dataset) * epochs
        history.samples_per_second = n / history.seconds if history.seconds > 0 else 0.0
        history.losses = [self._losses[mb] for mb in range(first, self.state.minibatches)]
        return history

    def _next_trace_path(self) -> str | None:
        if self.trace is None:
            return None
        if not self.traces:
            return self.trace
        import os

        stem, ext = os.path.splitext(self.trace)
        return f"{stem}.{len(self.traces)}{ext}"

    def _collect(self, run: Run, history: History) -> None:
        self.state = run.state()
        self._losses = run.losses
        history.statistics = run.statistics()

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
        """The graph's outputs (``g.output``) for ``data``, as numpy arrays."""
        dataset = ArrayDataset(data)
        params = self._params_on_devices()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.graph.outputs}
        for batch in dataset.batches(batch_size):
            outs = forward_pass(self.graph, params, batch, self.dtype)
            for name, src in self.graph.outputs.items():
                parts[name].append(np.asarray(to_numpy(outs[src])))
        return {name: np.concatenate(p) for name, p in parts.items()}

    def evaluate(self, data: Mapping[str, Any], batch_size: int = 256) -> dict[str, float]:
        """Mean loss over ``data``, and accuracy for a classifier (a loss reading integer labels)."""
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
    def save(self, path: str) -> None:
        """Writes a checkpoint folder: weights and optimizer state in safetensors, the rest (graph,
        policy, optimizer, counters) as a msgpack spec. :meth:`load` resumes from it."""
        from ._checkpoint import save_checkpoint

        save_checkpoint(self, path)

    @classmethod
    def load(cls, path: str, **overrides: Any) -> Trainer:
        """A trainer resumed from :meth:`save`'s folder; deterministic policies then continue
        bit-identically. ``overrides`` replace constructor arguments (e.g. ``progress=True``)."""
        from ._checkpoint import load_checkpoint

        return load_checkpoint(cls, path, **overrides)


_allocator_tuned = False


def _tune_allocator() -> None:
    global _allocator_tuned
    if not _allocator_tuned:
        tune_allocator()
        _allocator_tuned = True


class _Progress:
    """A rich progress bar fed by loss reports (does nothing when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.run: Run | None = None
        self._bar: Any = None
        self._task: Any = None
        self._rows = 0
        self._start = time.perf_counter()
        self.on_loss: Callable[[int, float, int], None] | None = self._on_loss if enabled else None

    def __enter__(self) -> _Progress:
        if self.enabled:
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

    def _on_loss(self, minibatch: int, loss: float, rows: int) -> None:
        self._rows += rows
        rate = self._rows / max(time.perf_counter() - self._start, 1e-9)
        self._bar.update(self._task, advance=1, loss=loss, rate=rate)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
