"""The plain training loop: minibatch gradient descent with no actors, no channels, no threads.

This is the reference the actor runtime is checked against: for the synchronous policies
(``Sync``, ``GPipe``, ``OneFOneB``) a Trainer must reach the parameters this loop reaches on the
same model, data, optimizer and seed. It is also the quickest way to train a small model.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ..backends import array_namespace, backend_of, is_floating, to_numpy
from ._autodiff_grad import value_and_grad
from ._data import ArrayDataset, _check_index
from ._pytree import tree_leaves

__all__ = ["evaluate", "predict", "train_loop"]


class _Optimizer(Protocol):
    def init(self, params: Any) -> Any: ...

    def update(self, params: Any, grads: Any, state: Any) -> tuple[Any, Any]: ...


def _as_dataset(data: Mapping[str, Any] | ArrayDataset, needed: Sequence[str]) -> ArrayDataset:
    dataset = data if isinstance(data, ArrayDataset) else ArrayDataset(data)
    missing = [k for k in needed if k not in dataset]
    if missing:
        raise KeyError(
            f"the data has no field {missing[0]!r} (fields: {dataset.keys()}); name the model's "
            "inputs with input_keys=(...) and the labels with label_key=..."
        )
    return dataset


def _placement(params: Any) -> tuple[Any, Any]:
    """The array namespace of the parameters and their floating dtype (None if they have none)."""
    leaves = [leaf for leaf in tree_leaves(params) if hasattr(leaf, "dtype")]
    xp = array_namespace(*leaves)
    for leaf in leaves:
        if is_floating(leaf.dtype):
            return xp, leaf.dtype
    return xp, None


def _to_params_device(array: Any, xp: Any, float_dtype: Any) -> Any:
    # Floating inputs take the parameters' dtype, so a float64 reference run stays float64 end
    # to end and a float32 one is not promoted by float64 data; integer labels stay as they are.
    if float_dtype is not None and is_floating(array.dtype):
        return xp.asarray(array, dtype=float_dtype)
    return xp.asarray(array)


def _keys(input_keys: str | Sequence[str]) -> tuple[str, ...]:
    return (input_keys,) if isinstance(input_keys, str) else tuple(input_keys)


def train_loop(
    model: Any,
    loss: Any,
    params: Any,
    optimizer: _Optimizer,
    data: Mapping[str, Any] | ArrayDataset,
    *,
    epochs: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    input_keys: str | Sequence[str] = ("x",),
    label_key: str = "y",
    rng_seed: int | None = None,
    opt_state: Any = None,
    start_epoch: int = 0,
    drop_last: bool = False,
) -> tuple[Any, Any, list[float]]:
    """Trains ``model`` by minibatch gradient descent, one step per batch.

    Each step computes ``loss({}, model(params, *inputs, rng=rng), labels)`` (the loss is a mean
    over the batch), its gradient with :func:`asyncnn.value_and_grad`, and
    ``params, state = optimizer.update(params, grads, state)``.

    Args:
        model: an ``asyncnn.nn`` module (or any ``model(params, *inputs, rng=None)``).
        loss: a loss module, called as ``loss({}, outputs, labels)``; returns a scalar mean.
        params: the model's parameters (a pytree of numpy or cupy arrays); inputs are moved to
            their array namespace and floating inputs cast to their dtype.
        optimizer: an ``asyncnn.optim`` optimizer.
        data: ``{name: array}`` or an :class:`~asyncnn.data.ArrayDataset`.
        epochs: passes over the data (>= 0).
        batch_size: rows per step (the last batch of an epoch is smaller unless ``drop_last``).
        shuffle: shuffle rows each epoch; the order depends only on ``(seed, epoch)``.
        seed: the shuffling seed.
        input_keys: the fields passed to the model, in order.
        label_key: the field passed to the loss as labels.
        rng_seed: if given, the model gets a fresh generator per step, seeded by
            ``(rng_seed, step)`` (dropout and other stochastic layers); otherwise ``rng=None``.
        opt_state: the optimizer state to resume from; ``optimizer.init(params)`` when None.
        start_epoch: the first epoch's number, to resume a run with the same shuffling and
            per-step generators it would have had (steps are counted from ``start_epoch``).
        drop_last: skip each epoch's final short batch.

    Returns:
        ``(params, opt_state, losses)``: the final parameters and optimizer state, and one float
        loss per step (the batch mean, before that step's update).

    Raises:
        TypeError: ``epochs`` or ``start_epoch`` not an int (a bool is not one either).
        ValueError: ``epochs`` or ``start_epoch`` below 0.
    """
    epochs = _check_index(epochs, "epochs", 0)
    start_epoch = _check_index(start_epoch, "start_epoch", 0)
    inputs = _keys(input_keys)
    dataset = _as_dataset(data, (*inputs, label_key))
    num_batches = dataset.num_batches(batch_size, drop_last)
    xp, float_dtype = _placement(params)
    backend = backend_of(*tree_leaves(params))
    state = optimizer.init(params) if opt_state is None else opt_state

    def objective(p: Any, labels: Any, rng: Any, *xs: Any) -> Any:
        return loss({}, model(p, *xs, rng=rng), labels)

    step_fn = value_and_grad(objective)
    losses: list[float] = []
    for epoch in range(start_epoch, start_epoch + epochs):
        for i, batch in enumerate(
            dataset.batches(batch_size, shuffle, seed, epoch=epoch, drop_last=drop_last)
        ):
            rng = None
            if rng_seed is not None:
                step = epoch * num_batches + i
                rng = backend.rng(np.random.SeedSequence([operator.index(rng_seed), step]))
            xs = [_to_params_device(batch[k], xp, float_dtype) for k in inputs]
            labels = _to_params_device(batch[label_key], xp, float_dtype)
            value, grads = step_fn(params, labels, rng, *xs)
            params, state = optimizer.update(params, grads, state)
            losses.append(float(value))
    return params, state, losses


def predict(
    model: Any,
    params: Any,
    data: Mapping[str, Any] | ArrayDataset,
    batch_size: int = 256,
    *,
    input_keys: str | Sequence[str] = ("x",),
) -> np.ndarray[Any, Any]:
    """The model's outputs on every row of ``data``, in order, as one numpy array.

    The model runs with ``rng=None`` (no dropout), ``batch_size`` rows at a time.

    Raises:
        ValueError: the data has no rows (as ``Trainer.predict``: the outputs' shape is the
            model's to say, and with no row it is never called).
    """
    inputs = _keys(input_keys)
    dataset = _as_dataset(data, inputs)
    if len(dataset) == 0:
        raise ValueError("predict needs at least one row of data (the data has 0 rows)")
    xp, float_dtype = _placement(params)
    outputs = []
    for batch in dataset.batches(batch_size):
        xs = [_to_params_device(batch[k], xp, float_dtype) for k in inputs]
        outputs.append(to_numpy(model(params, *xs, rng=None)))
    return np.concatenate(outputs, axis=0)


def evaluate(
    model: Any,
    params: Any,
    data: Mapping[str, Any] | ArrayDataset,
    batch_size: int = 256,
    *,
    input_keys: str | Sequence[str] = ("x",),
    label_key: str = "y",
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a classifier on ``data``.

    The loss is computed here in float64 from the model's logits (a log-softmax over the last
    axis), independent of any loss module, so it can check one.

    Returns:
        ``{"loss": mean cross-entropy, "accuracy": fraction of rows whose argmax is the label}``.

    Raises:
        TypeError: labels that are not integers.
        ValueError: no rows; labels not of shape ``(rows,)``; logits not ``(rows, classes)``; a
            label outside ``[0, classes)``.
    """
    inputs = _keys(input_keys)
    dataset = _as_dataset(data, (*inputs, label_key))
    if len(dataset) == 0:
        raise ValueError("evaluate needs at least one row of data")
    labels = np.asarray(to_numpy(dataset[label_key]))
    if labels.dtype.kind not in "iu":
        raise TypeError(
            f"evaluate needs integer class labels in {label_key!r}, got dtype {labels.dtype}; "
            "convert with labels.astype(np.int64)"
        )
    if labels.ndim != 1:
        # (N, 1) labels would broadcast against the logits' rows to (N, N): a wrong loss and
        # accuracy, returned without a word
        raise ValueError(
            f"evaluate needs labels {label_key!r} of shape (rows,), one class index per row: "
            f"got shape {labels.shape}; flatten labels of shape (rows, 1) with "
            "labels.reshape(-1), turn one-hot labels into indices with labels.argmax(axis=1)"
        )
    logits = predict(model, params, dataset, batch_size, input_keys=inputs).astype(np.float64)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"evaluate needs logits of shape (rows, classes) = ({labels.shape[0]}, C), got "
            f"{logits.shape}"
        )
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}) for {logits.shape[1]} classes, got "
            f"range [{labels.min()}, {labels.max()}]"
        )
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(labels.shape[0])
    return {
        "loss": float(-log_probs[rows, labels].mean()),
        "accuracy": float((logits.argmax(axis=1) == labels).mean()),
    }
