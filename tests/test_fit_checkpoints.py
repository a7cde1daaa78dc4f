"""The checkpoints a fit writes to its ``checkpoint_dir``: the folder checked before the fit; the
states of the fit's callbacks that checkpoints keep for a resumed fit."""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import msgpack
import numpy as np
import pytest

import asyncnn as ann
from asyncnn._fit_checkpoints import check_checkpoint_dir
from asyncnn.callbacks import Callback, EarlyStopping, JSONLLogger

from _checkpoint_cases import _data, _rewrite_spec, _sync_trainer

pytestmark = pytest.mark.timeout(120)


def _read_only(monkeypatch: pytest.MonkeyPatch, under: str) -> None:
    """Files and folders made under ``under`` refused as on a read-only file system (a chmod
    stops no root, who runs the tests in some containers)."""
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path: Any) -> None:
        if os.fspath(path).startswith(under):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            refused(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        refused(path)
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


def test_a_read_only_checkpoint_dir_is_refused_before_any_training(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the fit trained a whole epoch, then raised "OSError: [Errno 30] Read-only file system:
    # '.../epoch-0001'", which named no checkpoint_dir)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tr = _sync_trainer()
    _read_only(monkeypatch, str(folder))
    with pytest.raises(OSError, match=(
        rf"checkpoint_dir '{re.escape(str(folder))}' cannot be written to \(Read-only file "
        rf"system: .*{re.escape(str(folder))}"
        r".*\): give a folder this process can write to; nothing was trained"
    )) as caught:  # fmt: skip
        tr.fit(_data(), batch_size=8, checkpoint_dir=str(folder), checkpoint_every=1)
    assert caught.value.errno == errno.EROFS
    assert (tr.epochs_done, tr.state.minibatches) == (0, 0)
    assert os.listdir(folder) == []


def test_a_missing_checkpoint_dir_is_made_or_refused_naming_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = tmp_path / "new" / "ckpt"
    check_checkpoint_dir(str(made), 0)  # made, and left empty
    assert made.is_dir() and os.listdir(made) == []
    _read_only(monkeypatch, str(tmp_path / "ro"))
    ro = re.escape(str(tmp_path / "ro" / "ckpt"))
    with pytest.raises(OSError, match=rf"checkpoint_dir '{ro}' cannot be written"):
        check_checkpoint_dir(str(tmp_path / "ro" / "ckpt"), 0)


class _Counter(Callback):
    """Counts the epochs it has seen: a state of its own, which checkpoints keep."""

    def __init__(self, seen: int = 0) -> None:
        self.seen = seen
        self.given: Any = None
        self.at_start: int | None = None

    def on_fit_start(self, trainer: Any) -> None:
        self.at_start = self.seen

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, float]) -> None:
        self.seen += 1

    def callback_state(self) -> Any:
        return {"seen": np.int64(self.seen), "pair": (1, 2.5)}

    def load_callback_state(self, state: Any) -> None:
        self.given = state
        self.seen = state["seen"]


