"""What every experiment script shares: a frozen config turned into command-line flags, an output
folder with a JSON of results, and matplotlib figures (Agg, no screen needed).

Experiments import only asyncnn's public API, and this file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import math
import os
import platform
import sys
import textwrap
import time
import tokenize
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and each flag's default after its meaning."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text is not None and action.default == "":  # "(default: )" reads as a missing value
            text = text.replace("%(default)s", "''")
        return text


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as the ``asyncnn`` command's: the usage block printed
    before each (18 lines for mnist1d_table.py) hid the error, and ``--help`` gives it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def field_help(cls: type) -> dict[str, str]:
    """The comment that explains each field of the dataclass ``cls`` in its source, as ``--help``
    text: the one ending the field's line (its last, for a field written over several lines),
    else the comment lines right above the field. Fields with neither are left out; so is every
    field where the source cannot be read (a class made at run time)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        body = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndexError):
        return {}
    comments: dict[int, str] = {}
    code: set[int] = set()  # lines holding code (a comment there belongs to that code)
    blank = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in blank:
            code.update(range(tok.start[0], tok.end[0] + 1))
    helps: dict[str, str] = {}
    for stmt in getattr(body, "body", []):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        end = stmt.end_lineno or stmt.lineno
        if end in comments:
            helps[stmt.target.id] = comments[end]
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line in comments and line not in code:
            above.insert(0, comments[line])
            line -= 1
        if above:
            helps[stmt.target.id] = " ".join(above)
    return helps


