"""A classmethod that refuses to be called on an instance, for a constructor such as
``Trainer.load`` that a user may call on the object they mean it to change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, Generic, NoReturn, ParamSpec, TypeVar, overload

__all__ = ["class_only"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class class_only(Generic[_P, _R]):
    """A classmethod that refuses to be called on an instance: ``tr.load(path)`` would return a
    new trainer, which such a call drops, and leave ``tr`` as it was, as if it had resumed
    (torch's ``load_state_dict`` loads into the object it is called on). Read from the class
    (also a subclass), it is the classmethod itself; read from an instance, a function that
    raises, so that looking the attribute up (``hasattr``, ``dir``, ``help``) still works."""

    def __init__(self, method: Callable[Concatenate[Any, _P], _R]) -> None:
        # a classmethod object, which mypy sees as the function under it (typed as that)
        held: Any = method
        self._method = held
        self.__doc__ = held.__doc__
        self.__wrapped__ = held.__func__
        self._name: str = held.__func__.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Callable[_P, _R]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Callable[..., NoReturn]: ...
    def __get__(self, obj: object, owner: type | None = None) -> Callable[..., Any]:
        if obj is None:
            assert owner is not None  # (read from the class: the class is given)
            return self._method.__get__(None, owner)
        cls, name = type(obj).__name__, self._name

        def refused(*args: Any, **overrides: Any) -> NoReturn:
            # (the overrides given, as the example; cut: a graph= would print whole)
            given = "".join(f", {k}={v!r:.40}" for k, v in overrides.items()) or ", progress=True"
            raise TypeError(
                f"{cls}.{name} returns a new trainer; it does not load into the one it is "
                f"called on: tr.{name}(path) would leave tr as it was, not resumed. Write "
                f"tr = {cls}.{name}(path), with any constructor arguments to replace as "
                f"keywords (tr = {cls}.{name}(path{given}))"
            )

        refused.__doc__ = self.__doc__
        return refused
