"""lsjax.models: Transformer vs a plain-Flax reference, backends, cached decoding, remat/scan/vmap."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.flax_reference import RefTransformer, reference_params
from lsjax import ops
from lsjax.models import (Transformer, TransformerLM, decode_params, decoder_fns, load_model_config,
                          reorder_decode_cache)
from tests.helpers import assert_close

NO_DROPOUT = dict(attn_prob_dropout_ratio=0.0, activation_dropout_ratio=0.0, hidden_dropout_ratio=0.0)
TINY = dict(vocab_size=53, hidden_size=24, intermediate_size=40, nhead=3, num_encoder_layers=1,
            num_decoder_layers=1, max_seq_len=16, max_batch_tokens=64)


def tiny_config(**overrides):
    return load_model_config("transformer-tiny", **{**TINY, **NO_DROPOUT, **overrides})


def batch(rng, b=3, src_len=7, tgt_len=6, vocab=53):
    """Random right-padded src / tgt_in / tgt_out (pad 0, tokens in [4, vocab))."""
    def ids(length):
        x = rng.integers(4, vocab, size=(b, length))
        lengths = rng.integers(1, length + 1, size=b)
        lengths[0] = length
        return jnp.asarray(np.where(np.arange(length) < lengths[:, None], x, 0), jnp.int32)
    src, tgt = ids(src_len), ids(tgt_len)
    return src, tgt, jnp.where(tgt > 0, jnp.roll(tgt, -1, axis=1).at[:, -1].set(3), 0)


def random_params(model, rng, *args, scale=0.3):
    """Unboxed params with every leaf random (so zero-initialised biases and LN params are exercised)."""
    params = nn.meta.unbox(model.init(jax.random.key(0), *args))["params"]
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32) * scale, p.dtype), params)


@pytest.mark.parametrize("backend,pre_layer_norm", [("xla", True), ("cpu_ffi", False)])
def test_logits_match_plain_flax_reference(rng, backend, pre_layer_norm):
    cfg = tiny_config(pre_layer_norm=pre_layer_norm)
    src, tgt_in, _ = batch(rng)
    model = Transformer(cfg)
    params = random_params(model, rng, src, tgt_in)
    want = RefTransformer(cfg).apply({"params": reference_params(params)}, src, tgt_in)
    with ops.use_backend(backend):
        got = jax.jit(model.apply)({"params": params}, src, tgt_in)
    assert got.shape == (3, 6, cfg.vocab_size) and got.dtype == jnp.float32
    assert_close(got, want, 2e-5, f"logits ({backend})")


def test_backends_agree_on_loss_and_grads(rng):
    """Same params: the xla and cpu_ffi backends give the same loss and parameter gradients."""
    cfg = tiny_config()
    src, tgt_in, tgt_out = batch(rng)
    model = Transformer(cfg)
    params = random_params(model, rng, src, tgt_in)

    def loss(p):
        total, count = model.apply({"params": p}, src, tgt_in, tgt_out, method=Transformer.loss)
        return total / count

    results = {}
    for backend in ("xla", "cpu_ffi"):
        with ops.use_backend(backend):
            results[backend] = jax.jit(jax.value_and_grad(loss))(params)
    (l_xla, g_xla), (l_ffi, g_ffi) = results["xla"], results["cpu_ffi"]
    assert_close(l_ffi, l_xla, 1e-5, "loss")
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-4, "grad"), g_ffi, g_xla)


def test_dropout_is_active_and_seeded(rng):
    cfg = tiny_config(attn_prob_dropout_ratio=0.2, activation_dropout_ratio=0.1, hidden_dropout_ratio=0.1)
    src, tgt_in, _ = batch(rng)
    model = Transformer(cfg)
    params = random_params(model, rng, src, tgt_in)
    with ops.use_backend("cpu_ffi"):
        run = jax.jit(lambda k: model.apply({"params": params}, src, tgt_in, False, rngs={"dropout": k}))
        a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


@pytest.mark.parametrize("variant,backend", [(dict(), "xla"), (dict(scan_layers=True, pre_layer_norm=False), "xla"),
                                             (dict(), "cpu_ffi"), (dict(decode_dense_impl="fused"), "xla"),
                                             (dict(decode_dense_impl="fused", scan_layers=True), "cpu_ffi")])
def test_cached_decoding_equals_full_forward(rng, variant, backend):
    """Decode steps (decode_attention over the cache; with decode_dense_impl="fused" every projection
    one decode_dense, layer norm, bias, activation and residual included) give the full forward's logits."""
    cfg = tiny_config(**variant)
    src, tgt_in, _ = batch(rng)
    model = Transformer(cfg)
    params = random_params(model, rng, src, tgt_in)
    full = model.apply({"params": params}, src, tgt_in)
    max_len = tgt_in.shape[1] + 2
    tokens_to_logits, cache, encoded = decoder_fns(model, params, src, max_len)
    leaves = jax.tree.leaves(cache) + jax.tree.leaves(encoded)
    assert all(x.shape[0] == src.shape[0] for x in leaves if x.ndim), "leading dim must be the batch"
    enc_k = jax.tree.leaves(encoded["memory"])[0]
    assert enc_k.shape[-2:] == (cfg.nhead, cfg.head_dim) and enc_k.shape[-3] == src.shape[1]
    with ops.use_backend(backend):
        step = jax.jit(tokens_to_logits)
        hlo = step.lower(tgt_in[:, :1], cache, encoded).as_text()
        assert ("lsjax_decode_attention" in hlo) == (backend != "xla")
        assert ("lsjax_decode_dense" in hlo) == (backend != "xla" and cfg.decode_dense_impl == "fused")
        for t in range(tgt_in.shape[1]):
            logits, cache = step(tgt_in[:, t:t + 1], cache, encoded)
            assert logits.shape == (3, cfg.vocab_size) and logits.dtype == jnp.float32
            real = np.asarray(tgt_in[:, t] != 0)  # a pad step's logits are unused
            assert_close(logits[real], full[real, t], 2e-5, f"step {t}")
    assert int(cache["decoder"]["cache_index"]) == tgt_in.shape[1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("heads", [dict(), dict(hidden_size=512, nhead=8, intermediate_size=256)])
def test_cuda_decoding_equals_reference_backend(rng, dtype, scan_layers, heads):
    """On the GPU (CUDA decode kernels; cuDNN attention where "auto" takes it): decode steps give the
    reference backend's full-forward logits, and beam search (cache indirection) its tokens; with
    tiny heads (8) and transformer-base's (64, another decode kernel). Float32 GEMMs at full precision
    on both sides (XLA:GPU's default rounds them to TF32)."""
    from lsjax.decode import beam_search

    cfg = tiny_config(scan_layers=scan_layers, dtype=dtype, param_dtype=dtype, **heads)
    src, tgt_in, _ = batch(rng)
    model = Transformer(cfg)
    params = random_params(model, rng, src, tgt_in)
    max_len = tgt_in.shape[1] + 2
    tol = 1e-4 if dtype == "float32" else 3e-2

    def search(s):
        return beam_search(*decoder_fns(model, params, s, max_len), beam_size=3, max_len=max_len, eos_id=3,
                           reorder_cache=reorder_decode_cache)

    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        with ops.use_backend("xla"):
            full = model.apply({"params": params}, src, tgt_in)
            want = jax.jit(search)(src)
        with ops.use_backend("cuda"):
            tokens_to_logits, cache, encoded = decoder_fns(model, params, src, max_len)
            step = jax.jit(tokens_to_logits)
            for t in range(tgt_in.shape[1]):
                logits, cache = step(tgt_in[:, t:t + 1], cache, encoded)
                real = np.asarray(tgt_in[:, t] != 0)
                assert_close(logits[real], full[real, t], tol, f"step {t}")
            got = jax.jit(search)(src)
    if dtype == "float32":
        np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(want.sequences))
        assert_close(got.scores, want.scores, 1e-4, "beam scores")


