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
        # a field that must be above 0 says so for a negative value too: it said ">= 0", and
        # then, for the 0 that fixed that, "> 0"
        (["--epochs", "-1"], "argument --epochs: must be > 0, got -1"),
        (["--seed", "-3"], "argument --seed: must be >= 0, got -3"),
        (["--lr", "-0.5"], "argument --lr: must be >= 0, got -0.5"),
        (["--lr", "nan"], "argument --lr: must be >= 0, got nan"),
        (["--keys", "4", "-2"], "argument --keys: must be > 0, got -2"),
        (["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
        (["--keys", "1", "0"], "argument --keys: must be > 0, got 0"),
    ],
)
def test_negative_and_zero_numbers_are_usage_errors(argv, message, capsys):
    # were passed on to the run: a negative count sliced or looped silently wrong, a 0 divided
    assert message in parse(argv, capsys)


def test_a_usage_error_is_one_line(capsys):
    # each was printed after the whole usage block (18 lines for mnist1d_table.py)
    for argv in (["--epochs", "0"], ["--nope", "2"], ["--quick", "ture"]):
        with pytest.raises(SystemExit) as stop:
            _common.parse_config(Config, argv, positive=("epochs",))
        assert stop.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert ": error: " in line and line.endswith(" --help)"), line


@dataclasses.dataclass(frozen=True)
class Commented:
    epochs: int = 3  # passes over the data
    # gradients averaged per update; 0 keeps
    # the runtime's choice
    every: int = 0
    keys: tuple[int, ...] = (
        1,
        2,
    )  # keys in flight
    limit: int = 0  # 0: all rows; 50% is half
    out: str = "runs/x"


def test_help_gives_each_flags_meaning_and_default(capsys):
    # it listed the flags bare ("--mlp-epochs MLP_EPOCHS"), with neither
    with pytest.raises(SystemExit) as stop:
        _common.parse_config(Commented, ["--help"], doc="What it shows.", positive=("epochs",))
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for said in ("What it shows.", "--epochs EPOCHS passes over the data (default: 3)",
                 "--every EVERY gradients averaged per update; 0 keeps the runtime's choice "
                 "(default: 0)", "keys in flight (default: [1, 2])",
                 "0: all rows; 50% is half (default: 0)", "--out OUT (default: runs/x)"):  # fmt: skip
        assert said in text, said


@pytest.mark.parametrize(
    ("script", "flag", "says"),
    [
        ("staleness", "--train-samples", "0: all; fewer for a quick smoke run (default: 0)"),
        ("moe_mnist1d", "--capacity-factor", "0: unlimited (no row dropped)"),
    ],
)
def test_the_scripts_help_says_what_their_special_values_mean(script, flag, says, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(script).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{flag} {flag[2:].upper().replace('-', '_')} {says}" in text


def test_zero_stays_allowed_where_not_positive(capsys):
    cfg = parse(["--seed", "0", "--lr", "0", "--keys", "3"], capsys)
    assert cfg == Config(seed=0, lr=0.0, keys=(3,))


def test_check_runs_after_the_ranges(capsys):
    err = parse(["--epochs", "2"], capsys, check=lambda c: f"epochs {c.epochs} is even")
    assert "error: epochs 2 is even" in err


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
