import json

import moe_mnist1d
import pytest
from _experiment_figures import figure_titles


def test_quick_run_writes_accuracy_load_and_figure(tmp_path, monkeypatch):
    # the title said "2-core CPU" whatever machine ran it
    titles = figure_titles(monkeypatch)
    moe_mnist1d.main(["--quick", "true", "--out", str(tmp_path)])
    assert any("16-core CPU" in t for t in titles), titles
    assert not any("2-core" in t or "2 cores" in t for t in titles), titles
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    table = saved["results"]["table"]
    assert set(table) == {
        f"{m}{k} / {p}" for m in ("dense k=", "MoE top-", "MoE bal. top-") for k in (1, 2)
        for p in ("Sync", "Async")
    }  # fmt: skip
    for run in saved["results"]["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and run["samples_per_second"] > 0
        if run["model"] != "dense":
            # every row goes to k experts (no capacity: none dropped)
            assert abs(sum(run["expert_share"]) - 1) < 1e-9 and run["dropped_rows"] == 0
            assert abs(sum(run["test_expert_share"]) - 1) < 1e-9
    assert (tmp_path / "moe_mnist1d.png").stat().st_size > 0


def test_dense_twin_has_the_moe_compute_per_row():
    cfg = moe_mnist1d.Config()
    for k in (1, 2):
        dense = moe_mnist1d.build(cfg, "dense", k).nodes["dense"].module
        assert dense.modules[0].out_features == k * cfg.expert_width


def test_the_centred_gate_gives_every_expert_its_share_of_a_key():
    import numpy as np

    gate = moe_mnist1d.CenteredGate(8, 4)
    p = gate.init(0)
    p["bias"] = np.array([5.0, 0, 0, 0], dtype=np.float32)  # a plain gate would pick expert 0
    x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    top1 = np.asarray(gate(p, x)).argmax(axis=1)
    share = np.bincount(top1, minlength=4) / 400
    assert share.min() > 0.1 and share.max() < 0.45


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--quick", "true", "--policies", "GPipe"],
            "argument --policies: invalid choice: 'GPipe'",
        ),
        (["--quick", "true", "--top-k", "1", "5"], "each row goes to k of --experts 4, got [1, 5]"),
        (["--quick", "true", "--dropout", "1"], "argument --dropout: must be in [0, 1)"),
        (["--quick", "true", "--capacity-factor", "-1"], "--capacity-factor: must be >= 0"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error):
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a misspelt true/false a silent false)
    assert message in usage_error(moe_mnist1d.main, argv)


def test_quick_keeps_the_flags_given(tmp_path):
    # --quick true ran one seed, 1 epoch, whatever --seeds and --epochs said
    moe_mnist1d.main(
        ["--quick", "true", "--seeds", "3", "--epochs", "2", "--top-k", "1", "--policies",
         "Sync", "--expert-width", "8", "--trunk-width", "8", "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    cfg = saved["config"]
    assert (cfg["seeds"], cfg["epochs"], cfg["expert_width"]) == ([3], 2, 8)
    assert {run["seed"] for run in saved["results"]["runs"]} == {3}
    assert saved["results"]["train_rows"] == 400
