"""lsjax.nn layers against the plain-Flax reference layers, loss, embedding, config checks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.flax_reference import RefDecoderLayer, RefEncoderLayer, layer_params, sinusoids
from lsjax import ops
from lsjax.nn import (CrossEntropyLoss, Embedding, LayerConfig, TransformerDecoderLayer, TransformerEncoderLayer,
                      layer_stack, resolve_attention_impl)
from tests.helpers import assert_close, assert_sum_close, normal

CFG = dict(hidden_size=20, intermediate_size=36, nhead=4, attn_prob_dropout_ratio=0.0,
           activation_dropout_ratio=0.0, hidden_dropout_ratio=0.0, max_seq_len=16, max_batch_tokens=64)


def config(**overrides) -> LayerConfig:
    return LayerConfig(**{**CFG, **overrides})


def right_padded_mask(rng, b, n):
    lengths = rng.integers(1, n + 1, size=b)
    lengths[0] = n
    return jnp.asarray(np.arange(n) < lengths[:, None])


def randomize(params, rng, scale=0.3):
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32) * scale, p.dtype),
                        nn.meta.unbox(params))


@pytest.mark.parametrize("pre_layer_norm", [True, False])
def test_encoder_layer_matches_reference(rng, pre_layer_norm):
    cfg = config(pre_layer_norm=pre_layer_norm, activation_fn="gelu")
    x, mask = normal(rng, (3, 7, 20)), right_padded_mask(rng, 3, 7)
    layer = TransformerEncoderLayer(cfg)
    params = randomize(layer.init(jax.random.key(0), x, mask)["params"], rng)
    want = RefEncoderLayer(cfg).apply({"params": layer_params(params)}, x, mask)
    with ops.use_backend("cpu_ffi"):
        got = layer.apply({"params": params}, x, mask)
    assert_close(got, want, 2e-5, "encoder layer")


def test_decoder_layer_matches_reference_with_grads(rng):
    """Outputs and every parameter gradient (mapped the same way as the params) agree."""
    cfg = config()
    x, memory, mask = normal(rng, (2, 5, 20)), normal(rng, (2, 6, 20)), right_padded_mask(rng, 2, 6)
    cot = normal(rng, (2, 5, 20))
    layer = TransformerDecoderLayer(cfg)
    params = randomize(layer.init(jax.random.key(0), x, memory, mask)["params"], rng)

    def loss(module, p, x):
        return jnp.sum(module.apply({"params": p}, x, memory, mask) * cot)

    with ops.use_backend("cpu_ffi"):
        got, (g_params, g_x) = jax.jit(jax.value_and_grad(lambda p, x: loss(layer, p, x), argnums=(0, 1)))(params, x)
    want, (r_params, r_x) = jax.jit(jax.value_and_grad(lambda p, x: loss(RefDecoderLayer(cfg), p, x), argnums=(0, 1)))(
        layer_params(params), x)
    assert_sum_close(got, want, cot.size, 1e-5, "decoder layer loss")  # a sum of 200 terms: rounding grows with them
    assert_close(g_x, r_x, 1e-4, "dx")
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-4, "dparam"), layer_params(g_params), r_params)


def test_xla_attention_impl_matches_fused(rng):
    x, mask = normal(rng, (2, 6, 20)), right_padded_mask(rng, 2, 6)
    fused, flash = TransformerEncoderLayer(config()), TransformerEncoderLayer(config(attention_impl="xla"))
    params = randomize(fused.init(jax.random.key(0), x, mask)["params"], rng)
    with ops.use_backend("cpu_ffi"):
        assert_close(flash.apply({"params": params}, x, mask), fused.apply({"params": params}, x, mask), 2e-5,
                     "attention_impl='xla' vs 'fused'")


class EncoderStack(nn.Module):
    config: LayerConfig

    @nn.compact
    def __call__(self, x, mask):
        return layer_stack(TransformerEncoderLayer, self.config, 2, x, dict(key_mask=mask), deterministic=True)


@pytest.mark.parametrize("variant", [dict(remat_policy="full"), dict(remat_policy="dots_saveable", scan_layers=True)])
def test_remat_and_scan_match_plain_stack(rng, variant):
    x, mask, cot = normal(rng, (2, 6, 20)), right_padded_mask(rng, 2, 6), normal(rng, (2, 6, 20))
    plain, other = EncoderStack(config()), EncoderStack(config(**variant))
    params = randomize(plain.init(jax.random.key(0), x, mask)["params"], rng)
    stacked = {"layers": jax.tree.map(lambda *ps: jnp.stack(ps), params["layers_0"], params["layers_1"])}
    other_params = stacked if variant.get("scan_layers") else params
    assert jax.tree.map(jnp.shape, nn.meta.unbox(other.init(jax.random.key(1), x, mask)["params"])) == \
        jax.tree.map(jnp.shape, other_params)

    def grads(module, p):
        with ops.use_backend("cpu_ffi"):
            return jax.jit(jax.value_and_grad(lambda p: jnp.sum(module.apply({"params": p}, x, mask) * cot)))(p)

    (l0, g0), (l1, g1) = grads(plain, params), grads(other, other_params)
    assert_close(l1, l0, 1e-5, "output")
    if variant.get("scan_layers"):
        g0 = {"layers": jax.tree.map(lambda *ps: jnp.stack(ps), g0["layers_0"], g0["layers_1"])}
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-4, "grad"), g1, g0)


@pytest.mark.parametrize("backend, dtype, head_dim, dropout, expected", [
    ("cuda", jnp.bfloat16, 64, False, "cudnn"), ("cuda", jnp.float16, 128, False, "cudnn"),
    ("cuda", jnp.bfloat16, 64, True, "fused"), ("cuda", jnp.float32, 64, False, "fused"),
    ("cuda", jnp.bfloat16, 160, False, "fused"), ("cuda", jnp.bfloat16, 36, False, "fused"),
    ("cpu_ffi", jnp.bfloat16, 64, False, "fused"), ("xla", jnp.bfloat16, 64, False, "fused")])
def test_auto_attention_takes_cudnn_only_where_it_applies(monkeypatch, backend, dtype, head_dim, dropout, expected):
    monkeypatch.setattr(ops, "get_backend", lambda: backend)
    assert resolve_attention_impl("auto", dtype, head_dim, dropout) == expected
    assert resolve_attention_impl("xla", dtype, head_dim, dropout) == "xla"


@pytest.mark.gpu
def test_cudnn_attention_matches_fused_on_gpu(rng):
    kw = dict(dtype=jnp.bfloat16, hidden_size=128, nhead=2)
    x, mask = normal(rng, (2, 64, 128), jnp.bfloat16), right_padded_mask(rng, 2, 64)
    fused = TransformerEncoderLayer(config(attention_impl="fused", **kw))
    flash = TransformerEncoderLayer(config(attention_impl="cudnn", **kw))
    params = randomize(fused.init(jax.random.key(0), x, mask)["params"], rng, scale=0.05)
    out = flash.apply({"params": params}, x, mask)
    assert_close(out, fused.apply({"params": params}, x, mask), 3e-2, "cudnn vs fused")
    auto = TransformerEncoderLayer(config(attention_impl="auto", **kw)).apply({"params": params}, x, mask)
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(out, np.float32), "auto = cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_xla_attention_runs_in_16_bit_on_gpu(rng, dtype):
    """attention_impl="xla" in float16 used to fail to compile on XLA:GPU (jax.nn.dot_product_attention's
    XLA path asked for an unsupported dot algorithm); it now matches the fused path."""
    kw = dict(dtype=dtype, hidden_size=128, nhead=2)
    x, mask = normal(rng, (2, 64, 128), dtype), right_padded_mask(rng, 2, 64)
    fused = TransformerEncoderLayer(config(attention_impl="fused", **kw))
    params = randomize(fused.init(jax.random.key(0), x, mask)["params"], rng, scale=0.05)
    out = TransformerEncoderLayer(config(attention_impl="xla", **kw)).apply({"params": params}, x, mask)
    assert_close(out, fused.apply({"params": params}, x, mask), 3e-2, "xla vs fused")


def test_embedding_is_scaled_lookup_plus_sinusoids(rng):
    cfg = config()
    ids = jnp.asarray([[5, 9, 2, 0], [0, 7, 7, 1]], jnp.int32)
    emb = Embedding(11, cfg)
    params = emb.init(jax.random.key(0), ids)["params"]
    table = nn.meta.unbox(params)["embedding"]
    pos = jnp.cumsum(ids != 0, axis=1) - 1
    want = jnp.where((ids != 0)[..., None], table[ids] * np.sqrt(20) + sinusoids(pos, 20), 0)
    with ops.use_backend("cpu_ffi"):
        assert_close(emb.apply({"params": params}, ids), want, 1e-5, "embedding")
    with pytest.raises(ValueError, match="max_seq_len=16"):
        emb.apply({"params": params}, jnp.ones((1, 17), jnp.int32))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cross_entropy_loss(rng, reduction):
    logits, labels = normal(rng, (3, 5, 13)), jnp.asarray(rng.integers(0, 13, size=(3, 5)), jnp.int32)
    eps = 0.1
    per_token = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 13), eps))
    valid = labels != 0
    want_sum = jnp.sum(jnp.where(valid, per_token, 0))
    with ops.use_backend("cpu_ffi"):
        out = CrossEntropyLoss(label_smoothing=eps, reduction=reduction).apply({}, logits, labels)
    if reduction == "sum":
        assert int(out[1]) == int(valid.sum())
        assert_close(out[0], want_sum, 1e-5, "loss sum")
    else:
        assert_close(out, want_sum / valid.sum(), 1e-5, "loss mean")


@pytest.mark.parametrize("bad,match", [
    (dict(nhead=3), "multiple of nhead"),
    (dict(activation_fn="swish"), "activation_fn"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(attention_impl="cudnn", attn_prob_dropout_ratio=0.1), "no attention-probability dropout"),
    (dict(hidden_dropout_ratio=1.0), "hidden_dropout_ratio"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        config(**bad)


def test_batch_token_limit(rng):
    cfg = config(max_batch_tokens=12)
    with pytest.raises(ValueError, match="max_batch_tokens=12"):
        cfg.check_tokens((4, 4))
    cfg.check_tokens((3, 4))
