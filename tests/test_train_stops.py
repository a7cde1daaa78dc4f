"""What a Trainer keeps when fit stops early (an error, Ctrl-C), and how it resumes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_equal, chain_graph, classification_data
from _train_cases import _data, _trainer


@pytest.mark.parametrize("policy", [policies.Sync(), policies.GPipe(2)], ids=["sync", "gpipe"])
def test_a_failing_minibatch_keeps_the_earlier_updates(policy):
    data = _data()
    bad = {"x": data["x"], "y": data["y"].copy()}
    bad["y"][27] = 7  # minibatch 3 (rows 24..31) has a label the loss has no class for
    tr = _trainer(policy)
    with pytest.raises(ann.ActorError, match="loss"):
        tr.fit(bad, epochs=1, batch_size=8, check_data=False)
    assert tr.state.minibatches == 3
    assert tr.versions == {"stage0": 3, "stage1": 3, "stage2": 3}
    assert (tr.epochs_done, tr.epoch_batches) == (0, 3)
    assert len(tr.history.losses) == 3
    reference = _trainer(policy)
    reference.fit({k: v[:24] for k, v in data.items()}, epochs=1, batch_size=8)
    assert_params_equal(tr.params, reference.params)
    assert tr.history.losses == reference.history.losses


class _Interrupt(ann.callbacks.Callback):
    """Ctrl-C, as fit sees it, after a given step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, logs):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("policy", [policies.Sync(), policies.OneFOneB(3)], ids=["sync", "1f1b"])
def test_an_interrupted_fit_resumes_bit_identically(tmp_path, policy):
    data = _data()
    straight = _trainer(policy)
    straight.fit(data, epochs=3, batch_size=8, shuffle=True)

    tr = _trainer(policy)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(data, epochs=3, batch_size=8, shuffle=True, callbacks=[_Interrupt(7)])
    # step 7 reported its loss once step 8 was admitted: the kept state is after 7 or 8
    assert tr.state.minibatches in (8, 9) and set(tr.versions.values()) == {tr.state.minibatches}
    assert tr.epochs_done == 1 and tr.epoch_batches == tr.state.minibatches - 5
    tr.save(str(tmp_path / "ckpt"))
    resumed = ann.Trainer.load(str(tmp_path / "ckpt"))
    assert resumed.epoch_batches == tr.epoch_batches
    resumed.fit(data, epochs=2, batch_size=8, shuffle=True)  # finishes epoch 1, then epoch 2
    assert resumed.epochs_done == 3 and resumed.epoch_batches == 0
    assert_params_equal(resumed.params, straight.params)


def test_an_interrupted_pipedream_fit_keeps_each_layers_last_update():
    data = _data()
    tr = _trainer(policies.PipeDream(2))
    with pytest.raises(KeyboardInterrupt):
        tr.fit(data, epochs=2, batch_size=8, callbacks=[_Interrupt(3)])
    v = tr.versions
    # each layer's weights are those of its own last update, whatever the versions at the
    # interrupt: a layer's n-th update applies microbatch n-1 (of 4 rows) at the versions
    # 1F1B's order fixes, so they are those of the layer in a fit of just those n microbatches
    rows = {k: np.concatenate([d, d]) for k, d in data.items()}  # the 2 epochs, in order
    kept = tr.params
    for name, n in v.items():
        reference = _trainer(policies.PipeDream(1))
        reference.fit({k: d[: 4 * n] for k, d in rows.items()}, epochs=1, batch_size=4)
        assert reference.versions[name] == n
        assert_params_equal({name: kept[name]}, {name: reference.params[name]})
    # each layer after its own last update (2 per minibatch); the counters stop at the first
    # minibatch whose loss was not known
    assert all(n >= 2 * 3 for n in v.values()) and len(tr.history.losses) == tr.state.minibatches
    # the pipeline streams: whether the epoch's last loss (minibatch 4) was known when the
    # interrupt came depends on timing, so the first epoch may or may not be complete
    before = tr.epochs_done
    assert before in (0, 1) and tr.epoch_batches == tr.state.minibatches - 5 * before
    tr.fit(_data(), epochs=1, batch_size=8)  # and it goes on from there
    assert tr.epochs_done == before + 1 and tr.epoch_batches == 0


@dataclass(frozen=True)
class _CtrlCAtLabel7(nn.CrossEntropyLoss):
    """Ctrl-C as it lands mid-minibatch: in the loss of the key holding the label 7."""

    def __call__(self, params, logits, labels):
        if (np.asarray(labels) == 7).any():
            raise KeyboardInterrupt
        return super().__call__(params, logits, labels)


