"""The ``asyncnn`` command line: trace summary / export / diff, replay, train, bench."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn._cli import _parser, _short, main

from _reference import assert_params_equal, chain_graph


def _record(path: Path, seed: int) -> str:
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(32, 5)).astype(np.float32), "y": rng.integers(0, 3, 32)}
    ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), seed=seed,
        trace=str(path),
    ).fit(data, epochs=1, batch_size=16)  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("cli")
    return _record(d / "a.trace", seed=0), _record(d / "b.trace", seed=1)


def test_trace_summary(traces: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "summary", traces[0]]) == 0
    out = capsys.readouterr().out
    assert f"{traces[0]}:" in out and "policy GPipe" in out and "4 keys in 2 minibatches" in out
    for actor in ("stage0", "stage1", "loss", "x", "y"):
        assert any(line.startswith(actor + " ") for line in out.splitlines()), actor
    assert "TRUNCATED" not in out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
def test_output_cut_off_by_its_reader_ends_quietly(traces: tuple[str, str]) -> None:
    # As `asyncnn trace summary X | head -0`: the reader has gone before the first line.
    with subprocess.Popen(
        [sys.executable, "-m", "asyncnn", "trace", "summary", traces[0]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as child:  # fmt: skip
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()
        err = child.stderr.read().decode()
        assert child.wait(timeout=60) == 141 and err == ""


def test_a_broken_pipe_elsewhere_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def cut(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("asyncnn._cli._trace_summary", cut)
    assert main(["trace", "summary", "x.trace"]) == 2
    assert "asyncnn trace: error: [Errno 32] Broken pipe" in capsys.readouterr().err


def test_trace_summary_plots(
    traces: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", "summary", traces[0], "--plots", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    for name in ("in_flight.png", "busy.png"):
        assert (tmp_path / "p" / name).stat().st_size > 0
        assert f"wrote {tmp_path / 'p' / name}" in out


def test_trace_export(
    traces: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.json"
    assert main(["trace", "export", traces[0], str(out), "--format", "chrome"]) == 0
    events = json.loads(out.read_text())["traceEvents"]
    computes = sum(1 for e in events if e["ph"] == "X" and e["cat"] == "compute")
    starts = sum(1 for e in ann.trace.read(traces[0]).events if e["ev"] == "start")
    assert computes == starts
    assert f"wrote {out}: {starts} computes" in capsys.readouterr().out


def test_trace_diff(traces: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "diff", traces[0], traces[0]]) == 0
    assert "agree" in capsys.readouterr().out
    # different seeds: different initial weights, so the first forward's output differs
    assert main(["trace", "diff", traces[0], traces[1]]) == 1
    out = capsys.readouterr().out
    assert out.strip() and "agree" not in out


def test_replay(traces: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", traces[0]]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "events checked" in out


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["trace", "export", "only-one-path"])
    assert exc.value.code == 2
    assert "out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trace", "export", "a", "b", "--format", "svg"])
    with pytest.raises(SystemExit):
        main(["trace"])


def test_not_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "x.trace"
    bogus.write_bytes(b"hello, this is not a trace at all")
    assert main(["trace", "summary", str(bogus)]) == 2
    assert "is not an asyncnn trace" in capsys.readouterr().err
    assert main(["trace", "export", str(tmp_path / "missing.trace"), str(tmp_path / "o")]) == 2
    assert "missing.trace" in capsys.readouterr().err


def test_train_still_runs_as_a_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "asyncnn", "train", "--dataset", "digits", "--epochs", "1",
         "--layers", "1", "--hidden", "16", "--stages", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    assert json.loads((tmp_path / "results.json").read_text())["test"]["accuracy"] > 0


def test_train_on_worker_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--dataset", "digits", "--epochs", "1", "--stages", "2", "--workers", "2",
            "--hidden", "32", "--layers", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "on 2 worker processes" in out and "test accuracy" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["args"]["workers"] == 2


def test_bench_runs_a_benchmark_of_the_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "nope"])
    assert "invalid choice" in capsys.readouterr().err


# -- one-line errors, Ctrl-C, --save / --resume --------------------------------------------------


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--stages", "0"], "--stages: must be at least 1, got 0"),
        (["--lr", "-1"], "--lr: must be a positive number, got -1"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--epochs", "x"], "--epochs: invalid integer value: 'x'"),
        (["--policy", "GPipe", "--no-stash"], "--no-stash applies to PipeDream only"),
        (["--policy", "Sync", "--microbatches", "2"], "--microbatches applies to GPipe"),
        (["--stages", "9", "--layers", "1"], "more than the MLP's 3 modules"),
        (["--resume", "ckpt", "--lr", "0.1"], "drop --lr"),
        # the optimizer's hyperparameters switch it only with --optimizer (none was taken)
        (["--resume", "ckpt", "--momentum", "0.9"], "drop --momentum, or give --optimizer"),
        # a name that is no optimizer in any case; argparse lists the names (quoted or not as
        # the Python version has it)
        (["--optimizer", "lbfgs"], "--optimizer: invalid choice: 'lbfgs' (choose from "),
        (["--policy", "zero"], "--policy: invalid choice: 'zero' (choose from "),
        # only ASCII case differs: a long s (U+017F) folds to s under str.casefold, and was
        # taken as Sync, SGD or RMSprop
        (["--policy", "\u017fync"], "--policy: invalid choice: '\u017fync' (choose from "),
        (["--optimizer", "\u017fgd"], "--optimizer: invalid choice: '\u017fgd' (choose from "),
        (["--optimizer=rm\u017fprop"], "--optimizer: invalid choice: 'rm\u017fprop' (choose "),
        # a name in another case is the name (sgd was refused); the checks see its spelling
        (["--policy", "gpipe", "--no-stash"], "--no-stash applies to PipeDream only (GPipe "),
        (["--optimizer", "adam", "--momentum", "0.9"], "not --optimizer Adam (it has no"),
        (
            ["--optimizer", "Adam", "--momentum", "0.9"],
            "--momentum applies to SGD and RMSprop, not --optimizer Adam (it has no momentum "
            "factor): give --optimizer SGD or RMSprop, or drop --momentum",
        ),
        # said of the default too, which was not given
        (["--momentum", "0.9"], "--momentum applies to SGD and RMSprop, not --optimizer Adam"),
        (["--optimizer", "SGD", "--momentum", "-1"], "--momentum: must be 0 or more, got -1"),
        (["--weight-decay", "nan"], "--weight-decay: must be 0 or more, got nan"),
        # said without the flag ("'no-such-folder' is not a checkpoint folder: it has no
        # spec.msgpack"), as the Python API says it
        (
            ["--resume", "no-such-folder"],
            "--resume no-such-folder: no such folder; --resume takes a folder that --save wrote",
        ),
        # the cut comes from the checkpoint too: --balance was ignored without a word
        (["--resume", "ckpt", "--balance", "params"], "drop --balance"),
        # named the top command, whose --help does not list train's options
        (["--epoch", "3"], "unrecognized arguments: --epoch 3 (see asyncnn train --help)"),
        # trained to the end, then a traceback from msgpack (OverflowError) saving or tracing it
        (["--seed", str(2**64), "--epochs", "0"], "--seed: must be from 0 to 2**64 - 1, got 1844"),
        # each minibatch became one key a row, under a policy printed as PipeDream(microbatches=4)
        (["--batch-size", "2", "--epochs", "0"], "--microbatches 4 is more than the --batch-size"),
        (
            ["--microbatches", "9", "--batch-size", "8", "--epochs", "0"],
            "--microbatches 8 or fewer",
        ),
    ],
)
def test_train_errors_are_one_line(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["train", "--dataset", "digits", "--out", "", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("asyncnn train: error: ") and says in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--save", "--out"])
def test_train_refuses_a_file_for_a_folder_before_training(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it trained to the end, then failed to save there (File exists) and lost the run
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    args = ["train", "--dataset", "digits", "--epochs", "1", "--layers", "1", "--hidden", "8",
            "--stages", "2", "--out", "", flag, str(path)]  # fmt: skip
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the data, the graph and the run
    assert err.strip() == (
        f"asyncnn train: error: {flag} {path}: that is a file; {flag} takes a folder"
    )
    assert path.read_text() == "not a folder"


@pytest.mark.timeout(60)
def test_train_makes_the_folder_of_its_trace(tmp_path: Path) -> None:
    # --save, --metrics and --out make their folders; --trace failed on a missing one
    trace = tmp_path / "runs" / "run.trace"
    assert main([*_TRAIN, "--epochs", "1", "--trace", str(trace)]) == 0
    assert ann.trace.read(str(trace)).events


@pytest.mark.timeout(60)
def test_resume_with_another_dataset_names_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # it failed in the data check: "input 'x': got shape (4000, 40), the graph declares ..."
    ckpt = str(tmp_path / "ckpt")
    assert main([*_TRAIN, "--epochs", "1", "--save", ckpt]) == 0  # on digits: 64 features
    capsys.readouterr()
    _no_data(monkeypatch)  # (it was said after the data and the checkpoint were loaded)
    assert main(["train", "--resume", ckpt, "--epochs", "2", "--out", ""]) == 2
    assert _one_error_line(capsys) == (
        f"asyncnn train: error: --resume {ckpt}: its model takes rows of 64 features, "
        "--dataset mnist1d has 40: give the --dataset it was trained on (--dataset digits)"
    )


def test_train_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for text in ("(default: 3)", "(default: PipeDream)", "(default: 100)", "--trace", "--save",
                 "--resume"):  # fmt: skip
        assert text in out


def test_replay_of_a_truncated_trace_or_one_without_payloads_is_one_line(
    traces: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = Path(traces[0]).read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert main(["replay", str(cut)]) == 2
    line = _one_error_line(capsys)
    assert "cut.trace is cut off after" in line and "replay needs a whole trace" in line
    assert main(["replay", traces[0], "--actor", "stage1"]) == 2
    line = _one_error_line(capsys)
    assert "record with asyncnn train --trace-payloads all" in line
    assert "Trainer(..., trace_payloads='all')" in line
    bare = str(tmp_path / "bare.trace")
    rng = np.random.default_rng(0)
    ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=bare,
        trace_payloads="none",
    ).fit({"x": rng.normal(size=(8, 5)), "y": rng.integers(0, 3, 8)}, batch_size=8)  # fmt: skip
    assert main(["replay", bare]) == 2
    assert "replay needs traces recorded with trace_payloads=" in _one_error_line(capsys)


def _edited_trace(path: str, out: Path, edit: Any) -> str:
    """A copy of the trace at ``path`` with ``edit(record)`` applied to each record (re-framed
    with valid checksums)."""
    from asyncnn._runtime._traceformat import encode_record, iter_frames

    with open(path, "rb") as f:
        records = [r for _, r in iter_frames(f)]
    out.write_bytes(b"".join(encode_record(edit(r)) for r in records))
    return str(out)


def test_replay_of_a_damaged_trace_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a traceback and status 1, the status of a divergence: an AttributeError of the header's
    # config, an IndexError of a message's slot
    rng = np.random.default_rng(0)
    path = str(tmp_path / "all.trace")
    ann.Trainer(
        chain_graph(3), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=path,
        trace_payloads="all",
    ).fit({"x": rng.normal(size=(8, 5)), "y": rng.integers(0, 3, 8)}, batch_size=8)  # fmt: skip
    no_config = _edited_trace(
        path, tmp_path / "config.trace", lambda r: {**r, "config": None} if "format" in r else r
    )
    assert main(["replay", no_config]) == 2
    line = _one_error_line(capsys)
    assert (
        line.startswith("asyncnn replay: error: ") and "the header's 'config' is NoneType" in line
    )

    def slot_5(r: dict[str, Any]) -> dict[str, Any]:
        if (r.get("ev"), r.get("p"), r.get("k")) == ("send", "stage1", "forward"):
            return {**r, "m": {**r["m"], "slot": 5}}
        return r

    bad_slot = _edited_trace(path, tmp_path / "slot.trace", slot_5)
    assert main(["replay", bad_slot, "--actor", "stage1"]) == 2
    assert "to slot 5 of 'stage1'" in _one_error_line(capsys)


def test_replay_that_diverges_says_how_much_it_checked_and_where_it_diverged(
    traces: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it said "diverged after N events", N being every send and update compared, not where
    def flip_first_forward(r: dict[str, Any]) -> dict[str, Any]:
        if (r.get("ev"), r.get("a"), r.get("k"), r.get("key")) == ("send", "stage0", "forward", 0):
            return {**r, "x": [{**r["x"][0], "h": r["x"][0]["h"] ^ 1}]}
        return r

    changed = _edited_trace(traces[0], tmp_path / "changed.trace", flip_first_forward)
    assert main(["replay", changed]) == 1
    out = capsys.readouterr().out
    checked = ann.replay(changed).events_checked
    assert f"diverged ({checked} sends and updates checked):\nfirst divergence at" in out
    assert "after" not in out
    assert "first divergence at actor 'stage0', sequence 0: the forward of key 0" in out


# --balance params: a cut by measured time can fall elsewhere under load, and the run that never
# stopped would then hold other stages than the checkpoint (the initial weights no longer depend
# on the cut: a chain is seeded by module)
_TRAIN = ["train", "--dataset", "digits", "--policy", "Sync", "--stages", "2", "--layers", "1",
          "--hidden", "16", "--batch-size", "64", "--balance", "params", "--out", ""]  # fmt: skip


def test_ctrl_c_saves_what_finished_and_resume_continues_bit_identically(tmp_path: Path) -> None:
    import signal
    import time

    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncnn", *_TRAIN, "--epochs", "1000", "--save", str(ckpt),
         "--metrics", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > 30):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncnn train: interrupted after"), err
    assert f"continue with --resume {ckpt}" in lines[0]
    kept = ann.Trainer.load(str(ckpt))
    done = kept.state.minibatches
    # the metrics file had 30 steps (one line is the epoch's), each logged after its update
    assert done >= 30 and set(kept.versions.values()) == {done}  # Sync: one update a minibatch
    # finish the interrupted epoch, then compare with a run that never stopped
    epochs = kept.epochs_done + 1
    assert main([*_TRAIN[:1], "--resume", str(ckpt), "--dataset", "digits", "--batch-size",
                 "64", "--out", "", "--epochs", str(epochs), "--save", str(ckpt)]) == 0  # fmt: skip
    assert main([*_TRAIN, "--epochs", str(epochs), "--save", str(tmp_path / "straight")]) == 0
    resumed = ann.Trainer.load(str(ckpt))
    straight = ann.Trainer.load(str(tmp_path / "straight"))
    assert resumed.epochs_done == straight.epochs_done == epochs
    assert resumed.versions == straight.versions
    assert_params_equal(straight.params, resumed.params)


@pytest.mark.timeout(90)
def test_ctrl_c_pressed_twice_in_a_traced_run_on_workers_still_saves_and_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the second Ctrl-C landed in the driver's gathering of its workers' events for the trace:
    # fit raised BaseExceptionGroup([KeyboardInterrupt]), and train exited 1 with a traceback,
    # saving nothing
    import signal
    import threading
    import time

    from asyncnn._cluster import _driver

    gather = _driver._gather_traces

    async def pressed_again(*args: Any) -> None:
        signal.raise_signal(signal.SIGINT)  # inside that bounded wait every time
        await gather(*args)

    monkeypatch.setattr(_driver, "_gather_traces", pressed_again)
    ckpt, metrics, trace = tmp_path / "ckpt", tmp_path / "metrics.jsonl", tmp_path / "run.trace"

    def press_once_it_trains() -> None:
        deadline = time.monotonic() + 60
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # (handled on the main thread, where train runs)

    presser = threading.Thread(target=press_once_it_trains, daemon=True)
    presser.start()
    try:
        code = main([*_TRAIN, "--workers", "2", "--epochs", "1000", "--save", str(ckpt),
                     "--metrics", str(metrics), "--trace", str(trace)])  # fmt: skip
    finally:
        presser.join()
    err = capsys.readouterr().err
    assert code == 130
    assert err.startswith("asyncnn train: interrupted after") and f"saved to {ckpt}" in err
    assert ann.Trainer.load(str(ckpt)).epochs_done == 0
    s = ann.trace.summary(str(trace))
    assert s["errors"] == ["the run was interrupted (KeyboardInterrupt)"]
    assert s["missing_workers"] == []


@pytest.mark.timeout(60)
def test_train_refuses_a_save_folder_that_is_not_a_checkpoint_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it trained to the end, then refused to save over the folder's manifest.json: the run lost
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"files": ["a.csv"]}')
    assert main([*_TRAIN, "--epochs", "1", "--save", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the data, the graph and the run
    assert err.strip() == (
        f"asyncnn train: error: --save {folder}: cannot save a checkpoint to '{folder}': it holds "
        "manifest.json, which saving would overwrite, and it is not an asyncnn checkpoint; save "
        "to a new or empty folder (or remove those files)"
    )
    assert (folder / "manifest.json").read_text() == '{"files": ["a.csv"]}'
    # a checkpoint folder (to replace) and a new one are fine
    ckpt = tmp_path / "ckpt"
    assert main([*_TRAIN, "--epochs", "1", "--save", str(ckpt)]) == 0
    assert main([*_TRAIN, "--epochs", "1", "--save", str(ckpt)]) == 0


# -- paths checked before the run, resumed runs, the report, trace export and diff -----------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flag", "under", "says"),
    [
        # each trained to the end (or to its first step) and then failed: "[Errno 20] Not a
        # directory", "[Errno 17] File exists: 'a-file'", "[Errno 21] Is a directory"
        ("--save", "a-file/ckpt", "a-file is a file, not a folder, so nothing can go under it"),
        ("--out", "a-file/out", "a-file is a file, not a folder, so nothing can go under it"),
        ("--trace", "a-file/run.trace", "a-file is a file, not a folder"),
        ("--metrics", "a-file/m.jsonl", "a-file is a file, not a folder"),
        ("--trace", "folder", "that is a folder; --trace takes a file name (e.g. "),
        ("--metrics", "folder", "that is a folder; --metrics takes a file name (e.g. "),
    ],
)
def test_train_refuses_paths_it_could_not_write_before_training(
    flag: str, under: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    path = str(tmp_path / under)
    assert main([*_TRAIN, "--epochs", "1", flag, path]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the data, the graph and the run
    assert err.startswith(f"asyncnn train: error: {flag} {path}: ") and says in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--trace", "--metrics"])
@pytest.mark.parametrize("end", ["/", "/."])
def test_train_refuses_a_file_path_that_names_a_folder_by_its_end_before_training(
    flag: str, end: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a folder not made yet: --trace made it, then the trainer refused with the Python API's
    # words ("cannot write the trace '.../new/': it is a folder. Pass trace= a file path");
    # --metrics made it, trained to the end and failed with "[Errno 21] Is a directory"
    path = f"{tmp_path}/new{end}"
    assert main([*_TRAIN, "--epochs", "1", flag, path]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the data, the graph and the run
    example = tmp_path / "new" / ("run.trace" if flag == "--trace" else "metrics.jsonl")
    assert err.strip() == (
        f"asyncnn train: error: {flag} {path}: it ends in {end!r}, so it names a folder; "
        f"{flag} takes a file name (e.g. {example})"
    )
    assert not (tmp_path / "new").exists()  # refused before anything was made


@pytest.mark.parametrize("what", ["a file", "a folder that no save wrote"])
def test_resume_from_a_path_that_is_not_a_checkpoint_names_the_flag(
    what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # said as the Python API says it: "'...' is not a checkpoint folder: it has no spec.msgpack"
    path = tmp_path / "ckpt"
    if what == "a file":
        path.write_text("")
        says = "that is a file; --resume takes a folder that --save wrote"
    else:
        path.mkdir()
        says = f"{str(path)!r} is not a checkpoint folder: it has no spec.msgpack; --resume takes"
    assert main(["train", "--resume", str(path), "--out", ""]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"asyncnn train: error: --resume {path}: ") and says in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys: Linux")
def test_train_refuses_a_folder_it_may_not_write_in_before_training(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # sysfs refuses new files to root too; it trained to the end, then "Permission denied"
    assert main([*_TRAIN, "--epochs", "1", "--save", "/sys/asyncnn-ckpt"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = err.strip()  # Permission denied, or a read-only file system
    assert line.startswith("asyncnn train: error: --save /sys/asyncnn-ckpt: cannot write in /sys (")
    assert line.endswith("); give a folder where you can write") and "\n" not in line


@pytest.mark.parametrize(
    ("flag", "what"),
    [("--resume", "folder"), ("--save", "folder"), ("--trace", "file"), ("--metrics", "file")],
)
def test_train_refuses_an_empty_path_before_the_data(
    flag: str,
    what: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # an unset shell variable (--resume "$CKPT"): taken as not given, so --resume '' trained a
    # new model from scratch, --save '' saved nothing, and the run exited 0
    _no_data(monkeypatch)
    assert main([*_TRAIN, "--epochs", "1", flag, ""]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        f"asyncnn train: error: {flag}: an empty path (an unset shell variable?); give a "
        f"{what}, or leave {flag} out"
    )


def test_train_help_says_only_out_takes_an_empty_path(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "('' for none)" in out and "An empty path is refused" in out


@pytest.mark.timeout(60)
def test_balance_by_time_measures_the_rows_of_one_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sync and Async send each minibatch as one key: measured on a quarter of it before
    # (--microbatches' default applied to policies that take no --microbatches)
    seen = []

    def sequential(*args: object, balance_rows: int, **kwargs: object) -> None:
        seen.append(balance_rows)
        raise ann.GraphError("stop here")

    monkeypatch.setattr(ann.Graph, "sequential", sequential)
    for policy, rows in (("Sync", 64), ("Async", 64), ("GPipe", 16)):
        args = [*_TRAIN, "--policy", policy, "--balance", "time"]
        assert main(args) == 2
        assert seen.pop() == rows, policy


@pytest.mark.timeout(60)
def test_resume_places_the_stages_on_the_workers_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the stages kept the placement of the run that saved them: with --workers 2 on a checkpoint
    # saved without, all of them ran in the driver beside 2 idle worker processes (the first line
    # said "on 2 worker processes"); --workers 1 on one saved with 2 failed ("placed on
    # worker=1, but the cluster has 1 workers")
    ckpt = str(tmp_path / "ckpt")
    assert main([*_TRAIN, "--epochs", "0", "--save", ckpt]) == 0
    placed = []

    def fit(args: object, graph: ann.Graph, *rest: object) -> int:
        placed.append({n: graph.nodes[n].worker for n in (*graph.layers, "loss")})
        return 0

    monkeypatch.setattr("asyncnn._cli._fit", fit)
    # the weights are read once: the graph to place again is read from the spec alone (it was
    # read by a whole Trainer.load, then loaded again)
    read_arrays = ann._checkpoint._read_arrays
    reads = []

    def counted(path: str) -> dict[str, np.ndarray]:
        reads.append(path)
        return read_arrays(path)

    monkeypatch.setattr("asyncnn._checkpoint._read_arrays", counted)
    resume = ["train", "--dataset", "digits", "--resume", ckpt, "--out", ""]
    for workers, expected in ((2, [0, 1]), (1, [0, 0])):
        assert main([*resume, "--workers", str(workers)]) == 0
        assert placed.pop() == {"stage0": expected[0], "stage1": expected[1], "loss": None}
        assert len(reads) == 1
        reads.clear()
    assert main(resume) == 0
    assert placed.pop() == {"stage0": None, "stage1": None, "loss": None}
    capsys.readouterr()


@pytest.mark.timeout(60)
def test_resume_of_a_checkpoint_with_callback_states_says_what_becomes_of_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a Python fit's EarlyStopping state: the fit warned, advising to pass callbacks (which
    # asyncnn train cannot) or to filter the warning (as an error under -W error)
    from asyncnn.callbacks import EarlyStopping

    plain, with_es, again = (str(tmp_path / name) for name in ("plain", "es", "again"))
    assert main([*_TRAIN, "--epochs", "1", "--save", plain]) == 0
    tr, ds = ann.Trainer.load(plain), ann.data.load_digits()
    tr.fit({"x": ds["x_train"], "y": ds["y_train"]}, epochs=1, batch_size=64,
           callbacks=[EarlyStopping("loss")])  # fmt: skip
    tr.save(with_es)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["train", "--dataset", "digits", "--resume", with_es, "--epochs", "3",
                     "--save", again, "--out", ""]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        f"the checkpoint kept the state of the callbacks EarlyStopping of the Python fit that "
        f"saved it, which asyncnn train has none of: this run goes on without them, and drops "
        f"them from what it saves once it has trained an epoch (to go on counting them, resume "
        f"in Python: "
        f"ann.Trainer.load({with_es!r}).fit(..., callbacks=[...]))"
    ) in out
    assert ann.Trainer.load(again).epochs_done == 3
    assert "callbacks" not in _spec_of(again)


def _spec_of(path: str) -> Any:
    import msgpack

    with open(os.path.join(path, "spec.msgpack"), "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, strict_map_key=False)


@pytest.mark.timeout(60)
def test_resume_refuses_a_batch_size_below_the_checkpoints_microbatches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(tmp_path / "ckpt")
    args = [*_TRAIN, "--epochs", "0", "--save", ckpt]
    args[args.index("Sync")] = "GPipe"
    assert main(args) == 0
    capsys.readouterr()
    assert main(["train", "--dataset", "digits", "--resume", ckpt, "--batch-size", "3",
                 "--out", ""]) == 2  # fmt: skip
    assert _one_error_line(capsys).endswith(
        "--batch-size 3: the checkpoint's GPipe(microbatches=4) cuts each minibatch into 4 keys; "
        "give --batch-size 4 or more"
    )


@pytest.mark.timeout(60)
def test_the_report_of_a_resumed_run_names_the_checkpoints_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # its "args" gave the defaults of the flags not given (PipeDream, 3 stages, 512 wide, lr
    # 0.001) for a model that was none of them
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "out"
    assert main([*_TRAIN, "--epochs", "1", "--lr", "0.01", "--save", ckpt]) == 0
    assert main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "2", "--out",
                 str(out)]) == 0  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    for flag in ("policy", "stages", "hidden", "layers", "lr", "seed", "microbatches"):
        assert report["args"][flag] is None, flag
    assert report["args"]["resume"] == ckpt
    model = report["model"]
    assert model["policy"] == "Sync()" and model["modules_per_stage"] == [1, 2]
    assert model["optimizer"].startswith("Adam(lr=0.01,") and model["seed"] == 0
    assert model["epochs_done"] == 2
    capsys.readouterr()
    # the default --epochs (30) or one given, below the checkpoint's: the message said no more
    assert (
        main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "0", "--out", ""]) == 2
    )
    assert _one_error_line(capsys).endswith(
        "--epochs 0: the checkpoint has trained 1 already (--epochs counts them too); give "
        "--epochs 2 or more to train on"
    )


@pytest.mark.timeout(60)
def test_results_are_written_before_a_reader_that_stops_reading_ends_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `asyncnn train | head -2` (with PYTHONUNBUFFERED=1): the table's lines met a closed pipe
    # and results.json, written after them, was lost
    import builtins

    def cut(*args: object, **kwargs: object) -> None:
        if str(args[0]).startswith("test accuracy"):
            raise BrokenPipeError(32, "Broken pipe")
        builtins.print(*args, **kwargs)

    monkeypatch.setattr("asyncnn._cli.print", cut, raising=False)
    out = tmp_path / "out"
    args = [*_TRAIN, "--epochs", "1", "--out", str(out)]
    assert main(args) in (2, 141)
    assert json.loads((out / "results.json").read_text())["test"]["accuracy"] > 0


def test_trace_export_refuses_to_write_over_its_trace(
    traces: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it replaced the trace by its JSON export
    path = tmp_path / "run.trace"
    path.write_bytes(Path(traces[0]).read_bytes())
    assert main(["trace", "export", str(path), str(path)]) == 2
    assert _one_error_line(capsys) == (
        f"asyncnn trace: error: to_chrome: '{path}' is the trace itself: name another file for "
        f"the JSON (e.g. '{tmp_path / 'run.json'}')"
    )
    assert path.read_bytes() == Path(traces[0]).read_bytes()


def test_trace_summary_plots_into_a_file_names_the_option(
    traces: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "[Errno 17] File exists: ..." after reading the whole trace
    path = tmp_path / "a-file"
    path.write_text("")
    assert main(["trace", "summary", traces[0], "--plots", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"asyncnn trace: error: --plots {path}: that is a file; --plots takes a folder"
    )


def test_trace_diff_says_when_a_trace_is_cut_off(
    traces: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "one run did more work here than the other", with no word of the cut
    data = Path(traces[0]).read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert main(["trace", "diff", traces[0], str(cut)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert f"; note: {cut} is cut off after " in line and line.endswith("only the cut")
    assert main(["trace", "diff", traces[0], traces[1]]) == 1
    assert "note:" not in capsys.readouterr().out
    # a cut that lost only the last record: "agree", said without a divergence
    cut.write_bytes(data[:-5])
    assert main(["trace", "diff", traces[0], str(cut)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(
        f"{traces[0]} and {cut} agree as far as the traces go, but {cut} is cut off after "
    )


def test_bench_without_a_name_asks_for_the_name_only(capsys: pytest.CaptureFixture[str]) -> None:
    # "the following arguments are required: name, args": the arguments passed on are optional
    with pytest.raises(SystemExit):
        main(["bench"])
    err = capsys.readouterr().err
    assert "required: name (see asyncnn bench --help)" in err


def test_the_train_report_writes_a_diverged_runs_numbers_as_strict_json():
    # (a NaN loss was written as a bare NaN token, which JSON.parse and jq refuse)
    from asyncnn._cli import _strict_json

    report = {"losses": [0.5, float("nan"), float("inf")], "test": {"loss": float("-inf")},
              "seconds": 1.5, "steps": (1, 2)}  # fmt: skip

    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    back = json.loads(_strict_json(report), parse_constant=refuse)
    assert back == {"losses": [0.5, None, None], "test": {"loss": None}, "seconds": 1.5,
                    "steps": [1, 2]}  # fmt: skip


# -- outputs that collide, checkpoints asyncnn train cannot resume, payloads, --version ----------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("paths", "says"),
    [
        # trained to the end: the trace was written over the metrics' lines (JSONL), and
        # `asyncnn replay same.out` said identical while every metric was lost
        (
            {"--trace": "same.out", "--metrics": "same.out"},
            "--trace {d}/same.out and --metrics {d}/same.out name the same file; give each its own",
        ),
        (
            {"--metrics": "out/results.json", "--out": "out"},
            "--metrics {d}/out/results.json and --out {d}/out (its results.json) name the same "
            "file; give each its own",
        ),
        (
            {"--trace": "runs/x", "--save": "runs/x/ckpt"},
            "--trace {d}/runs/x: the run writes a file there, and --save {d}/runs/x/ckpt needs "
            "it as a folder; give another path",
        ),
        (
            {"--metrics": "ckpt/spec.msgpack", "--save": "ckpt"},
            "--metrics {d}/ckpt/spec.msgpack: --save {d}/ckpt writes that file (a checkpoint's "
            "spec.msgpack); give another name",
        ),
        (  # (trained to the end, then failed on the trace's folder: a file already)
            {"--metrics": "runs/m", "--trace": "runs/m/x.trace"},
            "--metrics {d}/runs/m: the run writes a file there, and --trace {d}/runs/m/x.trace "
            "needs it as a folder; give another path",
        ),
        (
            {"--out": "o", "--trace": "o/results.json/run.trace"},
            "--out {d}/o (its results.json): the run writes a file there, and --trace "
            "{d}/o/results.json/run.trace needs it as a folder; give another path",
        ),
    ],
    ids=[
        "trace-metrics",
        "metrics-results",
        "trace-above-save",
        "metrics-in-save",
        "trace-in-metrics",
        "trace-in-results",
    ],  # fmt: skip
)
def test_train_refuses_outputs_that_would_write_over_each_other_before_training(
    paths: dict[str, str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a for flag, path in paths.items() for a in (flag, str(tmp_path / path))]
    assert main([*_TRAIN[:-2], "--epochs", "1", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the data, the graph and the run
    assert err.strip() == f"asyncnn train: error: {says.format(d=tmp_path)}"
    assert not (tmp_path / "same.out").exists() and not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_train_takes_outputs_that_share_a_folder_without_colliding(tmp_path: Path) -> None:
    # a checkpoint, its report, a trace and metrics in one folder: no file written twice
    run = str(tmp_path / "run")
    args = ["--save", run, "--out", run, "--trace", f"{run}/run.trace", "--metrics",
            f"{run}/metrics.jsonl"]  # fmt: skip
    assert main([*_TRAIN[:-2], "--epochs", "1", *args]) == 0
    for name in ("manifest.json", "results.json", "run.trace", "metrics.jsonl"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name


@pytest.mark.parametrize(
    ("files", "says"),
    [
        # "notckpt/manifest.json is not an asyncnn checkpoint manifest (format None, ...)",
        # without the flag, after the data was loaded
        (
            {"manifest.json": "{}"},
            "{p}/manifest.json is not an asyncnn checkpoint manifest (format None, expected "
            "'asyncnn-checkpoint'); --resume takes a folder that --save wrote",
        ),
        # "the checkpoint has no manifest.json (it was written by an asyncnn older than ...)":
        # no asyncnn wrote it
        (
            {"spec.msgpack": "hello\n"},
            "{p}/spec.msgpack is damaged: ExtraData: unpack(b) received extra data; --resume "
            "takes a folder that --save wrote",
        ),
    ],
    ids=["stray-manifest", "stray-spec"],
)
def test_resume_from_a_folder_with_a_stray_checkpoint_file_names_the_flag(
    files: dict[str, str],
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "notckpt"
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    _no_data(monkeypatch)
    assert main(["train", "--resume", str(path), "--out", ""]) == 2
    assert _one_error_line(capsys) == (
        f"asyncnn train: error: --resume {path}: {says.format(p=path)}"
    )


def _no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes loading a dataset fail: what is refused before the data is loaded passes."""

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(ann.data, "load_mnist1d", load)
    monkeypatch.setattr(ann.data, "load_digits", load)


