"""Dynamic loss scaling: skip on overflow, growth, static bounds across jit, sharded grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lsjax import ops, optim
from tests.helpers import normal


def _setup(rng, scale=None, dtype=jnp.float16):
    params = {"w": normal(rng, (8, 4), dtype), "b": normal(rng, (4,), dtype)}
    scale = scale or optim.DynamicLossScale.create(2.0 ** 10, period=3)
    tx = optim.loss_scaled(optax.chain(optax.clip_by_global_norm(1.0), optim.adamw(1e-2)), scale)
    return params, tx, tx.init(params)


def _adam_state(state):
    return state.inner_state[1]


def test_unscaled_step_equals_unscaled_optimizer(rng):
    params, tx, state = _setup(rng)
    grads = jax.tree.map(lambda p: normal(rng, p.shape, jnp.float32), params)
    scaled = jax.tree.map(lambda g: (g * 2.0 ** 10).astype(jnp.float16), grads)  # power of 2: exact
    updates, state = jax.jit(tx.update)(scaled, state, params)
    plain = optax.chain(optax.clip_by_global_norm(1.0), optim.adamw(1e-2))
    ref_updates, _ = plain.update(jax.tree.map(lambda g: g.astype(jnp.float16), grads), plain.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.skipped_steps) == 0 and int(state.loss_scale.counter) == 1


def test_skip_on_nan_keeps_params_moments_and_count(rng):
    params, tx, state = _setup(rng)
    update = jax.jit(tx.update)
    grads = jax.tree.map(lambda p: normal(rng, p.shape, p.dtype), params)
    updates, state = update(grads, state, params)
    params = optim.apply_updates(params, updates)
    before = state
    bad = {"w": grads["w"].at[3, 1].set(jnp.inf), "b": grads["b"].at[0].set(jnp.nan)}
    updates, state = update(bad, state, params)
    new_params = optim.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(before.inner_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(_adam_state(state).count) == 1
    assert float(state.loss_scale.loss_scale) == 2.0 ** 9 and int(state.loss_scale.counter) == 0
    assert int(state.skipped_steps) == 1


def test_scale_grows_after_period_clean_steps(rng):
    params, tx, state = _setup(rng)
    update = jax.jit(tx.update)
    scales = []
    for _ in range(7):
        grads = jax.tree.map(lambda p: normal(rng, p.shape, p.dtype), params)
        updates, state = update(grads, state, params)
        params = optim.apply_updates(params, updates)
        scales.append(float(state.loss_scale.loss_scale))
    assert scales == [2.0 ** 10] * 2 + [2.0 ** 11] * 3 + [2.0 ** 12] * 2
    assert int(_adam_state(state).count) == 7 and int(state.skipped_steps) == 0


def test_min_and_max_scale_hold_inside_jit():
    scale = optim.DynamicLossScale.create(8.0, period=1, min_loss_scale=2.0, max_loss_scale=32.0)
    adjust = jax.jit(lambda s, finite: s.adjust(finite))
    for _ in range(10):
        scale = adjust(scale, jnp.array(False))
    assert float(scale.loss_scale) == 2.0 and scale.min_loss_scale == 2.0 and scale.max_loss_scale == 32.0
    for _ in range(10):
        scale = adjust(scale, jnp.array(True))
    assert float(scale.loss_scale) == 32.0 and scale.period == 1


def test_many_overflows_in_a_jitted_loop_stop_at_min(rng):
    params, tx, state = _setup(rng, optim.DynamicLossScale.create(2.0 ** 4, period=2, min_loss_scale=1.0))
    nan_grads = jax.tree.map(lambda p: jnp.full(p.shape, jnp.nan, p.dtype), params)
    state = jax.jit(lambda s: jax.lax.fori_loop(0, 20, lambda i, s: tx.update(nan_grads, s, params)[1], s))(state)
    assert float(state.loss_scale.loss_scale) == 1.0 and int(state.skipped_steps) == 20
    assert int(_adam_state(state).count) == 0


def test_noop_loss_scale_for_bf16_still_skips_nonfinite(rng):
    params, tx, state = _setup(rng, optim.NoOpLossScale(), jnp.bfloat16)
    grads = jax.tree.map(lambda p: normal(rng, p.shape, p.dtype), params)
    assert optim.NoOpLossScale().scale(grads) is grads
    _, state = tx.update(grads, state, params)
    _, state = tx.update({**grads, "b": grads["b"].at[1].set(jnp.inf)}, state, params)
    assert int(state.skipped_steps) == 1 and int(_adam_state(state).count) == 1


def test_overflow_check_on_sharded_grads(rng):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params, tx, state = _setup(rng)
    sharded = NamedSharding(mesh, P("data"))
    grads = jax.tree.map(lambda p: normal(rng, p.shape, p.dtype), params)
    bad = {**grads, "w": grads["w"].at[7, 2].set(jnp.inf)}  # only the last shard overflows
    put = lambda t: jax.device_put(t, {"w": sharded, "b": NamedSharding(mesh, P())})  # noqa: E731
    _, new_state = jax.jit(tx.update)(put(bad), state, put(params))
    assert int(new_state.skipped_steps) == 1
    assert float(new_state.loss_scale.loss_scale) == 2.0 ** 9


@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
@pytest.mark.parametrize("make", [optim.adamw, functools.partial(optim.adamw, kernel="multi"), optim.lion])
def test_gated_transform_matches_generic_path_without_cond(rng, backend, make):
    """A bare lsjax transform gets the unscaling and the skip fused into its update (grad_scale,
    finite); wrapped in a chain it takes the generic path (unscale, update, select). Same results,
    clean and non-finite steps alike, and neither lowers to a lax.cond (a host sync on the GPU)."""
    params = {"w": normal(rng, (8, 4), jnp.float16), "b": normal(rng, (4,), jnp.float16)}
    scale = optim.DynamicLossScale.create(2.0 ** 10, period=2)
    gated = optim.loss_scaled(make(1e-2), scale)
    generic = optim.loss_scaled(optax.chain(optax.identity(), make(1e-2)), scale)
    assert isinstance(make(1e-2), optim.GatedTransformation)
    grads = [jax.tree.map(lambda p: normal(rng, p.shape, p.dtype), params) for _ in range(4)]
    grads[2] = {**grads[2], "w": grads[2]["w"].at[0, 0].set(jnp.inf)}
    with ops.use_backend(backend):
        runs = []
        for tx in (gated, generic):
            update = jax.jit(tx.update)
            assert "cond" not in str(jax.make_jaxpr(tx.update)(grads[0], tx.init(params), params))
            p, state, trace = params, tx.init(params), []
            for g in grads:
                updates, state = update(g, state, p)
                p = optim.apply_updates(p, updates)
                trace.append(p)
            runs.append((trace, state))
    (trace_a, state_a), (trace_b, state_b) = runs
    for a, b in zip(jax.tree.leaves(trace_a), jax.tree.leaves(trace_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(trace_a[2]["w"]), np.asarray(trace_a[1]["w"]))  # skipped step
    assert int(state_a.skipped_steps) == int(state_b.skipped_steps) == 1
    for a, b in zip(jax.tree.leaves(state_a.inner_state), jax.tree.leaves(state_b.inner_state[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
