"""Multi-head attention on the fused attention-softmax op, with a decode KV cache."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsjax import ops
from lsjax.ops.decode_attention import MAX_KEYS, source_rows
from lsjax.nn.config import LayerConfig

_DEFAULT_INIT = nn.initializers.xavier_uniform()


def partitioned(init, axes: tuple[str | None, ...]):
    """``init`` with logical axis names attached (``nn.with_logical_partitioning``)."""
    return nn.with_logical_partitioning(init, axes)


def dropout_key(module: nn.Module, rate: float, deterministic: bool) -> jax.Array | None:
    """A fresh key of the ``"dropout"`` stream, or None when no dropout applies."""
    return None if deterministic or rate == 0 else module.make_rng("dropout")


def bias_dropout_residual(x: jax.Array, bias: jax.Array, residual: jax.Array, *, rate: float,
                          key: jax.Array | None) -> jax.Array:
    """``residual + dropout(x + bias)`` after a GEMM: the fused op while dropout applies.

    Without dropout (``key`` None: deterministic, or rate 0) there is nothing for a kernel
    of ours to fuse that XLA does not fold into the producing GEMM's epilogue (or, for
    the small row counts of a decode step, its split-K reduction), where the add costs
    no launch at all; so it is left to XLA as
    :func:`lsjax.ops.bias_dropout_residual_reference` (the same float32 arithmetic).
    """
    if key is None:
        return ops.bias_dropout_residual_reference(x, bias, residual, rate=0.0, key=None)
    return ops.bias_dropout_residual(x, bias, residual, rate=rate, key=key)


def bias_act_dropout(x: jax.Array, bias: jax.Array, *, activation: str, rate: float,
                     key: jax.Array | None) -> jax.Array:
    """``dropout(act(x + bias))`` after a GEMM; without dropout left to XLA, as
    :func:`bias_dropout_residual` explains."""
    if key is None:
        return ops.bias_act_dropout_reference(x, bias, activation=activation, rate=0.0, key=None)
    return ops.bias_act_dropout(x, bias, activation=activation, rate=rate, key=key)


def resolve_attention_impl(impl: str, dtype, head_dim: int, dropout: bool) -> str:
    """The attention path ``impl`` (a ``LayerConfig.attention_impl``) takes for one call.

    ``"auto"`` is ``"cudnn"`` on the ``"cuda"`` backend for a call without attention
    dropout in float16/bfloat16 with ``head_dim`` a multiple of 8 up to 128 (cuDNN flash
    attention's range), else ``"fused"``; other values are returned as they are.
    """
    if impl != "auto":
        return impl
    flash = (ops.get_backend() == "cuda" and not dropout and head_dim % 8 == 0 and head_dim <= 128
             and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16))
    return "cudnn" if flash else "fused"


def use_decode_dense(cfg: LayerConfig, x: jax.Array, *, decode: bool, deterministic: bool) -> bool:
    """Whether a pre-LN decode step of ``x [batch, 1, hidden]`` runs its projections as
    :func:`lsjax.ops.decode_dense` (``cfg.decode_dense_impl == "fused"``; never with dropout)."""
    rates = (cfg.attn_prob_dropout_ratio, cfg.activation_dropout_ratio, cfg.hidden_dropout_ratio)
    return (decode and cfg.pre_layer_norm and x.shape[1] == 1 and cfg.decode_dense_impl == "fused"
            and (deterministic or not any(rates)))


class Projection(nn.DenseGeneral):
    """``nn.DenseGeneral`` (the same params and results) that can also run a decode step's
    projection and its epilogue as one :func:`lsjax.ops.decode_dense`, or hand a projection
    to heads to :func:`lsjax.ops.split_heads` (its bias add fused with the head split)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, fused: bool = False, bias: jax.Array | None = None,
                 ln: tuple[jax.Array, jax.Array] | None = None, eps: float = 1e-5, activation: str = "none",
                 residual: jax.Array | None = None, split_heads: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        """``x [..., *in_dims]`` -> ``[..., *features]``.

        With ``fused``: ``act(layer_norm(x) @ kernel + b) + residual`` in one kernel, where
        ``b`` is this projection's own bias, or ``bias`` when it has none; ``ln`` (scale,
        bias) and ``residual`` (``[..., *features]``) are optional. Needs the params to
        exist (initialise with the model's forward pass).

        With ``split_heads`` (features ``(n, heads, head_dim)`` or ``(heads, head_dim)``,
        ``x [batch, length, embed]``): the GEMM without its bias, then
        :func:`lsjax.ops.split_heads`: a tuple of ``n`` (or 1) ``[batch, heads, length,
        head_dim]`` arrays, each ``x @ kernel + bias`` of one projection.
        """
        if split_heads:
            return self._split_heads(x)
        if not fused:
            return super().__call__(x)
        if not self.has_variable("params", "kernel"):
            raise ValueError(f"{self.name}: a fused decode projection needs initialised params; "
                             "initialise the model with its forward pass first")
        n_in = len(self.axis) if isinstance(self.axis, tuple) else 1
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        if (bias is not None) == self.use_bias:
            raise ValueError(f"{self.name}: give the fused projection a bias exactly when it has none of its own")
        if self.use_bias:
            bias = nn.meta.unbox(self.get_variable("params", "bias"))
        lead = x.shape[:-n_in]
        kernel = nn.meta.unbox(self.get_variable("params", "kernel")).astype(self.dtype)
        n = math.prod(features)
        y = ops.decode_dense(x.astype(self.dtype).reshape(math.prod(lead), -1), kernel.reshape(-1, n),
                             bias.reshape(n), ln_scale=None if ln is None else ln[0],
                             ln_bias=None if ln is None else ln[1], eps=eps, activation=activation,
                             residual=None if residual is None else residual.astype(self.dtype).reshape(-1, n))
        return y.reshape(lead + features)

    def _split_heads(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if not self.has_variable("params", "kernel"):
            super().__call__(x)  # initialisation: creates the params as DenseGeneral does
        kernel = nn.meta.unbox(self.get_variable("params", "kernel")).astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if y.ndim == 4:  # one projection: [batch, length, heads, head_dim]
            y = y[:, :, None]
        if not self.use_bias:
            return ops.split_heads(y)
        # In the compute dtype, as DenseGeneral adds it (the same results; no convert when params are in it).
        bias = nn.meta.unbox(self.get_variable("params", "bias")).astype(self.dtype)
        return ops.split_heads(y, bias.reshape(y.shape[2:]))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None, causal: bool,
                          impl: str = "fused", dropout_rate: float = 0.0, key: jax.Array | None = None,
                          heads_major: bool = False) -> jax.Array:
    """Scaled dot-product attention over heads.

    Args:
      q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, k_len, heads, head_dim]``
        (with ``heads_major``: ``[batch, heads, len, head_dim]``, as the batched GEMMs read
        them; ``"fused"``/``"xla"`` only).
      key_mask: optional bool ``[batch, k_len]``, True = attend.
      causal: bottom-right aligned causal mask (see :func:`lsjax.ops.attention_softmax`).
      impl: ``"fused"``: score GEMM, :func:`lsjax.ops.attention_softmax` (masks, softmax,
        dropout in one op), value GEMM. ``"xla"``: the same with the op's pure-JAX reference
        (no dropout). ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``
        (key padding given as lengths, so keys must be right-padded; no dropout).
      dropout_rate, key: attention-probability dropout (fused path only).

    Returns:
      ``[batch, q_len, heads, head_dim]`` in ``q``'s dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if key is not None and dropout_rate > 0 and impl != "fused":
        raise ValueError(f"attention_impl={impl!r} has no attention dropout; use attention_impl='fused'")
    if impl in ("fused", "xla"):
        # (jax.nn.dot_product_attention's own XLA path asks XLA:GPU for a float16 dot algorithm it rejects.)
        softmax = ops.attention_softmax if impl == "fused" else ops.attention_softmax_reference
        q_in, kv_in = ("bhqd", "bhkd") if heads_major else ("bqhd", "bkhd")
        scores = jnp.einsum(f"{q_in},{kv_in}->bhqk", q, k)
        probs = softmax(scores, key_padding_mask=key_mask, causal=causal, scale=scale, dropout_rate=dropout_rate,
                        key=key)
        return jnp.einsum(f"bhqk,{kv_in}->bqhd", probs, v)
    if heads_major:
        raise ValueError(f"attention_impl={impl!r} takes [batch, len, heads, head_dim] inputs, not heads_major")
    lengths = None if key_mask is None else jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=lengths,
                                        implementation=impl)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention block: ``residual + dropout(attention(x) @ W_o + b_o)``.

    The Q/K/V and output projections are XLA GEMMs (``nn.DenseGeneral``); self-attention
    projects Q, K and V with one GEMM. The output bias, hidden dropout and residual add
    are one fused :func:`lsjax.ops.bias_dropout_residual` op (left to XLA without
    dropout, see :func:`bias_dropout_residual`), so the output projection has no bias
    of its own. Parameters and their logical axes (Megatron layout: Q/K/V
    split by heads = column parallel, output projection by heads = row parallel):
    ``qkv/kernel [embed, 3, heads, kv]`` (self) or ``q/kernel [embed, heads, kv]`` +
    ``kv/kernel [embed, 2, heads, kv]`` (cross), ``out/kernel [heads, kv, embed]``,
    ``out_bias [embed]``.

    Attributes:
      config: the layer config.
      cross: keys/values come from ``memory`` (the encoder output) instead of ``x``.
      causal: causal mask (decoder self-attention).
    """

    config: LayerConfig
    cross: bool = False
    causal: bool = False

    def _dense(self, features: tuple[int, ...], axes: tuple, name: str) -> Projection:
        cfg = self.config
        return Projection(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                               kernel_init=partitioned(_DEFAULT_INIT, ("embed",) + axes),
                               bias_init=partitioned(nn.initializers.zeros, axes))

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, memory: jax.Array | None = None,
                 key_mask: jax.Array | None = None, deterministic: bool = True, decode: bool = False,
                 cache_index: jax.Array | None = None, row_offsets: jax.Array | None = None,
                 max_decode_len: int | None = None, ln: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """Attends and adds the result to ``residual``.

        Args:
          x: ``[batch, q_len, hidden]`` queries (and keys/values for self-attention).
          residual: ``[batch, q_len, hidden]`` added to the block output.
          memory: ``[batch, k_len, hidden]`` keys/values source of cross-attention
            (not needed in decode steps: the projected memory is cached).
          key_mask: optional bool ``[batch, k_len]``, True = attend (source padding).
          deterministic: no dropout if True.
          decode: incremental decoding: one token per row, attended with
            :func:`lsjax.ops.decode_attention` (one kernel; caches of more than
            8192 keys, or attention dropout, take the :func:`dot_product_attention`
            path). Self-attention keeps ``cached_key`` /
            ``cached_value`` ``[batch, max_decode_len, heads, head_dim]`` in the
            ``"cache"`` collection; cross-attention keeps the projected memory as
            ``cached_key`` / ``cached_value`` in the ``"memory"`` collection (projected
            once per source). The first decode call (no cache yet) only creates them.
          cache_index: int32 scalar, the step being decoded (None on the creating call).
          row_offsets: optional int32 ``[batch, max_decode_len]``: self-attention reads
            cached key ``j`` of row ``b`` from row ``b + row_offsets[b, j]`` (a beam
            search's cache indirection, see :func:`lsjax.ops.decode_attention`).
          max_decode_len: cache length, needed on the creating call.
          ln: a pre-LN decode step fused (see :func:`use_decode_dense`): ``x`` is the
            un-normalised residual stream and ``ln`` the layer norm's ``(scale, bias)``;
            the projections then run as :func:`lsjax.ops.decode_dense`, the layer norm
            fused into the Q (QKV) projection and the bias and residual add into the output one.

        Returns:
          ``[batch, q_len, hidden]`` in the compute dtype.
        """
        cfg = self.config
        fused = dict(fused=True, ln=ln, eps=cfg.layer_norm_eps) if ln is not None else {}
        h, dh = cfg.nhead, cfg.head_dim
        x = x.astype(cfg.dtype)
        rate = cfg.attn_prob_dropout_ratio
        key = dropout_key(self, rate, deterministic)
        impl = resolve_attention_impl(cfg.attention_impl, cfg.dtype, dh, key is not None)
        # A decode step without attention dropout takes one lsjax kernel (instead of GEMM,
        # transposes, softmax, GEMM, and for self-attention the cache writes).
        one_kernel = decode and key is None and cfg.attention_impl in ("auto", "fused") and x.shape[1] == 1
        scale = 1.0 / math.sqrt(dh)
        if impl == "fused" and not decode:
            # Projections straight to [batch, heads, len, head_dim], bias added on the way.
            if self.cross:
                (q,) = self._dense((h, dh), ("heads", "kv"), "q")(x, split_heads=True)
                k, v = self._dense((2, h, dh), (None, "heads", "kv"), "kv")(memory.astype(cfg.dtype),
                                                                             split_heads=True)
            else:
                q, k, v = self._dense((3, h, dh), (None, "heads", "kv"), "qkv")(x, split_heads=True)
            out = dot_product_attention(q, k, v, key_mask=key_mask, causal=self.causal, impl=impl,
                                        dropout_rate=rate, key=key, heads_major=True)
            return self._output(out, residual, fused, deterministic)
        if self.cross:
            q = self._dense((h, dh), ("heads", "kv"), "q")(x, **fused)
            kv_proj = self._dense((2, h, dh), (None, "heads", "kv"), "kv")
            if decode:
                k, v = self._memory_kv(kv_proj, memory)
            else:
                kv = kv_proj(memory.astype(cfg.dtype))
                k, v = kv[:, :, 0], kv[:, :, 1]
            if one_kernel and k.shape[1] <= MAX_KEYS:
                out, attend = ops.decode_attention(q[:, 0], k, v, key_mask, scale=scale)[:, None], None
            else:
                out, attend = None, (q, k, v, key_mask, self.causal)
        else:
            qkv = self._dense((3, h, dh), (None, "heads", "kv"), "qkv")(x, **fused)
            if decode:
                out, attend = self._decode_step(qkv, key_mask, cache_index, row_offsets, max_decode_len, one_kernel,
                                                scale)
            else:
                out, attend = None, (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_mask, self.causal)
        if out is None:
            q, k, v, key_mask, causal = attend
            out = dot_product_attention(q, k, v, key_mask=key_mask, causal=causal, impl=impl, dropout_rate=rate,
                                        key=key)
        return self._output(out, residual, fused, deterministic)

    def _output(self, out: jax.Array, residual: jax.Array, fused: dict, deterministic: bool) -> jax.Array:
        """``residual + dropout(out @ W_o + b_o)`` of the attention output ``out [batch, len, heads, head_dim]``."""
        cfg = self.config
        out_proj = Projection(cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, name="out",
                              kernel_init=partitioned(_DEFAULT_INIT, ("heads", "kv", "embed")))
        bias = self.param("out_bias", partitioned(nn.initializers.zeros, ("embed",)), (cfg.hidden_size,),
                          cfg.param_dtype)
        if fused:
            return out_proj(out, fused=True, bias=bias, residual=residual)
        out = out_proj(out)
        rate = cfg.hidden_dropout_ratio
        return bias_dropout_residual(out, bias, residual.astype(cfg.dtype), rate=rate,
                                     key=dropout_key(self, rate, deterministic))

    def _memory_kv(self, kv_proj: nn.Module, memory: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        if memory is None and not self.has_variable("memory", "cached_key"):
            raise ValueError("cross-attention decode step without a projected memory: prime the decoder "
                             "first (lsjax.models.decoder_fns) and pass the 'memory' collection")

        def project():
            return kv_proj(memory.astype(self.config.dtype))

        kv = None if self.has_variable("memory", "cached_key") else project()
        k = self.variable("memory", "cached_key", lambda: kv[:, :, 0]).value
        v = self.variable("memory", "cached_value", lambda: kv[:, :, 1]).value
        return k, v

    def _decode_step(self, qkv, key_mask, cache_index, row_offsets, max_decode_len, one_kernel, scale):
        """Writes this step's K/V (``qkv [batch, 1, 3, heads, head_dim]``) into the cache.

        Returns ``(out, None)`` when :func:`lsjax.ops.decode_self_attention` wrote the cache
        and attended in one kernel, else ``(None, (q, k, v, key_mask, causal))`` to attend
        with :func:`dot_product_attention` (the creating call only sizes the cache: it
        attends to its own tokens).
        """
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if not self.has_variable("cache", "cached_key"):  # creating call: size the cache only
            if max_decode_len is None:
                raise ValueError("the first decode call must give max_decode_len (the KV cache length)")
            shape = (k.shape[0], max_decode_len) + k.shape[2:]
            self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
            self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
            return None, (q, k, v, key_mask, self.causal)
        cached_k = self.variable("cache", "cached_key")
        cached_v = self.variable("cache", "cached_value")
        batch, max_len = cached_k.value.shape[:2]
        if k.shape[1] != 1:
            raise ValueError(f"decode steps take one token per row, got q_len={k.shape[1]}")
        if one_kernel and max_len <= MAX_KEYS:  # causal: keys up to cache_index, no mask to build per step
            out, cached_k.value, cached_v.value = ops.decode_self_attention(
                qkv[:, 0].astype(cached_k.value.dtype), cached_k.value, cached_v.value, cache_index,
                scale=scale, row_offsets=row_offsets, causal=True)
            return out[:, None].astype(q.dtype), None
        filled = jnp.broadcast_to(jnp.arange(max_len) <= cache_index, (batch, max_len))
        start = (0, cache_index, 0, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), start)
        k, v = cached_k.value, cached_v.value
        if row_offsets is not None:
            k, v = source_rows(k, row_offsets), source_rows(v, row_offsets)
        return None, (q, k, v, filled, False)
