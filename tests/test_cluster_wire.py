"""Frames on the wire: round trips, back-pressure, and every way a malformed frame is refused
(opening connections is ``test_cluster_handshake.py``'s)."""

from __future__ import annotations

import socket
import tracemalloc
from typing import Any

import anyio
import msgpack
import numpy as np
import pytest

from asyncnn._cluster._codec import (
    decode_message,
    decode_tree,
    encode_message,
    encode_tree,
    unsendable,
)
from asyncnn._cluster._wire import (
    _PREFIX,
    MAGIC,
    Connection,
    ProtocolError,
)
from asyncnn._runtime._messages import Message

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def pair(limit: int = 1 << 30) -> tuple[Connection, Connection]:
    a, b = socket.socketpair()
    return Connection(a, "peer a", limit), Connection(b, "peer b", limit)


async def test_frames_round_trip_headers_and_raw_buffers(anyio_backend: str) -> None:
    a, b = pair()
    arrays = [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((0, 5), dtype=np.float64),
        np.array([1, -2, 3], dtype=np.int64),
        np.random.default_rng(0).normal(size=(1 << 20,)).astype(np.float32),  # 4 MB
    ]
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.send, {"t": "x", "what": [1, "two"]}, arrays)
        header, buffers = await b.receive()
    assert header["t"] == "x" and header["what"] == [1, "two"]
    assert [buf.nbytes for buf in buffers] == [x.nbytes for x in arrays]
    for x, buf in zip(arrays, buffers, strict=True):
        np.testing.assert_array_equal(buf.view(x.dtype).reshape(x.shape), x)
    a.close()
    b.close()


async def test_messages_and_parameter_trees_round_trip(anyio_backend: str) -> None:
    msg = Message(
        "backward", 7, 3, "s1", "s0", 1,
        (np.ones((2, 3), np.float32), None, np.arange(4, dtype=np.int64)),
        {"rows": 2, "minibatch": 0},
    )  # fmt: skip
    header, buffers = encode_message(msg)
    raw = [np.frombuffer(b.tobytes(), np.uint8) for b in buffers]
    back = decode_message(header, raw)
    assert (back.kind, back.key, back.version, back.src, back.dst, back.slot) == (
        "backward", 7, 3, "s1", "s0", 1,
    )  # fmt: skip
    assert back.tensors[1] is None and back.meta == msg.meta
    np.testing.assert_array_equal(back.tensors[2], msg.tensors[2])
    tree = {"a": [np.ones(3), {"w": np.eye(2, dtype=np.float32)}], "step": 4, 0: (np.zeros(1),)}
    bufs: list[Any] = []
    spec = encode_tree(tree, bufs)
    spec = msgpack.unpackb(msgpack.packb(spec), strict_map_key=False)
    got = decode_tree(spec, [np.frombuffer(b.tobytes(), np.uint8) for b in bufs])
    assert got["step"] == 4 and isinstance(got[0], tuple)
    np.testing.assert_array_equal(got["a"][1]["w"], np.eye(2, dtype=np.float32))


def test_numpy_scalars_in_a_tree_arrive_as_numpy_scalars() -> None:
    # (they arrived as 0-d arrays: a custom actor's np.int64 count came back as array(256))
    tree = {"n": np.int64(256), "r": np.float32(0.5), "b": np.bool_(True), "z": np.zeros(())}
    bufs: list[Any] = []
    spec = msgpack.unpackb(msgpack.packb(encode_tree(tree, bufs)), strict_map_key=False)
    got = decode_tree(spec, [np.frombuffer(b.tobytes(), np.uint8) for b in bufs])
    assert {k: type(v) for k, v in got.items()} == {
        "n": np.int64, "r": np.float32, "b": np.bool_, "z": np.ndarray,
    }  # fmt: skip
    assert got["n"] == 256 and got["r"] == 0.5 and got["z"].shape == ()


