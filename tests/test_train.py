"""The Trainer: fit/evaluate/predict, checkpoints that resume bit-identically, progress."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_equal, chain_graph


def _data(n=40, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, features)), "y": rng.integers(0, classes, n)}


@pytest.mark.parametrize(
    "policy", [policies.OneFOneB(3), policies.PipeDream(2, stash=True)], ids=["1f1b", "pipedream"]
)
def test_checkpoint_resume_is_bit_identical(tmp_path, policy):
    data = _data()

    def trainer():
        return ann.Trainer(chain_graph(3), optimizer=optim.Adam(lr=0.01), policy=policy, seed=3)

    straight = trainer()
    straight.fit(data, epochs=1, batch_size=8, shuffle=True)
    straight.fit(data, epochs=2, batch_size=8, shuffle=True)

    first = trainer()
    first.fit(data, epochs=1, batch_size=8, shuffle=True)
    first.save(str(tmp_path / "ckpt"))
    resumed = ann.Trainer.load(str(tmp_path / "ckpt"))
    assert resumed.versions == first.versions and resumed.epochs_done == 1
    resumed.fit(data, epochs=2, batch_size=8, shuffle=True)
    assert_params_equal(resumed.params, straight.params)


def test_load_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ann.Trainer.load(str(tmp_path))


def test_evaluate_and_predict():
    data = _data(n=50)
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.Adam(lr=0.05), policy=policies.GPipe(2), dtype="float64"
    )
    before = tr.evaluate(data, batch_size=16)
    hist = tr.fit(data, epochs=30, batch_size=25)
    after = tr.evaluate(data, batch_size=16)
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]
    logits = tr.predict({"x": data["x"]}, batch_size=16)["logits"]
    assert logits.shape == (50, 3)
    assert after["accuracy"] == pytest.approx(float((logits.argmax(1) == data["y"]).mean()))
    # the last training loss, measured on the (updated) weights, is close to the evaluation
    assert abs(hist.losses[-1] - after["loss"]) < 0.2


def test_params_setter_and_errors():
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    p = tr.params
    p["stage0"][0]["bias"] = np.ones_like(p["stage0"][0]["bias"])
    tr.params = {"stage0": p["stage0"]}
    np.testing.assert_array_equal(tr.params["stage0"][0]["bias"], 1)
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        tr.params = {"nope": {}}
    with pytest.raises(TypeError, match="policies.Sync"):
        ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy="sync")


def test_progress_bar_runs(capsys):
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), progress=True
    )
    tr.fit(_data(), epochs=1, batch_size=8)
    assert "loss" in capsys.readouterr().out


def test_dropout_is_seeded_per_key_and_deterministic():
    def graph(p):
        return ann.Graph.sequential(
            [nn.Linear(5, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3)],
            loss=nn.CrossEntropyLoss(),
            stages=[3, 1],
            input_shape=(None, 5),
        )

    def train(p):
        tr = ann.Trainer(graph(p), optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2), seed=1)
        tr.fit(_data(), epochs=1, batch_size=8)
        return tr.params

    first, second, no_dropout = train(0.5), train(0.5), train(0.0)
    assert_params_equal(first, second)
    assert not np.array_equal(first["stage1"][0]["weight"], no_dropout["stage1"][0]["weight"])
    # evaluation runs without dropout: deterministic, and equal to the model without it
    tr = ann.Trainer(graph(0.5), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=1)
    tr0 = ann.Trainer(graph(0.0), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=1)
    assert tr.evaluate(_data()) == tr0.evaluate(_data())


class _Halve(ann.LayerActor):
    async def on_backward(self, key, grad, meta):
        return [g * 0.5 for g in await super().on_backward(key, grad, meta)]


@dataclass(frozen=True)
class _EveryOther(policies.OneFOneB):
    """A user policy (a subclass of a built-in): updates every second minibatch."""

    def update_due(self, backwards_since_update, minibatch_done):
        return minibatch_done and backwards_since_update == 2 * self.microbatches


def test_custom_actor_and_policy_survive_a_checkpoint(tmp_path):
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("a", nn.Linear(5, 4), x)
    h = g.layer("b", nn.Linear(4, 3), h, actor=_Halve)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=_EveryOther(2))
    tr.save(str(tmp_path / "c"))
    back = ann.Trainer.load(str(tmp_path / "c"))
    assert back.graph.nodes["b"].actor is _Halve
    assert type(back.policy) is _EveryOther and back.policy == _EveryOther(2)
    tr.fit(_data(), epochs=1, batch_size=8)
    back.fit(_data(), epochs=1, batch_size=8)
    assert tr.versions == back.versions == {"a": 2, "b": 2}  # 5 minibatches: 2 updates
    assert_params_equal(tr.params, back.params)


def test_evaluate_accuracy_counts_positions_of_sequence_labels():
    from asyncnn import ops

    @dataclass(frozen=True)
    class PerPosition(nn.Module):
        """(N, T) ids -> (N, C, T) logits: a one-hot of the id (a perfect copy model)."""

        def __call__(self, params, x, *, rng=None):
            onehot = (x[:, None, :] == np.arange(3)[None, :, None]).astype(np.float64)
            return ops.multiply(onehot, 10.0)

    g = ann.Graph()
    x = g.input("x", shape=(None, 4), dtype="int64")
    y = g.input("y", shape=(None, 4), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("m", PerPosition(), x), y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    ids = np.array([[0, 1, 2, 0], [1, 1, 0, 2]])
    labels = ids.copy()
    labels[0, 0] = 2  # one wrong position of 8
    assert tr.evaluate({"x": ids, "y": labels})["accuracy"] == pytest.approx(7 / 8)


def test_a_resumed_trainer_numbers_its_traces_on(tmp_path):
    path = str(tmp_path / "run.trace")
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=path
    )
    tr.fit(_data(), epochs=1, batch_size=8)
    tr.save(str(tmp_path / "ckpt"))
    resumed = ann.Trainer.load(str(tmp_path / "ckpt"), trace=path)
    resumed.fit(_data(), epochs=1, batch_size=8)
    assert resumed.traces == [path, str(tmp_path / "run.1.trace")]
    assert ann.trace.read(resumed.traces[1]).header["start"]["minibatches"] == 5


def test_a_trace_path_that_cannot_be_written_is_refused_when_the_trainer_is_made(tmp_path):
    # (it was taken, and refused only when the first fit started)
    (tmp_path / "a-file").write_text("not a folder")

    def trainer(trace):
        return ann.Trainer(
            chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=trace
        )

    for path, error, why in [
        (tmp_path / "missing" / "run.trace", FileNotFoundError, "' does not exist"),
        (tmp_path / "a-file" / "run.trace", NotADirectoryError, "a-file' is a file"),
        (tmp_path, IsADirectoryError, "it is a folder"),
    ]:
        with pytest.raises(error, match=re.escape(f"cannot write the trace {str(path)!r}: ")) as e:
            trainer(path)
        assert why in str(e.value) and "Pass trace= a file path in an existing folder" in str(
            e.value
        )
    with pytest.raises(ValueError, match="trace='' names no file"):
        trainer("")
    good = str(tmp_path / "run.trace")
    tr = trainer(good)
    assert not os.path.exists(good)  # created (or emptied) by the fit, not here
    with pytest.raises(FileNotFoundError, match="trace="):
        tr.trace = str(tmp_path / "missing" / "run.trace")
    assert tr.trace == good  # the refused path is not taken


# -- what fit keeps when it stops early ----------------------------------------------------------


def _trainer(policy, seed=3):
    return ann.Trainer(chain_graph(3), optimizer=optim.Adam(lr=0.01), policy=policy, seed=seed)


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
    tr = _trainer(policies.PipeDream(2))
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_data(), epochs=2, batch_size=8, callbacks=[_Interrupt(3)])
    v = tr.versions
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
    tr.fit(data, epochs=1, batch_size=8)  # minibatches `done`.. 4
    reference = trainer()
    if policy.flush:  # as if never stopped
        reference.fit(data, epochs=1, batch_size=8)
    else:  # a stream restarts with each fit: as a fit that ended after `done` minibatches
        reference.fit({k: v[: 8 * done] for k, v in data.items()}, epochs=1, batch_size=8)
        reference.fit({k: v[8 * done :] for k, v in data.items()}, epochs=1, batch_size=8)
    assert_params_equal(tr.params, reference.params)


def test_fit_checks_the_data_first():
    data = _data()
    tr = _trainer(policies.Sync())
    nan = {"x": data["x"].copy(), "y": data["y"]}
    nan["x"][5, 2] = np.nan
    with pytest.raises(ValueError, match="input 'x' contains NaN or Inf, first in row 5: "):
        tr.fit(nan, batch_size=8)
    nan["x"][3, 0] = np.inf
    with pytest.raises(ValueError, match=r"first in row 3: .*check_data=False"):
        tr.fit(nan, batch_size=8)
    nan["x"][3, 0] = 0.0
    labels = {"x": data["x"], "y": data["y"].copy()}
    labels["y"][13] = 3
    with pytest.raises(ValueError, match=r"input 'y': label 3 at row 13 .*3 classes.* 0\.\.2"):
        tr.fit(labels, batch_size=8)
    with pytest.raises(ValueError, match="label -1 at row 0"):
        tr.fit({"x": data["x"], "y": -np.ones(40, dtype=np.int64)}, batch_size=8)
    with pytest.raises(ValueError, match="validation_data needs the input 'y'"):
        tr.fit(data, batch_size=8, validation_data={"x": data["x"]})
    assert tr.versions == {"stage0": 0, "stage1": 0, "stage2": 0}  # nothing ran
    tr.fit(nan, batch_size=40, check_data=False)  # the switch skips the checks
    assert np.isnan(tr.history.losses[0])


def test_predict_and_evaluate_name_a_missing_input():
    data = _data()
    tr = _trainer(policies.Sync())
    with pytest.raises(ValueError, match=r"predict needs the input 'x' \(for 'stage2'\)"):
        tr.predict({"y": data["y"]})
    with pytest.raises(ValueError, match=r"evaluate needs the input 'y' \(for 'loss'\)"):
        tr.evaluate({"x": data["x"]})
    with pytest.raises(ValueError, match=r"the data has \['z'\]"):
        tr.predict({"x": data["x"], "z": data["x"]})


def test_params_assignment_is_checked_against_the_graph():
    tr = _trainer(policies.Sync())
    p = tr.params
    wrong = [dict(p["stage0"][0], weight=np.zeros((6, 5))), {}]
    with pytest.raises(ValueError, match=r"tr.params\['stage0'\]\[0\]\['weight'\] has shape"):
        tr.params = {"stage0": wrong}
    with pytest.raises(ValueError, match="must be a list of 2 entries"):
        tr.params = {"stage0": [p["stage0"][0]]}
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        tr.params = {"stage0": [{"weight": p["stage0"][0]["weight"]}, {}]}
    with pytest.raises(ValueError, match="dtype <U1"):
        tr.params = {"stage0": [dict(p["stage0"][0], bias=np.full(6, "a")), {}]}
    assert_params_equal(tr.params, p)  # nothing was assigned


def test_params_and_data_may_be_torch_tensors():
    # (each failed with "Cannot interpret 'torch.float64' as a data type", naming nothing)
    torch = pytest.importorskip("torch")
    data = _data()
    tr = _trainer(policies.Sync())
    given = {"stage0": [{k: torch.tensor(v) + 1 for k, v in tr.params["stage0"][0].items()}, {}]}
    tr.params = given
    np.testing.assert_array_equal(tr.params["stage0"][0]["bias"], given["stage0"][0]["bias"])
    given["stage0"][0]["bias"] = torch.zeros(6, requires_grad=True)
    with pytest.raises(ValueError, match=r"\['bias'\] \(Tensor\) cannot be read as an array"):
        tr.params = given
    as_torch = {k: torch.tensor(v) for k, v in data.items()}
    a, b = _trainer(policies.Sync()), _trainer(policies.Sync())
    losses = a.fit(as_torch, batch_size=8, shuffle=True).losses
    assert losses == b.fit(data, batch_size=8, shuffle=True).losses
    assert a.evaluate(as_torch) == b.evaluate(data)
    np.testing.assert_array_equal(
        a.predict({"x": as_torch["x"]})["logits"], b.predict({"x": data["x"]})["logits"]
    )


def test_history_repr_is_short():
    tr = _trainer(policies.Sync())
    hist = tr.fit(_data(n=400), epochs=5, batch_size=8, validation_data=_data())
    assert len(hist.losses) == 250 and len(hist.epochs) == 5
    text = repr(hist)
    assert len(text) < 200 and text.startswith("History(250 minibatches, 5 epochs, loss")
    assert "val_loss" in text and "val_accuracy" in text


def test_a_cluster_fit_refuses_what_needs_weights_during_the_fit():
    with ann.cluster.LocalCluster(workers=1) as cluster:
        tr = ann.Trainer(
            chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), cluster=cluster
        )
        with pytest.raises(ValueError, match="with a cluster, call fit one epoch at a time"):
            tr.fit(_data(), validation_data=_data())


def test_plain_text_progress_where_rich_cannot_draw(monkeypatch, capsys):
    from asyncnn import _fit

    monkeypatch.setattr(_fit, "_plain_progress", lambda: True)
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), progress=True
    )
    tr.fit(_data(), epochs=1, batch_size=8)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("train 5/5  loss ") and lines[-1].endswith("samples/s")


def test_predict_and_evaluate_check_shapes_dtypes_labels_and_rows():
    data = _data()
    tr = _trainer(policies.Sync())
    # one row without its batch dimension: was broadcast into a wrong answer, silently
    with pytest.raises(ValueError, match=r"predict: input 'x': got shape \(5,\), .* \(None, 5\)"):
        tr.predict({"x": data["x"][0]})
    with pytest.raises(ValueError, match=r"evaluate: input 'x': got shape \(40, 4\)"):
        tr.evaluate({"x": data["x"][:, :4], "y": data["y"]})
    with pytest.raises(ValueError, match=r"evaluate: input 'y' is declared int64 but got float64"):
        tr.evaluate({"x": data["x"], "y": data["y"].astype(float)})
    with pytest.raises(ValueError, match=r"input 'y': label 7 at row 2 .* 0\.\.2"):
        tr.evaluate({"x": data["x"], "y": np.where(np.arange(40) == 2, 7, data["y"])})
    with pytest.raises(ValueError, match="evaluate: the data has 0 rows"):  # was ZeroDivisionError
        tr.evaluate({"x": data["x"][:0], "y": data["y"][:0]})
    with pytest.raises(ValueError, match="predict: the data has 0 rows"):
        tr.predict({"x": data["x"][:0]})


@pytest.mark.parametrize("on_gpu", [False, True], ids=["host-ids", "gpu-like-ids"])
def test_predict_checks_embedding_ids_as_fit_and_evaluate_do(monkeypatch, on_gpu):
    # (the layer's IndexError named the op, not the input; GPU ids gave a NaN row silently)
    from asyncnn._math import _ops_nn

    if on_gpu:  # ids the layer does not read back, as on a GPU: a bad id's row comes out NaN
        monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)
    g = ann.Graph.sequential(
        [nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2)], loss=nn.CrossEntropyLoss(),
        input_shape=(None, 4), input_dtype="int64",
    )  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    x = np.arange(40).reshape(10, 4) % 10
    x[7, 3] = 10
    want = (
        r"input 'x': id 10 at index \(7, 3\) is out of range for layer 'stage0' "
        r"\(Embedding\(num_embeddings=10, embedding_dim=3\)\): ids must be in 0\.\.9"
    )
    with pytest.raises(ValueError, match=want):
        tr.predict({"x": x}, batch_size=4)
    with pytest.raises(ValueError, match=want):
        tr.evaluate({"x": x, "y": np.zeros(10, np.int64)}, batch_size=4)
    x[7, 3] = 0
    # labels predict does not need are not checked (-1: no label yet)
    logits = tr.predict({"x": x, "y": -np.ones(10, np.int64)})["logits"]
    assert logits.shape == (10, 2) and np.isfinite(logits).all()


def test_predict_refuses_a_graph_without_outputs():
    # (it returned {}, having computed nothing)
    g = ann.Graph()
    x, y = g.input("x", shape=(None, 5)), g.input("y", shape=(None,), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("l", nn.Linear(5, 3), x), y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    with pytest.raises(ValueError, match=r"no outputs; name them: g\.output\(name, node\)"):
        tr.predict({"x": _data()["x"]})


def test_an_array_dataset_goes_wherever_a_dict_of_arrays_does():
    data = _data()
    ds = ann.data.ArrayDataset(data)
    tr = _trainer(policies.Sync())
    hist = tr.fit(ds, batch_size=8, validation_data=ds)
    assert hist.metrics["val_loss"] == [tr.evaluate(data)["loss"]] == [tr.evaluate(ds)["loss"]]
    np.testing.assert_array_equal(
        tr.predict(ann.data.ArrayDataset({"x": data["x"]}))["logits"],
        tr.predict({"x": data["x"]})["logits"],
    )
    with pytest.raises(ValueError, match=r"evaluate needs the input 'y'"):
        tr.evaluate(ann.data.ArrayDataset({"x": data["x"]}))


def test_fit_refuses_arguments_that_would_train_nothing_or_misread():
    data = _data()
    tr = _trainer(policies.Sync())
    with pytest.raises(ValueError, match="batch_size=64 with drop_last=True leaves no minibatch"):
        tr.fit(data, batch_size=64, drop_last=True)
    with pytest.raises(TypeError, match="epochs must be an int, got float 1.5"):
        tr.fit(data, epochs=1.5, batch_size=8)
    with pytest.raises(TypeError, match=r"pass callbacks=\[EarlyStopping\(...\)\]"):
        tr.fit(data, batch_size=8, callbacks=ann.callbacks.EarlyStopping(monitor="loss"))
    with pytest.raises(ValueError, match=r"validation_data: input 'x': got shape \(40, 4\)"):
        tr.fit(data, batch_size=8, validation_data={"x": data["x"][:, :4], "y": data["y"]})
    assert tr.versions == {"stage0": 0, "stage1": 0, "stage2": 0}  # nothing ran


def test_fit_checks_its_checkpoint_arguments_before_training(tmp_path):
    # (a file as checkpoint_dir failed only once the first epoch had trained)
    data = _data()
    tr = _trainer(policies.Sync())
    file = tmp_path / "ckpt"
    file.write_text("not a folder")
    with pytest.raises(ValueError, match=r"checkpoint_dir '.*ckpt' is a file: name a folder"):
        tr.fit(data, batch_size=8, checkpoint_dir=file, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"keep_checkpoints \(0: keep all\) must be >= 0, got -1"):
        tr.fit(data, batch_size=8, checkpoint_dir=tmp_path / "d", checkpoint_every=1,
               keep_checkpoints=-1)  # fmt: skip
    for every, error in [(1.5, "got float 1.5"), ("2", "got str '2'"), (True, "got bool True")]:
        # (1.5 saved whenever (epoch + 1) % 1.5 == 0; "2" failed comparing a str to an int)
        with pytest.raises(TypeError, match=f"checkpoint_every must be an int, {error}"):
            tr.fit(data, batch_size=8, checkpoint_dir=tmp_path / "d", checkpoint_every=every)
    assert tr.versions == {"stage0": 0, "stage1": 0, "stage2": 0}  # nothing ran
    tr.fit(data, epochs=2, batch_size=8, checkpoint_dir=tmp_path / "d",
           checkpoint_every=np.int64(2), callbacks=None)  # fmt: skip
    assert os.listdir(tmp_path / "d") == ["epoch-0002"]


class _Starts(ann.callbacks.Callback):
    def __init__(self, fail_at_step=None):
        self.started = False
        self.fail_at_step = fail_at_step

    def on_fit_start(self, trainer):
        self.started = True

    def on_step_end(self, trainer, step, logs):
        if step == self.fail_at_step:
            raise RuntimeError("stop mid-epoch")


def test_fit_takes_numpy_ints_and_bools_and_saves_them_as_json(tmp_path):
    # (they went into fit.json's epoch layout as they came: the save of a fit stopped mid-epoch
    # failed, "Object of type int64 is not JSON serializable", leaving fit.json.tmp behind)
    data = _data()
    tr = _trainer(policies.Sync())
    with pytest.raises(RuntimeError, match="stop mid-epoch"):
        tr.fit(data, epochs=2, batch_size=np.int64(8), shuffle=np.True_, drop_last=np.False_,
               callbacks=[_Starts(fail_at_step=2)])  # fmt: skip
    assert tr.epoch_batches > 0
    tr.save(tmp_path / "c")
    assert "fit.json.tmp" not in os.listdir(tmp_path / "c")
    layout = json.loads((tmp_path / "c" / "fit.json").read_text())["epoch_layout"]
    assert (layout["batch_size"], layout["shuffle"], layout["drop_last"]) == (8, True, False)
    assert ann.Trainer.load(tmp_path / "c").epoch_batches == tr.epoch_batches
    # a bad value is refused before any callback starts
    for kwargs, error in [
        ({"shuffle": "no"}, "shuffle must be True or False, got str 'no'"),
        ({"drop_last": 1}, "drop_last must be True or False, got int 1"),
        ({"batch_size": 8.0}, "batch_size must be an int, got float 8.0"),
    ]:
        cb = _Starts()
        with pytest.raises(TypeError, match=error):
            tr.fit(data, **{"batch_size": 8, **kwargs}, callbacks=[cb])
        assert not cb.started


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    tr = _trainer(policies.Sync())
    tr.fit(_data(), epochs=1, batch_size=8)
    replace = os.replace

    def full_disk(src, dst):
        if os.path.basename(dst) == "fit.json":
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tr.save(tmp_path / "c")
    assert "fit.json.tmp" not in os.listdir(tmp_path / "c")
    tr.epoch_batches, tr._epoch_layout = 1, {"rows": object()}  # what JSON cannot hold
    with pytest.raises(TypeError, match="not JSON serializable"):
        tr.save(tmp_path / "d")
    assert not os.path.exists(tmp_path / "d")  # refused before anything was written


def test_evaluate_reports_accuracy_only_for_class_index_labels():
    # (it reported accuracy whenever the labels given were integers: argmax of (N,) against
    # (N, 1) labels broadcast to an "accuracy" of 9.0 for a regression, into val_accuracy)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5))
    regression = ann.Graph.sequential(
        [nn.Linear(5, 1)], loss=nn.MSELoss(), stages=1, input_shape=(None, 5),
        label_shape=(None, 1), label_dtype="float32",
    )  # fmt: skip
    tr = ann.Trainer(regression, optimizer=optim.SGD(lr=0.01), policy=policies.Sync())
    data = {"x": x, "y": rng.integers(0, 5, (40, 1))}
    assert set(tr.evaluate(data)) == {"loss"}
    hist = tr.fit(data, batch_size=8, validation_data=data)
    assert set(hist.metrics) == {"loss", "val_loss"}

    @dataclass(frozen=True)
    class ColumnOfLabels(nn.CrossEntropyLoss):
        """Labels (N, 1): the argmax (N,) has another shape, so there is no accuracy."""

        def __call__(self, params, logits, labels, *, rng=None):
            return super().__call__(params, logits, labels[:, 0])

    column = ann.Graph.sequential(
        [nn.Linear(5, 3)], loss=ColumnOfLabels(), stages=1, input_shape=(None, 5),
        label_shape=(None, 1),
    )  # fmt: skip
    tr = ann.Trainer(column, optimizer=optim.SGD(lr=0.01), policy=policies.Sync())
    assert set(tr.evaluate({"x": x, "y": rng.integers(0, 3, (40, 1))})) == {"loss"}


def test_check_batch_reads_a_large_input_in_bounded_chunks(monkeypatch):
    # (isfinite(arr).all() made a mask of the whole input: 25 GB for a 100 GB memory map)
    import tracemalloc

    from asyncnn._runtime import _checks

    g = ann.Graph.sequential(
        [nn.Linear(1000, 3)], loss=nn.CrossEntropyLoss(), stages=1, input_shape=(None, 1000)
    )
    big = {"x": np.broadcast_to(np.float32(1), (25_000, 1000)), "y": np.zeros(25_000, int)}
    tracemalloc.start()
    try:
        assert _checks.check_batch(g, big, check_finite=True) == 25_000  # 100 MB, none held
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB to check 100 MB"
    # the first bad row is found across chunks of rows
    monkeypatch.setattr(_checks, "_FINITE_CHUNK_BYTES", 3 * 1000 * 4)  # 3 rows at a time
    x = np.ones((10, 1000), np.float32)
    x[7, 999], x[8, 0] = np.inf, np.nan
    with pytest.raises(ValueError, match="input 'x' contains NaN or Inf, first in row 7"):
        _checks.check_batch(g, {"x": x, "y": np.zeros(10, int)}, check_finite=True)


def test_check_labels_reads_large_labels_in_bounded_chunks(monkeypatch):
    # (the range check made masks of the whole label array: memory the size of the labels)
    import tracemalloc

    from asyncnn._datacheck import check_labels
    from asyncnn._runtime import _checks

    g = ann.Graph.sequential(
        [nn.Linear(4, 3)], loss=nn.CrossEntropyLoss(), stages=1, input_shape=(None, 4)
    )
    shapes = {"stage0": (2, 3)}
    big = {"y": np.broadcast_to(np.int64(1), (25_000_000,))}  # 200 MB, none held
    tracemalloc.start()
    try:
        check_labels(g, shapes, big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MB to check 200 MB of labels"
    # the first bad row (and its value) is found across chunks of rows
    monkeypatch.setattr(_checks, "_FINITE_CHUNK_BYTES", 3 * 8)  # 3 rows at a time
    y = np.zeros(10, np.int64)
    y[7], y[8] = 5, -1
    with pytest.raises(ValueError, match=r"input 'y': label 5 at row 7 .*labels must be in 0\.\.2"):
        check_labels(g, shapes, {"y": y})
    y2 = np.zeros((10, 2), np.int64)
    y2[7, 1] = 3
    with pytest.raises(ValueError, match=r"label 3 at index \(7, 1\) "):
        check_labels(g, shapes, {"y": y2})
    check_labels(g, shapes, {"y": np.zeros(0, np.int64)})  # no rows: nothing to check


# -- checkpoint_dir of an earlier run; resuming with another epoch layout ------------------------


def test_checkpoint_every_refuses_a_folder_holding_another_runs_later_checkpoints(tmp_path):
    # rotation kept the earlier run's epoch-0004 and epoch-0005 and deleted each checkpoint this
    # run had just written: it ended with none of its own
    data = _data()
    earlier = _trainer(policies.Sync())
    earlier.fit(data, epochs=5, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1,
                keep_checkpoints=2)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["epoch-0004", "epoch-0005"]
    fresh = _trainer(policies.Sync())
    with pytest.raises(
        ValueError,
        match=rf"checkpoint_dir '{re.escape(str(tmp_path))}' holds epoch-0004, epoch-0005, saved after more than "
        r"the 0 epochs this trainer has done",
    ):
        fresh.fit(data, epochs=2, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1,
                  keep_checkpoints=2)  # fmt: skip
    assert fresh.versions == {"stage0": 0, "stage1": 0, "stage2": 0}  # refused before training
    assert sorted(os.listdir(tmp_path)) == ["epoch-0004", "epoch-0005"]
    # resuming the latest goes on in the same folder, rotating out the oldest
    resumed = ann.Trainer.load(tmp_path / "epoch-0005")
    resumed.fit(data, epochs=2, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1,
                keep_checkpoints=2)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["epoch-0006", "epoch-0007"]
    assert ann.Trainer.load(tmp_path / "epoch-0007").state.minibatches == 35


def test_checkpoint_rotation_counts_epochs_as_numbers_and_keeps_what_it_wrote(tmp_path):
    # by name, epoch-10000 sorted before epoch-9999 and was deleted as the oldest
    data = _data()
    tr = _trainer(policies.Sync())
    tr.epochs_done = 9999
    tr.save(tmp_path / "epoch-9999")
    (tmp_path / "epoch-0007").mkdir()  # not a checkpoint: rotation leaves it alone
    (tmp_path / "epoch-0007" / "notes.txt").write_text("mine")
    tr.fit(data, epochs=2, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1,
           keep_checkpoints=1)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["epoch-0007", "epoch-10001"]
    assert ann.Trainer.load(tmp_path / "epoch-10001").epochs_done == 10001
    assert (tmp_path / "epoch-0007" / "notes.txt").read_text() == "mine"


def _interrupted_at_3(shuffle=False):
    """A Sync trainer whose first fit (batches of 8 of 40 rows) failed in minibatch 3."""
    data = _data()
    bad = {"x": data["x"], "y": data["y"].copy()}
    # a label the loss has no class for in minibatch 3 (rows 24..31 of the epoch's order)
    row = ann.data.epoch_permutation(40, 3, 0)[27] if shuffle else 27
    bad["y"][row] = 7
    tr = _trainer(policies.Sync())
    with pytest.raises(ann.ActorError, match="loss"):
        tr.fit(bad, epochs=1, batch_size=8, shuffle=shuffle, check_data=False)
    assert (tr.epochs_done, tr.epoch_batches, tr.state.minibatches) == (0, 3, 3)
    return tr, data


@pytest.mark.parametrize("through_a_checkpoint", [False, True], ids=["in-memory", "saved"])
def test_resuming_with_another_batch_size_starts_the_epoch_over(tmp_path, through_a_checkpoint):
    # it skipped the first 3 minibatches of 4 rows (rows 0..11) and ran 7: rows 12..23, already
    # trained in minibatches of 8, were trained twice and rows 0..11 once
    tr, data = _interrupted_at_3()
    if through_a_checkpoint:
        tr.save(tmp_path / "ckpt")
        tr = ann.Trainer.load(tmp_path / "ckpt")
        assert tr.epoch_batches == 3
    tr.fit(data, epochs=1, batch_size=4)
    assert tr.state.minibatches == 3 + 10 and len(tr.history.losses) == 10
    assert (tr.epochs_done, tr.epoch_batches) == (1, 0)
    reference = _trainer(policies.Sync())  # the 3 minibatches of 8, then a whole epoch of 4
    reference.fit({k: v[:24] for k, v in data.items()}, epochs=1, batch_size=8)
    reference.fit(data, epochs=1, batch_size=4)
    assert_params_equal(tr.params, reference.params)


@pytest.mark.parametrize(
    "change",
    [{"data": 48}, {"shuffle": True}, {"drop_last": True}, {"seed": 4}],
    ids=["rows", "shuffle", "drop_last", "seed"],
)
def test_resuming_with_another_epoch_layout_starts_the_epoch_over(tmp_path, change):
    tr, data = _interrupted_at_3(shuffle="seed" in change)
    kwargs = {"batch_size": 8, "shuffle": "seed" in change}
    if "data" in change:
        data = _data(n=change["data"])
    if "seed" in change:
        tr.seed = change["seed"]  # another shuffle of the epoch
    kwargs.update({k: v for k, v in change.items() if k in ("shuffle", "drop_last")})
    tr.save(tmp_path / "ckpt")
    loaded = ann.Trainer.load(tmp_path / "ckpt", seed=tr.seed)
    for trainer in (tr, loaded):
        trainer.fit(data, epochs=1, **kwargs)
        assert trainer.state.minibatches == 3 + len(data["y"]) // 8, change
        assert (trainer.epochs_done, trainer.epoch_batches) == (1, 0)


def test_resuming_with_the_same_layout_finishes_the_epoch_and_old_fit_json_loads(tmp_path):
    tr, data = _interrupted_at_3()
    tr.save(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "fit.json") as f:
        fit = json.load(f)
    assert fit == {
        "epoch_batches": 3,
        "minibatches": 3,
        "epoch_layout": {"rows": 40, "batch_size": 8, "shuffle": False, "seed": None,
                         "drop_last": False},
    }  # fmt: skip
    tr.fit(data, epochs=1, batch_size=8)
    assert tr.state.minibatches == 5 and (tr.epochs_done, tr.epoch_batches) == (1, 0)
    # a fit.json of an older save (no layout): the position is taken as it comes, as before
    _as_an_older_save(tmp_path / "ckpt")
    del fit["epoch_layout"]
    with open(tmp_path / "ckpt" / "fit.json", "w") as f:
        json.dump(fit, f)
    old = ann.Trainer.load(tmp_path / "ckpt")
    assert old.epoch_batches == 3
    old.fit(data, epochs=1, batch_size=8)
    assert old.state.minibatches == 5 and (old.epochs_done, old.epoch_batches) == (1, 0)
    assert_params_equal(old.params, tr.params)


def _as_an_older_save(folder):
    """The checkpoint ``folder`` as an asyncnn before the spec kept the epoch's position wrote
    it: the position in fit.json alone."""
    import hashlib

    import msgpack

    file = folder / "spec.msgpack"
    spec = msgpack.unpackb(file.read_bytes(), raw=False, strict_map_key=False)
    del spec["fit"]
    raw = msgpack.packb(spec, use_bin_type=True)
    file.write_bytes(raw)
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256(raw).hexdigest()
    manifest["files"]["spec.msgpack"] = {"bytes": len(raw), "sha256": digest}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_damaged_epoch_layout_in_fit_json_is_named(tmp_path):
    tr, _ = _interrupted_at_3()
    tr.save(tmp_path / "ckpt")
    _as_an_older_save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "fit.json"
    fit = json.loads(path.read_text())
    fit["epoch_layout"]["batch_size"] = "8"
    path.write_text(json.dumps(fit))
    with pytest.raises(
        ValueError, match=r"fit.json is damaged \(epoch_layout\['batch_size'\] is '8'.*delete"
    ):
        ann.Trainer.load(tmp_path / "ckpt")


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


def test_history_save_refuses_a_value_that_is_not_a_number_and_writes_nothing(tmp_path):
    hist = ann.History(losses=[1.0, "2.0"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"History\.losses\[1\] is '2\.0', not a number"):
        hist.save(tmp_path / "h.json")
    assert list(tmp_path.iterdir()) == []
