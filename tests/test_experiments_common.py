"""experiments/_common.py: the flags every experiment script's config becomes."""

import dataclasses

import _common
import pytest


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    epochs: int = 3
    lr: float = 1e-3
    keys: tuple[int, ...] = (1, 2)
    quick: bool = False


def parse(argv, capsys, **kwargs):
    """The parsed config, or the usage error argparse printed (exit status 2)."""
    try:
        return _common.parse_config(Config, argv, positive=("epochs", "keys"), **kwargs)
    except SystemExit as stop:
        assert stop.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "-1"], "argument --epochs: must be >= 0, got -1"),
        (["--seed", "-3"], "argument --seed: must be >= 0, got -3"),
        (["--lr", "-0.5"], "argument --lr: must be >= 0, got -0.5"),
        (["--lr", "nan"], "argument --lr: must be >= 0, got nan"),
        (["--keys", "4", "-2"], "argument --keys: must be >= 0, got -2"),
        (["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
        (["--keys", "1", "0"], "argument --keys: must be > 0, got 0"),
    ],
)
def test_negative_and_zero_numbers_are_usage_errors(argv, message, capsys):
    # were passed on to the run: a negative count sliced or looped silently wrong, a 0 divided
    assert parse(argv, capsys).endswith(message)


def test_zero_stays_allowed_where_not_positive(capsys):
    cfg = parse(["--seed", "0", "--lr", "0", "--keys", "3"], capsys)
    assert cfg == Config(seed=0, lr=0.0, keys=(3,))


def test_check_runs_after_the_ranges(capsys):
    err = parse(["--epochs", "2"], capsys, check=lambda c: f"epochs {c.epochs} is even")
    assert err.endswith("error: epochs 2 is even")


def test_positive_must_name_fields():
    with pytest.raises(ValueError, match=r"lacks: \['epoch'\]"):
        _common.parse_config(Config, [], positive=("epoch",))


def test_positive_is_required_and_names_only_numbers() -> None:
    # it defaulted to (): a script that forgot it (multi_gpu.py) took --steps 0 and --max-k 0,
    # and failed deep in the run or wrote an empty table
    with pytest.raises(TypeError, match="positive"):
        _common.parse_config(Config, [])
    with pytest.raises(ValueError, match=r"not numbers: \['quick'\]"):
        _common.parse_config(Config, [], positive=("epochs", "quick"))
    with pytest.raises(TypeError, match="collection of field names"):
        _common.parse_config(Config, [], positive="epochs")
    assert _common.parse_config(Config, ["--epochs", "0"], positive=()).epochs == 0


@pytest.mark.parametrize(
    ("value", "kwargs", "problem"),
    [
        (0.0, {}, None),
        (0.99, {}, None),
        (1.0, {}, "argument --p: must be in [0, 1), got 1.0"),
        (1.0, {"one": True}, None),
        (0.0, {"zero": False}, "argument --p: must be in (0, 1), got 0.0"),
        (-0.1, {"one": True}, "argument --p: must be in [0, 1], got -0.1"),
    ],
)
def test_fraction_problem(value, kwargs, problem):
    assert _common.fraction_problem("--p", value, **kwargs) == problem
