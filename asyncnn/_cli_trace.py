"""The subcommands of ``asyncnn`` that read traces: ``trace summary``, ``trace export``,
``trace diff`` and ``replay``."""

from __future__ import annotations

import argparse
from typing import Any

from ._cli_args import UsageError, _check_writable


def _trace_summary(args: argparse.Namespace) -> int:
    from ._tracing._summary import format_summary, summary

    if args.plots is not None:  # refused before the trace is read, naming the option ('' too)
        _check_writable("--plots", args.plots, folder=True)
    print(format_summary(summary(args.path, plots=args.plots)))
    return 0


def _trace_export(args: argparse.Namespace) -> int:
    from ._tracing._chrome import to_chrome

    if not args.out:  # (refused before the trace is read; it named a temporary file: '.1.tmp')
        raise UsageError("out: an empty path; name the JSON file to write (e.g. run.json)")
    counts = to_chrome(args.path, args.out)  # (it refuses to write over the trace it reads)
    print(
        f"wrote {args.out}: {counts['slices']} computes, {counts['flows']} messages "
        f"({counts['unmatched_sends']} never received); open it in https://ui.perfetto.dev"
    )
    return 0


def _trace_diff(args: argparse.Namespace) -> int:
    from ._tracing._diff import AGREE_SO_FAR
    from .trace import diff, read  # imported here: the diff may be newer than this command

    divergence = diff(read(args.a), read(args.b))  # (it says if a trace is cut off)
    if divergence is None:
        print(f"{args.a} and {args.b} agree: same events in the same order, same digests")
        return 0
    if divergence.reason.startswith(AGREE_SO_FAR):  # no divergence, only a cut: undecided (1)
        print(f"{args.a} and {args.b} {divergence.reason.removeprefix('the runs ')}")
        return 1
    print(divergence)
    return 1


def _replay(args: argparse.Namespace) -> int:
    from . import replay
    from ._tracing._read import unclosed_reason
    from .trace import read

    recorded = read(args.path)
    if recorded.truncated:
        how = unclosed_reason(recorded.closed, recorded.cut_mid_record)
        raise UsageError(
            f"{args.path} is cut off after {len(recorded.events)} events ({how}): replay needs "
            "a whole trace"
        )
    _check_payloads(args, recorded.header)
    result = replay(args.path, actor=args.actor)
    what = f"actor {args.actor}" if args.actor else "the run"
    if result.identical:
        print(
            f"replay of {what} from {args.path}: identical ({result.events_checked} events checked)"
        )
        if result.recorded_error is not None:  # (what was replayed ended before it)
            print(f"the recorded run then failed: {result.recorded_error}")
        return 0
    # (events_checked counts every send and update compared, not where the replay diverged:
    # the divergence says where)
    print(
        f"replay of {what} from {args.path} diverged ({result.events_checked} sends and updates "
        "checked):"
    )
    print(result.first_divergence)
    return 1


def _check_payloads(args: argparse.Namespace, header: dict[str, Any]) -> None:
    """Refuses a replay that the trace's payloads cannot feed, saying how to record one from the
    command line as well as from Python (``replay`` names only ``trace_payloads=``, which
    ``asyncnn train`` had no way to set)."""
    payloads = header.get("payloads", "inputs")
    if args.actor is None and payloads == "none":
        raise UsageError(
            f"{args.path} kept no payloads ('none'), and replay needs traces recorded with "
            "trace_payloads='inputs' or 'all': record with asyncnn train --trace-payloads inputs "
            "(the default) or all, or in Python Trainer(..., trace_payloads='inputs')"
        )
    if args.actor is not None and payloads != "all" and args.actor in _actors(header):
        raise UsageError(
            f"replaying actor {args.actor!r} alone needs the payload of every message it "
            f"received; this trace kept {payloads!r}: record with asyncnn train --trace-payloads "
            "all, or in Python Trainer(..., trace_payloads='all')"
        )


def _actors(header: dict[str, Any]) -> set[str]:
    """The layers and losses of the trace's graph, by its header (none where it is malformed:
    ``replay`` then says what is wrong, or that there is no such actor)."""
    graph = header.get("graph")
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    if not isinstance(nodes, list):
        return set()
    return {
        node["name"]
        for node in nodes
        if isinstance(node, dict) and node.get("kind") in ("layer", "loss") and "name" in node
    }
