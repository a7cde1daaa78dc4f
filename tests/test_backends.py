"""Backends: device names, bytes round trips, seeding, copies, lazy cupy, allocator tuning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

from asyncnn.backends import Backend, Device, get_backend, parse_device

from conftest import HAS_CUDA


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cpu", Device("cpu")), ("cuda", Device("cuda", 0)), ("cuda:3", Device("cuda", 3))],
)
def test_parse_device(name: str, expected: Device) -> None:
    assert parse_device(name) == expected
    assert parse_device(expected) is expected


@pytest.mark.parametrize("bad", ["cuda:x", "tpu", "cpu:1", "cuda:", "gpu:0", ""])
def test_parse_device_errors_show_accepted_forms(bad: str) -> None:
    with pytest.raises(ValueError, match=r"unknown device .*'cpu'"):
        parse_device(bad)


def test_backend_names_map_to_devices() -> None:
    assert get_backend("numpy") is get_backend("cpu")
    assert str(get_backend("cpu").device) == "cpu"


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "float16"])
def test_bytes_round_trip(backend: Backend, dtype: str) -> None:
    x = np.arange(24).reshape(2, 3, 4).astype(dtype)
    buf = backend.to_bytes(backend.asarray(x))
    assert len(buf) == x.nbytes
    y = backend.from_bytes(buf, dtype, (2, 3, 4))
    out = backend.to_numpy(y)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, x)


def test_to_bytes_of_non_contiguous_is_c_order(backend: Backend) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    buf = backend.to_bytes(backend.asarray(x).T)
    np.testing.assert_array_equal(np.frombuffer(buf, np.float32), x.T.ravel())


def test_from_bytes_wrong_size_names_shape_and_dtype(backend: Backend) -> None:
    with pytest.raises(ValueError, match=r"12 bytes .*shape \(2, 2\).*float32 \(16 bytes\)"):
        backend.from_bytes(bytes(12), "float32", (2, 2))


def test_rng_is_deterministic(backend: Backend) -> None:
    a = backend.to_numpy(backend.rng(7).standard_normal((5,), dtype=np.float32))
    b = backend.to_numpy(backend.rng(7).standard_normal((5,), dtype=np.float32))
    c = backend.to_numpy(backend.rng(8).standard_normal((5,), dtype=np.float32))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    seq = np.random.SeedSequence(3)
    d = backend.to_numpy(backend.rng(seq).random(4))
    e = backend.to_numpy(backend.rng(np.random.SeedSequence(3)).random(4))
    np.testing.assert_array_equal(d, e)


def test_dtype_names(backend: Backend) -> None:
    assert backend.dtype("float32") == np.float32
    assert backend.dtype("float16") == np.float16
    with pytest.raises(ValueError, match="dtype"):
        backend.dtype("float33")


def test_cpu_copy_to_and_trivial_streams() -> None:
    be = get_backend("cpu")
    x = np.ones(3)
    assert be.copy_to(x, "cpu") is x
    stream = be.new_stream()
    with be.activate(stream):
        event = be.record_event(stream)
    be.wait_event(event, stream)
    assert be.event_done(event)
    assert be.memory_in_use() == 0


def test_using_the_cpu_never_imports_cupy() -> None:
    code = textwrap.dedent(
        """
        import sys
        import anyio
        import numpy as np
        import asyncnn
        from asyncnn import backends

        be = backends.get_backend("cpu")
        x = be.asarray(np.ones(3))
        be.from_bytes(be.to_bytes(x), "float64", (3,))
        backends.array_namespace(x)
        backends.to_numpy(x)
        backends.is_cupy_array(x)

        async def main():
            async with backends.open_device_pool(cpu_workers=1) as pool:
                await pool.run("cpu", sum, [1, 2])

        anyio.run(main)
        assert "cupy" not in sys.modules, sorted(m for m in sys.modules if "cupy" in m)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_tune_allocator_applies_and_is_idempotent() -> None:
    code = textwrap.dedent(
        """
        import platform
        from asyncnn.backends import tune_allocator
        from asyncnn.backends._alloc import allocator_tuning
        first = tune_allocator()
        assert tune_allocator() == first
        glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
        assert first == glibc, (first, glibc)
        print(allocator_tuning())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_tune_allocator_never_raises_without_glibc(monkeypatch: Any) -> None:
    import asyncnn.backends._alloc as alloc

    monkeypatch.setattr(alloc.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(alloc, "_applied", {})
    assert alloc.tune_allocator() is False


def test_tune_allocator_removes_page_faults_of_large_temporaries() -> None:
    # 64 MiB temporaries: above glibc's dynamic mmap threshold (32 MiB at most), so by default
    # each is a fresh mapping whose pages fault on first touch; tuned, the heap reuses them.
    code = textwrap.dedent(
        """
        import resource, sys
        if sys.argv[1] == "tune":
            from asyncnn.backends import tune_allocator
            assert tune_allocator()
        import numpy as np
        a = np.ones((4096, 4096), np.float32)
        for _ in range(3):
            (a * 2.0).sum()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            (a * 2.0).sum()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
        """
    )
    import asyncnn.backends._alloc as alloc

    if alloc._mallopt() is None:
        pytest.skip("glibc mallopt not available")
    faults = {}
    for mode in ("plain", "tune"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        faults[mode] = float(out.stdout)
    assert faults["tune"] < 0.1 * faults["plain"], faults


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")
def test_cupy_backend_streams_events_copies() -> None:
    import cupy

    be = get_backend("cuda:0")
    assert be.xp is cupy and be.device == Device("cuda", 0)
    x = be.asarray(np.arange(6, dtype=np.float32))
    assert isinstance(x, cupy.ndarray) and x.device.id == 0
    assert be.memory_in_use() >= x.nbytes
    s1, s2 = be.new_stream(), be.new_stream()
    with be.activate(s1):
        y = x * 2
    event = be.record_event(s1)
    be.wait_event(event, s2)
    with be.activate(s2):
        z = y + 1
    be.record_event(s2).synchronize()
    assert be.event_done(event)
    np.testing.assert_array_equal(be.to_numpy(z), np.arange(6) * 2 + 1)
    host = be.copy_to(z, "cpu")
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, np.arange(6) * 2 + 1)
    assert be.copy_to(z, "cuda:0") is z
    back = get_backend("cpu").copy_to(host, "cuda:0")
    assert isinstance(back, cupy.ndarray)
    if cupy.cuda.runtime.getDeviceCount() > 1:
        other = be.copy_to(z, "cuda:1")
        assert other.device.id == 1
        np.testing.assert_array_equal(other.get(), host)
    rng = be.rng(0)
    assert rng.normal(0.0, 2.0, (4,), dtype=np.float32).dtype == np.float32
    with pytest.raises(ValueError, match="does not exist"):
        get_backend(f"cuda:{cupy.cuda.runtime.getDeviceCount()}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")
def test_cupy_bfloat16_supported_or_clear_error() -> None:
    be = get_backend("cuda:0")
    try:
        dt = be.dtype("bfloat16")
    except ValueError as exc:
        assert "bfloat16" in str(exc) and "float16" in str(exc)
    else:
        assert dt.itemsize == 2


def test_tune_allocator_refuses_negative_or_fractional_thresholds(monkeypatch: Any) -> None:
    # -1 was taken as 0 (every allocation its own mmap: each step page-faults afresh)
    import asyncnn.backends._alloc as alloc

    called: list[Any] = []

    def mallopt(*args: Any) -> int:
        called.append(args)
        return 1

    monkeypatch.setattr(alloc, "_mallopt", lambda: mallopt)
    monkeypatch.setattr(alloc, "_applied", {})
    with pytest.raises(ValueError, match="mmap_threshold must be at least 0"):
        alloc.tune_allocator(mmap_threshold=-1)
    for bad in (1.5, "1", True):
        with pytest.raises(TypeError, match="trim_threshold must be an int"):
            alloc.tune_allocator(trim_threshold=bad)
    assert called == []  # nothing reached glibc
    assert alloc.tune_allocator(mmap_threshold=2**40) is True  # glibc's int: clamped
    assert alloc.allocator_tuning()["mmap_threshold"] == 2**31 - 1


def test_bfloat16_without_ml_dtypes_says_to_install_it() -> None:
    # the name was refused as any unknown one ("unknown dtype 'bfloat16'"), though the fix is a
    # package to install; only Module.init added the hint, other callers did not
    from asyncnn.backends._dtypes import BFLOAT16

    be = get_backend("cpu")
    if BFLOAT16 is not None:  # ml_dtypes installed: numpy knows the name
        assert be.dtype("bfloat16") == BFLOAT16
        return
    with pytest.raises(ValueError, match=r"unknown dtype 'bfloat16' \(.*pip install ml_dtypes\)"):
        be.dtype("bfloat16")
    with pytest.raises(ValueError, match=r"^unknown dtype 'float33'$"):  # no hint where none helps
        be.dtype("float33")


def test_asarray_of_bfloat16_without_ml_dtypes_says_to_install_it() -> None:
    # asarray handed the name to numpy, whose TypeError ("data type 'bfloat16' not
    # understood") did not say that a package was missing
    from asyncnn.backends._dtypes import BFLOAT16

    be = get_backend("cpu")
    if BFLOAT16 is not None:  # ml_dtypes installed: numpy knows the name
        assert be.asarray([1.5], dtype="bfloat16").dtype == BFLOAT16
        return
    with pytest.raises(ValueError, match=r"unknown dtype 'bfloat16' \(.*pip install ml_dtypes\)"):
        be.asarray([1.5], dtype="bfloat16")
    with pytest.raises(ValueError, match=r"^unknown dtype 'float33'$"):
        be.asarray([1.5], dtype="float33")
    with pytest.raises(TypeError, match="float"):  # a bad value, not the dtype: numpy's own error
        be.asarray([object()], dtype="float32")


def test_is_floating_says_no_for_none() -> None:
    # (np.dtype(None) is float64: a leaf without a dtype, getattr(x, "dtype", None), read as
    # floating)
    from asyncnn.backends import is_floating

    assert not is_floating(None)
    assert is_floating(np.float32) and is_floating("float16") and not is_floating(np.int64)


@pytest.mark.parametrize(
    ("kind", "index", "error", "said"),
    [
        ("CPU", 0, ValueError, r"unknown device kind 'CPU': .*'cpu'"),  # was placed on cuda:0
        ("tpu", 0, ValueError, r"unknown device kind 'tpu'"),  # was "needs cupy"
        ("gpu", 1, ValueError, r"unknown device kind 'gpu'"),
        (None, 0, ValueError, r"unknown device kind None"),
        ("cpu", 5, ValueError, r"Device\('cpu', 5\): there is one CPU device, Device\('cpu'\)"),
        ("cuda", -1, ValueError, r"index must be an int >= 0, got -1"),
        ("cuda", True, TypeError, r"index must be an int >= 0, got True"),
        ("cuda", 1.0, TypeError, r"index must be an int >= 0, got 1.0"),
        ("cuda", "1", TypeError, r"index must be an int >= 0, got '1'"),
    ],
)
def test_a_device_is_checked_when_made(
    kind: Any, index: Any, error: type[Exception], said: str
) -> None:
    # the string forms were checked, Device objects never: Device("CPU") meant cuda:0
    with pytest.raises(error, match=said):
        Device(kind, index)


def test_a_device_takes_numpy_ints_and_none_as_the_strings_do() -> None:
    assert Device("cuda", np.int64(2)) == Device("cuda", 2) == parse_device("cuda:2")
    assert type(Device("cuda", np.int64(2)).index) is int
    assert Device("cuda", None) == parse_device("cuda") and Device("cpu", None) == Device("cpu")
    assert Device("cpu", 0) == parse_device("cpu:0")


def test_bytes_round_trip_of_dtypes_a_memoryview_cannot_cast() -> None:
    # to_bytes cast the memoryview to "B", which numpy's buffer refuses for some dtypes
    # ("cannot include dtype 'M' in a buffer"): datetime64 here, bfloat16 below
    be = get_backend("cpu")
    x = np.arange(4).astype("datetime64[s]")
    buf = be.to_bytes(x)
    assert len(buf) == x.nbytes
    np.testing.assert_array_equal(be.from_bytes(buf, x.dtype, (4,)), x)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    h = np.arange(4, dtype=np.float32).reshape(2, 2).T.astype(ml_dtypes.bfloat16)
    buf = be.to_bytes(h)  # (and not contiguous)
    assert len(buf) == h.nbytes
    np.testing.assert_array_equal(be.from_bytes(buf, h.dtype, (2, 2)), h)


def test_is_compute_float_only_for_the_dtypes_asyncnn_computes_in() -> None:
    # float8_e5m2 (kind "f", 1 byte) passed, so a run in it trained on 1-byte sums, while
    # float8_e4m3fn (kind "V") was refused; numpy's long double is no supported dtype either.
    # is_floating stays wide: the math differentiates through casts to those (below)
    from asyncnn.backends import is_compute_float, is_floating

    assert all(is_compute_float(d) for d in ("float16", "float32", "float64", ">f4"))
    assert not is_compute_float(np.longdouble) or np.dtype(np.longdouble).itemsize == 8
    assert is_floating(np.longdouble) and not is_compute_float("int32")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert is_compute_float(ml_dtypes.bfloat16)
    for name in ("float8_e5m2", "float8_e4m3fn", "float4_e2m1fn"):
        if hasattr(ml_dtypes, name):
            assert not is_compute_float(getattr(ml_dtypes, name)), name
