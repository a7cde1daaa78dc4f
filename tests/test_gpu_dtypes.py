"""16-bit floats (float16, bfloat16) and fused optimizer kernels on the GPU; float32 accumulation
of sums; the memory pool in the actor statistics. The GPU tests skip without cupy and a GPU
(run them with ``bash experiments/device_tests.sh``)."""

from __future__ import annotations

import numpy as np
import pytest
from _half_cases import LABELS, MODULES, OPS, rand

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._runtime._capture_update import step_scalars
from asyncnn.backends import BFLOAT16, acc_sum, get_backend, is_floating, is_half

from conftest import HAS_CUDA

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")


def test_is_floating_and_is_half():
    assert is_floating("float32") and is_floating(np.float16) and not is_floating("int64")
    assert not is_floating("bool") and not is_floating(np.dtype([("a", "f4")]))
    assert is_half("float16") and not is_half("float32") and not is_half("int16")
    if BFLOAT16 is not None:
        assert is_floating(BFLOAT16) and is_half(BFLOAT16) and BFLOAT16.kind == "V"


def test_sums_of_16_bit_floats_accumulate_in_float32():
    x = np.random.default_rng(0).random(100_000).astype(np.float16)
    want = x.astype(np.float32).sum().astype(np.float16)
    assert acc_sum(x) == want and acc_sum(x).dtype == np.float16
    assert ops.sum(x).dtype == np.float16 and ops.sum(x) == want
    y = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(acc_sum(y, axis=0), y.sum(axis=0))


def test_cpu_actors_report_no_memory_pool():
    g = ann.Graph.sequential(
        [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)], loss=nn.CrossEntropyLoss(),
        input_shape=(None, 4),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    hist = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync()).fit(
        {"x": rng.standard_normal((16, 4)), "y": rng.integers(0, 2, 16)}, batch_size=8
    )
    for st in hist.statistics.values():
        assert st.pool_used_bytes == st.peak_pool_held_bytes == 0


# -- on the GPU ------------------------------------------------------------------------------
def _opt_cases():
    return [
        optim.SGD(lr=0.1),
        optim.SGD(lr=0.1, weight_decay=0.01),
        optim.SGD(lr=0.05, momentum=0.9),
        optim.SGD(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1),
        optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
        optim.Adam(lr=1e-2),
        optim.Adam(lr=1e-2, weight_decay=0.1, amsgrad=True),
        optim.AdamW(lr=1e-2, weight_decay=0.1),
    ]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt", _opt_cases(), ids=repr)
