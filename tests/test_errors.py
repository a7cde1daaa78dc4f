"""asyncnn's errors (``_errors.py``): a worker's failure rebuilt in the driver."""

from __future__ import annotations

import pytest

import asyncnn as ann
from asyncnn._cluster._driver import _class_named
from asyncnn._errors import remote_error


class _NeedsTwo(Exception):
    """A class of the user's own whose ``__new__`` takes two arguments."""

    def __new__(cls, code: int, text: str) -> _NeedsTwo:
        return super().__new__(cls, code, text)


@pytest.mark.parametrize(
    ("original", "message", "said"),
    [
        (KeyError, "'weight'", "'weight'"),  # as the worker's str() gave it, not quoted again
        (OSError, "[Errno 28] No space left on device", "[Errno 28] No space left on device"),
        (ann.GraphError, "a graph error", "a graph error"),
    ],
)
def test_a_remote_error_is_of_the_original_class_with_its_message(original, message, said):
    err = remote_error(message, "Traceback ...", original)
    assert isinstance(err, original) and isinstance(err, ann.RemoteError)
    assert str(err) == said and err.traceback == "Traceback ..."
    assert type(err).__name__ == original.__name__
    assert type(remote_error("again", "", original)) is type(err)  # one class per original


class _Final(Exception):
    """A class of the user's own that refuses subclasses."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise RuntimeError("_Final may not be subclassed")


class _Tagged(type):
    """A metaclass that needs a keyword."""

    def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict, *, tag: str) -> _Tagged:
        return super().__new__(mcs, name, bases, ns)


class _TaggedError(Exception, metaclass=_Tagged, tag="x"):
    pass


@pytest.mark.parametrize(
    "original", [None, _NeedsTwo, KeyboardInterrupt, ExceptionGroup, _Final, _TaggedError]
)
def test_a_remote_error_without_a_class_it_can_rebuild_is_a_plain_remote_error(original):
    # the worker's "Type: message" text, never the message alone (which loses the class name),
    # and never the class's own error in place of the actor's
    name = "none" if original is None else original.__name__
    err = remote_error("3, 'x'", "tb", original, fallback=f"{name}: 3, 'x'")
    assert type(err) is ann.RemoteError and str(err) == f"{name}: 3, 'x'"
    assert err.traceback == "tb"


def test_a_rebuilt_remote_error_pickles_as_itself():
    import pickle

    for original, message in ((KeyError, "'w'"), (ZeroDivisionError, "division by zero")):
        err = remote_error(message, "tb", original)
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == message and back.traceback == "tb"


def test_the_driver_names_only_classes_it_has_imported():
    assert _class_named(["builtins", "ZeroDivisionError"]) is ZeroDivisionError
    assert _class_named([__name__, "_NeedsTwo"]) is _NeedsTwo
    assert _class_named(["asyncnn._errors", "GraphError"]) is ann.GraphError
    for spec in (
        ["not_a_module_here", "Error"],  # never imported for a report
        [__name__, "f.<locals>.Error"],  # defined in a function
        ["builtins", "len"],  # not an exception class
        ["builtins"],
        "builtins.ValueError",
        None,
    ):
        assert _class_named(spec) is None, spec
