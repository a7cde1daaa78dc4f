"""How :meth:`Graph.sequential` cuts a chain of modules into stages: by parameter count, by
FLOPs per sample, or by measured time, each a balanced partition (the largest stage smallest).

FLOPs are what each module's ``flops`` counts: a user's module with parameters whose class
defines none (``nn.Module``'s counts 0, as for elementwise work) is refused, naming it, rather
than taken for free.

By time, a ``Linear`` with a bias and the ``ReLU`` after it are timed alone and as the one op
(``bias_relu``) that an ``nn.Sequential`` applies them as, and a stage that holds both is given
the pair's time. A cut by measured time can differ between runs and machines. The results of
``Sync``, ``GPipe`` and ``OneFOneB`` do not depend on the cut, with ``Dropout`` in the chain
too: each module's weights are seeded, and its masks drawn, by its place in the whole chain
(see ``docs/cpu.md``, "Choosing stages"). A graph built node by node draws one stream per
node."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from asyncnn._errors import GraphError
from asyncnn._math._autodiff import vjp
from asyncnn._math._data import _check_index
from asyncnn._math._nn import Module, Residual, Sequential
from asyncnn._math._pytree import tree_leaves
from asyncnn.backends import is_floating
from asyncnn.backends._blas import _BLAS_LIMITS

__all__ = [
    "balanced_partition",
    "fused_pair_times",
    "module_costs",
    "module_times",
    "split_sizes",
]


def split_sizes(
    modules: list[Any],
    stages: int | Sequence[int],
    balance: str,
    input_shape: tuple[Any, ...],
    input_dtype: str = "float32",
    rows: int = 64,
) -> list[int]:
    n = len(modules)
    if n == 0:
        raise GraphError("sequential: no modules given")
    if balance not in _BALANCES:
        raise GraphError(
            f"sequential: balance must be 'params', 'flops' or 'time', got {balance!r}"
        )
    rows = _check_rows(rows)  # (whatever the balance: a wrong value is a mistake all the same)
    if not isinstance(stages, int):
        sizes = [int(s) for s in stages]
        if any(s <= 0 for s in sizes) or sum(sizes) != n:
            raise GraphError(
                f"sequential: stage sizes {sizes} must be positive and add up to the {n} modules"
            )
        return sizes
    if not 1 <= stages <= n:
        raise GraphError(
            f"sequential: stages={stages} but there are {n} modules (each stage needs at least "
            f"one): give stages between 1 and {n}"
        )
    if stages in (1, n):  # one cut only: nothing to measure (nor to fail on a guessed input)
        return [n] if stages == 1 else [1] * n
    if balance == "time":
        times = module_times(modules, input_shape, input_dtype, rows)
        fused = fused_pair_times(modules, input_shape, input_dtype, rows)
        return balanced_partition(times, stages, fused)
    costs = module_costs(modules, balance, input_shape, input_dtype)
    return balanced_partition(costs, stages)


_BALANCES = ("params", "flops", "time")


def module_costs(
    modules: list[Any], balance: str, input_shape: tuple[Any, ...], input_dtype: str = "float64"
) -> list[float]:
    """Each module's cost: its parameter count, or its forward FLOPs per sample."""
    if balance not in ("params", "flops"):
        raise GraphError(
            f"sequential: balance must be 'params', 'flops' or 'time', got {balance!r}"
        )
    costs = []
    # One sample of zeros, run through the modules in turn, gives each module's input shape;
    # of the input's dtype where it is not floating (the token ids of an Embedding first).
    dtype = np.float64 if is_floating(input_dtype) else np.dtype(input_dtype)
    x: Any = np.zeros((1, *(int(d or 1) for d in input_shape[1:])), dtype=dtype)
    for i, m in enumerate(modules):
        params = _init(m)
        if balance == "params":
            costs.append(float(sum(getattr(p, "size", 0) for p in tree_leaves(params))))
            continue
        # the forward first: on an input of the wrong shape it says so, where a module's
        # flops may fail in its own way (a convolution's on (N,): an IndexError)
        try:
            with np.errstate(all="ignore"):
                out = np.asarray(m(params, x))
        except Exception as exc:
            raise _fails(i, m, x, input_shape, exc) from exc
        _check_counted(m, params, f"modules[{i}]")
        try:
            costs.append(float(m.flops(tuple(x.shape))))
        except Exception as exc:
            raise _fails(i, m, x, input_shape, exc) from exc
        x = out
    return costs