def test_fused_updates_equal_numpy_bit_for_bit(opt, dtype):
    import cupy

    rng = np.random.default_rng(1)
    p = {"w": rng.standard_normal((7, 5)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    cp_p = {k: cupy.asarray(v) for k, v in p.items()}
    s, cs = opt.init(p), opt.init(cp_p)
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in p.items()}
        p, s = opt.update(p, g, s)
        cp_p, cs = opt.update(cp_p, {k: cupy.asarray(v) for k, v in g.items()}, cs)
    for k in p:
        np.testing.assert_array_equal(cupy.asnumpy(cp_p[k]), p[k])
        assert cp_p[k].dtype == p[k].dtype


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("opt", _opt_cases(), ids=repr)
@pytest.mark.parametrize("launch", ["for all leaves", "per leaf"])
def test_16_bit_updates_eight_at_a_time_equal_the_elementwise_kernel(
    opt, dtype, launch, monkeypatch
):
    import cupy

    from asyncnn.backends import _fused

    if launch == "per leaf":  # the one-leaf kernels, which serve what one launch cannot
        monkeypatch.setattr(_fused, "_apply_many", lambda *a: None)
    be = get_backend("cuda:0")
    dt = be.dtype(dtype)
    rng = np.random.default_rng(2)
    # 8 * 37 + 5 values: whole 16-byte loads and a tail; a view one value in is unaligned
    p = {"w": rng.standard_normal(8 * 37 + 5), "b": rng.standard_normal(6)}
    p = {k: cupy.asarray(v.astype(np.float32)).astype(dt) for k, v in p.items()}
    g = {k: (v * 0.5 + 0.25).astype(dt) for k, v in p.items()}
    s = opt.init(p)
    p1, s1 = opt.update(p, g, s)
    p1, s1 = opt.update(p1, g, s1)  # a second step: momentum and Adam read their buffers
    assert _fused.vectorised_available(dtype)  # else this compares the fallback with itself
    with monkeypatch.context() as m:
        m.setattr(_fused, "_HALF", {})  # no 16-bit type known: the elementwise kernel
        q1, t1 = opt.update(p, g, s)
        q1, t1 = opt.update(q1, g, t1)
    for k in p:
        assert p1[k].dtype == dt
        np.testing.assert_array_equal(cupy.asnumpy(p1[k].view(np.uint16)),
                                      cupy.asnumpy(q1[k].view(np.uint16)))  # fmt: skip
    # unaligned views (one value at a time, or per leaf the elementwise kernel) agree too
    pv = {"w": p["w"][1:], "b": p["b"][1:]}
    gv = {"w": g["w"][1:], "b": g["b"][1:]}
    r1, _ = opt.update(pv, gv, opt.init(pv))
    with monkeypatch.context() as m:
        m.setattr(_fused, "_HALF", {})
        r2, _ = opt.update(pv, gv, opt.init(pv))
    for k in pv:
        np.testing.assert_array_equal(cupy.asnumpy(r1[k].view(np.uint16)),
                                      cupy.asnumpy(r2[k].view(np.uint16)))  # fmt: skip


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("opt", _opt_cases(), ids=repr)
@pytest.mark.parametrize("launch", ["for all leaves", "per leaf"])
def test_an_update_with_its_step_scalars_on_the_device_equals_the_host_scalars(
    opt, dtype, launch, monkeypatch
):
    # what a captured Adam update runs: the bias corrections read from a device array, written
    # before each step (SGD's learning rate, under a schedule); bit for bit the kernel that
    # takes them as arguments
    import cupy

    from asyncnn.backends import _fused

    if launch == "per leaf":
        monkeypatch.setattr(_fused, "_apply_many", lambda *a: None)

    dt = get_backend("cuda:0").dtype(dtype)
    rng = np.random.default_rng(3)
    p = {"w": cupy.asarray(rng.standard_normal(8 * 37 + 5)).astype(dt),
         "b": cupy.asarray(rng.standard_normal(6)).astype(dt)}  # fmt: skip
    host, dev = (p, opt.init(p)), (p, opt.init(p))
    scalars = cupy.zeros(3, dtype=cupy.float64)
    for step in range(4):
        g = {k: cupy.asarray(rng.standard_normal(v.shape)).astype(dt) for k, v in p.items()}
        host = opt.update(host[0], g, host[1])
        _fused.set_scalars(scalars, step_scalars(_fused, opt, step))
        with _fused.scalars_on_device(scalars):
            dev = opt.update(dev[0], g, dev[1])
        assert dev[1]["step"] == host[1]["step"] == step + 1
    for k in p:
        a, b = (cupy.asnumpy(x[0][k]).view(np.uint8) for x in (host, dev))
        np.testing.assert_array_equal(a, b)
    for name in opt.buffer_names():  # (float16 Adam's moments: float32, read as they are)
        for k in p:
            a, b = (cupy.asnumpy(x[1][name][k]).view(np.uint8) for x in (host, dev))
            np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "opt",
    [optim.Adam(lr=1e-3), optim.Adam(lr=1e-2, weight_decay=0.1, amsgrad=True),
     optim.AdamW(lr=1e-2, weight_decay=0.1, amsgrad=True)],
    ids=repr,
)  # fmt: skip
@pytest.mark.parametrize("launch", ["for all leaves", "per leaf"])
@pytest.mark.parametrize("state", ["fresh", "an older float16 state"])
def test_float16_adam_on_the_gpu_equals_the_cpu_and_keeps_float32_moments(
    opt, launch, state, monkeypatch
):
    # the fused kernels take one type for every array: a float16 leaf with float32 moments is
    # widened and updated by the float32 kernel, leaf by leaf, as the CPU computes it (its
    # moments were float16 there, and a second moment below float16's smallest value 0)
    import cupy

    from asyncnn.backends import _fused

    if launch == "per leaf":
        monkeypatch.setattr(_fused, "_apply_many", lambda *a: None)
    rng = np.random.default_rng(9)
    # 8 * 37 + 5 values (whole 16-byte loads and a tail), tiny gradients (whose squares
    # underflow float16) and zeros (an embedding row not in the batch)
    host = {"w": rng.standard_normal(8 * 37 + 5).astype(np.float16),
            "b": rng.standard_normal((3, 4)).astype(np.float16)}  # fmt: skip
    dev = {k: cupy.asarray(v) for k, v in host.items()}
    host_state, dev_state = opt.init(host), opt.init(dev)
    if state != "fresh":  # as an asyncnn before kept it: float16 buffers
        host_state = {
            n: ({k: np.abs(rng.standard_normal(v.shape)).astype(np.float16) * np.float16(1e-2)
                 for k, v in host.items()} if n != "step" else 3)
            for n in host_state
        }  # fmt: skip
        dev_state = {
            n: ({k: cupy.asarray(v) for k, v in b.items()} if n != "step" else b)
            for n, b in host_state.items()
        }
    scales = (1e-1, 1e-3, 0.0, 1e-4, 0.0)
    for scale in scales:
        g = {k: (rng.standard_normal(v.shape) * scale).astype(np.float16) for k, v in host.items()}
        host, host_state = opt.update(host, g, host_state)
        dev, dev_state = opt.update(dev, {k: cupy.asarray(v) for k, v in g.items()}, dev_state)
    assert dev_state["step"] == host_state["step"]
    for k in host:
        assert dev[k].dtype == host[k].dtype == np.float16
        np.testing.assert_array_equal(cupy.asnumpy(dev[k]).view(np.uint16),
                                      host[k].view(np.uint16))  # fmt: skip
        assert np.abs(host[k].astype(np.float64)).max() < 10  # no step of lr * m / eps
    for name in opt.buffer_names():
        for k in host:
            assert dev_state[name][k].dtype == host_state[name][k].dtype == np.float32
            np.testing.assert_array_equal(cupy.asnumpy(dev_state[name][k]), host_state[name][k])


