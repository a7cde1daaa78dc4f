"""experiments/multi_gpu.py: refuses a machine without GPUs clearly, and its whole flow runs on
the CPU at toy sizes (--cpu-smoke), writing the JSON and the table."""

from __future__ import annotations

import importlib.util
import json
import os

import multi_gpu
import pytest

from conftest import HAS_CUDA

pytestmark = pytest.mark.timeout(120)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message of a machine without GPUs")
def test_without_a_gpu_it_exits_saying_what_it_needs(capsys: pytest.CaptureFixture[str]) -> None:
    assert importlib.util.find_spec("asyncnn") is not None
    assert multi_gpu.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "needs CUDA GPUs and cupy" in err and "multi_gpu.sh" in err


def test_cpu_smoke_run_writes_table_and_json(tmp_path: os.PathLike[str]) -> None:
    out = os.path.join(tmp_path, "mg")
    argv = ["--cpu-smoke", "true", "--max-k", "2", "--width", "32", "--layers-per-stage", "1",
            "--microbatch", "4", "--steps", "1", "--warmup", "1", "--copy-mib", "1",
            "--modes", "process", "workers", "--policies", "1f1b", "pipedream", "--out", out]  # fmt: skip
    assert multi_gpu.main(argv) == 0
    with open(os.path.join(out, "multi_gpu.json")) as f:
        report = json.load(f)
    rows = report["throughput"]
    assert [(r["k"], r["mode"], r["policy"]) for r in rows] == [
        (k, mode, p)
        for k in (1, 2)
        for mode in ("process", "workers")
        for p in ("1f1b", "pipedream")
    ]
    assert all(r["samples_per_s"] > 0 and r["m"] == 4 * r["k"] for r in rows)
    assert report["nccl_nvls_enable"] == "0"
    rates = report["transfers"]["MB_per_s"]
    assert set(rates) == {"asyncnn stage to stage (one process)",
                          "asyncnn stage to stage (two workers, host-staged TCP)"}  # fmt: skip
    with open(os.path.join(out, "multi_gpu.md")) as f:
        table = f.read()
    assert "| 2 | 8 | workers | pipedream |" in table


def test_gpipe_bubble_bound() -> None:
    # the bound at M = 4K: 1 - (K-1)/(5K-1)
    for k in (1, 2, 4, 8):
        assert multi_gpu.gpipe_bound(k, 4 * k) == pytest.approx(1 - (k - 1) / (5 * k - 1))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpu-smoke", "true", "--policies", "zb"], "argument --policies: invalid choice: 'zb'"),
        # 0 made an empty batch (a traceback), an empty table or a copy never timed
        (["--cpu-smoke", "true", "--steps", "0"], "argument --steps: must be > 0, got 0"),
        (["--cpu-smoke", "true", "--max-k", "0"], "argument --max-k: must be > 0, got 0"),
        (["--cpu-smoke", "true", "--copy-mib", "4", "0"], "argument --copy-mib: must be > 0"),
        (["--cpu-smoke", "true", "--time-budget-s", "0"], "--time-budget-s: must be > 0"),
        (["--cpu-smoke", "true", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, usage_error) -> None:  # type: ignore[no-untyped-def]
    # argparse's one-line error and exit status 2, before any training (was a traceback, or
    # for a misspelt true/false a silent false)
    assert message in usage_error(multi_gpu.main, argv)


def test_cpu_smoke_runs_at_toy_sizes_unless_told_otherwise(tmp_path: os.PathLike[str]) -> None:
    # --cpu-smoke true ran the GPU sizes (width 4096, minibatches of 1024 rows, copies of up to
    # 256 MiB) on the CPU: minutes, where the docstring promised toy sizes
    out = os.path.join(tmp_path, "mg")
    argv = ["--cpu-smoke", "true", "--max-k", "1", "--modes", "process", "--policies",
            "pipedream", "--width", "16", "--out", out]  # fmt: skip
    assert multi_gpu.main(argv) == 0
    with open(os.path.join(out, "multi_gpu.json")) as f:
        cfg = json.load(f)["config"]
    assert cfg["width"] == 16  # given: wins
    assert (cfg["layers_per_stage"], cfg["microbatch"], cfg["steps"], cfg["copy_mib"]) == (
        1, 4, 1, [1],
    )  # fmt: skip
