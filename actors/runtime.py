"""Connecting to Ray: an in-process local instance by default, or an existing cluster."""

from __future__ import annotations

import logging

import ray

log = logging.getLogger(__name__)


def init_ray(
    address: str | None,
    num_cpus: int,
    object_store_memory_mb: int,
    namespace: str,
) -> dict:
    """Start (address None) or join (address given) Ray once per process; return its context."""
    if not ray.is_initialized():
        _start_or_join(address, num_cpus, object_store_memory_mb, namespace)
    context = ray.get_runtime_context()
    info = {"job_id": context.get_job_id(), "node_id": context.get_node_id(), "namespace": namespace}
    log.info("ray ready: %s", info)
    return info


def _start_or_join(address: str | None, num_cpus: int, object_store_memory_mb: int, namespace: str) -> None:
    if address is None:
        # Explicit, small resources: Ray would otherwise size itself from the whole machine.
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_memory_mb * 1024 * 1024,
            include_dashboard=False,
            namespace=namespace,
            log_to_driver=True,
        )
    else:
        ray.init(address=address, namespace=namespace)
