"""Layer configuration with LightSeq's field names, plus Flax dtypes and transforms."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
ATTENTION_IMPLS = ("auto", "fused", "cudnn", "xla")
LAYER_NORM_IMPLS = ("fused", "xla")
DECODE_DENSE_IMPLS = ("xla", "fused")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """Hyper-parameters of one Transformer layer (LightSeq's ``get_config`` fields).

    Attributes:
      hidden_size, intermediate_size, nhead: model width, FFN width, attention heads.
      attn_prob_dropout_ratio: dropout on the attention probabilities.
      activation_dropout_ratio: dropout after the FFN activation.
      hidden_dropout_ratio: dropout on each block's output before the residual add.
      pre_layer_norm: pre-LN (``x + f(LN(x))``) if True, else post-LN (``LN(x + f(x))``).
      activation_fn: ``"relu" | "gelu" | "gelu_tanh"``.
      max_batch_tokens, max_seq_len: static limits; larger inputs raise ``ValueError``.
      padding_id: the pad token (ignored keys, zero embeddings, ignored labels).
      dtype: compute dtype (activations, GEMM inputs). param_dtype: storage dtype of params.
      attention_impl: ``"fused"`` (score GEMM + lsjax attention-softmax op + GEMM),
        ``"cudnn"`` (``jax.nn.dot_product_attention(implementation="cudnn")``, flash
        attention, no attention dropout), ``"xla"`` (score GEMM + the softmax's pure-JAX
        reference + GEMM, all XLA; no attention dropout) or ``"auto"`` (default): ``"cudnn"``
        where it applies (the ``"cuda"`` backend, a call without attention dropout, 16-bit
        compute, head_dim a multiple of 8 up to 128), else ``"fused"``; measured faster there on the H100 (see
        ``benchmarks/RESULTS.md``, layers). The ``dot_product_attention`` paths take key
        padding as per-row lengths, so they assume right-padded keys (the lsjax batch
        layout); use ``"fused"`` for other masks. Decode steps use the lsjax decode
        kernels with ``"fused"`` and ``"auto"``.
      remat_policy: ``"none"`` or a key of ``REMAT_POLICIES``: rematerialise each layer
        with that ``jax.checkpoint`` policy.
      scan_layers: stack the layers with ``nn.scan`` (params get a leading ``layers`` axis;
        decode caches get it at axis 1, after the batch).
      layer_norm_eps: epsilon of every layer norm.
      layer_norm_impl: ``"fused"`` (:func:`lsjax.ops.layer_norm`) or ``"xla"`` (its
        pure-JAX reference, which XLA may fuse with the neighbouring element-wise work:
        a candidate for decode steps of a few rows, where each launch counts).
      decode_dense_impl: the projections of a pre-LN decode step (one token per row, no
        dropout): ``"xla"`` (default) as ``nn.DenseGeneral`` plus the ops around it, which
        XLA:GPU runs as a split-K GEMM and one fusion of its epilogue; ``"fused"`` each as one
        :func:`lsjax.ops.decode_dense` (layer norm, GEMM, bias, activation and residual in
        one kernel). ``"fused"`` has half the launches but its kernel is slower: a
        transformer-base beam search at batch 8 took 24.9 ms against 19.7 ms on the H100
        (``benchmarks/RESULTS.md``).
    """

    hidden_size: int
    intermediate_size: int
    nhead: int
    attn_prob_dropout_ratio: float = 0.1
    activation_dropout_ratio: float = 0.1
    hidden_dropout_ratio: float = 0.1
    pre_layer_norm: bool = True
    activation_fn: str = "relu"
    max_batch_tokens: int = 4096
    max_seq_len: int = 256
    padding_id: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    remat_policy: str = "none"
    scan_layers: bool = False
    layer_norm_eps: float = 1e-5
    layer_norm_impl: str = "fused"
    decode_dense_impl: str = "xla"

    def __post_init__(self):
        if self.hidden_size % self.nhead:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of nhead={self.nhead}")
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {ACTIVATIONS}, got {self.activation_fn!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_impl in ("cudnn", "xla") and self.attn_prob_dropout_ratio > 0:
            raise ValueError(
                f"attention_impl={self.attention_impl!r} has no attention-probability dropout; set "
                f"attn_prob_dropout_ratio=0 (got {self.attn_prob_dropout_ratio}) or use attention_impl='fused'")
        if self.layer_norm_impl not in LAYER_NORM_IMPLS:
            raise ValueError(f"layer_norm_impl must be one of {LAYER_NORM_IMPLS}, got {self.layer_norm_impl!r}")
        if self.decode_dense_impl not in DECODE_DENSE_IMPLS:
            raise ValueError(
                f"decode_dense_impl must be one of {DECODE_DENSE_IMPLS}, got {self.decode_dense_impl!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        for name in ("attn_prob_dropout_ratio", "activation_dropout_ratio", "hidden_dropout_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.nhead

    def check_tokens(self, shape: tuple[int, ...], what: str = "input") -> None:
        """Raises ``ValueError`` if a ``[..., batch, seq]`` input exceeds the static limits."""
        *lead, batch, seq = shape
        if seq > self.max_seq_len:
            raise ValueError(f"{what} length {seq} exceeds max_seq_len={self.max_seq_len}; "
                             "use a shorter bucket or raise max_seq_len")
        if batch * seq > self.max_batch_tokens:
            raise ValueError(f"{what} has batch*seq = {batch}*{seq} = {batch * seq} tokens, over "
                             f"max_batch_tokens={self.max_batch_tokens}; use a smaller batch or raise the limit")
