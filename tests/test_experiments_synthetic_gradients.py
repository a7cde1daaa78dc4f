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


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_stages_update_from_their_synthesizers_not_the_true_gradient(method) -> None:
    """The decoupling, numerically (Sync, float64, Adam). The synthesizers start at zero, so a
    stage's first updates are zero although its true gradient is not (Adam moves by lr on any
    non-zero gradient): block2 first moves at minibatch 2 (its synthesizer trained on the head's
    true gradient of minibatch 1), block1 at 3 and block0 at 4 (each synthesizer trained on the
    gradient the stage above sent from its own synthetic one: the bootstrapping). Without that
    upstream gradient (``upstream="none"``), block1 and block0 never move."""
    import copy

    import asyncnn as ann
    from asyncnn import optim, policies

    data = ann.data.load_mnist1d(num_samples=600)
    moved = {}
    for upstream in ("synthetic", "none"):
        cfg = synthetic_gradients.Config(width=16, upstream=upstream)
        for n in (1, 2, 3, 4):
            tr = ann.Trainer(synthetic_gradients.build_graph(cfg, method), optim.Adam(lr=1e-2),
                             policies.Sync(), seed=0, dtype="float64")  # fmt: skip
            start = copy.deepcopy(tr.params)
            batch = {"x": data["x_train"][: 50 * n], "y": data["y_train"][: 50 * n]}
            tr.fit(batch, epochs=1, batch_size=50, shuffle=False)
            moved[upstream, n] = {
                name: not np.array_equal(tr.params[name][0]["weight"], start[name][0]["weight"])
                for name in ("block0", "block1", "block2")
            }
    first = {"block2": 2, "block1": 3, "block0": 4}
    for n in (1, 2, 3, 4):
        assert moved["synthetic", n] == {b: n >= first[b] for b in first}, n
        assert moved["none", n] == {"block0": False, "block1": False, "block2": n >= 2}, n


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policies", "Async"], "argument --policies: invalid choice: 'Async'"),
        (["--methods", "dfa"], "argument --methods: invalid choice: 'dfa'"),
        (["--upstream", "zero"], "argument --upstream: invalid choice: 'zero'"),
        (["--epochs", "1", "--hidden-stages", "0"], "argument --hidden-stages: must be > 0"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error) -> None:  # type: ignore[no-untyped-def]
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a misspelt true/false a silent false)
    assert message in usage_error(synthetic_gradients.main, argv)
