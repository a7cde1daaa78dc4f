"""Smoke test of experiments/synthetic_gradients.py: a tiny run writes its JSON and PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import synthetic_gradients


def test_tiny_run_writes_results_and_figures(tmp_path: Path) -> None:
    flags = ["--epochs", "2", "--width", "32", "--num-samples", "600", "--policies", "Sync"]
    synthetic_gradients.main([*flags, "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"backprop", "dni", "cdni"}
    assert len(runs["dni"]["test_accuracy_per_epoch"]) == 2
    # every DNI stage trained its synthesizer; backprop has none
    assert set(runs["cdni"]["synth_loss_per_key"]) == {"block0", "block1", "block2"}
    assert runs["backprop"]["synth_loss_per_key"] == {}
    for name in ("synthetic_gradients_curves.png", "synthetic_gradients_synth_error.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_synthesizer_learns_the_top_gradient(tmp_path: Path) -> None:
    """cDNI's top synthesizer must come to predict the true gradient (relative error < 1: better
    than the zero prediction it starts from)."""
    flags = ["--epochs", "10", "--width", "32", "--num-samples", "1000", "--batch-size", "50", "--policies", "Sync",
             "--methods", "cdni"]  # fmt: skip
    synthetic_gradients.main([*flags, "--out", str(tmp_path)])
    run = json.loads((tmp_path / "results.json").read_text())["results"]["runs"][0]
    errors = np.asarray(run["synth_loss_per_key"]["block2"])
    assert errors[-10:].mean() < 0.5 * errors[:3].mean()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policies", "Async"], "argument --policies: invalid choice: 'Async'"),
        (["--methods", "dfa"], "argument --methods: invalid choice: 'dfa'"),
        (["--upstream", "zero"], "argument --upstream: invalid choice: 'zero'"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error) -> None:  # type: ignore[no-untyped-def]
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a misspelt true/false a silent false)
    assert message in usage_error(synthetic_gradients.main, argv)
