import json

import expression_trees
import numpy as np


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


def test_quick_run_writes_results_and_figure(tmp_path):
    expression_trees.main(["--quick", "true", "--out", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    res = saved["results"]
    assert [(r["model"], r["policy"]) for r in res["runs"]] == [
        ("tree", "Sync"), ("tree", "Async"), ("mlp", "Sync"), ("mlp", "Async"),
    ]  # fmt: skip
    for run in res["runs"]:
        assert [c["epoch"] for c in run["curve"]] == [1, 2]
        assert 0 <= run["test_accuracy"] <= 1
    assert 0 < res["majority_class_test_accuracy"] < 1
    assert (tmp_path / "expression_trees.png").stat().st_size > 0
