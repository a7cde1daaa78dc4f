"""GPU tensors between processes with NCCL (cupy's bindings), when a cluster asks for it.

Each direction between two processes whose GPU nodes exchange tensors gets its own two-rank
communicator (rank 0 sends, rank 1 receives), so that the transfers of one link are matched in the
order they are issued and two directions never wait on each other. The TCP frame still goes
first: its header announces the tensors (dtype, shape) instead of carrying them; the sender issues
``ncclSend`` right after writing the frame, the receiver ``ncclRecv`` when it reads it, so both
sides issue a link's transfers in the frames' order. The sender's stream first waits on the
producer's event; the receiver records an event after the receive, which the consuming actor's
stream waits on like any message's event. The bytes travel as ``uint8`` (no reduction happens),
so any dtype works, bfloat16 included.

Communicators are created at the start of a run, every process walking the same sorted list of
links, so that no two processes wait on each other's creation in opposite orders.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import anyio

from asyncnn._runtime._lifecycle import Share
from asyncnn.backends import parse_device

__all__ = ["Link", "LinkKey", "LinkedShare", "NcclLinks", "open_links", "plan_links"]

#: (sending process, its device, receiving process, its device); a process is a worker index, or
#: -1 for the driver
LinkKey = tuple[int, str, int, str]


def _proc(w: int | None) -> int:
    return -1 if w is None else int(w)


def plan_links(graph: Any, where: Mapping[str, int | None]) -> list[LinkKey]:
    """Every directed link that carries GPU tensors between two processes, sorted: forwards along
    each edge between CUDA nodes in different processes, gradients back along it."""
    links: set[LinkKey] = set()
    for name, w in where.items():
        node = graph.nodes[name]
        if not str(node.device).startswith("cuda"):
            continue
        for consumer, _ in node.consumers:
            c = graph.nodes[consumer]
            if consumer not in where or not str(c.device).startswith("cuda"):
                continue
            wc = where[consumer]
            if _proc(wc) == _proc(w):
                continue
            a, b = str(parse_device(node.device)), str(parse_device(c.device))
            links.add((_proc(w), a, _proc(wc), b))
            if not c.stop_gradient:
                links.add((_proc(wc), b, _proc(w), a))
    return sorted(links)


def unique_ids(count: int) -> list[Any]:
    """``count`` fresh NCCL ids, msgpack-able (made in the driver, sent with the run)."""
    from cupy.cuda import nccl

    out = []
    for _ in range(count):
        uid = nccl.get_unique_id()
        out.append(bytes(uid) if isinstance(uid, bytes | bytearray) else list(uid))
    return out


class Link:
    """One direction of NCCL transfers between two processes (this process's end)."""

    def __init__(self, key: LinkKey, comm: Any, sending: bool) -> None:
        import cupy

        self.key = key
        self.comm = comm
        self.sending = sending
        self.device = cupy.cuda.Device(parse_device(key[1] if sending else key[3]).index)
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self._keepalive: deque[tuple[Any, Any]] = deque()

    def send(self, tensors: list[Any], after: Any) -> None:
        """Issues the sends of ``tensors`` on this link's stream, after the event ``after``."""
        import cupy
        from cupy.cuda import nccl

        with self.device, self.stream:
            if after is not None:
                self.stream.wait_event(after)
            for t in tensors:
                if t is None or t.size == 0:
                    continue
                flat = cupy.ascontiguousarray(t)
                self.comm.send(flat.data.ptr, flat.nbytes, nccl.NCCL_UINT8, 1, self.stream.ptr)
                # the tensor (and a contiguous copy) must outlive the transfer
                self._keepalive.append((self.stream.record(), flat))
        while self._keepalive and self._keepalive[0][0].done:
            self._keepalive.popleft()

    def receive(self, descs: list[Any]) -> tuple[list[Any], Any]:
        """Issues the receives of tensors described by ``descs`` (``[dtype, shape]`` or None);
        returns them and the event the consumer waits on."""
        import cupy
        import numpy as np
        from cupy.cuda import nccl

        out: list[Any] = []
        with self.device, self.stream:
            for d in descs:
                if d is None:
                    out.append(None)
                    continue
                arr = cupy.empty(tuple(d[1]), dtype=np.dtype(d[0]))
                if arr.size:
                    self.comm.recv(arr.data.ptr, arr.nbytes, nccl.NCCL_UINT8, 0, self.stream.ptr)
                out.append(arr)
            event = self.stream.record()
        return out, event


class NcclLinks:
    """This process's ends of a run's NCCL links."""

    def __init__(self, me: int) -> None:
        self.me = me
        self.links: dict[LinkKey, Link] = {}

    def create(self, plan: list[LinkKey], ids: list[Any]) -> None:
        """Creates this process's communicators, in the plan's (global, sorted) order. Blocks
        until each peer has created its end: run it in a thread."""
        import cupy
        from cupy.cuda import nccl

        for key, uid in zip(plan, ids, strict=True):
            src, src_dev, dst, dst_dev = key
            if self.me not in (src, dst):
                continue
            sending = self.me == src
            dev = parse_device(src_dev if sending else dst_dev).index
            comm_id = bytes(uid) if isinstance(uid, bytes | bytearray) else tuple(uid)
            with cupy.cuda.Device(dev):
                comm = nccl.NcclCommunicator(2, comm_id, 0 if sending else 1)
            self.links[key] = Link(key, comm, sending)

    def outgoing(self, src_dev: str, dst: int, dst_dev: str) -> Link | None:
        """The link that carries this process's tensors from ``src_dev`` to ``dst``'s device."""
        return self.links.get((self.me, src_dev, dst, dst_dev))

    def incoming(self, src: int, src_dev: str, dst_dev: str) -> Link | None:
        """The link that brings ``src``'s tensors to this process's ``dst_dev``."""
        return self.links.get((src, src_dev, self.me, dst_dev))

    def close(self) -> None:
        # a copy: an abandoned create() may still be adding links in its thread
        for link in list(self.links.values()):
            try:
                link.comm.destroy()
            except Exception:  # noqa: BLE001 - tearing down after a failure: nothing to add
                pass
        self.links.clear()


async def open_links(me: int, plan: list[Any], ids: list[Any]) -> NcclLinks | None:
    """Process ``me``'s ends of the links of ``plan`` (None when the plan is empty), created in
    the plan's order with the driver's ``ids``; each waits for its peer's end (bound the wait
    with ``anyio.fail_after``). On failure, or cancelled, the ends created so far are destroyed."""
    if not plan:
        return None
    plan = [(int(a), str(b), int(c), str(d)) for a, b, c, d in plan]  # lists, from the wire
    links = NcclLinks(me)
    try:
        await anyio.to_thread.run_sync(links.create, plan, ids, abandon_on_cancel=True)
    except BaseException:
        links.close()
        raise
    return links


class LinkedShare(Share):
    """The part in a run of a process of a cluster: it opens its ends of the run's NCCL links
    (``plan``, created with the driver's ``ids``) before its actors serve, waiting at most
    ``timeout`` seconds for the peers' ends, and closes them when the run ends. The run keeps
    them as ``run.nccl``."""

    def __init__(self, me: int, plan: list[Any], ids: list[Any], timeout: float) -> None:
        self.me = me
        self.plan = plan
        self.ids = ids
        self.timeout = timeout

    async def begin(self, run: Any) -> None:
        # every process creates its ends of the links now, in the same order
        with anyio.fail_after(self.timeout):
            run.nccl = await open_links(self.me, self.plan, self.ids)

    def close(self, run: Any) -> None:
        links = getattr(run, "nccl", None)
        if links is not None:
            links.close()
