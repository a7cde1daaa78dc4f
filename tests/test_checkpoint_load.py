"""Checkpoints loaded with overrides: another dtype, optimizer, graph, policy or run options."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._checkpoint import CheckpointError
from asyncnn._math._pytree import tree_leaves

from _checkpoint_cases import _copy, _data, _rewrite_spec, _sync_trainer, _trainer
from _reference import assert_params_equal, chain_graph, classification_data

pytestmark = pytest.mark.timeout(120)


def test_a_dtype_override_casts_the_weights_and_optimizer_state(saved: Any, tmp_path: Any) -> None:
    path, tr = saved
    wide = ann.Trainer.load(path, dtype="float64")
    assert wide.dtype == "float64"
    for name, params in wide.params.items():
        for a, b in zip(params[0].values(), tr.params[name][0].values(), strict=True):
            assert a.dtype == np.float64
            np.testing.assert_array_equal(a, b.astype(np.float64))
    adam = wide.state.opt_states["stage0"]
    assert adam["exp_avg"][0]["weight"].dtype == np.float64
    wide.save(str(tmp_path / "wide"))  # and back: float64 to float32 is the same numbers again
    narrow = ann.Trainer.load(str(tmp_path / "wide"), dtype="float32")
    assert_params_equal(narrow.params, tr.params)


def test_a_bfloat16_checkpoint_without_ml_dtypes_says_to_install_it_not_malformed(
    saved: Any, tmp_path: Any
) -> None:
    # (it said "spec.msgpack is malformed: 'dtype' must name a floating dtype ..., got
    # 'bfloat16'", sending users looking for damage in an intact file)
    from asyncnn.backends._dtypes import BFLOAT16

    if BFLOAT16 is not None:  # ml_dtypes installed: a bfloat16 checkpoint loads
        return
    path, _ = saved
    folder = _copy(path, str(tmp_path / "bf16"))
    _rewrite_spec(folder, lambda spec: spec.update(dtype="bfloat16"))  # as a bfloat16 run's
    for overrides in ({}, {"dtype": "float32"}):  # (its arrays are bfloat16 in the file too)
        with pytest.raises(CheckpointError) as info:
            ann.Trainer.load(folder, **overrides)
        said = str(info.value)
        assert "malformed" not in said and "damaged" not in said
        assert "bfloat16, which needs the ml_dtypes package (pip install ml_dtypes)" in said


def test_another_optimizer_starts_its_own_state_and_the_same_kind_keeps_it(saved: Any) -> None:
    path, tr = saved
    rng = np.random.default_rng(1)
    data = {"x": rng.normal(size=(16, 6)).astype("float32"), "y": rng.integers(0, 3, 16)}
    sgd = ann.Trainer.load(path, optimizer=optim.SGD(lr=0.1, momentum=0.9))
    assert sgd.state.opt_states["stage0"]["step"] == 0 and sgd.versions == tr.versions
    assert_params_equal(sgd.params, tr.params)
    sgd.fit(data, batch_size=16)  # was an ActorError: SGD.update handed Adam's state
    assert sgd.versions["stage0"] == tr.versions["stage0"] + 1
    slower = ann.Trainer.load(path, optimizer=optim.Adam(lr=1e-4))
    kept, was = slower.state.opt_states["stage1"], tr.state.opt_states["stage1"]
    assert kept["step"] == was["step"] > 0
    np.testing.assert_array_equal(kept["exp_avg_sq"][0]["bias"], was["exp_avg_sq"][0]["bias"])


def test_an_unknown_override_is_named_with_the_accepted_ones_before_anything_is_read(
    saved: Any, tmp_path: Any
) -> None:
    # (Trainer.load(path, lr=1e-4) failed with "Trainer.__init__() got an unexpected keyword
    # argument 'lr'", naming a call the user never made and not how to change a learning rate)
    path, _ = saved
    with pytest.raises(TypeError) as e:
        ann.Trainer.load(path, lr=1e-4)
    said = str(e.value)
    assert said.startswith("Trainer.load: unknown override 'lr'; overrides are ")
    for accepted in ("optimizer", "policy", "dtype", "graph", "check_finite", "trusted_modules"):
        assert accepted in said
    assert "optimizer=optim.AdamW(lr=1e-4)" in said
    with pytest.raises(TypeError, match=r"unknown overrides \['epochs', 'lr'\]"):
        ann.Trainer.load(path, lr=1e-4, epochs=3, progress=True)
    # checked first: a missing folder is not read to tell it
    with pytest.raises(TypeError, match="unknown override 'lr'"):
        ann.Trainer.load(str(tmp_path / "missing"), lr=1e-4)

    class Mine(ann.Trainer):  # a subclass's own arguments are overrides too
        def __init__(self, *args: Any, note: str = "", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.note = note

    assert Mine.load(path, note="resumed", progress=True).note == "resumed"


def _placed(widths: tuple[int, int] = (8, 3), bias: bool = True) -> ann.Graph:
    """The graph of ``_trainer`` built by hand (as another placement of its layers would be)."""
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("stage0", nn.Sequential(nn.Linear(6, widths[0], bias=bias), nn.Tanh()), x)
    out = g.layer("stage1", nn.Sequential(nn.Linear(widths[0], widths[1])), h)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    return g


def test_a_checkpoint_loads_into_another_graph_of_the_same_layers(saved: Any) -> None:
    # (was a TypeError: "got multiple values for argument 'graph'", though overrides replace
    # constructor arguments: a checkpoint saved on a GPU could not be put on a CPU)
    path, tr = saved
    back = ann.Trainer.load(path, graph=_placed())
    assert back.versions == tr.versions and back.state.minibatches == tr.state.minibatches
    assert_params_equal(back.params, tr.params)
    assert_params_equal(back.state.opt_states, tr.state.opt_states)
    with pytest.raises(TypeError, match="graph must be an asyncnn Graph, got dict"):
        ann.Trainer.load(path, graph={})


def test_a_gpu_checkpoint_without_cupy_says_how_to_load_it_on_the_cpu(
    saved: Any, tmp_path: Any
) -> None:
    # the error named a layer failing on its inputs and said "place the work on device='cpu'",
    # which a load cannot do: the saved graph's devices come from the checkpoint
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is installed: the checkpoint would load on the GPU")
    path, tr = _copy(saved[0], str(tmp_path / "gpu")), saved[1]

    def on_gpu(spec: Any) -> None:
        for node in spec["graph"]["nodes"]:
            if node["kind"] == "layer":
                node["device"] = "cuda:0"

    _rewrite_spec(path, on_gpu)
    with pytest.raises(ImportError) as info:
        ann.Trainer.load(path)
    said = str(info.value)
    for part in ("'stage0'", "cuda:0", "cupy", "graph=", "device='cpu'"):
        assert part in said, (part, said)
    back = ann.Trainer.load(path, graph=_placed())  # the way it names: the weights come
    assert_params_equal(back.params, tr.params)


@pytest.mark.parametrize(
    ("graph", "says"),
    [
        (lambda: _placed((9, 3)), r"the parameters of 'stage0', at \[0\]\['bias'\], have shape "
                                  r"\(8,\) in the checkpoint, \(9,\) in the graph"),
        (lambda: _placed((8, 4)), r"'stage1', at \[0\]\['bias'\], have shape \(3,\)"),
        (lambda: _placed(bias=False), r"'stage0', at \[0\], hold the keys \['bias', 'weight'\] "
                                      r"in the checkpoint, the keys \['weight'\] in the graph"),
        (lambda: ann.Graph.sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)],
                                      loss=nn.CrossEntropyLoss(), stages=[1, 2],
                                      input_shape=(None, 6)),
         r"'stage0' hold a list of 2 entries in the checkpoint, a list of 1 entries"),
        (lambda: ann.Graph.sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)],
                                      loss=nn.CrossEntropyLoss(), stages=3,
                                      input_shape=(None, 6)),
         r"has no weights for the layers \['stage2'\] \(the checkpoint's layers: \['stage0', "
         r"'stage1'\]; the graph's: \['stage0', 'stage1', 'stage2'\]\)"),
    ],
    ids=["width", "classes", "no-bias", "another-cut", "another-layer"],
)  # fmt: skip
def test_loading_into_a_graph_that_differs_names_the_layer_and_the_shapes(
    saved: Any, graph: Any, says: str
) -> None:
    path, _ = saved
    with pytest.raises(CheckpointError, match=r"does not fit the graph given: .*" + says):
        ann.Trainer.load(path, graph=graph())


def test_the_run_options_come_back_with_the_checkpoint(tmp_path: Any) -> None:
    # a loaded trainer lost check_finite=True, its stall_timeout and trace payloads: back to
    # the defaults, silently
    tr = _trainer()
    tr.check_finite, tr.stall_timeout, tr.trace_payloads, tr.cuda_graphs = True, 5.0, "all", False
    path = str(tmp_path / "c")
    tr.save(path)
    back = ann.Trainer.load(path)
    assert (back.check_finite, back.stall_timeout, back.trace_payloads, back.cuda_graphs) == (
        True, 5.0, "all", False,
    )  # fmt: skip
    over = ann.Trainer.load(path, check_finite=False, stall_timeout=9.0)  # overrides still win
    assert (over.check_finite, over.stall_timeout, over.trace_payloads) == (False, 9.0, "all")
    older = _copy(path, str(tmp_path / "older"))  # a checkpoint written before options were kept
    _rewrite_spec(older, lambda s: s.pop("options"))
    old = ann.Trainer.load(older)
    assert (old.check_finite, old.stall_timeout, old.trace_payloads) == (False, 60.0, "inputs")


def test_another_kind_of_policy_drops_the_gradients_the_saved_one_had_pending(
    tmp_path: Any,
) -> None:
    # (Async's summed gradients of its last keys went unscaled into Sync's first update)
    import dataclasses

    data = _data()
    tr = _sync_trainer()
    tr.policy = policies.Async(max_active_keys=1, min_update_frequency=3)  # one key at a time
    tr.fit(data, epochs=1, batch_size=8)
    assert {n: c for n, (_, c) in tr.state.pending_grads.items()} == {"stage0": 1, "stage1": 1}
    tr.save(str(tmp_path / "c"))
    same_kind = ann.Trainer.load(str(tmp_path / "c"), policy=policies.Async(2, 2))
    assert {n: c for n, (_, c) in same_kind.state.pending_grads.items()} == {
        "stage0": 1, "stage1": 1,
    }  # fmt: skip
    sync = ann.Trainer.load(str(tmp_path / "c"), policy=policies.Sync())
    assert sync.state.pending_grads == {} and sync.versions == tr.versions
    reference = _sync_trainer()
    reference.state = dataclasses.replace(tr.state, pending_grads={})
    for trainer in (sync, reference):
        trainer.fit(data, epochs=1, batch_size=8)
    assert_params_equal(sync.params, reference.params)


def test_gradients_pending_of_skipped_keys_alone_load(tmp_path: Any) -> None:
    # (an expert given no rows by the keys since its last update, under Async with
    # min_update_frequency > 1, holds (None, count); its checkpoint was refused: "the pending
    # gradients of 'e0' hold NoneType in the checkpoint")
    tr = _sync_trainer()
    tr.policy = policies.Async(max_active_keys=1, min_update_frequency=3)
    tr.state.pending_grads["stage0"] = (None, 2)
    tr.save(str(tmp_path / "c"))
    back = ann.Trainer.load(str(tmp_path / "c"))
    assert back.state.pending_grads == {"stage0": (None, 2)}


# -- PipeDream2BW's version before the latest ------------------------------------------------------
def _two_bw() -> ann.Trainer:
    g = ann.Graph.sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)],
                             loss=nn.CrossEntropyLoss(), stages=[2, 1], input_shape=(None, 6))  # fmt: skip
    return ann.Trainer(g, optimizer=optim.Adam(lr=1e-2), policy=policies.PipeDream2BW(2), seed=1)


def test_a_checkpoint_keeps_the_version_before_the_latest_in_its_dtype(tmp_path: Any) -> None:
    tr = _two_bw()
    tr.fit(_data(), epochs=1, batch_size=8)
    tr.save(tmp_path / "c")
    back = ann.Trainer.load(tmp_path / "c")
    earlier = back.state.earlier_params
    assert {n: sorted(e) for n, e in earlier.items()} == {"stage0": [3], "stage1": [3]}
    assert_params_equal({n: e[3] for n, e in earlier.items()},
                        {n: e[3] for n, e in tr.state.earlier_params.items()})  # fmt: skip
    wide = ann.Trainer.load(tmp_path / "c", dtype="float64")
    assert wide.state.earlier_params["stage0"][3][0]["weight"].dtype == np.float64
    # the next fit goes on with it: its first minibatch is a version behind, as in one fit
    hist = back.fit(_data(), epochs=1, batch_size=8)
    assert hist.statistics["stage0"].delays == {1: 4 * 2}


def test_a_checkpoint_without_the_version_before_the_latest_starts_the_stream_anew(
    tmp_path: Any,
) -> None:
    # (as an asyncnn before the layout kept it wrote it: it loads, and its next fit computes
    # its first minibatch at the saved weights, as every fit did then)
    tr = _two_bw()
    tr.fit(_data(), epochs=1, batch_size=8)
    tr.save(tmp_path / "c")
    _rewrite_spec(str(tmp_path / "c"),
                  lambda spec: [e.pop("earlier") for e in spec["layout"].values()])  # fmt: skip
    old = ann.Trainer.load(tmp_path / "c")
    assert old.state.earlier_params == {} and old.versions == tr.versions
    hist = old.fit(_data(), epochs=1, batch_size=8)
    assert hist.statistics["stage0"].delays == {0: 2, 1: 3 * 2}
    tr.state = dataclasses.replace(tr.state, earlier_params={})
    tr.fit(_data(), epochs=1, batch_size=8)
    assert_params_equal(old.params, tr.params)


@pytest.mark.parametrize(
    "earlier,said",
    [
        ("v3", r"must be a list of maps with 'version' and 'params', got 'v3'"),
        ([{"version": 3}], r"must be a list of maps with 'version' and 'params', got \[\{"),
        ([{"version": 4, "params": {}}], r"holds version 4, which is not below the layer's 4"),
        ([{"version": True, "params": {}}], r"holds version True, which is not a count"),
    ],
    ids=["not-a-list", "no-params", "not-below", "a-bool"],
)
def test_a_damaged_earlier_version_is_named(tmp_path: Any, earlier: Any, said: str) -> None:
    tr = _two_bw()
    tr.fit(_data(), epochs=1, batch_size=8)  # 4 minibatches: version 4, the one before 3
    tr.save(tmp_path / "c")

    def damage(spec: dict[str, Any]) -> None:
        spec["layout"]["stage1"]["earlier"] = earlier

    _rewrite_spec(str(tmp_path / "c"), damage)
    with pytest.raises(
        CheckpointError,
        match=r"spec.msgpack is malformed: 'layout' of 'stage1': its 'earlier' " + said,
    ):
        ann.Trainer.load(tmp_path / "c")


# -- the delays of the gradients pending -----------------------------------------------------------
def _spike_async() -> ann.Trainer:
    policy = policies.SpikeCompensation(policies.Async(2, min_update_frequency=3))
    return ann.Trainer(chain_graph(3), optimizer=optim.SGD(lr=0.1, momentum=0.5), policy=policy,
                       dtype="float64")  # fmt: skip


def test_a_checkpoint_keeps_the_delays_of_the_gradients_pending(tmp_path: Any) -> None:
    # (saved without them, the resumed fit's first update applied the carried gradient as of no
    # delay: SpikeCompensation corrected it otherwise than one unbroken fit)
    data = classification_data(32)  # 4 keys: one gradient pending, of delay 1
    straight = _spike_async()
    straight.fit(data, epochs=2, batch_size=8)
    tr = _spike_async()
    tr.fit(data, epochs=1, batch_size=8)
    tr.save(tmp_path / "c")
    back = ann.Trainer.load(tmp_path / "c")
    assert back.state.pending_delays == dict.fromkeys(tr.graph.layers, [1])
    back.fit(data, epochs=1, batch_size=8)
    assert_params_equal(back.params, straight.params)
    # a checkpoint of an asyncnn before them loads as before: the carried gradient of no delay
    _rewrite_spec(str(tmp_path / "c"),
                  lambda spec: [e["pending"].pop("delays") for e in spec["layout"].values()])  # fmt: skip
    old = ann.Trainer.load(tmp_path / "c")
    assert old.state.pending_delays == {} and old.state.pending_grads
    old.fit(data, epochs=1, batch_size=8)
    tr.state = dataclasses.replace(tr.state, pending_delays={})
    tr.fit(data, epochs=1, batch_size=8)
    assert_params_equal(old.params, tr.params)
    # a policy of another kind drops the pending gradients, and their delays with them
    sync = ann.Trainer.load(tmp_path / "c", policy=policies.Sync())
    assert sync.state.pending_grads == {} and sync.state.pending_delays == {}


@pytest.mark.parametrize("delays", [[1, 1], [-1], [1.5]], ids=["too-many", "negative", "float"])
def test_a_state_the_load_would_refuse_is_refused_before_it_is_saved(
    tmp_path: Any, delays: list[Any]
) -> None:
    # (Trainer.save wrote it, a float delay cut to an int, and its own Trainer.load refused it)
    tr = _spike_async()
    tr.fit(classification_data(32), epochs=1, batch_size=8)
    name = tr.graph.layers[0]
    tr.state = dataclasses.replace(tr.state, pending_delays={name: delays})
    with pytest.raises(ValueError, match=rf"^Trainer\.save: the trainer's state would not load "
                       rf"again: state\.pending_delays\[{name!r}\]"):  # fmt: skip
        tr.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "change,said",
    [
        ({"versions": 5.0}, r"state\.versions\['stage0'\] is 5\.0, which is not a version"),
        ({"minibatches": -1}, r"state\.minibatches is -1, which is not a count"),
        ({"ghost": True}, r"state\.params has layers \['ghost'\], which the graph lacks"),
    ],
    ids=["float-version", "negative-minibatches", "extra-layer"],
)
def test_versions_and_counters_the_load_would_refuse_are_refused_before_they_are_saved(
    tmp_path: Any, change: dict[str, Any], said: str
) -> None:
    # (a float version, as JSON gives it back, was saved, and Trainer.load refused the
    # checkpoint: "'version' must be a count (an int >= 0), got 5.0")
    tr = _spike_async()
    tr.fit(classification_data(32), epochs=1, batch_size=8)
    st = tr.state
    if "versions" in change:
        tr.state = dataclasses.replace(st, versions={**st.versions, "stage0": change["versions"]})
    elif "ghost" in change:
        tr.state = dataclasses.replace(st, params={**st.params, "ghost": st.params["stage0"]})
    else:
        tr.state = dataclasses.replace(st, **change)
    with pytest.raises(ValueError, match=rf"^Trainer\.save: the trainer's state would not load "
                       rf"again: {said}"):  # fmt: skip
        tr.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_numpy_versions_and_counters_are_saved_as_ints(tmp_path: Any) -> None:
    # (as a decoder gives them back: msgpack cannot write a numpy int)
    tr = _spike_async()
    data = classification_data(32)
    tr.fit(data, epochs=1, batch_size=8)
    st = tr.state
    tr.state = dataclasses.replace(
        st, versions={n: np.int64(v) for n, v in st.versions.items()},
        minibatches=np.int64(st.minibatches), keys=np.int64(st.keys),
    )  # fmt: skip
    tr.save(tmp_path / "c")
    back = ann.Trainer.load(tmp_path / "c")
    assert back.state.versions == st.versions and back.state.keys == st.keys
    assert all(type(v) is int for v in back.state.versions.values())


@pytest.mark.parametrize(
    "delays,said",
    [
        (3, r"'delays' must be a list of the pending gradients' delays \(ints >= 0\), got 3"),
        ([-1], r"'delays' must be a list .* got \[-1\]"),
        ([True], r"'delays' must be a list .* got \[True\]"),
        ([1, 1], r"holds 2 'delays', more than the 1 gradients its 'count' says it sums"),
    ],
    ids=["not-a-list", "negative", "a-bool", "too-many"],
)
def test_damaged_pending_delays_are_named(tmp_path: Any, delays: Any, said: str) -> None:
    tr = _spike_async()
    tr.fit(classification_data(32), epochs=1, batch_size=8)
    tr.save(tmp_path / "c")

    def damage(spec: dict[str, Any]) -> None:
        spec["layout"]["stage1"]["pending"]["delays"] = delays

    _rewrite_spec(str(tmp_path / "c"), damage)
    with pytest.raises(
        CheckpointError, match=r"spec.msgpack is malformed: 'layout' of 'stage1': its 'pending' "
        + said,
    ):  # fmt: skip
        ann.Trainer.load(tmp_path / "c")


# -- the optimizer state, checked as the optimizer's update would check it -------------------------
def _rewrite_arrays(path: str, change: Any) -> None:
    """Changes the arrays file and re-signs it, as :func:`_rewrite_spec` does the spec."""
    import hashlib
    import json
    from pathlib import Path

    from safetensors.numpy import load_file, save_file

    file = Path(path, "arrays.safetensors")
    arrays = load_file(str(file))
    change(arrays)
    save_file(arrays, str(file))
    raw = file.read_bytes()
    manifest = json.loads(Path(path, "manifest.json").read_text())
    manifest["files"]["arrays.safetensors"] = {
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    Path(path, "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("step", [-5, 1.5, True, "2", None], ids=str)
def test_a_damaged_optimizer_step_is_named_on_load(saved: Any, tmp_path: Any, step: Any) -> None:
    # (it loaded, and the next fit failed in open_run, or an update computed Adam's bias
    # correction of a step that never was)
    path, _ = saved
    folder = _copy(path, str(tmp_path / "c"))

    def damage(spec: dict[str, Any]) -> None:
        spec["layout"]["stage0"]["opt_state"]["dict"]["step"] = {"value": step}

    _rewrite_spec(folder, damage)
    with pytest.raises(CheckpointError) as info:
        ann.Trainer.load(folder)
    said = str(info.value)
    assert "the optimizer state of 'stage0'" in said
    assert f"state['step'] must be an int >= 0 (the updates made), got {step!r}" in said


@pytest.mark.parametrize(
    "change,said",
    [
        (lambda a: a.astype(np.int32), "have dtype int32 in the checkpoint, float32 in the graph"),
        (lambda a: a.astype(np.bool_), "have dtype bool in the checkpoint, float32 in the graph"),
        (lambda a: a[:2], r"have shape (2,) in the checkpoint, (8,) in the graph"),
    ],
    ids=["int32", "bool", "shape"],
)
def test_a_damaged_optimizer_buffer_is_named_on_load(
    saved: Any, tmp_path: Any, change: Any, said: str
) -> None:
    # (an int32 exp_avg loaded, and the layer's first update failed inside the run)
    path, _ = saved
    folder = _copy(path, str(tmp_path / "c"))
    _rewrite_arrays(
        folder, lambda arrays: arrays.update({"opt/stage0/0": change(arrays["opt/stage0/0"])})
    )
    for overrides in ({}, {"dtype": "float32"}, {"optimizer": optim.Adam(lr=1e-3)}):
        with pytest.raises(CheckpointError) as info:
            ann.Trainer.load(folder, **overrides)
        assert "the optimizer state of 'stage0', at ['exp_avg'][0]['bias']," in str(info.value)
        assert said in str(info.value)


def test_an_optimizer_buffer_of_another_float_dtype_is_cast_on_load(
    saved: Any, tmp_path: Any
) -> None:
    path, tr = saved
    folder = _copy(path, str(tmp_path / "c"))
    _rewrite_arrays(
        folder,
        lambda arrays: arrays.update({"opt/stage0/0": arrays["opt/stage0/0"].astype(np.float64)}),
    )
    back = ann.Trainer.load(folder)
    bias = back.state.opt_states["stage0"]["exp_avg"][0]["bias"]
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias, tr.state.opt_states["stage0"]["exp_avg"][0]["bias"])


def test_a_numpy_integer_step_a_state_held_loads_as_the_count(tmp_path):
    # (Optimizer.update takes a numpy integer step; a trainer holding one saved it, and its
    # load refused it: "at ['step'], hold int64 in the checkpoint, int in the graph")
    tr = ann.Trainer(chain_graph(2), optimizer=optim.Adam(lr=1e-2), policy=policies.Sync())
    tr.fit(classification_data(32), epochs=1, batch_size=16)
    for name in tr.state.opt_states:
        tr.state.opt_states[name]["step"] = np.int64(tr.state.opt_states[name]["step"])
    tr.save(str(tmp_path / "ck"))
    back = ann.Trainer.load(str(tmp_path / "ck"))
    assert {n: s["step"] for n, s in back.state.opt_states.items()} == {
        n: 2 for n in tr.state.opt_states
    }
    assert all(type(s["step"]) is int for s in back.state.opt_states.values())
    back.fit(classification_data(32), epochs=1, batch_size=16)


def test_a_save_interrupted_between_its_renames_on_a_read_only_folder_says_so(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the load's finishing of the save failed with a bare "OSError: [Errno 30] Read-only file
    # system: '.../spec.msgpack.tmp' -> '.../spec.msgpack'", of no checkpoint and no remedy)
    import errno
    import os
    import re

    folder = str(tmp_path / "c")
    tr = _sync_trainer()
    tr.save(folder)
    tr.fit(_data(), epochs=1, batch_size=8)
    real, calls = os.replace, []

    def interrupted(src: Any, dst: Any) -> None:
        if calls:
            raise KeyboardInterrupt  # after the first rename
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.save(folder)

    def read_only(src: Any, dst: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", src, None, dst)

    monkeypatch.setattr(os, "replace", read_only)
    before = sorted(os.listdir(folder))
    with pytest.raises(CheckpointError, match=(
        rf"^{re.escape(folder)}: a save into this folder was interrupted between its renames "
        r".* cannot be finished here \(Read-only file system: .*spec\.msgpack\.tmp\): copy the folder to a "
        r"writable place and load it there"
    )):  # fmt: skip
        ann.Trainer.load(folder)
    assert sorted(os.listdir(folder)) == before  # nothing renamed, nothing removed
    monkeypatch.setattr(os, "replace", real)
    assert ann.Trainer.load(folder).state.minibatches == 4  # writable again: finished


def _which(loaded: ann.Trainer, old: ann.Trainer, new: ann.Trainer) -> str:
    """Which checkpoint ``loaded`` is, whole: "old", "new", or "mixed" (the spec of one, the
    arrays of the other)."""
    from asyncnn._math._pytree import tree_leaves

    def same(a: ann.Trainer, b: ann.Trainer) -> bool:
        leaves = zip(tree_leaves(a.params), tree_leaves(b.params), strict=True)
        return (a.state.minibatches, a.versions) == (b.state.minibatches, b.versions) and all(
            np.array_equal(np.asarray(x), np.asarray(y)) for x, y in leaves
        )

    return "old" if same(loaded, old) else "new" if same(loaded, new) else "mixed"


def _two_checkpoints(folder: str) -> tuple[ann.Trainer, ann.Trainer, ann.Trainer]:
    """A trainer saved to ``folder`` after one epoch, then trained one more (not saved): the
    trainer, the old checkpoint as loaded, and the new one's state (loaded from a copy)."""
    import os

    tr = _sync_trainer()
    tr.fit(_data(), epochs=1, batch_size=8)
    tr.save(folder)
    old = ann.Trainer.load(folder)
    tr.fit(_data(), epochs=1, batch_size=8)
    elsewhere = os.path.join(os.path.dirname(folder), "new")
    tr.save(elsewhere)
    return tr, old, ann.Trainer.load(elsewhere)


