"""Smoke test of experiments/char_transformer.py, and gradient checks of its model's parts."""

from __future__ import annotations

import json

import char_transformer as ct
import numpy as np
import pytest
from _experiment_figures import figure_titles

from asyncnn.testing import check_grads


def test_smoke_writes_results_and_plot(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    flags = ["--steps", "6", "--eval-every", "3", "--context", "8", "--dim", "16", "--heads", "2"]
    flags += ["--val-windows", "8", "--sample-chars", "5", "--out", str(tmp_path)]
    # the title said "2-core CPU" whatever machine ran it
    titles = figure_titles(monkeypatch)
    results = ct.main(flags)
    assert any("16-core CPU" in t for t in titles), titles
    assert not any("2-core" in t or "2 cores" in t for t in titles), titles
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "char_transformer.png").stat().st_size > 0
    assert saved["results"]["model"]["stage_sizes"] == [2, 1, 1, 4]
    assert [p["step"] for p in saved["results"]["curve"]] == [0, 3, 6]
    assert len(saved["results"]["train_bits_per_step"]) == 6
    assert all(np.isfinite(p["val_bits"]) for p in saved["results"]["curve"])
    assert set(saved["results"]["utilisation"]) == {"stage0", "stage1", "stage2", "stage3"}
    assert all(len(s["continuation"]) == 5 for s in results["samples"])
    base = saved["results"]["baselines"]
    assert base["trigram_bits"] < base["bigram_bits"] < base["unigram_bits"] < base["uniform_bits"]


def test_pipedream_policy_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    flags = ["--steps", "2", "--eval-every", "2", "--context", "8", "--dim", "16", "--heads", "2"]
    flags += ["--val-windows", "8", "--sample-chars", "2", "--policy", "PipeDream"]
    results = ct.main([*flags, "--out", str(tmp_path)])
    assert "PipeDream" in results["model"]["policy"]
    assert len(results["train_bits_per_step"]) == 2


def test_block_gradients_match_finite_differences() -> None:
    block = ct.block(dim=8, heads=2)
    params = block.init(0, dtype="float64")
    x = np.random.default_rng(1).normal(size=(2, 5, 8))
    check_grads(block, params, x, rtol=1e-5)


def test_embedding_and_head_gradients() -> None:
    embed = ct.TokenAndPosition(vocab=7, dim=4, context=6)
    ids = np.random.default_rng(2).integers(0, 7, size=(3, 5))  # shorter than the context
    check_grads(lambda p: embed(p, ids), embed.init(0, dtype="float64"), rtol=1e-5)
    head = ct.ClassesFirst()
    x = np.random.default_rng(3).normal(size=(2, 3, 4))
    assert head({}, x).shape == (2, 4, 3)
    check_grads(lambda a: head({}, a), x)


def test_ngram_baseline_by_hand() -> None:
    train = np.array([0, 1, 0, 1, 0, 1])
    # unigram: counts 3, 3 of vocab 2, add-one -> 1/2 each -> 1 bit
    assert ct.ngram_bits(train, np.array([0, 1, 1]), 2, 1) == pytest.approx(1.0)
    # bigram after 0: always 1 (3 times) -> P(1|0) = 4/5; after 1: 0 twice -> P(0|1) = 3/4
    got = ct.ngram_bits(train, np.array([0, 1, 0]), 2, 2)
    assert got == pytest.approx(-(np.log2(4 / 5) + np.log2(3 / 4)) / 2)


def test_too_few_blocks_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one block per stage"):
        ct.build_modules(ct.Config(blocks=2, stages=4), vocab=10)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "GPipe"], "argument --policy: invalid choice: 'GPipe'"),
        (["--blocks", "2"], "need 1 <= --stages <= --blocks"),
        (["--stages", "0"], "argument --stages: must be > 0, got 0"),
        # --val-fraction 1.5 trained silently on a negative split; the others were tracebacks
        (["--steps", "1", "--val-fraction", "1.5"], "argument --val-fraction: must be in (0, 1)"),
        (["--steps", "1", "--val-fraction", "1e-5"], "leaves 5 of"),
        (["--steps", "1", "--temperature", "0"], "argument --temperature: must be > 0"),
        (["--steps", "0"], "argument --steps: must be > 0"),
        (["--steps", "1", "--eval-every", "0"], "argument --eval-every: must be > 0"),
        (["--steps", "1", "--heads", "3"], "--dim 64 is not a multiple of --heads 3"),
        (["--steps", "1", "--microbatches", "64"], "--microbatches 64 is more than the rows"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error) -> None:  # type: ignore[no-untyped-def]
    # argparse's one-line error and exit status 2, before any training (was a traceback)
    assert message in usage_error(ct.main, argv)
