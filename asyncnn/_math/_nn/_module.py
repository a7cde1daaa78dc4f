"""The module base class: a frozen record of hyperparameters, called with its parameters.

A module never owns arrays. ``init`` draws a fresh parameter pytree and ``__call__`` is a pure
function of ``(params, *inputs)``, so the same module can run many parameter versions at once
(weight stashing) and be traced by ``vjp`` like any other function.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import dis
import inspect
import math
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from asyncnn.backends import Backend, get_backend, is_floating

from .._data import _check_flag
from .._pytree import tree_leaves

__all__ = ["NO_DTYPE", "Initializer", "Module", "check_params", "float_input_error", "shape_of"]

Shape = tuple[int, ...]

# Whether modules are being rebuilt from a spec (from_spec: Trainer.load, Graph.from_spec, a
# cluster's worker), not built by the user: a warning about the arguments was given where they
# were first written (a context variable, so one thread's or task's rebuild silences no other)
_REBUILDING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "asyncnn_rebuilding_modules", default=False
)


@contextlib.contextmanager
def rebuilding() -> Iterator[None]:
    """Marks the modules built inside as rebuilt from a spec (see :func:`is_rebuilding`)."""
    token = _REBUILDING.set(True)
    try:
        yield
    finally:
        _REBUILDING.reset(token)


def is_rebuilding() -> bool:
    """Whether the module being built is rebuilt from a spec, so that a warning about its
    arguments, given when the user built it, is not given again (as torch's load runs no
    ``__init__``)."""
    return _REBUILDING.get()


class Initializer:
    """Draws one module's parameters from its own seed stream.

    Values are drawn on the host in float64 with numpy and only then cast to the requested dtype
    and moved to the backend, so the same seed gives bit-identical parameters on numpy and cupy.
    Containers hand each child an independent stream with :meth:`spawn`.
    """

    def __init__(self, seed: np.random.SeedSequence, backend: Backend, dtype: np.dtype[Any]):
        self.seed = seed
        self.backend = backend
        self.dtype = dtype
        self._rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        """The host generator of this module's own parameters."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def spawn(self, n: int) -> list[Initializer]:
        """``n`` independent initializers for child modules."""
        return [Initializer(s, self.backend, self.dtype) for s in self.seed.spawn(n)]

    def asarray(self, host: Any) -> Any:
        """A host array cast to the parameter dtype, on the backend's device."""
        return self.backend.asarray(np.asarray(host).astype(self.dtype, copy=False))

    def uniform(self, shape: Sequence[int], bound: float) -> Any:
        """Samples ``U(-bound, bound)``."""
        return self.asarray(self.rng.uniform(-bound, bound, size=tuple(shape)))

    def normal(self, shape: Sequence[int], std: float = 1.0) -> Any:
        """Samples ``N(0, std**2)``."""
        return self.asarray(self.rng.normal(0.0, std, size=tuple(shape)))

    def zeros(self, shape: Sequence[int]) -> Any:
        """Zeros of the parameter dtype."""
        return self.asarray(np.zeros(tuple(shape)))

    def ones(self, shape: Sequence[int]) -> Any:
        """Ones of the parameter dtype."""
        return self.asarray(np.ones(tuple(shape)))

    def zero_rows(self, array: Any, rows: Sequence[int]) -> Any:
        """``array`` (a parameter this initializer made) with ``rows`` set to zero, in place:
        an Embedding's padding row, the others left as drawn."""
        for row in rows:
            array[row] = 0
        return array