def test_a_save_landing_between_a_loads_check_and_its_read_waits_for_the_load(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the load checked the old checkpoint, then a save's renames landed before it read the
    # arrays: it loaded the old spec's counters and versions with the new weights)
    import threading

    import asyncnn._checkpoint as checkpoint

    fcntl = pytest.importorskip("fcntl")
    folder = str(tmp_path / "c")
    tr, old, new = _two_checkpoints(folder)
    real_read, real_flock = checkpoint._read_arrays, fcntl.flock
    settled = threading.Event()  # the save has ended, or waits for the load's lock
    saver: list[threading.Thread] = []

    def flock(fd: int, op: int) -> None:
        if threading.current_thread() in saver and op == fcntl.LOCK_EX:
            try:
                real_flock(fd, op | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                settled.set()
        real_flock(fd, op)

    def save() -> None:
        try:
            tr.save(folder)
        finally:
            settled.set()

    def read_arrays(path: str) -> Any:
        if not saver:  # a whole save, between the load's check and its read
            saver.append(threading.Thread(target=save))
            saver[0].start()
            assert settled.wait(30)
        return real_read(path)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(checkpoint, "_read_arrays", read_arrays)
    loaded = ann.Trainer.load(folder)
    saver[0].join(30)
    assert not saver[0].is_alive()
    assert _which(loaded, old, new) == "old"  # the save waited for the load to read it
    assert _which(ann.Trainer.load(folder), old, new) == "new"


def _no_folder_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system refusing ``flock`` (some network ones): saves and loads run unlocked."""
    fcntl = pytest.importorskip("fcntl")

    def refused(fd: int, op: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)


@pytest.mark.parametrize("saves", [1, 2], ids=["one-save", "a-save-each-read"])
def test_an_unlocked_load_that_a_save_lands_in_reads_again_or_says_so(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, saves: int
) -> None:
    # (where the folder cannot be locked: the old spec with the new arrays loaded without a
    # word; the checksums are checked again after the read, and a changed checkpoint read again)
    import asyncnn._checkpoint as checkpoint

    _no_folder_locks(monkeypatch)
    folder = str(tmp_path / "c")
    tr, old, new = _two_checkpoints(folder)
    real_read = checkpoint._read_arrays
    savers = [tr, old][:saves]  # (the second save puts the old checkpoint back)

    def read_arrays(path: str) -> Any:
        if savers:
            savers.pop(0).save(folder)  # a whole save, between the load's check and its read
        return real_read(path)

    monkeypatch.setattr(checkpoint, "_read_arrays", read_arrays)
    if saves == 1:
        assert _which(ann.Trainer.load(folder), old, new) == "new"
        return
    with pytest.raises(CheckpointError, match=(
        rf"^{folder}: the checkpoint was replaced while it was read, twice \(saves into this "
        r"folder under way, which the system cannot lock\): load it again once they end"
    )):  # fmt: skip
        ann.Trainer.load(folder)


# -- float16 Adam: its moments are float32 ----------------------------------------------------
def _adam16(optimizer: Any = None) -> ann.Trainer:
    return ann.Trainer(
        chain_graph(2), optimizer=optimizer or optim.Adam(lr=1e-2), policy=policies.Sync(),
        dtype="float16", seed=0,
    )  # fmt: skip


def _moments(tr: ann.Trainer) -> list[np.ndarray]:
    return [
        leaf
        for state in tr.state.opt_states.values()
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        if name in state
        for leaf in tree_leaves(state[name])
    ]


def test_a_float16_adam_trainer_saves_and_resumes_its_float32_moments_bit_for_bit(
    tmp_path: Any,
) -> None:
    # (they were float16: a second moment below float16's smallest value was 0, and the next
    # step with a small gradient moved a weight by up to 1e5 * lr)
    data = classification_data(64)
    tr = _adam16(optim.Adam(lr=1e-2, amsgrad=True))
    assert {m.dtype for m in _moments(tr)} == {np.dtype(np.float32)}
    tr.fit(data, epochs=1, batch_size=16)
    assert {m.dtype for m in _moments(tr)} == {np.dtype(np.float32)}
    assert {leaf.dtype for leaf in tree_leaves(tr.params)} == {np.dtype(np.float16)}
    tr.save(str(tmp_path / "c"))
    back = ann.Trainer.load(str(tmp_path / "c"))
    assert back.dtype == "float16"
    for a, b in zip(_moments(back), _moments(tr), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert_params_equal(back.params, tr.params)
    h1 = tr.fit(data, epochs=1, batch_size=16)
    h2 = back.fit(data, epochs=1, batch_size=16)
    assert h1.losses == h2.losses
    assert_params_equal(back.params, tr.params)
    for a, b in zip(_moments(back), _moments(tr), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_an_older_float16_adam_checkpoint_loads_its_moments_widened(tmp_path: Any) -> None:
    # an asyncnn before kept float16 moments for float16 weights: its checkpoint loads, the
    # moments widened to float32 (the same numbers), and trains on
    data = classification_data(64)
    tr = _adam16()
    tr.fit(data, epochs=1, batch_size=16)
    folder = str(tmp_path / "c")
    tr.save(folder)

    def narrow(arrays: dict[str, np.ndarray]) -> None:
        for k, a in arrays.items():
            if k.startswith("opt/") and a.dtype == np.float32:
                arrays[k] = a.astype(np.float16)

    _rewrite_arrays(folder, narrow)
    back = ann.Trainer.load(folder)
    for a, b in zip(_moments(back), _moments(tr), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32))
    back.fit(data, epochs=1, batch_size=16)
    assert {m.dtype for m in _moments(back)} == {np.dtype(np.float32)}
    assert all(np.isfinite(leaf).all() for leaf in tree_leaves(back.params))


def test_a_float32_adam_checkpoint_loaded_as_float16_keeps_its_moments_whole(
    saved: Any,
) -> None:
    # Trainer.load(dtype="float16"): the weights are cast, the moments stay float32 (cast to
    # float16 a small second moment was 0)
    path, tr = saved
    narrow = ann.Trainer.load(path, dtype="float16")
    assert {leaf.dtype for leaf in tree_leaves(narrow.params)} == {np.dtype(np.float16)}
    for a, b in zip(_moments(narrow), _moments(tr), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_a_float16_adam_state_resumed_by_a_later_fit_keeps_float32_moments() -> None:
    # a fit resumes from the trainer's state through open_run(state=...), which casts the
    # state's float buffers to the dtype the optimizer keeps them in: float32 moments stay so
    data = classification_data(64)
    tr = _adam16(optim.AdamW(lr=1e-2, amsgrad=True))
    for _ in range(2):
        tr.fit(data, epochs=1, batch_size=16)
        assert {m.dtype for m in _moments(tr)} == {np.dtype(np.float32)}
    assert all(np.isfinite(leaf).all() for leaf in tree_leaves(tr.params))


def test_an_embedding_row_missing_from_a_later_fit_moves_by_about_lr() -> None:
    # rows 0-24 get gradients in the first fit only: their second moments (~1e-9) are below
    # float16's smallest value; rounded to it between the fits (open_run(state=...) cast the
    # moments to the run's float16), the second fit moved them by lr * m / eps (256 at lr=1e-3)
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(0, 25, (32, 4)), rng.integers(25, 50, (32, 4))])
    y = rng.integers(0, 3, 64)
    g = ann.Graph.sequential(
        [nn.Embedding(50, 8), nn.Flatten(), nn.Linear(32, 3)], loss=nn.CrossEntropyLoss(),
        input_shape=(None, 4), input_dtype="int64",
    )  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.Adam(lr=1e-3), policy=policies.Sync(), dtype="float16")
    w0 = tr.params["stage0"][0]["weight"].astype(np.float64)
    tr.fit({"x": ids[:32], "y": y[:32]}, epochs=1, batch_size=32)
    tr.fit({"x": ids[32:], "y": y[32:]}, epochs=1, batch_size=32)
    change = np.abs(tr.params["stage0"][0]["weight"].astype(np.float64) - w0)
    assert change.max() < 3e-3


def test_a_load_whose_dtype_cannot_hold_a_weight_is_refused_naming_it(
    saved: Any, tmp_path: Any
) -> None:
    # cast to float16, 1e5 was Inf, silently (the data's check refuses such a value by name)
    path, tr = saved
    folder = str(tmp_path / "big")
    tr2 = ann.Trainer.load(path)
    params = tr2.params
    weight = params["stage0"][0]["weight"].copy()
    weight[0, 0] = 1e5
    params["stage0"][0]["weight"] = weight
    tr2.params = params
    tr2.save(folder)
    with pytest.raises(ValueError, match=r"params\['stage0'\]\[0\]\['weight'\] has 100000, "
                       r"which overflows the trainer's dtype float16 to Inf .*65504.*"
                       r"dtype='float32'") as err:  # fmt: skip
        ann.Trainer.load(folder, dtype="float16")
    assert folder in str(err.value)
    assert ann.Trainer.load(folder, dtype="float64").params["stage0"][0]["weight"][0, 0] == 1e5
