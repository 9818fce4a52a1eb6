"""Plain-Flax Transformer written the standard way (no lsjax ops): the reference that
the lsjax layers are tested against and benchmarked against.

``nn.Embed`` + sinusoids, ``nn.MultiHeadDotProductAttention``, ``nn.LayerNorm``,
``nn.Dense``, ``nn.Dropout``; the same layout (pre/post-LN, fairseq positions,
tied output projection) as :mod:`lsjax.models`, so :func:`reference_params` maps
lsjax params onto it exactly. ``config`` is any object with the
:class:`lsjax.nn.LayerConfig` / :class:`lsjax.models.TransformerConfig` fields.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ACT = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def sinusoids(positions: jax.Array, dim: int) -> jax.Array:
    """fairseq sinusoidal embedding of integer positions: ``[..., dim]`` float32 (sin half, cos half)."""
    half = dim // 2
    freq = np.exp(np.arange(half) * -(math.log(10000.0) / max(half - 1, 1))).astype(np.float32)
    arg = positions.astype(jnp.float32)[..., None] * freq
    out = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
    return jnp.pad(out, [(0, 0)] * positions.ndim + [(0, dim % 2)])


class RefFeedForward(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.config
        dense = lambda n, name: nn.Dense(n, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)  # noqa: E731
        h = _ACT[cfg.activation_fn](dense(cfg.intermediate_size, "fc1")(x))
        h = nn.Dropout(cfg.activation_dropout_ratio)(h, deterministic=deterministic)
        return dense(cfg.hidden_size, "fc2")(h)


class RefAttention(nn.Module):
    config: Any
    decode: bool = False  # flax's incremental decoding: K/V cached in the "cache" collection

    @nn.compact
    def __call__(self, x, kv, mask, deterministic):
        cfg = self.config
        return nn.MultiHeadDotProductAttention(
            num_heads=cfg.nhead, qkv_features=cfg.hidden_size, out_features=cfg.hidden_size,
            dropout_rate=cfg.attn_prob_dropout_ratio, broadcast_dropout=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, decode=self.decode, name="mha")(x, kv, kv, mask=mask,
                                                                          deterministic=deterministic)


def _sublayer(x, fn, cfg, name, deterministic):
    norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    drop = nn.Dropout(cfg.hidden_dropout_ratio)
    if cfg.pre_layer_norm:
        return x + drop(fn(norm(x)), deterministic=deterministic)
    return norm(x + drop(fn(x), deterministic=deterministic))


class RefEncoderLayer(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, x, key_mask, deterministic=True):
        cfg = self.config
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attn, ffn = RefAttention(cfg, name="self_attn"), RefFeedForward(cfg, name="ffn")
        x = _sublayer(x, lambda h: attn(h, h, mask, deterministic), cfg, "self_attn_ln", deterministic)
        return _sublayer(x, lambda h: ffn(h, deterministic), cfg, "ffn_ln", deterministic)


class RefDecoderLayer(nn.Module):
    """With ``decode``, ``x`` is one position ``[batch, 1, d]`` and the self-attention K/V are
    cached (flax's ``decode=True``); the cross-attention projects ``memory`` again at every step,
    as flax's examples/wmt does."""

    config: Any
    cross_attention: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, memory=None, memory_mask=None, deterministic=True):
        cfg = self.config
        causal = None if self.decode else nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
        attn = RefAttention(cfg, self.decode, name="self_attn")
        x = _sublayer(x, lambda h: attn(h, h, causal, deterministic), cfg, "self_attn_ln", deterministic)
        if self.cross_attention:
            cross = RefAttention(cfg, name="cross_attn")
            mask = None if memory_mask is None else memory_mask[:, None, None, :]
            x = _sublayer(x, lambda h: cross(h, memory, mask, deterministic), cfg, "cross_attn_ln",
                          deterministic)
        ffn = RefFeedForward(cfg, name="ffn")
        return _sublayer(x, lambda h: ffn(h, deterministic), cfg, "ffn_ln", deterministic)


