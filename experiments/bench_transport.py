"""Benchmark of the worker transport, in one run (ratios against references measured here too):

1. throughput of 1 MB and 64 MB tensors from one process to another, through asyncnn's frames
   (a message encoded as the workers send it: msgpack header, raw bytes received into a fresh
   array, decoded back into a message) against a raw-socket copy of the same bytes (blocking
   ``sendall`` / ``recv_into`` into a preallocated buffer; no framing, no event loop);
2. per-message latency of tiny tensors (a round trip halved), both ways;
   each of 1 and 2 over TCP and through shared memory (``LocalCluster``'s default);
3. samples/s of a 2-stage ``PipeDream`` pipeline with one stage on each of 2 local workers,
   against the same graph in one process (and against ``Sync`` in one process).

Run: python experiments/bench_transport.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
from bench_runtime import SIZES, data, mlp_modules  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import nn, optim, policies  # noqa: E402

MB = 1 << 20


# -- the receiving process -------------------------------------------------------------------------
def _raw_receiver(port: int, nbytes: int, count: int, tiny: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    for _ in range(count):
        got = 0
        while got < nbytes:
            got += sock.recv_into(view[got:])
    sock.sendall(b"k")
    small = bytearray(16)
    for _ in range(tiny):  # echo
        got = 0
        while got < 16:
            got += sock.recv_into(memoryview(small)[got:])
        sock.sendall(small)
    sock.close()


def _frame_receiver(port: int, token: bytes, count: int, tiny: int, shm: bool) -> None:
    import anyio

    from asyncnn._cluster._codec import decode_message, encode_message
    from asyncnn._cluster._handshake import connect
    from asyncnn.backends import tune_allocator

    tune_allocator()  # as a worker process does at start

    async def main() -> None:
        conn = await connect("127.0.0.1", port, token, {"role": "bench"}, "the sender", shm=shm)
        for _ in range(2):  # two messages to warm up (a reader holds one while it awaits the next)
            header, buffers = await conn.receive()
            decode_message(header, buffers)
        del header, buffers
        await conn.send({"t": "ack"})
        for _ in range(count):
            header, buffers = await conn.receive()
            decode_message(header, buffers)
        await conn.send({"t": "ack"})
        for _ in range(tiny):  # echo the message back
            header, buffers = await conn.receive()
            msg = decode_message(header, buffers)
            h, b = encode_message(msg)
            await conn.send(h, b)
        conn.close()

    anyio.run(main, backend="trio")


# -- the sending side --------------------------------------------------------------------------------
def _one_way(round_trips: list[float]) -> tuple[float, float]:
    """(median, mean) one-way latency in µs of timed round trips (the first tenth left out as
    warm-up): the median is the typical message, the mean counts the slow ones too."""
    kept = np.asarray(round_trips[len(round_trips) // 10 :]) / 2 * 1e6
    return float(np.median(kept)), float(kept.mean())


def raw_socket(nbytes: int, count: int, tiny: int) -> tuple[float, float, float]:
    """(GB/s, median and mean one-way latency in µs) of plain blocking sockets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    proc = mp.get_context("spawn").Process(target=_raw_receiver, args=(port, nbytes, count, tiny))
    proc.start()
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    t = time.perf_counter()
    for _ in range(count):
        sock.sendall(memoryview(data))
    sock.recv(1)
    seconds = time.perf_counter() - t
    small = bytes(16)
    trips = []
    for _ in range(tiny):
        t = time.perf_counter()
        sock.sendall(small)
        got = 0
        while got < 16:
            got += len(sock.recv(16 - got))
        trips.append(time.perf_counter() - t)
    sock.close()
    listener.close()
    proc.join()
    return (nbytes * count / seconds / 1e9, *_one_way(trips))


def frames(nbytes: int, count: int, tiny: int, shm: bool = False) -> tuple[float, float, float]:
    """(GB/s, median and mean one-way latency in µs) of asyncnn's message frames between two processes (over
    TCP, or through shared memory as a ``LocalCluster``'s processes exchange them)."""
    import anyio

    from asyncnn._cluster._codec import decode_message, encode_message
    from asyncnn._cluster._handshake import accept, accept_socket, listen
    from asyncnn._runtime._messages import Message

    token = os.urandom(32)
    listener = listen()
    port = listener.getsockname()[1]
    proc = mp.get_context("spawn").Process(
        target=_frame_receiver, args=(port, token, count, tiny, shm)
    )
    proc.start()
    tensor = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    meta = {"rows": 1, "mb_rows": 1, "mb_keys": 1, "minibatch": 0}
    out: dict[str, float] = {}
    trips: list[float] = []

    async def main() -> None:
        sock = await accept_socket(listener)
        conn, _ = await accept(sock, token, shm=shm)
        assert (type(conn).__name__ == "ShmConnection") == shm, type(conn)
        h, b = encode_message(Message("forward", -1, 0, "a", "b", 0, (tensor,), meta))
        for _ in range(2):  # warm-up: connection, buffers and pages (slabs: steady state is two)
            await conn.send(h, b)
        await conn.receive()
        t = time.perf_counter()
        for key in range(count):
            h, b = encode_message(Message("forward", key, 0, "a", "b", 0, (tensor,), meta))
            await conn.send(h, b)
        await conn.receive()
        out["seconds"] = time.perf_counter() - t
        small = np.ones(4, dtype=np.float32)
        for key in range(tiny):
            t = time.perf_counter()
            h, b = encode_message(Message("forward", key, 0, "a", "b", 0, (small,), meta))
            await conn.send(h, b)
            header, buffers = await conn.receive()
            decode_message(header, buffers)
            trips.append(time.perf_counter() - t)
        conn.close()

    anyio.run(main, backend="trio")
    listener.close()
    proc.join()
    return (nbytes * count / out["seconds"] / 1e9, *_one_way(trips))


