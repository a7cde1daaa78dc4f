"""The Trainer: fit/evaluate/predict, params, progress, dropout, data it takes."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._math._pytree import tree_leaves, tree_map

from _reference import assert_params_equal, chain_graph
from _train_cases import _data, _trainer


def _chain2_logits(params: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """``chain_graph(2)``'s logits in plain numpy: Linear, Tanh, then Linear."""
    first, last = params["stage0"][0], params["stage1"][0]
    return np.tanh(x @ first["weight"] + first["bias"]) @ last["weight"] + last["bias"]


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def test_evaluate_and_predict() -> None:
    data = _data(n=50)  # batches of 16, 16, 16 and 2: a mean over batches is not one over rows
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.Adam(lr=0.05), policy=policies.GPipe(2), dtype="float64"
    )
    start = _chain2_logits(tr.params, data["x"])
    before = tr.evaluate(data, batch_size=16)
    np.testing.assert_allclose(before["loss"], _cross_entropy(start, data["y"]), rtol=1e-12)
    tr.fit(data, epochs=30, batch_size=25)
    after = tr.evaluate(data, batch_size=16)
    assert set(before) == set(after) == {"loss", "accuracy"}
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]
    # predict gives every row's logits, in the data's order, at the current weights
    logits = tr.predict({"x": data["x"]}, batch_size=16)["logits"]
    assert logits.shape == (50, 3) and logits.dtype == np.float64
    np.testing.assert_allclose(logits, _chain2_logits(tr.params, data["x"]), rtol=1e-12)
    # evaluate is the loss and accuracy of those logits over the whole data at once
    np.testing.assert_allclose(after["loss"], _cross_entropy(logits, data["y"]), rtol=1e-12)
    assert after["accuracy"] == float((logits.argmax(1) == data["y"]).mean())
    # and the loss fit reports for a minibatch is evaluate's at the weights it trained from
    batch = {k: v[:25] for k, v in data.items()}
    expected = tr.evaluate(batch, batch_size=7)["loss"]
    np.testing.assert_allclose(tr.fit(batch, batch_size=25).losses, [expected], rtol=1e-12)


def test_params_setter_and_errors() -> None:
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    p = tr.params
    p["stage0"][0]["bias"] = np.ones_like(p["stage0"][0]["bias"])
    tr.params = {"stage0": p["stage0"]}
    np.testing.assert_array_equal(tr.params["stage0"][0]["bias"], 1)
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        tr.params = {"nope": {}}
    with pytest.raises(TypeError, match="policies.Sync"):
        bad: Any = "sync"
        ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=bad)


def test_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), progress=True
    )
    tr.fit(_data(), epochs=1, batch_size=8)
    assert "loss" in capsys.readouterr().out


_MASKS: list[np.ndarray] = []  # the masks _SeenDropout applied in training, in call order


