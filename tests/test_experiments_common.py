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
        # an empty --char-only ran all 16 transformer settings, which --help did not say
        ("policy_zoo", "--char-only", "settings run on the transformer (empty: all)"),
        # were stale: "the majority class: 17%", "a run takes ~10-20 s"
        (
            "expression_trees",
            "--target",
            'test accuracy of "solved" (the majority class scores 16.3%)',
        ),
        (
            "local_learning",
            "--epochs",
            "backprop's test accuracy plateaus by then; a run: 5-9 s on the 2-core VM",
        ),
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


QUICK = {"quick": {"epochs": 1, "keys": (4,), "lr": 0.5}}


def test_a_preset_supplies_defaults_only(capsys):
    # --quick true replaced the values of flags given with it, silently: --quick true --epochs 5
    # ran (and recorded) 1 epoch
    assert parse(["--quick", "true"], capsys, presets=QUICK) == Config(
        epochs=1, keys=(4,), lr=0.5, quick=True
    )
    got = parse(["--quick", "true", "--epochs=5", "--keys", "2", "3"], capsys, presets=QUICK)
    assert got == Config(epochs=5, keys=(2, 3), lr=0.5, quick=True)
    # a flag given with its default value is given too
    assert parse(["--quick", "true", "--epochs", "3"], capsys, presets=QUICK).epochs == 3
    assert parse(["--epochs", "5"], capsys, presets=QUICK) == Config(epochs=5)  # no quick
    assert parse(["--quick", "false"], capsys, presets=QUICK) == Config()
    # the checks see the config that runs
    assert "argument --epochs: must be > 0, got 0" in parse(
        ["--quick", "true", "--epochs", "0"], capsys, presets=QUICK
    )


def test_a_preset_must_name_a_bool_field_and_fields():
    with pytest.raises(ValueError, match="epochs"):
        _common.parse_config(Config, [], positive=(), presets={"epochs": {"seed": 1}})
    with pytest.raises(ValueError, match="width"):
        _common.parse_config(Config, [], positive=(), presets={"quick": {"width": 1}})


def test_results_json_is_valid_json_without_nan(tmp_path):
    # a missing value was written as NaN (pipeline_bubble.py's theory where no formula holds),
    # which JSON parsers (jq, JSON.parse) refuse: it is null
    import json

    import numpy as np

    missing = {"theory": float("nan"), "rows": [1.5, np.float32("nan"), np.float64("inf")]}
    want = {"theory": None, "rows": [1.5, None, None]}
    path = _common.write_results(str(tmp_path), Config(), missing)
    with open(path) as f:
        text = f.read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["results"] == want
    _common.write_json(str(tmp_path / "r.json"), missing)
    assert json.loads((tmp_path / "r.json").read_text()) == want


def test_a_missing_torch_is_said_in_a_line(monkeypatch, capsys):
    # bench_math.py printed "-" in its torch columns and bench_runtime.py dropped its PyTorch row,
    # without a word
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch: ImportError
    why = _common.torch_missing("the PyTorch columns are skipped")
    assert why is not None and "import of torch halted" in why
    out = capsys.readouterr().out
    assert out == f"torch not importable ({why}): the PyTorch columns are skipped\n"


@pytest.mark.parametrize("script", ["staleness", "synthetic_gradients", "policy_zoo",
                                    "local_learning"])  # fmt: skip
def test_num_samples_not_a_multiple_of_10_is_a_usage_error(script, usage_error):
    # was load_mnist1d's ValueError traceback (exit status 1) after the parse; train_mnist1d.py
    # said it in a line (its message, which these now share)
    import importlib

    err = usage_error(importlib.import_module(script).main, ["--num-samples", "15"])
    (line,) = err.strip().splitlines()
    assert ("argument --num-samples: must be a multiple of 10 (one tenth per digit), got 15"
            in line)  # fmt: skip


def test_cpu_label_says_this_machines_cores(monkeypatch):
    # the figures said "2-core CPU" whatever machine made them
    monkeypatch.setattr(_common.os, "cpu_count", lambda: 16)
    assert _common.cpu_label() == "16-core CPU"
