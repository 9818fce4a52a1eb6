"""The train state and the jit-able train / eval steps of a seq2seq Transformer."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lsjax import ops, optim
from lsjax.parallel import ShardingPlan

Batch = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything a step reads and writes; all leaves are arrays (checkpointed as one pytree).

    ``opt_state`` is a :class:`lsjax.optim.LossScaleState` (loss scale and skipped-step count
    inside); ``rng`` is raw key data (uint32[2]) so it checkpoints as a plain array.
    """

    step: jax.Array
    params: Any
    opt_state: optim.LossScaleState
    rng: jax.Array


def token_loss(model, params: Any, batch: Batch, *, label_smoothing: float, deterministic: bool,
               dropout_key: jax.Array | None = None,
               plan: ShardingPlan | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed label-smoothed token loss (float32 scalar) and the count of target tokens (int32).

    Under ``plan`` the logits are pinned to ``(batch, length, vocab)``: with tensor parallelism
    they stay split over the vocabulary and the fused cross-entropy runs vocab-parallel.
    """
    rngs = None if deterministic else {"dropout": dropout_key}
    logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], deterministic=deterministic,
                         rngs=rngs)
    if plan is not None:
        logits = plan.constrain(logits, ("batch", "length", "vocab"))
    loss, count = ops.cross_entropy(logits, batch["tgt_out"], label_smoothing=label_smoothing, ignore_id=0)
    return loss.sum(), count


def make_train_step(model, optimizer: optax.GradientTransformation, *, label_smoothing: float,
                    plan: ShardingPlan | None = None,
                    token_loss_fn: Callable = token_loss) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimisation step: dropout key from the state, (scaled) mean token loss, grads in the
    params' dtype; ``optimizer`` (wrapped by :func:`lsjax.optim.loss_scaled`) unscales, checks for
    inf/NaN (over all shards: one global decision) and skips such steps.

    ``plan``: under a mesh, the gradients are pinned to ``plan.grads`` (ZeRO-2/3) and the
    update runs on ``plan.update`` slices (ZeRO >= 1); jit the step with ``plan.jit``.
    ``token_loss_fn`` has :func:`token_loss`'s signature (the benchmarks swap in a plain optax loss).
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng, dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))

        def loss_fn(params):
            total, count = token_loss_fn(model, params, batch, label_smoothing=label_smoothing,
                                         deterministic=False, dropout_key=dropout_key, plan=plan)
            mean = total / jnp.maximum(count, 1).astype(jnp.float32)
            return state.opt_state.loss_scale.scale(mean), (mean, count)

        grads, (loss, count) = jax.grad(loss_fn, has_aux=True)(state.params)
        params = state.params
        if plan is not None:
            grads, params = plan.for_update(plan.constrain_grads(grads)), plan.for_update(params)
        new_params, opt_state = optim.apply_gradients(optimizer, grads, state.opt_state, params)
        new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                                  rng=jax.random.key_data(rng))
        metrics = {"loss": loss, "tokens": count, "skipped_steps": opt_state.skipped_steps,
                   "loss_scale": state.opt_state.loss_scale.loss_scale}
        return new_state, metrics

    return train_step


def make_eval_step(model, plan: ShardingPlan | None = None) -> Callable[[Any, Batch], dict]:
    """Summed token NLL (no smoothing) and token count of one batch, dropout off."""

    def eval_step(params: Any, batch: Batch) -> dict:
        total, count = token_loss(model, params, batch, label_smoothing=0.0, deterministic=True, plan=plan)
        return {"nll_sum": total, "tokens": count}

    return eval_step