def test_decoder_fns_cast_weights_once_with_the_same_results(rng):
    """float32 params, bfloat16 compute: decoder_fns casts the weights before the loop, and its
    encoder states and step logits equal those of the layers casting at every use, bit for bit."""
    cfg = tiny_config(dtype="bfloat16", param_dtype="float32")
    src, tgt_in, _ = batch(rng)
    model = Transformer(cfg)
    params = random_params(model, rng, src, tgt_in)
    cast = decode_params(params, cfg.dtype)
    kinds = {(p.ndim >= 2, p.dtype) for p in jax.tree.leaves(cast)}
    assert kinds == {(True, jnp.dtype(jnp.bfloat16)), (False, jnp.dtype(jnp.float32))}
    max_len = tgt_in.shape[1]
    tokens_to_logits, cache, encoded = decoder_fns(model, params, src, max_len)
    src_mask, state = model.apply({"params": params}, src, max_len, method=Transformer.init_decoding,
                                  mutable=["cache", "memory"])
    jax.tree.map(np.testing.assert_array_equal, encoded["memory"], state["memory"])
    ref_cache = state["cache"]
    for t in range(3):
        logits, cache = tokens_to_logits(tgt_in[:, t:t + 1], cache, encoded)
        ref, new = model.apply({"params": params, "cache": ref_cache, "memory": state["memory"]},
                               tgt_in[:, t:t + 1], src_mask, method=Transformer.decode_step, mutable=["cache"])
        ref_cache = new["cache"]
        assert logits.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(logits, np.float32), np.asarray(ref, np.float32))


