import json

import _tree_levels
import expression_trees
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies


def test_trees_are_walked_in_post_order_and_labelled_with_their_value_mod_10():
    tree = (2, (0, 3, 4), (1, 9, 2))  # (3 + 4) * (9 - 2) = 49
    assert expression_trees.postorder(tree) == [3, 4, 10, 9, 2, 11, 12]
    assert expression_trees.evaluate_tree(tree) % 10 == 9
    assert expression_trees.depth(tree) == 2


def test_the_cell_leaves_the_root_alone_on_the_stack():
    cfg = expression_trees.Config(width=4, hidden=8)
    d = expression_trees.make_trees(cfg, 40, np.random.default_rng(1))
    s = expression_trees.slots(cfg)
    cell = expression_trees.TreeCell(4, s, 8)
    p = cell.init(0)
    h = d["h0"]
    for t in range(d["xs"].shape[1]):
        new = np.asarray(cell(p, h, d["xs"][:, t]))
        h = np.where((d["len"] > t)[:, None], new, h)
    assert (h[:, s * 4 :].argmax(axis=1) == 1).all()  # pointer: one vector on the stack
    assert np.abs(h[:, 4 : s * 4]).max() == 0  # every other slot popped and cleared
    assert np.abs(h[:, :4]).min(axis=1).max() > 0  # the root is there


def test_levels_layout_places_nodes_by_height_or_by_distance_from_the_root():
    tree = (2, (0, 3, 4), (1, 9, (0, 2, 5)))  # (3 + 4) * (9 - (2 + 5))
    high = expression_trees.Config(max_leaves=5, levels_align="height")
    assert _tree_levels.positions(high) == [2, 1, 1, 1]
    leaves, nodes = _tree_levels.levels_layout(high, tree)
    assert leaves == [3, 4, 9, 2, 5]
    # slots: leaves 0-4, then height 1 (5, 6), height 2 (7), height 3 (8)
    assert nodes == {1: [(0, 0, 1), (0, 3, 4)], 2: [(1, 2, 6)], 3: [(2, 5, 7)]}
    root = expression_trees.Config(max_leaves=5, levels_align="root")
    assert _tree_levels.positions(root) == [1, 2, 2, 1]
    leaves, nodes = _tree_levels.levels_layout(root, tree)
    assert leaves == [3, 4, 9, 2, 5]
    # every root at level 4; a level reads the leaves (0-4) and the level below it (5, 6)
    assert nodes == {2: [(0, 3, 4)], 3: [(0, 0, 1), (1, 2, 5)], 4: [(2, 5, 6)]}


def _levels_setup(align, lr=0.1, n=24):
    """A levels network (``Sync``, float64), its config, trees, and their encoding."""
    cfg = expression_trees.Config(width=6, hidden=10, levels_align=align)
    rng = np.random.default_rng(3)
    trees = [expression_trees.random_tree(int(rng.integers(2, 6)), rng) for _ in range(n)]
    tr = ann.Trainer(
        _tree_levels.build_levels(cfg),
        optimizer=optim.SGD(lr=lr),
        policy=policies.Sync(),
        dtype="float64",
    )
    return tr, cfg, trees, expression_trees.encode(cfg, trees)


@pytest.mark.parametrize("align", ["root", "height"])
def test_the_levels_network_computes_each_tree_as_its_recursion_does(align):
    tr, cfg, trees, d = _levels_setup(align)
    got = tr.predict({"digits": d["digits"], "struct": d["struct"]})["logits"]
    want = np.asarray(_tree_levels.reference_logits(cfg, tr.params, trees))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("align", ["root", "height"])
def test_the_levels_network_gradient_equals_that_of_the_recursion(align):
    # one Sync SGD step of lr 1 on one key moves every weight by minus its gradient
    tr, cfg, trees, d = _levels_setup(align, lr=1.0)
    before = tr.params
    tr.fit({k: d[k] for k in ("digits", "struct", "y")}, epochs=1, batch_size=len(trees))
    after = tr.params

    def loss(p):
        return nn.CrossEntropyLoss()({}, _tree_levels.reference_logits(cfg, p, trees), d["y"])

    _, grads = ann.value_and_grad(loss)(before)
    checked = 0
    for name, p in before.items():
        for k, w in p.items() if isinstance(p, dict) else ():
            want = grads[name][k] if grads[name][k] is not None else np.zeros_like(w)
            np.testing.assert_allclose(w - after[name][k], want, rtol=1e-8, atol=1e-12)
            checked += bool(np.abs(want).max() > 0)
    assert checked >= 10  # leaves, head and most (height, operator) actors got gradient


