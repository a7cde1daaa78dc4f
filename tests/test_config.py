"""RunConfig: a run's options as one frozen, serialisable record."""

from __future__ import annotations

import argparse
import dataclasses

import msgpack
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn._cli_args import _seed
from asyncnn._runtime._config import RunConfig

from _reference import chain_graph


def test_defaults_round_trip_and_freeze():
    cfg = RunConfig(seed=np.int64(3), dtype="float64", trace="t.trace", cuda_graphs=False)
    assert cfg.seed == 3 and type(cfg.seed) is int and cfg.dtype == "float64"
    wire = msgpack.unpackb(msgpack.packb(cfg.to_spec()))
    assert RunConfig.from_spec(wire) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]
    assert cfg.replace(seed=5).seed == 5 and cfg.seed == 3


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"seed": True}, TypeError, "seed must be an int"),
        # a checkpoint's or a trace header's msgpack then failed (OverflowError), leaving .tmp
        ({"seed": 2**64}, ValueError, r"seed must be an int from 0 to 2\*\*64 - 1 .*got 1844"),
        ({"dtype": "floaty"}, ValueError, "dtype 'floaty'"),
        ({"stall_timeout": 0}, ValueError, "stall_timeout must be a number > 0"),
        ({"trace_payloads": "some"}, ValueError, "trace_payloads must be one of"),
        ({"check_finite": 1}, TypeError, "check_finite must be True or False"),
        ({"cuda_graphs": "yes"}, TypeError, "cuda_graphs must be True, False or None"),
        # (str() made these a trace written to a file named "True", or "b'run.trace'")
        ({"trace": True}, TypeError, r"trace must be a file path .* got True"),
        ({"trace": 3}, TypeError, r"trace must be a file path .* got 3"),
        ({"trace": ""}, ValueError, "trace='' names no file"),
        ({"trace_payloads": ["all"]}, ValueError, "trace_payloads must be one of"),
    ],
)
def test_bad_options_are_named(kw, error, match):
    with pytest.raises(error, match=match):
        RunConfig(**kw)


def test_bfloat16_without_ml_dtypes_says_to_install_it():
    # (it said only "dtype 'bfloat16' is not a dtype numpy knows", not how to get it)
    from asyncnn.backends._dtypes import BFLOAT16

    if BFLOAT16 is not None:  # ml_dtypes installed: numpy knows the name
        assert RunConfig(dtype="bfloat16").dtype == "bfloat16"
        return
    with pytest.raises(ValueError, match=r"dtype 'bfloat16' .*\(.*pip install ml_dtypes\)"):
        RunConfig(dtype="bfloat16")
    with pytest.raises(ValueError, match=r"^dtype 'float33' is not a dtype numpy knows$"):
        RunConfig(dtype="float33")


@pytest.mark.parametrize("dtype", ["int32", "bool", "complex64", "U5"])
def test_a_dtype_that_is_not_floating_is_refused_by_name(dtype):
    # it was taken, and failed later at the first layer's init as that layer's error
    with pytest.raises(ValueError, match=rf"dtype must name a floating dtype.*got '{dtype}'"):
        RunConfig(dtype=dtype)
    with pytest.raises(ValueError, match="floating dtype"):
        ann.Trainer(
            chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype=dtype
        )


def test_numpy_scalars_and_path_objects_are_taken_as_what_they_are(tmp_path):
    # a stall timeout of np.float32(5) (read from a config file) was refused as not a number
    cfg = RunConfig(
        stall_timeout=np.float32(5), check_finite=np.True_, cuda_graphs=np.False_,
        trace=tmp_path / "run.trace",
    )  # fmt: skip
    assert cfg.stall_timeout == 5.0 and type(cfg.stall_timeout) is float
    assert cfg.check_finite is True and cfg.cuda_graphs is False
    assert cfg.trace == str(tmp_path / "run.trace")
    assert RunConfig(stall_timeout=np.int64(2)).stall_timeout == 2.0
    assert RunConfig(trace=b"run.trace").trace == "run.trace"
    assert RunConfig.from_spec(msgpack.unpackb(msgpack.packb(cfg.to_spec()))) == cfg


def test_unknown_options_from_a_newer_writer_are_refused():
    with pytest.raises(ValueError, match=r"run options \['turbo'\] are unknown"):
        RunConfig.from_spec({**RunConfig().to_spec(), "turbo": True})


@pytest.mark.anyio
async def test_open_run_takes_a_config_whole_but_not_twice():
    g = chain_graph(2)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 5)), "y": rng.integers(0, 3, size=8)}
    cfg = RunConfig(seed=7, dtype="float64")
    async with ann.open_run(g, optim.SGD(lr=0.1), policies.Sync(), config=cfg) as run:
        await run.step(batch)
    assert run.config is cfg and run.seed == 7 and run.dtype == np.float64
    with pytest.raises(ValueError, match="either in config= or separately"):
        async with ann.open_run(g, optim.SGD(lr=0.1), policies.Sync(), seed=1, config=cfg):
            pass


def test_the_trace_header_carries_the_config(tmp_path):
    path = str(tmp_path / "run.trace")
    tr = ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64",
        seed=3, trace=path,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tr.fit({"x": rng.normal(size=(8, 5)), "y": rng.integers(0, 3, size=8)}, batch_size=8)
    header = ann.trace.read(path).header
    assert RunConfig.from_spec(header["config"]) == RunConfig(
        seed=3, dtype="float64", trace=path, trace_payloads="inputs"
    )


