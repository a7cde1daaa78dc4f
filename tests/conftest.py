"""Shared fixtures: every math test runs on each available backend. Also puts experiments/ on
``sys.path``, so that the tests of the experiment scripts import them by name."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from typing import Any

import pytest

from asyncnn.backends import Backend, get_backend

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "experiments")
)

# fixtures of the stand-ins for a CUDA device and for CUDA graphs, and a saved checkpoint, for
# every test module
from _device_stand_in import fake_cuda  # noqa: E402, F401
from _graphs_stand_in import emulated  # noqa: E402, F401

from _checkpoint_cases import saved  # noqa: E402, F401


def _cuda_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


HAS_CUDA = _cuda_available()

# A shell without job control starts its background jobs with SIGINT ignored (as
# experiments/device_tests.sh --jobs does), and Python then raises no KeyboardInterrupt, in this
# process or in the ones it starts: the Ctrl-C tests would see nothing. They test our handling of
# Ctrl-C, so the suite restores Python's own handler (children then start with the default).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def spin_gpu(cycles: int) -> None:
    """Queues a one-thread kernel that busies the GPU for ``cycles`` clock cycles (2e8 is about
    0.1 s on an H100) on the current stream: work still running when a test looks."""
    import cupy
    import numpy as np

    kernel = cupy.RawKernel(
        r"""extern "C" __global__ void asyncnn_test_spin(long long cycles) {
            long long start = clock64();
            while (clock64() - start < cycles) {}
        }""",
        "asyncnn_test_spin",
    )
    kernel((1,), (1,), (np.int64(cycles),))


_BACKEND_PARAMS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "cupy",
        id="cupy",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")],
    ),
]


@pytest.fixture(params=_BACKEND_PARAMS)
def backend(request: Any) -> Backend:
    """The backend a math test runs on: numpy everywhere, cupy where a GPU is present."""
    return get_backend(request.param)


@pytest.fixture
def xp(backend: Backend) -> Any:
    """The array namespace of :func:`backend`."""
    return backend.xp


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: Any) -> str:
    """Every async test (marked ``@pytest.mark.anyio``) runs on trio and on asyncio."""
    return str(request.param)


@pytest.fixture
def usage_error(capsys: Any, tmp_path: Any) -> Any:
    """``usage_error(main, argv)``: runs an experiment script's ``main(argv)`` (its output in a
    temporary folder, never the repository's ``runs/``), checks that it stops with argparse's
    usage error (exit status 2) and returns what it printed on stderr."""

    def check(main: Any, argv: list[str]) -> str:
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--out", str(tmp_path)])
        assert stop.value.code == 2
        return str(capsys.readouterr().err)

    return check
