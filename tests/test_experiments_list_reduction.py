import json

import list_reduction
import numpy as np
import pytest
from _experiment_figures import figure_titles


def test_lists_are_labelled_with_their_sum_mod_10():
    cfg = list_reduction.Config(max_len=4, width=3)
    d = list_reduction.make_lists(cfg, 50, np.random.default_rng(0))
    digits = d["xs"].argmax(axis=2)
    for i in range(50):
        n = d["len"][i]
        assert 1 <= n <= 4 and d["xs"][i, n:].sum() == 0
        assert d["y"][i] == digits[i, :n].sum() % 10


def test_quick_run_writes_curves_table_and_figure(tmp_path, monkeypatch):
    # the title said "2-core CPU" whatever machine ran it
    titles = figure_titles(monkeypatch)
    list_reduction.main(["--quick", "true", "--target", "0.0", "--out", str(tmp_path)])
    assert any("16-core CPU" in t for t in titles), titles
    assert not any("2-core" in t or "2 cores" in t for t in titles), titles
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    table = saved["results"]["table"]
    assert list(table) == [
        "Sync", "Sync, batch 200", "Async K=2", "Async K=2, update every 2", "Async K=4",
        "Async K=4, update every 2",
    ]  # fmt: skip
    for run in saved["results"]["runs"]:
        # a snapshot every 300 lists, an epoch: 3 keys of 100, or 2 of up to 200
        keys = [2, 4] if run["label"] == "Sync, batch 200" else [3, 6]
        assert [c["keys"] for c in run["curve"]] == keys
        assert [c["epoch"] for c in run["curve"]] == [1.0, 2.0]
        # any accuracy reaches a 0% target: time to it is the first snapshot's
        assert run["epochs_to_target"] == 1.0
        assert run["row_steps"] > 0
    assert (tmp_path / "list_reduction.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "true", "--eval-every", "0"], "argument --eval-every: must be > 0, got 0"),
        (["--quick", "true", "--min-len", "5", "--max-len", "3"], "need --min-len <= --max-len"),
        (["--quick", "true", "--target", "1.5"], "argument --target: must be in [0, 1]"),
        (["--quick", "true", "--beta1", "1"], "argument --beta1: must be in [0, 1)"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error):
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a target above 1 a run that never reached it, silently)
    assert message in usage_error(list_reduction.main, argv)


def test_test_lists_are_held_out_from_the_training_lists():
    # the test lists were drawn after the training lists with no check: 229 of the 1,000 were
    # training lists (every one of lengths 1 and 2)
    cfg = list_reduction.Config(width=3)
    rng = np.random.default_rng(0)
    train = list_reduction.make_lists(cfg, 2000, rng)
    test = list_reduction.make_lists(cfg, 500, rng, exclude=set(train["key"]))
    assert len(test["y"]) == 500 and not set(test["key"]) & set(train["key"])
    assert 1 not in test["len"]  # all 10 lists of length 1 are training lists
    assert test["key"].tolist() == list_reduction.list_keys(test["len"], test["xs"].argmax(2))
    again = list_reduction.make_lists(cfg, 2000, np.random.default_rng(0))
    assert (again["key"] == train["key"]).all()  # the training lists are as before


def test_too_few_lists_outside_the_training_set_is_an_error(usage_error):
    # lists of length 1 only: the 300 training lists hold all 10
    err = usage_error(list_reduction.main, ["--quick", "true", "--max-len", "1"])
    assert "outside the training set" in err and "Traceback" not in err


def test_quick_keeps_the_flags_given_and_reports_accuracy_by_length(tmp_path):
    # --quick true replaced --width, --max-epochs (and more) given with it, silently
    list_reduction.main(
        ["--quick", "true", "--width", "16", "--max-epochs", "1", "--max-active-keys", "2",
         "--update-every", "1", "--target", "0.0", "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    cfg = saved["config"]
    assert (cfg["width"], cfg["max_epochs"], cfg["repeats"], cfg["train_lists"]) == (16, 1, 1, 300)
    res = saved["results"]
    assert [r["label"] for r in res["runs"]] == ["Sync", "Async K=2"]
    assert sum(res["test_lists_by_length"].values()) == 100
    for run in res["runs"]:
        assert set(run["accuracy_by_length"]) == set(res["test_lists_by_length"])
        assert [c["epoch"] for c in run["curve"]] == [1.0]
