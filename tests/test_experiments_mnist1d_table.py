import json

import mnist1d_table
import pytest
from _experiment_figures import figure_titles


def test_quick_run_writes_a_cell_per_model_and_policy(tmp_path, monkeypatch):
    # the title said "2-core CPU" whatever machine ran it
    titles = figure_titles(monkeypatch)
    mnist1d_table.main(["--quick", "true", "--models", "logreg", "mlp", "--out", str(tmp_path)])
    assert any("16-core CPU" in t for t in titles), titles
    assert not any("2-core" in t or "2 cores" in t for t in titles), titles
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    cells = saved["results"]["cells"]
    assert [(c["model"], c["policy"]) for c in cells] == [
        (m, p) for m in ("logreg", "mlp") for p in ("Sync", "GPipe", "PipeDream", "Async")
    ]
    for c in cells:
        assert 0.0 <= c["test_accuracy"] <= 1.0 and c["samples_per_second"] > 0
    # PipeDream's minibatches are `microbatches` times larger, so it makes as many updates as Sync
    by_policy = {c["policy"]: c for c in cells if c["model"] == "mlp"}
    assert by_policy["PipeDream"]["updates_per_stage"] == by_policy["Sync"]["updates_per_stage"]
    assert by_policy["PipeDream"]["batch_size"] == 4 * by_policy["Sync"]["batch_size"]
    assert (tmp_path / "mnist1d_table.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "true", "--models", "resnet"], "argument --models: invalid choice: 'resnet'"),
        (
            ["--quick", "true", "--policies", "OneFOneB"],
            "argument --policies: invalid choice: 'OneFOneB'",
        ),
        (["--quick", "flase"], "argument --quick: expected true or false, got 'flase'"),
        # were accepted (a quick run then trained 1 epoch anyway), or a traceback
        (["--quick", "true", "--logreg-epochs", "-1"], "argument --logreg-epochs: must be > 0"),
        (["--quick", "true", "--microbatches", "0"], "argument --microbatches: must be > 0"),
        (["--quick", "true", "--mlp-stages", "9"], "the MLP has 7 modules, got 9 stages"),
        (["--quick", "true", "--mlp-dropout", "1.5"], "--mlp-dropout: must be in [0, 1)"),
        # more microbatches than a minibatch's rows: ran, GPipe cutting 100 rows into 100 keys
        # of one row, not 500, and results.json saying 500 (PipeDream: 400 keys of one row)
        (
            ["--quick", "true", "--microbatches", "500", "--models", "logreg", "mlp"],
            "argument --microbatches: GPipe cuts each minibatch of --logreg-batch-size 100 rows "
            "into --microbatches 500, one row at least each: use at most 100 microbatches",
        ),
        (
            ["--quick", "true", "--microbatches", "33"],  # (the CNN's batches are of 32)
            "argument --microbatches: GPipe cuts each minibatch of --cnn-batch-size 32 rows",
        ),
        (
            ["--quick", "true", "--microbatches", "500", "--policies", "PipeDream"],
            "argument --microbatches: PipeDream cuts each minibatch (--microbatches times a "
            "model's batch size, at most the 400 training rows of --quick true) into "
            "--microbatches 500, one row at least each: use at most 400 microbatches",
        ),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error):
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a misspelt true/false a silent false)
    assert message in usage_error(mnist1d_table.main, argv)


def test_quick_keeps_the_flags_given_and_records_the_epochs_run(tmp_path):
    # --quick true trained 1 epoch whatever --logreg-epochs said, and results.json's config
    # still said 40
    mnist1d_table.main(
        ["--quick", "true", "--models", "logreg", "--policies", "Sync", "--logreg-epochs", "2",
         "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["config"]["logreg_epochs"] == 2 and saved["config"]["mlp_epochs"] == 1
    (cell,) = saved["results"]["cells"]
    assert cell["epochs"] == 2
    assert saved["results"]["train_rows"] == 400


def test_microbatches_are_checked_only_against_the_policies_that_cut_minibatches():
    # (Sync and Async take whole minibatches; PipeDream's hold --microbatches times the rows)
    cfg = mnist1d_table.Config
    assert mnist1d_table.check(cfg(policies=("Sync", "Async"), microbatches=500)) is None
    assert mnist1d_table.check(cfg(policies=("PipeDream",), microbatches=64)) is None
    assert "at most 4000 microbatches" in mnist1d_table.check(
        cfg(policies=("PipeDream",), microbatches=5000)
    )
    assert mnist1d_table.check(cfg(policies=("GPipe",), models=("cnn",), microbatches=32)) is None
    assert "--cnn-batch-size 32 rows" in mnist1d_table.check(
        cfg(policies=("GPipe",), models=("cnn",), microbatches=33)
    )