def _saved(path: Path, inputs: tuple[str, str] = ("x", "y"), features: int = 5) -> str:
    """A checkpoint saved from Python: an MLP on ``features`` columns read from ``inputs``."""
    from asyncnn import nn

    feat, label = inputs
    g = ann.Graph()
    x = g.input(feat, shape=(None, features))
    y = g.input(label, shape=(None,), dtype="int64")
    out = g.layer("stage0", nn.Linear(features, 3), x)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync()).save(str(path))
    return str(path)


@pytest.mark.parametrize(
    ("inputs", "features", "says"),
    [
        # "resuming otherck after 0 epochs ...", then "the batch has no ['feat', 'label']"
        (
            ("feat", "label"),
            5,
            "its graph's inputs are ['feat', 'label'], and asyncnn train feeds 'x' (rows of "
            "features) and 'y' (integer labels): it is not a checkpoint asyncnn train can "
            "resume; load it in Python with ann.Trainer.load",
        ),
        # "its model takes rows of 20 features, --dataset mnist1d has 40: give the --dataset it
        # was trained on", which no --dataset is
        (
            ("x", "y"),
            20,
            "its model takes rows of 20 features, and asyncnn train's datasets have 40 "
            "(--dataset mnist1d) or 64 (--dataset digits): it is not a checkpoint asyncnn train "
            "can resume; load it in Python with ann.Trainer.load",
        ),
    ],
    ids=["other-inputs", "other-features"],
)
def test_resume_of_a_checkpoint_asyncnn_train_did_not_write_says_so_before_the_data(
    inputs: tuple[str, str],
    features: int,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = _saved(tmp_path / "ckpt", inputs, features)
    _no_data(monkeypatch)
    assert main(["train", "--resume", ckpt, "--out", ""]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no "resuming ..." line: refused before the data and the checkpoint
    assert err.strip() == f"asyncnn train: error: --resume {ckpt}: {says}"


def test_train_datasets_have_the_row_widths_resume_checks_against() -> None:
    from asyncnn._cli_args import _DATASET_FEATURES

    assert _DATASET_FEATURES == {
        "mnist1d": ann.data.load_mnist1d()["x_train"].shape[1],
        "digits": ann.data.load_digits()["x_train"].shape[1],
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_with_no_epoch_left_to_train_is_refused_before_the_data(
    epochs: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # it printed "resuming ... after 2 epochs", loaded the data and the checkpoint, then refused
    # --epochs 1; --epochs 2 (the epochs done) trained nothing and printed a table of zeros
    ckpt = str(tmp_path / "ckpt")
    assert main([*_TRAIN, "--epochs", "2", "--save", ckpt]) == 0
    capsys.readouterr()
    _no_data(monkeypatch)
    args = ["train", "--dataset", "digits", "--resume", ckpt, "--out", ""]
    assert main([*args, "--epochs", str(epochs)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        f"asyncnn train: error: --epochs {epochs}: the checkpoint has trained 2 already "
        "(--epochs counts them too); give --epochs 3 or more to train on"
    )


def test_resume_during_a_save_checks_the_checkpoint_that_save_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # (--resume met the new arrays beside the old manifest, waited for the save under way, and
    # then refused the whole checkpoint it left as damaged, where Trainer.load checks it again)
    import threading

    fcntl = pytest.importorskip("fcntl")
    ckpt = _saved(tmp_path / "ckpt", features=64)
    tr = ann.Trainer.load(ckpt)
    tr.params = {"stage0": {k: v + 1 for k, v in tr.params["stage0"].items()}}
    real_replace, real_flock = os.replace, fcntl.flock
    paused, go = threading.Event(), threading.Event()
    saver = threading.Thread(target=lambda: tr.save(ckpt))
    renames: list[str] = []

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if threading.current_thread() is saver:
            renames.append(str(dst))
            if len(renames) == 1:  # between the save's first rename and its second
                paused.set()
                assert go.wait(30)

    def flock(fd: int, op: int) -> None:
        if threading.current_thread() is not saver:
            go.set()  # (--resume waits for the save's lock: the save goes on)
        real_flock(fd, op)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(fcntl, "flock", flock)
    _no_data(monkeypatch)
    saver.start()
    try:
        assert paused.wait(30)
        code = main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "0",
                     "--out", ""])  # fmt: skip
    finally:
        go.set()
        saver.join(30)
    assert code == 2
    assert _one_error_line(capsys) == (
        "asyncnn train: error: --epochs 0: the checkpoint has trained 0 already (--epochs "
        "counts them too); give --epochs 1 or more to train on"
    )  # (checked whole: not "arrays.safetensors is damaged")
    assert len(renames) == 4  # (its three files, then fit.json)


@pytest.mark.timeout(90)
def test_train_records_every_payload_for_replaying_one_actor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no trace of asyncnn train could be replayed with --actor: it kept the inputs only, and
    # the error's advice (trace_payloads='all') was for Python alone
    trace = str(tmp_path / "run.trace")
    assert main([*_TRAIN, "--epochs", "1", "--trace", trace, "--trace-payloads", "all"]) == 0
    assert ann.trace.read(trace).header["payloads"] == "all"
    capsys.readouterr()
    assert main(["replay", trace, "--actor", "stage1"]) == 0
    assert "replay of actor stage1" in capsys.readouterr().out
    # without it (the default: inputs), the error names both ways to record one
    kept = str(tmp_path / "inputs.trace")
    assert main([*_TRAIN, "--epochs", "1", "--trace", kept]) == 0
    capsys.readouterr()
    assert main(["replay", kept, "--actor", "stage1"]) == 2
    line = _one_error_line(capsys)
    assert "this trace kept 'inputs'" in line
    assert "asyncnn train --trace-payloads all" in line and "trace_payloads='all'" in line
    # an actor the trace does not have is named as such, whatever the payloads
    assert main(["replay", kept, "--actor", "stage9"]) == 2
    assert "no actor named 'stage9'" in _one_error_line(capsys)


def test_trace_payloads_without_a_trace_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_TRAIN, "--trace-payloads", "all"]) == 2
    assert _one_error_line(capsys) == (
        "asyncnn train: error: --trace-payloads applies to the trace: give --trace PATH too"
    )


def test_replay_of_a_trace_without_payloads_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = str(tmp_path / "none.trace")
    assert main([*_TRAIN, "--epochs", "1", "--trace", trace, "--trace-payloads", "none"]) == 0
    capsys.readouterr()
    assert main(["replay", trace]) == 2
    line = _one_error_line(capsys)
    assert "replay needs traces recorded with trace_payloads='inputs' or 'all'" in line
    assert "asyncnn train --trace-payloads inputs" in line


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # "the following arguments are required: command"
    with pytest.raises(SystemExit) as exc:
        main([flag])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"asyncnn {ann.__version__}\n"


@pytest.mark.parametrize("name", ["math", "runtime", "trace", "transport"])
def test_bench_help_names_only_flags_the_benchmark_takes(name: str) -> None:
    # bench_math's said the untuned run was "--no-tune", which it refused
    proc = subprocess.run(
        [sys.executable, f"experiments/bench_{name}.py", "--help"],
        capture_output=True, text=True, timeout=120, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    import re

    usage, _, _ = proc.stdout.partition("\n\n")
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", proc.stdout))
    taken = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", usage)) | {"--help"}
    assert named <= taken, proc.stdout


@pytest.mark.timeout(60)
def test_resume_traces_to_the_path_given_as_the_help_says(tmp_path: Path) -> None:
    # (the resumed run wrote runs/run.1.trace, numbered on from the checkpoint's traces, and
    # left runs/run.trace, which `asyncnn replay runs/run.trace` then read, as the first run's)
    ckpt, trace = str(tmp_path / "ckpt"), tmp_path / "runs" / "run.trace"
    assert main([*_TRAIN, "--epochs", "1", "--save", ckpt, "--trace", str(trace)]) == 0
    first = ann.Trainer.load(ckpt).state.minibatches
    assert main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "2", "--save",
                 ckpt, "--trace", str(trace), "--out", ""]) == 0  # fmt: skip
    assert sorted(p.name for p in trace.parent.iterdir()) == ["run.trace"]
    assert ann.trace.read(str(trace)).header["start"]["minibatches"] == first  # the second run
    # (in Python, a trainer loaded with the trace path the saved one had numbers on from it)
    assert ann.Trainer.load(ckpt, trace=str(trace)).traces == [str(trace)]


