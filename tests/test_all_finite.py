"""all_finite: reference vs cpu_ffi vs cuda on finite leaves and single inf/-inf/nan elements, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax import ops
from lsjax.ops.all_finite import all_finite, all_finite_reference
from tests.helpers import DTYPES, normal

needs_ffi = pytest.mark.skipif("cpu_ffi" not in ops.available_backends(), reason="lsjax._ffi not built")

# Odd sizes leave a scalar tail after the 16-byte vectors; (70000,) and (300, 513) span several CUDA chunks.
SHAPES = [(), (1,), (7,), (513,), (70000,), (3, 5), (33, 17), (2, 3, 5), (4, 1, 129), (0, 3), (300, 513)]
NONFINITE = [np.inf, -np.inf, np.nan]


def _leaves(rng, shapes, dtypes=DTYPES):
    """Fresh normal leaves of ``shapes``, dtypes cycling."""
    return [normal(rng, shape, dtypes[i % len(dtypes)]) for i, shape in enumerate(shapes)]


def _every_shape_and_dtype(count: int) -> list:
    """``count`` shapes for :func:`_leaves`: each of SHAPES once per dtype, round and round."""
    return [SHAPES[(i // len(DTYPES)) % len(SHAPES)] for i in range(count)]


def _poison(leaves, leaf: int, index: int, value: float):
    """``leaves`` with flat element ``index`` of ``leaves[leaf]`` set to ``value``."""
    out = list(leaves)
    x = out[leaf]
    out[leaf] = x.reshape(-1).at[index].set(value).reshape(x.shape)
    return out


def _cases(rng, leaves):
    """(leaf, flat index, value) to poison, one at a time: the first, last (the scalar tail of an odd size),
    middle and a random element of every non-empty leaf, the values cycling through inf, -inf and nan."""
    out = []
    for leaf, x in enumerate(leaves):
        n = x.size
        if n == 0:
            continue
        for index in sorted({0, n - 1, n // 2, int(rng.integers(n))}):
            out.append((leaf, index, NONFINITE[len(out) % len(NONFINITE)]))
    return out


@needs_ffi
def test_cpu_ffi_matches_reference(rng):
    leaves = _leaves(rng, _every_shape_and_dtype(len(SHAPES) * len(DTYPES)))
    ref = jax.jit(all_finite_reference)
    with ops.use_backend("cpu_ffi"):
        check = jax.jit(all_finite)
        assert bool(check(leaves)) and bool(all_finite(leaves)) and bool(ref(leaves))
        hlo = check.lower(leaves).compile().as_text()
    assert hlo.count('custom_call_target="lsjax_all_finite_cpu"') == len(DTYPES)  # one call per dtype
    for leaf, index, value in _cases(rng, leaves):
        bad = _poison(leaves, leaf, index, value)
        what = f"{value} at {index} of leaf {leaf} {bad[leaf].shape} {bad[leaf].dtype}"
        with ops.use_backend("cpu_ffi"):
            assert not bool(check(bad)), what
        assert not bool(ref(bad)), what


@needs_ffi
def test_eager_single_dtype_and_xla_backend(rng):
    leaves = _leaves(rng, [(5, 3), (9,)], dtypes=[jnp.bfloat16])
    bad = _poison(leaves, 1, 8, np.nan)
    for backend in ("cpu_ffi", "xla"):
        with ops.use_backend(backend):
            assert bool(all_finite(leaves)) and not bool(all_finite(bad))
            assert all_finite(bad).dtype == jnp.bool_ and all_finite(bad).shape == ()


@needs_ffi
@pytest.mark.parametrize("backend", ["cpu_ffi", "xla"])
def test_empty(backend):
    with ops.use_backend(backend):
        assert bool(all_finite([]))
        assert bool(jax.jit(all_finite)([jnp.zeros((0, 3), jnp.float16), jnp.zeros((0,))]))


def test_bad_input():
    leaves = [jnp.ones((4,), jnp.float16), jnp.ones((2, 3), jnp.int32)]
    with pytest.raises(TypeError, match=r"all_finite: tensors\[1\] must be float32, float16 or bfloat16, got int32"):
        all_finite(leaves)


@needs_ffi
def test_sharded_leaves_stay_sharded(rng):
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = [("data", None), (), (None, "tensor"), ("data", "tensor"), ("tensor",), ()]
    shapes = [(16, 12), (8, 6), (4, 10), (8, 4), (6,), ()]
    leaves = _leaves(rng, shapes, dtypes=[jnp.bfloat16, jnp.bfloat16, jnp.float32])
    shardings = [jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)) for spec in specs]
    put = lambda xs: [jax.device_put(x, sh) for x, sh in zip(xs, shardings)]  # noqa: E731
    with ops.use_backend("cpu_ffi"):
        check = jax.jit(all_finite)
        hlo = check.lower(put(leaves)).compile().as_text()
        got = check(put(leaves))
        assert bool(got) and got.sharding.is_fully_replicated
        # One inf at a time: in leaf 3 on one device only, in leaves 0, 2 and 4 on the devices of one shard,
        # in the replicated leaves 1 and 5 on every device.
        for leaf, index in [(3, (0, 0)), (3, (7, 3)), (0, (15, 11)), (2, (3, 9)), (4, (5,)), (1, (2, 2)), (5, ())]:
            bad = list(leaves)
            bad[leaf] = bad[leaf].at[index].set(np.inf)
            assert not bool(check(put(bad))), (leaf, index)
    assert "all-gather" not in hlo and "all-to-all" not in hlo


@pytest.mark.gpu
@pytest.mark.parametrize("count", [len(SHAPES) * len(DTYPES), 800])
def test_cuda_matches_reference(rng, count):
    # 800 leaves > one launch's table; every shape with every dtype; every leaf poisoned at its first, last
    # (scalar tail of odd sizes), middle and a random element in turn.
    gpu = jax.devices("gpu")[0]
    leaves = jax.device_put(_leaves(rng, _every_shape_and_dtype(count)), gpu)
    ref = jax.jit(all_finite_reference)
    with ops.use_backend("cuda"):
        check = jax.jit(all_finite)
        assert bool(check(leaves)) and bool(ref(leaves))
    cases = _cases(rng, leaves)
    if len(cases) > 200:
        cases = [cases[int(i)] for i in rng.choice(len(cases), 200, replace=False)]
    for leaf, index, value in cases:
        bad = _poison(leaves, leaf, index, value)
        what = f"{value} at {index} of leaf {leaf} {bad[leaf].shape} {bad[leaf].dtype}"
        with ops.use_backend("cuda"):
            assert not bool(check(bad)), what
        assert not bool(ref(bad)), what
