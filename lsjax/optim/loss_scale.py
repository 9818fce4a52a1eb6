"""Dynamic loss scaling for float16 training, and the transform that applies it.

The train step multiplies the loss by the current scale before ``jax.grad``; the
:func:`loss_scaled` transform then unscales the gradients in float32, checks them
for inf/NaN over every leaf (:func:`lsjax.ops.all_finite`: one multi-tensor check;
sharded gradients are checked shard by shard and one flag is all-reduced) and either runs the inner
transform or skips the step: params, moments and the inner step count stay
unchanged and the scale is divided by ``factor``. After ``period`` clean steps
in a row the scale is multiplied by ``factor``. bfloat16 needs no scaling: use
:class:`NoOpLossScale` (non-finite steps are still skipped and counted).

``min_loss_scale``/``max_loss_scale``/``period``/``factor`` are static fields of the
pytree (its treedef), so they survive ``jax.jit`` round trips (unlike jmp#44).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lsjax import ops
from lsjax.optim.transform import GatedTransformation, ParamsWriter

_F32 = jnp.float32


def all_finite(tree) -> jax.Array:
    """bool scalar: every element of every leaf is finite (:func:`lsjax.ops.all_finite`:
    one check for all leaves on the FFI backends, a reduction per leaf on ``"xla"``)."""
    return ops.all_finite(jax.tree.leaves(tree))


@struct.dataclass
class DynamicLossScale:
    """Loss scale that halves on overflow and grows after ``period`` finite steps.

    Create with ``DynamicLossScale.create(2.0 ** 15)``. ``loss_scale`` (float32 [])
    and ``counter`` (int32 [], finite steps since the last change) are traced;
    the bounds and schedule are static.
    """

    loss_scale: jax.Array
    counter: jax.Array
    period: int = struct.field(pytree_node=False, default=2000)
    factor: float = struct.field(pytree_node=False, default=2.0)
    min_loss_scale: float = struct.field(pytree_node=False, default=1.0)
    max_loss_scale: float = struct.field(pytree_node=False, default=2.0 ** 24)

    @classmethod
    def create(cls, initial_scale: float = 2.0 ** 15, *, period: int = 2000, factor: float = 2.0,
               min_loss_scale: float = 1.0, max_loss_scale: float = 2.0 ** 24) -> "DynamicLossScale":
        if not 0 < min_loss_scale <= initial_scale <= max_loss_scale:
            raise ValueError(
                f"DynamicLossScale: need 0 < min_loss_scale <= initial_scale <= max_loss_scale, got "
                f"{min_loss_scale}, {initial_scale}, {max_loss_scale}")
        if period < 1 or factor <= 1:
            raise ValueError(f"DynamicLossScale: need period >= 1 and factor > 1, got {period}, {factor}")
        return cls(jnp.asarray(initial_scale, _F32), jnp.zeros([], jnp.int32), period, float(factor),
                   float(min_loss_scale), float(max_loss_scale))

    def scale(self, tree):
        """``tree * loss_scale`` (leaves keep their dtype); apply to the loss."""
        return jax.tree.map(lambda x: x * self.loss_scale.astype(x.dtype), tree)

    def unscale(self, tree):
        """``tree / loss_scale`` in float32 (returns float32 leaves)."""
        inv = 1.0 / self.loss_scale
        return jax.tree.map(lambda x: x.astype(_F32) * inv, tree)

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        """The scale for the next step, given whether this step's grads were finite."""
        grown = self.counter + 1 >= self.period
        up = jnp.where(grown, jnp.minimum(self.loss_scale * self.factor, self.max_loss_scale),
                       self.loss_scale)
        down = jnp.maximum(self.loss_scale / self.factor, self.min_loss_scale)
        return self.replace(
            loss_scale=jnp.where(grads_finite, up, down).astype(_F32),
            counter=jnp.where(grads_finite & ~grown, self.counter + 1, 0).astype(jnp.int32),
        )


@struct.dataclass
class NoOpLossScale:
    """Loss scale of 1 for bfloat16/float32 training: scale and unscale are identities."""

    @property
    def loss_scale(self) -> jax.Array:
        return jnp.ones([], _F32)

    def scale(self, tree):
        return tree

    def unscale(self, tree):
        return tree

    def adjust(self, grads_finite: jax.Array) -> "NoOpLossScale":
        del grads_finite
        return self


LossScale = DynamicLossScale | NoOpLossScale


class LossScaleState(NamedTuple):
    """State of :func:`loss_scaled`."""

    inner_state: optax.OptState
    loss_scale: LossScale  # read it in the train step to scale the loss
    skipped_steps: jax.Array  # int32 [], steps skipped for non-finite grads


def loss_scaled(inner: optax.GradientTransformation, loss_scale: LossScale) -> optax.GradientTransformation:
    """Wraps ``inner`` so it receives unscaled gradients and skips non-finite steps.

    ``update(grads, state, params)`` takes the gradients of ``state.loss_scale.scale(loss)``.
    When any gradient element is inf/NaN it returns zero updates and the old
    ``inner_state`` (params, moments and step count unchanged), increments
    ``skipped_steps`` and lowers the scale; otherwise it runs ``inner`` on
    ``loss_scale.unscale(grads)``. Both outcomes are computed and one is selected on the
    device (no ``lax.cond``); an lsjax transform (:class:`GatedTransformation`) does the
    unscaling and the selection inside its own update, and the result is then a
    :class:`lsjax.optim.ParamsWriter` (see :func:`lsjax.optim.apply_gradients`). Put it outermost:
    ``loss_scaled(optax.chain(optax.clip_by_global_norm(1.0), adamw(...)), scale)``.
    """

    def init(params):
        return LossScaleState(inner.init(params), loss_scale, jnp.zeros([], jnp.int32))

    def update(grads, state, params=None, *, params_out=False):
        finite = all_finite(grads)
        if isinstance(inner, GatedTransformation):  # unscaling and skipping fused into its update
            grad_scale = state.loss_scale.unscale(jnp.ones((), _F32))
            updates, inner_state = inner.update(grads, state.inner_state, params, grad_scale=grad_scale,
                                                finite=finite, params_out=params_out)
        else:  # computed either way, then selected on the device (no lax.cond: see GatedTransformation)
            updates, inner_state = inner.update(state.loss_scale.unscale(grads), state.inner_state, params)
            updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
            inner_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), inner_state, state.inner_state)
        new_state = LossScaleState(inner_state, state.loss_scale.adjust(finite),
                                   state.skipped_steps + (~finite).astype(jnp.int32))
        return updates, new_state

    if isinstance(inner, GatedTransformation):  # with params_out=True, inner writes the new params
        return ParamsWriter(init, update)
    return optax.GradientTransformation(init, update)