@dataclass(frozen=True)
class _SeenDropout(nn.Dropout):
    """``nn.Dropout`` that notes the mask of each training call: its own draw, from a copy of
    the generator it was given, applied to ones."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if rng is not None:
            ones = np.ones(x.shape)
            _MASKS.append(np.asarray(super().__call__(params, ones, rng=copy.deepcopy(rng))))
        return super().__call__(params, x, rng=rng)


def test_dropout_is_seeded_per_key_and_deterministic() -> None:
    def graph(p: float) -> ann.Graph:
        return ann.Graph.sequential(
            [nn.Linear(5, 16), nn.ReLU(), _SeenDropout(p), nn.Linear(16, 3)],
            loss=nn.CrossEntropyLoss(),
            stages=[3, 1],
            input_shape=(None, 5),
        )

    def train(p: float, seed: int = 1) -> tuple[dict[str, Any], list[np.ndarray]]:
        _MASKS.clear()
        tr = ann.Trainer(
            graph(p), optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2), seed=seed
        )
        tr.fit(_data(), epochs=1, batch_size=8)
        return tr.params, list(_MASKS)

    (first, masks), (second, again) = train(0.5), train(0.5)
    no_dropout, _ = train(0.0)
    assert_params_equal(first, second)
    assert not np.array_equal(first["stage1"][0]["weight"], no_dropout["stage1"][0]["weight"])
    # 5 minibatches of 2 keys, forwarded by stage0 in key order: a mask of its own per key
    # (one stream for all would pass the checks above), the same for the same key run to run,
    # and another for another seed
    assert len(masks) == 10 and all(m.shape == (4, 16) for m in masks)
    assert len({m.tobytes() for m in masks}) == 10
    for key, (m, m_again) in enumerate(zip(masks, again, strict=True)):
        np.testing.assert_array_equal(m, m_again, err_msg=f"key {key}")
    _, reseeded = train(0.5, seed=2)
    assert all(not np.array_equal(m, r) for m, r in zip(masks, reseeded, strict=True))
    # evaluation runs without dropout: deterministic, and equal to the model without it
    tr = ann.Trainer(graph(0.5), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=1)
    tr0 = ann.Trainer(graph(0.0), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=1)
    assert tr.evaluate(_data()) == tr0.evaluate(_data())


def test_evaluate_accuracy_counts_positions_of_sequence_labels() -> None:
    from asyncnn import ops

    @dataclass(frozen=True)
    class PerPosition(nn.Module):
        """(N, T) ids -> (N, C, T) logits: a one-hot of the id (a perfect copy model)."""

        def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
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


@pytest.mark.parametrize(
    "loss",
    [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=(1.0, 3.0, 0.5), label_smoothing=0.1)],
    ids=["default", "weighted"],
)
def test_evaluate_in_batches_is_the_loss_and_accuracy_of_the_whole_data_with_ignored_labels(
    loss: Any,
) -> None:
    # (each batch's mean was weighted by its rows and ignored labels counted as wrong answers:
    # the loss and the accuracy depended on how the ignored labels fell into batches)
    g = ann.Graph.sequential(
        [nn.Linear(5, 3)], loss=loss, input_shape=(None, 5), input_dtype="float64"
    )
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 5))
    y = rng.integers(0, 3, 10)
    y[[0, 1, 2, 7]] = -100  # the first batch of 4 holds three, the second none
    logits = nn.Linear(5, 3)(tr.params["stage0"][0], x)
    whole = float(loss({}, logits, y))
    kept = y != -100
    right = (logits.argmax(axis=1) == y)[kept].mean()
    for batch_size in (4, 10):
        got = tr.evaluate({"x": x, "y": y}, batch_size=batch_size)
        assert got["loss"] == pytest.approx(whole, rel=1e-12)
        assert got["accuracy"] == pytest.approx(right)


def test_params_and_data_may_be_torch_tensors() -> None:
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


def test_plain_text_progress_where_rich_cannot_draw(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncnn import _fit

    monkeypatch.setattr(_fit, "_plain_progress", lambda: True)
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), progress=True
    )
    tr.fit(_data(), epochs=1, batch_size=8)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("train 5/5  loss ") and lines[-1].endswith("samples/s")


def test_an_array_dataset_goes_wherever_a_dict_of_arrays_does() -> None:
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


def test_evaluate_reports_accuracy_only_for_class_index_labels() -> None:
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

        def __call__(self, params: Any, logits: Any, labels: Any, *, rng: Any = None) -> Any:
            return super().__call__(params, logits, labels[:, 0])

    column = ann.Graph.sequential(
        [nn.Linear(5, 3)], loss=ColumnOfLabels(), stages=1, input_shape=(None, 5),
        label_shape=(None, 1),
    )  # fmt: skip
    tr = ann.Trainer(column, optimizer=optim.SGD(lr=0.01), policy=policies.Sync())
    assert set(tr.evaluate({"x": x, "y": rng.integers(0, 3, (40, 1))})) == {"loss"}


class _FitsAgain(ann.callbacks.Callback):
    """Calls ``fit`` on its own trainer from inside the running fit, keeping what it raised."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.data = data
        self.refused: list[BaseException] = []

    def on_step_end(self, trainer: Any, minibatch: int, logs: dict[str, Any]) -> None:
        if minibatch == 0:
            try:
                trainer.fit(self.data, batch_size=8)
            except RuntimeError as exc:
                self.refused.append(exc)


@pytest.mark.timeout(60)
def test_a_fit_inside_a_running_fit_is_refused() -> None:
    # (it ran on a worker thread, and the outer fit's state then replaced the inner one's: its
    # updates vanished without a word)
    data = _data(n=32)
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2))
    again = _FitsAgain(data)
    tr.fit(data, batch_size=8, callbacks=[again])
    (refused,) = again.refused
    assert str(refused).startswith("fit: a fit is already running on this trainer")
    assert "wait for it to return" in str(refused) and "another Trainer" in str(refused)
    assert tr.versions == {"stage0": 4, "stage1": 4} and tr.epochs_done == 1
    tr.fit(data, batch_size=8)  # once it has returned, the next fit runs
    assert tr.versions == {"stage0": 8, "stage1": 8} and tr.epochs_done == 2