class RefTransformer(nn.Module):
    """Encoder-decoder with one shared embedding (sinusoidal positions) tied to the output.

    ``decode=True`` builds the incremental decoder of flax's examples/wmt: :meth:`decode` then
    takes one target position per call, caching self-attention K/V and the position in "cache".
    """

    config: Any
    decode: bool = False

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout_ratio)
        self.encoder_layers = [RefEncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)]
        self.decoder_layers = [RefDecoderLayer(cfg, decode=self.decode) for _ in range(cfg.num_decoder_layers)]
        if cfg.pre_layer_norm:
            norm = lambda: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,  # noqa: E731
                                        param_dtype=cfg.param_dtype)
            self.encoder_final_ln, self.decoder_final_ln = norm(), norm()
        if self.decode:  # the position of the next decoded token; advances once the cache exists
            self.cache_ready = self.has_variable("cache", "position")
            self.position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))

    def _embed_ids(self, ids, positions, deterministic):
        cfg = self.config
        nonpad = ids != cfg.padding_id
        x = self.embed(ids) * math.sqrt(cfg.hidden_size) + sinusoids(positions, cfg.hidden_size).astype(cfg.dtype)
        x = jnp.where(nonpad[..., None], x, 0).astype(cfg.dtype)
        return self.embed_dropout(x, deterministic=deterministic)

    def encode(self, src, deterministic=True):
        """``(memory [batch, src_len, d], src_mask bool [batch, src_len])``."""
        src_mask = src != self.config.padding_id
        x = self._embed_ids(src, jnp.cumsum(src_mask, axis=-1) - 1, deterministic)
        for layer in self.encoder_layers:
            x = layer(x, src_mask, deterministic)
        return (self.encoder_final_ln(x) if self.config.pre_layer_norm else x), src_mask

    def decode_logits(self, tgt_in, memory, src_mask, deterministic=True):
        """Logits ``[batch, tgt_len, vocab]``; with ``decode``, of one position per call."""
        if self.decode:
            positions = jnp.broadcast_to(self.position.value, tgt_in.shape)
            if self.cache_ready:
                self.position.value = self.position.value + 1
        else:
            positions = jnp.cumsum(tgt_in != self.config.padding_id, axis=-1) - 1
        y = self._embed_ids(tgt_in, positions, deterministic)
        for layer in self.decoder_layers:
            y = layer(y, memory, src_mask, deterministic)
        return self.embed.attend(self.decoder_final_ln(y) if self.config.pre_layer_norm else y)

    def __call__(self, src, tgt_in, deterministic=True):
        memory, src_mask = self.encode(src, deterministic)
        return self.decode_logits(tgt_in, memory, src_mask, deterministic)


def ref_decoder_fns(config: Any, params: dict, src: jax.Array, max_len: int):
    """flax-wmt-style incremental decoding of :class:`RefTransformer` under the decoding contract of
    :func:`lsjax.models.decoder_fns`: ``(tokens_to_logits, init_cache, encoded)`` with
    ``encoded = {"memory": encoder output [batch, src_len, d], "src_mask"}`` (K/V of the memory
    are projected again at every step) and the self-attention cache sized ``max_len``."""
    memory, src_mask = RefTransformer(config).apply({"params": params}, src, method=RefTransformer.encode)
    model = RefTransformer(config, decode=True)
    dummy = jnp.zeros((src.shape[0], max_len), jnp.int32)
    cache = model.apply({"params": params}, dummy, memory, src_mask, method=RefTransformer.decode_logits,
                        mutable=["cache"])[1]["cache"]

    def tokens_to_logits(token_ids, cache, encoded):
        logits, new = model.apply({"params": params, "cache": cache}, token_ids, encoded["memory"],
                                  encoded["src_mask"], method=RefTransformer.decode_logits, mutable=["cache"])
        return logits[:, -1].astype(jnp.float32), new["cache"]

    return tokens_to_logits, cache, {"memory": memory, "src_mask": src_mask}


# ----------------------------------------------------- lsjax -> reference params --

def _dense(kernel, bias):
    return {"kernel": kernel, "bias": bias}


def attention_params(p: dict) -> dict:
    """lsjax ``MultiHeadAttention`` params (self: ``qkv``, cross: ``q`` + ``kv``) -> ``RefAttention``."""
    if "qkv" in p:
        k3, b3 = p["qkv"]["kernel"], p["qkv"]["bias"]
        q, k, v = (_dense(k3[:, i], b3[i]) for i in range(3))
    else:
        q = p["q"]
        k, v = (_dense(p["kv"]["kernel"][:, i], p["kv"]["bias"][i]) for i in range(2))
    return {"mha": {"query": q, "key": k, "value": v, "out": _dense(p["out"]["kernel"], p["out_bias"])}}


def layer_params(p: dict) -> dict:
    """lsjax encoder/decoder layer params -> ``RefEncoderLayer`` / ``RefDecoderLayer`` params."""
    out = {}
    for name, sub in p.items():
        if name.endswith("_ln"):
            out[name] = sub
        elif name == "ffn":
            out[name] = {"fc1": _dense(sub["fc1"]["kernel"], sub["fc1_bias"]),
                         "fc2": _dense(sub["fc2"]["kernel"], sub["fc2_bias"])}
        else:
            out[name] = attention_params(sub)
    return out


def reference_params(p: dict) -> dict:
    """Unboxed, unscanned lsjax ``Transformer`` params (shared embedding) -> ``RefTransformer`` params."""
    out = {"embed": {"embedding": p["embed"]["embedding"]}}
    for side in ("encoder", "decoder"):
        for name, sub in p[side].items():
            out[f"{side}_{name}"] = sub if name == "final_ln" else layer_params(sub)
    return out