def shm_frames(nbytes: int, count: int, tiny: int) -> tuple[float, float, float]:
    """:func:`frames` through shared memory."""
    return frames(nbytes, count, tiny, shm=True)


def best(
    fn: Any, nbytes: int, count: int, tiny: int, repeats: int
) -> tuple[float, tuple[float, float]]:
    """The best of ``repeats`` runs: (GB/s, (median, mean) one-way µs)."""
    runs = [fn(nbytes, count, tiny) for _ in range(repeats)]
    return max(r[0] for r in runs), (min(r[1] for r in runs), min(r[2] for r in runs))


# -- a pipeline on two workers ----------------------------------------------------------------------
def pipeline(batch: int, steps: int, micro: int) -> dict[str, float]:
    mods = mlp_modules()  # bench_runtime's MLP and data
    d = data(batch * steps)
    results: dict[str, float] = {}
    cases = [
        ("Sync, one process, 1 stage", policies.Sync(), None, None, False),
        ("PipeDream, one process, 2 stages", policies.PipeDream(micro), None, [None, None], False),
        ("PipeDream, 2 workers (TCP), 2 stages", policies.PipeDream(micro), 2, [0, 1], False),
        ("PipeDream, 2 workers (shared memory), 2 stages", policies.PipeDream(micro), 2, [0, 1],
         True),
    ]  # fmt: skip
    for name, policy, workers, placed, shm in cases:
        g = ann.Graph.sequential(
            mods, loss=nn.CrossEntropyLoss(), stages=1 if placed is None else 2,
            input_shape=(None, SIZES[0]), workers=placed,
        )  # fmt: skip
        cluster = ann.cluster.LocalCluster(workers=workers, shm=shm) if workers else None
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.01), policy=policy, cluster=cluster)
        tr.fit({k: v[: batch * 2] for k, v in d.items()}, epochs=1, batch_size=batch)  # warm up
        hist = tr.fit(d, epochs=1, batch_size=batch)
        results[name] = hist.samples_per_second
        if cluster is not None:
            cluster.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--out", default="runs/bench_transport.json")
    args = ap.parse_args()
    from asyncnn.backends import tune_allocator

    tune_allocator()
    repeats = 1 if args.quick else 3
    tiny = 200 if args.quick else 2000
    report: dict[str, Any] = {"throughput_gb_s": {}, "latency_us": {}}
    print(f"load average at the start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    print("1. throughput between two processes on this machine (GB/s, best of "
          f"{repeats}; targets: TCP frames >= 0.8x raw, shared memory >= 2x TCP frames):")  # fmt: skip
    lat: dict[str, tuple[float, float]] = {}
    for label, nbytes, count in (("1 MB", MB, 400), ("64 MB", 64 * MB, 12)):
        if args.quick:
            count = max(2, count // 8)
        raw, lat["raw socket"] = best(raw_socket, nbytes, count, tiny, repeats)
        ours, lat["asyncnn frames, TCP"] = best(frames, nbytes, count, tiny, repeats)
        shm, lat["asyncnn frames, shared memory"] = best(shm_frames, nbytes, count, tiny, repeats)
        report["throughput_gb_s"][label] = {
            "raw socket": raw, "asyncnn frames, TCP": ours, "asyncnn frames, shared memory": shm,
        }  # fmt: skip
        print(
            f"   {label:>6}: raw socket {raw:6.2f}   TCP frames {ours:6.2f} ({ours / raw:4.2f}x raw)"
            f"   shared memory {shm:6.2f} ({shm / ours:4.2f}x TCP frames)"
        )
    report["latency_us"] = {k: {"median": v[0], "mean": v[1]} for k, v in lat.items()}
    print(f"2. one-way latency of a tiny message (µs, median / mean of {tiny} round trips halved, "
          f"best of {repeats}; target shared memory <= 15):")  # fmt: skip
    for k, (median, mean) in lat.items():
        print(f"   {k:<32} {median:7.1f} / {mean:7.1f}")
    tp = pipeline(256, 6 if args.quick else 30, 4)
    report["pipeline_samples_per_second"] = tp
    ref = tp["Sync, one process, 1 stage"]
    same = tp["PipeDream, one process, 2 stages"]
    print("3. MLP 784-1024-1024-1024-10, batch 256, 4 microbatches (samples/s):")
    for k, v in tp.items():
        print(f"   {k:<48} {v:8.0f}   {v / ref:5.2f}x Sync   {v / same:5.2f}x one process")
    report["machine"] = _common.machine()  # the load average at the end among it
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    _common.write_json(args.out, report)


if __name__ == "__main__":
    main()