# 30 leaves: two launches (MAX_LEAVES is 24); empty, tiny, odd and 2-D leaves; sizes that end
# mid-vector; with two blocks a leaf, leaves long enough to stride (more values than the
# threads of their blocks take at once: 4,096 16-bit values, or 512 one at a time)
_MANY_SHAPES = [(0,), (1,), (7,), (8 * 37 + 5,), (33, 31), (4096 * 3 + 1,), (8,), (16, 16)] * 3
_MANY_SHAPES += [(5,), (64, 129), (3,), (1025,), (2, 8), (9,)]


def _many_leaves(dtype: str, seed: int, offset: int = 0) -> list:
    import cupy

    dt = get_backend("cuda:0").dtype(dtype)
    rng = np.random.default_rng(seed)
    out = []
    for shape in _MANY_SHAPES:
        whole = rng.standard_normal(int(np.prod(shape)) + offset).astype(np.float32)
        out.append(cupy.asarray(whole).astype(dt)[offset:].reshape(shape))
    return out


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("opt", _opt_cases(), ids=repr)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "views one value in"])
@pytest.mark.parametrize("cap", [None, 2], ids=["blocks as needed", "two blocks a leaf"])
def test_one_launch_for_many_leaves_equals_a_launch_per_leaf(opt, dtype, offset, cap, monkeypatch):
    import cupy

    from asyncnn.backends import _fused

    launched = []
    many = _fused._apply_many

    def spy(*args):
        result = many(*args)
        launched.append(result is not None)
        return result

    p = _many_leaves(dtype, 4, offset)
    steps = [_many_leaves(dtype, 5 + i, offset) for i in range(3)]

    def run(one_by_one: bool) -> list:
        with monkeypatch.context() as m:
            m.setattr(_fused, "_apply_many", (lambda *a: None) if one_by_one else spy)
            if cap is not None:
                m.setattr(_fused, "_MAX_LEAF_BLOCKS", cap)
            params, state = p, opt.init(p)
            for g in steps:
                params, state = opt.update(params, g, state)
            buffers = [leaf for name in opt.buffer_names() for leaf in state[name]]
            return [cupy.asnumpy(x).view(np.uint8) for x in params + buffers]

    together, apart = run(False), run(True)
    if dtype == "float16" and isinstance(opt, optim.Adam):
        # its moments are float32, the kernels of one type for every array: leaf by leaf, each
        # in float32 (test_float16_adam_on_the_gpu_equals_the_cpu_and_keeps_float32_moments)
        assert launched == []
    else:
        assert launched == [True] * 3  # every step took the launch for many leaves
    for a, b in zip(together, apart, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("opt", "on_device"),
    [
        (_opt_cases()[2], False),
        (_opt_cases()[3], True),
        (_opt_cases()[6], False),
        (_opt_cases()[6], True),
    ],
    ids=[
        "SGD momentum",
        "SGD momentum, lr on the device",
        "Adam amsgrad",
        "Adam amsgrad, scalars on the device",
    ],
)
@pytest.mark.parametrize("step", [0, 1])
def test_many_leaves_in_place_write_over_their_inputs_as_one_by_one(
    opt, on_device, step, dtype, monkeypatch
):
    # a captured update writes over its parameters and buffers (Adam's step scalars read from
    # the device); both paths must, identically, at the first step (momentum's buffer written,
    # not read) and later
    import cupy

    from asyncnn.backends import _fused

    def run(one_by_one: bool) -> list:
        p = _many_leaves(dtype, 6)
        state = opt.init(p)
        state["step"] = step
        buffers = [leaf for name in opt.buffer_names() for leaf in state[name]]
        # buffers that are not zeros, nor negative (Adam's second moments)
        values = [v for k in range(len(opt.buffer_names())) for v in _many_leaves(dtype, 8 + k)]
        for b, v in zip(buffers, values, strict=True):
            b[...] = v * v
        scalars = cupy.zeros(3, dtype=cupy.float64)
        if on_device:
            _fused.set_scalars(scalars, step_scalars(_fused, opt, step))
        with monkeypatch.context() as m:
            if one_by_one:
                m.setattr(_fused, "_apply_many", lambda *a: None)
            with _fused.in_place(), _fused.scalars_on_device(scalars if on_device else None):
                new_p, new_s = opt.update(p, _many_leaves(dtype, 7), state)
        assert all(a is b for a, b in zip(new_p, p, strict=True))
        for name in opt.buffer_names():
            assert all(a is b for a, b in zip(new_s[name], state[name], strict=True))
        return [cupy.asnumpy(x).view(np.uint8) for x in p + buffers]

    for a, b in zip(run(False), run(True), strict=True):
        np.testing.assert_array_equal(a, b)