@pytest.mark.parametrize("pre_layer_norm", [True, False])
def test_reference_flax_wmt_decoding_equals_lsjax_decoding(rng, pre_layer_norm):
    """The decode benchmark's peer (RefTransformer decoded the flax-wmt way) computes the same
    per-step logits as lsjax's cached decoder, and the same beam search result."""
    from benchmarks import flax_beam_search
    from benchmarks.flax_reference import ref_decoder_fns

    cfg = tiny_config(pre_layer_norm=pre_layer_norm)
    src, tgt_in, _ = batch(rng)
    model = Transformer(cfg)
    params = random_params(model, rng, src, tgt_in)
    ref = reference_params(params)
    max_len = tgt_in.shape[1] + 2
    ours, ours_cache, ours_enc = decoder_fns(model, params, src, max_len)
    peer, peer_cache, peer_enc = ref_decoder_fns(cfg, ref, src, max_len)
    assert all(x.shape[0] == src.shape[0] for x in jax.tree.leaves((peer_cache, peer_enc)) if x.ndim)
    tokens = jnp.where(tgt_in > 0, tgt_in, 5)  # a decoded prefix has no pads
    for t in range(tokens.shape[1]):
        want, ours_cache = ours(tokens[:, t:t + 1], ours_cache, ours_enc)
        got, peer_cache = peer(tokens[:, t:t + 1], peer_cache, peer_enc)
        assert_close(got, want, 2e-5, f"step {t}")
    run = lambda fns: jax.jit(lambda src: flax_beam_search.beam_search(  # noqa: E731
        *fns(src), beam_size=3, max_len=max_len, eos_id=3))(src)
    seqs, scores, _ = run(lambda s: decoder_fns(model, params, s, max_len))
    ref_seqs, ref_scores, _ = run(lambda s: ref_decoder_fns(cfg, ref, s, max_len))
    np.testing.assert_array_equal(np.asarray(ref_seqs), np.asarray(seqs))
    assert_close(ref_scores, scores, 1e-5, "beam scores")


@pytest.mark.parametrize("variant,backend", [(dict(), "cpu_ffi"), (dict(scan_layers=True), "xla")])
def test_beam_search_cache_indirection_equals_cache_gathers(rng, variant, backend):
    """reorder_decode_cache (only the row-offset table reordered, K/V caches read through it)
    gives the beam search result of gathering every cache leaf each step."""
    from lsjax.decode import beam_search, gather_rows

    cfg = tiny_config(**variant)
    src, tgt_in, _ = batch(rng)
    model = Transformer(cfg)
    params = random_params(model, rng, src, tgt_in, scale=1.0)
    max_len = 8

    def run(reorder):
        return jax.jit(lambda s: beam_search(*decoder_fns(model, params, s, max_len), beam_size=4, max_len=max_len,
                                             eos_id=3, reorder_cache=reorder))(src)

    with ops.use_backend(backend):
        got, want = run(reorder_decode_cache), run(gather_rows)
    np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(want.sequences))
    assert_close(got.scores, want.scores, 1e-5, "beam scores")
    _, cache, _ = decoder_fns(model, params, src, max_len)
    with pytest.raises(ValueError, match="no 'row_offsets' table"):
        reorder_decode_cache({"decoder": {"cache_index": cache["decoder"]["cache_index"]}}, jnp.arange(3))


def test_layer_norm_impl_xla_matches_fused(rng):
    """layer_norm_impl="xla" (the op's reference, left to XLA's fusion) computes the fused op's logits."""
    src, tgt_in, _ = batch(rng)
    fused, xla = Transformer(tiny_config()), Transformer(tiny_config(layer_norm_impl="xla"))
    params = random_params(fused, rng, src, tgt_in)
    with ops.use_backend("cpu_ffi"):
        want = jax.jit(lambda p: fused.apply({"params": p}, src, tgt_in))(params)
        hlo = jax.jit(lambda p: xla.apply({"params": p}, src, tgt_in)).lower(params).as_text()
        got = jax.jit(lambda p: xla.apply({"params": p}, src, tgt_in))(params)
    assert "lsjax_layer_norm" not in hlo
    assert_close(got, want, 2e-5, "logits")
    with pytest.raises(ValueError, match="layer_norm_impl must be one of"):
        tiny_config(layer_norm_impl="apex")