def parse_config(
    cls: type[C],
    argv: list[str] | None = None,
    doc: str | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    check: Callable[[C], str | None] | None = None,
    *,
    positive: Collection[str],
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> C:
    """A ``--field value`` flag for each field of the frozen dataclass ``cls`` (defaults kept).

    ``choices`` names the values a field (each element, for a tuple) may take. No number (nor
    element of a tuple of numbers) may be negative: no experiment has a use for one, and a
    negative size or count would otherwise slice, loop or divide silently wrong. ``positive``
    (required, so that each script says it: ``()`` where 0 fits every field) names the numeric
    fields that must also be above 0 (sizes, counts, epochs, learning rates); the others may be
    0. ``check(config)`` returns what else is wrong with the parsed config, or None. Any of
    these failing is a one-line usage error naming the flag (exit status 2), not a traceback
    from deep in the run; a field that must be above 0 says so also for a negative value (it was
    refused as ``must be >= 0``, and then the 0 that fixed that as ``must be > 0``).

    ``--help`` gives each flag the comment that explains its field in ``cls``'s source (see
    :func:`field_help`: where a special value such as 0 means "all" or "unlimited", the comment
    says so) and its default.

    ``presets`` maps a bool field (``"quick"``) to the values it sets when true: they replace
    the defaults of the fields not given on the command line only, so that ``--quick true
    --epochs 5`` runs 5 epochs (the flags given win), and the config returned (the one a script
    records) is the one that runs; the ranges and ``check`` see it."""
    ap = OneLineParser(description=doc, formatter_class=HelpFormatter)
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
    presets = presets or {}
    for switch, values in presets.items():
        if not isinstance(getattr(fields.get(switch), "default", None), bool):
            raise ValueError(f"presets: {switch!r} is not a bool field of {cls.__name__}")
        if set(values) - set(fields):
            raise ValueError(f"presets[{switch!r}] names fields {cls.__name__} lacks: "
                             f"{sorted(set(values) - set(fields))}")  # fmt: skip
    helps = field_help(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        # (argparse formats help with %: a comment's "10%" would be a format error)
        extra: dict[str, Any] = {"help": help_text(helps.get(f.name))}
        if f.name in choices:
            extra["choices"] = list(choices[f.name])
        if isinstance(default, bool):
            ap.add_argument(flag, type=_flag_bool, default=default, metavar="{true,false}", **extra)
        elif isinstance(default, tuple | list):
            kind = type(default[0]) if default else str
            ap.add_argument(flag, type=kind, nargs="+", default=list(default), **extra)
        else:
            ap.add_argument(flag, type=type(default), default=default, **extra)
    # argparse fills in a default only where the namespace lacks the name: a field still
    # holding the marker afterwards was not given on the command line.
    unset = object()
    args = ap.parse_args(argv, argparse.Namespace(**dict.fromkeys(fields, unset)))
    given = {name for name in fields if getattr(args, name) is not unset}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = getattr(args, f.name)
        values[f.name] = f.default if v is unset else v
    for switch, preset in presets.items():
        if values[switch]:
            values.update({k: v for k, v in preset.items() if k not in given})
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = values[f.name]
        values[f.name] = tuple(v) if isinstance(f.default, tuple) else v
    for name, v in values.items():
        numbers = v if isinstance(v, tuple | list) else (v,)
        for x in numbers:
            if not _is_number(x):
                continue
            flag = "--" + name.replace("_", "-")
            # (a NaN fails both: it passes no comparison)
            if name in positive and not x > 0:  # first: a negative count also needs > 0
                ap.error(f"argument {flag}: must be > 0, got {x}")
            if not x >= 0:
                ap.error(f"argument {flag}: must be >= 0, got {x}")
    config = cls(**values)
    if check is not None and (problem := check(config)):
        ap.error(problem)
    return config


def help_text(comment: str | None) -> str:
    """A field's ``--help`` text: its comment (``%`` escaped for argparse), or its default alone
    where it has none (argparse prints no default for a flag without help)."""
    if not comment:
        return "(default: %(default)s)"
    return comment.replace("%", "%%")


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


def num_samples_problem(num_samples: int) -> str | None:
    """What is wrong with ``num_samples`` as ``--num-samples`` of MNIST-1D, or None: the data
    set holds one tenth per digit, so :func:`asyncnn.data.load_mnist1d` takes multiples of 10
    only (its ValueError was a traceback after the parse)."""
    if num_samples % 10:
        return (f"argument --num-samples: must be a multiple of 10 (one tenth per digit), got "
                f"{num_samples}")  # fmt: skip
    return None


def cpu_label() -> str:
    """This machine's CPU for a figure's title (``"16-core CPU"``): the core count
    :func:`machine` records, so the figure and its ``results.json`` agree."""
    return f"{os.cpu_count()}-core CPU"


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


def torch_missing(skipped: str) -> str | None:
    """Why torch cannot be imported here (``"ImportError: ..."``), after printing it and what is
    ``skipped`` for it in a line; None where torch imports (nothing printed)."""
    try:
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install's OSError
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"torch not importable ({why}): {skipped}", flush=True)
        return why
    return None


def need_cupy(script: str) -> Any:
    """cupy, once it sees a GPU; else says in one line what ``script`` needs and exits with
    status 2 (a GPU script run without cupy or a GPU ended in an import's traceback)."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no cupy, no driver, no device: all say the same
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"{script} needs CUDA GPUs and cupy; this machine has none usable ({why}). Run it on "
              "a GPU machine.", file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None
    if count == 0:
        print(f"{script} needs CUDA GPUs and cupy; CUDA reports no GPU here. Run it on a GPU "
              "machine.", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    return cupy


def card_name(index: int = 0) -> str:
    """The name of GPU ``index`` as the CUDA runtime gives it (cupy)."""
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (numpy's too) replaced by None: JSON has no
    such numbers (``json`` writes ``NaN``, which jq and JSON.parse refuse), and where one occurs
    the value is missing (no formula, a failed or diverged run)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0
                                    and value.dtype.kind == "f"):  # fmt: skip
        return float(value) if math.isfinite(value) else None
    return value


def write_results(out: str, config: Any, results: dict[str, Any]) -> str:
    """Writes ``results.json`` (config, machine, results) into ``out``; returns its path. A
    NaN or infinite number is written as null (:func:`json_safe`)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    report = {"config": dataclasses.asdict(config), "machine": machine(), "results": results}
    with open(path, "w") as f:
        json.dump(json_safe(report), f, indent=2, default=float, allow_nan=False)
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
    """Writes a benchmark's report to ``path`` (making its folder) and says so. A NaN or
    infinite number is written as null (:func:`json_safe`)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe(report), f, indent=2, allow_nan=False)
    print(f"wrote {path}")
