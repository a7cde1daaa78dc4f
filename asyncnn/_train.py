"""The synchronous face: :class:`Trainer` runs a graph's actors for ``fit``/``evaluate``/
``predict`` and keeps weights, optimizer state and counters between calls. What it is given is
checked in ``_train_args.py``; a fit is planned in ``_fit_plan.py``, called in ``_fit_run.py``
and run in ``_fit.py``; ``predict`` and ``evaluate`` compute in ``_inference.py``; ``params`` is
read and set in ``_train_weights.py``; what ``save`` checks and records is ``_train_save.py``'s;
``copy.deepcopy`` copies in ``_train_copy.py``."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._callbacks import Callback
from ._class_only import class_only
from ._datacheck import check_inputs, check_labels, require_inputs
from ._errors import GraphError
from ._fit import _synchronize
from ._fit_plan import plan_fit
from ._fit_run import run_fit
from ._history import History
from ._inference import _classifiers as _classifiers  # (the CLI imports it from here)
from ._inference import evaluate_loss, predict_outputs
from ._math._data import ArrayDataset
from ._notebook import run_outside_loop
from ._optimizer_swap import fitted_opt_states
from ._runtime._checks import check_optimizer
from ._runtime._config import RunConfig
from ._runtime._graph import Graph
from ._runtime._policies import Policy
from ._runtime._run import RunState, validate
from ._runtime._state import init_state
from ._runtime._structure import check_routing
from ._train_args import check_placement, check_trainer_args
from ._train_copy import PICKLE_REFUSAL, deepcopy_trainer
from ._train_options import _CudaGraphsOption, _Option, _TraceOption, _tune_allocator
from ._train_save import save_trainer
from ._train_weights import params_on_devices, read_params, set_params

__all__ = ["History", "Trainer"]


class Trainer:
    """Trains a graph of actors under a policy.

    ``copy.deepcopy(tr)`` makes an independent trainer, to branch a sweep from a trained model
    (a ``cluster`` is shared, not copied: see :meth:`__deepcopy__`); a trainer does not pickle:
    to move it between processes, :meth:`save` it and :meth:`load` it there.

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
        seed: seeds the weights (per module of a sequential chain, else per node), the
            shuffling and dropout.
        dtype: floating dtype of weights and float inputs.
        trace: write a message trace of each ``fit`` to this path (the first ``fit``; later ones
            to ``NAME.1.EXT``, ``NAME.2.EXT``, ...), in a folder that exists (checked here).
            Read it with ``asyncnn.trace.read``, replay it with ``asyncnn.replay``.
        cluster: run on worker processes (``ann.cluster.LocalCluster(workers=N)`` or
            ``RayCluster``); place nodes with ``g.layer(..., worker=i)``. Without a cluster,
            ``worker=`` is ignored and everything runs in this process. ``evaluate`` and
            ``predict`` run in this process on the gathered weights.
        progress: show a live progress bar (rich) with the loss and samples/s. The arguments
            after it are keyword-only.
        trace_payloads: which tensors a trace keeps besides their digests: ``"inputs"`` (enough
            to replay), ``"all"`` (enough to replay one actor alone), ``"none"``.
        stall_timeout: seconds without progress, with keys in flight, before a StallError.
        check_finite: check every tensor for NaN/Inf and name the first actor producing one.
        tune_allocator: raise glibc's mmap/trim thresholds once, so that large arrays are reused
            instead of page-faulting afresh each step (DESIGN.md section 7); False leaves the
            allocator alone.
        cuda_graphs: on GPU actors, capture the forward, backward and update as CUDA graphs once
            the shapes repeat and replay them (see ``docs/gpus.md``). ``None`` (the default):
            where the graph's GPU nodes share one GPU and there is no ``cluster``; ``False``:
            never; ``True``: asked for (also across several GPUs; an error with a
            ``cluster``). Used where
            ``Policy.allows_capture`` says (``Sync``, ``GPipe``, ``OneFOneB``, ``PipeDream``,
            ``Async``; not ``PipeDream2BW`` nor weight prediction or corrections), with or
            without a trace; elsewhere (and on the CPU) the run stays eager.

    Raises:
        TypeError: ``cuda_graphs`` is not a bool or None; ``optimizer`` is a class (not an
            instance: ``optim.Adam(lr=1e-3)``) or no optimizer; ``policy`` is no policy.
        ValueError: ``cuda_graphs=True`` with a ``cluster`` (also when set later:
            ``trainer.cuda_graphs = True``); ``trace=""``.
        GraphError: with a ``cluster``, a node placed on a worker it lacks (``worker=7`` with
            4 workers), naming the node, the index and the cluster's size; layers the policy
            runs on one device, taking turns, placed in different processes.
        FileNotFoundError: ``trace``'s folder does not exist (it is not made; the file is
            created, or emptied, when a ``fit`` starts). The same classes as the trace writer
            raises at the fit, so that one ``except`` catches either; also when
            :attr:`trace` is set later.
        NotADirectoryError: ``trace``'s folder is a file.
        IsADirectoryError: ``trace`` is a folder.

    Attributes:
        history: the :class:`History` of the latest ``fit``, also of one that was interrupted
            or failed (then with the losses of the updates the trainer kept).
        epochs_done: epochs trained in all.
        epoch_batches: minibatches done of an epoch that an interrupted ``fit`` left
            unfinished (the next ``fit`` finishes it first, if it has the same rows,
            ``batch_size``, ``shuffle``, ``drop_last`` and seed; else it starts that epoch
            over); 0 otherwise. All of the epoch's minibatches where the fit stopped before
            that epoch's end (epoch-end callbacks, validation, checkpoint) began: the epoch is
            not done, and the next ``fit`` runs its end first.
        stop_training: set to True (by a callback) to end the current ``fit`` after its step.
        traces: the trace files written so far, one per ``fit``.
    """

    seed = _Option()
    dtype = _Option()
    trace = _TraceOption()
    trace_payloads = _Option()
    stall_timeout = _Option()
    check_finite = _Option()
    cuda_graphs = _CudaGraphsOption()

    def __init__(
        self,
        graph: Graph,
        optimizer: Any,
        policy: Policy,
        seed: int = 0,
        dtype: str = "float32",
        trace: str | None = None,
        cluster: Any = None,
        progress: bool = False,
        *,
        trace_payloads: str = "inputs",
        stall_timeout: float = 60.0,
        check_finite: bool = False,
        tune_allocator: bool = True,
        cuda_graphs: bool | None = None,
    ) -> None:
        #: the run options every fit runs with (``seed``, ``dtype``, ``trace`` and the others
        #: below read and change it)
        self.config = RunConfig(
            seed=seed, dtype=dtype, stall_timeout=stall_timeout, check_finite=check_finite,
            trace=trace, trace_payloads=trace_payloads, cuda_graphs=cuda_graphs,
        )  # fmt: skip
        check_trainer_args(graph, self.config.trace, cluster, policy, optimizer, cuda_graphs)
        self.traces: list[str] = []  # the trace files written so far, one per fit
        self.cluster = cluster
        self.graph = graph
        self._optimizer = optimizer  # (the property's setter fits the state to a later one)
        self.policy = policy
        self.progress = progress
        if tune_allocator:
            _tune_allocator()
        self.shapes = validate(graph, self.dtype)
        check_placement(graph, cluster, policy)
        # what the graph was when checked: one that gains nodes later has no weights for them
        self._built_nodes = len(graph.nodes)
        self._built_outputs = dict(graph.outputs)
        self.state: RunState = init_state(
            graph, optimizer, seed, self.dtype, placed_on_host=cluster is not None
        )
        self.epochs_done = 0
        #: minibatches done of the epoch an interrupted fit left unfinished (the next fit
        #: finishes that epoch first)
        self.epoch_batches = 0
        # what defines the minibatches epoch_batches counts (see _FitPlan.epoch_layout): a fit
        # with another layout starts the epoch over; at an epoch's start, the last epoch's;
        # None where unknown (no fit yet, a checkpoint's fit.json written before it was kept,
        # or at an epoch's start by an asyncnn that kept it only mid-epoch): the position is
        # taken as it comes
        self._epoch_layout: dict[str, Any] | None = None
        # the known losses of those minibatches, in order, each with its rows (None: not kept,
        # by a checkpoint of an older asyncnn): the epoch's loss, at its end, is over theirs
        # and the next fit's (see the property _epoch_losses)
        self._epoch_losses_list: list[tuple[float, int | None]] = []
        self._epoch_losses_later: Callable[[], Sequence[tuple[float, int | None]]] | None = None
        #: the History of the latest fit, kept also when it was interrupted or failed
        self.history = History()
        #: set to True (by a callback) to end the current fit after its current step
        self.stop_training = False
        self._interrupt = threading.Event()
        # held while a fit runs: a second fit (from another thread, or from a callback of the
        # running one) would train on the same state, and whichever ended last would replace
        # the other's updates without a word
        self._fit_lock = threading.Lock()
        # the thread running the fit's loop and callbacks (None between fits): a callback may
        # save, where another thread would read the state half-way through a commit
        self._fit_thread: int | None = None
        # a fit's run is open: it holds weights of its own, which its end puts in the trainer
        # (on_fit_start and on_fit_end run before and after it, and may set weights)
        self._run_open = False
        # a fit on a cluster runs and its workers hold the weights (until its run's end)
        self._weights_pending = False
        # a fit that stops delivers the step hooks of the state it keeps (its run closed):
        # they may not set the weights there either, as during the run
        self._stopping_step_hooks = False
        # the callbacks' states that checkpoints keep (_callbacks.py): the running fit's
        # callbacks, read by a save during it; the record of the latest fit's states as it ended
        # (or of the checkpoint loaded), or the error reading them raised, which a save raises;
        # and whether that record came from a checkpoint and waits for a fit that ends an epoch
        self._fit_callbacks: list[Callback] | None = None
        self._callback_states: list[dict[str, Any]] | Exception = []
        self._callback_states_loaded = False
        # epochs_done as the running (or latest) fit started, or as loaded: a loaded record
        # stays due until it has moved
        self._callback_states_since = 0
        # the epoch end the running fit is delivering, (epoch, logs, the first callback not
        # given it yet), for a save from an on_epoch_end (kept as the fit ends, when an error
        # there ended it); the restored callbacks with an epoch end of their record still due
        # to them, delivered after on_fit_start; and whether a loaded record's states that no
        # callback takes are dropped without a warning (asyncnn train says so itself)
        self._epoch_end_due: tuple[int, dict[str, float], int] | None = None
        self._restored_epoch_ends: list[tuple[Callback, int, dict[str, float]]] = []
        self._callback_states_quiet = False

    # -- reading -----------------------------------------------------------------------------------
    @property
    def optimizer(self) -> Any:
        """The optimizer of every layer's updates. Assign another between fits to train on with
        it (``tr.optimizer = optim.Adam(lr=1e-3)``), as ``Trainer.load(path, optimizer=...)``
        does: where its state has another structure than a layer's current one (another kind:
        ``Adam`` after ``SGD``, or ``SGD`` with momentum after one without), that layer's
        optimizer state starts fresh, from the new optimizer's ``init`` (step 0, buffers at
        their start: zeros, Adagrad's ``initial_accumulator_value``), as a new torch optimizer
        would; where it has the same structure (the same
        kind with another ``lr``; ``AdamW`` after ``Adam``), the state is kept and goes on
        (momentum buffers, step count, so a schedule goes on from its step). An ``RMSprop``
        after one of another ``momentum`` or ``centered`` (a buffer more or fewer) goes on with
        the step count and the square averages, as torch's RMSprop does with its group's
        ``momentum`` changed: a buffer it no longer uses is dropped, one it starts using
        (``momentum_buffer``, ``grad_avg``) starts at zeros. The weights, versions, counters and
        pending gradients stay as they are.

        Raises:
            TypeError: the value is no optimizer instance (a class: ``optim.Adam``).
            RuntimeError: from a step or epoch hook, or while a fit runs on another thread
                (the run updates with the optimizer it started with, and its end would put
                that one's state back); ``on_fit_start`` and ``on_fit_end`` may assign it.
        """
        return self._optimizer

    @optimizer.setter
    def optimizer(self, value: Any) -> None:
        check_optimizer(value, "Trainer.optimizer: ")
        if self._stopping_step_hooks and self._fit_thread == threading.get_ident():
            raise RuntimeError(
                "optimizer: a step hook may not replace the optimizer, also where the fit "
                "delivers it as it stops, as during its run; assign it in on_fit_end, or after "
                "fit returns"
            )
        self._refuse_during_fit(
            "optimizer", ": its run updates with the optimizer it started with, and its end "
            "would put back that optimizer's state", "assign it before the fit, in on_fit_start "
            "or on_fit_end, or after it returns (from a step or epoch hook: stop the fit with "
            "trainer.stop_training = True, then assign it)",
            own_thread=not self._run_open,  # (on_fit_start and on_fit_end may assign it)
        )  # fmt: skip
        # every layer's state made before any is replaced: an init that fails changes nothing
        _synchronize(self.graph, self.cluster)  # (from on_fit_end on a GPU: see params)
        opt_states = fitted_opt_states(self.state, self.graph, self.cluster, value)
        self.state = dataclasses.replace(self.state, opt_states=opt_states)
        self._optimizer = value

    @property
    def _epoch_losses(self) -> list[tuple[float, int | None]]:
        """The known losses of the unfinished epoch's minibatches, in order, each with its rows
        (``None`` where a checkpoint of an older asyncnn kept none). A fit hands them
        over as a function, called here when they are read (at a save, or by the next fit):
        listing them at every step's snapshot would cost time quadratic in the epoch's length."""
        later = self._epoch_losses_later
        if later is not None:
            self._epoch_losses_list = list(later())
            self._epoch_losses_later = None
        return self._epoch_losses_list

    @_epoch_losses.setter
    def _epoch_losses(self, values: Sequence[tuple[float, int | None]]) -> None:
        self._epoch_losses_list = list(values)
        self._epoch_losses_later = None

    def _refuse_during_fit(self, what: str, why: str, instead: str, own_thread: bool) -> None:
        """Refuses ``what`` while a fit runs on this trainer: from another thread than the
        fit's, and from the fit's own thread (its callbacks) too unless ``own_thread``.

        Raises:
            RuntimeError: saying ``why`` and what to do ``instead``.
        """
        if not self._fit_lock.locked():
            return
        if own_thread and self._fit_thread == threading.get_ident():
            return
        raise RuntimeError(f"{what}: a fit is already running on this trainer{why}; {instead}")

    @property
    def params(self) -> dict[str, Any]:
        """``{node name: params}`` as numpy arrays, at the current version, read-only: a view
        of the weights the trainer keeps on the CPU (a copy of a GPU's), which a write would
        change on one device and not on the other. To change weights, assign new ones
        (``tr.params = {name: new}``).

        A snapshot read at each access: a ``dict`` whose changes (``tr.params[name] = new``,
        ``update``, ``pop``, ...) raise ``TypeError``, as a write to its arrays raises
        ``ValueError``, since neither would reach the trainer's weights. Its copies
        (``dict(tr.params)``, ``copy.deepcopy``, pickle) are plain dicts. The lists and dicts
        inside each layer's params are plain too, and a change to them is lost alike: build
        new ones and assign them."""
        return read_params(self)

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        """Replaces the weights of the layers named in ``value`` (others keep theirs), checked
        against the graph first: each layer's structure, array shapes and real dtypes.

        Under a policy that keeps earlier versions for forwards pinned to them
        (``PipeDream2BW``), those of the layers set are dropped: the next fit's first minibatch
        computes at the weights set there.

        Raises:
            KeyError: no layer of that name.
            ValueError: naming the layer, the place in its parameters and what differs.
            GraphError: the graph gained nodes since the trainer was built (see :meth:`fit`).
            RuntimeError: from a step or epoch hook (while a fit's run is open the run holds
                its own weights, and its end would replace these; a fit that stops delivers the
                step hooks of the state it keeps, which are refused alike), or while a fit runs
                on another thread. ``on_fit_start`` and ``on_fit_end`` may set them.
        """
        set_params(self, value)

    @property
    def versions(self) -> dict[str, int]:
        """The parameter version of each layer (updates applied so far)."""
        return dict(self.state.versions)

    # -- training ----------------------------------------------------------------------------------
    def _check_graph(self, what: str) -> None:
        """Refuses a graph that gained nodes since this trainer checked it and made its layers'
        weights (a new layer has none: the run failed on the state, naming ``open_run``'s
        argument); checks outputs named since as a new trainer would (one of an expert branch
        failed in ``predict`` with a bare numpy error).

        Raises:
            GraphError: naming the nodes added, or the output and what it reads.
        """
        graph = self.graph
        if len(graph.nodes) != self._built_nodes:
            added = list(graph.nodes)[self._built_nodes :]
            raise GraphError(
                f"{what}: the graph gained nodes {added} after this Trainer was built; a "
                "Trainer checks its graph (and makes its layers' weights) when it is built, so "
                "build a new one on the changed graph (tr2 = ann.Trainer(g, ...)) and carry "
                "the weights over: tr2.params = {n: p for n, p in tr.params.items() if n in "
                "tr2.graph.layers}"
            )
        if graph.outputs != self._built_outputs:
            check_routing(graph)
            self._built_outputs = dict(graph.outputs)

    def fit(
        self,
        data: Mapping[str, Any] | ArrayDataset,
        epochs: int = 1,
        batch_size: int = 32,
        shuffle: bool = False,
        drop_last: bool = False,
        *,
        validation_data: Mapping[str, Any] | ArrayDataset | None = None,
        callbacks: Sequence[Callback] | None = None,
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
        finishes the interrupted epoch first. An epoch counts as done once its end has begun
        (with epoch-end hooks: validation, ``on_epoch_end``, ``checkpoint_every``; Ctrl-C
        then waits for the end); a stop after its last minibatch and before its end leaves
        that end to the next ``fit``, which runs it first, as the one epoch of its
        ``epochs`` that it finishes. See ``docs/workflow.md`` for each policy.

        Inside a running event loop (a notebook) the fit runs on a worker thread and this call
        waits for it.

        Args:
            data: the training data.
            epochs: epochs to train; an epoch left unfinished by an interrupted fit counts as
                one (it is finished first).
            batch_size: rows per minibatch.
            shuffle: a new order each epoch (from the seed and the epoch number).
            drop_last: skip each epoch's last, smaller minibatch.
            validation_data: evaluated after each epoch (a dict of arrays or an
                :class:`~asyncnn.data.ArrayDataset`); ``val_loss`` (and ``val_accuracy``)
                go into :attr:`History.epochs` and the callbacks' logs.
            callbacks: :class:`~asyncnn.callbacks.Callback` objects (early stopping, loggers);
                None (the default) or an empty list: none. Every callback that started gets its
                ``on_fit_end``, however the fit ends (see Raises).
            checkpoint_dir: where ``checkpoint_every`` writes checkpoints
                (``epoch-0001/``... each a :meth:`save` folder, numbered by the epochs done).
                Refused if it holds a checkpoint of more epochs than the trainer has done
                (another run's): the fit would save over it. What a save killed before it
                finished left there (``*.tmp`` files, no checkpoint) is replaced by the fit's
                save of that epoch.
            checkpoint_every: save every this many epochs (an int >= 1).
            keep_checkpoints: how many of the latest checkpoints of ``checkpoint_dir`` to keep,
                by epoch number, counting the one just written (0: all).
            check_data: check the data before any compute: NaN/Inf in float inputs (also a
                finite value that overflows the trainer's ``dtype``, which the run would
                compute on as Inf: 1e39 in float64 data of a float32 trainer), integer
                labels against the loss's class count, and the ids a layer starting with an
                Embedding reads from an input against its table. False skips these passes over
                the data.

        Raises:
            ValueError: bad data (naming the input and the row; no rows: ``fit: the data has 0
                rows``) or arguments (also a
                ``batch_size`` that ``drop_last`` leaves no minibatch of, a ``checkpoint_dir``
                holding another run's later checkpoints, an ``EarlyStopping`` monitoring a
                metric this fit does not log).
            TypeError: ``epochs``, ``batch_size``, ``checkpoint_every`` or ``keep_checkpoints``
                is not an int (a bool is not one either); ``shuffle`` or ``drop_last`` is not a
                bool; ``callbacks`` is not a list of callbacks. All of these are checked before
                any callback starts. With ``checkpoint_every``, also a custom actor's state
                (as ``setup`` leaves it) or a callback's state (as ``on_fit_start`` leaves
                it) that a checkpoint cannot hold: refused as the run starts, before any
                training, with :meth:`save`'s message.
            OSError: ``checkpoint_dir`` cannot be made or written to (read-only, another
                user's; of the system's errno), naming it: refused before any training.
            RuntimeError: a fit is already running on this trainer (called from another
                thread, or from a callback of that fit): one fit at a time, the second would
                lose its updates to the first's.
            GraphError: the graph gained nodes since the trainer was built (it has no weights
                for them: build a new trainer; ``predict``, ``evaluate``, ``save`` and setting
                ``params`` refuse it too), or an output named since reads what a new trainer
                would refuse.

        Errors of the callbacks' ``on_fit_end``: every callback that started ends, even where
        one raises; then the first such error is raised (any later ones added to it as notes).
        Where the fit is already raising (an error of its own or of a callback, or Ctrl-C's
        ``KeyboardInterrupt``), that exception goes on, never replaced by a callback's: the
        callback's error is added to it as a note, with its traceback, so that the traceback
        shows both.
        """
        if not self._fit_lock.acquire(blocking=False):
            # (raised here, not after another look at the lock: the other fit may end between
            # the two, and this one would then run, and release, without holding it)
            raise RuntimeError(
                "fit: a fit is already running on this trainer (called from another thread, or "
                "from one of its callbacks): a second fit would train the same weights, and "
                "whichever ended last would replace the other's updates; wait for it to return "
                "(from another thread: join that thread first) and call fit again, or train "
                "another model with another Trainer"
            )
        try:
            self._check_graph("fit")
            plan = plan_fit(
                self, data, epochs, batch_size, shuffle, drop_last, validation_data, callbacks,
                checkpoint_dir, checkpoint_every, keep_checkpoints, check_data,
            )  # fmt: skip
            self._interrupt.clear()
            return run_outside_loop(lambda: run_fit(self, plan), on_interrupt=self._interrupt.set)
        finally:
            self._fit_lock.release()

    # -- inference ---------------------------------------------------------------------------------
    def predict(
        self, data: Mapping[str, Any] | ArrayDataset, batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        """The graph's outputs (``g.output``) for ``data`` (a dict of arrays or an
        :class:`~asyncnn.data.ArrayDataset`), as numpy arrays.

        Raises:
            ValueError: an input the outputs need is missing, or has another shape or dtype than
                the graph declares (named); an id that a layer starting with an Embedding reads
                is out of its table (named with its row); a finite value of a float input
                overflows the trainer's ``dtype`` (1e39 in float64 data of a float32 trainer:
                named with its row; its outputs would be of an Inf, finite-looking); the data
                has no rows; the graph has no outputs (``g.output``). A NaN or Inf in the data
                itself is no error here: it is computed on as given.
            GraphError: a layer gave another number of rows than its input had (a filter that
                drops rows by their values, which the graph's check on zeros let through), as
                ``fit`` refuses it.
        """
        self._check_graph("predict")
        if not self.graph.outputs:  # (it returned {}, having computed nothing)
            raise ValueError("predict: the graph has no outputs; name them: g.output(name, node)")
        outputs = list(self.graph.outputs.values())
        dataset = self._checked_dataset(data, outputs, "predict")
        check_labels(self.graph, self.shapes, dataset.arrays, outputs)  # (a GPU gives NaN rows)
        params = params_on_devices(self)
        return predict_outputs(self.graph, params, dataset, batch_size, self.dtype)

    def evaluate(
        self, data: Mapping[str, Any] | ArrayDataset, batch_size: int = 256
    ) -> dict[str, float]:
        """The loss over ``data`` (a dict of arrays or an :class:`~asyncnn.data.ArrayDataset`):
        the mean over its rows, or the sum for a loss of ``reduction="sum"``, as that loss on
        the whole data at once (summed over the loss nodes where there are several).

        ``"accuracy"`` is reported for a classifier only: where a loss node is a
        ``CrossEntropyLoss`` (or a subclass) whose labels are a graph input declared as integer
        class indices. It is the fraction of labels (one per row, or per position for labels
        ``(N, d1, ...)``; not those equal to the loss's ``ignore_index``, which name no class)
        equal to the argmax of their logits over the class axis (axis 1),
        over all such losses; a loss whose argmax has another shape than its labels is left
        out (never broadcast). A regression (``MSELoss``, even of integer targets) or another
        loss gets no ``"accuracy"``; nor do ``val_accuracy`` and the callbacks' logs.

        Raises:
            ValueError: an input the losses need (the labels too) is missing, or has another
                shape or dtype than the graph declares (named); a label, or an id that a layer
                starting with an Embedding reads, is out of range (named with its row); a
                finite value of a float input overflows the trainer's ``dtype`` (named with
                its row, as in :meth:`predict`); the data has no rows.
            GraphError: a layer gave another number of rows than its input had (see
                :meth:`predict`).
        """
        self._check_graph("evaluate")
        dataset = self._checked_dataset(data, self.graph.losses, "evaluate")
        check_labels(self.graph, self.shapes, dataset.arrays, self.graph.losses)
        return self._evaluate(dataset, batch_size)

    def _checked_dataset(
        self, data: Mapping[str, Any] | ArrayDataset, targets: Any, what: str
    ) -> ArrayDataset:
        """``data`` as a dataset, once the inputs ``targets`` need are there (named, before the
        arrays are read) and have the shapes and dtypes the graph declares."""
        arrays = data.arrays if isinstance(data, ArrayDataset) else data
        require_inputs(self.graph, arrays, targets, what)
        try:
            dataset = data if isinstance(data, ArrayDataset) else ArrayDataset(arrays)
        except ValueError as exc:  # (fields of other row counts: which data, said)
            raise ValueError(f"{what}: {exc}") from None
        check_inputs(self.graph, dataset.arrays, targets, what, self.dtype)
        return dataset

    def _evaluate(self, dataset: ArrayDataset, batch_size: int = 256) -> dict[str, float]:
        params = params_on_devices(self)
        return evaluate_loss(self.graph, params, dataset, batch_size, self.dtype)

    # -- copies ------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> Trainer:
        """``copy.deepcopy(tr)``: a new, independent trainer (to branch a sweep from a trained
        model): a copy of the graph, optimizer, policy and run options, and a deep copy of the
        state (weights, optimizer state, versions, counters, pending gradients, where the
        current epoch stands, :attr:`history`, :attr:`traces`). Fitting the copy leaves the
        original as it was, and a deterministic policy fits on from either bit-identically.
        The copy has locks of its own and no fit running.

        A ``cluster`` is shared, never copied (it owns worker processes): the copy fits on the
        same workers, and since a cluster serves one run at a time, a fit of the copy while
        the original fits there is refused (give the copy a cluster of its own:
        ``ann.Trainer.load(path, cluster=...)`` from a :meth:`save`). The copy of a trainer
        that traces records no trace (its ``trace`` is None): numbered on from the same
        :attr:`traces`, its next trace and the original's would be written over each other;
        set ``twin.trace`` to a path of its own to record one.

        Raises:
            RuntimeError: a fit is running on this trainer (called from another thread, or from
                one of its callbacks).
        """
        return deepcopy_trainer(self, memo)

    def __copy__(self) -> Trainer:
        # (a shallow copy, as copy.copy made before __reduce_ex__ refused pickle: the same
        # objects, fit's lock included)
        shallow = object.__new__(type(self))
        vars(shallow).update(vars(self))
        return shallow

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refuses pickle: save and load a trainer (``tr.save(path)``,
        ``ann.Trainer.load(path)``), or copy it with ``copy.deepcopy``.

        Raises:
            TypeError: always, saying so.
        """
        raise TypeError(PICKLE_REFUSAL)

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes a checkpoint folder: weights and optimizer state in safetensors, the rest (graph,
        policy, optimizer, counters, and where the current epoch stands, with what its
        minibatches were: rows, ``batch_size``, ``shuffle``, seed, ``drop_last``) as a msgpack
        spec, renamed into place together; the epoch's position also in ``fit.json``, for an
        asyncnn older than the spec's record. :meth:`load` resumes from it.

        Raises:
            ValueError: ``path`` is empty (``""``: nothing is written).
            FileExistsError: ``path`` is a file, or a folder holding files of the names a
                checkpoint writes without being a checkpoint (nothing is written).
            TypeError: a custom actor's state holds what a checkpoint cannot (named, with its
                layer; nothing is written); so does a callback's state (``callback_state``,
                named with its callback and place; nothing is written).
            Exception: what reading the callbacks' states raised as the latest fit ended (a
                fresh one each time, ``from`` that error), until a fit without that callback.
            OSError: the disk refused a file (the folder's previous checkpoint stays whole).
            RuntimeError: a fit is running on this trainer and this call comes from another
                thread than the fit's (its callbacks may save: they run between its steps), or
                from a step or epoch hook of a fit on a cluster while its run goes on (the
                trainer holds the weights from before the fit until the run's end).
        """
        save_trainer(self, path)

    @class_only
    @classmethod
    def load(cls, path: str | os.PathLike[str], **overrides: Any) -> Trainer:
        """A trainer resumed from :meth:`save`'s folder; deterministic policies then continue
        bit-identically (also from a fit that was interrupted mid-epoch; ``PipeDream2BW`` with
        the version before the latest that the checkpoint keeps, except from a checkpoint of
        an asyncnn that did not keep it: there the next fit's first minibatch computes at the
        saved weights). The graph, policy,
        optimizer, seed, dtype and the run options (``stall_timeout``, ``check_finite``,
        ``trace_payloads``, ``cuda_graphs``) come from the checkpoint; ``overrides`` replace
        constructor arguments (e.g. ``progress=True``, ``check_finite=False``). An
        ``optimizer`` override takes each layer's saved optimizer state as assigning
        :attr:`optimizer` does: kept where it has the same structure (the same kind with
        another ``lr``), the step count and square averages kept for an ``RMSprop`` of another
        ``momentum`` or ``centered`` (a new buffer at zeros), fresh for another kind. With a
        ``policy`` of another kind than the checkpoint's (``Sync`` after ``Async``), gradients
        the saved policy had accumulated and not yet applied are dropped. With ``trace=`` the
        path the saved trainer traced to, :attr:`traces` comes back too, and the next fit
        numbers its trace on (``run.2.trace`` after ``run.trace`` and ``run.1.trace``); set
        ``trainer.traces = []`` to trace to the path itself.

        Call it on the class and keep what it returns: ``tr = Trainer.load(path)``.

        Raises:
            TypeError: called on a trainer (``tr.load(path)``, which would leave ``tr`` as it
                was; the message says what to write instead), a ``graph`` override that is
                no :class:`~asyncnn.Graph`, or an override that is no argument of the
                trainer's (``lr=1e-4``: pass ``optimizer=optim.AdamW(lr=1e-4)``), named with
                those it takes.
            FileNotFoundError: ``path`` is no checkpoint folder.
            CheckpointError: a file of it is missing, damaged or of another format version,
                or it does not fit its graph (or the ``graph`` given), naming the layer and
                the place; or, where the folder cannot be locked, saves replaced it while it
                was read, twice (a save waits for a load that is reading where it can)."""
        from ._checkpoint import load_checkpoint

        return load_checkpoint(cls, os.fspath(path), **overrides)
