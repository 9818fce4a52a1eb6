"""Optimizers for float16/bfloat16 parameters without a float32 master copy.

Each transform upcasts param, grad and moments to float32, does the whole step in
float32 (``eps`` included, so ``1e-8`` never underflows as in optax#1755) and
rounds the new parameter to its own dtype exactly once, to nearest or
stochastically. Moments are float32 by default; ``moment_dtype`` sets both.

Update convention (why not optax's default): optax transforms return updates in
the param dtype, and ``optax.apply_updates`` then computes ``p + u`` in float16,
a second rounding that loses every update below half an ulp of ``p``. Here
``update`` returns **float32** updates ``u = new_p - p`` where ``new_p`` is the
already-rounded new parameter, so ``(p.astype(f32) + u).astype(p.dtype)`` is
exactly ``new_p`` (the float32 sum is within a float32 ulp of ``new_p``, which is
representable in ``p.dtype``, so the cast returns it). :func:`apply_updates` does
that add explicitly: it also works under strict dtype promotion and rejects
low-precision updates that would round twice. (Under JAX's default promotion
``optax.apply_updates`` computes the same, since ``p + u`` promotes to float32.) Our transform must therefore be the *last* one in an ``optax.chain``
(gradient transforms such as ``clip_by_global_norm`` go before it). Under
``jax.jit`` the float32 updates are fused into the add and never materialised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsjax.ops.adam_update import adam_scalars, adam_step_reference, leaf_scalars
from lsjax.ops.adam_update_multi import adam_update_multi
from lsjax.optim._rounding import ROUNDINGS, round_to

_F32 = jnp.float32
PARAM_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
ScalarOrSchedule = float | jax.Array | optax.Schedule
MaskOrFn = Any | Callable[[optax.Params], Any] | None


class AdamState(NamedTuple):
    """State of :func:`adam`/:func:`adamw`: step count, moments, rounding key."""

    count: jax.Array  # int32 [], updates applied so far
    mu: optax.Updates  # first moment, moment_dtype, shaped like params
    nu: optax.Updates  # second moment, moment_dtype
    key: jax.Array | None  # uint32 key data for stochastic rounding, else None


class ParamsWriter(optax.GradientTransformationExtraArgs):
    """A transform that can write the new params itself: its ``update`` also takes
    ``params_out=True`` and then returns ``(new_params, new_state)`` instead of updates.

    :func:`apply_gradients` uses that path, so a fused kernel updates params and moments
    in place (no float32 update tree, no separate ``p + u`` pass per leaf).
    """


class GatedTransformation(ParamsWriter):
    """An lsjax transform whose ``update`` also takes two keyword arguments, so that
    :func:`lsjax.optim.loss_scaled` hands it the loss-scaling work to fuse:

    * ``grad_scale``: float32 scalar multiplying every gradient inside the update
      (``1 / loss_scale``), instead of a separate unscaled copy of the gradients;
    * ``finite``: bool scalar; False makes the step a no-op (zero updates, state
      unchanged), selected on the device: no ``lax.cond``, whose predicate XLA:GPU
      copies to the host, stalling the step until the backward pass is done.

    and ``params_out`` (:class:`ParamsWriter`).
    """


def _gate(finite: jax.Array | None, new, old):
    """``new`` where ``finite`` (leaf by leaf), else ``old``; ``new`` when ``finite`` is None."""
    if finite is None:
        return new
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def _grad_scale(grad_scale: jax.Array | None) -> jax.Array:
    return jnp.float32(1.0) if grad_scale is None else jnp.asarray(grad_scale, _F32)


class LionState(NamedTuple):
    """State of :func:`lion`."""

    count: jax.Array
    mu: optax.Updates
    key: jax.Array | None


def apply_updates(params: optax.Params, updates: optax.Updates) -> optax.Params:
    """``(p.astype(float32) + u).astype(p.dtype)`` for every leaf: one rounding.

    Use it with the lsjax transforms, whose float32 ``updates`` are chosen so the
    result is exactly the new parameter they computed (rounded once). Raises
    if an update leaf is narrower than float32 for a low-precision param.
    """

    def add(p, u):
        if p is None:
            return None
        if jnp.dtype(p.dtype) != jnp.dtype(_F32) and jnp.dtype(u.dtype) != jnp.dtype(_F32):
            raise TypeError(
                f"lsjax.optim.apply_updates: update of dtype {u.dtype} for a {p.dtype} param would round "
                "twice; produce float32 updates (the lsjax optimizers do) or use optax.apply_updates"
            )
        return (p.astype(_F32) + u.astype(_F32)).astype(p.dtype)

    return jax.tree.map(add, params, updates, is_leaf=lambda x: x is None)


def apply_gradients(tx: optax.GradientTransformation, grads: optax.Updates, state: optax.OptState,
                    params: optax.Params) -> tuple[optax.Params, optax.OptState]:
    """``(new_params, new_state)`` of one step of ``tx``.

    A :class:`ParamsWriter` (the lsjax transforms, and :func:`lsjax.optim.loss_scaled`
    around one) writes the new params itself; any other transform goes through
    ``tx.update`` and :func:`apply_updates`.
    """
    if isinstance(tx, ParamsWriter):
        return tx.update(grads, state, params, params_out=True)
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def _result(params_out: bool, params: optax.Params, updates: optax.Updates, state: optax.OptState):
    """``(new_params, state)`` when ``params_out``, else ``(updates, state)``."""
    return (apply_updates(params, updates), state) if params_out else (updates, state)


def _check_params(params: optax.Params, who: str) -> None:
    """TypeError naming the first leaf that is not float16, bfloat16 or float32."""
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        if jnp.dtype(p.dtype) not in PARAM_DTYPES:
            raise TypeError(
                f"{who}: parameter {jax.tree_util.keystr(path)} has dtype {p.dtype}; lsjax optimizers "
                "take float16, bfloat16 or float32 params (cast it, or mask it out with optax.masked)"
            )


def _learning_rate(learning_rate: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(lr, _F32)


def _decay_mask(mask: MaskOrFn, params: optax.Params) -> list[bool]:
    """One bool per param leaf: whether weight decay applies to it."""
    n = len(jax.tree.leaves(params))
    if mask is None:
        return [True] * n
    tree = mask(params) if callable(mask) else mask
    flags = [bool(f) for f in jax.tree.leaves(tree)]
    if len(flags) != n:
        raise ValueError(f"weight decay mask has {len(flags)} leaves but params have {n}")
    return flags


def _check_options(who: str, moment_dtype, rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"{who}: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if jnp.dtype(moment_dtype) not in PARAM_DTYPES:
        raise TypeError(f"{who}: moment_dtype must be float32, bfloat16 or float16, got {moment_dtype}")


def _init_key(rounding: str, seed: int) -> jax.Array | None:
    return jax.random.key_data(jax.random.key(seed)) if rounding == "stochastic" else None


def _finish(params: list, steps32: list, key: jax.Array | None, count: jax.Array) -> list:
    """float32 updates ``round(p + step) - p`` (see the module docstring), leaf by leaf."""
    step_key = None if key is None else jax.random.fold_in(jax.random.wrap_key_data(key), count)
    out = []
    for i, (p, step) in enumerate(zip(params, steps32)):
        if jnp.dtype(p.dtype) == jnp.dtype(_F32):
            out.append(step)  # p + step rounds once, in float32
            continue
        leaf_key = None if step_key is None else jax.random.fold_in(step_key, i)
        p32 = p.astype(_F32)
        out.append(round_to(p32 + step, p.dtype, leaf_key).astype(_F32) - p32)
    return out


def _bias_correction(decay: float, count: jax.Array) -> jax.Array:
    """``1 - decay ** count`` as ``-expm1(count * log(decay))``, ``log`` taken in float64.

    The direct float32 form cancels catastrophically for ``decay`` near 1
    (``1 - 0.999 ** 3`` loses ~4 digits), which optax's form does.
    """
    return -jnp.expm1(count.astype(_F32) * np.float32(np.log(decay)))


def _unflatten(treedef, *leaf_lists):
    return tuple(jax.tree.unflatten(treedef, leaves) for leaves in leaf_lists)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: MaskOrFn = None,
    moment_dtype: Any = jnp.float32,
    rounding: str = "nearest",
    seed: int = 0,
    kernel: str = "xla",
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) for float16/bfloat16/float32 params, float32 math.

    Same step as ``optax.adamw`` (``u = -lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``)
    but computed in float32 and rounded once to each param's dtype.

    Args:
      learning_rate: a float or an optax schedule of the update count.
      b1, b2, eps: Adam constants (``eps`` is applied in float32).
      weight_decay: decoupled decay rate, multiplied by the learning rate.
      mask: pytree of bools (or a function of params giving one): which leaves decay.
      moment_dtype: dtype of both moments (float32 default, bfloat16 halves their memory).
      rounding: ``"nearest"`` or ``"stochastic"`` rounding of the new param;
        stochastic draws from a key in the state folded with the step count
        (deterministic, reproducible).
      seed: seed of that key.
      kernel: ``"xla"`` (default): each leaf's float32 update is jnp that XLA fuses into
        one elementwise kernel; ``"multi"``: all leaves in one
        :func:`lsjax.ops.adam_update_multi` call (one launch per dtype pair; float32
        moments and nearest rounding only), which through :func:`apply_gradients`
        updates params and moments in place and, for a skipped step, writes nothing.

    Returns:
      A :class:`GatedTransformation` whose ``update(grads, state, params)`` needs
      ``params`` and returns float32 updates for :func:`apply_updates` (or, with
      ``params_out=True``, the new params).
    """
    who = "lsjax.optim.adamw"
    _check_options(who, moment_dtype, rounding)
    if kernel not in ("xla", "multi"):
        raise ValueError(f"{who}: kernel must be 'xla' or 'multi', got {kernel!r}")
    if kernel == "multi" and (jnp.dtype(moment_dtype) != jnp.dtype(_F32) or rounding != "nearest"):
        raise ValueError(f"{who}: kernel='multi' takes float32 moments and nearest rounding")

    def init(params):
        _check_params(params, who)
        zeros = lambda p: jnp.zeros(p.shape, moment_dtype)  # noqa: E731
        return AdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                         jax.tree.map(zeros, params), _init_key(rounding, seed))

    def update(grads, state, params=None, *, grad_scale=None, finite=None, params_out=False, **extra_args):
        if params is None:
            raise ValueError(f"{who}: update needs params (it computes the new params itself)")
        _check_params(params, who)
        p_leaves, treedef = jax.tree.flatten(params)
        g_leaves = treedef.flatten_up_to(grads)
        m_leaves, v_leaves = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        count = optax.safe_increment(state.count)
        lr = _learning_rate(learning_rate, state.count)
        bc1, bc2 = _bias_correction(b1, count), _bias_correction(b2, count)
        decays = _decay_mask(mask, params)
        scalars = adam_scalars(lr, b1, b2, eps, weight_decay, bc1, bc2, _grad_scale(grad_scale))
        if kernel == "multi":  # the kernel rounds each param once and, for a skipped step, writes nothing
            new_ps, new_m, new_v = adam_update_multi(p_leaves, g_leaves, m_leaves, v_leaves, scalars, decays,
                                                     apply=finite)
            new_params, mu, nu = _unflatten(treedef, new_ps, new_m, new_v)
            new_state = AdamState(count if finite is None else jnp.where(finite, count, state.count), mu, nu,
                                  state.key)
            if params_out:
                return new_params, new_state
            steps = [n.astype(_F32) - p.astype(_F32) for n, p in zip(new_ps, p_leaves)]  # exact: one rounding
            return jax.tree.unflatten(treedef, steps), new_state
        out = [adam_step_reference(p, g, m, v, leaf_scalars(scalars, d))
               for p, g, m, v, d in zip(p_leaves, g_leaves, m_leaves, v_leaves, decays)]
        steps = [o[0] for o in out]
        new_m = [o[1].astype(moment_dtype) for o in out]
        new_v = [o[2].astype(moment_dtype) for o in out]
        updates = _finish(p_leaves, steps, state.key, state.count)
        updates, mu, nu = _unflatten(treedef, updates, new_m, new_v)
        new_state = _gate(finite, AdamState(count, mu, nu, state.key), state)
        return _result(params_out, params, _gate(finite, updates, jax.tree.map(jnp.zeros_like, updates)), new_state)

    return GatedTransformation(init, update)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    moment_dtype: Any = jnp.float32,
    rounding: str = "nearest",
    seed: int = 0,
    kernel: str = "xla",
) -> optax.GradientTransformation:
    """Adam (no weight decay); :func:`adamw` with ``weight_decay=0``."""
    return adamw(learning_rate, b1, b2, eps, 0.0, moment_dtype=moment_dtype, rounding=rounding, seed=seed,
                 kernel=kernel)


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    *,
    mask: MaskOrFn = None,
    moment_dtype: Any = jnp.float32,
    rounding: str = "nearest",
    seed: int = 0,
) -> optax.GradientTransformation:
    """Lion (Chen et al. 2023) with float32 math; same step as ``optax.lion``.

    ``u = -lr * (sign(b1 * m + (1 - b1) * g) + wd * p)``, ``m <- b2 * m + (1 - b2) * g``.
    Arguments as :func:`adamw` (Lion has no ``eps``); one moment.
    """
    who = "lsjax.optim.lion"
    _check_options(who, moment_dtype, rounding)

    def init(params):
        _check_params(params, who)
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, moment_dtype), params)
        return LionState(jnp.zeros([], jnp.int32), mu, _init_key(rounding, seed))

    def update(grads, state, params=None, *, grad_scale=None, finite=None, params_out=False, **extra_args):
        if params is None:
            raise ValueError(f"{who}: update needs params (it computes the new params itself)")
        _check_params(params, who)
        p_leaves, treedef = jax.tree.flatten(params)
        g_leaves, m_leaves = treedef.flatten_up_to(grads), treedef.flatten_up_to(state.mu)
        lr = _learning_rate(learning_rate, state.count)
        steps, new_m = [], []
        for p, g, m, decays in zip(p_leaves, g_leaves, m_leaves, _decay_mask(mask, params)):
            p32, g32, m32 = p.astype(_F32), g.astype(_F32) * _grad_scale(grad_scale), m.astype(_F32)
            direction = jnp.sign((1.0 - b1) * g32 + b1 * m32)
            if decays:
                direction = direction + weight_decay * p32
            steps.append(-lr * direction)
            new_m.append(((1.0 - b2) * g32 + b2 * m32).astype(moment_dtype))
        updates = _finish(p_leaves, steps, state.key, state.count)
        updates, mu = _unflatten(treedef, updates, new_m)
        new_state = _gate(finite, LionState(optax.safe_increment(state.count), mu, state.key), state)
        return _result(params_out, params, _gate(finite, updates, jax.tree.map(jnp.zeros_like, updates)), new_state)

    return GatedTransformation(init, update)
