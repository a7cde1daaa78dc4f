"""Smoke test of experiments/staleness.py: a tiny run writes its JSON and PNGs."""

import json

import pytest
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


def test_reported_staleness_is_the_policys_delays(tmp_path):
    """The staleness the script reads from its traces is what the policy makes: PipeDream's 1F1B
    with K = 4 keys in flight lags stage s by K - s - 1 updates after a warm-up in which the
    first keys lag 0, 1, 2 (10 minibatches: means 2.4, 1.7, 0.9, 0), and it equals the delays
    the layers record themselves (``ActorStatistics.delays``)."""
    import asyncnn as ann
    from asyncnn import optim

    flags = ["--epochs", "1", "--width", "16", "--train-samples", "1000", "--max-active-keys",
             "2", "--out", str(tmp_path)]  # fmt: skip
    results = staleness.main(flags)
    rows = {r["setting"]: r for r in results["rows"]}
    want = {"stage0": 2.4, "stage1": 1.7, "stage2": 0.9, "stage3": 0.0}
    for name in ("PipeDream stash", "PipeDream no stash"):
        assert rows[name]["staleness_mean_per_stage"] == pytest.approx(want)
        assert rows[name]["staleness_max_per_stage"] == {"stage0": 3, "stage1": 2, "stage2": 1,
                                                         "stage3": 0}  # fmt: skip
    cfg = staleness.Config(width=16)
    data = ann.data.load_mnist1d()
    train = {"x": data["x_train"][:1000], "y": data["y_train"][:1000]}
    for name, policy in staleness.settings(cfg)[:3]:
        tr = ann.Trainer(staleness.make_graph(cfg), optim.Adam(lr=cfg.lr), policy, seed=cfg.seed)
        stats = tr.fit(train, epochs=1, batch_size=cfg.batch_size, shuffle=True).statistics
        got = {n: stats[n].mean_delay for n in tr.graph.layers}
        assert got == pytest.approx(rows[name]["staleness_mean_per_stage"]), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # dropped the last 5 training rows, silently
        (["--epochs", "1", "--train-samples", "-5"], "argument --train-samples: must be >= 0"),
        (["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
        (
            ["--epochs", "1", "--max-active-keys", "2", "0"],
            "argument --max-active-keys: must be > 0",
        ),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error):
    assert message in usage_error(staleness.main, argv)
