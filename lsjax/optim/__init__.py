"""Optimizers for float16/bfloat16 params (float32 math, one rounding) and loss scaling.

Usage (float16)::

    tx = optim.loss_scaled(optax.chain(optax.clip_by_global_norm(1.0),
                                       optim.adamw(optim.inverse_sqrt_schedule(1e-3, 4000))),
                           optim.DynamicLossScale.create(2.0 ** 15))
    grads = jax.grad(lambda p: opt_state.loss_scale.scale(loss_fn(p, batch)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optim.apply_updates(params, updates)

or, letting an lsjax transform write the params itself (in place with ``kernel="multi"``)::

    params, opt_state = optim.apply_gradients(tx, grads, opt_state, params)
"""

from lsjax.optim.loss_scale import (
    DynamicLossScale,
    LossScale,
    LossScaleState,
    NoOpLossScale,
    all_finite,
    loss_scaled,
)
from lsjax.optim.memory import state_bytes_per_param
from lsjax.optim.schedules import inverse_sqrt_schedule
from lsjax.optim.transform import (
    AdamState,
    GatedTransformation,
    LionState,
    ParamsWriter,
    adam,
    adamw,
    apply_gradients,
    apply_updates,
    lion,
)

__all__ = [
    "AdamState",
    "DynamicLossScale",
    "GatedTransformation",
    "LionState",
    "LossScale",
    "LossScaleState",
    "NoOpLossScale",
    "ParamsWriter",
    "adam",
    "adamw",
    "all_finite",
    "apply_gradients",
    "apply_updates",
    "inverse_sqrt_schedule",
    "lion",
    "loss_scaled",
    "state_bytes_per_param",
]