def test_unsendable_names_the_place_of_what_cannot_travel() -> None:
    assert unsendable({"a": [np.ones(2), np.int64(1), "s", None, 1.5, (True,)]}) is None
    assert unsendable({"a": [1, {"x": {1, 2}}]}) == ("['a'][1]['x']", "a set")
    assert unsendable({(1, 2): 0}) == ("[(1, 2)]", "a key of type tuple")
    place, what = unsendable([2**70])  # type: ignore[misc]
    assert place == "[0]" and "msgpack cannot encode" in what
    place, what = unsendable({"o": np.array([object()])})  # type: ignore[misc]
    assert place == "['o']" and "dtype object" in what


def test_a_tensor_of_objects_is_refused_by_its_sender_naming_the_message() -> None:
    # (its pointers went out, and the receiver refused "a malformed message" from its peer)
    objects = np.array([1, "a", None], dtype=object)
    msg = Message("forward", 2, 0, "s1", "s2", 0, (np.ones(2), objects))
    with pytest.raises(TypeError, match=r"forward message from 's1' to 's2': tensor 1 \(shape"):
        encode_message(msg)


def test_decoding_a_message_whose_tensors_do_not_match_fails_clearly() -> None:
    header, buffers = encode_message(Message("forward", 0, 0, "a", "b", 0, (np.ones(4),)))
    header["x"][0][1] = [5]
    with pytest.raises(ValueError, match=r"shape \(5,\) needs 40 bytes, the frame carried 32"):
        decode_message(header, [np.frombuffer(buffers[0].tobytes(), np.uint8)])
    header["x"][0] = ["|O", [4]]
    with pytest.raises(ValueError, match="object dtype"):
        decode_message(header, [np.frombuffer(buffers[0].tobytes(), np.uint8)])
    with pytest.raises(ValueError, match="malformed header"):
        decode_message({"x": []}, [])


def _through_a_header(msg: Message) -> Message:
    header, buffers = encode_message(msg)
    header = msgpack.unpackb(msgpack.packb(header), strict_map_key=False)
    return decode_message(header, [np.frombuffer(b.tobytes(), np.uint8) for b in buffers])


def test_every_dtype_arrives_as_itself_bit_for_bit_and_one_that_cannot_is_refused() -> None:
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(6, 8))
    sent = (
        grid.astype(np.float16), rng.integers(-(2**62), 2**62, 5), np.array([True, False]),
        np.array(3.5), grid[::2, ::-3], grid.astype(">f8"), np.zeros((0, 3), np.int8),
        np.array([np.nan, -0.0], np.float32),
    )  # fmt: skip
    back = _through_a_header(Message("forward", 1, 0, "s1", "s2", 0, sent))
    for x, y in zip(sent, back.tensors, strict=True):
        assert (y.dtype, y.shape) == (x.dtype, x.shape)
        assert y.tobytes() == np.ascontiguousarray(x).tobytes()
    # a structured dtype's str is raw bytes ("|V12"): it arrived as void, its fields lost
    fields = np.zeros(3, dtype=[("a", "<f4"), ("b", "<i8")])
    with pytest.raises(TypeError, match=r"from 's1' to 's2': tensor 1 \(shape \(3,\)\) has dtype"):
        encode_message(Message("forward", 1, 0, "s1", "s2", 0, (np.ones(2), fields)))
    with pytest.raises(TypeError, match="has no name another process could rebuild it from"):
        encode_tree({"w": fields}, [])
    header, buffers = encode_message(Message("forward", 0, 0, "a", "b", 0, (np.ones(2),)))
    header["x"][0][0] = "bfloat17"
    with pytest.raises(ValueError, match="dtype 'bfloat17' is unknown in this process"):
        decode_message(header, [np.frombuffer(buffers[0].tobytes(), np.uint8)])


def test_bfloat16_arrives_as_bfloat16() -> None:
    # its dtype's str is "<V2": workers received raw void and failed on their first matmul
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    back = _through_a_header(Message("forward", 1, 0, "s1", "s2", 0, (x,)))
    assert back.tensors[0].dtype == x.dtype and back.tensors[0].tobytes() == x.tobytes()
    bufs: list[Any] = []
    spec = encode_tree({"w": x}, bufs)
    got = decode_tree(spec, [np.frombuffer(b.tobytes(), np.uint8) for b in bufs])
    assert got["w"].dtype == x.dtype


async def _refused(raw: bytes, limit: int = 1 << 30) -> ProtocolError:
    a, b = pair(limit)
    await a._send_all(raw)
    with pytest.raises(ProtocolError) as info:
        await b.receive()
    a.close()
    b.close()
    return info.value


