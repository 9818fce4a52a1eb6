"""lsjax.optim transforms: equal to optax on float32, float32 math rounded once on fp16/bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsjax import ops, optim
from lsjax.ops.adam_update import adam_scalars, adam_step_reference
from lsjax.optim._rounding import round_to
from tests.helpers import normal

LOW = [jnp.float16, jnp.bfloat16]


def _params(rng, dtype=jnp.float32):
    return {"w": normal(rng, (6, 10), dtype), "b": normal(rng, (10,), dtype, 0.1), "s": normal(rng, (), dtype)}


def _grads(rng, params, scale=1.0):
    return jax.tree.map(lambda p: normal(rng, p.shape, p.dtype, scale), params)


def _run(tx, params, grad_seq, apply=optim.apply_updates):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grad_seq:
        updates, state = update(grads, state, params)
        params = apply(params, updates)
    return params, state


def _assert_tree_close(a, b, rtol, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


# optax computes 1 - b2 ** t in float32 with cancellation (~2e-5 relative at t=3);
# ours is accurate, so the float32 trajectories agree to ~1e-4 of the step size.
OPTAX_ATOL = 1e-6


def _no_decay_on_vectors(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def test_adamw_fp32_equals_optax(rng):
    params = _params(rng)
    grad_seq = [_grads(rng, params) for _ in range(5)]
    sched = optim.inverse_sqrt_schedule(1e-2, 3)
    ours, state = _run(optim.adamw(sched, weight_decay=0.1, mask=_no_decay_on_vectors), params, grad_seq)
    ref, _ = _run(optax.adamw(sched, weight_decay=0.1, mask=_no_decay_on_vectors), params, grad_seq,
                  optax.apply_updates)
    _assert_tree_close(ours, ref, rtol=1e-6, atol=OPTAX_ATOL)
    assert int(state.count) == 5 and state.mu["w"].dtype == jnp.float32


def test_lion_fp32_equals_optax(rng):
    params = _params(rng)
    grad_seq = [_grads(rng, params) for _ in range(5)]
    ours, _ = _run(optim.lion(3e-3, weight_decay=0.05), params, grad_seq)
    ref, _ = _run(optax.lion(3e-3, weight_decay=0.05), params, grad_seq, optax.apply_updates)
    _assert_tree_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_chain_with_clipping_and_schedule_equals_optax(rng):
    params = _params(rng)
    grad_seq = [_grads(rng, params, 10.0) for _ in range(4)]
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    ours, _ = _run(optax.chain(optax.clip_by_global_norm(1.0), optim.adamw(sched)), params, grad_seq)
    ref, _ = _run(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched)), params, grad_seq,
                  optax.apply_updates)
    _assert_tree_close(ours, ref, rtol=1e-6, atol=OPTAX_ATOL)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_step_is_fp32_math_rounded_once(rng, dtype):
    params = _params(rng, dtype)
    grads = _grads(rng, params)
    lr, wd = 1e-3, 0.01
    tx = optim.adamw(lr, weight_decay=wd)
    updates, state = tx.update(grads, tx.init(params), params)
    new = optim.apply_updates(params, updates)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
    scalars = adam_scalars(lr, 0.9, 0.999, 1e-8, wd, -np.expm1(np.log(0.9)), -np.expm1(np.log(0.999)))
    zero = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
    for p, g, got in zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(new)):
        step, _, _ = adam_step_reference(p, g, zero(p), zero(p), scalars)
        expected = (p.astype(jnp.float32) + step).astype(dtype)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    # optax.apply_updates promotes p + float32 u to float32, so it agrees too.
    _assert_tree_close(optax.apply_updates(params, updates), new, rtol=0)


def test_eps_does_not_underflow_in_fp16():
    # g = 1e-4: g**2 = 1e-8 and eps = 1e-8 are both 0 in float16 (optax#1755).
    params = {"w": jnp.ones((4,), jnp.float16)}
    grads = {"w": jnp.full((4,), 1e-4, jnp.float16)}
    tx = optim.adam(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    g = float(jnp.float16(1e-4))
    expected = 1.0 - 1e-2 * g / (g + 1e-8)  # first Adam step: lr * g / (|g| + eps)
    np.testing.assert_allclose(np.asarray(optim.apply_updates(params, updates)["w"], np.float32),
                               np.float32(np.float16(expected)))


@pytest.mark.parametrize("moment_dtype", [jnp.float32, jnp.bfloat16])
def test_moment_dtype_sets_both_moments(rng, moment_dtype):
    params = _params(rng, jnp.float16)
    tx = optim.adamw(1e-3, moment_dtype=moment_dtype)
    _, state = tx.update(_grads(rng, params), tx.init(params), params)
    assert {x.dtype for x in jax.tree.leaves((state.mu, state.nu))} == {jnp.dtype(moment_dtype)}


def test_bad_param_dtype_and_missing_params():
    tx = optim.adamw(1e-3)
    with pytest.raises(TypeError, match=r"\['step'\] has dtype int32"):
        tx.init({"step": jnp.zeros((2,), jnp.int32)})
    params = {"w": jnp.ones((2,), jnp.float16)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="rounding"):
        optim.lion(1e-3, rounding="up")


@pytest.mark.parametrize("dtype", LOW)
def test_round_to_stochastic_is_unbiased(dtype):
    x = jnp.full((20000,), 1.0 + 1e-4, jnp.float32)  # far below half an ulp of 1 in both formats
    r = round_to(x, dtype, jax.random.key(0)).astype(jnp.float32)
    assert float(round_to(x, dtype).astype(jnp.float32)[0]) == 1.0
    assert set(np.unique(np.asarray(r))) <= {1.0, float(jnp.nextafter(jnp.asarray(1, dtype), 2))}
    np.testing.assert_allclose(float(r.mean()), 1.0 + 1e-4, atol=3e-5)
    inf = round_to(jnp.array([jnp.inf, 1e30, jnp.nan]), dtype, jax.random.key(1))
    assert np.isinf(float(inf[0])) and np.isnan(float(inf[2]))


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_keeps_tiny_updates(dtype):
    # Lion's step is exactly lr * sign(g): 300 steps of 1e-4 on params at 1.0, each
    # far below half an ulp. Nearest rounding loses them all; stochastic rounding
    # follows the float32 trajectory in expectation.
    params = {"w": jnp.ones((4096,), dtype)}
    grad_seq = [{"w": jnp.ones((4096,), dtype)}] * 300
    fp32_final = 1.0 - 300 * 1e-4
    nearest, _ = _run(optim.lion(1e-4, weight_decay=0.0), params, grad_seq)
    stoch, _ = _run(optim.lion(1e-4, weight_decay=0.0, rounding="stochastic", seed=3), params, grad_seq)
    again, _ = _run(optim.lion(1e-4, weight_decay=0.0, rounding="stochastic", seed=3), params, grad_seq)
    assert float(nearest["w"].astype(jnp.float32).mean()) == 1.0
    np.testing.assert_allclose(float(stoch["w"].astype(jnp.float32).mean()), fp32_final, atol=2e-3)
    np.testing.assert_array_equal(np.asarray(stoch["w"], np.float32), np.asarray(again["w"], np.float32))


def test_state_bytes_per_param(rng):
    params16 = _params(rng, jnp.float16)
    ours = optim.state_bytes_per_param(params16, params16, optim.adamw(1e-3).init(params16))
    params32 = _params(rng)
    master = optim.state_bytes_per_param(params32, params32, optax.adamw(1e-3).init(params32))
    n = sum(p.size for p in jax.tree.leaves(params16))
    assert ours == pytest.approx(12.0 + 4 / n)  # + the int32 step count
    assert master == pytest.approx(16.0 + 4 / n)


def test_inverse_sqrt_schedule():
    sched = optim.inverse_sqrt_schedule(1e-3, 4)
    lrs = [float(sched(c)) for c in range(8)]
    np.testing.assert_allclose(lrs[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lrs[7], 1e-3 * np.sqrt(4 / 8), rtol=1e-6)


@pytest.mark.skipif("cpu_ffi" not in ops.available_backends(), reason="lsjax._ffi not built")
@pytest.mark.parametrize("dtype", [jnp.float32, *LOW])
def test_fused_adamw_matches_jnp_path(rng, dtype):
    params = _params(rng, dtype)
    grad_seq = [_grads(rng, params) for _ in range(3)]
    sched = optim.inverse_sqrt_schedule(1e-2, 2)
    ref, ref_state = _run(optim.adamw(sched, weight_decay=0.1), params, grad_seq)
    with ops.use_backend("cpu_ffi"):
        fused, state = _run(optim.adamw(sched, weight_decay=0.1, kernel="multi"), params, grad_seq)
    _assert_tree_close(state.mu, ref_state.mu, rtol=1e-6, atol=1e-7)
    _assert_tree_close(state.nu, ref_state.nu, rtol=1e-6, atol=1e-9)
    ulp = {jnp.float32: 1e-6, jnp.float16: 1e-3, jnp.bfloat16: 8e-3}[dtype]  # at most one rounding apart
    _assert_tree_close(fused, ref, rtol=ulp, atol=1e-6)


def _donated_step(tx):
    return jax.jit(lambda params, grads, state: optim.apply_gradients(tx, grads, state, params),
                   donate_argnums=(0, 2))


@pytest.mark.skipif("cpu_ffi" not in ops.available_backends(), reason="lsjax._ffi not built")
def test_fused_step_is_in_place_and_keeps_shardings(rng):
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = {"w": jax.sharding.PartitionSpec("data", "tensor"), "b": jax.sharding.PartitionSpec("tensor"),
            "s": jax.sharding.PartitionSpec()}
    params = {"w": normal(rng, (8, 6), jnp.bfloat16), "b": normal(rng, (6,), jnp.bfloat16),
              "s": normal(rng, (), jnp.bfloat16)}
    params = {k: jax.device_put(p, jax.sharding.NamedSharding(mesh, spec[k])) for k, p in params.items()}
    grads = _grads(rng, params)
    tx = optim.adamw(1e-3, kernel="multi")
    state = tx.init(params)
    with ops.use_backend("cpu_ffi"):
        step = _donated_step(tx)
        hlo = step.lower(params, grads, state).compile().as_text()
        new_params, _ = step(params, grads, state)
    assert "all-gather" not in hlo and " copy(" not in hlo  # params and moments in place, shard by shard
    for k, p in new_params.items():
        assert p.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec[k]), p.ndim), k


def _bits(tree):
    return [np.asarray(x).reshape(-1).view(np.uint8) for x in jax.tree.leaves(tree)]


@pytest.mark.skipif("cpu_ffi" not in ops.available_backends(), reason="lsjax._ffi not built")
@pytest.mark.parametrize("kernel", ["xla", "multi"])
def test_apply_gradients_skips_a_nonfinite_step_and_matches_update(rng, kernel):
    params = _params(rng, jnp.float16)
    tx = optim.loss_scaled(optim.adamw(1e-2, weight_decay=0.1, kernel=kernel), optim.DynamicLossScale.create(16.0))
    assert isinstance(tx, optim.ParamsWriter)
    grads = _grads(rng, params, 16.0)
    bad = {**grads, "w": grads["w"].at[2, 3].set(jnp.inf)}
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731 (the step donates params and state)
    with ops.use_backend("cpu_ffi"):
        step = _donated_step(tx)
        state = tx.init(params)
        updates, want_state = jax.jit(tx.update)(grads, state, params)
        want = optim.apply_updates(params, updates)
        new, new_state = step(copy(params), grads, copy(state))
        skipped, skipped_state = step(copy(new), bad, copy(new_state))
    assert all((a == b).all() for a, b in zip(_bits(new), _bits(want)))
    assert all((a == b).all() for a, b in zip(_bits(new_state), _bits(want_state)))
    assert all((a == b).all() for a, b in zip(_bits(skipped), _bits(new)))  # params unchanged
    inner, skipped_inner = new_state.inner_state, skipped_state.inner_state
    assert all((a == b).all() for a, b in zip(_bits((inner.mu, inner.nu, inner.count)),
                                               _bits((skipped_inner.mu, skipped_inner.nu, skipped_inner.count))))
    assert int(skipped_state.skipped_steps) == 1
    assert float(skipped_state.loss_scale.loss_scale) == 8.0


def test_apply_gradients_of_an_optax_transform_is_update_plus_apply_updates(rng):
    params = _params(rng)
    grads = _grads(rng, params)
    tx = optax.adam(1e-2)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    new, _ = optim.apply_gradients(tx, grads, state, params)
    _assert_tree_close(new, optax.apply_updates(params, updates), rtol=0)