_LAYERS = {
    "linear": (nn.Linear(8, 6), (5, 8)),
    "relu": (nn.ReLU(), (5, 8)),
    "tanh": (nn.Tanh(), (5, 8)),
    "gelu": (nn.GELU(), (5, 8)),
    "sigmoid": (nn.Sigmoid(), (5, 8)),
    "layernorm": (nn.LayerNorm(8), (5, 8)),
    "mlp": (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), (5, 8)),
}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", sorted(_LAYERS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_layers_keep_their_dtype_and_match_float32(name, dtype):
    import cupy

    be = get_backend("cuda:0")
    module, shape = _LAYERS[name]
    p32 = module.init(0, backend=be, dtype="float32")
    p16 = module.init(0, backend=be, dtype=dtype)
    x32 = be.asarray(np.random.default_rng(2).standard_normal(shape).astype(np.float32))
    x16 = x32.astype(be.dtype(dtype))
    out, pb = ann.vjp(lambda p, x: module(p, x), p16, x16)
    assert out.dtype == be.dtype(dtype)
    gp, gx = pb(cupy.ones_like(out))
    for leaf in [gx, *ann._math._pytree.tree_leaves(gp)]:
        assert leaf.dtype == be.dtype(dtype), f"{name}: a gradient came back {leaf.dtype}"
    ref = module(p32, x32)
    np.testing.assert_allclose(
        cupy.asnumpy(out.astype(cupy.float32)), cupy.asnumpy(ref), rtol=5e-2, atol=5e-2
    )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_keeps_16_bit_dtypes_on_the_gpu(name, dtype):
    # the CPU's table (test_cpu_half.py) on cupy, whose kernels for some ops lack bfloat16 and
    # promote it to float32: a max pool's output came back float32 (cupy's where)
    import cupy

    be = get_backend("cuda:0")
    dt = be.dtype(dtype)
    fn, shapes, positive = OPS[name]
    # the cases whose constants are host arrays: their device twins (labels, a generator)
    labels = be.asarray(LABELS)
    fn = {
        "cross_entropy": lambda z: ops.cross_entropy(z, labels),
        "cross_entropy sum": lambda z: ops.cross_entropy(z, labels, "sum"),
        "dropout": lambda x: ops.dropout(x, 0.5, be.rng(0)),
    }.get(name, fn)
    args = [be.asarray(rand(s, i, positive).astype(dt)) for i, s in enumerate(shapes)]
    out, pullback = ann.vjp(fn, *args)
    want = np.float32 if name.startswith("cross_entropy") else dt
    assert out.dtype == want, f"{name}: out is {out.dtype}, not {want}"
    grads = pullback(cupy.ones_like(out))
    for i, (g, a) in enumerate(zip(grads, args, strict=True)):
        assert g.dtype == dt, f"{name}: gradient {i} is {g.dtype}, not {dt}"
        assert g.shape == a.shape


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_keeps_16_bit_dtypes_on_the_gpu(name, dtype):
    import cupy

    be = get_backend("cuda:0")
    dt = be.dtype(dtype)
    module, shape = MODULES[name]
    params = module.init(0, backend=be, dtype=dtype)
    x = be.asarray(rand(shape, 2).astype(dt))
    out, pullback = ann.vjp(lambda p, x: module(p, x), params, x)
    assert out.dtype == dt, f"{name}: out is {out.dtype}"
    gp, gx = pullback(cupy.ones_like(out))
    for leaf in [gx, *ann._math._pytree.tree_leaves(gp)]:
        assert leaf.dtype == dt, f"{name}: a gradient came back {leaf.dtype}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_losses_and_sums_run_in_float32(dtype):
    import cupy

    be = get_backend("cuda:0")
    dt = be.dtype(dtype)
    logits = be.asarray(np.random.default_rng(3).standard_normal((64, 10))).astype(dt)
    y = cupy.asarray(np.random.default_rng(4).integers(0, 10, 64))
    loss, pb = ann.vjp(lambda z: ops.cross_entropy(z, y), logits)
    assert loss.dtype == cupy.float32
    (g,) = pb(cupy.float32(1.0))
    assert g.dtype == dt
    ref = ops.cross_entropy(logits.astype(cupy.float32), y)
    assert abs(float(loss) - float(ref)) < 1e-5
    x = be.asarray(np.random.default_rng(5).random(100_000)).astype(dt)
    assert ops.sum(x) == x.astype(cupy.float32).sum().astype(dt)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("opt", [optim.SGD(lr=0.05, momentum=0.9), optim.Adam(lr=1e-3)], ids=repr)
def test_trainer_in_16_bits_on_the_gpu(dtype, opt):
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((256, 20)), "y": rng.integers(0, 4, 256)}
    data["y"] = (data["x"][:, 0] > 0).astype(np.int64) + 2 * (data["x"][:, 1] > 0)
    results = {}
    for dt in ("float32", dtype):
        g = ann.Graph.sequential(
            [nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)], loss=nn.CrossEntropyLoss(),
            input_shape=(None, 20), devices=["cuda:0"],
        )  # fmt: skip
        tr = ann.Trainer(g, optimizer=opt, policy=policies.Sync(), dtype=dt, seed=0)
        hist = tr.fit(data, epochs=5, batch_size=32)
        results[dt] = (tr, hist)
    tr16, h16 = results[dtype]
    for leaf in ann._math._pytree.tree_leaves(tr16.params):
        assert str(leaf.dtype) == dtype
    assert h16.losses[-1] < 0.9 * h16.losses[0]
    np.testing.assert_allclose(h16.losses[:4], results["float32"][1].losses[:4], rtol=5e-2)
    stats = h16.statistics["stage0"]
    assert stats.pool_used_bytes > 0 and stats.peak_pool_held_bytes >= stats.pool_used_bytes
