"""The benchmark scripts (experiments/bench_*.py, profile_gpu_step.py): bad option values are
one-line usage errors, and a missing cupy or torch is said in a line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EXPERIMENTS = os.path.join(os.path.dirname(HERE), "experiments")


def script(name: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``experiments/<name>`` with ``argv`` in a child process (its output captured)."""
    return subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, name), *argv],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert message in line, line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # an IndexError, a ZeroDivisionError and (after all the runs) a StatisticsError
        (["--steps", "3", "--skip", "5"], "argument --skip: must be in 0..2 (below --steps 3)"),
        (["--steps", "2", "--skip", "2"], "argument --skip: must be in 0..1 (below --steps 2)"),
        (["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ],
)
def test_bench_trace_refuses_bad_values(argv: list[str], message: str, tmp_path) -> None:
    one_line_error(script("bench_trace.py", *argv, "--out", str(tmp_path / "t.json")), message)


def test_bench_trace_quick_keeps_the_values_given() -> None:
    import bench_trace

    assert bench_trace.settings(bench_trace.parser().parse_args(["--quick"])) == (2, 4, 1)
    got = bench_trace.settings(bench_trace.parser().parse_args(["--quick", "--steps", "6"]))
    assert got == (2, 6, 1)
    assert bench_trace.settings(bench_trace.parser().parse_args([])) == (15, 30, 5)


def test_bench_parallel_pins_the_cores_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    # --cores=1 was ignored (the pinning looked for the token "--cores" alone); 0 was an OSError
    # from sched_setaffinity, and x a ValueError
    import bench_parallel

    have = sorted(os.sched_getaffinity(0))
    assert bench_parallel.cores_to_pin(["--quick", "--cores=1"]) == have[:1]
    assert bench_parallel.cores_to_pin(["--cores", "1"]) == have[:1]
    assert bench_parallel.cores_to_pin(["--quick"]) is None
    for argv, message in [
        (["--cores", "0"], f"argument --cores: must be in 1..{len(have)}"),
        ([f"--cores={len(have) + 1}"], f"argument --cores: must be in 1..{len(have)}"),
        (["--cores", "x"], "argument --cores: invalid int value: 'x'"),
    ]:
        with pytest.raises(SystemExit) as stop:
            bench_parallel.cores_to_pin(argv)
        assert stop.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line, line


GPU_SCRIPTS = ["bench_gpu.py", "bench_gpu_bound.py", "bench_gpu_host.py", "bench_launch_cuts.py",
               "profile_gpu_step.py"]  # fmt: skip


def _cuda() -> bool:
    from conftest import HAS_CUDA

    return bool(HAS_CUDA)


@pytest.mark.parametrize("name", GPU_SCRIPTS)
def test_gpu_scripts_give_their_help_without_a_gpu(name: str) -> None:
    # profile_gpu_step.py and bench_launch_cuts.py imported cupy first: --help was a traceback
    done = script(name, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


@pytest.mark.skipif(_cuda(), reason="checks the message of a machine without GPUs")
@pytest.mark.parametrize("name", GPU_SCRIPTS)
def test_gpu_scripts_say_what_they_need_without_a_gpu(name: str, tmp_path) -> None:
    # each ended in ModuleNotFoundError's traceback (multi_gpu.py already said it in a line)
    out = tmp_path / "report.json"
    argv = [] if name in ("bench_launch_cuts.py", "profile_gpu_step.py") else ["--out", str(out)]
    done = script(name, *argv, env={"CUDA_VISIBLE_DEVICES": ""})
    one_line_error(done, f"{name} needs CUDA GPUs and cupy")
    assert not out.exists()
