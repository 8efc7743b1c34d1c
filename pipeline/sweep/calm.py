"""Dask settings for a sweep's cluster: its tasks wait seconds to hours, not milliseconds.

Dask's defaults suit tasks of milliseconds; a sweep's tasks wait seconds to hours on a run's process. Left
as they are, each process samples its threads' stacks 100 times a second for the profile page, checks its
event loop 50 times a second and its memory 10 times: an idle local cluster of 2 workers burns about a
fifth of a core, the CPU of a short run every half minute.

A LocalCluster's workers inherit :data:`CALM` from the sweep's process (``dask.config.set``). Workers
started elsewhere (a SLURM job, ``dask worker`` by hand) read their own configuration: they get the same
settings as the ``DASK_*`` environment variables of :func:`calm_environ`.
"""

from __future__ import annotations

CALM = {
    "distributed.worker.profile.enabled": False,  # the worker threads only wait for a run's process to exit
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def calm_environ() -> dict[str, str]:
    """:data:`CALM` as environment variables: ``DASK_`` and the key, ``__`` between its parts.

    Dask reads them at import (``dask.config.collect_env``), and treats ``_`` and ``-`` in a key alike.
    """
    return {"DASK_" + key.replace(".", "__").replace("-", "_").upper(): str(value) for key, value in CALM.items()}