def test_weights_set_in_on_fit_start_or_on_fit_end_are_kept_and_in_a_step_hook_refused() -> None:
    # (the fit's lock refused them in on_fit_start and on_fit_end too, though the run is not
    # open then: warm starts and "restore the best weights" callbacks broke)
    data = _data(n=32)

    def trainer() -> ann.Trainer:
        return ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2))

    start = trainer().params  # other weights than the fits' own (another seed)
    start = {n: tree_map(lambda a: a * 0.5, p) for n, p in start.items()}

    class Sets(ann.callbacks.Callback):
        def __init__(self) -> None:
            self.refused: list[BaseException] = []

        def on_fit_start(self, tr: Any) -> None:
            tr.params = start

        def on_step_end(self, tr: Any, step: int, logs: dict[str, Any]) -> None:
            try:
                tr.params = start
            except RuntimeError as exc:
                self.refused.append(exc)

        def on_fit_end(self, tr: Any, history: Any) -> None:
            self.end = tr.params
            tr.params = start

    hooks = Sets()
    tr = trainer()
    tr.fit(data, batch_size=8, callbacks=[hooks])
    before = trainer()
    before.params = start
    before.fit(data, batch_size=8)
    assert_params_equal(hooks.end, before.params)  # on_fit_start's weights trained on
    assert_params_equal(tr.params, start)  # on_fit_end's kept
    assert len(hooks.refused) == 4
    assert str(hooks.refused[0]).startswith("params: a fit is already running on this trainer")
    assert "in on_fit_start or on_fit_end" in str(hooks.refused[0])


def test_a_step_hook_delivered_as_a_stopped_fit_keeps_its_state_may_not_set_the_weights() -> None:
    # (the step hooks that a fit stopping delivers with the state it keeps ran once its run had
    # closed, and their trainer.params = ... went through, where the same hook during the run
    # was refused: whether a step hook set the weights depended on how the fit ended)
    start = {n: tree_map(lambda a: a * 0.5, p) for n, p in _trainer(policies.Sync()).params.items()}

    class SetsThenStops(ann.callbacks.Callback):
        def __init__(self) -> None:
            self.refused: list[tuple[int, str]] = []
            self.set_at: list[int] = []

        def on_step_end(self, tr: Any, step: int, logs: dict[str, Any]) -> None:
            if step == 2:
                tr._interrupt.set()  # Ctrl-C in a notebook: the fit stops before its next step
            try:
                tr.params = start
                self.set_at.append(step)
            except RuntimeError as exc:
                self.refused.append((step, str(exc)))

    hooks = SetsThenStops()
    tr = _trainer(policies.Sync())
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_data(), epochs=1, batch_size=8, callbacks=[hooks])
    kept = tr.state.minibatches
    assert kept == 4  # minibatch 3 computed in its step; its hook came as the fit stopped
    assert hooks.set_at == [] and [s for s, _ in hooks.refused] == list(range(kept))
    during, stopping = hooks.refused[0][1], hooks.refused[-1][1]
    assert during.startswith("params: a fit is already running on this trainer")
    assert stopping.startswith(
        "params: a step hook may not set the weights, also where the fit delivers it as it "
        "stops (here after an error or an interrupt, with the state it keeps)"
    )
    assert "in on_fit_end, or after fit returns" in stopping
    reference = _trainer(policies.Sync())
    reference.fit({k: v[: 8 * kept] for k, v in _data().items()}, epochs=1, batch_size=8)
    assert_params_equal(tr.params, reference.params)  # the kept state's, not the hook's


def test_an_error_in_fits_own_loss_function_is_named_as_the_trainers(monkeypatch: Any) -> None:
    # (it said "the on_loss function given to open_run raised ...", a function the caller of
    # fit never gave)
    from asyncnn._fit import _FitState

    def broken(self: Any, minibatch: int, loss: float, rows: int) -> None:
        raise ZeroDivisionError("a bookkeeping bug")

    monkeypatch.setattr(_FitState, "on_loss", broken)
    with pytest.raises(
        ann.ActorError, match=r"^Trainer.fit's own on_loss function \(its record of each "
        r"minibatch's loss for the history, the step hooks and the progress bar\) raised "
        r"ZeroDivisionError: a bookkeeping bug \(called as on_loss\(0, .*, 8\)\); the loss was "
        r"computed: the error is in that function, not in an actor$",
    ) as info:  # fmt: skip
        _trainer(policies.Sync()).fit(_data(), epochs=1, batch_size=8)
    assert (info.value.actor, info.value.kind) == ("on_loss", "callback")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.timeout(60)
