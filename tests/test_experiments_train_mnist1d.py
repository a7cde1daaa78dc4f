"""experiments/train_mnist1d.py: a tiny run, and bad flags refused before any training."""

import json

import pytest
import train_mnist1d


def test_tiny_run_writes_both_models(tmp_path):
    train_mnist1d.main(
        ["--num-samples", "200", "--mlp-epochs", "1", "--cnn-epochs", "1", "--mlp-width", "8",
         "--cnn-channels", "2", "--out-dir", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [m["model"] for m in saved["models"]] == ["mlp", "cnn"]
    for m in saved["models"]:
        assert m["steps"] > 0 and 0 <= m["test"]["accuracy"] <= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # was a ValueError's traceback from the training loop
        (["--skip-cnn", "--mlp-epochs", "-1"], "argument --mlp-epochs: must be > 0, got -1"),
        (["--skip-cnn", "--mlp-batch-size", "0"], "argument --mlp-batch-size: must be > 0"),
        (["--skip-mlp", "--cnn-lr", "-0.1"], "argument --cnn-lr: must be > 0, got -0.1"),
        (["--skip-mlp", "--cnn-lr", "0"], "argument --cnn-lr: must be > 0, got 0.0"),
        (["--skip-cnn", "--mlp-dropout", "1"], "argument --mlp-dropout: must be in [0, 1)"),
        # tracebacks from Sequential.init and load_mnist1d, and a silent empty results.json
        (["--skip-cnn", "--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
        (["--skip-cnn", "--num-samples", "3"], "argument --num-samples: must be a multiple of 10"),
        (["--skip-cnn", "--skip-mlp"], "--skip-mlp and --skip-cnn together train nothing"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error):
    assert message in usage_error(train_mnist1d.main, argv)


def test_help_gives_each_flags_meaning_and_default(capsys):
    # it gave the default alone, "(60)"
    with pytest.raises(SystemExit):
        train_mnist1d.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--mlp-epochs MLP_EPOCHS test accuracy stops rising after ~60 epochs (2,400 steps) "
        "(default: 60)" in text
    )
    assert "--skip-cnn train only the MLP" in text
