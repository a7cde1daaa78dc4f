"""Actor graphs across processes and machines.

A cluster is handed to a :class:`~asyncnn.Trainer` (``cluster=``) or to
:func:`~asyncnn.open_run`; nodes are placed with ``g.layer(..., worker=i)``. Workers exchange
tensors over TCP (a msgpack header, then the raw bytes; never pickle), authenticated by a
per-run token.

- :class:`LocalCluster`: worker processes on this host.
- :class:`RayCluster`: workers placed by Ray (``pip install "asyncnn[ray]"``), on this machine or
  across a Ray cluster.
"""

from ._cluster._base import Cluster
from ._cluster._local import LocalCluster
from ._cluster._ray import RayCluster
from ._cluster._wire import AuthenticationError, ProtocolError

__all__ = ["AuthenticationError", "Cluster", "LocalCluster", "ProtocolError", "RayCluster"]