def test_a_fit_from_another_thread_while_one_runs_is_refused(tmp_path: Any) -> None:
    # (both returned their losses, and the trainer kept one fit's training: versions 4 where
    # two fits of 4 steps had run)
    data = _data(n=32)
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2))
    inside, release = threading.Event(), threading.Event()

    class Holds(ann.callbacks.Callback):
        def on_step_end(self, trainer: Any, minibatch: int, logs: dict[str, Any]) -> None:
            if minibatch == 0:
                trainer.save(tmp_path / "from-its-own-callback")  # the fit's own thread: fine
                inside.set()
                release.wait(30)

    done: list[Any] = []
    worker = threading.Thread(
        target=lambda: done.append(tr.fit(data, batch_size=8, callbacks=[Holds()]))
    )
    worker.start()
    try:
        assert inside.wait(30)
        with pytest.raises(RuntimeError, match=r"^fit: a fit is already running on this trainer"):
            tr.fit(data, batch_size=8)
        with pytest.raises(RuntimeError, match=r"^params: a fit is already running on this"):
            tr.params = tr.params
        with pytest.raises(RuntimeError, match=r"^save: a fit is already running on this"):
            tr.save(tmp_path / "from-another-thread")
        assert not (tmp_path / "from-another-thread").exists()
    finally:
        release.set()
        worker.join(30)
    assert len(done) == 1 and len(done[0].losses) == 4
    assert tr.versions == {"stage0": 4, "stage1": 4} and tr.epochs_done == 1
    tr.params = tr.params  # once it has returned, all of them go through
    tr.save(tmp_path / "after")


def test_an_optimizer_of_another_kind_assigned_between_fits_trains_on_from_a_fresh_state(
    tmp_path: Any,
) -> None:
    # (the next fit failed with "open_run: state.opt_states['stage0'] must be a dict with keys
    # ['exp_avg', 'exp_avg_sq', 'step'] ...", naming a function its caller never called)
    data = _data(n=32)

    def trainer(opt: Any) -> ann.Trainer:
        return ann.Trainer(chain_graph(2), optimizer=opt, policy=policies.GPipe(2), dtype="float64")

    tr = trainer(optim.SGD(lr=0.1, momentum=0.9))
    tr.fit(data, batch_size=8)
    tr.save(str(tmp_path / "ckpt"))
    weights, versions = tr.params, tr.versions
    tr.optimizer = optim.Adam(lr=1e-2)
    assert tr.optimizer == optim.Adam(lr=1e-2)
    for name, state in tr.state.opt_states.items():  # Adam's own, fresh; the rest stays
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"] and state["step"] == 0, name
        assert not any(np.any(leaf) for leaf in tree_leaves(state)), name
    assert_params_equal(tr.params, weights)
    assert tr.versions == versions and tr.state.minibatches == 4
    tr.fit(data, batch_size=8)
    # as a load with that optimizer resumes: the same weights, bit for bit
    back = ann.Trainer.load(str(tmp_path / "ckpt"), optimizer=optim.Adam(lr=1e-2))
    back.fit(data, batch_size=8)
    assert_params_equal(tr.params, back.params)
    tr.save(str(tmp_path / "adam"))  # and the state saved is that optimizer's: it loads
    assert type(ann.Trainer.load(str(tmp_path / "adam")).optimizer) is optim.Adam

    # one of the same kind (another lr) keeps each layer's state: momentum and step go on
    same = trainer(optim.SGD(lr=0.1, momentum=0.9))
    same.fit(data, batch_size=8)
    kept = same.state.opt_states
    same.optimizer = optim.SGD(lr=0.05, momentum=0.9)
    assert all(same.state.opt_states[n] is kept[n] for n in kept)  # (the very arrays)
    same.fit(data, batch_size=8)
    back = ann.Trainer.load(str(tmp_path / "ckpt"), optimizer=optim.SGD(lr=0.05, momentum=0.9))
    back.fit(data, batch_size=8)
    assert_params_equal(same.params, back.params)

    with pytest.raises(TypeError, match=r"optimizer must be an instance, got the class Adam"):
        tr.optimizer = optim.Adam
    assert tr.optimizer == optim.Adam(lr=1e-2)  # (the refused one changed nothing)


