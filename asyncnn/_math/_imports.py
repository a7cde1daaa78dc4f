"""Classes named in specs by import path: the one place that turns ``"package.module:Class"``
back into a class (modules, optimizers, schedules, policies and actors all use it).

A spec may come from a file (a checkpoint, a trace), so turning a path into a class must never run
code the user did not choose to run. :func:`import_by_path` therefore imports nothing but
asyncnn's own modules and those the user trusts; any other module must already be imported (the
user's script imported it, so its classes are what the user meant). Trust is given with
:func:`trusted_modules` (a context), the ``trusted_modules=`` argument of the functions that read
files, or the environment variable ``ASYNCNN_TRUSTED_MODULES`` (comma-separated names).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "TRUSTED_MODULES_ENV",
    "UntrustedModuleError",
    "class_path",
    "import_by_path",
    "trusted_modules",
    "trusted_now",
    "untrusted_cause",
]

#: the environment variable that lists modules trusted in every run of this process
TRUSTED_MODULES_ENV = "ASYNCNN_TRUSTED_MODULES"

# the modules import_by_path may import in this context (and their submodules); "*" = any
_trusted: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "asyncnn_trusted_modules", default=()
)


class UntrustedModuleError(ValueError):
    """A spec names a class in a module that is neither imported nor trusted; nothing was
    imported. The message says how to trust the module."""


def untrusted_cause(error: BaseException) -> UntrustedModuleError | None:
    """The :class:`UntrustedModuleError` behind ``error`` (itself, or what it was raised from:
    a graph's spec wraps its nodes' errors in a ``GraphError``)."""
    e: BaseException | None = error
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, UntrustedModuleError):
            return e
        e = e.__cause__ or e.__context__
    return None


def class_path(cls: type) -> str:
    """``"package.module:Class"`` for ``cls``; refuses classes defined inside a function."""
    if "<locals>" in cls.__qualname__:
        raise ValueError(
            f"{cls.__qualname__} is defined inside a function, so a spec cannot name it; define "
            "it at module level"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


@contextlib.contextmanager
def trusted_modules(modules: Iterable[str] | str | None) -> Iterator[None]:
    """Within this context, specs may name classes of ``modules`` (and their submodules), which
    are then imported as needed. ``"*"`` trusts every module (for a spec from a trusted peer,
    such as the driver of a worker process). ``None`` or an empty list adds nothing.

    Example:
        >>> with trusted_modules(["mylab.layers"]):
        ...     tr = ann.Trainer.load("ckpt")
    """
    names = _names(modules)
    token = _trusted.set(_trusted.get() + names)
    try:
        yield
    finally:
        _trusted.reset(token)


def trusted_now() -> tuple[str, ...]:
    """The modules trusted in this context by :func:`trusted_modules` (not the environment's):
    what a thread started from here needs to trust them too (a new thread's context is empty)."""
    return _trusted.get()


def _names(modules: Iterable[str] | str | None) -> tuple[str, ...]:
    if modules is None:
        return ()
    if isinstance(modules, str):
        modules = [modules]
    out = []
    for m in modules:
        if not isinstance(m, str) or not m or not all(p.isidentifier() for p in m.split(".")):
            if m != "*":
                raise ValueError(f"trusted_modules: {m!r} is not a module name like 'pkg.mod'")
        out.append(m)
    return tuple(out)


def _is_trusted(module: str) -> bool:
    if module == "asyncnn" or module.startswith("asyncnn."):
        return not module.endswith("__main__")  # importing a __main__ runs a program
    env = tuple(m.strip() for m in os.environ.get(TRUSTED_MODULES_ENV, "").split(",") if m.strip())
    for name in _trusted.get() + env:
        if name == "*" or module == name or module.startswith(name + "."):
            return True
    return False


def import_by_path(path: str, base: type, what: str) -> Any:
    """The class named ``"package.module:Class"``, checked to be a subclass of ``base``.

    The module is looked up among those already imported; it is imported only when it is one of
    asyncnn's or a trusted one (see the module's docstring): naming a class never runs code.

    Raises:
        UntrustedModuleError: the module is neither imported nor trusted (nothing is imported).
        ValueError: when it cannot be imported or is not a ``base``.
    """
    if not isinstance(path, str):
        raise ValueError(f"the {what} {path!r} is not an import path 'package.module:Class'")
    module_name, _, qualname = path.partition(":")
    if not qualname or not module_name:
        raise ValueError(f"the {what} {path!r} is not an import path 'package.module:Class'")
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        if not all(p.isidentifier() for p in module_name.split(".")):
            raise ValueError(f"the {what} {path!r} does not name a module")
        if not _is_trusted(module_name):
            raise UntrustedModuleError(
                f"cannot import the {what} {path!r}: this process has not imported the module "
                f"{module_name!r} and does not trust it, so it was not imported (a file could "
                "otherwise run any code on this machine). If you trust where this spec came from, "
                "import "
                f"{module_name} first, or pass trusted_modules=[{module_name!r}] (or set "
                f"{TRUSTED_MODULES_ENV}={module_name})"
            )
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import the {what} {path!r}: {exc}") from exc
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ValueError(f"cannot import the {what} {path!r}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ValueError(f"{path!r} is not a {base.__name__} subclass")
    return obj