def _spec(path: Any) -> Any:
    with open(os.path.join(path, "spec.msgpack"), "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, strict_map_key=False)


def test_a_checkpoint_keeps_each_callbacks_state_for_the_one_in_its_place(tmp_path: Any) -> None:
    tr = _sync_trainer()
    first, stop, second = _Counter(), EarlyStopping(monitor="loss", patience=5), _Counter(10)
    tr.fit(_data(), epochs=3, batch_size=8, callbacks=[first, stop, second])
    tr.save(tmp_path / "c")
    assert [(e["class"], e["index"]) for e in _spec(tmp_path / "c")["callbacks"]] == [
        ("_Counter", 0),
        ("EarlyStopping", 0),
        ("_Counter", 1),
    ]
    # matched by class and by how many of that class come before: a logger put first, the
    # early stopping moved, change nothing
    back = ann.Trainer.load(tmp_path / "c")
    again = [JSONLLogger(tmp_path / "m.jsonl"), EarlyStopping("loss", 5), _Counter(), _Counter()]
    back.fit(_data(), epochs=1, batch_size=8, callbacks=again)
    assert again[2].given == {"seen": 3, "pair": [1, 2.5]}  # (plain: a numpy int as Python's)
    assert type(again[2].given["seen"]) is int
    assert (again[2].at_start, again[3].at_start) == (3, 13)  # (before on_fit_start)
    assert (again[2].seen, again[3].seen) == (4, 14)
    assert (again[1].best, again[1].wait) == (min(stop.best, back.history.epochs[0]["loss"]), 0)
    # a new one in the loaded trainer's next fit starts afresh, as in any later fit
    fresh = _Counter()
    back.fit(_data(), epochs=1, batch_size=8, callbacks=[fresh])
    assert (fresh.given, fresh.seen) == (None, 1)


def test_a_loaded_trainer_saved_before_any_fit_keeps_the_callbacks_states(tmp_path: Any) -> None:
    tr = _sync_trainer()
    tr.fit(_data(), epochs=2, batch_size=8, callbacks=[_Counter(), EarlyStopping("loss")])
    tr.save(tmp_path / "a")
    ann.Trainer.load(tmp_path / "a").save(tmp_path / "b")
    assert _spec(tmp_path / "b")["callbacks"] == _spec(tmp_path / "a")["callbacks"]
    back, counter = ann.Trainer.load(tmp_path / "b"), _Counter()
    with pytest.warns(UserWarning, match=(
        r"kept the state of the callbacks EarlyStopping, which this fit is not given: their "
        r"state is dropped"
    )):  # fmt: skip
        back.fit(_data(), epochs=1, batch_size=8, callbacks=[counter])
    assert counter.seen == 3
    back.save(tmp_path / "c")  # (the fit's callbacks' states: the dropped one's no more)
    assert [e["class"] for e in _spec(tmp_path / "c")["callbacks"]] == ["_Counter"]


def test_resuming_with_callbacks_that_do_not_match_the_saved_ones_warns_naming_them(
    tmp_path: Any,
) -> None:
    tr = _sync_trainer()
    tr.fit(_data(), epochs=2, batch_size=8, callbacks=[EarlyStopping("loss"), _Counter()])
    tr.save(tmp_path / "c")
    back, stop = ann.Trainer.load(tmp_path / "c"), EarlyStopping("loss", mode="max")
    with pytest.warns(UserWarning, match=(
        r"kept the state of callback EarlyStopping, which the EarlyStopping given to this fit "
        r"does not take \(it was counted with mode='min', this EarlyStopping has mode='max'\): "
        r"it starts afresh"
    )):  # fmt: skip
        hist = back.fit(_data(), epochs=1, batch_size=8, callbacks=[_Counter(), stop])
    assert (stop.best, stop.wait) == (hist.epochs[0]["loss"], 0)
    with pytest.warns(UserWarning, match=r"the callbacks EarlyStopping, _Counter, which this fit"):
        ann.Trainer.load(tmp_path / "c").fit(_data(), epochs=1, batch_size=8)


def test_a_checkpoint_without_callback_states_resumes_them_afresh(tmp_path: Any) -> None:
    # (a checkpoint of an asyncnn before the record, or of a fit whose callbacks kept none)
    tr = _sync_trainer()
    tr.fit(_data(), epochs=2, batch_size=8, callbacks=[EarlyStopping("loss")])
    tr.save(tmp_path / "c")

    def older(spec: dict[str, Any]) -> None:
        del spec["callbacks"]  # (and it has one to remove)

    _rewrite_spec(str(tmp_path / "c"), older)
    back, stop = ann.Trainer.load(tmp_path / "c"), EarlyStopping("loss")
    hist = back.fit(_data(), epochs=1, batch_size=8, callbacks=[stop])  # (warning-free)
    assert (stop.best, stop.wait) == (hist.epochs[0]["loss"], 0)
    plain = _sync_trainer()
    plain.fit(_data(), epochs=1, batch_size=8, callbacks=[JSONLLogger(tmp_path / "m.jsonl")])
    plain.save(tmp_path / "p")
    assert "callbacks" not in _spec(tmp_path / "p")  # (none kept: the spec as it was)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (5, "it must be a list, got 5"),
        (
            [{"class": "EarlyStopping"}],
            'each entry must be {"class": str, "module": str, "index": int >= 0',
        ),
        ([{"class": "A", "module": 5, "index": 0, "state": 1}], 'each entry must be {"class"'),
        ([{"class": "A", "index": 0, "state": 1}] * 2, "it holds A twice"),
        (
            [{"class": "A", "module": "m.x", "index": 1, "state": 1}] * 2,
            "it holds A #2 twice",
        ),
        (
            [{"class": "A", "index": 0, "state": 1, "epoch_end": {"epoch": 1, "logs": [2]}}],
            'an entry\'s "epoch_end" must be {"epoch": int >= 0, "logs": {str: number}}, got',
        ),
    ],
)
def test_a_malformed_callbacks_record_is_refused_naming_it(
    tmp_path: Any, record: Any, match: str
) -> None:
    tr = _sync_trainer()
    tr.save(tmp_path / "c")
    _rewrite_spec(str(tmp_path / "c"), lambda spec: spec.update(callbacks=record))
    with pytest.raises(ann.CheckpointError, match=r"is malformed: its 'callbacks' record: "
                       + re.escape(match)):  # fmt: skip
        ann.Trainer.load(tmp_path / "c")


