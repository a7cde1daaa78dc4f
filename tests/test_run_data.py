"""``run.step``'s checks of the data it is given: the ids an Embedding reads and the labels of a
cross-entropy loss against their range (as ``Trainer.fit`` checks its data), and inputs of a
dtype numpy does not know, each refused before any key goes in."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies


def _token_graph() -> ann.Graph:
    """Ids (None, 4) into a table of 10 rows, two stages, 2 classes."""
    return ann.Graph.sequential(
        [nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2)], loss=nn.CrossEntropyLoss(),
        stages=2, input_shape=(None, 4), input_dtype="int64",
    )  # fmt: skip


def _batch(rows: int = 4) -> dict[str, Any]:
    return {
        "x": np.arange(4 * rows).reshape(rows, 4) % 10,
        "y": np.arange(rows, dtype=np.int64) % 2,
    }


def _open(**kw: Any) -> Any:
    return ann.open_run(_token_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), **kw)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("field", "row", "bad", "said"),
    [
        ("x", (2, 1), 10, r"input 'x': id 10 at index \(2, 1\) is out of range for layer "
         r"'stage0' \(Embedding\(num_embeddings=10, embedding_dim=3\)\): ids must be in 0\.\.9"),
        ("x", (3, 0), -1, r"input 'x': id -1 at index \(3, 0\) .* 'stage0'"),
        ("y", 3, 2, r"input 'y': label 2 at row 3 is out of range for loss 'loss' "
         r"\(CrossEntropyLoss over the 2 classes of 'stage1'\): labels must be in 0\.\.1"),
        ("y", 0, -1, r"input 'y': label -1 at row 0 "),
    ],
)  # fmt: skip
async def test_step_refuses_ids_and_labels_out_of_range_before_any_key(
    field: str, row: Any, bad: int, said: str
) -> None:
    # (an id: the layer's IndexError inside the run, naming the op and a row of the
    # microbatch, or on a GPU a NaN row without a word; a label: the loss actor's error; either
    # ended the run)
    batch = _batch()
    batch[field][row] = bad
    async with _open() as run:
        with pytest.raises(ValueError, match=said):
            await run.step(batch)
        assert (run.minibatches, run.next_key, run.in_flight) == (0, 0, 0)  # nothing went in
        await run.step(_batch())  # the run goes on
        await run.drain()
    assert sorted(run.losses) == [0]
    assert [s.forwards for s in run.statistics().values()] == [2, 2, 2]  # its keys only


@pytest.mark.anyio
async def test_step_checks_gpu_like_ids_that_the_layer_would_turn_into_nan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncnn._math import _ops_nn

    # ids as on a GPU, which the layer does not read back: a bad id's row comes out NaN
    monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)
    batch = _batch()
    batch["x"][1, 3] = 12
    async with _open() as run:
        with pytest.raises(ValueError, match=r"input 'x': id 12 at index \(1, 3\) .*0\.\.9"):
            await run.step(batch)
        # check_data=False: for data checked already (what fit does); here the NaN goes through
        await run.step(batch, check_data=False)
        await run.drain()
    assert np.isnan(run.losses[0])


@pytest.mark.anyio
async def test_step_reads_gpu_ids_back_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncnn._math import _ops_nn
    from asyncnn._runtime import _checks

    # numpy arrays taken for GPU ones: checking them would read back from the device at every
    # step, so by default their bad ids are left to the layer's NaN guard
    monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)
    monkeypatch.setattr(_checks, "is_cupy_array", lambda a: isinstance(a, np.ndarray))
    batch = _batch()
    batch["x"][2, 0] = 10
    async with _open() as run:
        with pytest.raises(ValueError, match=r"input 'x': id 10 at index \(2, 0\)"):
            await run.step(batch, check_data=True)
        await run.step(batch)
        await run.drain()
    assert np.isnan(run.losses[0])


@pytest.mark.anyio
async def test_step_checks_the_values_of_every_batch_not_only_a_new_signature() -> None:
    # (the checks of names, shapes and dtypes are skipped for a batch like the last one)
    bad = _batch()
    bad["x"][0, 0] = 99
    async with _open() as run:
        await run.step(_batch())
        with pytest.raises(ValueError, match=r"id 99 at index \(0, 0\)"):
            await run.step(bad)
        await run.drain()
    assert sorted(run.losses) == [0]


@pytest.mark.anyio
async def test_step_names_an_input_of_a_dtype_numpy_does_not_know() -> None:
    # (a torch tensor failed with "Cannot interpret 'torch.int64' as a data type", naming nothing)
    torch = pytest.importorskip("torch")
    batch = _batch()
    async with _open() as run:
        with pytest.raises(TypeError, match=r"input 'x' is a Tensor of dtype torch.int64.*numpy"):
            await run.step({"x": torch.tensor(batch["x"]), "y": batch["y"]})
        await run.step(batch)
        await run.drain()
    assert sorted(run.losses) == [0]


def test_range_checks_are_made_once_per_run_and_only_where_there_is_something_to_check() -> None:
    from asyncnn._runtime._checks import range_checks, validate

    g = _token_graph()
    checks = range_checks(g, validate(g))
    assert [(c.input, c.size, c.what) for c in checks] == [("x", 10, "id"), ("y", 2, "label")]
    mse = ann.Graph.sequential(
        [nn.Linear(4, 2)], loss=nn.MSELoss(), input_shape=(None, 4), label_shape=(None, 2)
    )
    assert range_checks(mse, validate(mse)) == []  # a step there pays nothing for it


@pytest.mark.anyio
@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(ignore_index=-7)])
async def test_step_takes_labels_equal_to_the_losss_ignore_index_and_leaves_them_out(
    loss: Any,
) -> None:
    # (the data check refused torch's -100 as out of range, though the loss ignores it)
    graph = ann.Graph.sequential(
        [nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2)], loss=loss,
        input_shape=(None, 4), input_dtype="int64",
    )  # fmt: skip
    batch = _batch(6)
    batch["y"][[1, 4]] = loss.ignore_index
    kept = {k: np.delete(v, [1, 4], axis=0) for k, v in batch.items()}
    losses = []
    for data in (batch, kept):  # the mean of the positions not ignored: the rows kept's loss
        async with ann.open_run(graph, optimizer=optim.SGD(lr=0.1), policy=policies.Sync()) as run:
            await run.step(data)
            await run.drain()
        losses.append(run.losses[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    batch["y"][2] = -5  # another label out of range is still refused, saying what is taken
    async with ann.open_run(graph, optimizer=optim.SGD(lr=0.1), policy=policies.Sync()) as run:
        with pytest.raises(ValueError, match=rf"label -5 at row 2 .*or {loss.ignore_index} \(the"):
            await run.step(batch)


def test_a_cross_entropy_loss_takes_its_ignore_index_on_any_device() -> None:
    from asyncnn._runtime._checks import _label_rule

    # (the fused GPU kernels of a loss at its defaults skip -100 labels too)
    fix, ignored = _label_rule(nn.CrossEntropyLoss(), 3)
    assert ignored == -100 and fix == "labels must be in 0..2, or -100 (the loss's ignore_index)"
    assert _label_rule(nn.CrossEntropyLoss(weight=(1.0, 2.0, 1.0)), 3)[1] == -100
    assert _label_rule(nn.CrossEntropyLoss(ignore_index=1), 3)[1] is None  # a class
    assert _label_rule(nn.MSELoss(), 3) == ("labels must be in 0..2", None)


def _regression_graph() -> ann.Graph:
    return ann.Graph.sequential(
        [nn.Linear(3, 3)], loss=nn.MSELoss(), stages=1, input_shape=(None, 3),
        label_shape=(None, 3), label_dtype="float32",
    )  # fmt: skip


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("wrap", [np.asmatrix, lambda a: a.view(np.memmap)], ids=["matrix", "view"])
async def test_step_takes_a_numpy_subclass_as_the_plain_array_it_holds(wrap: Any) -> None:
    # (a float64 np.matrix in a float32 run kept its class through the cast, and the loss failed
    # on it: "actor 'loss' ... shapes (8,3) and (8,3) not aligned"; fit trains on it)
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
    losses = []
    for given in ({"x": x, "y": t}, {"x": wrap(x), "y": wrap(t)}):
        async with ann.open_run(
            _regression_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync()
        ) as run:
            await run.step(given)
            await run.drain()
        losses.append(run.losses[0])
    assert losses[0] == losses[1]


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", ["float64", "float32"])
async def test_step_refuses_a_masked_array_as_fit_does(dtype: str) -> None:
    # (float64: "actor 'stage0' ... could not be broadcast"; float32, the run's dtype: accepted,
    # and the values under the mask trained on; fit refuses it)
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((8, 3)).astype(dtype), rng.standard_normal((8, 3)).astype("float32")
    masked = np.ma.masked_array(x, mask=np.zeros_like(x, bool))
    masked.mask[0, 0] = True
    async with ann.open_run(
        _regression_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync()
    ) as run:
        await run.step({"x": x.astype("float32"), "y": t})  # its signature, but a plain array
        with pytest.raises(
            TypeError, match=r"input 'x' is a masked array: its masked entries would be read as "
            r"the values stored under the mask; fill them \(x.filled\(value\)\)",
        ):  # fmt: skip
            await run.step({"x": masked, "y": t})
        assert run.minibatches == 1  # refused before any key went in
        await run.drain()
    assert sorted(run.losses) == [0]
