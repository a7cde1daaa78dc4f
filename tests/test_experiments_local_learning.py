"""Smoke test of experiments/local_learning.py: a tiny run writes its JSON and PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import local_learning
import pytest


def test_tiny_run_writes_results_and_figures(tmp_path: Path) -> None:
    flags = ["--epochs", "2", "--width", "32", "--num-samples", "600"]
    local_learning.main([*flags, "--policies", "Sync", "PipeDream", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    runs = {(r["method"], r["policy"]): r for r in results["runs"]}
    assert set(runs) == {(m, p) for m in ("backprop", "local") for p in ("Sync", "PipeDream")}
    assert set(runs["local", "Sync"]["head_test_accuracy"]) == {"head0", "head1", "head2"}
    assert set(runs["backprop", "Sync"]["head_test_accuracy"]) == {"head2"}
    for name in ("local_learning_curves.png", "local_learning_heads_time.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # the table's "best (epoch)" column showed the accuracy alone (and no table was written)
    for r in results["runs"]:
        best = r["test_accuracy_per_epoch"][r["best_epoch"] - 1]
        assert best == r["best_test_accuracy"] == max(r["test_accuracy_per_epoch"])
    table = (tmp_path / "local_learning.md").read_text()
    assert table == results["table"] and len(table.splitlines()) == 2 + 4
    r = runs["local", "Sync"]
    assert f"| local / Sync | {r['test_accuracy']:.3f}" in table.replace("**", "")
    assert f"| {r['best_test_accuracy']:.3f} ({r['best_epoch']}) |" in table


def test_the_table_gives_the_best_epoch_and_marks_the_better_method() -> None:
    cfg = local_learning.Config(stages=2)

    def run(method: str, final: float, heads: dict[str, float]) -> dict[str, object]:
        return {"method": method, "policy": "Sync", "label": f"{method} / Sync",
                "test_accuracy": final, "best_test_accuracy": 0.7, "best_epoch": 12,
                "head_test_accuracy": heads, "seconds": 3.981, "samples_per_second": 30145.2,
                "mean_busy_actors": 0.84}  # fmt: skip

    table = local_learning.markdown_table(
        cfg, [run("backprop", 0.669, {"head1": 0.669}), run("local", 0.6214, {"head0": 0.5,
                                                                               "head1": 0.6214})]
    )  # fmt: skip
    assert table.splitlines() == [
        "| method / policy | final head test acc. | best (epoch) | head0 | head1 | wall time (s) "
        "| samples/s | actors busy (mean) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| backprop / Sync | **0.669** | 0.700 (12) | – | 0.669 | 3.98 | 30,145 | 0.84 |",
        "| local / Sync | 0.621 | 0.700 (12) | 0.500 | 0.621 | 3.98 | 30,145 | 0.84 |",
    ]


def test_stop_gradient_cuts_the_stages() -> None:
    """block0 of the local graph learns from head0 alone: the stages above do not change it."""
    import asyncnn as ann
    from asyncnn import optim, policies

    cfg = local_learning.Config(width=16, stages=2)
    data = ann.data.load_mnist1d(num_samples=600)
    batch = {"x": data["x_train"][:200], "y": data["y_train"][:200]}
    full = ann.Trainer(local_learning.build_graph(cfg, True), optim.SGD(lr=0.1), policies.Sync(),
                       dtype="float64")  # fmt: skip
    g = ann.Graph()
    x, y = g.input("x", shape=(None, 40)), g.input("y", shape=(None,), dtype="int64")
    start = full.params
    h = g.layer("block0", full.graph.nodes["block0"].module, x)
    g.loss("loss0", ann.nn.CrossEntropyLoss(), g.layer("head0", full.graph.nodes["head0"].module,
                                                       h), y)  # fmt: skip
    alone = ann.Trainer(g, optim.SGD(lr=0.1), policies.Sync(), dtype="float64")
    alone.params = {"block0": start["block0"], "head0": start["head0"]}
    full.fit(batch, epochs=2, batch_size=50)
    alone.fit(batch, epochs=2, batch_size=50)
    w_full, w_alone = full.params["block0"][0]["weight"], alone.params["block0"][0]["weight"]
    assert (w_full == w_alone).all()
    assert not (w_full == start["block0"][0]["weight"]).all()


def test_no_backward_message_crosses_a_stage(tmp_path: Path) -> None:
    """In a trace of the local graph, the stop-gradient stages send forwards only: the stage
    below never waits for a backward from them (end to end, every stage above the first does)."""
    import asyncnn as ann
    from asyncnn import optim, policies

    cfg = local_learning.Config(width=16)
    data = ann.data.load_mnist1d(num_samples=600)
    batch = {"x": data["x_train"][:400], "y": data["y_train"][:400]}
    for local in (True, False):
        tr = ann.Trainer(local_learning.build_graph(cfg, local), optim.Adam(lr=1e-3),
                         policies.PipeDream(microbatches=1), trace=str(tmp_path / f"{local}.trace"),
                         trace_payloads="none")  # fmt: skip
        tr.fit(batch, epochs=1, batch_size=100)
        sent = {(e.actor, e.kind) for e in ann.trace.read(tr.traces[-1]).events if e.what == "send"}
        backwards = {a for a, kind in sent if kind == "backward" and a.startswith("block")}
        assert backwards == (set() if local else {"block1", "block2"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policies", "Sync", "GPipe"], "argument --policies: invalid choice: 'GPipe'"),
        (["--epochs", "1", "--stages", "0"], "argument --stages: must be > 0, got 0"),
        (["--epochs", "1", "--lr", "-0.001"], "argument --lr: must be > 0, got -0.001"),
        # a rate of 0 trains nothing: both methods sat at their initial accuracy
        (["--epochs", "1", "--lr", "0"], "argument --lr: must be > 0, got 0.0"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error) -> None:  # type: ignore[no-untyped-def]
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a misspelt true/false a silent false)
    assert message in usage_error(local_learning.main, argv)