class _StopAfter(ann.callbacks.Callback):
    """Stops the fit after ``steps`` of its minibatches."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, trainer: Any, step: int, logs: Any) -> None:
        self.steps -= 1
        if self.steps <= 0:
            trainer.stop_training = True


def _batch_size_checkpoints(tmp_path: Path) -> tuple[str, str, int]:
    """Two checkpoints of a run in minibatches of 32 rows (45 an epoch): one at the end of its
    first epoch (``--save``'s), one stopped part-way through its second: ``(end, mid, done)``,
    ``done`` the minibatches of the second epoch that one has done."""
    end, mid = str(tmp_path / "end"), str(tmp_path / "mid")
    args = [*_TRAIN, "--epochs", "1", "--save", end]
    args[args.index("--batch-size") + 1] = "32"
    assert main(args) == 0
    tr = ann.Trainer.load(end)
    ds = ann.data.load_digits()  # fed as asyncnn train feeds it
    tr.fit({"x": ds["x_train"], "y": ds["y_train"]}, epochs=1, batch_size=32, shuffle=True,
           callbacks=[_StopAfter(10)])  # fmt: skip
    assert tr.epochs_done == 1 and 0 < tr.epoch_batches < 45
    tr.save(mid)
    return end, mid, tr.epoch_batches


@pytest.mark.timeout(90)
def test_resume_without_a_batch_size_takes_the_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (it took the default of 100: the interrupted epoch, cut in minibatches of 32, started
    # over in minibatches of 100, its rows done trained twice, without a word)
    end, mid, done = _batch_size_checkpoints(tmp_path)
    capsys.readouterr()
    for ckpt, left in ((mid, 45 - done), (end, 45)):
        out = tmp_path / f"out-{Path(ckpt).name}"
        assert main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "2",
                     "--out", str(out)]) == 0  # fmt: skip
        report = json.loads((out / "results.json").read_text())
        assert report["args"]["batch_size"] == 32
        assert len(report["losses"]) == left, ckpt  # the rest of the epoch, in its minibatches
        said = capsys.readouterr().out
        assert "minibatches of 32 rows, the checkpoint's" in said and "over" not in said
    # another given: the epoch starts over, and the output says so
    out = tmp_path / "out-64"
    assert main(["train", "--dataset", "digits", "--resume", mid, "--epochs", "2",
                 "--batch-size", "64", "--out", str(out)]) == 0  # fmt: skip
    assert len(json.loads((out / "results.json").read_text())["losses"]) == 23
    said = capsys.readouterr().out
    assert "minibatches of 64 rows, given" in said
    assert (
        f"the checkpoint's unfinished epoch 1 ({done} minibatches done) starts over: its "
        "minibatches were laid out otherwise (batch_size 32 there, 64 here) (give --batch-size "
        "32 to finish it)"
    ) in said
    # a checkpoint of a fit that did not shuffle (saved from Python): asyncnn train shuffles,
    # so its epoch starts over too, which was said to go on "as the checkpoint's"
    tr = ann.Trainer.load(end)
    ds = ann.data.load_digits()
    tr.fit({"x": ds["x_train"], "y": ds["y_train"]}, epochs=1, batch_size=32,
           callbacks=[_StopAfter(10)])  # fmt: skip
    tr.save(str(tmp_path / "plain"))
    capsys.readouterr()
    assert main(["train", "--dataset", "digits", "--resume", str(tmp_path / "plain"),
                 "--epochs", "2", "--out", str(tmp_path / "out-plain")]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "starts over: its minibatches were laid out otherwise (shuffle False there, True" in said


@pytest.mark.timeout(60)
def test_resume_of_an_epochs_0_checkpoint_keeps_its_batch_size_and_trains_as_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (`--epochs 0 --batch-size 64 --save` recorded no epoch layout, so `--resume` trained in
    # minibatches of 100, "the default", dropping the --batch-size given)
    ckpt, out, straight = str(tmp_path / "ckpt"), tmp_path / "out", str(tmp_path / "straight")
    assert main([*_TRAIN, "--epochs", "0", "--save", ckpt]) == 0
    capsys.readouterr()
    assert main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "1", "--save",
                 ckpt, "--out", str(out)]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "minibatches of 64 rows, the checkpoint's" in said and "over" not in said
    report = json.loads((out / "results.json").read_text())
    assert report["args"]["batch_size"] == 64
    # the same rows in the same order as a run without the --epochs 0 step: bit for bit
    assert main([*_TRAIN, "--epochs", "1", "--save", straight]) == 0
    resumed, whole = ann.Trainer.load(ckpt), ann.Trainer.load(straight)
    assert resumed.epochs_done == whole.epochs_done == 1
    assert resumed.versions == whole.versions
    assert_params_equal(whole.params, resumed.params)
    capsys.readouterr()


@pytest.mark.timeout(60)
def test_resume_of_a_checkpoint_without_a_classifier_is_refused_before_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # (a regression model saved from Python trained, saved, then ended with the bare
    # "asyncnn train: error: accuracy", status 2, its report never printed)
    from asyncnn import nn

    g = ann.Graph()
    x = g.input("x", shape=(None, 64))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("stage0", nn.Sequential(nn.Linear(64, 1), nn.Flatten(start_dim=0)), x)
    g.loss("loss", nn.MSELoss(), h, y)
    ckpt = str(tmp_path / "ckpt")
    ann.Trainer(g, optimizer=optim.SGD(lr=0.01), policy=policies.Sync()).save(ckpt)
    _no_data(monkeypatch)
    assert main(["train", "--dataset", "digits", "--resume", ckpt, "--out", ""]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        f"asyncnn train: error: --resume {ckpt}: its losses ['loss'] are no classifier's "
        "(a CrossEntropyLoss of the integer labels 'y'), and asyncnn train trains classifiers "
        "and reports their test accuracy: it is not a checkpoint asyncnn train can resume; "
        "load it in Python with ann.Trainer.load"
    )


@pytest.mark.timeout(60)
def test_resume_of_a_checkpoint_dir_names_its_latest_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # (it said only "it has no spec.msgpack")
    folder = tmp_path / "ckpts"
    tr = ann.Trainer(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((16, 5)), "y": rng.integers(0, 3, 16)}
    tr.fit(data, epochs=10, batch_size=8, checkpoint_dir=folder, checkpoint_every=5)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0005", "epoch-0010"]
    _no_data(monkeypatch)
    assert main(["train", "--resume", str(folder), "--out", ""]) == 2
    latest = folder / "epoch-0010"
    assert _one_error_line(capsys) == (
        f"asyncnn train: error: --resume {folder}: it holds a checkpoint per epoch (a fit's "
        f"checkpoint_dir), not one checkpoint; give one of them, the latest: --resume {latest}"
    )
    with pytest.raises(FileNotFoundError, match=f"load one of them, the latest: '{latest}'"):
        ann.Trainer.load(folder)


# -- a disk that refuses the run's files; empty output paths of the trace tools -----------------


class _FullDisk:
    """A file opened for writing on a disk with ``room`` bytes left: a write past them writes
    what fits, then fails as a full disk does (``OSError`` ENOSPC, which names no file)."""

    def __init__(self, file: Any, room: int) -> None:
        self._file = file
        self._room = room

    def write(self, text: Any) -> int:
        if len(text) > self._room:
            self._file.write(text[: self._room])
            self._file.flush()
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(text)
        return int(self._file.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _full_disk_for(monkeypatch: pytest.MonkeyPatch, name: str, room: int = 100) -> None:
    """Fills the disk for every file whose name starts with ``name`` (its ``.tmp`` too)."""
    import builtins

    real_open = builtins.open

    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, str) and os.path.basename(file).startswith(name) and "r" not in mode:
            return _FullDisk(f, room)
        return f

    monkeypatch.setattr(builtins, "open", opened)


@pytest.mark.timeout(60)
def test_train_on_a_disk_that_refuses_the_trace_is_one_line_and_says_where_it_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a traceback of two exceptions (the recorder's RuntimeError, its OSError the cause), exit 1
    from asyncnn._runtime._recorder import Recorder

    def full(self: Recorder, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Recorder, "_write", full)
    trace, ckpt = tmp_path / "t.trace", tmp_path / "ck"
    assert main([*_TRAIN, "--epochs", "2", "--trace", str(trace), "--save", str(ckpt)]) == 2
    assert _one_error_line(capsys) == (
        f"asyncnn train: error: --trace {trace}: writing the trace failed (No space left on "
        "device); the events after the failure were not recorded: free space there, or give "
        f"--trace another path; the trainer was saved to {ckpt} (continue with --resume {ckpt})"
    )
    assert ann.Trainer.load(str(ckpt)).epochs_done <= 2

    # a RuntimeError of anything else is a bug: its traceback is kept
    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(ann.Trainer, "fit", bug)
    with pytest.raises(RuntimeError, match="bug"):
        main([*_TRAIN, "--epochs", "1"])


def test_replay_on_a_disk_that_refuses_its_own_trace_is_one_line(
    traces: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the replay's trace in the temporary folder: the recorder's RuntimeError as a traceback
    from asyncnn._runtime._recorder import Recorder

    def full(self: Recorder, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Recorder, "_write", full)
    assert main(["replay", traces[0]]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("asyncnn replay: error: writing the trace ")
    assert "No space left on device" in line and "free space in the temporary folder" in line


@pytest.mark.timeout(60)
def test_train_on_a_disk_that_refuses_the_save_reports_the_run_and_names_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # safetensors' SafetensorError (no OSError) escaped as a traceback, exit 1, the report lost
    import safetensors.numpy
    from safetensors import SafetensorError

    ckpt = tmp_path / "ck"
    assert main([*_TRAIN, "--epochs", "1", "--save", str(ckpt)]) == 0
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    capsys.readouterr()

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    assert main([*_TRAIN, "--epochs", "2", "--save", str(ckpt)]) == 2
    out, err = capsys.readouterr()
    assert "test accuracy" in out and "saved the trainer" not in out  # the run's report
    (line,) = err.strip().splitlines()
    tmp = ckpt / "arrays.safetensors.tmp"
    assert line.startswith(
        f"asyncnn train: error: --save {ckpt}: the trainer could not be saved ([Errno 28] "
        f"writing {tmp} failed (No space left on device)"
    )
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # whole, no debris


@pytest.mark.timeout(60)
def test_train_on_a_full_disk_keeps_the_previous_results_and_prints_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # results.json was rewritten in place: the last run's was lost, a fragment of the new one
    # left, the report never printed, and the error said only "[Errno 28] No space left ..."
    out = tmp_path / "out"
    assert main([*_TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    _full_disk_for(monkeypatch, "results.json")
    assert main([*_TRAIN, "--epochs", "2", "--out", str(out)]) == 2
    printed, err = capsys.readouterr()
    assert "test accuracy" in printed and "wrote" not in printed
    results = out / "results.json"
    assert _only_line(err) == (
        f"asyncnn train: error: --out {out}: writing {results} failed (No space left on "
        f"device); any results.json there before is kept: free space there, or give --out "
        "another folder ('' for none)"
    )
    assert results.read_text() == before and os.listdir(out) == ["results.json"]


@pytest.mark.timeout(60)
def test_train_on_a_disk_that_refuses_the_metrics_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "asyncnn train: error: [Errno 28] No space left on device": which of the run's files?
    metrics = tmp_path / "m.jsonl"
    _full_disk_for(monkeypatch, "m.jsonl")
    assert main([*_TRAIN, "--epochs", "2", "--metrics", str(metrics)]) == 2
    assert _one_error_line(capsys) == (
        f"asyncnn train: error: --metrics {metrics}: writing it failed (No space left on "
        "device): free space there, or give --metrics another path"
    )


def _only_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_trace_tools_refuse_an_empty_output_path_before_reading_the_trace(
    traces: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "[Errno 2] No such file or directory: '.24739.tmp' -> ''" and "... directory: ''", after
    # the whole trace was read
    import asyncnn._tracing._chrome as chrome
    import asyncnn._tracing._summary as summary

    def unread(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trace was read")

    monkeypatch.setattr(chrome, "open_trace", unread)
    monkeypatch.setattr(summary, "summary", unread)
    assert main(["trace", "export", traces[0], ""]) == 2
    assert _one_error_line(capsys) == (
        "asyncnn trace: error: out: an empty path; name the JSON file to write (e.g. run.json)"
    )
    assert main(["trace", "summary", traces[0], "--plots", ""]) == 2
    assert _one_error_line(capsys) == (
        "asyncnn trace: error: --plots: an empty path (an unset shell variable?); give a "
        "folder, or leave --plots out"
    )


def test_trace_diff_of_a_cut_trace_with_itself_reports_no_divergence(
    traces: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "first divergence at actor 'stage0', ...: the runs agree as far as the traces go, but
    # cut.trace is cut off ...; cut.trace is cut off ...: whether they part ... cannot be told"
    data = Path(traces[0]).read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) * 2 // 3])
    events = len(ann.trace.read(str(cut)).events)
    assert main(["trace", "diff", str(cut), str(cut)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (
        f"{cut} and {cut} agree as far as the traces go, but {cut} is cut off after {events} "
        "events (its run did not finish writing): whether they part after that cannot be told"
    )


@pytest.mark.timeout(60)
def test_train_with_no_epochs_says_it_evaluated_the_untrained_model_and_saves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it printed "0.0 s, 0 samples/s" of a run that trained nothing, without saying so; it is
    # kept (not refused as --resume's is): an untrained model's accuracy, and a first checkpoint
    ckpt, out = tmp_path / "ck", tmp_path / "out"
    assert main([*_TRAIN, "--epochs", "0", "--save", str(ckpt), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (said,) = [line for line in lines if "test loss" in line]
    assert said.startswith("--epochs 0: nothing was trained; the untrained model's test accuracy ")
    assert "samples/s" not in said
    assert f"saved the trainer to {ckpt}" in lines
    assert ann.Trainer.load(str(ckpt)).epochs_done == 0
    report = json.loads((out / "results.json").read_text())
    assert report["model"]["epochs_done"] == 0 and report["losses"] == []
    # --help says what it does
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "0 trains nothing" in " ".join(capsys.readouterr().out.split())
    # and it starts a run that --resume continues
    assert main(["train", "--dataset", "digits", "--resume", str(ckpt), "--epochs", "1",
                 "--out", ""]) == 0  # fmt: skip
    assert ann.Trainer.load(str(ckpt)).epochs_done == 0  # (no --save: the folder as it was)


def test_the_trace_and_output_modules_of_the_command_line_never_import_it() -> None:
    # imports one way: _cli.py imports them, never the other way round
    import ast

    root = Path(ann.__file__).parent
    for name in ("_cli_trace.py", "_cli_output.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):  # (from ._cli import x; from . import _cli)
                found.add(node.module or "")
                found.update(alias.name for alias in node.names if node.module is None)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        assert not found & {"_cli", "asyncnn._cli"}, name


# -- --optimizer and its hyperparameters -----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], optim.Adam(lr=1e-3)),  # the default, as before --optimizer
        (
            ["--optimizer", "SGD", "--momentum", "0.9", "--lr", "0.05"],
            optim.SGD(lr=0.05, momentum=0.9),
        ),
        (["--optimizer", "Adam", "--weight-decay", "0.001"], optim.Adam(weight_decay=0.001)),
        (["--optimizer", "AdamW"], optim.AdamW()),  # its own defaults: lr 1e-3, decay 1e-2
        (["--optimizer", "RMSprop", "--momentum", "0.5"], optim.RMSprop(momentum=0.5)),
        (["--optimizer", "Adagrad", "--lr", "0.1"], optim.Adagrad(lr=0.1)),
    ],
    ids=["default", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad"],
)
def test_train_with_each_optimizer(
    flags: list[str], expected: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # each trains with the optimizer asked for (every run trained with Adam before --optimizer)
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "out"
    args = [*_TRAIN, "--epochs", "1", "--save", ckpt, *flags, "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith(f"with {_short(expected)}")
    assert ann.Trainer.load(ckpt).optimizer == expected
    report = json.loads((out / "results.json").read_text())
    assert report["model"]["optimizer"] == str(expected)
    assert report["args"]["optimizer"] == type(expected).__name__
    assert report["args"]["lr"] == expected.lr
    # and it trained with it: the weights of the same run in Python
    saved = ann.Trainer.load(ckpt)
    python = _fit_in_python(
        ann.Trainer(saved.graph, optimizer=expected, policy=policies.Sync(), seed=0), 1
    )
    assert_params_equal(python.params, saved.params)


@pytest.mark.parametrize(
    ("flags", "optimizer", "policy"),
    [
        (["--optimizer", "sgd"], "SGD", "PipeDream"),
        (["--optimizer", "ADAMW", "--policy", "gpipe"], "AdamW", "GPipe"),
        (["--optimizer=rmsProp", "--policy=onefoneb"], "RMSprop", "OneFOneB"),
        (["--policy", "PIPEDREAM"], "Adam", "PipeDream"),
        (["--policy", "async", "--optimizer", "Adagrad"], "Adagrad", "Async"),
    ],
)
def test_train_takes_optimizer_and_policy_names_in_any_case(
    flags: list[str], optimizer: str, policy: str
) -> None:
    # (parsed only: the names are the canonical ones that the run then looks up)
    args = _parser().parse_args(["train", *flags])
    assert (args.optimizer, args.policy) == (optimizer, policy)


def test_train_help_gives_each_optimizer_its_own_learning_rate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--optimizer {Adam,AdamW,SGD,RMSprop,Adagrad}" in out and "(default: Adam)" in out
    assert "(default: None)" not in out.split("--lr", 1)[1].split("--seed", 1)[0]
    assert "0.1 for SGD" in out


def _fit_in_python(trainer: ann.Trainer, epochs: int) -> ann.Trainer:
    """What asyncnn train's fit does with ``trainer`` on digits (minibatches of 64, shuffled)."""
    ds = ann.data.load_digits()
    trainer.fit({"x": ds["x_train"], "y": ds["y_train"]}, epochs=epochs, batch_size=64,
                shuffle=True)  # fmt: skip
    return trainer


@pytest.mark.timeout(90)
def test_resume_with_another_optimizer_switches_as_trainer_load_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --resume kept the checkpoint's optimizer, and --lr with it was refused: no way to go on
    # with another
    ckpt, again = str(tmp_path / "ckpt"), str(tmp_path / "again")
    assert main([*_TRAIN, "--epochs", "1", "--optimizer", "SGD", "--momentum", "0.9",
                 "--save", ckpt]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "2", "--out", "",
                 "--optimizer", "Adam", "--lr", "0.01", "--save", again]) == 0  # fmt: skip
    out = capsys.readouterr().out
    switched = [line for line in out.splitlines() if line.startswith("--optimizer Adam:")]
    assert switched == [
        "--optimizer Adam: Adam(lr=0.01) in place of the checkpoint's SGD(lr=0.1, momentum=0.9); "
        "each layer's optimizer state starts fresh (another structure: step 0, its buffers at "
        "their start)"
    ]
    resumed = ann.Trainer.load(again)
    assert resumed.optimizer == optim.Adam(lr=0.01) and resumed.epochs_done == 2
    python = _fit_in_python(ann.Trainer.load(ckpt, optimizer=optim.Adam(lr=0.01)), 1)
    assert resumed.versions == python.versions
    assert_params_equal(python.params, resumed.params)
    assert resumed.state.opt_states["stage0"]["step"] == 23  # fresh at the switch: one epoch's


