"""Transformer layers built on the lsjax fused ops (flax.linen, stateless)."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsjax import ops
from lsjax.nn.attention import (MultiHeadAttention, Projection, _DEFAULT_INIT, bias_act_dropout,
                                bias_dropout_residual, dropout_key, partitioned, use_decode_dense)
from lsjax.nn.config import REMAT_POLICIES, LayerConfig


# Logical axes of the [batch, length, hidden] activations between layers (a no-op without rules).
ACTIVATION_AXES = ("batch", "length", "embed")


class LayerNorm(nn.Module):
    """Layer norm over the last axis with the fused op (``config.layer_norm_impl``); ``scale``/``bias`` ``[embed]``."""

    config: LayerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (d,), cfg.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (d,), cfg.param_dtype)
        norm = ops.layer_norm if cfg.layer_norm_impl == "fused" else ops.layer_norm_reference
        return norm(x.astype(cfg.dtype), scale, bias, eps=cfg.layer_norm_eps)

    def affine(self) -> tuple[jax.Array, jax.Array]:
        """``(scale, bias)``, for a kernel that fuses this layer norm (the params must exist)."""
        if not self.has_variable("params", "scale"):
            raise ValueError(f"{self.name}: a fused layer norm needs initialised params; initialise the model "
                             "with its forward pass first")
        return tuple(nn.meta.unbox(self.get_variable("params", name)) for name in ("scale", "bias"))


class Embedding(nn.Module):
    """Token embedding ``dropout(table[ids] * sqrt(hidden) + positions)`` (fused op).

    Positions are fairseq-style (pads skipped, see :func:`lsjax.ops.embedding`):
    sinusoidal, or a learned ``positions [max_positions, embed]`` table when
    ``max_positions > 0``. ``embedding [vocab, embed]`` is initialised
    ``N(0, hidden**-0.5)``; :meth:`attend` reuses it as the tied output projection.
    Pad tokens embed to zeros. Dropout rate: ``hidden_dropout_ratio``.
    """

    vocab_size: int
    config: LayerConfig
    max_positions: int = 0

    def setup(self):
        cfg = self.config
        d = cfg.hidden_size
        self.embedding = self.param("embedding", partitioned(nn.initializers.normal(d ** -0.5), ("vocab", "embed")),
                                    (self.vocab_size, d), cfg.param_dtype)
        if self.max_positions:
            self.positions = self.param("positions", partitioned(nn.initializers.normal(0.02), (None, "embed")),
                                        (self.max_positions, d), cfg.param_dtype)

    def __call__(self, ids: jax.Array, *, deterministic: bool = True, offset: int | jax.Array = 0) -> jax.Array:
        """int ``[batch, seq]`` ids -> ``[batch, seq, hidden]`` in the compute dtype.

        ``offset``: position of the first token (the step index in incremental decoding).
        Raises ``ValueError`` past ``max_seq_len`` / ``max_batch_tokens``.
        """
        cfg = self.config
        cfg.check_tokens(ids.shape, "token ids")
        positions = self.positions.astype(cfg.dtype) if self.max_positions else "sinusoidal"
        rate = cfg.hidden_dropout_ratio
        return ops.embedding(ids, self.embedding.astype(cfg.dtype), positions=positions, padding_id=cfg.padding_id,
                             rate=rate, key=dropout_key(self, rate, deterministic), offset=offset)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``[..., hidden] -> [..., vocab]`` logits (compute dtype)."""
        dtype = self.config.dtype
        return jnp.einsum("...d,vd->...v", x.astype(dtype), self.embedding.astype(dtype))


