"""Classes named in specs by import path: the one place that turns ``"package.module:Class"``
back into a class (modules, optimizers, schedules, policies and actors all use it)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["class_path", "import_by_path"]


def class_path(cls: type) -> str:
    """``"package.module:Class"`` for ``cls``; refuses classes defined inside a function."""
    if "<locals>" in cls.__qualname__:
        raise ValueError(
            f"{cls.__qualname__} is defined inside a function, so a spec cannot name it; define "
            "it at module level"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def import_by_path(path: str, base: type, what: str) -> Any:
    """The class named ``"package.module:Class"``, checked to be a subclass of ``base``.

    Raises:
        ValueError: when it cannot be imported or is not a ``base``.
    """
    module_name, _, qualname = path.partition(":")
    if not qualname:
        raise ValueError(f"the {what} {path!r} is not an import path 'package.module:Class'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import the {what} {path!r}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ValueError(f"{path!r} is not a {base.__name__} subclass")
    return obj
