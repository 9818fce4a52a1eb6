"""Multi-host start-up.

On several hosts every process must call :func:`maybe_initialize_distributed`
before touching devices. ``jax.distributed.initialize()`` then discovers the
cluster itself: from ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``), or from SLURM (``srun``: ``SLURM_JOB_ID`` with more than
one task), Open MPI, or a Cloud TPU pod. On one host (none of those set) it does nothing.
"""

from __future__ import annotations

import os

import jax

_ENV_MARKERS = ("JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def _multi_process_env() -> bool:
    if any(os.environ.get(k) for k in _ENV_MARKERS):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment describes a multi-process job.

    Returns whether it did. Safe to call on a single host (no-op).
    """
    if not _multi_process_env():
        return False
    jax.distributed.initialize()
    return True