def fan_in_bound(fan_in: int) -> float:
    """torch's default bound for Linear/Conv weights and biases: ``kaiming_uniform(a=sqrt(5))``
    reduces to ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Module:
    """Base class of every layer: hyperparameters only, parameters passed on each call.

    Subclasses are frozen dataclasses (decorate them with ``@dataclass(frozen=True)``), so modules
    compare equal and hash by value and turn into specs (:func:`asyncnn.nn.to_spec`). A subclass
    implements :meth:`init_params` (when it has parameters) and :meth:`__call__`.

    A module that draws random numbers from the ``rng`` its ``__call__`` is given (dropout, noise)
    is *stochastic* (:attr:`stochastic`): a run gives it a seeded Generator per key in training
    (``None`` in ``evaluate`` and ``predict``) and keeps it out of CUDA-graph capture. That is
    found from the code: a subclass whose own ``__call__`` reads its ``rng`` parameter (or,
    having none, reads its ``**kwargs``, which may hold it) is stochastic, one that only accepts
    it is not. A class decides for itself by defining
    ``stochastic`` (a class attribute or a property), which always wins: a container that only
    passes ``rng`` on to the modules it holds can answer as they do.

    Example:
        >>> @dataclass(frozen=True)
        ... class Scale(nn.Module):
        ...     n: int
        ...     def init_params(self, init):
        ...         return {"scale": init.ones((self.n,))}
        ...     def __call__(self, params, x, *, rng=None):
        ...         return ops.multiply(x, params["scale"])
    """

    @property
    def stochastic(self) -> bool:
        """Whether a call draws random numbers when given an ``rng`` (dropout): true for a user
        module whose own ``__call__`` reads its ``rng`` parameter (or, having none, reads its
        ``**kwargs``, which may hold it), and when any module among its fields (or in a tuple
        or list field) is. The runtime gives a stochastic layer a seeded ``rng`` per key and
        keeps it out of CUDA-graph capture; others get ``rng=None``. Override it (a class
        attribute or a property) to answer otherwise."""
        if _reads_rng(type(self)):
            return True
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for item in value if isinstance(value, tuple | list) else (value,):
                if isinstance(item, Module) and item.stochastic:
                    return True
        return False

    def init(self, seed: int, backend: str | Backend = "numpy", dtype: Any = "float32") -> Any:
        """Creates a fresh parameter pytree.

        Args:
            seed: a non-negative int; children of containers get independent streams from it
                (``numpy.random.SeedSequence(seed).spawn``).
            backend: ``"numpy"``, ``"cupy"``, a device (``"cpu"``, ``"cuda:0"``) or a Backend.
            dtype: a floating-point dtype.

        Returns:
            The parameters (a dict, a list for containers, ``{}`` for modules without any).
            The same seed gives identical values on every backend.
        """
        return self.init_params(self._initializer(seed, backend, dtype))

    def _initializer(self, seed: int, backend: str | Backend, dtype: Any) -> Initializer:
        """The checked arguments of :meth:`init` as an :class:`Initializer`."""
        _check_dataclass(type(self))
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"{type(self).__name__}.init: seed must be an int >= 0, got {seed!r}")
        be = backend if isinstance(backend, Backend) else get_backend(backend)
        try:
            dt = be.dtype(dtype)
        except ValueError as exc:  # the backend's message names neither the module nor a fix
            raise ValueError(
                f"{type(self).__name__}.init: {exc}; use dtype='float32' or 'float64' "
                "(or 'float16'/'bfloat16')"
            ) from exc
        if not is_floating(dt):
            raise ValueError(
                f"{type(self).__name__}.init: parameters must be floating point, got dtype {dt}; "
                "use dtype='float32' or 'float64' (or 'float16'/'bfloat16' on a GPU)"
            )
        return Initializer(np.random.SeedSequence(int(seed)), be, dt)

    def init_params(self, init: Initializer) -> Any:
        """Draws this module's parameters with ``init`` (override in modules with parameters)."""
        return {}

    # Subclasses define ``__call__(self, params, *inputs, rng=None)``; the base signature is
    # open so that each may name its own inputs.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Applies the module: ``module(params, *inputs, rng=None)``.

        ``rng`` (a numpy or cupy Generator) selects training mode for stochastic layers
        (Dropout); ``None`` means evaluation. A subclass whose ``__call__`` reads ``rng`` is
        stochastic (:attr:`stochastic`): a run gives it one in training. Inputs and outputs are
        raw or traced arrays.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def num_params(self, params: Any) -> int:
        """The number of scalar parameters in ``params``."""
        return sum(int(getattr(leaf, "size", 1)) for leaf in tree_leaves(params))

    def flops(self, *input_shapes: Sequence[int | None]) -> int:
        """Estimated forward FLOPs per sample of the matrix products and convolutions.

        Input shapes include the batch dimension first (``None`` or any int; it is ignored), as in
        ``Graph.input(shape=(None, 40))``. Elementwise work counts as 0. Used to balance stages.
        """
        return 0

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        """The output shape for these input shapes (batch included), or None when unknown."""
        return None


