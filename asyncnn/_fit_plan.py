"""One ``Trainer.fit`` call's plan: its arguments checked (:func:`plan_fit`, before any callback
starts) into the :class:`_FitPlan` that the fit follows, and the epoch layout they define (what
an unfinished epoch's position is counted in). Apart from ``_fit.py``, which runs the plan,
because these checks run before anything does and refuse what would fail, or misread, later."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._callbacks import HOOKS, Callback, EarlyStopping, suggest_hook
from ._datacheck import check_labels
from ._fit_checkpoints import check_checkpoint_dir
from ._inference import _classifiers
from ._math._data import ArrayDataset, _check_flag, _check_index
from ._runtime._checks import check_batch
from ._runtime._lifecycle import _user_stacklevel

if TYPE_CHECKING:
    from ._train import Trainer


@dataclass
class _FitPlan:
    """The arguments of one ``fit``, checked."""

    dataset: ArrayDataset
    epochs: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    validation_data: ArrayDataset | None
    callbacks: list[Callback]
    checkpoint_dir: str | None
    checkpoint_every: int | None
    keep_checkpoints: int

    def epoch_layout(self, seed: int) -> dict[str, Any]:
        """What defines this fit's minibatches of an epoch, in which an unfinished epoch's
        position (:attr:`Trainer.epoch_batches`) is counted: a fit with another layout starts
        that epoch over. ``seed`` (the shuffle's) is ``None`` when the rows are not shuffled."""
        return epoch_layout(
            len(self.dataset), self.batch_size, self.shuffle, seed if self.shuffle else None,
            self.drop_last,
        )  # fmt: skip


def epoch_layout(
    rows: int, batch_size: int, shuffle: bool, seed: int | None, drop_last: bool
) -> dict[str, Any]:
    """The epoch layout in ``fit.json`` (see :meth:`_FitPlan.epoch_layout`)."""
    return {
        "rows": rows, "batch_size": batch_size, "shuffle": shuffle, "seed": seed,
        "drop_last": drop_last,
    }  # fmt: skip


_HOOKS = HOOKS  # the hooks fit calls, in the order it first calls them


def _check_hook_names(cls: type[Callback]) -> None:
    """Warns of a method of ``cls`` (or of a Callback class it derives from) named like a hook
    that is none, which fit never calls: a Keras or Lightning hook (``on_epoch_begin``,
    ``on_train_end``) or a typo (``on_step_ends``) ran silently never. A warning, not an error:
    a subclass may name a helper of its own so (an ``on_improvement`` it calls itself). A class
    of ``cls``'s bases that is no Callback (a mixin) is not looked at."""
    for klass in cls.__mro__:
        if klass is Callback or not issubclass(klass, Callback):
            continue
        for name, member in vars(klass).items():
            if not name.startswith("on_") or name in _HOOKS:
                continue
            if not callable(member) and not isinstance(member, staticmethod | classmethod):
                continue  # (an attribute such as on_gpu = True is no method)
            nearest = suggest_hook(name)  # (by meaning: on_batch_end is on_step_end)
            guess = f": did you mean {nearest}?" if nearest else ";"
            warnings.warn(
                f"callbacks: {klass.__name__}.{name} is no Callback hook{guess} fit calls "
                f"only {', '.join(_HOOKS[:-1])} and {_HOOKS[-1]}, so fit never calls {name}; "
                "rename it to the hook it is meant to be (a helper of your own that it calls "
                "itself: rename it to a name not starting with 'on_', or filter this warning)",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )


def plan_fit(
    trainer: Trainer,
    data: Mapping[str, Any] | ArrayDataset,
    epochs: int,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    validation_data: Mapping[str, Any] | ArrayDataset | None,
    callbacks: Sequence[Callback] | None,
    checkpoint_dir: str | os.PathLike[str] | None,
    checkpoint_every: int | None,
    keep_checkpoints: int,
    check_data: bool,
) -> _FitPlan:
    """The plan of :meth:`Trainer.fit` on ``trainer`` with these arguments, once they and the
    data are checked (before any callback starts; see that method for what each is and what
    is refused).

    Raises:
        ValueError: bad data or arguments, as :meth:`Trainer.fit` says.
        TypeError: an argument of the wrong type, as :meth:`Trainer.fit` says.
    """
    dataset = data if isinstance(data, ArrayDataset) else ArrayDataset(data)
    # as Python ints and bools: the plan's epoch layout goes into fit.json (numpy scalars
    # would fail its save), and a bad value is refused before any callback starts
    epochs = _check_index(epochs, "epochs", 0)
    batch_size = _check_index(batch_size, "batch_size", 1)
    shuffle = _check_flag(shuffle, "shuffle")
    drop_last = _check_flag(drop_last, "drop_last")
    if epochs and drop_last and 0 < len(dataset) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} with drop_last=True leaves no minibatch of the "
            f"{len(dataset)} rows: use a batch_size of at most {len(dataset)}"
        )
    if isinstance(callbacks, Callback):
        raise TypeError(
            f"callbacks takes a list of callbacks: pass callbacks=[{type(callbacks).__name__}"
            "(...)], not the callback alone"
        )
    try:
        callbacks = [] if callbacks is None else list(callbacks)
    except TypeError:
        raise TypeError(
            "callbacks takes a list of asyncnn.callbacks.Callback objects (or None), got "
            f"{type(callbacks).__name__} {callbacks!r}"
        ) from None
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be asyncnn.callbacks.Callback objects, got {cb!r}")
        _check_hook_names(type(cb))
    if (checkpoint_every is None) != (checkpoint_dir is None):
        raise ValueError("checkpoint_every and checkpoint_dir go together: give both or neither")
    if checkpoint_every is not None:
        checkpoint_every = _check_index(checkpoint_every, "checkpoint_every", 1)
    keep_checkpoints = _check_index(keep_checkpoints, "keep_checkpoints (0: keep all)", 0)
    if checkpoint_dir is not None and os.path.exists(checkpoint_dir):
        if not os.path.isdir(checkpoint_dir):  # found before an epoch trains, not after
            raise ValueError(
                f"checkpoint_dir {os.fspath(checkpoint_dir)!r} is a file: name a folder "
                "(it is made if missing)"
            )
    if trainer.cluster is not None and (validation_data is not None or checkpoint_every):
        raise ValueError(
            "validation_data and checkpoint_every need the weights during fit, which worker "
            "processes send back only at its end: with a cluster, call fit one epoch at a "
            "time and evaluate or save between calls"
        )
    check_batch(
        trainer.graph, dataset.arrays, check_data or trainer.check_finite, trainer.dtype, what="fit"
    )
    if check_data:
        check_labels(trainer.graph, trainer.shapes, dataset.arrays)
    validation = None
    if validation_data is not None:
        validation = trainer._checked_dataset(
            validation_data, trainer.graph.losses, "validation_data"
        )
        try:
            check_batch(trainer.graph, validation.arrays, check_data, trainer.dtype)
            if check_data:
                check_labels(trainer.graph, trainer.shapes, validation.arrays)
        except ValueError as exc:  # (as the shape errors of validation_data say)
            raise ValueError(f"validation_data: {exc}") from None
    # the epoch metrics this fit logs (val_accuracy where evaluate may give one): a monitor
    # of another is refused now, not at the end of the first epoch
    metrics = {"loss"}
    if validation is not None:
        metrics |= {"val_loss", "val_accuracy"} if _classifiers(trainer.graph) else {"val_loss"}
    for cb in callbacks:
        if isinstance(cb, EarlyStopping):
            cb._check_measured(metrics)
    if checkpoint_dir is not None and checkpoint_every is not None:
        # last of the checks, as it makes the folder where it is missing (a fit refused for
        # another reason leaves none); before any training, a folder it cannot write refused
        check_checkpoint_dir(os.fspath(checkpoint_dir), trainer.epochs_done)
    return _FitPlan(
        dataset, epochs, batch_size, shuffle, drop_last, validation, callbacks,
        None if checkpoint_dir is None else os.fspath(checkpoint_dir), checkpoint_every,
        keep_checkpoints,
    )  # fmt: skip