def test_an_optimizer_assigned_in_a_step_hook_is_refused_and_in_on_fit_start_taken() -> None:
    data = _data(n=32)

    class Swaps(ann.callbacks.Callback):
        def __init__(self) -> None:
            self.refused: list[BaseException] = []

        def on_fit_start(self, tr: Any) -> None:
            tr.optimizer = optim.Adam(lr=1e-2)

        def on_step_end(self, tr: Any, step: int, logs: dict[str, Any]) -> None:
            try:
                tr.optimizer = optim.SGD(lr=0.1)
            except RuntimeError as exc:
                self.refused.append(exc)

    hooks = Swaps()
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2))
    tr.fit(data, batch_size=8, callbacks=[hooks])
    assert len(hooks.refused) == 4
    said = str(hooks.refused[0])
    assert said.startswith("optimizer: a fit is already running on this trainer"), said
    assert "on_fit_start or on_fit_end" in said, said
    assert type(tr.optimizer) is optim.Adam
    assert all(sorted(s) == ["exp_avg", "exp_avg_sq", "step"] for s in tr.state.opt_states.values())
    assert all(s["step"] == 4 for s in tr.state.opt_states.values())  # Adam trained the fit


class _StopsAt(ann.callbacks.Callback):
    """Stops the fit (as Ctrl-C in a notebook does) once minibatch ``step`` (counted over the
    trainer's fits) has run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Any, minibatch: int, logs: dict[str, Any]) -> None:
        if minibatch == self.step:
            trainer._interrupt.set()


def test_a_deep_copy_fits_on_as_the_original_does_and_leaves_it_alone() -> None:
    # (copy.deepcopy(trainer) failed with "cannot pickle '_thread.lock' object", naming
    # neither the Trainer nor what to use instead)
    data = _data(n=40)
    tr = _trainer(policies.Sync())
    tr.fit(data, epochs=1, batch_size=8)
    with pytest.raises(KeyboardInterrupt):  # mid-epoch: its position and losses are copied too
        tr.fit(data, epochs=1, batch_size=8, callbacks=[_StopsAt(7)])
    assert tr.epoch_batches > 0
    twin = copy.deepcopy(tr)
    assert twin._epoch_losses == tr._epoch_losses and len(tr._epoch_losses) == tr.epoch_batches
    assert type(twin) is ann.Trainer and twin.cluster is None
    assert (twin.epochs_done, twin.epoch_batches) == (tr.epochs_done, tr.epoch_batches)
    assert twin.versions == tr.versions and twin.state.minibatches == tr.state.minibatches
    assert twin.history.losses == tr.history.losses and twin.history is not tr.history
    assert twin.config == tr.config and twin.optimizer == tr.optimizer
    assert twin.policy == tr.policy and twin.graph is not tr.graph
    assert list(twin.graph.nodes) == list(tr.graph.nodes)
    assert twin._fit_lock is not tr._fit_lock and twin._interrupt is not tr._interrupt
    assert not twin._interrupt.is_set() and twin._fit_thread is None
    for name in tr.graph.layers:  # the copy's arrays are its own
        mine, theirs = tree_leaves(twin.state.params[name]), tree_leaves(tr.state.params[name])
        assert not any(np.shares_memory(a, b) for a, b in zip(mine, theirs, strict=True))
    weights = copy.deepcopy(tr.params)
    opt_states = copy.deepcopy(tr.state.opt_states)
    versions, done, position = tr.versions, tr.epochs_done, tr.epoch_batches

    branched = twin.fit(data, epochs=2, batch_size=8)
    assert_params_equal(tr.params, weights)  # the original untouched by the copy's fit
    assert_params_equal(tr.state.opt_states, opt_states)
    assert (tr.versions, tr.epochs_done, tr.epoch_batches) == (versions, done, position)
    assert tr.history is not branched

    straight = tr.fit(data, epochs=2, batch_size=8)  # the original fits on: the same bits
    assert_params_equal(twin.params, tr.params)
    assert_params_equal(twin.state.opt_states, tr.state.opt_states)
    assert branched.losses == straight.losses and branched.epochs == straight.epochs
    assert twin.versions == tr.versions and twin.epochs_done == tr.epochs_done


@pytest.mark.timeout(60)
def test_a_deep_copy_while_a_fit_runs_is_refused() -> None:
    data = _data(n=32)
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2))
    inside, release = threading.Event(), threading.Event()
    from_callback: list[BaseException] = []

    class Holds(ann.callbacks.Callback):
        def on_step_end(self, trainer: Any, minibatch: int, logs: dict[str, Any]) -> None:
            if minibatch == 0:
                try:
                    copy.deepcopy(trainer)
                except RuntimeError as exc:
                    from_callback.append(exc)
                inside.set()
                release.wait(30)

    worker = threading.Thread(target=lambda: tr.fit(data, batch_size=8, callbacks=[Holds()]))
    worker.start()
    try:
        assert inside.wait(30)
        with pytest.raises(RuntimeError) as from_thread:
            copy.deepcopy(tr)
    finally:
        release.set()
        worker.join(30)
    for said in (str(from_thread.value), str(from_callback[0])):
        assert said.startswith("deepcopy: a fit is already running on this trainer"), said
        assert "after the fit returns" in said and "ann.Trainer.load(path)" in said, said
    assert tr.versions == {"stage0": 4, "stage1": 4}  # the fit went on unharmed
    twin = copy.deepcopy(tr)  # once it has returned, the copy is made
    assert twin.versions == tr.versions
    twin.fit(data, batch_size=8)  # and neither the copy's lock nor the original's is held
    tr.fit(data, batch_size=8)
    assert_params_equal(twin.params, tr.params)


@pytest.mark.timeout(120)
def test_a_deep_copy_shares_the_cluster_and_pickle_is_refused_naming_save_and_load() -> None:
    import pickle

    from _cluster_cases import chain
    from _cluster_cases import data as cluster_data

    with ann.cluster.LocalCluster(workers=2) as cluster:
        tr = ann.Trainer(
            chain([0, 1, None]), optimizer=optim.Adam(lr=0.01), policy=policies.PipeDream(2),
            cluster=cluster,
        )  # fmt: skip
        twin = copy.deepcopy(tr)
        assert twin.cluster is cluster and not cluster.started  # its processes never copied
        assert twin.graph is not tr.graph and twin.graph.nodes["s1"].worker == 1
        both = copy.deepcopy([tr, tr])  # (one copy for one trainer, as deepcopy makes)
        assert both[0] is both[1] and both[0].cluster is cluster
        tr.fit(cluster_data(n=32), batch_size=8)
        twin = copy.deepcopy(tr)
        twin.fit(cluster_data(n=32), batch_size=8)  # on the same workers, one fit at a time
        tr.fit(cluster_data(n=32), batch_size=8)
        assert_params_equal(twin.params, tr.params)

        for trainer in (tr, _trainer(policies.Sync())):
            with pytest.raises(TypeError) as refused:
                pickle.dumps(trainer)
            said = str(refused.value)
            assert said.startswith("cannot pickle a Trainer"), said
            assert "tr.save(path)" in said and "ann.Trainer.load(path)" in said, said
            assert "copy.deepcopy(tr)" in said, said
        shallow = copy.copy(tr)  # a shallow copy is as before: the same objects
        assert shallow is not tr and shallow.state is tr.state and shallow.graph is tr.graph


def test_a_deep_copy_of_a_tracing_trainer_records_no_trace_until_given_its_own_path(
    tmp_path: Any,
) -> None:
    # numbered on from the same traces, the copy's next trace and the original's would be
    # written over each other
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((16, 3)), "y": rng.standard_normal((16, 2))}
    g = ann.Graph.sequential(
        [nn.Linear(3, 2)], loss=nn.MSELoss(), input_shape=(None, 3), label_shape=(None, 2),
        label_dtype="float32",
    )  # fmt: skip
    path = str(tmp_path / "run.trace")
    tr = ann.Trainer(g, optim.SGD(lr=0.1), policies.Sync(), trace=path)
    tr.fit(data, epochs=1, batch_size=8)
    twin = copy.deepcopy(tr)
    assert (tr.trace, twin.trace) == (path, None)
    twin.fit(data, epochs=1, batch_size=8)
    tr.fit(data, epochs=1, batch_size=8)
    assert tr.traces == [path, str(tmp_path / "run.1.trace")]
    assert twin.traces == [path]
    twin.trace = str(tmp_path / "twin.trace")
    twin.fit(data, epochs=1, batch_size=8)
    assert twin.traces[-1].startswith(str(tmp_path / "twin."))  # (numbered on: twin.1.trace)
    assert tr.traces == [path, str(tmp_path / "run.1.trace")]
