"""Checkpoints: every file checksummed, the format version checked, every damage one named error."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._checkpoint import CheckpointError, read_graph
from asyncnn._math._imports import UntrustedModuleError

from _reference import assert_params_equal

pytestmark = pytest.mark.timeout(120)


def _trainer() -> ann.Trainer:
    g = ann.Graph.sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)],
                             loss=nn.CrossEntropyLoss(), stages=[2, 1], input_shape=(None, 6))  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.Adam(lr=1e-2), policy=policies.GPipe(2), seed=0)
    rng = np.random.default_rng(0)
    tr.fit({"x": rng.normal(size=(32, 6)).astype("float32"), "y": rng.integers(0, 3, 32)},
           epochs=1, batch_size=16)  # fmt: skip
    return tr


@pytest.fixture(scope="module")
def saved(tmp_path_factory: Any) -> tuple[str, ann.Trainer]:
    tr = _trainer()
    path = str(tmp_path_factory.mktemp("ckpt") / "c")
    tr.save(path)
    return path, tr


def _copy(src: str, dst: str) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        Path(dst, name).write_bytes(Path(src, name).read_bytes())
    return dst


def _json(path: str) -> Any:
    return json.loads(Path(path).read_text())


def test_a_checkpoint_has_a_manifest_with_the_checksum_of_every_file(saved: Any) -> None:
    path, tr = saved
    manifest = _json(os.path.join(path, "manifest.json"))
    assert manifest["format"] == "asyncnn-checkpoint" and manifest["version"] == 2
    assert sorted(manifest["files"]) == ["arrays.safetensors", "spec.msgpack"]
    back = ann.Trainer.load(path)
    assert_params_equal(tr.params, back.params)


@pytest.mark.parametrize("name", ["spec.msgpack", "arrays.safetensors", "manifest.json"])
def test_byte_flips_in_every_file_are_refused_or_harmless(
    saved: Any, tmp_path: Any, name: str
) -> None:
    # a flipped byte anywhere in any file: load either refuses it with a CheckpointError that
    # names the file, or (a flip in the manifest's whitespace) loads exactly the saved state
    path, tr = saved
    size = os.path.getsize(os.path.join(path, name))
    rng = np.random.default_rng(len(name))
    offsets = sorted({0, size - 1, *rng.integers(0, size, 24).tolist()})
    for n, at in enumerate(offsets):
        bad = _copy(path, str(tmp_path / f"flip{n}"))
        file = os.path.join(bad, name)
        data = bytearray(Path(file).read_bytes())
        data[at] ^= 0x5A
        Path(file).write_bytes(bytes(data))
        try:
            back = ann.Trainer.load(bad)
        except CheckpointError as exc:
            assert name in str(exc), f"flip at {at} of {name}: {exc}"
            continue
        assert name == "manifest.json", f"a flip at byte {at} of {name} loaded silently"
        assert_params_equal(tr.params, back.params)
        assert back.state.versions == tr.state.versions


def test_a_missing_or_truncated_file_and_another_version_are_named(
    saved: Any, tmp_path: Any
) -> None:
    path, _ = saved
    bad = _copy(path, str(tmp_path / "a"))
    os.unlink(os.path.join(bad, "arrays.safetensors"))
    with pytest.raises(CheckpointError, match=r"arrays\.safetensors is missing"):
        ann.Trainer.load(bad)
    bad = _copy(path, str(tmp_path / "b"))
    with open(os.path.join(bad, "spec.msgpack"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"spec\.msgpack is damaged: it has 100 bytes"):
        ann.Trainer.load(bad)
    bad = _copy(path, str(tmp_path / "c"))
    m = _json(os.path.join(bad, "manifest.json"))
    m["version"] = 99
    Path(bad, "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format version 99; this asyncnn reads version 2"):
        ann.Trainer.load(bad)
    bad = _copy(path, str(tmp_path / "d"))
    os.unlink(os.path.join(bad, "manifest.json"))
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        ann.Trainer.load(bad)


def _rewrite_spec(path: str, change: Any) -> None:
    """Changes the spec and re-signs it, as a careless (or hostile) author would."""
    import hashlib

    import msgpack

    file = os.path.join(path, "spec.msgpack")
    spec = msgpack.unpackb(Path(file).read_bytes(), raw=False, strict_map_key=False)
    change(spec)
    raw = msgpack.packb(spec, use_bin_type=True)
    Path(file).write_bytes(raw)
    m = _json(os.path.join(path, "manifest.json"))
    m["files"]["spec.msgpack"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    Path(path, "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.pop("layout"),
        lambda s: s["layout"].pop("stage0"),
        lambda s: s.update(seed="zero"),
        lambda s: s.update(minibatches=-3),
        lambda s: s["layout"]["stage1"].update(params={"dict": {"weight": {"array": True}}}),
        lambda s: s["layout"]["stage1"].update(version="one"),
        lambda s: s["graph"].update(nodes=7),
        lambda s: s.update(version=1),
        lambda s: s["options"].update(stall_timeout="soon"),
        lambda s: s["options"].update(trace_payloads="most"),
        lambda s: s.update(options=[]),
        lambda s: s["fit"].update(epoch_batches=-1),
        lambda s: s["fit"].update(minibatches=99),
        lambda s: s["fit"].update(epoch_batches=1, epoch_losses=[0.5, 0.4]),
    ],
    ids=[
        "no-layout",
        "no-layer",
        "seed",
        "minibatches",
        "params-tree",
        "version",
        "graph",
        "v1",
        "stall_timeout",
        "trace_payloads",
        "options",
        "fit-epoch_batches",
        "fit-minibatches",
        "fit-epoch_losses",
    ],  # fmt: skip
)
def test_a_well_signed_but_malformed_spec_is_a_checkpoint_error(
    saved: Any, tmp_path: Any, change: Any
) -> None:
    bad = _copy(saved[0], str(tmp_path / "c"))
    _rewrite_spec(bad, change)
    with pytest.raises(CheckpointError, match="spec.msgpack|does not fit"):
        ann.Trainer.load(bad)


def test_a_class_path_in_a_checkpoint_imports_nothing(
    saved: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    # a spec naming evilmod:X must not import evilmod.py from the current directory, and
    # unittest.__main__:X must not run test discovery; trusted_modules= allows a module
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "evilmod.py").write_text("import pathlib\npathlib.Path('ran').touch()\nX = 1\n")
    for target, place in [("evilmod:X", "optimizer"), ("unittest.__main__:X", "optimizer"),
                          ("evilmod:Actor", "actor"), ("evilmod:Layer", "module")]:  # fmt: skip
        bad = _copy(saved[0], str(tmp_path / target.replace(":", "_")))

        def change(s: dict[str, Any], target: str = target, place: str = place) -> None:
            layer = next(n for n in s["graph"]["nodes"] if n["kind"] == "layer")
            if place == "optimizer":
                s["optimizer"] = {"name": target, "lr": 0.1}
            elif place == "actor":
                layer["actor"] = target
            else:
                layer["module"] = {"type": target, "args": {}}

        _rewrite_spec(bad, change)
        with pytest.raises(UntrustedModuleError, match=f"{target}.*trusted_modules=") as info:
            ann.Trainer.load(bad)
        assert "spec.msgpack" in str(info.value)
    assert not (tmp_path / "ran").exists()
    assert "evilmod" not in sys.modules and "unittest.__main__" not in sys.modules
    # trusting the module imports it (and then it is simply not an optimizer)
    bad = str(tmp_path / "evilmod_X")
    with pytest.raises(CheckpointError, match="not a Optimizer subclass"):
        ann.Trainer.load(bad, trusted_modules=["evilmod"])
    assert (tmp_path / "ran").exists()
    sys.modules.pop("evilmod", None)


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


def test_a_damaged_or_foreign_fit_json_is_named_with_the_fix(saved: Any, tmp_path: Any) -> None:
    # (a damaged one gave json's message without the file; one left by an interrupted save,
    # beside another checkpoint, resumed the epoch at the wrong minibatch silently). fit.json
    # is read for a checkpoint whose spec has no position of its own (an older asyncnn's).
    path, tr = saved
    older = _copy(path, str(tmp_path / "older"))
    _rewrite_spec(older, lambda s: s.pop("fit"))
    path = older
    damaged = _copy(path, str(tmp_path / "damaged"))
    Path(damaged, "fit.json").write_text("{epoch_batches: 3")
    with pytest.raises(ValueError, match=r"fit.json is damaged .*delete .*fit.json to start"):
        ann.Trainer.load(damaged)
    foreign = _copy(path, str(tmp_path / "foreign"))
    minibatches = tr.state.minibatches
    Path(foreign, "fit.json").write_text(
        json.dumps({"epoch_batches": 1, "minibatches": minibatches + 5})
    )
    with pytest.raises(ValueError, match=rf"after {minibatches + 5} minibatches, the checkpoint"):
        ann.Trainer.load(foreign)
    Path(foreign, "fit.json").write_text(json.dumps({"epoch_batches": 1}))  # older saves
    assert ann.Trainer.load(foreign).epoch_batches == 1


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


def test_read_graph_reads_the_spec_alone(saved: Any, tmp_path: Any) -> None:
    # (the CLI's --resume DIR --workers N loaded the whole checkpoint to read its graph)
    path, tr = saved
    assert read_graph(path).to_spec() == tr.graph.to_spec()
    folder = _copy(path, str(tmp_path / "c"))
    os.remove(os.path.join(folder, "arrays.safetensors"))  # the arrays are not read
    assert read_graph(folder).layers == tr.graph.layers
    with pytest.raises(CheckpointError, match="arrays.safetensors is missing"):
        ann.Trainer.load(folder)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        read_graph(str(tmp_path / "none"))


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


def test_a_save_refuses_to_overwrite_files_that_are_not_a_checkpoint(
    saved: Any, tmp_path: Any
) -> None:
    # (a save into a folder of another tool overwrote its manifest.json without a word)
    _, tr = saved
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my app"}')
    with pytest.raises(FileExistsError, match=r"it holds manifest.json, which saving would "
                                              r"overwrite, and it is not an asyncnn checkpoint"):  # fmt: skip
        tr.save(str(app))
    assert (app / "manifest.json").read_text() == '{"name": "my app"}'
    assert sorted(os.listdir(app)) == ["manifest.json"]
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(FileExistsError, match="it is a file; a checkpoint is a folder"):
        tr.save(str(tmp_path / "a-file"))
    # a checkpoint is replaced, and a folder of other files gets one beside them
    tr.save(str(tmp_path / "ckpt"))
    tr.save(str(tmp_path / "ckpt"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("mine")
    tr.save(str(tmp_path / "notes"))
    assert_params_equal(ann.Trainer.load(str(tmp_path / "notes")).params, tr.params)
    assert (tmp_path / "notes" / "README").read_text() == "mine"


@pytest.mark.parametrize("renames_done", [0, 1, 2])
@pytest.mark.parametrize("first", [True, False], ids=["first-save", "over-a-checkpoint"])
def test_a_save_interrupted_between_its_renames_loads_whole(
    saved: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, renames_done: int, first: bool
) -> None:
    # (one interrupted after its first rename left neither checkpoint loadable: the old one's
    # files half replaced, the new one's refused by the old manifest)
    path, old = saved
    folder = str(tmp_path / "c")
    if not first:
        _copy(path, folder)
    new = _trainer()
    new.params = {"stage1": [{k: v + 1 for k, v in new.params["stage1"][0].items()}]}
    real, calls = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        if len(calls) == renames_done:
            raise KeyboardInterrupt  # between two renames
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        new.save(folder)
    monkeypatch.setattr(os, "replace", real)
    if renames_done == 0 and not first:  # nothing renamed: the old checkpoint, as it was
        assert_params_equal(ann.Trainer.load(folder).params, old.params)
        return
    back = ann.Trainer.load(folder)  # the new one, its renames finished
    assert_params_equal(back.params, new.params)
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


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


# -- saves interrupted or failing; the epoch's position; another policy --------------------------


class _StopAt(ann.callbacks.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Any, step: int, logs: Any) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def _sync_trainer() -> ann.Trainer:
    g = ann.Graph.sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)],
                             loss=nn.CrossEntropyLoss(), stages=[2, 1], input_shape=(None, 6))  # fmt: skip
    return ann.Trainer(g, optimizer=optim.SGD(lr=0.1, momentum=0.9), policy=policies.Sync(), seed=2)


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"x": rng.normal(size=(32, 6)), "y": rng.integers(0, 3, 32)}


def _interrupt_renames(monkeypatch: pytest.MonkeyPatch, after: int) -> list[str]:
    """``os.replace`` raising KeyboardInterrupt after ``after`` renames (until undone)."""
    real, calls = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_save_interrupted_mid_epoch_between_its_renames_resumes_where_it_stood(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the load finished the renames, then refused the older save's fit.json beside them: "delete
    # fit.json to start the interrupted epoch over", and the epoch's position was lost)
    data = _data()
    straight = _sync_trainer()
    straight.fit(data, epochs=2, batch_size=8, shuffle=True)
    tr = _sync_trainer()
    folder = str(tmp_path / "c")
    tr.save(folder)  # an earlier checkpoint in the folder, at minibatch 0
    with pytest.raises(KeyboardInterrupt):
        tr.fit(data, epochs=2, batch_size=8, shuffle=True, callbacks=[_StopAt(5)])
    assert (tr.epochs_done, tr.epoch_batches) == (1, 2)
    _interrupt_renames(monkeypatch, after=1)
    with pytest.raises(KeyboardInterrupt):
        tr.save(folder)
    monkeypatch.undo()
    back = ann.Trainer.load(folder)
    assert (back.state.minibatches, back.epochs_done, back.epoch_batches) == (6, 1, 2)
    back.fit(data, epochs=1, batch_size=8, shuffle=True)  # finishes epoch 1 from minibatch 2
    assert_params_equal(back.params, straight.params)


def test_a_save_over_one_interrupted_between_its_renames_keeps_a_whole_checkpoint(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the second save wrote its spec over the first's, which was still to be renamed; interrupted
    # in its turn, it left neither checkpoint loadable: "arrays.safetensors is damaged")
    import asyncnn._checkpoint as checkpoint

    data = _data()
    folder = str(tmp_path / "c")
    first = _sync_trainer()
    first.save(folder)
    first.fit(data, epochs=1, batch_size=8)
    _interrupt_renames(monkeypatch, after=1)
    with pytest.raises(KeyboardInterrupt):
        first.save(folder)
    monkeypatch.undo()
    second = _sync_trainer()
    second.fit(data, epochs=2, batch_size=8)
    real_sync = checkpoint._sync

    def interrupted(path: str) -> None:
        if path.endswith("spec.msgpack.tmp"):
            raise KeyboardInterrupt  # its spec written, not yet its manifest
        real_sync(path)

    monkeypatch.setattr(checkpoint, "_sync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        second.save(folder)
    monkeypatch.undo()
    back = ann.Trainer.load(folder)
    assert back.state.minibatches == first.state.minibatches == 4
    assert_params_equal(back.params, first.params)
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_a_save_failing_before_its_renames_removes_what_it_wrote(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a full disk left arrays.safetensors.tmp, as large as the weights, in the folder)
    import safetensors.numpy

    tr = _sync_trainer()
    folder = str(tmp_path / "c")
    tr.save(folder)
    before = sorted(os.listdir(folder))
    tr.fit(_data(), epochs=1, batch_size=8)

    def full_disk(arrays: Any, file: str) -> None:
        Path(file).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tr.save(folder)
    assert sorted(os.listdir(folder)) == before
    assert ann.Trainer.load(folder).state.minibatches == 0  # the old checkpoint, whole


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


class _Stateful(ann.LayerActor):
    """An actor whose own state is what ``setup(kind=...)`` says."""

    def setup(self, kind: str = "dict") -> None:
        self.kind = kind

    def actor_state(self) -> Any:
        import collections
        import dataclasses

        seen = np.asarray(3)
        if self.kind == "ordered":
            return collections.OrderedDict(seen=seen)
        if self.kind == "dataclass":
            return dataclasses.make_dataclass("Seen", ["seen"])(seen)
        return {"nested": [{"seen": seen}, {1: object()}]}


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("ordered", r"at its top it holds an object of type OrderedDict"),
        ("dataclass", r"at its top it holds an object of type Seen; .*give its fields as a dict"),
        ("plain", r"at \['nested'\]\[1\]\[1\] it holds an object of type object"),
    ],
)
def test_an_actor_state_a_checkpoint_cannot_hold_is_refused_by_the_save(
    tmp_path: Any, kind: str, says: str
) -> None:
    # (an OrderedDict or named tuple saved without a word, and the load then failed: "the array
    # 'actor/a/0' is missing"; a dataclass failed with msgpack's "can not serialize 'Seen'")
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Linear(6, 3), x, actor=_Stateful, actor_args={"kind": kind})
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    tr.fit(_data(), batch_size=16)
    with pytest.raises(TypeError, match=r"cannot save the actor state of 'a' .*" + says):
        tr.save(str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()  # refused before anything was written


@pytest.mark.parametrize("left", ["manifest", "spec"], ids=["in-manifest", "before-manifest"])
def test_a_first_save_cut_off_before_its_renames_says_so(
    saved: Any, tmp_path: Any, left: str
) -> None:
    # (a first save killed while it wrote manifest.json.tmp was reported as "written by an
    # asyncnn older than checkpoint format version 2": load it with the asyncnn that wrote it)
    path, tr = saved
    folder = str(tmp_path / "new")
    os.makedirs(folder)
    for name in ("arrays.safetensors", "spec.msgpack"):  # written, synced, not yet renamed
        with (
            open(os.path.join(path, name), "rb") as src,
            open(os.path.join(folder, name + ".tmp"), "wb") as dst,
        ):
            dst.write(src.read())
    if left == "manifest":  # cut off half-way through the manifest
        with open(os.path.join(folder, "manifest.json.tmp"), "w") as f:
            f.write('{"files": {"arrays.safe')
    error = CheckpointError if left == "manifest" else FileNotFoundError
    with pytest.raises(error, match=r"a save into this folder was interrupted before it "
                       r"finished .*spec\.msgpack\.tmp.*save the trainer here again"):  # fmt: skip
        ann.Trainer.load(folder)
    if left == "manifest":
        with pytest.raises(CheckpointError, match="was interrupted"):
            read_graph(folder)
    tr.save(folder)  # a save there replaces the files the interrupted one left
    assert sorted(os.listdir(folder)) == [
        "arrays.safetensors", "fit.json", "manifest.json", "spec.msgpack",
    ]  # fmt: skip
    assert_params_equal(ann.Trainer.load(folder).params, tr.params)
