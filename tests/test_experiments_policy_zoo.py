"""Smoke test of experiments/policy_zoo.py: a tiny run of both tasks writes its JSON and PNGs,
with both columns (equal epochs, equal wall time) and the schedules' own delays."""

import json

import policy_zoo
import pytest


def test_policy_zoo_smoke(tmp_path):
    policy_zoo.main(
        ["--epochs", "1", "--max-epochs", "2", "--width", "8", "--train-samples", "400",
         "--optimizers", "sgd", "--async-repeats", "1",
         "--only", "Sync,PipeDream,Async A=16 + StalenessScaledLR,PipeDream2BW M=4,"
                   "ZeroBubbleH1 M=4,PipeDream + SpikeCompensation",
         "--char-dim", "8", "--char-context", "8", "--char-train-windows", "32",
         "--char-epochs", "1", "--char-max-epochs", "1", "--char-val-windows", "4",
         "--char-only", "Sync,ZeroBubbleH1 M=4",
         "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    rows = {(r["task"], r["setting"]): r for r in saved["results"]["rows"]}
    assert set(rows) == {
        ("mnist1d", "Sync"), ("mnist1d", "PipeDream"), ("mnist1d", "PipeDream2BW M=4"),
        ("mnist1d", "Async A=16 + StalenessScaledLR"), ("mnist1d", "ZeroBubbleH1 M=4"),
        ("mnist1d", "PipeDream + SpikeCompensation"), ("chars", "Sync"),
        ("chars", "ZeroBubbleH1 M=4"),
    }  # fmt: skip
    sync = rows[("mnist1d", "Sync")]
    assert sync["delay_mean"] == 0.0 and sync["score_equal_time"] == sync["score_equal_epochs"]
    pd = rows[("mnist1d", "PipeDream")]
    assert [pd["delay_max_per_stage"][f"stage{s}"] for s in range(4)] == [3, 2, 1, 0]
    assert pd["peak_stored_per_stage"]["stage0"] == 4
    assert pd["budget_seconds"] == sync["seconds_for_epochs"]
    assert 1 <= pd["epochs_in_time"] <= 2
    assert rows[("mnist1d", "PipeDream2BW M=4")]["delay_mean"] <= 1
    # the synchronous schedules compute the same weights: the same score
    zb = rows[("chars", "ZeroBubbleH1 M=4")]
    assert zb["score_equal_epochs"] == rows[("chars", "Sync")]["score_equal_epochs"] or (
        abs(zb["score_equal_epochs"] - rows[("chars", "Sync")]["score_equal_epochs"]) < 1e-3
    )
    for task in ("mnist1d", "chars"):
        assert (tmp_path / f"policy_zoo_{task}.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizers", "rmsprop"], "argument --optimizers: invalid choice: 'rmsprop'"),
        (["--tasks", "cifar"], "argument --tasks: invalid choice: 'cifar'"),
        # a misspelt setting ran nothing and wrote an empty table, silently
        (["--tasks", "mnist1d", "--only", "Snyc"], "--only names no setting: ['Snyc']"),
        (
            [
                "--tasks",
                "chars",
                "--microbatches",
                "2",
                "--char-only",
                "Sync,OneFOneB M=4",
                "--char-epochs",
                "1",
                "--char-max-epochs",
                "1",
            ],  # fmt: skip
            "--char-only names no setting: ['OneFOneB M=4']",
        ),
        # the equal-epochs column would have been the score of an earlier epoch
        (["--tasks", "mnist1d", "--only", "Sync", "--max-epochs", "5"], "--max-epochs 5 is below"),
        (
            [
                "--only",
                "Async A=16 + PipeMareLR",
                "--epochs",
                "1",
                "--max-epochs",
                "1",
                "--train-samples",
                "100",
                "--async-repeats",
                "1",
                "--optimizers",
                "sgd",
            ],
            "leave no setting to run on chars",
        ),  # fmt: skip
        # a setting of SGD only, with Adam only: ran nothing, silently ("the whole zoo: 0 s")
        (
            [
                "--tasks",
                "mnist1d",
                "--optimizers",
                "adam",
                "--only",
                "PipeDream + SpikeCompensation",
                "--epochs",
                "1",
                "--max-epochs",
                "1",
            ],
            "--only names no setting of --optimizers adam: ['PipeDream + SpikeCompensation'] "
            "(a setting of --optimizers sgd only)",
        ),  # fmt: skip
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error):
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a misspelt true/false a silent false)
    assert message in usage_error(policy_zoo.main, argv)


def test_default_char_settings_follow_the_depth_and_microbatches(tmp_path):
    """The transformer's default settings are named with ``{A}`` and ``{M}``: with another depth
    they still include the Async settings (they named A=16 and were dropped, silently)."""
    results = policy_zoo.main(
        ["--tasks", "chars", "--max-active-keys", "2", "--microbatches", "2",
         "--only", "Async A={A},OneFOneB M={M}", "--async-repeats", "1",
         "--char-dim", "8", "--char-context", "8", "--char-batch", "4",
         "--char-train-windows", "8", "--char-epochs", "1", "--char-max-epochs", "1",
         "--char-val-windows", "2", "--out", str(tmp_path)]
    )  # fmt: skip
    assert [r["setting"] for r in results["rows"]] == ["OneFOneB M=2", "Async A=2"]
    assert all("error" not in r for r in results["rows"])