@pytest.mark.parametrize("stop", ["error", "ctrl-c"])
@pytest.mark.parametrize(
    "policy", [policies.PipeDream2BW(2), policies.GPipe(2)], ids=["pipedream2bw", "gpipe"]
)
def test_a_fit_stopped_mid_minibatch_keeps_no_part_of_it_and_resumes_bit_identically(policy, stop):
    # (PipeDream2BW kept each layer's half-summed gradient of the unfinished minibatch 3 and
    # its layers after different minibatches; the next fit added the half-sum into another
    # minibatch's update)
    data = _data()
    bad = {"x": data["x"], "y": data["y"].copy()}
    bad["y"][29] = 7  # the second key (rows 28..31) of minibatch 3 stops the fit

    def trainer():
        loss = _CtrlCAtLabel7() if stop == "ctrl-c" else None
        return ann.Trainer(
            chain_graph(3, loss=loss), optimizer=optim.Adam(lr=0.01), policy=policy, seed=3
        )

    tr = trainer()
    with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else ann.ActorError):
        tr.fit(bad, epochs=1, batch_size=8, check_data=False)
    # every layer after the same minibatches, those the position counts, and no partial sum
    # (under PipeDream2BW 2 or 3 of them: whether stage 0 had applied minibatch 2 by then)
    done = tr.state.minibatches
    assert done in (2, 3) and set(tr.versions.values()) == {done}
    assert tr.state.pending_grads == {} and tr.state.keys == 2 * done
    assert (tr.epochs_done, tr.epoch_batches, len(tr.history.losses)) == (0, done, done)
    if not policy.flush:  # with the version before the latest, for the next fit's forwards
        assert sorted(tr.state.earlier_params) == sorted(tr.graph.layers)
        assert all(sorted(e) == [done - 1] for e in tr.state.earlier_params.values())
    tr.fit(data, epochs=1, batch_size=8)  # minibatches `done`.. 4
    reference = trainer()
    # as if never stopped (under PipeDream2BW the next fit's stream went on from the kept
    # state's version before the latest; it started anew, as a fit that ended after `done`
    # minibatches, its first minibatch computed at the latest weights)
    reference.fit(data, epochs=1, batch_size=8)
    assert_params_equal(tr.params, reference.params)


class _CountedRows:
    """Stands in for an h5py dataset (a numpy dtype, rows read on indexing), counting the rows
    read."""

    def __init__(self, array):
        self._array, self.shape, self.dtype = array, array.shape, array.dtype
        self.rows_read = 0

    def __getitem__(self, rows):
        out = self._array[rows]
        self.rows_read += len(out)
        return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_fit_resuming_mid_epoch_reads_only_the_minibatches_it_trains(shuffle):
    # (it read, and threw away, every minibatch the earlier fit had done: near an epoch's end,
    # the whole epoch again from an h5py file)
    class StopAt(ann.callbacks.Callback):
        def on_step_end(self, trainer, step, logs):
            trainer.stop_training = step == 3

    data = _data()
    tr = _trainer(policies.Sync())
    tr.fit(data, batch_size=8, shuffle=shuffle, callbacks=[StopAt()])
    assert (tr.epochs_done, tr.epoch_batches) == (0, 4)
    lazy = _CountedRows(data["x"])
    tr.fit({"x": lazy, "y": data["y"]}, batch_size=8, shuffle=shuffle, check_data=False)
    assert len(tr.history.losses) == 1 and lazy.rows_read == 8
    reference = _trainer(policies.Sync())
    reference.fit(data, batch_size=8, shuffle=shuffle)
    assert_params_equal(tr.params, reference.params)
    assert tr.history.losses == reference.history.losses[4:]


class _StopAfter(ann.callbacks.Callback):
    """Stops the fit (``stop_training``) at the end of a given step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, logs):
        if step == self.step:
            trainer.stop_training = True


def test_a_stopped_async_fit_keeps_the_delays_of_its_pending_gradients():
    # (the kept state carried the gradients summed and not applied, not their delays: the
    # resumed fit's first update applied them as of no delay, and SpikeCompensation corrected
    # it otherwise than the unbroken fit)
    data = classification_data(64)  # 8 minibatches: stopped after 5, two gradients pending

    def trainer():
        policy = policies.SpikeCompensation(policies.Async(2, min_update_frequency=3))
        return ann.Trainer(chain_graph(3), optimizer=optim.SGD(lr=0.1, momentum=0.5),
                           policy=policy, dtype="float64")  # fmt: skip

    tr = trainer()
    tr.fit(data, epochs=1, batch_size=8, callbacks=[_StopAfter(3)])
    # (step 3 reported its loss once step 4 was admitted: the kept state is after 5)
    assert tr.state.minibatches == 5
    assert tr.state.pending_delays == dict.fromkeys(tr.graph.layers, [1, 0])
    tr.fit(data, epochs=1, batch_size=8)  # minibatches 5..7
    straight = trainer()
    straight.fit(data, epochs=1, batch_size=8)
    assert_params_equal(tr.params, straight.params)


def test_traces_lists_only_the_trace_files_a_fit_wrote(tmp_path):
    # (a fit that failed before its trace opened listed the path anyway: a loop over
    # tr.traces then met a FileNotFoundError, and the next fit numbered its trace on)
    fcntl = pytest.importorskip("fcntl")  # (the trace's lock is flock's)
    folder = tmp_path / "runs"
    folder.mkdir()
    path = str(folder / "run.trace")
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
                     trace=path)  # fmt: skip
    data = _data()
    with open(path, "wb") as held:  # another run writing that trace: this fit is refused
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(OSError, match="is being written by another run"):
            tr.fit(data, epochs=1, batch_size=16)
    assert tr.traces == []
    os.remove(path)
    folder.rmdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tr.fit(data, epochs=1, batch_size=16)
    assert tr.traces == []
    folder.mkdir()
    tr.fit(data, epochs=1, batch_size=16)
    assert tr.traces == [path] and ann.replay(path).identical