def _check_counted(m: Any, params: Any, place: str) -> None:
    """Refuses, for ``balance="flops"``, a module ``m`` (of parameters ``params``, as its
    ``init`` made them) that cannot count its FLOPs: of a class outside asyncnn that defines no
    ``flops`` (``nn.Module``'s counts 0, right for elementwise work) and has parameters (a
    matrix product, most likely: a cut would take it for free); also one inside an
    ``nn.Sequential`` or ``nn.Residual``, whose flops add their modules'.
    asyncnn's own modules count theirs (0 for elementwise work, normalisation and lookups), and
    so does a user's subclass of one (of ``nn.Embedding``: 0).

    Raises:
        GraphError: naming the module, its place in the chain and the fixes.
    """
    flops = getattr(type(m), "flops", None)
    if flops is Sequential.flops and isinstance(m, Sequential):
        for j, child in enumerate(m.modules):  # (a Sequential's parameters: one per module)
            _check_counted(child, params[j], f"{place}.modules[{j}]")
        return
    if flops is Residual.flops and isinstance(m, Residual):
        _check_counted(m.module, params, f"{place}.module")  # (its module's own parameters)
        return
    if flops is not Module.flops or _nearest_asyncnn_class(type(m)) is not Module:
        return  # (counted, or asyncnn's own: a user's Embedding subclass counts 0 as it does)
    count = sum(int(getattr(p, "size", 0)) for p in tree_leaves(params))
    if count == 0:  # elementwise work of the user's own, as nn.Module's flops counts it
        return
    name = type(m).__name__
    said = repr(m) if len(repr(m)) <= 80 else repr(m)[:76] + " ..."
    raise GraphError(
        f"sequential: balance='flops' cannot count the FLOPs of {said} ({place}): it has "
        f"{count} parameters and its class defines no flops(), so it would count 0 (as "
        "elementwise work does) and the cut would take its work for free; define "
        f"{name}.flops(self, *input_shapes) to return its forward FLOPs per sample (the "
        "shapes hold the batch dimension first; a product of an (n, k) input with a (k, m) "
        "matrix is 2 * k * m), or balance by balance='time' (measured) or 'params'"
    )


def _nearest_asyncnn_class(cls: type) -> type | None:
    """The first class of asyncnn in ``cls``'s method resolution order (``cls`` itself for one
    of asyncnn's modules; ``nn.Module`` for a user's module built on it directly)."""
    for c in cls.__mro__:
        if c.__module__.split(".")[0] == "asyncnn":
            return c
    return None


def _init(m: Any) -> Any:
    try:
        return m.init(0, dtype="float64")
    except Exception as exc:
        raise GraphError(f"sequential: {m!r}.init failed: {exc}") from exc


def _fails(i: int, m: Any, x: Any, input_shape: tuple[Any, ...], exc: Exception) -> GraphError:
    """The error of module ``i``, ``m``, failing on ``x`` while stages are measured; for the
    first module, a hint to declare the input's shape (by default ``(None,)`` but for a
    ``Linear``)."""
    hint = (
        f"; the input 'x' is declared {tuple(input_shape)}: give Graph.sequential the "
        "input_shape=(None, ...) that its first module takes"
        if i == 0
        else ""
    )
    return GraphError(
        f"sequential: {m!r} fails on input of shape {tuple(np.shape(x))}: "
        f"{type(exc).__name__}: {exc}{hint}"
    )


def module_times(
    modules: list[Any], input_shape: tuple[Any, ...], input_dtype: str, rows: int
) -> list[float]:
    """Each module's measured time for a forward and a backward (vjp and pullback) on ``rows``
    rows, float32, with one BLAS thread (as each worker of the run's pool computes): the fastest
    of five runs after one to warm up (the fastest is what other load on the machine disturbs
    least)."""
    x = _timing_input(input_shape, input_dtype, rows)
    times = []
    # (one hold for every module: each first hold looks the loaded libraries up again)
    with _one_blas_thread():
        for i, m in enumerate(modules):
            try:
                params = m.init(0, dtype="float32")
            except Exception as exc:
                raise GraphError(f"sequential: {m!r}.init failed: {exc}") from exc
            inputs_differentiable = np.asarray(x).dtype.kind == "f"

            def step(
                m: Any = m, params: Any = params, x: Any = x, d: bool = inputs_differentiable
            ) -> Any:
                if d:
                    out, pullback = vjp(lambda p, xs: m(p, xs), params, x)
                else:
                    out, pullback = vjp(lambda p: m(p, x), params)
                pullback(np.ones_like(out))
                return out

            try:
                with np.errstate(all="ignore"):
                    out, took = _timed(m, step)
            except Exception as exc:
                raise _fails(i, m, x, input_shape, exc) from exc
            times.append(took)
            x = np.asarray(out)
    return times


