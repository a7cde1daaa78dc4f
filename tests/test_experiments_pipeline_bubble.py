"""Smoke test of experiments/pipeline_bubble.py: a tiny sweep writes its JSON and PNGs."""

import json

import pipeline_bubble


def test_pipeline_bubble_smoke(tmp_path):
    pipeline_bubble.main(
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
