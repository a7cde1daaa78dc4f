"""Trainer checkpoints: save/load, resume bit-identically, rotation, epoch layout, fit.json."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_equal, chain_graph
from _train_cases import _data, _trainer


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


def test_pipedream_2bw_resumes_from_a_checkpoint_as_one_unbroken_fit(tmp_path):
    # (the checkpoint kept the latest weights alone: the resumed fit's first minibatch computed
    # its gradients at them, where the unbroken fit used the version before them)
    data = _data()
    straight = _trainer(policies.PipeDream2BW(2))
    straight.fit(data, epochs=3, batch_size=8, shuffle=True)
    first = _trainer(policies.PipeDream2BW(2))
    first.fit(data, epochs=1, batch_size=8, shuffle=True)
    first.save(str(tmp_path / "ckpt"))
    resumed = ann.Trainer.load(str(tmp_path / "ckpt"))
    assert {n: sorted(e) for n, e in resumed.state.earlier_params.items()} == {
        n: [4] for n in resumed.graph.layers
    }
    resumed.fit(data, epochs=2, batch_size=8, shuffle=True)
    assert_params_equal(resumed.params, straight.params)


def test_load_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ann.Trainer.load(str(tmp_path))


class _Halve(ann.LayerActor):
    async def on_backward(self, key, grad, meta):
        return [g * 0.5 for g in await super().on_backward(key, grad, meta)]


@dataclass(frozen=True)
class _EveryOther(policies.OneFOneB):
    """A user policy (a subclass of a built-in): updates every second minibatch."""

    def update_due(self, backwards_since_update, minibatch_done):
        return minibatch_done and backwards_since_update == 2 * self.microbatches


def test_custom_actor_and_policy_survive_a_checkpoint(tmp_path):
    def graph(actor: type[ann.LayerActor] | None) -> ann.Graph:
        g = ann.Graph()
        x = g.input("x", shape=(None, 5))
        y = g.input("y", shape=(None,), dtype="int64")
        h = g.layer("a", nn.Linear(5, 4), x)
        h = g.layer("b", nn.Linear(4, 3), h, actor=actor)
        g.loss("loss", nn.CrossEntropyLoss(), h, y)
        return g

    tr = ann.Trainer(graph(_Halve), optimizer=optim.SGD(lr=0.1), policy=_EveryOther(2))
    tr.save(str(tmp_path / "c"))
    back = ann.Trainer.load(str(tmp_path / "c"))
    assert back.graph.nodes["b"].actor is _Halve
    assert type(back.policy) is _EveryOther and back.policy == _EveryOther(2)
    # both run them: two minibatches make one update (the policy; OneFOneB makes two), and the
    # step of "a" is half that of the same model with a plain actor (the actor halves what
    # "b" sends upstream; "b"'s own gradient is left as it was)
    plain = ann.Trainer(graph(None), optimizer=optim.SGD(lr=0.1), policy=_EveryOther(2))
    start = plain.params
    assert_params_equal(tr.params, start)
    two = {k: v[:16] for k, v in _data().items()}
    for trainer in (plain, tr, back):
        trainer.fit(two, epochs=1, batch_size=8)
    for trainer in (tr, back):
        assert trainer.versions == {"a": 1, "b": 1}
        np.testing.assert_array_equal(trainer.params["b"]["weight"], plain.params["b"]["weight"])
        for k in ("weight", "bias"):
            np.testing.assert_allclose(
                start["a"][k] - trainer.params["a"][k],
                0.5 * (start["a"][k] - plain.params["a"][k]),
                rtol=1e-3, atol=1e-7, err_msg=k,
            )  # fmt: skip
    tr.fit(_data(), epochs=1, batch_size=8)
    back.fit(_data(), epochs=1, batch_size=8)
    assert tr.versions == back.versions == {"a": 3, "b": 3}  # 5 minibatches: 2 updates more
    assert_params_equal(tr.params, back.params)


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


def test_a_save_on_a_full_disk_raises_an_oserror_naming_the_file(tmp_path, monkeypatch):
    # safetensors' SafetensorError (an Exception, not the OSError save documents) escaped, and
    # a write of the spec or the manifest said only "[Errno 28] No space left on device"
    import builtins

    import safetensors.numpy
    from safetensors import SafetensorError

    tr = _trainer(policies.Sync())
    tr.fit(_data(), epochs=1, batch_size=8)
    folder = tmp_path / "c"
    tr.save(folder)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    save_file = safetensors.numpy.save_file

    def full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    tmp = folder / "arrays.safetensors.tmp"
    with pytest.raises(OSError, match=re.escape(f"writing {tmp} failed (No space left")) as err:
        tr.save(folder)
    assert err.value.errno == 28 and isinstance(err.value.__cause__, SafetensorError)

    # any other error of safetensors is no disk's: it goes on as it is
    def mismatch(*args, **kwargs):
        raise SafetensorError("Error while serializing: shape mismatch")

    monkeypatch.setattr(safetensors.numpy, "save_file", mismatch)
    with pytest.raises(SafetensorError, match="shape mismatch"):
        tr.save(folder)
    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
    real_open = builtins.open

    class Full:  # the spec's file: opened, then the write fails
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    def opened(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if str(file).endswith("spec.msgpack.tmp") else f

    monkeypatch.setattr(builtins, "open", opened)
    tmp = folder / "spec.msgpack.tmp"
    with pytest.raises(OSError, match=re.escape(f"writing {tmp} failed (No space left")):
        tr.save(folder)
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


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


def test_checkpoint_every_goes_on_past_a_save_killed_mid_write(tmp_path):
    # a process killed while checkpoint_every wrote epoch-0003 left only *.tmp files there: load
    # said to load an earlier checkpoint, and fit refused to go on from that one in this folder
    # ("holds epoch-0003 ... resume the latest (Trainer.load of epoch-0003)")
    data = _data()
    tr = _trainer(policies.Sync())
    tr.fit(data, epochs=2, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1,
           keep_checkpoints=2)  # fmt: skip
    debris = tmp_path / "epoch-0003"
    debris.mkdir()
    shutil.copy(tmp_path / "epoch-0002" / "arrays.safetensors", debris / "arrays.safetensors.tmp")
    (debris / "spec.msgpack.tmp").write_bytes(b"\x8f")  # cut off while writing the spec
    with pytest.raises(FileNotFoundError, match="a save into this folder was interrupted"):
        ann.Trainer.load(debris)
    back = ann.Trainer.load(tmp_path / "epoch-0002")
    back.fit(data, epochs=2, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1,
             keep_checkpoints=2)  # fmt: skip
    # its save of epoch 3 replaced the debris, and the rotation went on as usual
    assert sorted(os.listdir(tmp_path)) == ["epoch-0003", "epoch-0004"]
    assert sorted(os.listdir(debris)) == [
        "arrays.safetensors", "fit.json", "manifest.json", "spec.msgpack"
    ]  # fmt: skip
    reference = _trainer(policies.Sync())
    reference.fit(data, epochs=3, batch_size=8)
    assert_params_equal(ann.Trainer.load(debris).params, reference.params)


def test_checkpoint_every_refuses_a_later_entry_that_a_save_could_not_replace(tmp_path):
    # a save cut off between its renames, whose files are all there, is a checkpoint (load
    # finishes it): refused as the others; an entry a save would refuse is named up front
    data = _data()
    tr = _trainer(policies.Sync())
    tr.fit(data, epochs=1, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1)
    cut = tmp_path / "epoch-0002"
    shutil.copytree(tmp_path / "epoch-0001", cut)
    os.remove(cut / "fit.json")
    for name in ("spec.msgpack", "manifest.json"):
        os.replace(cut / name, cut / (name + ".tmp"))
    with pytest.raises(ValueError, match=r"holds epoch-0002, saved after more than the 1 epochs"):
        tr.fit(data, epochs=1, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert ann.Trainer.load(cut).epochs_done == 1  # (finished: a checkpoint)
    shutil.rmtree(cut)
    cut.write_text("mine")
    with pytest.raises(
        ValueError, match=r"holds epoch-0002, which is not a checkpoint.*it is a file"
    ):
        tr.fit(data, epochs=1, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert tr.state.minibatches == 5 and cut.read_text() == "mine"  # refused before training


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
    # the 3 minibatches of 8 as trained, then a whole epoch of the new layout (epoch 0 still)
    reference = _trainer(policies.Sync())
    trained = ann.data.epoch_permutation(40, 3, 0) if "seed" in change else np.arange(40)
    reference.fit({k: v[trained[:24]] for k, v in _data().items()}, epochs=1, batch_size=8)
    rows = len(data["y"])
    order = ann.data.epoch_permutation(rows, tr.seed, 0) if kwargs["shuffle"] else np.arange(rows)
    reference.fit({k: v[order] for k, v in data.items()}, epochs=1, batch_size=8)
    for trainer in (tr, loaded):
        trainer.fit(data, epochs=1, **kwargs)
        assert trainer.state.minibatches == 3 + len(data["y"]) // 8, change
        assert (trainer.epochs_done, trainer.epoch_batches) == (1, 0)
        assert_params_equal(trainer.params, reference.params)


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


class _TrainerOfMine(ann.Trainer):
    """A subclass: its ``load`` gives one of its own, and is refused on an instance alike."""


def test_load_called_on_a_trainer_is_refused_and_says_to_assign_what_it_returns(tmp_path):
    # (load is a classmethod: tr.load(path) returned a new trainer, which was dropped, and left
    # tr at its own weights without a word, as if it had resumed)
    data = _data()
    tr = _trainer(policies.Sync())
    tr.fit(data, epochs=1, batch_size=8)
    tr.save(tmp_path / "ckpt")
    other = _trainer(policies.Sync(), seed=4)
    before = other.params
    with pytest.raises(TypeError) as info:
        other.load(tmp_path / "ckpt", progress=True)
    said = str(info.value)
    assert "tr.load(path)" in said and "tr = Trainer.load(path)" in said, said
    assert "tr = Trainer.load(path, progress=True)" in said, said  # overrides as keywords
    assert other.versions == {"stage0": 0, "stage1": 0, "stage2": 0}  # untouched
    assert_params_equal(other.params, before)
    with pytest.raises(TypeError, match=r"tr = Trainer\.load\(path\)"):
        other.load()  # (refused however it is called: no path at all either)
    # from the class, as before: the trainer resumed
    back = ann.Trainer.load(tmp_path / "ckpt")
    assert type(back) is ann.Trainer and back.versions == tr.versions
    assert_params_equal(back.params, tr.params)
    assert ann.Trainer.load.__doc__ and "resumed from" in ann.Trainer.load.__doc__
    # a subclass's load gives one of its own, and names itself where it is refused
    mine = _TrainerOfMine.load(tmp_path / "ckpt", progress=False)
    assert type(mine) is _TrainerOfMine and mine.versions == tr.versions
    with pytest.raises(TypeError, match=r"tr = _TrainerOfMine\.load\(path\)"):
        mine.load(tmp_path / "ckpt")
    assert hasattr(tr, "load")  # reading the attribute is no call: nothing raised


class _FloatKeyed(ann.LayerActor):
    """An actor whose state, from ``setup`` on, has a float dict key (which no checkpoint
    keeps; a trace does)."""

    def setup(self) -> None:
        self.state = {0.5: np.zeros(2)}

    def actor_state(self):
        return self.state

    def load_actor_state(self, state):
        self.state = state


def test_checkpoint_every_refuses_an_actor_state_it_cannot_save_before_training(tmp_path):
    # (refused only by the first checkpoint's save, after a whole epoch had trained)
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("a", nn.Linear(5, 4), x)
    h = g.layer("b", nn.Linear(4, 3), h, actor=_FloatKeyed)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    starts = _Starts()
    with pytest.raises(
        TypeError,
        match=r"cannot save the actor state of 'b' \(its actor_state\(\)\): at its top a dict "
        r"has the key 0\.5; a checkpoint keeps str and int keys.*checkpoint_every",
    ):
        tr.fit(_data(), epochs=2, batch_size=8, checkpoint_dir=tmp_path / "d", checkpoint_every=1,
               callbacks=[starts])  # fmt: skip
    assert starts.started  # (callbacks started: the check needs the actors set up)
    assert tr.state.minibatches == 0 and tr.versions == {"a": 0, "b": 0}  # nothing trained
    assert tr.history.losses == []
    assert not (tmp_path / "d").exists() or os.listdir(tmp_path / "d") == []
    tr.fit(_data(), epochs=1, batch_size=8)  # without checkpoints, it trains as before
    assert tr.state.minibatches == 5