def test_language_model_cached_decoding(rng):
    cfg = tiny_config(num_encoder_layers=0, max_positions=16, activation_fn="gelu_tanh")
    ids = jnp.asarray(rng.integers(4, cfg.vocab_size, size=(2, 5)), jnp.int32)
    model = TransformerLM(cfg)
    params = random_params(model, rng, ids)
    assert params["embed"]["positions"].shape == (16, cfg.hidden_size)
    full = model.apply({"params": params}, ids)
    tokens_to_logits, cache, encoded = decoder_fns(model, params, ids, 8)
    for t in range(5):
        logits, cache = tokens_to_logits(ids[:, t:t + 1], cache, encoded)
        assert_close(logits, full[:, t], 2e-5, f"step {t}")
    total, count = model.apply({"params": params}, ids, jnp.roll(ids, -1, 1), method=TransformerLM.loss)
    assert int(count) == ids.size and np.isfinite(float(total))


def test_vmap_over_models_matches_loop(rng):
    cfg = tiny_config()
    batches = [batch(rng) for _ in range(2)]
    src, tgt_in, tgt_out = (jnp.stack(x) for x in zip(*batches))
    model = Transformer(cfg)
    params = random_params(model, rng, src[0], tgt_in[0])
    with ops.use_backend("cpu_ffi"):
        f = lambda s, ti: model.apply({"params": params}, s, ti)  # noqa: E731
        got = jax.jit(jax.vmap(f))(src, tgt_in)
        for i in range(2):
            assert_close(got[i], f(src[i], tgt_in[i]), 2e-5, f"vmap row {i}")


def test_logical_axis_names(rng):
    src, tgt_in, _ = batch(rng)
    boxed = jax.eval_shape(Transformer(tiny_config(scan_layers=True)).init, jax.random.key(0), src, tgt_in)["params"]
    names = jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert names["embed"]["embedding"] == ("vocab", "embed")
    attn = names["encoder"]["layers"]["self_attn"]
    assert attn["qkv"]["kernel"] == ("layers", "embed", None, "heads", "kv")
    assert attn["out"]["kernel"] == ("layers", "heads", "kv", "embed")
    ffn = names["decoder"]["layers"]["ffn"]
    assert ffn["fc1"]["kernel"] == ("layers", "embed", "mlp") and ffn["fc2"]["kernel"] == ("layers", "mlp", "embed")
    assert names["decoder"]["layers"]["cross_attn"]["kv"]["kernel"] == ("layers", "embed", None, "heads", "kv")


def test_bf16_compute_with_fp32_params(rng):
    src, tgt_in, _ = batch(rng)
    model32, model16 = Transformer(tiny_config()), Transformer(tiny_config(dtype="bfloat16"))
    params = random_params(model32, rng, src, tgt_in, scale=0.1)
    want = model32.apply({"params": params}, src, tgt_in)
    with ops.use_backend("cpu_ffi"):
        got = model16.apply({"params": params}, src, tgt_in)
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, 5e-2, "bf16 logits")


def test_bad_inputs_rejected(rng):
    cfg = tiny_config()
    model = Transformer(cfg)
    src, tgt_in, _ = batch(rng)
    params = random_params(model, rng, src, tgt_in)
    long = jnp.ones((1, cfg.max_seq_len + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model.apply({"params": params}, long, tgt_in[:1])
    wide = jnp.ones((cfg.max_batch_tokens // 8 + 1, 8), jnp.int32)
    with pytest.raises(ValueError, match="max_batch_tokens=64"):
        model.apply({"params": params}, wide, wide)
    with pytest.raises(ValueError, match="max_decode_len"):
        decoder_fns(model, params, src, cfg.max_seq_len + 1)
    tokens_to_logits, cache, encoded = decoder_fns(model, params, src, 8)
    with pytest.raises(ValueError, match="one token per row"):
        tokens_to_logits(tgt_in[:, :2], cache, encoded)
    with pytest.raises(ValueError, match="attn_prob_dropout_ratio=0"):
        tiny_config(attention_impl="cudnn", attn_prob_dropout_ratio=0.1)
    with pytest.raises(ValueError, match="TransformerLM"):
        Transformer(tiny_config(num_encoder_layers=0)).init(jax.random.key(0), src, tgt_in)


def test_yaml_configs():
    base = load_model_config("transformer-base", vocab_size=8000, dtype="bfloat16")
    assert (base.hidden_size, base.intermediate_size, base.nhead, base.num_encoder_layers) == (512, 2048, 8, 6)
    assert base.vocab_size == 8000 and base.dtype == jnp.bfloat16 and base.param_dtype == jnp.float32
    big = load_model_config("transformer-big")
    assert (big.hidden_size, big.intermediate_size, big.nhead) == (1024, 4096, 16)
    gpt2 = load_model_config("gpt2-small")
    assert (gpt2.vocab_size, gpt2.num_encoder_layers, gpt2.max_positions) == (50257, 0, 1024)
    with pytest.raises(ValueError, match="unknown model config fields"):
        load_model_config("transformer-tiny", hiden_size=3)
    with pytest.raises(FileNotFoundError, match="transformer-base"):
        load_model_config("no-such-model")
