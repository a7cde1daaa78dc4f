"""Callbacks of Trainer.fit: step and epoch hooks, validation, checkpoint_every, early stopping,
the JSONL and TensorBoard loggers."""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import warnings

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn.callbacks import Callback, EarlyStopping, JSONLLogger, TensorBoardLogger

from _reference import assert_params_equal, chain_graph


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 5)), "y": rng.integers(0, 3, n)}


def _trainer(policy=None, lr=0.01):
    return ann.Trainer(
        chain_graph(3), optimizer=optim.Adam(lr=lr), policy=policy or policies.GPipe(2), seed=3
    )


class _Record(Callback):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append(("start",))

    def on_step_end(self, trainer, step, logs):
        self.calls.append(("step", step, logs["epoch"], logs["loss"]))

    def on_epoch_end(self, trainer, epoch, logs):
        # the trainer holds the weights of the epoch's last update here
        self.calls.append(("epoch", epoch, trainer.state.minibatches, dict(logs)))

    def on_fit_end(self, trainer, history):
        self.calls.append(("end", len(history.losses)))


@pytest.mark.parametrize(
    "policy",
    [policies.Sync(), policies.GPipe(2), policies.PipeDream(2)],
    ids=["sync", "gpipe", "pipedream"],
)
def test_step_and_epoch_hooks_in_order(policy):
    rec = _Record()
    tr = _trainer(policy)
    hist = tr.fit(_data(), epochs=2, batch_size=8, callbacks=[rec])
    # the order the Callback docstring gives: each epoch's steps, then that epoch's end
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["start"] + (["step"] * 5 + ["epoch"]) * 2 + ["end"]
    steps = [c for c in rec.calls if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(10))
    assert [c[2] for c in steps] == [0] * 5 + [1] * 5
    assert [c[3] for c in steps] == hist.losses
    epochs = [c for c in rec.calls if c[0] == "epoch"]
    assert [(c[1], c[2]) for c in epochs] == [(0, 5), (1, 10)]
    assert epochs[0][3]["loss"] == pytest.approx(np.mean(hist.losses[:5]))
    assert rec.calls[0] == ("start",) and rec.calls[-1] == ("end", 10)
    assert hist.epochs == [c[3] for c in epochs]


class _SaveInStepHooks(Callback):
    """Saves the trainer from each step hook, and notes what the hook saw."""

    def __init__(self, folder):
        self.folder = folder
        self.seen = []

    def on_step_end(self, trainer, step, logs):
        path = self.folder / f"step-{step}"
        trainer.save(path)
        self.seen.append((step, path, trainer.state.minibatches, dict(trainer.versions),
                          trainer.params))  # fmt: skip


@pytest.mark.parametrize(
    "policy",
    [policies.PipeDream(2), policies.PipeDream2BW(2), policies.Async(2)],
    ids=["pipedream", "pipedream2bw", "async"],
)
def test_under_a_streaming_policy_a_step_hook_sees_and_saves_what_a_stop_there_keeps(
    tmp_path, policy
):
    # (the trainer held the state from before the fit in every step hook: a checkpoint saved
    # from one had versions 0 and none of the fit's training)
    hook = _SaveInStepHooks(tmp_path)
    tr = _trainer(policy)
    tr.fit(_data(), epochs=2, batch_size=8, callbacks=[hook])
    assert [s[0] for s in hook.seen] == list(range(10))
    kept = [s[2] for s in hook.seen]
    assert kept == sorted(kept) and kept[-1] <= 10
    if not isinstance(policy, policies.PipeDream2BW):
        # the step's own loss is known when its hook runs: a stop there keeps that minibatch
        # (PipeDream2BW keeps the minibatches every layer was seen to have applied: fewer)
        assert all(s[0] + 1 <= s[2] for s in hook.seen), kept
    for _, path, minibatches, versions, params in hook.seen:
        back = ann.Trainer.load(path)
        assert back.state.minibatches == minibatches and back.versions == versions
        assert_params_equal(back.params, params)
    versions = hook.seen[-1][3]
    assert all(v > 0 for v in versions.values()), versions  # the fit's updates, not its start