async def test_malformed_frames_are_refused_with_what_was_wrong(anyio_backend: str) -> None:
    err = await _refused(b"HTTP" + bytes(12))
    assert "starts with b'HTTP'" in str(err) and "peer b" in str(err)
    err = await _refused(_PREFIX.pack(MAGIC, 1 << 30, 0))
    assert "header" in str(err) and "limit" in str(err)
    junk = b"\xc1\xc1\xc1"
    err = await _refused(_PREFIX.pack(MAGIC, len(junk), 0) + junk)
    assert "undecodable header" in str(err)
    head = msgpack.packb({"t": "m", "n": [10, 10]})
    err = await _refused(_PREFIX.pack(MAGIC, len(head), 5) + head)
    assert "do not add up" in str(err)


async def test_a_frame_claiming_100_gb_is_refused_without_allocating(anyio_backend: str) -> None:
    tracemalloc.start()
    try:
        err = await _refused(_PREFIX.pack(MAGIC, 10, 100 * 10**9), limit=16 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "100,000,000,000 bytes" in str(err) and "max_message_bytes" in str(err)
    assert peak < 1 << 20  # nothing near the claim was allocated


async def test_a_frame_over_the_limit_is_refused_by_its_sender_naming_the_message(
    anyio_backend: str,
) -> None:
    a, b = pair(limit=1000)
    header, buffers = encode_message(Message("forward", 3, 0, "s1", "s2", 0, (np.ones((4, 64)),)))
    with pytest.raises(ValueError, match=r"forward message from 's1' to 's2'") as info:
        await a.send(header, buffers)
    text = str(info.value)
    assert "(4, 64)" in text and "2,048 bytes" in text and "peer a" in text
    assert "max_message_bytes" in text
    # nothing went out: the connection carries the next frame as if nothing happened
    assert a.bytes_sent == 0
    await a.send({"t": "next"}, [np.ones(10, np.float32)])
    got, _ = await b.receive()
    assert got["t"] == "next"
    a.close()
    b.close()


async def test_a_peer_closing_mid_frame_is_an_eof(anyio_backend: str) -> None:
    a, b = pair()
    head = msgpack.packb({"t": "m", "n": [100]})
    await a._send_all(_PREFIX.pack(MAGIC, len(head), 100) + head + bytes(10))
    a.close()
    with pytest.raises(EOFError, match="peer b closed"):
        await b.receive()
    b.close()


async def test_a_sender_waits_for_a_receiver_that_does_not_read(anyio_backend: str) -> None:
    # back-pressure: nothing piles up in the sender's memory; it waits until the peer reads
    a, b = pair()
    block = np.zeros(1 << 30, dtype=np.uint8)  # more than any socket buffer; never touched
    with anyio.move_on_after(0.5) as scope:
        await a.send({"t": "m"}, [block])
    assert scope.cancelled_caught  # the socket buffers filled and the send waited
    assert a.bytes_sent < block.nbytes
    a.close()
    b.close()


async def test_the_shutdown_notice_finishes_a_frame_cut_by_a_cancelled_send_first(
    anyio_backend: str,
) -> None:
    # send_sync (a closing cluster's shutdown notice) wrote its frame after half of a frame a
    # cancelled send left: the peer read the notice's bytes as that frame's tensor bytes
    a, b = pair()
    block = np.arange(1 << 21, dtype=np.float64)  # 16 MB: more than the socket buffers hold
    with anyio.move_on_after(0.2) as scope:
        await a.send({"t": "m"}, [block])
    assert scope.cancelled_caught and a.cut()
    received: list[Any] = []

    async def read_two() -> None:
        for _ in range(2):
            received.append(await b.receive())

    with anyio.fail_after(10):  # (before, the reader waited for the cut frame's bytes)
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_two)
            await anyio.to_thread.run_sync(a.send_sync, {"t": "shutdown"})
    (first, buffers), (notice, _) = received
    assert first["t"] == "m" and notice["t"] == "shutdown" and not a.cut()
    np.testing.assert_array_equal(buffers[0].view(np.float64), block)
    a.close()
    b.close()
