"""Encoder-decoder Transformer and decoder-only LM on the lsjax layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsjax.models.config import TransformerConfig
from lsjax.ops.decode_attention import reorder_row_offsets
from lsjax.nn import CrossEntropyLoss, Embedding, LayerNorm, TransformerDecoderLayer, TransformerEncoderLayer
from lsjax.nn import layer_stack


class Encoder(nn.Module):
    """Embedding, ``num_encoder_layers`` encoder layers, final LN (pre-LN only)."""

    config: TransformerConfig
    embed: Embedding

    @nn.compact
    def __call__(self, src: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """int ``[batch, src_len]`` -> (``[batch, src_len, hidden]``, bool mask ``[batch, src_len]``, True = token)."""
        cfg = self.config
        mask = src != cfg.padding_id
        x = self.embed(src, deterministic=deterministic)
        x = layer_stack(TransformerEncoderLayer, cfg, cfg.num_encoder_layers, x, dict(key_mask=mask),
                        deterministic=deterministic)
        if cfg.pre_layer_norm:
            x = LayerNorm(cfg, name="final_ln")(x)
        return x, mask


class Decoder(nn.Module):
    """Embedding, ``num_decoder_layers`` decoder layers, final LN, tied output projection.

    Incremental decoding (``decode=True``): the first call creates the caches
    (``cache`` collection: ``cache_index`` int32 scalar and ``row_offsets`` int32
    ``[batch, max_decode_len]`` here, ``cached_key`` / ``cached_value``
    ``[batch, max_decode_len, heads, head_dim]`` per self-attention, where key ``j``
    of row ``b`` is read from row ``b + row_offsets[b, j]`` (all zeros unless a beam
    search reorders with :func:`reorder_decode_cache`);
    ``memory`` collection: the projected encoder K/V per cross-attention); later calls
    take one token per row, write it at ``cache_index`` and advance it.
    """

    config: TransformerConfig
    embed: Embedding
    cross_attention: bool = True

    @nn.compact
    def __call__(self, tgt: jax.Array, memory: jax.Array | None = None, memory_mask: jax.Array | None = None, *,
                 deterministic: bool = True, decode: bool = False, max_decode_len: int | None = None) -> jax.Array:
        """int ``[batch, tgt_len]`` -> logits ``[batch, tgt_len, vocab]`` (compute dtype)."""
        cfg = self.config
        offset, cache_index, row_offsets = 0, None, None
        if decode:
            creating = not self.has_variable("cache", "cache_index")
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if creating:
                if max_decode_len is None or not 0 < max_decode_len <= cfg.max_seq_len:
                    raise ValueError(f"max_decode_len must be in [1, max_seq_len={cfg.max_seq_len}], "
                                     f"got {max_decode_len}")
            rows = self.variable("cache", "row_offsets", jnp.zeros, (tgt.shape[0], max_decode_len), jnp.int32)
            if not creating:
                if tgt.shape[1] != 1:
                    raise ValueError(f"decode steps take one token per row ([N, 1]), got shape {tuple(tgt.shape)}")
                offset = cache_index = index.value
                index.value = index.value + 1
                # This step's key is read from its own row whatever the table says; the table's entry
                # for it is 0 already (reorder_decode_cache leaves the entries not yet written at 0).
                row_offsets = rows.value
        x = self.embed(tgt, deterministic=deterministic, offset=offset)
        x = layer_stack(TransformerDecoderLayer, cfg, cfg.num_decoder_layers, x,
                        dict(memory=memory, memory_mask=memory_mask, cache_index=cache_index, row_offsets=row_offsets),
                        layer_kwargs=dict(cross_attention=self.cross_attention),
                        deterministic=deterministic, decode=decode, max_decode_len=max_decode_len)
        if cfg.pre_layer_norm:
            x = LayerNorm(cfg, name="final_ln")(x)
        return self.embed.attend(x)


class Transformer(nn.Module):
    """Encoder-decoder Transformer (fairseq / LightSeq layout).

    Params: ``embed`` (shared by source, target and the output projection when
    ``share_all_embeddings``; else ``src_embed`` for the source), ``encoder``,
    ``decoder``. Usage::

        logits = model.apply({"params": p}, src, tgt_in, deterministic=False, rngs={"dropout": k})
        loss_sum, ntokens = model.apply({"params": p}, src, tgt_in, tgt_out, method=Transformer.loss)
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        if cfg.num_encoder_layers < 1:
            raise ValueError("Transformer needs num_encoder_layers >= 1; use TransformerLM for a decoder-only model")
        self.embed = Embedding(cfg.vocab_size, cfg, cfg.max_positions)
        src_embed = self.embed
        if not cfg.share_all_embeddings:
            self.src_embed = Embedding(cfg.vocab_size, cfg, cfg.max_positions)
            src_embed = self.src_embed
        self.encoder = Encoder(cfg, src_embed)
        self.decoder = Decoder(cfg, self.embed)
        self.loss_fn = CrossEntropyLoss(cfg.label_smoothing, cfg.padding_id)

    def __call__(self, src: jax.Array, tgt_in: jax.Array, deterministic: bool = True) -> jax.Array:
        """int ``[batch, src_len]``, ``[batch, tgt_len]`` -> logits ``[batch, tgt_len, vocab]`` (compute dtype)."""
        encoded, src_mask = self.encoder(src, deterministic=deterministic)
        return self.decoder(tgt_in, encoded, src_mask, deterministic=deterministic)

    def loss(self, src: jax.Array, tgt_in: jax.Array, tgt_out: jax.Array,
             deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """``(loss_sum, token_count)``: label-smoothed cross-entropy summed over non-pad ``tgt_out`` tokens."""
        return self.loss_fn(self(src, tgt_in, deterministic), tgt_out)

    def encode(self, src: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """Encoder states ``[batch, src_len, hidden]`` and the source mask (True = token)."""
        return self.encoder(src, deterministic=deterministic)

    def init_decoding(self, src: jax.Array, max_decode_len: int) -> jax.Array:
        """Encodes ``src`` and creates the decode state; run with ``mutable=["cache", "memory"]``.

        Returns the source mask; the ``memory`` collection holds the projected encoder K/V.
        """
        encoded, src_mask = self.encoder(src)
        dummy = jnp.full((src.shape[0], 1), self.config.padding_id, jnp.int32)
        self.decoder(dummy, encoded, src_mask, decode=True, max_decode_len=max_decode_len)
        return src_mask

    def decode_step(self, token_ids: jax.Array, src_mask: jax.Array) -> jax.Array:
        """int ``[N, 1]`` -> logits ``[N, vocab]`` (compute dtype); run with ``mutable=["cache"]``."""
        return self.decoder(token_ids, None, src_mask, decode=True)[:, -1]


class TransformerLM(nn.Module):
    """Decoder-only language model (decoder layers without cross-attention).

    Params: ``embed`` (tied output projection, learned positions when
    ``max_positions > 0``) and ``decoder``.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embed = Embedding(cfg.vocab_size, cfg, cfg.max_positions)
        self.decoder = Decoder(cfg, self.embed, cross_attention=False)
        self.loss_fn = CrossEntropyLoss(cfg.label_smoothing, cfg.padding_id)

    def __call__(self, ids: jax.Array, deterministic: bool = True) -> jax.Array:
        """int ``[batch, len]`` -> logits ``[batch, len, vocab]`` (compute dtype)."""
        return self.decoder(ids, deterministic=deterministic)

    def loss(self, ids_in: jax.Array, ids_out: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """``(loss_sum, token_count)`` of next-token prediction, pads ignored."""
        return self.loss_fn(self(ids_in, deterministic), ids_out)

    def init_decoding(self, batch_size: int, max_decode_len: int) -> None:
        """Creates the decode cache; run with ``mutable=["cache"]``."""
        dummy = jnp.full((batch_size, 1), self.config.padding_id, jnp.int32)
        self.decoder(dummy, decode=True, max_decode_len=max_decode_len)

    def decode_step(self, token_ids: jax.Array) -> jax.Array:
        """int ``[N, 1]`` -> logits ``[N, vocab]`` (compute dtype); run with ``mutable=["cache"]``."""
        return self.decoder(token_ids, decode=True)[:, -1]


TokensToLogits = Callable[[jax.Array, dict, dict], tuple[jax.Array, dict]]


def reorder_decode_cache(cache: dict, rows: jax.Array) -> dict:
    """Beam reorder of a decode cache by cache indirection: new row ``r`` continues row ``rows[r]``.

    Only the ``row_offsets`` table is reordered (:func:`lsjax.ops.decode_attention.reorder_row_offsets`,
    its entries past the ``cache_index`` beside it left 0 for the steps to come); the K/V caches stay
    where they were written, and each step writes its own key in place.
    Pass it as ``lsjax.decode.beam_search(..., reorder_cache=reorder_decode_cache)``; the
    default, gathering every cache leaf, is also correct (the offsets then stay zero), only slower.
    """
    found = False

    def reorder(tree):
        nonlocal found
        if not isinstance(tree, Mapping):
            return tree
        new = {k: reorder(v) for k, v in tree.items()}
        if "row_offsets" in new:
            found = True
            new["row_offsets"] = reorder_row_offsets(new["row_offsets"], rows, new["cache_index"])
        return type(tree)(new)

    reordered = reorder(cache)
    if not found:
        raise ValueError("reorder_decode_cache: the cache has no 'row_offsets' table; use lsjax.decode.gather_rows")
    return reordered


def decode_params(params, dtype) -> dict:
    """``params`` with every float leaf of rank >= 2 (the GEMM kernels, embedding tables) cast to ``dtype``.

    The layers cast those weights to the compute dtype at every use, and XLA does not
    hoist the casts out of a decode loop: with float32 params that is a full read of
    every weight per step (a third of a transformer-base beam-search step on the H100).
    Casting them once before the loop gives the same results. Vectors (biases, layer
    norm scales) are left alone: the fused ops read them in float32.
    """
    dtype = jnp.dtype(dtype)

    def cast(p):
        return p.astype(dtype) if jnp.ndim(p) >= 2 and jnp.issubdtype(p.dtype, jnp.floating) else p

    return jax.tree.map(cast, params)


def decoder_fns(model: Transformer | TransformerLM, params, src: jax.Array, max_len: int, *,
                layer_norm_impl: str | None = "xla",
                decode_dense_impl: str | None = None) -> tuple[TokensToLogits, dict, dict]:
    """Incremental-decoding functions for :mod:`lsjax.decode`.

    Args:
      model: a :class:`Transformer` (or :class:`TransformerLM`, then ``src`` only gives
        the batch size: ``[batch, any]``).
      params: its params.
      src: int ``[batch, src_len]`` source ids (padded with ``padding_id``).
      max_len: the number of target positions to decode (KV cache length, <= max_seq_len).
      layer_norm_impl: the layer norm of the decoding functions (``LayerConfig.layer_norm_impl``);
        ``None`` keeps the model's. Default ``"xla"``: at a decode step's few rows XLA fuses
        the layer norm with its neighbours, one launch fewer each (a transformer-base beam
        search ran 1.08x / 1.04x faster than with the fused op at batch 8 / 64 on the H100).
      decode_dense_impl: ``LayerConfig.decode_dense_impl`` of the decoding functions; ``None``
        keeps the model's.

    Returns:
      ``(tokens_to_logits, init_cache, encoded)``: ``tokens_to_logits(ids int32[N, 1],
      cache, encoded) -> (logits [N, vocab] in the compute dtype, new cache)`` (the
      searches read them in float32). Weights (float params of rank >= 2) are cast to
      the compute dtype here, once, as :func:`decode_params` says. ``init_cache`` holds
      per-layer ``cached_key``/``cached_value`` ``[batch, max_len, heads, head_dim]``
      (``[batch, layers, ...]`` with ``scan_layers``) and the shared scalar
      ``cache_index``; ``encoded`` = ``{"src_mask": bool [batch, src_len], "memory":
      projected encoder K/V per layer, [batch, src_len, heads, head_dim]}`` (projected
      once here, never per step). All leaves have leading dim ``batch``.
    """
    params = decode_params(params, model.config.dtype)
    impls = {k: v for k, v in dict(layer_norm_impl=layer_norm_impl, decode_dense_impl=decode_dense_impl).items()
             if v is not None}
    if impls:
        model = model.clone(config=dataclasses.replace(model.config, **impls))
    if isinstance(model, TransformerLM):
        _, state = model.apply({"params": params}, src.shape[0], max_len, method=TransformerLM.init_decoding,
                               mutable=["cache"])
        encoded = {}

        def tokens_to_logits(token_ids, cache, encoded):
            logits, new = model.apply({"params": params, "cache": cache}, token_ids,
                                      method=TransformerLM.decode_step, mutable=["cache"])
            return logits, new["cache"]

        return tokens_to_logits, state["cache"], encoded

    src_mask, state = model.apply({"params": params}, src, max_len, method=Transformer.init_decoding,
                                  mutable=["cache", "memory"])
    encoded = {"src_mask": src_mask, "memory": state["memory"]}

    def tokens_to_logits(token_ids, cache, encoded):
        logits, new = model.apply({"params": params, "cache": cache, "memory": encoded["memory"]}, token_ids,
                                  encoded["src_mask"], method=Transformer.decode_step, mutable=["cache"])
        return logits, new["cache"]

    return tokens_to_logits, state["cache"], encoded
