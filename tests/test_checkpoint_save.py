"""Checkpoints saved: a save interrupted or failing leaves a whole checkpoint (the new one or the
old one, at the epoch's position), and what a checkpoint cannot hold is refused before writing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._checkpoint import CheckpointError, read_graph

from _checkpoint_cases import _copy, _data, _sync_trainer, _trainer
from _reference import assert_params_equal

pytestmark = pytest.mark.timeout(120)


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


def test_a_save_to_an_empty_path_is_refused_by_name(saved: Any) -> None:
    # (a bare FileNotFoundError: [Errno 2] No such file or directory: '')
    _, tr = saved
    with pytest.raises(ValueError, match=r"^save: an empty path .*give a folder"):
        tr.save("")


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


class _StopAt(ann.callbacks.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Any, step: int, logs: Any) -> None:
        if step == self.step:
            raise KeyboardInterrupt


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
    import asyncnn._checkpoint_save as checkpoint

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
    new = tmp_path / "new" / "c"
    with pytest.raises(OSError, match="No space left"):
        tr.save(str(new))
    assert not new.exists()  # the folder the save made, removed with what it wrote


class _Stateful(ann.LayerActor):
    """An actor whose own state is what ``setup(kind=...)`` says."""

    def setup(self, kind: str = "dict") -> None:
        self.kind = kind

    def load_actor_state(self, state: Any) -> None:
        self.loaded = state

    def actor_state(self) -> Any:
        import collections
        import dataclasses

        seen = np.asarray(3)
        if self.kind == "ordered":
            return collections.OrderedDict(seen=seen)
        if self.kind == "dataclass":
            return dataclasses.make_dataclass("Seen", ["seen"])(seen)
        if self.kind == "mixed":
            return {"b": [seen, "x"], 2: seen + 1, "a": None, -1: {1: 2.5, "z": seen + 2}}
        if self.kind == "strings":
            return {"names": [seen, np.array(["a", "b"])]}
        if self.kind == "complex":
            return {"c": np.array([1 + 2j])}
        if self.kind == "big":
            return {"n": [1, 2**70]}
        if self.kind == "big-key":
            return {-(2**64): seen}
        if self.kind == "scalars":  # numpy scalars beside a 0-d array
            return {"step": np.int64(7), "half": np.float16(0.5), "flag": np.bool_(True),
                    "zero_d": seen}  # fmt: skip
        return {"nested": [{"seen": seen}, {1: object()}]}


def _stateful_trainer(kind: str) -> ann.Trainer:
    """A trainer, fitted, of one layer ``'a'`` whose actor's state is ``_Stateful``'s ``kind``."""
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Linear(6, 3), x, actor=_Stateful, actor_args={"kind": kind})
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    tr.fit(_data(), batch_size=16)
    return tr


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("ordered", r"at its top it holds an object of type OrderedDict"),
        ("dataclass", r"at its top it holds an object of type Seen; .*give its fields as a dict"),
        ("plain", r"at \['nested'\]\[1\]\[1\] it holds an object of type object"),
        ("strings", r"at \['names'\]\[1\] it holds an array of dtype <U1; .*bool, int8, "),
        ("complex", r"at \['c'\] it holds an array of dtype complex128; .*complex64"),
        ("big", r"at \['n'\]\[1\] it holds the int 1180591620717411303424, .*2\*\*64 - 1"),
        ("big-key", r"at its top a dict has the key -18446744073709551616, .*2\*\*64 - 1"),
    ],
    ids=["ordered", "dataclass", "plain", "strings", "complex", "big", "big-key"],
)
def test_an_actor_state_a_checkpoint_cannot_hold_is_refused_by_the_save(
    tmp_path: Any, kind: str, says: str
) -> None:
    # (an OrderedDict or named tuple saved without a word, and the load then failed: "the array
    # 'actor/a/0' is missing"; a dataclass failed with msgpack's "can not serialize 'Seen'"; a
    # str or complex128 array failed with safetensors' "Unknown dtype", an int beyond 64 bits
    # with msgpack's OverflowError, naming neither the layer nor the place, each after the
    # folder was made)
    tr = _stateful_trainer(kind)
    with pytest.raises(TypeError, match=r"cannot save the actor state of 'a' .*" + says):
        tr.save(str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()  # refused before anything was written
    folder = str(tmp_path / "old")
    _sync_trainer().save(folder)
    before = {name: Path(folder, name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(TypeError, match="cannot save the actor state of 'a'"):
        tr.save(folder)
    assert {name: Path(folder, name).read_bytes() for name in os.listdir(folder)} == before


def test_an_actor_state_mixing_int_and_str_keys_saves_and_loads_ints_first(tmp_path: Any) -> None:
    # (tree_flatten sorted the keys before the spec was checked: the save failed with a bare
    # "'<' not supported between instances of 'str' and 'int'")
    tr = _stateful_trainer("mixed")
    folder = str(tmp_path / "c")
    tr.save(folder)
    back = ann.Trainer.load(folder).state.actor_states["a"]
    assert list(back) == [-1, 2, "a", "b"]  # ints ascending, then strs ascending
    assert list(back[-1]) == [1, "z"]
    assert back[-1][1] == 2.5 and back["a"] is None and back["b"][1] == "x"
    for got, want in ((back["b"][0], 3), (back[2], 4), (back[-1]["z"], 5)):
        assert np.asarray(got).shape == () and int(got) == want
    back = ann.Trainer.load(folder)
    back.fit(_data(), batch_size=16)  # its actor takes the state back and trains on


def test_an_actor_states_numpy_scalars_load_as_numpy_scalars(tmp_path: Any) -> None:
    # (they came back as 0-d arrays: an actor keying a dict by its np.int64 step failed after a
    # load with "unhashable type: 'numpy.ndarray'", while between fits and under replay it got
    # the np.int64)
    tr = _stateful_trainer("scalars")
    folder = str(tmp_path / "c")
    tr.save(folder)
    back = ann.Trainer.load(folder)
    state = back.state.actor_states["a"]
    for key, kind in (("step", np.int64), ("half", np.float16), ("flag", np.bool_)):
        assert type(state[key]) is kind, (key, type(state[key]))
    assert state["step"] == 7 and state["half"] == 0.5 and state["flag"]
    assert isinstance(state["zero_d"], np.ndarray) and state["zero_d"].shape == ()  # as it was
    hash(state["step"])  # a dict key, as it was before the save
    back.fit(_data(), batch_size=16)
    assert type(back.state.actor_states["a"]["step"]) is np.int64  # the actor got it as saved


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


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
@pytest.mark.parametrize("proc", [True, False], ids=["umask-from-proc", "umask-swapped"])
def test_every_file_of_a_checkpoint_gets_the_mode_open_gives(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, umask: int, proc: bool
) -> None:
    # (arrays.safetensors was 0600, as safetensors' temporary file is made, while spec.msgpack
    # and manifest.json were 0644: another user read the spec and could not load the weights)
    import asyncnn._checkpoint_files as files

    if not proc:  # (a system without /proc/self/status: the umask read by setting it back)
        monkeypatch.setattr(files, "_STATUS", str(tmp_path / "no-such-status"))
    tr = _sync_trainer()
    folder = tmp_path / "c"
    old = os.umask(umask)
    try:
        tr.save(str(folder))
        os.chmod(folder / "arrays.safetensors", 0o600)
        tr.save(str(folder))  # a save over it gives the new file the mode too
        assert os.umask(umask) == umask  # the umask left as it was
    finally:
        os.umask(old)
    modes = {name: (folder / name).stat().st_mode & 0o777 for name in os.listdir(folder)}
    assert modes == dict.fromkeys(
        ["arrays.safetensors", "fit.json", "manifest.json", "spec.msgpack"], 0o666 & ~umask
    )


_REPLACE = os.replace


def _no_folder_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system refusing ``flock`` (some network ones): saves and loads run unlocked."""
    fcntl = pytest.importorskip("fcntl")

    def refused(fd: int, op: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)


