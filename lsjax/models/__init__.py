"""Transformer models: seq2seq (base/big) and decoder-only LM, YAML configs, decode functions."""

from lsjax.models.config import TransformerConfig, load_model_config
from lsjax.models.transformer import (Decoder, Encoder, Transformer, TransformerLM, decode_params, decoder_fns,
                                      reorder_decode_cache)

__all__ = ["Decoder", "Encoder", "Transformer", "TransformerConfig", "TransformerLM", "decode_params", "decoder_fns",
           "load_model_config", "reorder_decode_cache"]