class FeedForward(nn.Module):
    """``residual + dropout(W2 dropout(act(W1 x + b1)) + b2)`` with fused bias ops.

    ``fc1/kernel [embed, mlp]`` (column parallel), ``fc1_bias [mlp]``,
    ``fc2/kernel [mlp, embed]`` (row parallel), ``fc2_bias [embed]``; the GEMMs have
    no bias, :func:`lsjax.ops.bias_act_dropout` / :func:`lsjax.ops.bias_dropout_residual`
    add it (left to XLA without dropout, see :func:`lsjax.nn.attention.bias_dropout_residual`).
    """

    config: LayerConfig

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool = True,
                 ln: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """``ln``: a pre-LN decode step fused, as in :class:`MultiHeadAttention` (``x`` un-normalised)."""
        cfg = self.config

        def dense(features, axes, name):
            return Projection(features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=partitioned(_DEFAULT_INIT, axes), name=name)

        def bias(n, axis, name):
            return self.param(name, partitioned(nn.initializers.zeros, (axis,)), (n,), cfg.param_dtype)

        if ln is not None:
            h = dense(cfg.intermediate_size, ("embed", "mlp"), "fc1")(
                x, fused=True, bias=bias(cfg.intermediate_size, "mlp", "fc1_bias"), ln=ln, eps=cfg.layer_norm_eps,
                activation=cfg.activation_fn)
            return dense(cfg.hidden_size, ("mlp", "embed"), "fc2")(
                h, fused=True, bias=bias(cfg.hidden_size, "embed", "fc2_bias"), residual=residual)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), "fc1")(x.astype(cfg.dtype))
        rate = cfg.activation_dropout_ratio
        h = bias_act_dropout(h, bias(cfg.intermediate_size, "mlp", "fc1_bias"), activation=cfg.activation_fn,
                             rate=rate, key=dropout_key(self, rate, deterministic))
        h = dense(cfg.hidden_size, ("mlp", "embed"), "fc2")(h)
        rate = cfg.hidden_dropout_ratio
        return bias_dropout_residual(h, bias(cfg.hidden_size, "embed", "fc2_bias"), residual.astype(cfg.dtype),
                                     rate=rate, key=dropout_key(self, rate, deterministic))


def _sublayer(x: jax.Array, block: Callable[..., jax.Array], norm: LayerNorm, pre_layer_norm: bool,
              fused: bool = False) -> jax.Array:
    """Pre-LN ``x + block(LN(x))`` or post-LN ``LN(x + block(x))``; ``block(h, residual, ln)`` adds the residual.

    ``fused``: a pre-LN decode step whose block applies the layer norm itself, given
    ``ln`` = its ``(scale, bias)`` (see :func:`lsjax.nn.attention.use_decode_dense`); else ``ln`` is None.
    """
    if fused:
        return block(x, x, norm.affine())
    return block(norm(x), x, None) if pre_layer_norm else norm(block(x, x, None))


class TransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward, pre- or post-LN (LightSeq ``TransformerEncoderLayer``)."""

    config: LayerConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None, *, deterministic: bool = True) -> jax.Array:
        """``x [batch, seq, hidden]``, ``key_mask`` bool ``[batch, seq]`` (True = token) -> same shape."""
        cfg = self.config
        attn = MultiHeadAttention(cfg, name="self_attn")
        ffn = FeedForward(cfg, name="ffn")
        x = _sublayer(x, lambda h, r, _: attn(h, r, key_mask=key_mask, deterministic=deterministic),
                      LayerNorm(cfg, name="self_attn_ln"), cfg.pre_layer_norm)
        x = _sublayer(x, lambda h, r, _: ffn(h, r, deterministic=deterministic), LayerNorm(cfg, name="ffn_ln"),
                      cfg.pre_layer_norm)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention (+ cross-attention) + feed-forward (LightSeq ``TransformerDecoderLayer``).

    With ``cross_attention=False`` it is a decoder-only (LM) layer.
    """

    config: LayerConfig
    cross_attention: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, memory: jax.Array | None = None, memory_mask: jax.Array | None = None,
                 cache_index: jax.Array | None = None, row_offsets: jax.Array | None = None, *,
                 deterministic: bool = True, decode: bool = False, max_decode_len: int | None = None) -> jax.Array:
        """``x [batch, tgt_len, hidden]``; ``memory [batch, src_len, hidden]`` with bool
        ``memory_mask [batch, src_len]``; decode arguments as in :class:`MultiHeadAttention`."""
        cfg = self.config
        pre = cfg.pre_layer_norm
        fused = use_decode_dense(cfg, x, decode=decode, deterministic=deterministic)
        self_attn = MultiHeadAttention(cfg, causal=True, name="self_attn")
        x = _sublayer(x, lambda h, r, ln: self_attn(h, r, deterministic=deterministic, decode=decode,
                                                    cache_index=cache_index, row_offsets=row_offsets,
                                                    max_decode_len=max_decode_len, ln=ln),
                      LayerNorm(cfg, name="self_attn_ln"), pre, fused)
        if self.cross_attention:
            cross = MultiHeadAttention(cfg, cross=True, name="cross_attn")
            x = _sublayer(x, lambda h, r, ln: cross(h, r, memory=memory, key_mask=memory_mask,
                                                    deterministic=deterministic, decode=decode, ln=ln),
                          LayerNorm(cfg, name="cross_attn_ln"), pre, fused)
        ffn = FeedForward(cfg, name="ffn")
        x = _sublayer(x, lambda h, r, ln: ffn(h, r, deterministic=deterministic, ln=ln),
                      LayerNorm(cfg, name="ffn_ln"), pre, fused)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


def layer_stack(layer: type[nn.Module], config: LayerConfig, num_layers: int, x: jax.Array,
                arrays: dict, *, name: str = "layers", layer_kwargs: dict | None = None, **static) -> jax.Array:
    """Applies ``num_layers`` layers ``layer(config, **layer_kwargs)(x, **arrays, **static)`` in sequence.

    Call it inside a compact parent. ``arrays`` are array (or None) keyword
    arguments shared by every layer; ``static`` are Python values (flags, sizes).
    ``config.remat_policy`` wraps each layer in ``nn.remat`` with that
    ``jax.checkpoint`` policy; ``config.scan_layers`` runs one ``nn.scan``ed layer
    (params stacked on a leading ``layers`` axis; ``cache``/``memory`` collections
    on axis 1, after the batch, so decode caches keep the batch leading).
    Submodules are named ``{name}_{i}`` or, scanned, ``{name}``.
    """
    layer_kwargs = layer_kwargs or {}

    def body(module, carry, arrays):
        return module(carry, **arrays, **static)

    policy = REMAT_POLICIES[config.remat_policy]
    if config.remat_policy != "none":
        body = nn.remat(body, policy=policy, prevent_cse=not config.scan_layers)
    if not config.scan_layers:
        for i in range(num_layers):
            x = body(layer(config, **layer_kwargs, name=f"{name}_{i}"), x, arrays)
        return x
    scanned = nn.scan(lambda module, carry, arrays: (body(module, carry, arrays), None),
                      variable_axes={"params": 0, "cache": 1, "memory": 1},
                      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,), length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(layer(config, **layer_kwargs, name=name), x, arrays)
    return x


class CrossEntropyLoss(nn.Module):
    """Label-smoothed cross-entropy over ``[..., vocab]`` logits with the fused op; pads ignored.

    ``reduction="sum"`` returns ``(loss_sum, token_count)`` (float32 scalar, int32
    scalar), the pieces for an exact mean over a data-parallel or accumulated batch;
    ``reduction="mean"`` returns ``loss_sum / max(token_count, 1)``.
    """

    label_smoothing: float = 0.0
    padding_id: int = 0
    reduction: str = "sum"

    def __call__(self, logits: jax.Array, labels: jax.Array):
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        loss, count = ops.cross_entropy(logits, labels, label_smoothing=self.label_smoothing,
                                        ignore_id=self.padding_id)
        total = jnp.sum(loss)
        if self.reduction == "mean":
            return total / jnp.maximum(count, 1).astype(total.dtype)
        return total, count