def test_quick_run_writes_results_and_figure(tmp_path):
    expression_trees.main(["--quick", "true", "--out", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    res = saved["results"]
    assert [(r["model"], r["policy"]) for r in res["runs"]] == [
        ("loop", "Sync"), ("loop", "Async K=4"), ("levels", "Sync"), ("levels", "Async K=4"),
        ("mlp", "Sync"), ("mlp", "Async K=4"),
    ]  # fmt: skip
    for run in res["runs"]:
        assert [c["epoch"] for c in run["curve"]] == [1, 2]
        assert 0 <= run["test_accuracy"] <= 1
        assert run["actor_concurrency"] > 0
    assert set(res["table"]) == {f"{m} {p}, 1 process" for m, p in
                                 [(r["model"], r["policy"]) for r in res["runs"]]}  # fmt: skip
    assert 0 < res["majority_class_test_accuracy"] < 1
    assert (tmp_path / "expression_trees.png").stat().st_size > 0


def test_unknown_model_is_named(capsys):
    # a usage error naming the flag (exit status 2), not a ValueError's traceback
    with pytest.raises(SystemExit) as stop:
        expression_trees.main(["--models", "tree"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --models: invalid choice: 'tree'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
        # a misspelt alignment built a model half "root", half "height", silently
        (["--quick", "true", "--levels-align", "Height"], "argument --levels-align: invalid"),
        # lone digits: the levels network had no root for them and read zeros, silently
        (["--quick", "true", "--min-leaves", "1"], "need 2 <= --min-leaves <= --max-leaves"),
        (["--quick", "true", "--min-leaves", "6"], "need 2 <= --min-leaves <= --max-leaves"),
        (["--quick", "true", "--target", "1.5"], "argument --target: must be in [0, 1]"),
        (["--quick", "true", "--repeats", "0"], "argument --repeats: must be > 0"),
        (["--policies", "GPipe"], "argument --policies: invalid choice: 'GPipe'"),
        (["--quick", "ture"], "argument --quick: expected true or false, got 'ture'"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error):
    assert message in usage_error(expression_trees.main, argv)


def test_quick_run_on_local_workers(tmp_path):
    # the graph's modules live in this experiment's file: worker processes must import them
    res = expression_trees.main(
        ["--quick", "true", "--models", "levels", "--policies", "Async", "--max-active-keys",
         "2", "--workers", "2", "--out", str(tmp_path)]
    )  # fmt: skip
    (run,) = res["runs"]
    assert (run["model"], run["policy"], run["workers"]) == ("levels", "Async K=2", 2)
    assert list(res["table"]) == ["levels Async K=2, LocalCluster(2)"]
    assert run["actor_concurrency"] > 0


def test_update_intervals_add_async_settings_and_their_sync_control():
    cfg = expression_trees.Config(max_active_keys=(4,), update_every=(1, 2))
    got = [(policy, batch) for _, policy, batch in expression_trees.settings(cfg)]
    labels = [label for label, _, _ in expression_trees.settings(cfg)]
    assert labels == ["Sync", "Sync, batch 100", "Async K=4", "Async K=4, update every 2"]
    assert [batch for _, batch in got] == [50, 100, 50, 50]
    assert got[3][0].max_active_keys == 4 and got[3][0].min_update_frequency == 2
    assert got[2][0].min_update_frequency == 1


def test_test_trees_are_held_out_from_the_training_trees():
    # the test trees were drawn after the training trees with no check: 274 of the 1,000 were
    # training trees (every one of depth 1)
    cfg = expression_trees.Config()
    rng = np.random.default_rng(0)
    train = expression_trees.draw_trees(cfg, 2000, rng)
    test = expression_trees.draw_trees(cfg, 300, rng, exclude=set(train))
    assert len(test) == 300 and not set(test) & set(train)
    again = expression_trees.draw_trees(cfg, 2000, np.random.default_rng(0))
    assert again == train  # the training trees are as before
    d = expression_trees.encode(cfg, test)
    assert (d["depth"] >= 1).all()


def test_too_few_trees_outside_the_training_set_is_an_error(usage_error):
    # trees of two leaves only: 300 of them, and 3,000 training trees hold them all
    argv = ["--quick", "true", "--max-leaves", "2", "--train-trees", "3000"]
    err = usage_error(expression_trees.main, argv)
    assert "outside the training set" in err and "Traceback" not in err


def test_quick_keeps_the_flags_given_and_warms_up_each_placement_untimed(tmp_path, monkeypatch):
    # --quick true replaced --width, --epochs (and more) given with it, silently; and the first
    # timed run on each placement paid for its start-up (Sync's, always)
    calls = []
    real = expression_trees.run_one

    def spy(cfg, model, setting, workers, *args, **kwargs):
        calls.append((setting[0], workers, cfg.epochs))
        return real(cfg, model, setting, workers, *args, **kwargs)

    monkeypatch.setattr(expression_trees, "run_one", spy)
    expression_trees.main(
        ["--quick", "true", "--width", "8", "--epochs", "1", "--models", "loop",
         "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    cfg = saved["config"]
    assert (cfg["width"], cfg["epochs"], cfg["hidden"], cfg["train_trees"]) == (8, 1, 32, 200)
    assert calls == [("warm-up", 0, 1), ("Sync", 0, 1), ("Async K=4", 0, 1)]
    assert [r["policy"] for r in saved["results"]["runs"]] == ["Sync", "Async K=4"]
