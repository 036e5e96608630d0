"""Connecting to Ray: an in-process local instance by default, or an existing cluster (``ray.address``,
or the one a Ray job runs on)."""

from __future__ import annotations

import logging
import os

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
    if address is None and os.environ.get("RAY_ADDRESS"):
        # A Ray job's driver (``ray job submit``), or RAY_ADDRESS set by hand: that cluster, as
        # ray.init() itself would choose, whatever the config says.
        ray.init(namespace=namespace)
    elif address is None:
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


def ships_working_dir() -> bool:
    """Whether this Ray job ships a working directory (``ray job submit --working-dir``): every
    actor then runs in its own copy of it on its own node, so relative paths hold everywhere."""
    return bool(ray.get_runtime_context().runtime_env.get("working_dir"))