@pytest.mark.parametrize("renames_done", [1, 2])
def test_a_save_whose_renames_a_load_finished_meanwhile_succeeds(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, renames_done: int
) -> None:
    # (an evaluator's Trainer.load between a save's renames finished that save; the saver's next
    # rename then found no spec.msgpack.tmp: a bare FileNotFoundError, which stopped the fit)
    _no_folder_locks(monkeypatch)
    data = _data()
    folder = str(tmp_path / "c")
    tr = _sync_trainer()
    tr.save(folder)
    tr.fit(data, epochs=1, batch_size=8)
    real, loaded, calls = os.replace, [], []

    def replace(src: Any, dst: Any) -> None:
        real(src, dst)
        calls.append(dst)
        if len(calls) == renames_done and not loaded:
            loaded.append(ann.Trainer.load(folder))  # a reader, between the saver's renames

    monkeypatch.setattr(os, "replace", replace)
    tr.save(folder)
    monkeypatch.setattr(os, "replace", real)
    assert loaded[0].state.minibatches == 4  # the reader got the new checkpoint, whole
    assert_params_equal(loaded[0].params, tr.params)
    assert sorted(os.listdir(folder)) == [
        "arrays.safetensors", "fit.json", "manifest.json", "spec.msgpack",
    ]  # fmt: skip
    back = ann.Trainer.load(folder)
    assert back.state.minibatches == 4
    assert_params_equal(back.params, tr.params)


