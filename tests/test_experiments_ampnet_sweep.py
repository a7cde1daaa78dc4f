import json

import ampnet_sweep
import pytest
from _experiment_figures import figure_titles


def test_quick_run_writes_curves_table_and_figures(tmp_path, monkeypatch):
    # the title said "2-core CPU" whatever machine ran it
    titles = figure_titles(monkeypatch)
    ampnet_sweep.main(["--quick", "true", "--target", "0.0", "--out", str(tmp_path)])
    assert any("16-core CPU" in t for t in titles), titles
    assert not any("2-core" in t or "2 cores" in t for t in titles), titles
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    table = saved["results"]["table"]
    assert set(table) == {"Sync 1 stage", "Sync 3 stages", "Async K=1 F=1", "Async K=4 F=1"}
    for run in saved["results"]["runs"]:
        assert [c["epoch"] for c in run["curve"]] == [1, 2]
        times = [c["seconds"] for c in run["curve"]]
        assert 0 < times[0] < times[1]
        # any accuracy reaches a 0% target: time to it is the first epoch's
        assert run["seconds_to_target"] == times[0] and run["epochs_to_target"] == 1
    for png in ("ampnet_curves.png", "ampnet_heatmap.png"):
        assert (tmp_path / png).stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "yes please"], "argument --quick: expected true or false"),
        # a target above 1 was never reached, silently; a 0 batch a traceback
        (["--quick", "true", "--target", "1.5"], "argument --target: must be in [0, 1]"),
        (["--quick", "true", "--batch-size", "0"], "argument --batch-size: must be > 0"),
        (["--quick", "true", "--stages", "8"], "the MLP has 7 modules, got 8 stages"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error):
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a misspelt true/false a silent false)
    assert message in usage_error(ampnet_sweep.main, argv)


def test_quick_keeps_the_flags_given(tmp_path):
    # --quick true ran K = 1, 4 for 2 epochs whatever --max-active-keys and --max-epochs said
    ampnet_sweep.main(
        ["--quick", "true", "--max-active-keys", "2", "--max-epochs", "1", "--target", "0.0",
         "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    cfg = saved["config"]
    assert (cfg["max_active_keys"], cfg["max_epochs"], cfg["seeds"]) == ([2], 1, [0])
    assert set(saved["results"]["table"]) == {"Sync 1 stage", "Sync 3 stages", "Async K=2 F=1"}
    assert all(len(run["curve"]) == 1 for run in saved["results"]["runs"])
