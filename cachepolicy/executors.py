"""Executors run compare jobs: ``local`` (in-process, default) and ``ray`` (``pip install cachepolicy[ray]``).

An executor takes picklable job payloads and a top-level worker function and yields results as jobs
finish, in any order; the caller appends each to the results file as it arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cachepolicy.errors import CompareConfigError

logger = logging.getLogger(__name__)


class LocalExecutor:
    """Runs jobs one after the other in this process."""

    name = "local"

    def map_unordered(self, worker: Callable[[Any], dict], payloads: Sequence[Any]) -> Iterator[dict]:
        for payload in payloads:
            yield worker(payload)


class RayExecutor:
    """One Ray task per job, each asking for ``gpus_per_job`` GPUs and ``cpus_per_job`` CPUs.

    ``address=None`` starts (or joins) a local Ray instance; ``"auto"`` or ``ray://host:port`` joins a
    cluster. Results stream back as tasks finish.
    """

    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_job: float = 0.0, cpus_per_job: float = 1.0,
                 max_in_flight: int | None = None) -> None:
        try:
            import ray  # noqa: F401 - only checks that Ray is installed
        except ImportError as exc:
            raise CompareConfigError(
                "the ray executor needs Ray: pip install 'cachepolicy[ray]'"
            ) from exc
        self.address = address
        self.gpus_per_job = gpus_per_job
        self.cpus_per_job = cpus_per_job
        self.max_in_flight = max_in_flight

    def map_unordered(self, worker: Callable[[Any], dict], payloads: Sequence[Any]) -> Iterator[dict]:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        remote = ray.remote(num_gpus=self.gpus_per_job, num_cpus=self.cpus_per_job)(worker)
        pending = list(payloads)
        limit = self.max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1) // max(self.cpus_per_job, 1)))
        in_flight = []
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                in_flight.append(remote.remote(pending.pop(0)))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            for ref in done:
                yield ray.get(ref)


def make_executor(name: str, **options: Any) -> LocalExecutor | RayExecutor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**options)
    raise CompareConfigError(f"unknown executor {name!r}; choose 'local' or 'ray'")
