"""Smoke test of experiments/pipeline_bubble.py: a tiny sweep writes its JSON and PNGs."""

import importlib.util
import json
import os
import sys

HERE = os.path.dirname(__file__)


def _load():
    path = os.path.join(HERE, "..", "experiments", "pipeline_bubble.py")
    spec = importlib.util.spec_from_file_location("pipeline_bubble", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_pipeline_bubble_smoke(tmp_path):
    mod = _load()
    mod.main(
        ["--stages", "1", "3", "--microbatches", "1", "2", "--minibatches", "1",
         "--forward-ms", "2", "--backward-ms", "4", "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    rows = saved["results"]["rows"]
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert r["theory_idle"] == (r["K"] - 1) / (r["M"] + r["K"] - 1)
        assert 0.0 <= r["measured_idle_mean"] < 1.0
    # three sleeping stages with one microbatch: each works one third of the time at most
    k3 = [r for r in rows if r["K"] == 3 and r["M"] == 1]
    assert all(r["measured_idle_mean"] > 0.5 for r in k3)
    for name in ("pipeline_bubble.png", "timeline_GPipe.png", "timeline_OneFOneB.png"):
        assert (tmp_path / name).stat().st_size > 0
