"""Fused ops: each a pure-JAX reference, a CPU FFI twin and a CUDA kernel.

Choose the implementation with :func:`use_backend` or ``LSJAX_BACKEND``
(``"cuda" | "cpu_ffi" | "xla"``); see :mod:`lsjax.ops.backend`.
"""

from lsjax.ops.adam_update import adam_scalars, adam_update, adam_update_reference
from lsjax.ops.adam_update_multi import adam_update_multi, adam_update_multi_reference
from lsjax.ops.all_finite import all_finite, all_finite_reference
from lsjax.ops.attention_softmax import attention_softmax, attention_softmax_reference
from lsjax.ops.backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    default_backend,
    get_backend,
    registered_targets,
    use_backend,
)
from lsjax.ops.beam_topk import beam_topk, beam_topk_reference
from lsjax.ops.beam_update import BeamUpdate, beam_update, beam_update_reference
from lsjax.ops.bias_act_dropout import bias_act_dropout, bias_act_dropout_reference
from lsjax.ops.bias_dropout_residual import (
    bias_dropout_residual,
    bias_dropout_residual_reference,
    dropout,
    dropout_reference,
)
from lsjax.ops.decode_attention import (decode_attention, decode_attention_reference, decode_self_attention,
                                        decode_self_attention_reference)
from lsjax.ops.cross_entropy import cross_entropy, cross_entropy_reference
from lsjax.ops.decode_dense import decode_dense, decode_dense_reference
from lsjax.ops.embedding import embedding, embedding_reference, sinusoidal_positions, token_positions
from lsjax.ops.layer_norm import layer_norm, layer_norm_reference
from lsjax.ops.split_heads import split_heads, split_heads_reference

__all__ = [
    "adam_scalars",
    "adam_update",
    "adam_update_reference",
    "adam_update_multi",
    "adam_update_multi_reference",
    "all_finite",
    "all_finite_reference",
    "decode_dense",
    "decode_dense_reference",
    "attention_softmax",
    "attention_softmax_reference",
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "beam_topk",
    "beam_topk_reference",
    "BeamUpdate",
    "beam_update",
    "beam_update_reference",
    "bias_act_dropout",
    "bias_act_dropout_reference",
    "bias_dropout_residual",
    "bias_dropout_residual_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "decode_attention",
    "decode_attention_reference",
    "decode_self_attention",
    "decode_self_attention_reference",
    "default_backend",
    "dropout",
    "embedding",
    "embedding_reference",
    "dropout_reference",
    "get_backend",
    "layer_norm",
    "layer_norm_reference",
    "registered_targets",
    "sinusoidal_positions",
    "split_heads",
    "split_heads_reference",
    "token_positions",
    "use_backend",
]