@pytest.mark.timeout(90)
def test_resume_with_an_optimizer_of_the_same_structure_keeps_its_state_and_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, again = str(tmp_path / "ckpt"), str(tmp_path / "again")
    assert main([*_TRAIN, "--epochs", "1", "--lr", "0.01", "--save", ckpt]) == 0  # Adam
    capsys.readouterr()
    resume = ["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "2", "--out", ""]
    # the checkpoint's kind: its hyperparameters kept (lr 0.01), those given replaced
    assert main([*resume, "--optimizer", "Adam", "--weight-decay", "0.001", "--save", again]) == 0
    out = capsys.readouterr().out
    assert (
        "--optimizer Adam: Adam(lr=0.01, weight_decay=0.001) in place of the checkpoint's "
        "Adam(lr=0.01); each layer's optimizer state goes on (the same structure: its step "
        "count and buffers kept)"
    ) in out.splitlines()
    resumed = ann.Trainer.load(again)
    assert resumed.optimizer == optim.Adam(lr=0.01, weight_decay=0.001)
    assert resumed.state.opt_states["stage0"]["step"] == 46  # went on from the checkpoint's 23
    python = _fit_in_python(
        ann.Trainer.load(ckpt, optimizer=optim.Adam(lr=0.01, weight_decay=0.001)), 1
    )
    assert_params_equal(python.params, resumed.params)
    # another kind of the same structure: AdamW takes Adam's moments, with its own defaults
    capsys.readouterr()
    assert main([*resume, "--optimizer", "AdamW", "--save", again]) == 0
    assert "each layer's optimizer state goes on" in capsys.readouterr().out
    assert ann.Trainer.load(again).optimizer == optim.AdamW()
    # the report's args name what was given, its model the optimizer it trained with
    out_dir = tmp_path / "out"
    resume[resume.index("--out") + 1] = str(out_dir)
    assert main([*resume, "--optimizer", "SGD"]) == 0
    report = json.loads((out_dir / "results.json").read_text())
    # (the values it trained with, as a new run's report: SGD's own lr where none was given)
    assert report["args"]["optimizer"] == "SGD" and report["args"]["lr"] == 0.1
    assert report["args"]["weight_decay"] == 0.0 and report["args"]["momentum"] == 0.0
    assert report["model"]["optimizer"] == str(optim.SGD())
    assert main([*resume]) == 0  # no --optimizer: the checkpoint's
    report = json.loads((out_dir / "results.json").read_text())
    assert report["args"]["optimizer"] is None and report["args"]["weight_decay"] is None
    assert report["model"]["optimizer"].startswith("Adam(lr=0.01,")


@pytest.mark.timeout(60)
def test_resume_changing_a_setting_that_clashes_with_the_checkpoints_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a Python run's Nesterov SGD: --momentum 0 clashes with its nesterov=True, which no flag
    # turns off; said in one line naming the checkpoint's optimizer, not a traceback
    ckpt = str(tmp_path / "ckpt")
    assert main([*_TRAIN, "--epochs", "1", "--optimizer", "SGD", "--momentum", "0.9",
                 "--save", ckpt]) == 0  # fmt: skip
    tr = ann.Trainer.load(ckpt)
    tr.optimizer = optim.SGD(lr=0.1, momentum=0.9, nesterov=True)
    tr.save(ckpt)
    capsys.readouterr()
    code = main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "2", "--out", "",
                 "--optimizer", "SGD", "--momentum", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--optimizer SGD --momentum 0.0: the checkpoint's SGD(lr=0.1, momentum=0.9, " in err
    assert "nesterov=True) with these changed is refused (" in err
    assert "Trainer.load(path, optimizer=...)" in err


@pytest.mark.timeout(90)
def test_resume_with_an_rmsprop_of_another_momentum_says_its_state_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the state went on (an RMSprop's step and square averages kept, its momentum buffer new),
    # but the report said it started fresh: it took a new object for another structure
    ckpt = str(tmp_path / "ckpt")
    assert main([*_TRAIN, "--epochs", "1", "--optimizer", "RMSprop", "--lr", "0.001",
                 "--save", ckpt]) == 0  # fmt: skip
    capsys.readouterr()
    again = str(tmp_path / "again")
    assert main(["train", "--dataset", "digits", "--resume", ckpt, "--epochs", "2", "--out", "",
                 "--optimizer", "RMSprop", "--momentum", "0.5", "--save", again]) == 0  # fmt: skip
    switched = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("--optimizer")
    ]
    assert switched == [
        "--optimizer RMSprop: RMSprop(lr=0.001, momentum=0.5) in place of the checkpoint's "
        "RMSprop(lr=0.001); each layer's optimizer state goes on (an RMSprop of another "
        "momentum or centered: its step count and square averages kept, its momentum_buffer "
        "new at zero)"
    ]
    assert ann.Trainer.load(again).state.opt_states["stage0"]["step"] == 46  # 23 + 23
    # and back, momentum off: the buffer goes, none starts (the report said one started)
    capsys.readouterr()
    assert main(["train", "--dataset", "digits", "--resume", again, "--epochs", "3", "--out",
                 "", "--optimizer", "RMSprop", "--momentum", "0"]) == 0  # fmt: skip
    switched = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("--optimizer")
    ]
    assert switched == [
        "--optimizer RMSprop: RMSprop(lr=0.001) in place of the checkpoint's RMSprop(lr=0.001, "
        "momentum=0.5); each layer's optimizer state goes on (an RMSprop of another momentum "
        "or centered: its step count and square averages kept, its momentum_buffer dropped)"
    ]
