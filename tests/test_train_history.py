"""History: its repr, and save/load that round-trips every float and names a damaged field."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn.callbacks import Callback

from _checkpoint_cases import _rewrite_spec
from _reference import chain_graph
from _train_cases import _data, _trainer


def test_history_repr_is_short():
    tr = _trainer(policies.Sync())
    hist = tr.fit(_data(n=400), epochs=5, batch_size=8, validation_data=_data())
    assert len(hist.losses) == 250 and len(hist.epochs) == 5
    text = repr(hist)
    assert len(text) < 200 and text.startswith("History(250 minibatches, 5 epochs, loss")
    assert "val_loss" in text and "val_accuracy" in text


def test_history_save_and_load_round_trip_every_float_exactly(tmp_path):
    hist = _trainer(policies.Sync()).fit(_data(), epochs=2, batch_size=8, validation_data=_data())
    # the values JSON itself has no token for, and numpy scalars a user may put in
    hist.losses += [float("nan"), float("inf"), -float("inf"), np.float32(0.1), np.float64(1e-300)]
    hist.epochs.append({"epoch": np.int64(2), "loss": np.float32(2.5), "val_loss": float("nan")})
    hist.statistics["stage0"].note_delay(3)
    path = tmp_path / "history.json"
    hist.save(path)
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    back = ann.History.load(str(path))
    assert np.array_equal(back.losses, [float(v) for v in hist.losses], equal_nan=True)
    assert back.losses[-2] == float(np.float32(0.1)) and back.losses[-1] == 1e-300
    assert back.epochs[:2] == hist.epochs[:2] and type(back.epochs[2]["epoch"]) is int
    assert back.epochs[2]["loss"] == 2.5 and np.isnan(back.epochs[2]["val_loss"])
    assert (back.seconds, back.samples_per_second) == (hist.seconds, hist.samples_per_second)
    assert back.statistics == hist.statistics and back.statistics["stage0"].delays[3] == 1
    assert back.stopped_early is False and not (tmp_path / "history.json.tmp").exists()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[1, 2]", r"a JSON list, not an object"),
        ('{"format": "asyncnn.History", "version": 1, "losses": [1, "x"]}', r"losses\[1\]"),
        ('{"format": "asyncnn.History", "version": 1, "epochs": [{"loss": null}]}', "'loss'"),
        ('{"format": "asyncnn.History", "version": 9}', "version is 9"),
        ('{"format": "asyncnn.History", "version": 1, "lossess": []}', "'lossess'"),
        (
            '{"format": "asyncnn.History", "version": 1, "statistics": {"a": {"forwards": "3"}}}',
            r"statistics\['a'\]\.forwards",
        ),
        (
            '{"format": "asyncnn.History", "version": 1, "statistics": {"a": {"kind": "os:sep"}}}',
            r"statistics\['a'\]\.kind is 'os:sep', no statistics class .* import it",
        ),
        ("{not json", "not JSON"),
        ('{"losses": []}', "format is None"),
    ],
)
def test_history_load_names_the_file_and_the_damaged_field(tmp_path, text, named):
    path = tmp_path / "h.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + named):
        ann.History.load(path)


@dataclass(slots=True)
class _CountingStatistics(ann.ActorStatistics):
    seen: dict[str, int] = dataclasses.field(default_factory=dict)
    last: float | None = None


def test_history_keeps_the_counters_of_routers_loops_and_custom_actors(tmp_path):
    # (a router's expert_rows, a loop's row_steps: the subclasses' own counters)
    router = ann.dynamic.RouterStatistics(expert_rows={"e0": 3}, capacity=None, forwards=2)
    loop = ann.dynamic.LoopStatistics(row_steps=7, busy_seconds=0.1)
    loop.note_delay(2)
    custom = _CountingStatistics(seen={"a": 1}, last=float("inf"))
    hist = ann.History(statistics={"gate": router, "cell": loop, "mine": custom})
    hist.save(tmp_path / "h.json")
    back = ann.History.load(tmp_path / "h.json").statistics
    assert back == {"gate": router, "cell": loop, "mine": custom}
    assert [type(s) for s in back.values()] == [type(s) for s in hist.statistics.values()]


@dataclass(slots=True)
class _GenericStatistics(ann.ActorStatistics):
    norms: list[float] = dataclasses.field(default_factory=list)
    best: Optional[float] = None  # noqa: UP045 - the older spelling is read too
    pair: tuple[float, int] = (0.0, 0)
    spans: tuple[float, ...] = ()
    maybe: list[float | None] = dataclasses.field(default_factory=list)
    by_key: dict[int, list[float]] = dataclasses.field(default_factory=dict)


def test_history_load_gives_back_floats_inside_lists_tuples_and_optionals(tmp_path):
    # (inside a list, an Optional or a tuple a non-finite float came back as the string
    # "Infinity", and a tuple as a list: only float, int, X | None and dict[...] were read)
    inf = float("inf")
    mine = _GenericStatistics(
        norms=[1.5, inf], best=-inf, pair=(inf, 2), spans=(0.5, inf, -inf), maybe=[None, inf],
        by_key={3: [inf, 1.0]},
    )  # fmt: skip
    hist = ann.History(statistics={"mine": mine})
    hist.save(tmp_path / "h.json")
    back = ann.History.load(tmp_path / "h.json").statistics["mine"]
    assert back == mine and type(back.pair) is tuple and type(back.spans) is tuple
    nan = _GenericStatistics(norms=[float("nan")])
    ann.History(statistics={"nan": nan}).save(tmp_path / "n.json")
    assert np.isnan(ann.History.load(tmp_path / "n.json").statistics["nan"].norms[0])


def test_history_save_refuses_a_value_that_is_not_a_number_and_writes_nothing(tmp_path):
    hist = ann.History(losses=[1.0, "2.0"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"History\.losses\[1\] is '2\.0', not a number"):
        hist.save(tmp_path / "h.json")
    assert list(tmp_path.iterdir()) == []


def test_history_save_makes_its_folder_as_trainer_save_does(tmp_path):
    # (a folder that did not exist failed with "No such file or directory:
    # 'run/history.json.tmp'", a file the caller never named)
    hist = ann.History(losses=[1.0, 0.5])
    path = tmp_path / "run" / "deeper" / "history.json"
    hist.save(path)
    assert ann.History.load(path).losses == [1.0, 0.5]
    assert [p.name for p in path.parent.iterdir()] == ["history.json"]
    # a folder that cannot be made (a file is in its place): the error names the path given
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "history.json"
    with pytest.raises(OSError) as info:
        hist.save(bad)
    said = str(info.value)
    assert f"writing {bad} failed" in said and ".tmp" not in said, said
    assert f"its folder {tmp_path / 'file'} could not be made: a file is in its place" in said
    assert (tmp_path / "file").read_text() == ""


# -- the epoch's loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("hooks", [False, True], ids=["no-epoch-hooks", "validation"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_epochs_loss_is_over_its_rows_as_evaluate_gives(reduction, hooks):
    # (it was the plain mean of the minibatch losses: with 33 rows in batches of 32, the one-row
    # last batch counted as much as the 32 rows before it, 0.552 where the rows gave 0.751)
    data = _data(n=33)
    graph = chain_graph(3, loss=nn.CrossEntropyLoss(reduction=reduction))
    tr = ann.Trainer(graph, optimizer=optim.SGD(lr=0.0), policy=policies.Sync(), seed=3)
    hist = tr.fit(data, epochs=1, batch_size=32, validation_data=data if hooks else None)
    assert len(hist.losses) == 2 and len(hist.epochs) == 1
    whole = tr.evaluate(data)["loss"]  # (lr=0: the weights the epoch trained with)
    assert hist.epochs[0]["loss"] == pytest.approx(whole, rel=1e-6)
    if reduction == "sum":
        assert hist.epochs[0]["loss"] == pytest.approx(sum(hist.losses), rel=1e-12)


class _FailAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, logs):
        if step == self.step:
            raise RuntimeError("stopped here")


@pytest.mark.parametrize("through", ["in-memory", "saved", "saved-by-an-older-asyncnn"])
def test_an_epoch_resumed_mid_way_has_the_loss_of_the_unbroken_one(tmp_path, through):
    # each minibatch weighs its rows, those the interrupted fit ran too: a checkpoint keeps them
    # ("epoch_rows"), and one of an older asyncnn (losses alone) takes the epoch layout's
    data = _data(n=37)  # batches of 8, 8, 8, 8 and 5 rows
    straight = _trainer(policies.Sync()).fit(data, epochs=2, batch_size=8)
    tr = _trainer(policies.Sync())
    with pytest.raises(RuntimeError, match="stopped here"):
        tr.fit(data, epochs=2, batch_size=8, callbacks=[_FailAtStep(7)])
    assert tr.epochs_done == 1 and 0 < tr.epoch_batches < 5
    assert tr.history.epochs == straight.epochs[:1]
    if through != "in-memory":
        tr.save(tmp_path / "ckpt")
        if through == "saved-by-an-older-asyncnn":
            _rewrite_spec(str(tmp_path / "ckpt"), lambda s: s["fit"].pop("epoch_rows"))
        tr = ann.Trainer.load(tmp_path / "ckpt")
    hist = tr.fit(data, epochs=1, batch_size=8)
    assert len(hist.losses) < 5 and hist.epochs == straight.epochs[1:]
