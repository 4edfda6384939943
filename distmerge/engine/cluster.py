"""Connecting to Ray: an embedded local Ray by default, or the cluster the user names.

- no address and no ``RAY_ADDRESS``: start a local Ray sized to this machine (laptop mode);
- ``--ray-address`` or ``RAY_ADDRESS`` (set by ``ray job submit`` inside a job): join it.
"""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Initialise Ray if needed; returns True when this call started or joined it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # No runtime_env here: inside `ray job submit` the job's own runtime env applies, and
        # Ray refuses to start a driver whose runtime env clashes with it.
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        # Workers write results to files, so the object store carries only small payloads.
        store = int(min(2 * 1024**3, max(100 * 1024**2, psutil.virtual_memory().available * 0.05)))
        log.info("starting an embedded local Ray (%d CPUs, %d MB object store)", cpus, store // 2**20)
        ray.init(num_cpus=cpus, object_store_memory=store, include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, log_to_driver=True,
                 configure_logging=False)
    return True


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
