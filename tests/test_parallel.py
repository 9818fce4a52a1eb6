"""lsjax.parallel on 8 fake CPU devices: every mesh config's train step equals the 1-device step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsjax.parallel import (
    MeshConfig,
    batch_sharding,
    grad_constraint,
    load_mesh_config,
    make_mesh,
    optimizer_state_shardings,
    param_shardings,
    shard_train_step,
    validate,
)
from lsjax.parallel.checkpoint import restore_state, save_state

VOCAB, EMBED, HEADS, HEAD_DIM, MLP = 32, 16, 8, 4, 64
MODES = ["dp", "zero1", "zero2", "zero3", "tp", "dp_tp"]
CPUS = jax.devices("cpu")  # the 8 fake devices of conftest.py, also on a GPU machine


class Toy(nn.Module):
    """Embedding -> self-attention -> MLP -> tied logits, annotated like lsjax.models."""

    def _param(self, name, axes, shape, scale=None):
        init = nn.initializers.normal(scale or shape[0] ** -0.5)
        return self.param(name, nn.with_logical_partitioning(init, axes), shape)

    @nn.compact
    def __call__(self, ids):
        table = self._param("embedding", ("vocab", "embed"), (VOCAB, EMBED), 1.0)
        x = nn.with_logical_constraint(table[ids], ("batch", "length", "embed"))
        q, k, v = (
            jnp.einsum("ble,ehd->blhd", x, self._param(f"w{n}", ("embed", "heads", "kv"), (EMBED, HEADS, HEAD_DIM)))
            for n in "qkv"
        )
        probs = jax.nn.softmax(jnp.einsum("blhd,bmhd->bhlm", q, k) / HEAD_DIM**0.5, axis=-1)
        attn = jnp.einsum("bhlm,bmhd->blhd", probs, v)
        x = x + jnp.einsum("blhd,hde->ble", attn, self._param("wo", ("heads", "kv", "embed"), (HEADS, HEAD_DIM, EMBED)))
        h = nn.relu(x @ self._param("w_in", ("embed", "mlp"), (EMBED, MLP)) + self._param("b_in", ("mlp",), (MLP,), 0.1))
        x = x + h @ self._param("w_out", ("mlp", "embed"), (MLP, EMBED)) + self._param("b_out", ("embed",), (EMBED,), 0.1)
        return nn.with_logical_constraint(x @ table.T, ("batch", "length", "vocab"))


MODEL = Toy()
OPT = optax.adamw(1e-2, weight_decay=0.1)
IDS = jnp.zeros((8, 6), jnp.int32)
ABSTRACT = jax.eval_shape(MODEL.init, jax.random.key(0), IDS)["params"]
LOGICAL = jax.tree.leaves(nn.get_partition_spec(ABSTRACT), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def _loss(params, batch):
    logits = MODEL.apply({"params": params}, batch["src"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tgt_out"]).mean()


def _build(cfg, devices=CPUS):
    mesh = make_mesh(cfg, devices)
    validate(cfg, mesh, ABSTRACT)
    p_shard = param_shardings(ABSTRACT, mesh, cfg.rules)
    abstract_opt = jax.eval_shape(OPT.init, nn.unbox(ABSTRACT))
    state_shard = (p_shard, optimizer_state_shardings(abstract_opt, p_shard, cfg.zero_stage))

    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        grads = grad_constraint(grads, p_shard, cfg.zero_stage)
        updates, opt_state = OPT.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    return mesh, state_shard, shard_train_step(step, state_shard, batch_sharding(mesh), mesh, cfg.rules)


def _inputs(rng):
    params = nn.unbox(MODEL.init(jax.random.key(int(rng.integers(1 << 30))), IDS)["params"])
    batch = {k: jnp.asarray(rng.integers(0, VOCAB, (8, 6)), jnp.int32) for k in ("src", "tgt_out")}
    return (params, OPT.init(params)), batch


def _run(cfg, state, batch, devices=CPUS):
    mesh, state_shard, step = _build(cfg, devices)
    state = jax.device_put(state, state_shard)
    batch = jax.device_put(batch, batch_sharding(mesh))
    hlo = step.lower(state, batch).compile().as_text()
    return step(state, batch), hlo


def _per_device_bytes(tree) -> int:
    dev = CPUS[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == dev)


def _total_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    state, batch = _inputs(rng)
    (new_state, metrics), _ = _run(load_mesh_config("single"), jax.tree.map(jnp.copy, state), batch, CPUS[:1])
    return state, batch, new_state, metrics


@pytest.mark.parametrize("mode", MODES)
def test_step_matches_single_device(mode, reference):
    state, batch, want_state, want_metrics = reference
    cfg = load_mesh_config(mode)
    ((params, opt_state), metrics), hlo = _run(cfg, jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
    # Adam's first step moves each param by about lr * g / (|g| + eps): for a gradient element
    # near eps, reduction-order rounding of g (sharded sums) shows at up to ~1e-3 lr (atol).
    for got, want in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)

    # Per-device memory of the outputs (the shards that device 0 holds).
    n = len(CPUS)
    opt_arrays = [x for x in jax.tree.leaves(opt_state) if x.ndim]
    opt_bytes, full_opt = _per_device_bytes(opt_arrays), _total_bytes(opt_arrays)
    param_bytes, full_params = _per_device_bytes(params), _total_bytes(params)
    if mode == "dp":
        assert (param_bytes, opt_bytes) == (full_params, full_opt)
    if mode in ("zero1", "zero2", "zero3"):
        assert opt_bytes == full_opt // n
    if mode in ("zero1", "zero2"):
        assert param_bytes == full_params
    if mode in ("zero3", "tp"):  # zero3 shards every `embed` param, tp every heads/mlp/vocab one
        sharded = {"zero3": {"embed"}, "tp": {"heads", "mlp", "vocab"}}[mode]
        for leaf, spec in zip(jax.tree.leaves(params), LOGICAL):
            expect = leaf.nbytes // n if sharded & set(spec) else leaf.nbytes
            assert _per_device_bytes(leaf) == expect, spec
        assert param_bytes < full_params / 2

    # The collectives XLA chose (CPU lowers reduce-scatter to all-reduce + dynamic-slice).
    if mode in ("dp", "tp", "dp_tp"):
        assert "all-reduce(" in hlo
    if mode == "zero3":
        assert "all-gather(" in hlo


def _lowered_text(mode: str, state, batch) -> str:
    mesh, state_shard, step = _build(load_mesh_config(mode))
    return step.lower(jax.device_put(state, state_shard), jax.device_put(batch, batch_sharding(mesh))).as_text()


def test_zero2_pins_gradients_to_data_shards():
    """ZeRO-2 adds data-sharded constraints on the grads (a reduce-scatter on GPU; CPU emits all-reduce + slice)."""
    state, batch = _inputs(np.random.default_rng())
    zero1, zero2 = (_lowered_text(mode, state, batch) for mode in ("zero1", "zero2"))
    n_params = len(jax.tree.leaves(state[0]))
    assert zero2.count("sharding_constraint") == zero1.count("sharding_constraint") + n_params


@pytest.mark.gpu
def test_zero2_reduce_scatters_on_gpu():
    devices = jax.devices("gpu")
    if len(devices) < 2:
        pytest.skip("needs 2 GPUs")
    cfg = load_mesh_config("zero2")
    mesh, state_shard, step = _build(cfg, devices[:2])
    state, batch = _inputs(np.random.default_rng())
    hlo = step.lower(jax.device_put(state, state_shard), jax.device_put(batch, batch_sharding(mesh))).compile().as_text()
    assert "reduce-scatter" in hlo


def test_invalid_mesh_errors():
    with pytest.raises(ValueError, match="need a multiple of 3 devices, got 8"):
        make_mesh(MeshConfig(axes=(("data", -1), ("tensor", 3))), CPUS)
    with pytest.raises(ValueError, match="need 4 devices, got 8"):
        make_mesh(MeshConfig(axes=(("data", 2), ("tensor", 2))), CPUS)
    with pytest.raises(ValueError, match="at most one -1"):
        MeshConfig(axes=(("data", -1), ("tensor", -1)))
    with pytest.raises(ValueError, match="not in"):
        MeshConfig(axes=(("data", 8),), rules=(("heads", "tensor"),))
    with pytest.raises(FileNotFoundError, match="known: .*zero3"):
        load_mesh_config("zero4")
    cfg = load_mesh_config("tp", axes={"data": 2, "tensor": 4})
    abstract = jax.eval_shape(
        lambda: {"w": nn.Partitioned(jnp.zeros((EMBED, 6)), names=("embed", "mlp"))}
    )
    with pytest.raises(ValueError, match=r"\['w'\].*'mlp', size 6.*mesh axis 'tensor' of size 4"):
        validate(cfg, make_mesh(cfg, CPUS), abstract)


def test_checkpoint_restores_on_another_mesh(tmp_path):
    """Save under ZeRO-3 on 8 devices, restore under dp on 2: same values, new layout."""
    state, batch = _inputs(np.random.default_rng())
    _, zero3_shard, _ = _build(load_mesh_config("zero3"))
    saved = jax.device_put(state, zero3_shard)
    save_state(tmp_path / "ckpt", saved)

    dp = load_mesh_config("dp")
    mesh, dp_shard, step = _build(dp, CPUS[:2])
    restored = restore_state(tmp_path / "ckpt", jax.eval_shape(lambda: state), dp_shard)
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(dp_shard)):
        np.testing.assert_array_equal(got, want)
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
    (_, metrics) = step(restored, jax.device_put(batch, batch_sharding(mesh)))
    assert np.isfinite(metrics["loss"])
