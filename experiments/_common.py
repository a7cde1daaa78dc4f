"""What every experiment script shares: a frozen config turned into command-line flags, an output
folder with a JSON of results, and matplotlib figures (Agg, no screen needed).

Experiments import only asyncnn's public API, and this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


def _flag_bool(text: str) -> bool:
    """``true``/``yes``/``1`` or ``false``/``no``/``0`` (any case); anything else is refused, so a
    typo (``--quick ture``) is an error rather than a silent ``False``."""
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(
    cls: type[C],
    argv: list[str] | None = None,
    doc: str | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    check: Callable[[C], str | None] | None = None,
    *,
    positive: Collection[str],
) -> C:
    """A ``--field value`` flag for each field of the frozen dataclass ``cls`` (defaults kept).

    ``choices`` names the values a field (each element, for a tuple) may take. No number (nor
    element of a tuple of numbers) may be negative: no experiment has a use for one, and a
    negative size or count would otherwise slice, loop or divide silently wrong. ``positive``
    (required, so that each script says it: ``()`` where 0 fits every field) names the numeric
    fields that must also be above 0 (sizes, counts, epochs, learning rates); the others may be
    0. ``check(config)`` returns what else is wrong with the parsed config, or None. Any of
    these failing is argparse's one-line usage error (exit status 2), not a traceback from deep
    in the run."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    choices = choices or {}
    if isinstance(positive, str):  # ("epochs") is a str: each letter would be a field name
        raise TypeError(f"positive must be a collection of field names, got {positive!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = (set(choices) | set(positive)) - set(fields)
    if unknown:
        raise ValueError(f"choices or positive name fields {cls.__name__} lacks: {sorted(unknown)}")
    not_numbers = sorted(n for n in positive if not _is_numeric(fields[n].default))
    if not_numbers:
        raise ValueError(f"positive names fields of {cls.__name__} that are not numbers: "
                         f"{not_numbers}")  # fmt: skip
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        extra: dict[str, Any] = {}
        if f.name in choices:
            extra["choices"] = list(choices[f.name])
        if isinstance(default, bool):
            ap.add_argument(flag, type=_flag_bool, default=default, metavar="{true,false}")
        elif isinstance(default, tuple | list):
            kind = type(default[0]) if default else str
            ap.add_argument(flag, type=kind, nargs="+", default=list(default), **extra)
        else:
            ap.add_argument(flag, type=type(default), default=default, **extra)
    args = ap.parse_args(argv)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = getattr(args, f.name)
        values[f.name] = tuple(v) if isinstance(f.default, tuple) else v
    for name, v in values.items():
        numbers = v if isinstance(v, tuple | list) else (v,)
        for x in numbers:
            if not _is_number(x):
                continue
            flag = "--" + name.replace("_", "-")
            if x < 0 or x != x:  # x != x: a NaN passes every other comparison
                ap.error(f"argument {flag}: must be >= 0, got {x}")
            if x == 0 and name in positive:
                ap.error(f"argument {flag}: must be > 0, got {x}")
    config = cls(**values)
    if check is not None and (problem := check(config)):
        ap.error(problem)
    return config


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_numeric(default: Any) -> bool:
    """Whether a field with this default holds a number (or a tuple of numbers)."""
    values = default if isinstance(default, tuple | list) else (default,)
    return bool(values) and all(_is_number(v) for v in values)


def fraction_problem(
    flag: str, value: float, *, one: bool = False, zero: bool = True
) -> str | None:
    """What is wrong with ``value`` as the fraction ``flag`` (``0 <= value < 1``; ``one``: 1
    allowed; ``zero=False``: 0 refused), or None."""
    low_ok = value >= 0 if zero else value > 0
    high_ok = value <= 1 if one else value < 1
    if low_ok and high_ok:
        return None
    low, high = ("[" if zero else "("), ("]" if one else ")")
    return f"argument {flag}: must be in {low}0, 1{high}, got {value}"


def machine() -> dict[str, Any]:
    """Where and when a result was measured."""
    import numpy as np

    import asyncnn

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "asyncnn": asyncnn.__version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def card_name(index: int = 0) -> str:
    """The name of GPU ``index`` as the CUDA runtime gives it (cupy)."""
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def write_results(out: str, config: Any, results: dict[str, Any]) -> str:
    """Writes ``results.json`` (config, machine, results) into ``out``; returns its path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(
            {"config": dataclasses.asdict(config), "machine": machine(), "results": results},
            f,
            indent=2,
            default=float,
        )
    return path


def finish(out: str, config: Any, results: dict[str, Any]) -> dict[str, Any]:
    """Writes ``results.json`` into ``out`` (:func:`write_results`), says so, returns ``results``."""
    path = write_results(out, config, results)
    print(f"wrote {path}")
    return results


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sync_or_async(name: str, max_active_keys: int) -> Any:
    """``policies.Sync()`` for ``"Sync"``, ``policies.Async(max_active_keys)`` for ``"Async"``."""
    from asyncnn import policies

    if name == "Sync":
        return policies.Sync()
    if name == "Async":
        return policies.Async(max_active_keys=max_active_keys)
    raise ValueError(f"unknown policy {name!r}; use Sync or Async")


def interval_settings(
    kinds: tuple[str, ...],
    batch_size: int,
    max_active_keys: tuple[int, ...],
    update_every: tuple[int, ...],
    stash: bool,
) -> list[tuple[str, Any, int]]:
    """``(label, policy, key size)`` of AMPNet's comparison, for each of ``kinds`` (``"Sync"``,
    ``"Async"``): ``Sync`` on keys of ``batch_size`` times each update interval (the examples
    an ``Async`` update with that interval sees: its fair control), and ``Async`` for each
    number of keys in flight and each interval (``min_update_frequency``, AMPNet's
    ``min_update_interval``) on keys of ``batch_size``."""
    from asyncnn import policies

    out: list[tuple[str, Any, int]] = []
    for kind in kinds:
        if kind == "Sync":
            for m in update_every:
                label = "Sync" if m == 1 else f"Sync, batch {m * batch_size}"
                out.append((label, policies.Sync(), m * batch_size))
        elif kind == "Async":
            for k in max_active_keys:
                for m in update_every:
                    label = f"Async K={k}" + ("" if m == 1 else f", update every {m}")
                    policy = policies.Async(max_active_keys=k, min_update_frequency=m, stash=stash)
                    out.append((label, policy, batch_size))
        else:
            raise ValueError(f"unknown policy {kind!r}; use Sync or Async")
    return out


def save_figure(fig: Any, out: str, name: str) -> str:
    """Lays ``fig`` out, writes it to ``out/name`` (100 dpi; the folder is made if need be) and
    closes it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def seconds_per_call(
    fn: Callable[[], Any], reps: int, sync: Callable[[], Any] | None = None, warmup: int = 1
) -> float:
    """Mean seconds per call of ``fn`` over ``reps`` calls, after ``warmup`` untimed ones;
    ``sync()`` (a device synchronisation), if given, runs before the clock starts and before it
    stops."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if sync is not None:
        sync()
    return (time.perf_counter() - start) / reps


def target_summary(curve: list[dict[str, Any]], target: float) -> tuple[Any, dict[str, Any]]:
    """The first point of a learning ``curve`` at or above ``target`` test accuracy (or None),
    and the summary every time-to-target experiment reports."""
    first = next((c for c in curve if c["test_accuracy"] >= target), None)
    return first, {
        "final_test_accuracy": curve[-1]["test_accuracy"],
        "best_test_accuracy": max(c["test_accuracy"] for c in curve),
        "epochs_to_target": first["epoch"] if first else None,
        "seconds_to_target": first["seconds"] if first else None,
    }


def mlp_modules(sizes: list[int]) -> list[Any]:
    """The benchmarks' MLP as modules: ``Linear`` layers of ``sizes`` with ``ReLU`` between."""
    from asyncnn import nn

    mods: list[Any] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return mods


def plain_step(model: Any, loss: Any, optimizer: Any, seed: int = 0) -> Callable[[Any, Any], None]:
    """One step of the plain loop the runtime is measured against, as ``step(x, y)``:
    ``value_and_grad`` of ``loss`` on ``model``'s output, then ``optimizer``'s update (the
    parameters and state live in the closure, from ``model.init(seed)``)."""
    import asyncnn as ann

    params = model.init(seed)
    state = optimizer.init(params)
    vg = ann.value_and_grad(lambda q, x, y: loss({}, model(q, x), y))

    def step(x: Any, y: Any) -> None:
        nonlocal params, state
        _, grads = vg(params, x, y)
        params, state = optimizer.update(params, grads, state)

    return step


def write_json(path: str, report: Any) -> None:
    """Writes a benchmark's report to ``path`` (making its folder) and says so."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