def fused_pair_times(
    modules: list[Any], input_shape: tuple[Any, ...], input_dtype: str, rows: int
) -> dict[int, float]:
    """The measured time, as :func:`module_times` measures a module's, of each ``Linear`` with
    a bias and the ``ReLU`` after it run as a stage runs them when it holds both: an
    ``nn.Sequential`` applies the pair as one op (``bias_relu``), which costs less than the
    two alone. ``{j: time}`` by the place ``j`` of the Linear; empty where the chain has no
    such pair (then nothing runs)."""
    pairs = Sequential(*modules)._bias_relus if modules else frozenset()
    if not pairs:
        return {}
    x = _timing_input(input_shape, input_dtype, rows)
    times: dict[int, float] = {}
    with _one_blas_thread():
        for i, m in enumerate(modules[: max(pairs) + 1]):  # (up to the last pair's input)
            try:
                params = m.init(0, dtype="float32")
            except Exception as exc:
                raise GraphError(f"sequential: {m!r}.init failed: {exc}") from exc
            try:
                with np.errstate(all="ignore"):
                    if i in pairs:
                        pair = Sequential(m, modules[i + 1])
                        both = [params, modules[i + 1].init(0, dtype="float32")]

                        def step(pair: Any = pair, both: Any = both, x: Any = x) -> Any:
                            out, pullback = vjp(lambda p, xs: pair(p, xs), both, x)
                            pullback(np.ones_like(out))
                            return out

                        times[i] = _timed(pair, step)[1]
                    x = np.asarray(m(params, x))  # (the next module's input: no need to time)
            except Exception as exc:
                raise _fails(i, m, x, input_shape, exc) from exc
    return times


def _timing_input(input_shape: tuple[Any, ...], input_dtype: str, rows: Any) -> Any:
    """The batch the modules are timed on: ``rows`` rows of the declared input's shape,
    standard normal float32 for a floating input, else zeros of its dtype (token ids)."""
    rows = _check_rows(rows)
    dims = tuple(int(d or 1) for d in input_shape[1:])
    if is_floating(input_dtype):
        return np.random.default_rng(0).standard_normal((rows, *dims)).astype(np.float32)
    return np.zeros((rows, *dims), dtype=input_dtype)


def _timed(what: Any, step: Callable[[], Any]) -> tuple[Any, float]:
    """``step()``'s output, from a first run that warms up, and the fastest of five timed
    runs after it (the fastest is what other load on the machine disturbs least). ``what``, the
    module (or the pair) that ``step`` runs, names what is timed to a test's stand-in."""
    out = step()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return out, min(samples)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS at one thread within the block, and at the count it had before after it.

    Held as the compute teams hold theirs, from whichever thread measures: threadpoolctl's own
    ``threadpool_limits(1)`` silently does nothing while another live thread holds its control
    of a pthreads OpenBLAS, and the modules were then timed with several BLAS threads.
    """
    owner = object()
    _BLAS_LIMITS.hold(owner, 1)  # (with any open team's: the newest count applies)
    try:
        yield
    finally:
        _BLAS_LIMITS.release(owner)


def _check_rows(rows: Any) -> int:
    """``rows`` as a plain int >= 1 (a numpy int too, as ``stages=`` takes it; never a bool)."""
    try:
        return _check_index(rows, "balance_rows", 1)
    except (TypeError, ValueError):
        raise GraphError(f"sequential: balance_rows must be an int >= 1, got {rows!r}") from None


def balanced_partition(
    costs: list[float], k: int, fused: Mapping[int, float] | None = None
) -> list[int]:
    """Splits ``costs`` into ``k`` consecutive non-empty groups minimising the largest group
    cost: the sum of its costs, but a pair ``j, j + 1`` of ``fused`` that a group holds whole
    costs ``fused[j]`` in place of ``costs[j] + costs[j + 1]``."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # A Linear and its ReLU cost less in one stage (one fused op) than apart, and a cut
    # between them costs each alone: each group is given what its stage will take, and the
    # cut may still fall between them, where that is the best (a heavy Linear in a stage of
    # its own, its ReLU moved to a lighter one), rather than be kept out, which would leave
    # the best cut out and could not be kept with as many stages as modules anyway.
    # saved[m]: what the pairs j < m save when held whole
    saved = [0.0]
    for j in range(n):
        gain = costs[j] + costs[j + 1] - fused[j] if fused and j in fused else 0.0
        saved.append(saved[-1] + gain)

    def group(p: int, i: int) -> float:  # costs[p:i] as one stage: its pairs j <= i - 2 whole
        return prefix[i] - prefix[p] - (saved[i - 1] - saved[p])

    inf = float("inf")
    # best[j][i]: the smallest possible max-group cost splitting costs[:i] into j groups
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for p in range(j - 1, i):
                v = max(best[j - 1][p], group(p, i))
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, p
    sizes = []
    i = n
    for j in range(k, 0, -1):
        p = cut[j][i]
        sizes.append(i - p)
        i = p
    return sizes[::-1]