class _HoldsAnArray(Callback):
    def callback_state(self) -> Any:
        return {"weights": [np.zeros(2)]}


def test_a_callback_state_a_checkpoint_cannot_keep_is_refused_by_the_save(tmp_path: Any) -> None:
    tr = _sync_trainer()
    tr.fit(_data(), epochs=1, batch_size=8, callbacks=[_HoldsAnArray()])  # (no save: it trains)
    with pytest.raises(TypeError, match=(
        r"the state of callback _HoldsAnArray \(its callback_state\(\)\)\['weights'\]\[0\] is "
        r"ndarray .* which a checkpoint cannot keep"
    )):  # fmt: skip
        tr.save(tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")
    with pytest.raises(TypeError, match="_HoldsAnArray.*which a checkpoint cannot keep"):
        _sync_trainer().fit(_data(), epochs=1, batch_size=8, callbacks=[_HoldsAnArray()],
                            checkpoint_dir=tmp_path / "d", checkpoint_every=1)  # fmt: skip


class _SavesOnly(Callback):
    def callback_state(self) -> Any:
        return 1


def test_a_callback_saving_a_state_it_cannot_load_is_refused_before_the_resumed_fit(
    tmp_path: Any,
) -> None:
    tr = _sync_trainer()
    tr.fit(_data(), epochs=1, batch_size=8, callbacks=[_SavesOnly()])
    tr.save(tmp_path / "c")
    back = ann.Trainer.load(tmp_path / "c")
    with pytest.raises(TypeError, match="_SavesOnly was given a saved state but keeps none"):
        back.fit(_data(), epochs=1, batch_size=8, callbacks=[_SavesOnly()])
    assert back.state.minibatches == tr.state.minibatches  # (nothing trained)


def _progress_class(*, keeps_state: bool, module: str = __name__) -> type[Callback]:
    """A callback class ``_Progress`` of ``module``, counting epochs: with ``keeps_state`` a
    checkpoint keeps its count (a user's first version, say); without, it keeps none (a later
    version, or another library's class of that name)."""

    def on_epoch_end(self: Any, trainer: Any, epoch: int, logs: dict[str, float]) -> None:
        self.n = getattr(self, "n", 0) + 1

    def callback_state(self: Any) -> Any:
        return {"n": getattr(self, "n", 0)}

    def load_callback_state(self: Any, state: Any) -> None:
        self.given = state
        self.n = state["n"]

    body: dict[str, Any] = {"__module__": module, "__qualname__": "_Progress"}
    body["on_epoch_end"] = on_epoch_end
    if keeps_state:
        body.update(callback_state=callback_state, load_callback_state=load_callback_state)
    return type("_Progress", (Callback,), body)


def test_a_saved_state_of_a_class_that_now_keeps_none_warns_and_starts_afresh(
    tmp_path: Any,
) -> None:
    # the class's default load_callback_state raised TypeError: every fit given that callback
    # failed before it started, the state never dropped
    tr = _sync_trainer()
    tr.fit(_data(), epochs=2, batch_size=8, callbacks=[_progress_class(keeps_state=True)()])
    tr.save(tmp_path / "c")
    back, plain = ann.Trainer.load(tmp_path / "c"), _progress_class(keeps_state=False)()
    with pytest.warns(UserWarning, match=(
        r"kept the state of callback _Progress, which the _Progress given to this fit keeps "
        r"none of its own \(its class overrides neither callback_state nor "
        r"load_callback_state\): it starts afresh and that state is dropped"
    )):  # fmt: skip
        back.fit(_data(), epochs=1, batch_size=8, callbacks=[plain, EarlyStopping("loss")])
    assert back.epochs_done == 3 and plain.n == 1
    back.save(tmp_path / "d")
    assert [e["class"] for e in _spec(tmp_path / "d")["callbacks"]] == ["EarlyStopping"]


def test_a_saved_state_goes_only_to_a_class_of_the_same_package(tmp_path: Any) -> None:
    # matched by the class's name alone, another library's _Progress was handed the state
    tr = _sync_trainer()
    tr.fit(_data(), epochs=2, batch_size=8, callbacks=[_progress_class(keeps_state=True)()])
    tr.save(tmp_path / "c")
    (entry,) = _spec(tmp_path / "c")["callbacks"]
    assert (entry["class"], entry["module"]) == ("_Progress", __name__)
    other = _progress_class(keeps_state=True, module="otherlib.callbacks")()
    with pytest.warns(UserWarning, match=(
        r"kept the state of the callbacks _Progress \(of " + re.escape(__name__) + r"; this "
        r"fit's _Progress is otherlib.callbacks._Progress\), which this fit is not given: their "
        r"state is dropped"
    )):  # fmt: skip
        ann.Trainer.load(tmp_path / "c").fit(_data(), epochs=1, batch_size=8, callbacks=[other])
    assert not hasattr(other, "given") and other.n == 1
    # a record without the module (as the first records were written) matches by name
    _rewrite_spec(str(tmp_path / "c"), lambda spec: spec["callbacks"][0].pop("module"))
    other = _progress_class(keeps_state=True, module="otherlib.callbacks")()
    ann.Trainer.load(tmp_path / "c").fit(_data(), epochs=1, batch_size=8, callbacks=[other])
    assert other.given == {"n": 2} and other.n == 3


class _Keeps(Callback):
    def __init__(self, state: Any) -> None:
        self.state = state

    def callback_state(self) -> Any:
        return self.state

    def load_callback_state(self, state: Any) -> None:
        self.state = state


_WHERE = r"the state of callback _Keeps \(its callback_state\(\)\)"


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ({"count": 2**64}, r"\['count'\] is the int 18446744073709551616, outside"),
        ({"count": -(2**63) - 1}, r"\['count'\] is the int -9223372036854775809, outside"),
        ({"name": ["ok", "\ud800"]}, r"\['name'\]\[1\] is a str that is no UTF-8 text"),
        ({"\udc80": 1}, r" has the key '\\udc80', a str that is no UTF-8 text"),
    ],
    ids=["2**64", "-2**63-1", "lone surrogate", "key"],
)
def test_a_state_msgpack_cannot_pack_is_refused_naming_the_callback_and_the_place(
    tmp_path: Any, state: Any, says: str
) -> None:
    # _plain let them through, and msgpack refused them unnamed (OverflowError,
    # UnicodeEncodeError), with checkpoint_every only after training
    tr = _sync_trainer()
    tr.fit(_data(), epochs=1, batch_size=8, callbacks=[_Keeps(state)])
    with pytest.raises(TypeError, match=_WHERE + says):
        tr.save(tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")
    fresh = _sync_trainer()
    with pytest.raises(TypeError, match=_WHERE + says + r".*\(checked as the fit starts"):
        fresh.fit(_data(), epochs=1, batch_size=8, callbacks=[_Keeps(state)],
                  checkpoint_dir=tmp_path / "d", checkpoint_every=1)  # fmt: skip
    assert fresh.state.minibatches == 0  # (before any training)


def test_states_at_the_edges_of_what_a_checkpoint_keeps_are_kept(tmp_path: Any) -> None:
    edges = {"top": 2**64 - 1, "bottom": -(2**63), "text": "ünï \U0001f600", "nested": [[[]]]}
    tr = _sync_trainer()
    tr.fit(_data(), epochs=1, batch_size=8, callbacks=[_Keeps(edges)], checkpoint_every=1,
           checkpoint_dir=tmp_path / "d")  # fmt: skip
    back = _Keeps(None)
    ann.Trainer.load(tmp_path / "d" / "epoch-0001").fit(_data(), epochs=1, batch_size=8,
                                                       callbacks=[back])  # fmt: skip
    assert back.state == edges


def test_the_error_of_a_state_read_as_the_fit_ended_is_raised_afresh_by_each_save(
    tmp_path: Any,
) -> None:
    # one exception object, raised again by each save: its traceback grew each time
    import traceback

    tr = _sync_trainer()
    tr.fit(_data(), epochs=1, batch_size=8, callbacks=[_HoldsAnArray()])
    told = []
    for i in range(3):
        with pytest.raises(
            TypeError, match="_HoldsAnArray.*which a checkpoint cannot keep"
        ) as info:
            tr.save(tmp_path / f"c{i}")
        told.append("".join(traceback.format_exception(info.value)))
    assert told[0] == told[1] == told[2]
    assert "fit(data, epochs=0, callbacks=" in told[0]  # (how to save the trainer all the same)
