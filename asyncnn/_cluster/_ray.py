"""Workers placed by Ray: each worker is a Ray actor with its CPUs and GPUs.

Ray places and supervises the workers; the data between them still goes over asyncnn's own TCP
connections (Ray's object store never carries a tensor of a run).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ._base import Cluster

__all__ = ["RayCluster"]

log = logging.getLogger("asyncnn.cluster")


class _RayWorker:
    """The body of one Ray actor: runs an asyncnn worker until the driver lets it go."""

    def serve(
        self,
        host: str,
        port: int,
        index: int,
        token: bytes,
        bind: str,
        max_bytes: int,
        paths: list[str],
    ) -> None:
        from ._worker import run_worker

        advertise = bind
        if bind in ("0.0.0.0", "::"):
            import ray

            advertise = ray.util.get_node_ip_address()
        run_worker(host, port, index, token, bind, advertise, max_bytes, paths)


_warned = False


def _warn_ray_listens() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "RayCluster started a local Ray instance: asyncnn's own connections listen on "
            "loopback, but Ray's services (GCS, raylet, object manager, workers' gRPC servers) "
            "listen on every network interface, which Ray 2.60 offers no way to change; on a "
            "host reachable from untrusted machines, firewall them (see docs/security.md)"
        )


class RayCluster(Cluster):
    """``workers`` asyncnn workers, each a Ray actor with ``gpus_per_worker`` GPUs.

    Example:
        >>> cluster = ann.cluster.RayCluster(workers=2, gpus_per_worker=1)
        >>> tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(8),
        ...                  cluster=cluster)

    Needs ``pip install "asyncnn[ray]"``. With ``address=None`` it joins the Ray instance this
    process already has, or starts a local one (stopped again by :meth:`close`); give
    ``address="auto"`` or ``"ray://..."`` to use an existing Ray cluster. For workers on other
    machines, listen on a routable address: ``host="0.0.0.0"`` (the driver then tells the
    workers its node's IP). A worker sees only its own GPUs (Ray sets
    ``CUDA_VISIBLE_DEVICES``), so its nodes use ``device="cuda:0"`` and up.

    Security: asyncnn's connections (driver, workers) listen on ``host`` (loopback by default)
    and admit only holders of the run's token. Ray's own services are Ray's: in Ray 2.60 they
    listen on every network interface whatever is asked (``ray.init`` resolves a loopback node
    address to the routable one), and Ray authenticates nothing. Run Ray only where the
    network is trusted, or firewall its ports; docs/security.md shows how.

    Args:
        workers: how many workers.
        gpus_per_worker: GPUs Ray reserves for each worker (a number >= 0; a fraction shares
            one).
        cpus_per_worker: CPUs Ray reserves for each worker (a number >= 0).
        address: the Ray cluster to use (see above): None, ``"auto"`` or ``"ray://..."``.
        **options: see :class:`~asyncnn.cluster.Cluster`.
    """

    def __init__(
        self,
        workers: int,
        gpus_per_worker: float = 0,
        cpus_per_worker: float = 1,
        address: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(workers, **options)
        # checked here, by their own names: Ray's refusal came at the first fit, naming its
        # num_cpus or num_gpus
        self.gpus_per_worker = _check_resource("gpus_per_worker", gpus_per_worker)
        self.cpus_per_worker = _check_resource("cpus_per_worker", cpus_per_worker)
        if address is not None and not isinstance(address, str):
            raise TypeError(
                f"RayCluster(address=...) takes None (this process's Ray, or a local one), "
                f'"auto" or a "ray://host:port" str, got {address!r:.40}'
            )
        self.address = address
        self._actors: list[Any] = []
        self._refs: list[Any] = []
        self._owns_ray = False

    def _launch(self, host: str, port: int, token: bytes) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ImportError(
                'RayCluster needs Ray: pip install "asyncnn[ray]" (or pip install ray)'
            ) from exc
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                include_dashboard=False,  # no web UI (it would take jobs from anyone who can reach it)
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            self._owns_ray = True
            if self.address is None:
                _warn_ray_listens()
        connect_host = host
        if host in ("0.0.0.0", "::"):
            connect_host = ray.util.get_node_ip_address()
        from ._worker import driver_paths

        paths = driver_paths()
        remote = ray.remote(_RayWorker)
        self._actors = [
            remote.options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker).remote()
            for _ in range(self.workers)
        ]
        self._refs = [
            a.serve.remote(connect_host, port, i, token, host, self.max_message_bytes, paths)
            for i, a in enumerate(self._actors)
        ]

    def _fate(self, index: int) -> str:
        if index >= len(self._refs):
            return ""
        import ray

        ref = self._refs[index]
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            return ""
        try:
            ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the fate, in words
            return f"the Ray actor failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return "the Ray actor returned"

    def _unheard(self, index: int) -> str:
        # Ray keeps an actor it cannot place pending without a word: say when the workers ask
        # more than the whole Ray cluster has (an autoscaler may still add nodes: not an error)
        try:
            import ray

            total = ray.cluster_resources()
        except Exception:  # noqa: BLE001 - only a hint: without it, the plain words
            return "no word"
        short = [
            f"the {self.workers} workers need {need * self.workers:g} {word} in all "
            f"({option}={need:g}), and the Ray cluster has {total.get(key, 0):g}"
            for word, key, option, need in (
                ("CPUs", "CPU", "cpus_per_worker", self.cpus_per_worker),
                ("GPUs", "GPU", "gpus_per_worker", self.gpus_per_worker),
            )
            if need * self.workers > total.get(key, 0)
        ]
        if not short:
            return "no word"
        return f"no word: Ray may be unable to place it: {'; '.join(short)}"

    def _terminate(self) -> None:
        # a start that failed after ray.init (making an actor raised) has no actors, but the
        # local Ray it started is to be stopped all the same
        if self._actors:
            import ray

            if self._refs:
                ray.wait(self._refs, num_returns=len(self._refs), timeout=2.0)
            for a in self._actors:
                ray.kill(a)
        self._actors, self._refs = [], []
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False


def _check_resource(option: str, value: Any) -> float:
    """``value`` as a Ray resource quantity (a finite number >= 0), or an error naming
    ``option``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        raise TypeError(
            f"RayCluster({option}=...) takes a number >= 0 (what Ray reserves for each worker), "
            f"got {value!r:.40} (of type {type(value).__name__})"
        )
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"RayCluster({option}=...) must be a finite number >= 0 (what Ray reserves for each "
            f"worker; fractions share one), got {value!r}"
        )
    return int(value) if float(value).is_integer() else float(value)
