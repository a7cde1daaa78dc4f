"""Checkpoints: every file checksummed, the format version checked, every damage one named error."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn._checkpoint import CheckpointError, read_graph
from asyncnn._math._imports import UntrustedModuleError

from _checkpoint_cases import _copy, _json, _rewrite_spec
from _reference import assert_params_equal

pytestmark = pytest.mark.timeout(120)


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
        lambda s: s["fit"].update(epoch_batches=1, epoch_losses=[0.5], epoch_rows=[0]),
        lambda s: s["fit"].update(epoch_batches=2, epoch_losses=[0.5, 0.4], epoch_rows=[8]),
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
        "fit-epoch_rows",
        "fit-epoch_rows-length",
    ],  # fmt: skip
)
def test_a_well_signed_but_malformed_spec_is_a_checkpoint_error(
    saved: Any, tmp_path: Any, change: Any
) -> None:
    bad = _copy(saved[0], str(tmp_path / "c"))
    _rewrite_spec(bad, change)
    with pytest.raises(CheckpointError, match="spec.msgpack|does not fit"):
        ann.Trainer.load(bad)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda s: s.pop("epochs_done"), r"'epochs_done' must be a count \(an int >= 0\), "
         r"but the spec has none"),
        (lambda s: s.update(keys=True), r"'keys' must be a count \(an int >= 0\), got True"),
        (lambda s: s.update(seed=-1), r"'seed' must be an int from 0 to 2\*\*64 - 1, got -1"),
        (lambda s: s.update(dtype="int8"), r"'dtype' must name a floating dtype .*got 'int8'"),
        (lambda s: s.update(traces="t.trace"), r"'traces' must be a list of the trace paths"),
        (lambda s: s["layout"]["stage0"].pop("params"),
         r"'layout' of 'stage0' must be a map with 'params', 'opt_state' and 'version'.*"
         r"lacks 'params'"),
        (lambda s: s["layout"].update(stage0=[1]),
         r"'layout' of 'stage0' must be a map with 'params', .*got \[1\]"),
        (lambda s: s["layout"]["stage1"].update(version=-2),
         r"'layout' of 'stage1': its 'version' must be a count \(an int >= 0\), got -2"),
        (lambda s: s["layout"]["stage1"].update(pending={"grads": {"value": None}}),
         r"'layout' of 'stage1': its 'pending' must be a map with 'grads' and 'count'"),
    ],
    ids=["no-epochs_done", "keys", "seed", "dtype", "traces", "no-params", "entry-list",
         "version", "pending"],
)  # fmt: skip
def test_a_malformed_field_of_the_spec_is_named_with_what_it_must_be(
    saved: Any, tmp_path: Any, change: Any, says: str
) -> None:
    # (a missing field said only "does not fit its graph: 'epochs_done'", a KeyError's text; a
    # layer entry that is a list "list indices must be integers or slices, not str"; seed=-1 or
    # dtype='int8' raised the constructor's ValueError, naming neither the file nor the field)
    bad = _copy(saved[0], str(tmp_path / "c"))
    _rewrite_spec(bad, change)
    spec = os.path.join(bad, "spec.msgpack")
    with pytest.raises(CheckpointError, match=re.escape(spec) + " is malformed: " + says):
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