def test_a_callback_stops_the_fit_after_the_current_step():
    class StopAt(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 2:
                trainer.stop_training = True

    tr = _trainer(policies.Sync())
    hist = tr.fit(_data(), epochs=3, batch_size=8, callbacks=[StopAt()])
    assert hist.stopped_early and 3 <= len(hist.losses) <= 4
    assert tr.state.minibatches == len(hist.losses) == tr.epoch_batches
    assert set(tr.versions.values()) == {len(hist.losses)}


def test_validation_metrics_per_epoch():
    train, val = _data(), _data(n=30, seed=1)
    tr = _trainer()
    hist = tr.fit(train, epochs=3, batch_size=8, validation_data=val)
    assert [e["epoch"] for e in hist.epochs] == [0, 1, 2]
    assert set(hist.metrics) == {"loss", "val_loss", "val_accuracy"}
    final = tr.evaluate(val)
    assert hist.epochs[-1]["val_loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert hist.epochs[-1]["val_accuracy"] == final["accuracy"]


def test_checkpoint_every_keeps_the_last_n(tmp_path):
    data = _data()
    tr = _trainer()
    tr.fit(data, epochs=4, batch_size=8, shuffle=True, checkpoint_dir=tmp_path, checkpoint_every=1,
           keep_checkpoints=2)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["epoch-0003", "epoch-0004"]
    back = ann.Trainer.load(tmp_path / "epoch-0003")
    assert back.epochs_done == 3 and back.state.minibatches == 15
    back.fit(data, epochs=1, batch_size=8, shuffle=True)
    assert_params_equal(back.params, tr.params)
    with pytest.raises(ValueError, match="give both or neither"):
        tr.fit(data, checkpoint_every=1)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        tr.fit(data, checkpoint_every=0, checkpoint_dir=tmp_path)


def test_early_stopping():
    tr = _trainer(policies.Sync(), lr=0.0)  # nothing changes: no epoch improves on the first
    stop = EarlyStopping(monitor="loss", patience=1)
    hist = tr.fit(_data(), epochs=10, batch_size=8, callbacks=[stop])
    assert hist.stopped_early and len(hist.epochs) == 3 and stop.stopped_epoch == 2
    assert tr.epochs_done == 3
    learning = _trainer(policies.Sync(), lr=0.01)
    hist = learning.fit(_data(), epochs=4, batch_size=8, validation_data=_data(),
                        callbacks=[EarlyStopping(patience=1)])  # fmt: skip
    assert not hist.stopped_early and len(hist.epochs) == 4
    with pytest.raises(ValueError, match="monitors 'val_loss', which this fit does not measure"):
        _trainer().fit(_data(), callbacks=[EarlyStopping()])
    with pytest.raises(ValueError, match="mode must be"):
        EarlyStopping(mode="up")
    with pytest.raises(TypeError, match="Callback objects"):
        _trainer().fit(_data(), callbacks=[print])


def test_early_stopping_on_a_metric_the_fit_does_not_log_is_refused_before_any_compute():
    # (the default monitor, val_loss, without validation_data trained a whole epoch, then failed
    # listing 'epoch' as a metric)
    rec = _Record()
    tr = _trainer(policies.Sync())
    with pytest.raises(
        ValueError,
        match=r"EarlyStopping monitors 'val_loss', which this fit does not measure; it measures "
        r"\['loss'\] \(val_\* need fit\(..., validation_data=...\)",
    ):
        tr.fit(_data(), epochs=3, batch_size=8, callbacks=[rec, EarlyStopping()])
    assert rec.calls == [] and tr.state.minibatches == 0 and tr.epochs_done == 0
    with pytest.raises(ValueError, match=r"monitors 'val_los', .* measures \['loss', 'val_acc"):
        tr.fit(_data(), validation_data=_data(), callbacks=[EarlyStopping("val_los")])
    assert tr.state.minibatches == 0


class _StopOnItsOwnMetric(EarlyStopping):
    """Monitors a metric it works out itself, as a subclass may."""

    def on_epoch_end(self, trainer, epoch, logs):
        super().on_epoch_end(trainer, epoch, {**logs, "constant": 1.0})


def test_early_stopping_of_a_subclass_adding_its_own_metric_still_monitors_it():
    stop = _StopOnItsOwnMetric(monitor="constant", patience=0)
    hist = _trainer(policies.Sync()).fit(_data(), epochs=5, batch_size=8, callbacks=[stop])
    assert hist.stopped_early and len(hist.epochs) == 2 and stop.stopped_epoch == 1


def test_early_stopping_documents_each_of_its_attributes_on_its_own():
    # (stopped_epoch was indented under best: the API reference showed one attribute, 'best',
    # whose text ran on into "stopped_epoch: ...")
    griffe = pytest.importorskip("griffe")  # what mkdocstrings parses the docstrings with
    doc = griffe.Docstring(EarlyStopping.__doc__ or "", lineno=1)
    sections = griffe.parse_google(doc, warnings=False)
    names = [a.name for s in sections if s.kind.value == "attributes" for a in s.value]
    assert names == ["best", "stopped_epoch"]
    stop = EarlyStopping()
    assert all(hasattr(stop, name) for name in names)


def _es_scenario():
    """The data, validation data and fit arguments of a fit that EarlyStopping(patience=2)
    stops at epoch 4: val_loss is best at epoch 1 and worse at each epoch after it."""
    kwargs = {"batch_size": 8, "validation_data": _data(seed=1)}
    return _data(), kwargs


def test_early_stopping_resumed_from_a_checkpoint_stops_where_the_unbroken_fit_stops(tmp_path):
    # (the resumed fit's EarlyStopping, made anew by the script as it always is, counted its
    # patience afresh from the checkpoint's epoch: resumed from epoch-0003 the run trained two
    # epochs more than the one never interrupted, and ended with another best)
    data, kwargs = _es_scenario()
    straight, stop = _trainer(policies.Sync()), EarlyStopping(patience=2)
    hist = straight.fit(data, epochs=20, callbacks=[stop], checkpoint_dir=tmp_path,
                        checkpoint_every=1, keep_checkpoints=0, **kwargs)  # fmt: skip
    assert hist.stopped_early and stop.stopped_epoch == 4 and straight.epochs_done == 5
    assert stop.wait == 3  # (epochs 2, 3, 4 without improvement)
    for done in (1, 2, 3, 4):  # epoch-0003, epoch-0004: an epoch or two without gain counted
        back = ann.Trainer.load(tmp_path / f"epoch-{done:04d}")
        again = EarlyStopping(patience=2)  # (a new one, as a resumed script makes it)
        hist = back.fit(data, epochs=20 - done, callbacks=[again], **kwargs)
        assert hist.stopped_early and len(hist.epochs) == 5 - done
        assert (again.stopped_epoch, again.best, again.wait) == (4, stop.best, stop.wait)
        assert back.epochs_done == straight.epochs_done
        assert_params_equal(back.params, straight.params)


def test_early_stopping_of_a_fit_interrupted_and_saved_then_resumed_counts_on(tmp_path):
    # the save after the fit was interrupted (not a checkpoint_every one) keeps the state the
    # callbacks had when the fit stopped
    data, kwargs = _es_scenario()
    tr = _trainer(policies.Sync())
    with pytest.raises(KeyboardInterrupt):  # in epoch 3, after two epochs without improvement
        tr.fit(data, epochs=20, callbacks=[EarlyStopping(patience=2), _CtrlCInANotebook(16)],
               **kwargs)  # fmt: skip
    assert tr.epochs_done == 3 and 0 < tr.epoch_batches < 5  # (mid-epoch)
    tr.save(tmp_path / "ckpt")
    back, again = ann.Trainer.load(tmp_path / "ckpt"), EarlyStopping(patience=2)
    hist = back.fit(data, epochs=20, callbacks=[again], **kwargs)
    assert hist.stopped_early and again.stopped_epoch == 4 and back.epochs_done == 5


def test_a_new_early_stopping_in_a_later_fit_of_the_same_trainer_still_starts_afresh():
    # (only a trainer loaded from a checkpoint hands its saved states on: in one process the
    # script holds the callback, and passes it again to go on counting)
    data, kwargs = _es_scenario()
    tr = _trainer(policies.Sync())
    first = EarlyStopping(patience=2)
    tr.fit(data, epochs=3, callbacks=[first], **kwargs)
    assert first.wait == 1
    fresh = EarlyStopping(patience=2)
    hist = tr.fit(data, epochs=2, callbacks=[fresh], **kwargs)
    assert not hist.stopped_early and fresh.best == hist.epochs[0]["val_loss"]
    assert fresh.wait == 1


class _FailsToStart(Callback):
    def on_fit_start(self, trainer):
        raise OSError("cannot open my log file")


def _straight_es_run(tmp_path=None):
    """The unbroken run of :func:`_es_scenario`: its trainer and its EarlyStopping (with a
    checkpoint per epoch in ``tmp_path``, if given)."""
    data, kwargs = _es_scenario()
    straight, stop = _trainer(policies.Sync()), EarlyStopping(patience=2)
    saving = {} if tmp_path is None else {"checkpoint_dir": tmp_path, "checkpoint_every": 1}
    straight.fit(data, epochs=20, callbacks=[stop], keep_checkpoints=0, **saving, **kwargs)
    assert (stop.stopped_epoch, straight.epochs_done) == (4, 5)
    return straight, stop


@pytest.mark.parametrize("first", ["on_fit_start raises", "ctrl-c at its first step", "epochs=0"])
def test_a_loaded_trainers_first_fit_that_ends_no_epoch_leaves_the_saved_states_to_the_next(
    tmp_path, first
):
    # the states went to the first fit's callbacks as it started: one that failed before any
    # epoch end (or ran none) used them up, and the retry with a new EarlyStopping started
    # afresh, silently, and stopped two epochs later than the unbroken run
    data, kwargs = _es_scenario()
    straight, stop = _straight_es_run(tmp_path)
    back = ann.Trainer.load(tmp_path / "epoch-0003")
    if first == "epochs=0":
        back.fit(data, epochs=0, callbacks=[EarlyStopping(patience=2)], **kwargs)
    else:
        failing = (
            _FailsToStart() if first == "on_fit_start raises" else _CtrlCInANotebook(15)
        )  # (step 15: the first of the resumed fit)
        with pytest.raises((OSError, KeyboardInterrupt)):
            back.fit(data, epochs=17, callbacks=[EarlyStopping(patience=2), failing], **kwargs)
    assert back.epochs_done == 3
    back.save(tmp_path / "saved-after")  # (the checkpoint's states, still due)
    for resumed in (back, ann.Trainer.load(tmp_path / "saved-after")):
        again = EarlyStopping(patience=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (and no warning)
            hist = resumed.fit(data, epochs=17, callbacks=[again], **kwargs)
        assert hist.stopped_early
        assert (again.stopped_epoch, again.best, again.wait) == (4, stop.best, stop.wait)
        assert resumed.epochs_done == straight.epochs_done
        assert_params_equal(resumed.params, straight.params)


class _SavesEachEpoch(Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_epoch_end(self, trainer, epoch, logs):
        trainer.save(os.path.join(self.folder, f"e{epoch + 1}"))


def test_a_save_from_an_epoch_hook_before_early_stopping_resumes_where_the_unbroken_fit_stops(
    tmp_path,
):
    # the save came before EarlyStopping's on_epoch_end of that epoch, which the checkpoint
    # counts as done: it recorded the counters of the epoch before, and the resumed run, whose
    # EarlyStopping never saw that epoch, stopped an epoch late (from e5, where the unbroken
    # run stopped, it trained on)
    data, kwargs = _es_scenario()
    straight, stop = _trainer(policies.Sync()), EarlyStopping(patience=2)
    straight.fit(data, epochs=20, callbacks=[_SavesEachEpoch(tmp_path), stop], **kwargs)
    assert (stop.stopped_epoch, straight.epochs_done) == (4, 5)
    for done in (1, 2, 3, 4, 5):
        back = ann.Trainer.load(tmp_path / f"e{done}")
        assert back.epochs_done == done
        again = EarlyStopping(patience=2)
        hist = back.fit(data, epochs=20 - done, callbacks=[again], **kwargs)
        assert hist.stopped_early and len(hist.epochs) == 5 - done  # (from e5: none)
        assert (again.stopped_epoch, again.best, again.wait) == (4, stop.best, stop.wait)
        assert back.epochs_done == straight.epochs_done
        assert_params_equal(back.params, straight.params)


class _FailsAtEpochEnd(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == self.epoch:
            raise OSError("No space left on device")


@pytest.mark.parametrize("failing", [1, 2, 3, 4])
def test_an_epoch_end_cut_short_before_early_stopping_is_saved_as_still_due_to_it(
    tmp_path, failing
):
    # (a logger before the EarlyStopping failed in that epoch's end: the epoch counts as done,
    # the EarlyStopping never saw it, and the save after the error recorded that)
    data, kwargs = _es_scenario()
    straight, stop = _straight_es_run()
    tr = _trainer(policies.Sync())
    with pytest.raises(OSError, match="No space left"):
        tr.fit(data, epochs=20, callbacks=[_FailsAtEpochEnd(failing), EarlyStopping(patience=2)],
               **kwargs)  # fmt: skip
    assert tr.epochs_done == failing + 1
    tr.save(tmp_path / "c")
    back, again = ann.Trainer.load(tmp_path / "c"), EarlyStopping(patience=2)
    hist = back.fit(data, epochs=20, callbacks=[again], **kwargs)
    assert hist.stopped_early and len(hist.epochs) == 4 - failing  # (at epoch 4: none)
    assert (again.stopped_epoch, again.best, again.wait) == (4, stop.best, stop.wait)
    assert back.epochs_done == straight.epochs_done
    assert_params_equal(back.params, straight.params)


def test_jsonl_logger(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    tr = _trainer()
    hist = tr.fit(
        _data(), epochs=2, batch_size=8, validation_data=_data(), callbacks=[JSONLLogger(path)]
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["loss"] for r in steps] == hist.losses and [r["step"] for r in steps] == list(
        range(10)
    )
    assert [r["val_loss"] for r in epochs] == hist.metrics["val_loss"]
    assert all(r["time"] >= 0 for r in records)
    assert all(type(r["epoch"]) is int for r in records)  # (step lines read "epoch": 0.0)
    tr.fit(_data(), epochs=1, batch_size=8, callbacks=[JSONLLogger(path, every=0)])
    assert len(path.read_text().splitlines()) == len(records) + 1  # appended: one epoch line


def test_a_jsonl_logger_that_cannot_make_its_folder_names_itself_and_the_path(tmp_path):
    # (a bare "FileExistsError: File exists: 'afile'", which read as if the log were there)
    (tmp_path / "afile").write_text("not a folder")
    path = tmp_path / "afile" / "m.jsonl"
    with pytest.raises(OSError, match=r"^JSONLLogger\('.*afile/m.jsonl'\) cannot write its file"):
        _trainer().fit(_data(), epochs=1, batch_size=8, callbacks=[JSONLLogger(path)])


def test_validation_data_of_fields_with_other_row_counts_is_named():
    # (the message, "field 'y' has 5 rows but field 'x' has 30", did not say which data)
    bad = {"x": _data()["x"][:30], "y": _data()["y"][:5]}
    with pytest.raises(ValueError, match=r"^validation_data: field 'y' has 5 rows"):
        _trainer().fit(_data(), epochs=1, batch_size=8, validation_data=bad)


def test_jsonl_logger_writes_nan_inf_and_numpy_numbers_as_json(tmp_path):
    # (a numpy float32 made json.dumps raise inside the fit; a NaN had to stay valid JSON)
    path = tmp_path / "m.jsonl"
    logger = JSONLLogger(path)
    logger.on_fit_start(None)
    logger.on_step_end(None, 0, {"loss": float("nan"), "epoch": 0})
    logger.on_step_end(None, 1, {"loss": np.float32(1.5), "epoch": np.int64(0)})
    logger.on_epoch_end(None, 0, {"epoch": 0, "loss": np.float32("inf"), "val_loss": -np.inf})
    logger.on_fit_end(None, None)
    lines = path.read_text().splitlines()
    records = [json.loads(line, parse_constant=pytest.fail) for line in lines]  # no bare NaN
    assert [r["loss"] for r in records] == [None, 1.5, None]
    assert records[1]["epoch"] == 0 and type(records[1]["epoch"]) is int
    assert records[2]["val_loss"] is None


def test_jsonl_logger_ends_an_unfinished_last_line_before_appending(tmp_path):
    # (a process killed while writing a line left it without its newline: the next fit's first
    # record was glued to it, and a reader lost both)
    path = tmp_path / "m.jsonl"
    path.write_text('{"event": "step", "step": 0}\n{"event": "st')
    _trainer().fit(_data(), epochs=1, batch_size=8, callbacks=[JSONLLogger(path)])
    lines = path.read_text().splitlines()
    assert lines[:2] == ['{"event": "step", "step": 0}', '{"event": "st']
    records = [json.loads(line) for line in lines[2:]]
    assert [r["event"] for r in records] == ["step"] * 5 + ["epoch"]


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_jsonl_logger_writes_to_a_pipe():
    # (as to /dev/stdout under `| tee`: a stream with no position to look back from)
    read_end, write_end = os.pipe()
    try:
        logger = JSONLLogger(f"/dev/fd/{write_end}")
        logger.on_fit_start(None)
        logger.on_step_end(None, 3, {"loss": 0.5, "epoch": 0})
        logger.on_fit_end(None, None)
        os.close(write_end)
        write_end = None
        with os.fdopen(read_end, "rb") as f:
            read_end = None
            (record,) = [json.loads(line) for line in f.read().splitlines()]
    finally:
        for fd in (read_end, write_end):
            if fd is not None:
                os.close(fd)
    assert record["step"] == 3 and record["loss"] == 0.5


def test_a_callback_failing_at_fit_start_ends_those_already_started(tmp_path):
    class Fails(Callback):
        def on_fit_start(self, trainer):
            raise RuntimeError("no start")

    first, logger = _Record(), JSONLLogger(tmp_path / "m.jsonl")
    tr = _trainer()
    with pytest.raises(RuntimeError, match="no start"):
        tr.fit(_data(), batch_size=8, callbacks=[first, logger, Fails(), _Record()])
    assert first.calls == [("start",), ("end", 0)]
    assert logger._file is None  # closed, not left open
    assert tr.versions == {"stage0": 0, "stage1": 0, "stage2": 0}


def _tensorboard_scalars(logdir):
    """(tag, step, value) of the scalars of the event files in ``logdir`` (records: length,
    its crc, the Event protobuf, its crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(logdir)):
        data = (logdir / name).read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboardX")
    tr = _trainer()
    hist = tr.fit(_data(), epochs=2, batch_size=8, callbacks=[TensorBoardLogger(tmp_path)])
    scalars = _tensorboard_scalars(tmp_path)
    losses = [(s, v) for t, s, v in scalars if t == "train/loss"]
    assert [s for s, _ in losses] == list(range(10))
    np.testing.assert_allclose([v for _, v in losses], hist.losses, rtol=1e-6)
    epochs = [(s, v) for t, s, v in scalars if t == "epoch/loss"]
    assert [s for s, _ in epochs] == [0, 1]


def test_a_tensorboard_logger_reused_by_fits_keeps_every_fits_events(tmp_path):
    # (each fit opened a writer whose file was named by the second and the host: a fit
    # starting in the same second truncated the earlier one's events)
    pytest.importorskip("tensorboardX")
    tr = _trainer()
    logger = TensorBoardLogger(tmp_path)
    for _ in range(3):  # one epoch per fit, well within a second each
        tr.fit(_data(), epochs=1, batch_size=8, callbacks=[logger])
    epochs = sorted(s for t, s, _ in _tensorboard_scalars(tmp_path) if t == "epoch/loss")
    assert epochs == [0, 1, 2] and len(os.listdir(tmp_path)) == 3


def test_loggers_name_a_path_that_is_not_one():
    with pytest.raises(TypeError, match=r"^JSONLLogger: path must be a path .*, got None"):
        JSONLLogger(None)
    pytest.importorskip("tensorboardX")
    with pytest.raises(TypeError, match=r"^TensorBoardLogger: logdir must be a path .*, got 5"):
        TensorBoardLogger(5)


def test_tensorboard_logger_without_tensorboardx_fails_when_made(monkeypatch, tmp_path):
    # at construction, saying how to install it: not at the first epoch of a long fit
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # (import raises ImportError)
    with pytest.raises(ImportError, match=r"pip install 'asyncnn\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # a wrong type is a TypeError, a wrong value of the right type a ValueError, as
        # Trainer.fit's epochs and batch_size are (patience=2.0 was a ValueError)
        ({"patience": "2"}, TypeError, r"^EarlyStopping: patience must be an int >= 0, got '2'"),
        ({"patience": 1.5}, TypeError, r"patience must be an int >= 0, got 1.5 \(a float\)$"),
        ({"patience": 2.0}, TypeError, r"got 2.0 \(a float: pass 2\)$"),
        ({"patience": True}, TypeError, r"patience must be an int >= 0, got True \(a bool\)"),
        ({"patience": np.True_}, TypeError, r"patience must be an int >= 0, got .*True"),
        ({"patience": None}, TypeError, r"patience must be an int >= 0, got None"),
        ({"patience": -1}, ValueError, r"^EarlyStopping: patience must be an int >= 0, got -1$"),
        ({"min_delta": float("nan")}, ValueError, r"min_delta must be a finite number, got nan"),
        ({"min_delta": float("inf")}, ValueError, r"min_delta must be a finite number, got inf"),
        ({"min_delta": 10**400}, ValueError, r"min_delta must be a finite number, got 1000"),
        ({"min_delta": "0.1"}, TypeError, r"min_delta must be a finite number, got '0.1'"),
        ({"min_delta": True}, TypeError, r"min_delta must be a finite number, got True"),
        ({"min_delta": None}, TypeError, r"min_delta must be a finite number, got None"),
        ({"monitor": ""}, ValueError, r"monitor must be a metric's name, got ''"),
        ({"monitor": None}, TypeError, r"monitor must be a metric's name \(a str\), got None"),
        ({"monitor": 5}, TypeError, r"monitor must be a metric's name \(a str\), got 5"),
        ({"mode": "up"}, ValueError, r"mode must be 'min', 'max' or 'auto', got 'up'"),
        ({"mode": None}, TypeError, r"mode must be 'min', 'max' or 'auto', got None"),
    ],
)
def test_early_stopping_refuses_bad_settings_naming_them(kwargs, error, match):
    # (before, a NaN min_delta stopped a fit that was improving, and the others failed later
    # with a bare comparison error, or not at all)
    with pytest.raises(error, match=match):
        EarlyStopping(**kwargs)
    stop = EarlyStopping(patience=np.int64(1), min_delta=np.float32(0.5))
    assert stop.patience == 1 and type(stop.patience) is int


class _Stoppable:
    stop_training = False


@pytest.mark.parametrize(
    ("mode", "values", "stopped_epoch"),
    [
        ("min", [1.0, 1.0, 1.0, 1.0], 2),  # patience=1: the second epoch in a row without gain
        ("min", [float("nan"), 1.0, 0.9, 0.8, 0.7], None),  # improving after a NaN
        ("min", [1.0, float("nan"), 0.9, float("nan"), 0.8], None),
        ("min", [1.0, float("nan"), float("nan"), 0.5], 2),  # a NaN is no improvement
        ("max", [float("nan"), 0.1, 0.2, 0.3], None),
        ("min", [float("inf"), 1.0, 0.9], None),
    ],
)
def test_early_stopping_counts_epochs_without_improvement(mode, values, stopped_epoch):
    # (a NaN first value became the best, which nothing compares better than: a fit whose first
    # epoch diverged was stopped however it improved)
    stop, trainer = EarlyStopping(monitor="loss", patience=1, mode=mode), _Stoppable()
    for epoch, value in enumerate(values):
        stop.on_epoch_end(trainer, epoch, {"epoch": epoch, "loss": value})
        if trainer.stop_training:
            break
    assert stop.stopped_epoch == stopped_epoch and trainer.stop_training == (
        stopped_epoch is not None
    )


@pytest.mark.parametrize(
    ("every", "error"),
    [(-1, ValueError), (1.5, TypeError), (2.0, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_loggers_refuse_a_bad_every(tmp_path, every, error):
    # (a wrong type, every=2.0, was a ValueError)
    with pytest.raises(error, match=r"^JSONLLogger: every must be an int >= 0"):
        JSONLLogger(tmp_path / "m.jsonl", every=every)
    with pytest.raises(error, match=r"^TensorBoardLogger: every must be an int >= 0"):
        TensorBoardLogger(tmp_path, every=every)
    assert JSONLLogger(tmp_path / "m.jsonl", every=np.int64(3)).every == 3


def test_a_callback_failing_at_fit_end_still_lets_the_others_end(tmp_path):
    # (the callbacks after it never ended: a logger's file was left open)
    class Fails(Callback):
        def on_fit_end(self, trainer, history):
            raise RuntimeError("no end")

    logger, last = JSONLLogger(tmp_path / "m.jsonl"), _Record()
    with pytest.raises(RuntimeError, match="no end"):
        _trainer().fit(_data(), batch_size=8, callbacks=[Fails(), logger, last])
    assert logger._file is None and last.calls[-1][0] == "end"
    # the first error is raised, later ones added as notes
    with pytest.raises(RuntimeError, match="no end") as info:
        _trainer().fit(_data(), batch_size=8, callbacks=[Fails(), Fails()])
    assert len(info.value.__notes__) == 1


class _FailsAtEnd(Callback):
    def on_fit_end(self, trainer, history):
        raise RuntimeError("no end")


class _Raises(Callback):
    def __init__(self, error, at="step"):
        self.error, self.at = error, at

    def on_fit_start(self, trainer):
        if self.at == "start":
            raise self.error

    def on_step_end(self, trainer, step, logs):
        if step == 1:
            raise self.error


@pytest.mark.parametrize("at", ["step", "start"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError], ids=["ctrl-c", "error"])
def test_a_callback_failing_at_fit_end_does_not_replace_the_exception_ending_the_fit(error, at):
    # (the callback's error replaced it, the original left as its __context__: Ctrl-C in the
    # CLI came out as that error, not exit status 130)
    last = _Record()
    with pytest.raises(error) as info:
        _trainer().fit(_data(), batch_size=8,
                       callbacks=[_FailsAtEnd(), last, _Raises(error("stop"), at)])  # fmt: skip
    assert str(info.value) == "stop" and last.calls[-1][0] == "end"
    (note,) = info.value.__notes__
    assert note.startswith("_FailsAtEnd.on_fit_end raised too") and "RuntimeError: no end" in note


@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(2), policies.PipeDream(2)], ids=str
)
def test_a_fit_stopped_by_an_error_keeps_its_finished_epochs_in_the_history(policy):
    # (without epoch-end hooks, History.epochs stayed empty though two epochs had finished)
    class FailsAtStep11(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 11:
                raise RuntimeError("stop here")

    tr = _trainer(policy)
    with pytest.raises(RuntimeError, match="stop here"):
        tr.fit(_data(), epochs=4, batch_size=8, callbacks=[FailsAtStep11()])  # 5 steps an epoch
    assert tr.epochs_done == 2
    epochs = tr.history.epochs
    assert [e["epoch"] for e in epochs] == [0, 1]
    np.testing.assert_allclose(
        [e["loss"] for e in epochs],
        [np.mean(tr.history.losses[0:5]), np.mean(tr.history.losses[5:10])],
    )


class _CtrlCInANotebook(Callback):
    """Ctrl-C in a notebook after a given step: the waiting thread sets the trainer's flag,
    which fit sees before its next step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, logs):
        if step == self.step:
            trainer._interrupt.set()


def _steps(rec):
    return [c[1] for c in rec.calls if c[0] == "step"]


@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(2), policies.PipeDream(2)], ids=str
)
def test_a_fit_interrupted_between_steps_delivers_the_step_hooks_of_the_state_it_keeps(policy):
    # (the interrupt was raised before the step hooks due: callbacks saw steps 0..2 where the
    # trainer kept 4 minibatches and their 4 losses, and a resumed fit started at step 4)
    rec = _Record()
    tr = _trainer(policy)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_data(), epochs=2, batch_size=8, callbacks=[_CtrlCInANotebook(2), rec])
    kept = tr.state.minibatches
    assert _steps(rec) == list(range(kept)) and len(tr.history.losses) == kept
    assert rec.calls[-1] == ("end", kept)
    again = _Record()
    tr.fit(_data(), epochs=1, batch_size=8, callbacks=[again])
    assert _steps(again)[0] == kept


def test_a_step_hook_failing_while_a_fit_stops_is_a_note_on_what_stops_it():
    class FailsAt3(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 3:
                raise RuntimeError("no step 3")

    with pytest.raises(KeyboardInterrupt) as info:
        _trainer(policies.Sync()).fit(
            _data(), batch_size=8, callbacks=[_CtrlCInANotebook(2), FailsAt3()]
        )
    (note,) = info.value.__notes__
    assert note.startswith("a callback's on_step_end raised too") and "no step 3" in note


class _CtrlCAtEpochEnd(Callback):
    """Ctrl-C (a real SIGINT) landing in the end of a given epoch."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == self.epoch:
            signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("policy", [policies.Sync(), policies.PipeDream(2)], ids=str)
def test_ctrl_c_in_an_epoch_end_stops_the_fit_once_that_end_is_done(tmp_path, policy):
    # (the interrupt cut the epoch's end short, which the kept state counted as done: the
    # callbacks after the one it landed in never saw epoch 1 end, its checkpoint was never
    # saved, and a resumed fit went on with epoch 2)
    rec = _Record()
    tr = _trainer(policy)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_data(), epochs=3, batch_size=8, callbacks=[_CtrlCAtEpochEnd(1), rec],
               checkpoint_dir=tmp_path, checkpoint_every=1)  # fmt: skip
    assert [c[1] for c in rec.calls if c[0] == "epoch"] == [0, 1]
    assert sorted(os.listdir(tmp_path)) == ["epoch-0001", "epoch-0002"]
    assert (tr.epochs_done, tr.epoch_batches, tr.state.minibatches) == (2, 0, 10)
    assert ann.Trainer.load(tmp_path / "epoch-0002").state.minibatches == 10


@pytest.mark.parametrize("policy", [policies.Sync(), policies.PipeDream(2)], ids=str)
def test_ctrl_c_before_an_epoch_end_leaves_that_end_pending_for_the_next_fit(
    tmp_path, monkeypatch, policy
):
    # (Ctrl-C while the epoch's last minibatches settled counted the epoch as done, and its end
    # never ran: no on_epoch_end, no checkpoint, no validation in the history's row; a resumed
    # fit went on with the next epoch)
    from asyncnn import _fit

    def fit(tr, epochs, rec, folder):
        return tr.fit(_data(), epochs=epochs, batch_size=8, validation_data=_data(seed=1),
                      callbacks=[rec], checkpoint_dir=folder, checkpoint_every=1)  # fmt: skip

    straight = _Record()
    fit(_trainer(policy), 3, straight, tmp_path / "straight")
    settle = _fit._FitState._settle

    async def ctrl_c_once_settled_in_epoch_1(self, run):
        await settle(self, run)
        if self.position[0] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(_fit._FitState, "_settle", ctrl_c_once_settled_in_epoch_1)
    rec, tr = _Record(), _trainer(policy)
    with pytest.raises(KeyboardInterrupt):
        fit(tr, 3, rec, tmp_path / "ckpt")
    monkeypatch.undo()
    # epoch 1 not done: its minibatches all are, its end is pending
    assert (tr.epochs_done, tr.epoch_batches, tr.state.minibatches) == (1, 5, 10)
    assert [c[1] for c in rec.calls if c[0] == "epoch"] == [0]
    assert [e["epoch"] for e in tr.history.epochs] == [0]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch-0001"]
    tr.save(tmp_path / "stopped")
    back = ann.Trainer.load(tmp_path / "stopped")
    assert (back.epochs_done, back.epoch_batches) == (1, 5)
    again = _Record()
    hist = fit(back, 2, again, tmp_path / "ckpt")  # epoch 1's end, then epoch 2
    assert [c[0] for c in again.calls] == ["start", "epoch"] + ["step"] * 5 + ["epoch", "end"]
    ends = [c for c in straight.calls if c[0] == "epoch"]
    assert [c for c in again.calls if c[0] == "epoch"] == ends[1:]  # the same logs, loss too
    assert hist.epochs == [c[3] for c in ends[1:]]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert (back.epochs_done, back.epoch_batches, back.state.minibatches) == (3, 0, 15)
    assert_params_equal(back.params, _trainer_params(tmp_path / "straight" / "epoch-0003"))


class _RaiseInStepHook(Callback):
    """Raises in the step hook of one minibatch."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, logs):
        if step == self.step:
            raise RuntimeError(f"boom at step {step}")


@pytest.mark.parametrize("policy", [policies.Sync(), policies.PipeDream(2)], ids=str)
def test_an_error_in_the_last_step_hook_of_an_epoch_leaves_that_end_pending(tmp_path, policy):
    # (the epoch was marked ended before its last step hook ran: the hook's error lost its end
    # for good, with no on_epoch_end, no validation in the history's row and no epoch-0002
    # checkpoint, then or in the next fit, which went on with the next epoch)
    def fit(tr, epochs, callbacks, folder):
        return tr.fit(_data(), epochs=epochs, batch_size=8, validation_data=_data(seed=1),
                      callbacks=callbacks, checkpoint_dir=folder, checkpoint_every=1)  # fmt: skip

    straight = _Record()
    fit(_trainer(policy), 3, [straight], tmp_path / "straight")
    rec, tr = _Record(), _trainer(policy)
    with pytest.raises(RuntimeError, match="boom at step 9"):  # the last of epoch 1
        fit(tr, 3, [rec, _RaiseInStepHook(9)], tmp_path / "ckpt")
    # epoch 1 not done: its minibatches all are, its end is pending
    assert (tr.epochs_done, tr.epoch_batches, tr.state.minibatches) == (1, 5, 10)
    assert [c[1] for c in rec.calls if c[0] == "epoch"] == [0]
    assert [e["epoch"] for e in tr.history.epochs] == [0]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch-0001"]
    again = _Record()
    fit(tr, 2, [again], tmp_path / "ckpt")  # epoch 1's end, then epoch 2
    ends = [c for c in straight.calls if c[0] == "epoch"]
    assert [c for c in again.calls if c[0] == "epoch"] == ends[1:]  # validation included
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert (tr.epochs_done, tr.epoch_batches, tr.state.minibatches) == (3, 0, 15)


def _trainer_params(path):
    return ann.Trainer.load(path).params


def test_the_loss_of_an_epoch_resumed_mid_way_is_over_all_its_minibatches():
    # (it was the mean of the minibatches the resumed fit ran alone)
    straight = _trainer(policies.Sync()).fit(_data(), epochs=1, batch_size=8)
    tr = _trainer(policies.Sync())
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_data(), epochs=1, batch_size=8, callbacks=[_CtrlCInANotebook(2)])
    kept = tr.epoch_batches
    assert 0 < kept < 5
    hist = tr.fit(_data(), epochs=1, batch_size=8)
    assert len(hist.losses) == 5 - kept and hist.epochs == straight.epochs


def test_loggers_refuse_an_empty_path_when_made():
    # (JSONLLogger('') was taken, and failed only as the fit started, with a hint about "a part
    # of the path that is a file"; Trainer(trace='') is refused where it is given)
    with pytest.raises(ValueError, match=r"^JSONLLogger: path='' names no file: pass a file path"):
        JSONLLogger("")
    pytest.importorskip("tensorboardX")
    # (tensorboardX reads an empty logdir as its default, runs/DATE_HOST: written elsewhere)
    with pytest.raises(ValueError, match=r"^TensorBoardLogger: logdir='' names no folder"):
        TensorBoardLogger("")


@pytest.mark.parametrize("slash", ["", "/"], ids=["folder", "folder/"])
def test_a_jsonl_logger_given_a_folder_says_so_before_any_compute(tmp_path, slash):
    # (the hint read "a part of the path that is a file, not a folder?", the opposite)
    folder = tmp_path / "out"
    folder.mkdir()
    tr = _trainer(policies.Sync())
    with pytest.raises(OSError) as info:
        tr.fit(_data(), epochs=1, batch_size=8, callbacks=[JSONLLogger(f"{folder}{slash}")])
    message = str(info.value)
    assert "is a folder: give a file path in it" in message
    assert os.path.join(f"{folder}{slash}", "metrics.jsonl") in message
    assert "a part of the path that is a file" not in message
    assert tr.state.minibatches == 0


class _KerasStyle(Callback):
    def __init__(self):
        self.called = []

    def on_epoch_begin(self, trainer, epoch, logs=None):  # Keras's name: fit never calls it
        self.called.append(epoch)


class _HelperNamedOn(Callback):
    def on_step_end(self, trainer, step, logs):
        self.on_improvement(logs)

    def on_improvement(self, logs):  # a helper of the user's, named like a hook
        pass


@pytest.mark.parametrize(
    "name, nearest",
    [
        ("on_epoch_begin", "on_epoch_end"),
        ("on_epoch_start", "on_epoch_end"),  # (was on_fit_start, called once)
        ("on_train_end", "on_fit_end"),
        ("on_batch_end", "on_step_end"),  # (was on_epoch_end)
        ("on_step_ends", "on_step_end"),
        ("on_train_begin", "on_fit_start"),  # (was no guess)
        ("on_improvement", None),
    ],
)
def test_a_callback_method_named_like_a_hook_that_is_none_is_warned_of_at_the_fit(name, nearest):
    # (a Keras or Lightning hook name, or a typo, was taken and never called, without a word;
    # a warning, not an error: a subclass may name a helper of its own so)
    cls = type("Mine", (Callback,), {name: lambda self, *args, **kwargs: None})
    rec = _Record()
    tr = _trainer(policies.Sync())
    with pytest.warns(UserWarning, match=f"Mine.{name} is no Callback hook") as caught:
        tr.fit(_data(), epochs=1, batch_size=8, callbacks=[rec, cls()])
    (warning,) = [w for w in caught if "is no Callback hook" in str(w.message)]
    message = str(warning.message)
    assert message.startswith(f"callbacks: Mine.{name} is no Callback hook")
    assert warning.filename == __file__  # (at the user's fit call)
    if nearest:
        assert f": did you mean {nearest}" in message
    else:
        assert "did you mean" not in message
    assert "on_fit_start, on_step_end, on_epoch_end and on_fit_end" in message
    assert tr.state.minibatches > 0  # (the fit goes on)


@pytest.mark.parametrize(
    ("name", "hook"),
    [
        # Keras's per-batch hooks, Lightning's, an iteration: the per-step hook (on_batch_end
        # was matched by its letters to on_epoch_end, on_iteration_end to on_fit_end)
        ("on_batch_end", "on_step_end"),
        ("on_train_batch_end", "on_step_end"),
        ("on_iteration_end", "on_step_end"),
        ("on_minibatch_end", "on_step_end"),
        ("on_batch_begin", "on_step_end (fit has no hook at a step's start"),
        ("on_step_start", "on_step_end (fit has no hook at a step's start"),
        # an epoch's start has no hook of its own (on_epoch_start was matched to on_fit_start)
        ("on_epoch_begin", "on_epoch_end (fit has no hook at an epoch's start"),
        ("on_epoch_start", "on_epoch_end (fit has no hook at an epoch's start"),
        ("on_train_epoch_end", "on_epoch_end"),
        ("on_validation_end", "on_epoch_end"),  # (fit validates at each epoch's end)
        # the whole fit's start and end (on_train_begin had no guess, on_train_start and
        # on_train_batch_start were matched to on_fit_start alike)
        ("on_train_begin", "on_fit_start"),
        ("on_train_start", "on_fit_start"),
        ("on_fit_begin", "on_fit_start"),  # (was on_fit_end)
        ("on_begin", "on_fit_start"),
        ("on_train_end", "on_fit_end"),
        ("on_training_end", "on_fit_end"),
        ("on_end", "on_fit_end"),
        # typos: by their letters, a misspelt word too
        ("on_step_ends", "on_step_end"),
        ("on_epoc_end", "on_epoch_end"),
        ("on_fit_strat", "on_fit_start"),
        ("on_fitstart", "on_fit_start"),
        # what fit never does, and a helper's own name: no guess
        ("on_test_end", None),  # (was on_step_end)
        ("on_predict_batch_end", None),  # (was on_epoch_end)
        ("on_improvement", None),
        ("on_save_checkpoint", None),
    ],
)
def test_a_misnamed_hook_is_matched_to_the_hook_of_its_meaning(name, hook):
    from asyncnn._callbacks import HOOKS, suggest_hook

    guess = suggest_hook(name)
    if hook is None:
        assert guess is None
    else:
        assert guess is not None and guess.startswith(hook), guess
        assert guess.split(" ")[0] in HOOKS
    assert HOOKS == ("on_fit_start", "on_step_end", "on_epoch_end", "on_fit_end")


def test_a_misnamed_hook_of_a_base_class_is_named_with_its_class():
    class Sub(_KerasStyle):
        def on_epoch_end(self, trainer, epoch, logs):
            pass

    with pytest.warns(UserWarning, match=r"^callbacks: _KerasStyle.on_epoch_begin is no Callback"):
        _trainer(policies.Sync()).fit(_data(), epochs=1, batch_size=8, callbacks=[Sub()])


def test_callbacks_own_methods_and_helpers_not_named_on_are_not_warned_of(tmp_path):
    class Helped(_Record):
        def best_so_far(self):  # a helper: any name not starting with on_
            return None

        def _on_private(self):  # private: not taken for a hook
            return None

    rec = Helped()
    loggers = [JSONLLogger(tmp_path / "m.jsonl"), EarlyStopping(monitor="loss", patience=5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = _trainer(policies.Sync()).fit(
            _data(), epochs=1, batch_size=8, callbacks=[rec, *loggers]
        )
    assert not [w for w in caught if "is no Callback hook" in str(w.message)]
    assert len(hist.epochs) == 1 and rec.calls[-1] == ("end", 5)
    with pytest.warns(UserWarning, match=r"_HelperNamedOn.on_improvement is no Callback hook"):
        _trainer().fit(_data(), epochs=1, batch_size=8, callbacks=[_HelperNamedOn()])
