"""Multi-tensor Adam update: bit-identical to per-leaf adam_update, reference, in-place, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax import ops
from lsjax.ops.adam_update import adam_scalars, adam_update
from lsjax.ops.adam_update_multi import adam_update_multi, adam_update_multi_reference
from tests.helpers import DTYPES, normal

needs_ffi = pytest.mark.skipif("cpu_ffi" not in ops.available_backends(), reason="lsjax._ffi not built")

SHAPES = [(), (1,), (7,), (513,), (70000,), (3, 5), (33, 17), (2, 3, 5), (4, 1, 129), (0, 3)]


def _scalars():
    return adam_scalars(3e-3, 0.9, 0.98, 1e-8, 0.01, 1 - 0.9 ** 3, 1 - 0.98 ** 3, 1 / 1024)


def _leaves(rng, shapes, dtypes=DTYPES, grad_dtypes=(jnp.float32, jnp.bfloat16)):
    """Leaves cycling through param dtypes, grad dtypes (often another one) and decay flags."""
    params, grads, mus, nus, decay = [], [], [], [], []
    for i, shape in enumerate(shapes):
        params.append(normal(rng, shape, dtypes[i % len(dtypes)]))
        grads.append(normal(rng, shape, grad_dtypes[i % len(grad_dtypes)]))
        mus.append(normal(rng, shape, jnp.float32, 0.1))
        nus.append(jnp.abs(normal(rng, shape, jnp.float32, 0.01)))
        decay.append(i % 3 != 1)
    return params, grads, mus, nus, _scalars(), tuple(decay)


def _per_leaf(params, grads, mus, nus, scalars, decay):
    """adam_update leaf by leaf, each with its own scalars (weight decay 0 where not decayed)."""
    no_decay = scalars.at[4].set(0.0)
    out = [adam_update(p, g, m, v, scalars if d else no_decay) for p, g, m, v, d in zip(params, grads, mus, nus, decay)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def _jit(fn, decay, **kw):
    return jax.jit(lambda p, g, m, v, s: fn(p, g, m, v, s, decay), **kw)


def _assert_identical(got, want):
    for lists_got, lists_want in zip(got, want):
        assert len(lists_got) == len(lists_want)
        for i, (a, b) in enumerate(zip(lists_got, lists_want)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"leaf {i}"
            np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8), np.asarray(b).reshape(-1).view(np.uint8),
                                          err_msg=f"leaf {i}")


def _assert_close(got, want):
    for k, (lists_got, lists_want) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(lists_got, lists_want)):
            assert a.dtype == b.dtype and a.shape == b.shape
            tol = max(1e-6, float(jnp.finfo(b.dtype).eps)) if k == 0 else 1e-6  # param: one rounding apart
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                                       atol=tol * 1e-2, err_msg=f"output {k}, leaf {i}")


@needs_ffi
def test_cpu_ffi_matches_per_leaf_and_reference(rng):
    *args, decay = _leaves(rng, SHAPES * 2)
    with ops.use_backend("cpu_ffi"):
        got = _jit(adam_update_multi, decay)(*args)
        per_leaf = _jit(_per_leaf, decay)(*args)
    _assert_identical(got, per_leaf)
    _assert_close(got, adam_update_multi_reference(*args, decay))


@needs_ffi
def test_xla_backend_is_the_reference(rng):
    *args, decay = _leaves(rng, SHAPES[:5])
    with ops.use_backend("xla"):
        got = adam_update_multi(*args, decay)
    _assert_identical(got, adam_update_multi_reference(*args, decay))


@needs_ffi
def test_donated_moments_are_updated_in_place(rng):
    # 16-bit params: jax pairs donated inputs with outputs by shape and dtype in output order,
    # so a donated float32 moment would go to a float32 param's output instead.
    *args, decay = _leaves(rng, [(64, 16), (7,), (513,)], dtypes=[jnp.bfloat16, jnp.float16])
    with ops.use_backend("cpu_ffi"):
        want = _jit(_per_leaf, decay)(*args)
        donated = [jax.tree.map(jnp.array, x) for x in args]
        buffers = [x.unsafe_buffer_pointer() for x in donated[2] + donated[3]]
        got = _jit(adam_update_multi, decay, donate_argnums=(2, 3))(*donated)
    assert [x.unsafe_buffer_pointer() for x in got[1] + got[2]] == buffers
    assert all(x.is_deleted() for x in donated[2] + donated[3])
    _assert_identical(got, want)


@needs_ffi
@pytest.mark.parametrize("backend", ["xla", "cpu_ffi"])
def test_apply_flag_gates_the_step_in_place(rng, backend):
    *args, decay = _leaves(rng, [(64, 16), (7,), (513,), ()], dtypes=[jnp.bfloat16, jnp.float16])
    fn = jax.jit(lambda p, g, m, v, s, a: adam_update_multi(p, g, m, v, s, decay, apply=a), donate_argnums=(0, 2, 3))
    with ops.use_backend(backend):
        want = _jit(adam_update_multi, decay)(*args)
        for apply, expected in ((True, want), (False, (args[0], args[2], args[3]))):
            donated = [jax.tree.map(jnp.array, x) for x in args]
            buffers = [x.unsafe_buffer_pointer() for x in donated[0] + donated[2] + donated[3]]
            got = fn(*donated, jnp.bool_(apply))
            if backend == "cpu_ffi":  # written in place, or for a skipped step not written at all
                assert [x.unsafe_buffer_pointer() for x in got[0] + got[1] + got[2]] == buffers
            _assert_identical(got, expected)


@needs_ffi
def test_empty_list():
    with ops.use_backend("cpu_ffi"):
        assert adam_update_multi([], [], [], [], _scalars(), []) == ([], [], [])


def test_bad_input():
    p = [jnp.ones((4,), jnp.float16), jnp.ones((2, 3), jnp.bfloat16)]
    f32 = [x.astype(jnp.float32) for x in p]
    s = _scalars()
    with pytest.raises(ValueError, match="one entry per leaf"):
        adam_update_multi(p, p[:1], f32, f32, s, (True, True))
    with pytest.raises(ValueError, match="one entry per leaf"):
        adam_update_multi(p, p, f32, f32, s, (True,))
    with pytest.raises(ValueError, match=r"grads\[1\] must have shape"):
        adam_update_multi(p, [p[0], p[1][:1]], f32, f32, s, (True, True))
    with pytest.raises(TypeError, match=r"nus\[0\] must be float32"):
        adam_update_multi(p, p, f32, p, s, (True, True))
    with pytest.raises(ValueError, match="scalars must have shape"):
        adam_update_multi(p, p, f32, f32, s[:3], (True, True))
    with pytest.raises(TypeError, match="scalars must have dtype"):
        adam_update_multi(p, p, f32, f32, s.astype(jnp.bfloat16), (True, True))
    with pytest.raises(TypeError, match=r"params\[0\] must be float32"):
        adam_update_multi([x.astype(jnp.int32) for x in p], p, f32, f32, s, (True, True))
    with pytest.raises(TypeError, match=r"decay\[1\] must be a Python bool"):
        adam_update_multi(p, p, f32, f32, s, (True, jnp.bool_(True)))
    with pytest.raises(ValueError, match="apply needs in_place=True"):
        adam_update_multi(p, p, f32, f32, s, (True, True), in_place=False, apply=jnp.bool_(False))
    with pytest.raises(ValueError, match="apply must have shape"):
        adam_update_multi(p, p, f32, f32, s, (True, True), apply=jnp.ones((2,), bool))


@needs_ffi
def test_sharded_leaves_keep_their_sharding(rng):
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = [("data", None), (), (None, "tensor"), ("data", "tensor"), ("tensor",)]
    shapes = [(16, 12), (8, 6), (4, 10), (8, 4), (6,)]
    *args, decay = _leaves(rng, shapes, dtypes=[jnp.bfloat16], grad_dtypes=[jnp.bfloat16])  # one FFI call
    with ops.use_backend("cpu_ffi"):
        want = _jit(adam_update_multi, decay)(*args)
    shardings = [jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)) for spec in specs]
    put = lambda xs: [jax.device_put(x, sh) for x, sh in zip(xs, shardings)]  # noqa: E731
    sharded = [put(x) for x in args[:4]] + [args[4]]
    with ops.use_backend("cpu_ffi"):
        fn = _jit(adam_update_multi, decay)
        hlo = fn.lower(*sharded).compile().as_text()
        got = fn(*sharded)
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    for outputs in got:
        for x, sh in zip(outputs, shardings):
            assert x.sharding.is_equivalent_to(sh, x.ndim), (x.sharding, sh)
    _assert_identical(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("count", [3, 300])
def test_cuda_matches_per_leaf_cuda(rng, count):
    # 300 leaves > one launch's table (256); (70000,) and (300, 513) span several chunks; (0, 3) passes through.
    shapes = [SHAPES[i % len(SHAPES)] for i in range(count)] + [(300, 513)]
    gpu = jax.devices("gpu")[0]
    *args, decay = _leaves(rng, shapes)
    args = jax.device_put(args, gpu)
    with ops.use_backend("cuda"):
        got = _jit(adam_update_multi, decay)(*args)
        per_leaf = _jit(_per_leaf, decay)(*args)
    _assert_identical(got, per_leaf)
    with ops.use_backend("cpu_ffi"):
        cpu = _jit(adam_update_multi, decay)(*jax.device_put(args, jax.devices("cpu")[0]))
    _assert_identical(jax.device_put(got, jax.devices("cpu")[0]), cpu)


@pytest.mark.gpu
def test_cuda_apply_flag_gates_the_step(rng):
    *args, decay = _leaves(rng, [SHAPES[i % len(SHAPES)] for i in range(40)])
    args = jax.device_put(args, jax.devices("gpu")[0])
    fn = jax.jit(lambda p, g, m, v, s, a: adam_update_multi(p, g, m, v, s, decay, apply=a), donate_argnums=(0, 2, 3))
    with ops.use_backend("cuda"):
        want = _jit(adam_update_multi, decay)(*args)
        for apply, expected in ((True, want), (False, (args[0], args[2], args[3]))):
            got = fn(*[jax.tree.map(jnp.array, x) for x in args], jnp.bool_(apply))
            _assert_identical(got, expected)
