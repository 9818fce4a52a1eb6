"""Learning-rate schedules used by Transformer training."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def inverse_sqrt_schedule(peak_value: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup to ``peak_value``, then decay as ``1/sqrt(step)`` ("Attention is all you need").

    ``lr(count) = peak_value * min(s / warmup_steps, sqrt(warmup_steps / s))`` with
    ``s = count + 1``, so the first update (count 0) already has a non-zero rate and
    the peak is reached at update ``warmup_steps``.
    """
    if warmup_steps < 1:
        raise ValueError(f"inverse_sqrt_schedule: warmup_steps must be >= 1, got {warmup_steps}")

    def schedule(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        return peak_value * jnp.minimum(s / warmup_steps, jnp.sqrt(warmup_steps / s))

    return schedule
