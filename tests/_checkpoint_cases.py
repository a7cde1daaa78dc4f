"""Trainers, data and the folder handling shared by tests/test_checkpoint*.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies


def _trainer() -> ann.Trainer:
    g = ann.Graph.sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)],
                             loss=nn.CrossEntropyLoss(), stages=[2, 1], input_shape=(None, 6))  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.Adam(lr=1e-2), policy=policies.GPipe(2), seed=0)
    rng = np.random.default_rng(0)
    tr.fit({"x": rng.normal(size=(32, 6)).astype("float32"), "y": rng.integers(0, 3, 32)},
           epochs=1, batch_size=16)  # fmt: skip
    return tr


def _copy(src: str, dst: str) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        Path(dst, name).write_bytes(Path(src, name).read_bytes())
    return dst


def _json(path: str) -> Any:
    return json.loads(Path(path).read_text())


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


def _sync_trainer() -> ann.Trainer:
    g = ann.Graph.sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)],
                             loss=nn.CrossEntropyLoss(), stages=[2, 1], input_shape=(None, 6))  # fmt: skip
    return ann.Trainer(g, optimizer=optim.SGD(lr=0.1, momentum=0.9), policy=policies.Sync(), seed=2)


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"x": rng.normal(size=(32, 6)), "y": rng.integers(0, 3, 32)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: Any) -> tuple[str, ann.Trainer]:
    """A checkpoint of :func:`_trainer`'s trainer, once per test module: ``(path, trainer)``
    (the checkpoint tests' fixture; conftest makes it known to every module)."""
    tr = _trainer()
    path = str(tmp_path_factory.mktemp("ckpt") / "c")
    tr.save(path)
    return path, tr