def test_a_load_finishing_a_save_that_its_saver_finishes_meanwhile_loads_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the other order: the load found the save's files to rename, then the saver renamed them
    # first; the load's own renames must take the files as done, not fail)
    import asyncnn._checkpoint_files as files

    _no_folder_locks(monkeypatch)
    folder = str(tmp_path / "c")
    tr = _sync_trainer()
    tr.save(folder)
    tr.fit(_data(), epochs=1, batch_size=8)
    _interrupt_renames(monkeypatch, after=1)
    with pytest.raises(KeyboardInterrupt):
        tr.save(folder)
    monkeypatch.setattr(os, "replace", _REPLACE)
    real_sources = files._finishing_sources

    def saver_finishes(path: str) -> Any:
        found = real_sources(path)
        for name in ("spec.msgpack", "manifest.json"):  # the saver's renames, done meanwhile
            _REPLACE(os.path.join(path, name + ".tmp"), os.path.join(path, name))
        return found

    monkeypatch.setattr(files, "_finishing_sources", saver_finishes)
    back = ann.Trainer.load(folder)
    assert back.state.minibatches == 4
    assert_params_equal(back.params, tr.params)
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_a_load_during_a_save_waits_for_it_and_renames_nothing(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (where the system locks folders: the load waits for the save under way, so that neither
    # renames the other's files; a later save then never has its files moved by a late load)
    import threading

    fcntl = pytest.importorskip("fcntl")
    folder = str(tmp_path / "c")
    tr = _sync_trainer()
    tr.save(folder)
    tr.fit(_data(), epochs=1, batch_size=8)
    paused, go, locking = threading.Event(), threading.Event(), threading.Event()
    renamed_by: list[str] = []
    real_flock = fcntl.flock

    def replace(src: Any, dst: Any) -> None:
        _REPLACE(src, dst)
        renamed_by.append(threading.current_thread().name)
        if len(renamed_by) == 1:  # the saver, between its first rename and its second
            paused.set()
            assert go.wait(30)

    def flock(fd: int, op: int) -> None:
        if threading.current_thread().name == "loader":
            locking.set()  # (about to wait for the saver's lock)
        real_flock(fd, op)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(fcntl, "flock", flock)
    results: dict[str, Any] = {}

    def run(name: str, work: Any) -> threading.Thread:
        def target() -> None:
            try:
                results[name] = work()
            except BaseException as exc:  # noqa: BLE001 - reported by the asserts below
                results[name] = exc

        thread = threading.Thread(target=target, name=name)
        thread.start()
        return thread

    saver = run("saver", lambda: tr.save(folder))
    assert paused.wait(30)
    loader = run("loader", lambda: ann.Trainer.load(folder))
    assert locking.wait(30)
    go.set()
    saver.join(30)
    loader.join(30)
    assert results["saver"] is None, results["saver"]
    assert isinstance(results["loader"], ann.Trainer), results["loader"]
    assert results["loader"].state.minibatches == 4
    assert renamed_by == ["saver"] * 4  # (its three files, then fit.json)
