"""The Trainer: fit/evaluate/predict, checkpoints that resume bit-identically, progress."""

from __future__ import annotations

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