#: per module class: whether the ``__call__`` it runs reads its ``rng`` (see :func:`_reads_rng`)
_READS_RNG: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _reads_rng(cls: type) -> bool:
    """Whether the ``__call__`` that instances of ``cls`` run reads its ``rng`` parameter, or
    may: a user module that draws from it. Read from the bytecode once per class.

    Without a parameter ``rng``, a ``**kwargs`` that the code reads may hold it (``kw.get(
    "rng")``, ``**kw`` passed on, a decorator's wrapper without ``functools.wraps``): counted as
    a read, since guessing no meant a run passed ``rng=None`` and the dropout never ran, without
    a word (guessing yes costs only the layer's CUDA-graph capture). False for asyncnn's own
    modules, which say themselves whether they draw (a container reads its ``rng`` only to pass
    it on), and where the code cannot be read.
    """
    try:
        return _READS_RNG[cls]
    except KeyError:
        pass
    owner = next((k for k in cls.__mro__ if "__call__" in vars(k)), Module)
    reads = False
    if owner is not Module and not owner.__module__.startswith("asyncnn."):
        reads = _code_reads(vars(owner)["__call__"], "rng")
    _READS_RNG[cls] = reads
    return reads


def _code_reads(fn: Any, name: str) -> bool:
    """Whether the function ``fn`` (unwrapped from its decorators) has a parameter ``name`` and
    reads it, or has none of that name and reads its ``**kwargs``, which may hold it: a load of
    that local, or of the cell a nested function reads it through."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return False
    named = code.co_argcount + code.co_kwonlyargcount
    if name not in code.co_varnames[:named]:
        if not code.co_flags & inspect.CO_VARKEYWORDS:
            return False
        # the **kwargs name comes after the named parameters and the *args name, if any
        name = code.co_varnames[named + bool(code.co_flags & inspect.CO_VARARGS)]
    for ins in dis.get_instructions(code):
        op = ins.opname
        # LOAD_FAST and its variants (3.12's LOAD_FAST_CHECK, 3.13's LOAD_FAST_LOAD_FAST of two
        # names, 3.14's borrowed loads), and the cell loads of a name a closure captures; not
        # LOAD_FAST_AND_CLEAR, which saves a comprehension's own variable of that name
        if (op.startswith("LOAD_FAST") and op != "LOAD_FAST_AND_CLEAR") or op in (
            "LOAD_DEREF",
            "LOAD_CLOSURE",
        ):
            value = ins.argval
            if value == name or (isinstance(value, tuple) and name in value):
                return True
        # 3.13's fused store-then-load (an inlined comprehension's): the second name is read
        if op == "STORE_FAST_LOAD_FAST" and isinstance(ins.argval, tuple):
            if ins.argval[1] == name:
                return True
    return False


def check_flags(module: Any, *names: str) -> None:
    """Refuses a flag field (``bias``, ``causal``) that is not a bool, naming the module and the
    field (a string or a number was taken for its truth: ``bias="no"`` made a bias), and keeps a
    numpy bool as a Python one (a spec holds it).

    Raises:
        TypeError: the field is not a Python or numpy bool.
    """
    for name in names:
        flag = _check_flag(getattr(module, name), f"{type(module).__name__}: {name}")
        object.__setattr__(module, name, flag)


def _check_dataclass(cls: type) -> None:
    if "__dataclass_fields__" not in vars(cls):
        raise TypeError(
            f"{cls.__name__} subclasses nn.Module but is not a dataclass: decorate it with "
            "@dataclasses.dataclass(frozen=True) so that it compares, hashes and serializes by "
            "its hyperparameters"
        )


def _shape(x: Any) -> Shape:
    return tuple(getattr(x, "shape", ()))


def check_params(module: Any, params: Any, expected: Mapping[str, Shape]) -> None:
    """Checks that ``params`` is a dict with exactly the ``expected`` keys and shapes.

    Raises:
        ValueError: naming the module, the expected keys and shapes, and what it got.
    """
    if type(params) is dict and params.keys() == expected.keys():
        for k, shape in expected.items():
            if getattr(params[k], "shape", ()) != shape:
                break
        else:
            return  # the common case, with no message built
    want = ", ".join(f"{k!r}: {v}" for k, v in expected.items())
    if type(params) is not dict or params.keys() != expected.keys():
        got = (
            "{" + ", ".join(f"{k!r}: {_shape(v)}" for k, v in params.items()) + "}"
            if isinstance(params, dict)
            else type(params).__name__
        )
        raise ValueError(
            f"{module!r} expects params {{{want}}}, got {got}; create them with "
            f"{type(module).__name__}.init(seed)"
        )
    for k, shape in expected.items():
        if _shape(params[k]) != shape:
            raise ValueError(
                f"{module!r}: params[{k!r}] has shape {_shape(params[k])}, expected {shape} "
                f"(all expected: {{{want}}})"
            )


def check_ndim(module: Any, x: Any, ndims: Sequence[int], layout: str) -> Shape:
    """Checks the number of dimensions of an input; returns its shape."""
    shape = _shape(x)
    if len(shape) not in ndims:
        raise ValueError(f"{module!r} expects {layout} input, got shape {shape}")
    return shape


#: the dtype an input without one (a Python float) passes the integer checks with:
#: ``getattr(x, "dtype", NO_DTYPE).kind in "iub"``
NO_DTYPE = np.dtype(np.float64)


def float_input_error(module: Any, x: Any, param: Any = None, what: str = "input") -> TypeError:
    """The error of a layer that computes in floating point given integer or bool input.

    Such a layer refuses it where numpy would promote it silently (``int64 @ float32`` is
    float64: a float32 model would run and return float64); torch refuses it too. The layer
    tests the input itself, so that the common case costs one dtype-kind test and no call::

        if x.dtype.kind in "iub":  # x: a numpy or cupy array, or a Tracer (its value's dtype)
            raise float_input_error(self, x, params["weight"])

    Float input of another float dtype is not refused: numpy's promotion decides the output
    (a float64 input to float32 parameters gives float64; gradients come back in each
    argument's own dtype), and a run casts its float inputs to the run's dtype anyway.

    Args:
        module: the layer, named in the message.
        x: its input.
        param: one of its parameters (the message gives its dtype), or None without any.
        what: the input's name in the message (``"query"`` for attention, say).

    Returns:
        A TypeError naming the module, the input's dtype and shape, the parameters' dtype and
        the fixes (a cast, or ``nn.Embedding`` for integer ids).
    """
    name = "x" if what == "input" else what
    dtype = getattr(param, "dtype", None)
    held = "" if dtype is None else f"its parameters are {dtype} and "
    cast = "float32" if dtype is None else str(dtype)
    return TypeError(
        f"{module!r} got {what} of dtype {x.dtype} and shape {_shape(x)}, but {held}it takes "
        f"floating-point input only: cast the {what}, e.g. {name}.astype({cast!r}), or, if they "
        "are integer ids (tokens, categories), look them up with nn.Embedding first"
    )


def shape_of(module: Module, *input_shapes: Sequence[int | None]) -> Shape:
    """The output shape of ``module`` (batch included) for these input shapes.

    Uses the module's own shape rule where it has one, else runs it on a batch of one sample of
    zeros with freshly initialized float32 numpy parameters, with floating-point warnings off
    (zeros may well divide 0 by 0; only the shape is read), once per module object and input
    shapes: each layer actor's set-up asks again for its stage's FLOPs.
    """
    shapes = [tuple(1 if d is None else int(d) for d in s) for s in input_shapes]
    known = module._output_shape(*shapes)
    if known is not None:
        return known
    trailing = tuple(s[1:] for s in shapes)
    entry = _RUN_SHAPES.get(id(module))
    if entry is not None and entry[0]() is module and trailing in entry[1]:
        return (shapes[0][0], *entry[1][trailing])
    params = module.init(0)
    xs = [np.zeros((1, *s), dtype=np.float32) for s in trailing]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = module(params, *xs)
    found = _shape(out)[1:]
    _remember_shape(module, trailing, found)
    return (shapes[0][0], *found)


#: per module object (by identity: an equal module whose fields differ in type, 4 and 4.0, may
#: run otherwise), the output shapes (less the batch) shape_of found by running it, per its
#: input shapes (less the batch); an entry goes with its module
_RUN_SHAPES: dict[int, tuple[weakref.ref[Module], dict[tuple[Shape, ...], Shape]]] = {}


def _remember_shape(module: Module, trailing: tuple[Shape, ...], found: Shape) -> None:
    key = id(module)
    entry = _RUN_SHAPES.get(key)
    if entry is None or entry[0]() is not module:

        def forget(_: weakref.ref[Module]) -> None:
            _RUN_SHAPES.pop(key, None)

        try:
            ref = weakref.ref(module, forget)
        except TypeError:  # (an object without weak references: not remembered)
            return
        entry = _RUN_SHAPES[key] = (ref, {})
    entry[1][trailing] = found
