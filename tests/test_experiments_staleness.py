"""Smoke test of experiments/staleness.py: a tiny run writes its JSON and PNGs."""

import json

import staleness


def test_staleness_smoke(tmp_path):
    staleness.main(
        ["--epochs", "1", "--width", "16", "--train-samples", "400", "--max-active-keys", "1",
         "4", "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    rows = {r["setting"]: r for r in saved["results"]["rows"]}
    assert set(rows) == {"Sync", "PipeDream stash", "PipeDream no stash", "Async A=1", "Async A=4"}
    # one key in flight: nothing is ever stale; PipeDream's first stage lags the others
    assert rows["Sync"]["staleness_mean"] == rows["Async A=1"]["staleness_mean"] == 0.0
    pd = rows["PipeDream stash"]["staleness_mean_per_stage"]
    assert pd["stage0"] > pd["stage3"]
    for name in ("staleness_loss.png", "staleness_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
