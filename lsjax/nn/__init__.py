"""Flax (linen) Transformer layers on the lsjax fused ops, with LightSeq's layer config."""

from lsjax.nn.attention import MultiHeadAttention, dot_product_attention, resolve_attention_impl
from lsjax.nn.config import ACTIVATIONS, ATTENTION_IMPLS, REMAT_POLICIES, LayerConfig
from lsjax.nn.layers import (
    CrossEntropyLoss,
    Embedding,
    FeedForward,
    LayerNorm,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    layer_stack,
)

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLS",
    "CrossEntropyLoss",
    "Embedding",
    "FeedForward",
    "LayerConfig",
    "LayerNorm",
    "MultiHeadAttention",
    "REMAT_POLICIES",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "dot_product_attention",
    "layer_stack",
    "resolve_attention_impl",
]
