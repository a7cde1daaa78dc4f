"""Messages: what actors send each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BACKWARD", "END", "FORWARD", "STOP", "Message"]

FORWARD = "forward"
BACKWARD = "backward"
END = "end"  # no more keys after meta["total"]: continuous orders cool down
STOP = "stop"  # the run is over: the actor returns


@dataclass(slots=True)
class Message:
    """One message between actors.

    Attributes:
        kind: ``"forward"``, ``"backward"``, or a control kind (``"end"``, ``"stop"``).
        key: the unit of work it belongs to.
        version: the sender's parameter version when it computed ``tensors``.
        src: the sending node; ``dst``: the receiving node.
        slot: for a forward, the receiver's input slot; for a backward, the index of the edge in
            the receiver's list of consumers (so fan-out gradients add up in a fixed order).
        tensors: the arrays carried (one for forward and backward messages).
        meta: small msgpack-able facts: ``rows`` of this key, ``mb_rows`` and ``mb_keys`` of its
            minibatch, ``minibatch`` index.
    """

    kind: str
    key: int
    version: int
    src: str
    dst: str
    slot: int
    tensors: tuple[Any, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    #: the CUDA event recorded after the kernels that produced ``tensors`` (None on the CPU):
    #: the consumer's stream waits on it before reading them
    event: Any = None