def test_the_largest_seed_a_checkpoint_and_a_trace_hold_is_taken(tmp_path):
    # 2**64 trained, then failed in msgpack saving the trainer (leaving .tmp files) or writing
    # the trace's header; the CLI's --seed refuses it in the same words
    with pytest.raises(ValueError, match=r"from 0 to 2\*\*64 - 1") as lib:
        ann.Trainer(chain_graph(2), optim.SGD(lr=0.1), policies.Sync(), seed=2**64)
    with pytest.raises(argparse.ArgumentTypeError, match=r"from 0 to 2\*\*64 - 1") as cli:
        _seed(str(2**64))
    assert str(lib.value).endswith(f"got {2**64}") and str(cli.value).endswith(f"got {2**64}")
    seed = np.uint64(2**64 - 1)
    path = str(tmp_path / "run.trace")
    tr = ann.Trainer(chain_graph(2), optim.SGD(lr=0.1), policies.Sync(), seed=seed, trace=path)
    rng = np.random.default_rng(0)
    tr.fit({"x": rng.normal(size=(8, 5)), "y": rng.integers(0, 3, size=8)}, batch_size=8)
    tr.save(str(tmp_path / "ckpt"))
    assert ann.Trainer.load(str(tmp_path / "ckpt")).seed == 2**64 - 1
    assert ann.trace.read(path).header["seed"] == 2**64 - 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        # (each failed inside the run under another name: the loss actor's error for on_loss,
        # a bare KeyError 'stage2' for the state of another graph, AttributeErrors)
        ({"on_loss": 5}, TypeError, r"on_loss must be a function on_loss\(minibatch, loss, rows"),
        ({"policy": policies.Sync}, TypeError, r"policy must be an instance, got the class Sync"),
        ({"optimizer": optim.SGD}, TypeError, r"optimizer=optim\.SGD\(\.\.\.\)"),
        ({"optimizer": "sgd"}, TypeError, "optimizer must be an asyncnn.optim optimizer"),
        ({"policy": "gpipe"}, TypeError, "policy must be an asyncnn.policies policy"),
        ({"graph": None}, TypeError, "graph must be an asyncnn.Graph, got None"),
        ({"state": {"params": {}}}, TypeError, "state must be an asyncnn.RunState .* got dict"),
        (
            {"graph": chain_graph(3)},
            ValueError,
            r"state.params has nothing for the graph's layers \['stage2'\] .*state=None",
        ),
    ],
    ids=[
        "on_loss",
        "policy-class",
        "optimizer-class",
        "optimizer",
        "policy",
        "graph",
        "state",
        "state-of-another-graph",
    ],  # fmt: skip
)
async def test_open_run_refuses_wrong_arguments_before_it_starts(kw, error, match):
    two = chain_graph(2)
    state = ann.Trainer(two, optim.SGD(lr=0.1), policies.Sync()).state
    args = {"graph": two, "optimizer": optim.SGD(lr=0.1), "policy": policies.Sync(), "state": state}
    with pytest.raises(error, match=match):
        async with ann.open_run(**{**args, **kw}):
            pass


def test_a_floating_dtype_asyncnn_does_not_compute_in_is_refused_by_name():
    # ml_dtypes' float8_e5m2 is of kind "f" and was taken: a Trainer in it trained on 1-byte
    # sums (float8_e4m3fn, of kind "V", was refused); numpy's long double passed the same way
    said = r"float16, float32, float64 or bfloat16.*got '{}'"
    if np.dtype(np.longdouble).itemsize > 8:  # (where long double is not float64 itself)
        with pytest.raises(ValueError, match=said.format("longdouble")):
            RunConfig(dtype="longdouble")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for name in ("float8_e5m2", "float8_e4m3fn"):
        with pytest.raises(ValueError, match=said.format(name)):
            RunConfig(dtype=name)
        with pytest.raises(ValueError, match=said.format(name)):
            ann.Trainer(chain_graph(2), optim.SGD(lr=0.1), policies.Sync(), dtype=name)
    assert RunConfig(dtype=ml_dtypes.bfloat16).dtype == "bfloat16"


def test_a_graph_input_and_astype_of_bfloat16_without_ml_dtypes_say_to_install_it():
    # (they said "unknown dtype 'bfloat16'" and numpy's "data type 'bfloat16' not understood")
    import numpy as np

    import asyncnn as ann
    from asyncnn import ops
    from asyncnn._errors import GraphError
    from asyncnn.backends._dtypes import BFLOAT16

    if BFLOAT16 is not None:  # ml_dtypes installed: numpy knows the name
        assert ops.astype(np.ones(2, np.float32), "bfloat16").dtype == BFLOAT16
        return
    hint = r"unknown dtype 'bfloat16' \(.*pip install ml_dtypes\)"
    with pytest.raises(GraphError, match=r"input 'x': " + hint):
        ann.Graph().input("x", shape=(None, 2), dtype="bfloat16")
    with pytest.raises(TypeError, match=r"astype: " + hint):
        ops.astype(np.ones(2, np.float32), "bfloat16")
    with pytest.raises(TypeError, match=r"astype: unknown dtype 'floaty'$"):
        ops.astype(np.ones(2, np.float32), "floaty")
