"""The Trainer refuses bad data, shapes, params and arguments before any compute, naming them."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _reference import assert_params_equal, chain_graph
from _train_cases import _data, _trainer


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
    # (the shape error said so; the label's did not: "input 'y': label 3 ...")
    with pytest.raises(ValueError, match=r"^validation_data: input 'y': label 3 at row 13 "):
        tr.fit(data, batch_size=8, validation_data=labels)
    assert tr.versions == {"stage0": 0, "stage1": 0, "stage2": 0}  # nothing ran
    tr.fit(nan, batch_size=40, check_data=False)  # the switch skips the checks
    assert np.isnan(tr.history.losses[0])


def test_predict_and_evaluate_name_a_missing_input():
    data = _data()
    tr = _trainer(policies.Sync())
    with pytest.raises(ValueError, match=r"predict needs the input 'x' \(for output 'logits'\)"):
        tr.predict({"y": data["y"]})
    with pytest.raises(ValueError, match=r"evaluate needs the input 'y' \(for 'loss'\)"):
        tr.evaluate({"x": data["x"]})
    with pytest.raises(ValueError, match=r"the data has \['z'\]"):
        tr.predict({"x": data["x"], "z": data["x"]})


def test_a_missing_input_is_blamed_on_the_outputs_that_read_it_by_their_names():
    # 'embedding_a' reads 'a' alone: the message listed every node predicted ('head', 'la')
    @dataclasses.dataclass(frozen=True)
    class Cat(nn.Module):
        def __call__(self, params: Any, a: Any, b: Any, *, rng: Any = None) -> Any:
            return ops.concatenate([a, b], axis=1)

    g = ann.Graph()
    a, b = g.input("a", shape=(None, 3)), g.input("b", shape=(None, 2))
    y = g.input("y", shape=(None,), dtype="int64")
    ha, hb = g.layer("la", nn.Linear(3, 4), a), g.layer("lb", nn.Linear(2, 4), b)
    out = g.layer("head", nn.Linear(8, 4), g.layer("cat", Cat(), ha, hb))
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    g.output("embedding_a", ha)
    tr = ann.Trainer(g, optim.SGD(lr=0.1), policies.Sync())
    with pytest.raises(ValueError) as info:
        tr.predict({"a": np.zeros((5, 3), np.float32)})
    assert str(info.value) == (
        "predict needs the input 'b' (for output 'logits'); the data gave ['a']"
    )


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


@pytest.mark.parametrize("given", ["float32", "int64"])
def test_params_that_overflow_the_trainers_dtype_are_refused_not_made_inf(given):
    # (tr.params = float32 weights of 1e5 gave a float16 trainer weights of Inf, with no word,
    # where the same value in the data is refused: "overflows the run's dtype")
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
                     dtype="float16")  # fmt: skip
    before = tr.params
    p = {n: [{k: np.asarray(v, given) for k, v in m.items()} for m in w] for n, w in before.items()}
    p["stage1"][0]["weight"][2, 1] = -100000
    with pytest.raises(
        ValueError,
        match=re.escape(
            "tr.params['stage1'][0]['weight'] has -100000, which overflows the trainer's dtype "
            "float16 to -Inf (its largest value is 65504): rescale the weights, or use a wider "
            "dtype (Trainer(..., dtype='float32'))"
        ),
    ):
        tr.params = p
    assert_params_equal(tr.params, before)  # nothing was assigned, the other layer's neither
    # what rounds to the largest float16 is kept, and so is a value too small for float16 (0);
    # a NaN or Inf of the caller's own is not an overflow (check_finite is the run's check)
    w = np.zeros((6, 3), np.float32)
    w[0, :] = [65519.0, 1e-10, np.inf]
    tr.params = {"stage1": [{"weight": w, "bias": np.zeros(3, np.float32)}]}
    got = tr.params["stage1"][0]["weight"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got[0], np.array([65504.0, 0.0, np.inf], np.float16))
    # float64 weights beyond float32's range in a float32 trainer: float64 is the wider dtype
    t32 = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    w64 = np.zeros((6, 3))
    w64[5, 2] = 1e39
    with pytest.raises(ValueError, match=r"\['weight'\] has 1e\+39, .* dtype float32 to Inf .*"
                       r"\(Trainer\(\.\.\., dtype='float64'\)\)$"):  # fmt: skip
        t32.params = {"stage1": [{"weight": w64, "bias": np.zeros(3)}]}


def test_a_cluster_fit_refuses_what_needs_weights_during_the_fit():
    with ann.cluster.LocalCluster(workers=1) as cluster:
        tr = ann.Trainer(
            chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), cluster=cluster
        )
        with pytest.raises(ValueError, match="with a cluster, call fit one epoch at a time"):
            tr.fit(_data(), validation_data=_data())


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


@pytest.mark.parametrize(
    ("optimizer", "says"),
    [
        # a class failed inside init_state: "Optimizer.init() missing 1 required positional
        # argument: 'params'"
        (optim.Adam, r"optimizer must be an instance, got the class Adam; call it with its "
                     r"options: optimizer=optim\.Adam\(\.\.\.\)"),
        ("sgd", r"optimizer must be an asyncnn\.optim optimizer \(e\.g\. optim\.Adam\(lr=1e-3\)\), "
                r"got 'sgd'"),
    ],
    ids=["class", "not-an-optimizer"],
)  # fmt: skip
def test_the_trainer_refuses_what_is_not_an_optimizer_as_it_refuses_a_policy(optimizer, says):
    with pytest.raises(TypeError, match=says):
        ann.Trainer(chain_graph(2), optimizer=optimizer, policy=policies.Sync())


def _overflowing(row=3, value=1e39, n=40):
    """:func:`_data` with one float64 value that is finite, and Inf as float32."""
    data = _data(n)
    data["x"][row, 2] = value
    return data


def test_fit_refuses_a_float_input_that_overflows_the_run_dtype():
    # (1e39 passed the NaN check in float64, became Inf in the float32 run, and every weight
    # came out NaN with only numpy's "overflow encountered in cast" warning)
    data = _overflowing()
    tr = _trainer(policies.Sync())
    says = r"input 'x' has 1e\+39 in row 3, which overflows the run's dtype float32 to Inf"
    with pytest.raises(ValueError, match=rf"^fit: {says}"):
        tr.fit(data, batch_size=8)
    below = _overflowing()
    below["x"][3] *= -1  # (a negative value overflows to -Inf, and is said so)
    with pytest.raises(ValueError, match=r"^fit: input 'x' has -1e\+39 in row 3, .* to -Inf "):
        tr.fit(below, batch_size=8)
    with pytest.raises(ValueError, match=rf"^validation_data: {says}"):
        tr.fit(_data(), batch_size=8, validation_data=data)
    nan = _overflowing(row=5)
    nan["x"][2, 0] = np.nan  # a NaN before it is the first bad row, named as one
    with pytest.raises(ValueError, match="input 'x' contains NaN or Inf, first in row 2: "):
        tr.fit(nan, batch_size=8)
    assert tr.versions == {"stage0": 0, "stage1": 0, "stage2": 0}  # nothing ran
    wide = ann.Trainer(chain_graph(3), optimizer=optim.SGD(lr=1e-80), policy=policies.Sync(),
                       dtype="float64")  # fmt: skip
    wide.fit(data, batch_size=8)  # finite in a float64 run
    assert np.isfinite(wide.history.losses).all()


def test_evaluate_and_predict_refuse_a_float_input_that_overflows_the_run_dtype():
    # (predict gave the overflowing row finite outputs, from an input made Inf without a word)
    data = _overflowing(row=7)
    tr = _trainer(policies.Sync())
    says = r"input 'x' has 1e\+39 in row 7, which overflows the run's dtype float32 to Inf"
    with pytest.raises(ValueError, match=rf"^predict: {says}"):
        tr.predict({"x": data["x"]})
    with pytest.raises(ValueError, match=rf"^evaluate: {says}"):
        tr.evaluate(data)
    nan = _data()
    nan["x"][7, 0] = np.nan  # not refused there: its outputs come out NaN, as the input is
    assert np.isnan(tr.predict({"x": nan["x"]})["logits"][7]).all()


def test_check_batch_refuses_an_overflow_into_the_run_dtype_across_chunks(monkeypatch):
    from asyncnn._runtime import _checks

    g = ann.Graph.sequential(
        [nn.Linear(4, 3)], loss=nn.CrossEntropyLoss(), stages=1, input_shape=(None, 4)
    )
    monkeypatch.setattr(_checks, "_FINITE_CHUNK_BYTES", 3 * 4 * 8)  # 3 rows at a time
    x = np.ones((10, 4))
    x[7, 3], x[8, 0] = -1e39, np.nan
    batch = {"x": x, "y": np.zeros(10, int)}
    with pytest.raises(ValueError, match=r"-1e\+39 in row 7, which overflows .* float32"):
        _checks.check_batch(g, batch, check_finite=True, dtype="float32")
    with pytest.raises(ValueError, match="contains NaN or Inf, first in row 8"):
        _checks.check_batch(g, batch, check_finite=True, dtype="float64")
    # the largest float32 and what rounds down to it pass; what rounds up to Inf does not
    top = float(np.finfo(np.float32).max)
    ulp = 2.0**104  # (the gap below the largest float32)
    x = np.full((10, 4), top)
    x[4, 1] = top + ulp / 2 - ulp / 4
    assert _checks.check_batch(g, {"x": x, "y": np.zeros(10, int)}, True, dtype="float32") == 10
    x[6, 2] = top + ulp / 2
    with pytest.raises(ValueError, match="in row 6, which overflows"):
        _checks.check_batch(g, {"x": x, "y": np.zeros(10, int)}, True, dtype="float32")
    # a float16 run: float32 data and integers beyond its 65504
    with pytest.raises(ValueError, match=r"100000 in row 0, which overflows .* float16"):
        _checks.check_batch(
            g, {"x": np.full((2, 4), 1e5, np.float32), "y": np.zeros(2, int)}, True, "float16"
        )
    with pytest.raises(ValueError, match=r"70000 in row 1, which overflows .* float16"):
        _checks.check_batch(
            g, {"x": np.array([[1] * 4, [1, 70000, 1, 1]]), "y": np.zeros(2, int)}, True, "float16"
        )
    # no NaN check asked for: no overflow check either
    assert _checks.check_batch(g, {"x": x, "y": np.zeros(10, int)}, dtype="float32") == 10


def test_fit_on_empty_data_says_so_as_evaluate_does():
    # (it said "the batch is empty (0 rows)", a batch the caller never made)
    data = _data()
    tr = _trainer(policies.Sync())
    with pytest.raises(ValueError, match=r"^fit: the data has 0 rows$"):
        tr.fit({"x": data["x"][:0], "y": data["y"][:0]}, batch_size=8)
    with pytest.raises(ValueError, match=r"^validation_data: the data has 0 rows$"):
        tr.fit(data, batch_size=8, validation_data={"x": data["x"][:0], "y": data["y"][:0]})


@pytest.mark.parametrize(
    ("graph", "says"),
    [
        (None, r"got None$"),
        (
            {"nodes": {}},
            r"got \{'nodes': \{\}\}; build one from a graph's spec with Graph\.from_spec$",
        ),
        (nn.Linear(3, 2), r"got Linear\(in_features=3, .*\); .*Graph\.sequential\(\[module\]"),
        ({"k": "v" * 200}, r"got \{'k': 'v{73}; build one"),  # (cut at 80 characters)
    ],
    ids=["none", "spec", "module", "long-repr"],
)
def test_the_trainer_refuses_what_is_not_a_graph_as_open_run_does(graph, says):
    # (a bare AttributeError: 'NoneType' object has no attribute 'layers')
    with pytest.raises(TypeError, match=r"^Trainer: graph must be an asyncnn\.Graph, " + says):
        ann.Trainer(graph, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_a_lazily_read_input_of_a_wider_dtype_is_checked_by_rows():
    # (predict and evaluate of float64 rows read through __getitem__ only, in a float32 run:
    # the overflow check handed the field itself to numpy, "setting an array element with a
    # sequence"; fit's NaN check failed the same way)
    from test_data import _LazyRows

    x = np.random.default_rng(0).standard_normal((16, 5))
    y = np.zeros(16, np.int64)
    tr = _trainer(policies.Sync())
    lazy = ann.data.ArrayDataset({"x": _LazyRows(x), "y": y})
    np.testing.assert_array_equal(tr.predict(lazy)["logits"], tr.predict({"x": x})["logits"])
    assert tr.evaluate(lazy) == tr.evaluate({"x": x, "y": y})
    tr.fit(lazy, batch_size=8)
    x[9, 1] = 1e39
    with pytest.raises(ValueError, match=r"^fit: input 'x' has 1e\+39 in row 9"):
        tr.fit(ann.data.ArrayDataset({"x": _LazyRows(x), "y": y}), batch_size=8)


def test_the_trainers_positional_arguments_are_the_contracts():
    # DESIGN.md section 6: Trainer(g, optimizer, policy, seed=0, dtype="float32", trace=None,
    # cluster=None, progress=False); progress went to trace_payloads, which refused False
    g = chain_graph(2)
    tr = ann.Trainer(g, optim.SGD(), policies.Sync(), 0, "float64", None, None, False)
    assert (tr.seed, tr.dtype, tr.trace, tr.cluster, tr.progress) == (
        0, np.dtype("float64"), None, None, False,
    )  # fmt: skip
    with pytest.raises(TypeError, match="positional"):
        ann.Trainer(g, optim.SGD(), policies.Sync(), 0, "float64", None, None, False, "all")
    assert (
        ann.Trainer(g, optim.SGD(), policies.Sync(), trace_payloads="all").trace_payloads == "all"
    )


def test_the_trainers_params_are_read_only_so_a_write_cannot_change_its_weights_unseen():
    # on the CPU they were the trainer's own arrays: a write changed the weights it trains and
    # saves (on a GPU, a host copy: the same write changed nothing); now both refuse it
    tr = _trainer(policies.Sync())
    weight = tr.params["stage0"][0]["weight"]
    with pytest.raises(ValueError, match="read-only"):
        weight[:] = np.nan
    assert np.isfinite(tr.state.params["stage0"][0]["weight"]).all()
    new = weight + 1.0  # a new array: the way to change weights, assigned back
    tr.params = {"stage0": [{**tr.params["stage0"][0], "weight": new}, *tr.params["stage0"][1:]]}
    np.testing.assert_array_equal(tr.params["stage0"][0]["weight"], new)


def test_the_trainers_params_refuse_a_change_to_the_dict_that_would_be_lost():
    # (a fresh plain dict each read: tr.params["stage0"] = w and tr.params.update(...) were
    # accepted and dropped without a word)
    tr = _trainer(policies.Sync())
    params = tr.params
    assert isinstance(params, dict)  # {node name: params as numpy} (DESIGN.md section 6)
    before = {n: [dict(d) for d in p] for n, p in params.items()}
    new = [{k: v + 1.0 for k, v in d.items()} for d in params["stage0"]]
    said = r"tr\.params is a read-only snapshot.*tr\.params = \{"
    for change in [
        lambda: params.__setitem__("stage0", new),
        lambda: params.__delitem__("stage0"),
        lambda: params.update({"stage0": new}),
        lambda: params.update(stage0=new),
        lambda: params.update(),
        lambda: params.pop("stage0"),
        lambda: params.pop("missing", None),
        lambda: params.popitem(),
        lambda: params.clear(),
        lambda: params.setdefault("stage0", new),
        lambda: params.setdefault("missing"),
        lambda: params.__ior__({"stage0": new}),
    ]:
        with pytest.raises(TypeError, match=said):
            change()
    with pytest.raises(TypeError, match=said):
        params |= {"stage0": new}
    assert_params_equal(params, before)
    assert_params_equal(tr.params, before)
    # its pytree is the plain dict's (tree_map gives a plain dict)
    from asyncnn._math._pytree import tree_flatten, tree_map

    assert tree_flatten(params)[1] == tree_flatten(before)[1]
    negated = tree_map(np.negative, params)
    assert type(negated) is dict
    assert_params_equal(negated, tree_map(np.negative, before))
    # copies are plain dicts, the caller's to change and assign back; the snapshot itself too
    import copy
    import pickle

    for how, copied in [
        ("dict", dict(params)),
        ("copy method", params.copy()),
        ("copy.copy", copy.copy(params)),
        ("copy.deepcopy", copy.deepcopy(params)),
        ("pickle", pickle.loads(pickle.dumps(params))),
        ("|", params | {}),
    ]:
        assert type(copied) is dict, how
        assert_params_equal(copied, before)
        copied["stage0"] = new
        tr.params = copied
        assert_params_equal({"stage0": tr.params["stage0"]}, {"stage0": new})
        tr.params = params  # (the snapshot, as read before the change)
        assert_params_equal(tr.params, before)
    deep = copy.deepcopy(params)  # arrays of its own, writable
    deep["stage0"][0]["weight"][:] = 0.0
    assert_params_equal(tr.params, before)


def test_params_assigned_are_copied_so_the_callers_arrays_stay_theirs():
    tr = _trainer(policies.Sync())
    mine = [{k: np.array(v) for k, v in d.items()} for d in tr.params["stage0"]]
    tr.params = {"stage0": mine}
    mine[0]["weight"][:] = np.nan  # the caller's array, written after the assignment
    assert np.isfinite(tr.params["stage0"][0]["weight"]).all()
    tr.state.params["stage0"][0]["weight"][:] = 0.0  # the trainer's own: writable, its own
    assert np.isnan(mine[0]["weight"]).all()


def test_a_graph_that_gained_nodes_after_the_trainer_was_built_is_refused_by_name() -> None:
    # (the trainer checked its graph and made the layers' weights when built: fit then blamed
    # open_run's state= for the new layer, an argument a Trainer user never passed)
    g = chain_graph(2)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    tr.fit(_data(), batch_size=8)
    g.layer("extra", nn.Linear(3, 3), "stage1")
    said = r"the graph gained nodes \['extra'\] after this Trainer was built; .*build a new one"
    with pytest.raises(ann.GraphError, match=rf"^fit: {said}"):
        tr.fit(_data(), batch_size=8)
    for name, call in (("predict", tr.predict), ("evaluate", tr.evaluate)):
        with pytest.raises(ann.GraphError, match=rf"^{name}: {said}"):
            call(_data())
    with pytest.raises(ann.GraphError, match=rf"^params: {said}"):  # (a bare KeyError('extra'))
        tr.params = {"extra": [{"weight": np.zeros((3, 3)), "bias": np.zeros(3)}]}


def test_an_output_added_after_the_trainer_was_built_is_checked_then_predicted() -> None:
    # (one on an expert branch, which a new trainer refuses naming the merge to read, failed in
    # predict with a bare numpy "inhomogeneous shape" error)
    from _routing_cases import _data as routed_data
    from _routing_cases import moe_graph

    g = moe_graph(experts=3, k=1)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    g.output("branch", g.nodes["gate"].consumers[0][0])
    with pytest.raises(ann.GraphError, match=r"^output 'branch' reads layer .* read the merge"):
        tr.predict(routed_data())
    del g.outputs["branch"]
    g.output("mixed", "merge")  # one a new trainer takes: predicted as it would be
    out = tr.predict(routed_data())
    fresh = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    fresh.params = tr.params
    np.testing.assert_array_equal(out["mixed"], fresh.predict(routed_data())["mixed"])


@pytest.mark.parametrize("check_finite", [False, True])
def test_a_float_attention_mask_of_minus_inf_given_as_an_input_is_no_bad_data(check_finite):
    # (the data check refused the documented float mask, "contains NaN or Inf")
    rng = np.random.default_rng(0)
    b, s, e = 8, 4, 4
    g = ann.Graph()
    x = g.input("x", shape=(None, s, e), dtype="float64")
    am = g.input("am", shape=(None, 1, s, s), dtype="float64")
    y = g.input("y", shape=(None, s, e), dtype="float64")
    attn = nn.MultiHeadAttention(e, 2, mask_inputs=("attn_mask",))
    g.loss("loss", nn.MSELoss(), g.layer("attn", attn, x, am), y)
    data = {
        "x": rng.standard_normal((b, s, e)),
        "am": np.where(rng.random((b, 1, s, s)) < 0.3, -np.inf, 0.0),
        "y": rng.standard_normal((b, s, e)),
    }
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64",
                     check_finite=check_finite)  # fmt: skip
    losses = tr.fit(data, batch_size=8).losses
    assert np.isfinite(losses).all()
    data["am"][3, 0, 1, 2] = np.nan  # no mask means that
    with pytest.raises(ValueError, match=r"input 'am' \(an attention mask\) holds NaN or \+inf, "
                       r"first in row 3: .*-inf"):  # fmt: skip
        tr.fit(data, batch_size=8)
    data["am"][3, 0, 1, 2] = 0.0
    if not check_finite:  # a value the run's float32 makes +inf is refused as one
        as32 = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
        data["am"][5, 0, 0, 1] = 1e39
        with pytest.raises(ValueError, match=r"'am' .* \+inf as the run casts it to float32"):
            as32.fit(data, batch_size=8)
        data["am"][5, 0, 0, 1] = 0.0
    data["x"][1, 0, 0] = np.inf  # the data the layer computes on is checked as ever
    with pytest.raises(ValueError, match=r"input 'x' contains NaN or Inf, first in row 1"):
        tr.fit(data, batch_size=8)


def test_float_data_for_an_int_input_names_both_fixes_not_only_the_cast_that_truncates():
    # (a regression's targets with label_dtype left at int64 were told to cast to integers,
    # which trains on them truncated without a word)
    g = ann.Graph.sequential(
        [nn.Linear(5, 2)], loss=nn.MSELoss(), input_shape=(None, 5), label_shape=(None, 2)
    )
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    x = _data()["x"]
    targets = np.random.default_rng(1).standard_normal((40, 2))
    for what, call in [
        ("", lambda: tr.fit({"x": x, "y": targets}, batch_size=8)),
        ("evaluate: ", lambda: tr.evaluate({"x": x, "y": targets})),
    ]:
        with pytest.raises(ValueError) as e:
            call()
        said = str(e.value)
        assert said.startswith(f"{what}input 'y' is declared int64 but got float64 data: ")
        # real values: the declaration first, the cast (for labels and ids only) after
        declare = said.index("label_dtype='float32'")
        assert "g.input('y', shape, dtype='float32')" in said
        assert f"{targets[0, 0]:g} in row 0" in said and "truncate" in said
        assert declare < said.index("y.astype(np.int64)")
    # whole numbers held as floats (class labels read from a CSV): the cast first, both named
    data = _data()
    tr = _trainer(policies.Sync())
    with pytest.raises(ValueError) as e:
        tr.fit({"x": data["x"], "y": data["y"].astype(float)}, batch_size=8)
    said = str(e.value)
    assert said.index("y.astype(np.int64)") < said.index("label_dtype='float32'")
    assert "class labels or ids" in said


def test_a_node_on_a_worker_the_cluster_lacks_is_refused_when_the_trainer_is_made():
    # (the Trainer took it, and only its fit refused it, after the data were checked)
    from _cluster_cases import chain

    cluster = ann.cluster.LocalCluster(workers=4)  # (nothing starts until a fit)
    opts = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync(), "cluster": cluster}
    with pytest.raises(
        ann.GraphError,
        match=r"^layer 's1' is placed on worker=7, but the cluster has 4 workers \(0\.\.3\)",
    ):
        ann.Trainer(chain([0, 7, None]), **opts)
    with pytest.raises(ann.GraphError, match=r"^loss 'loss' is placed on worker=4, but .* 4 w"):
        ann.Trainer(chain([0, 1, None], loss_worker=4), **opts)
    interleaved = {**opts, "policy": policies.Interleaved1F1B(microbatches=4)}
    with pytest.raises(ann.GraphError, match=r"\['s0', 's2'\] on one device.*different"):
        ann.Trainer(chain([0, 1, 1, 0]), **interleaved)  # (stages that take turns: one process)
    assert not cluster.started
    ann.Trainer(chain([0, 3, None]), **opts)  # (the last worker is one)
    ann.Trainer(chain([0, 7, None]), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
