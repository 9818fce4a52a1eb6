"""Decoding inside one ``jax.jit``: beam search (optionally diverse), sampling, greedy.

All functions follow the decoding contract: ``tokens_to_logits(ids int32[N, 1],
cache, encoded) -> (logits [N, vocab], cache)`` with every cache leaf of ndim >= 1
and every ``encoded`` leaf leading with ``N`` rows (``lsjax.models.decoder_fns``
builds them for a Transformer).
"""

from lsjax.decode.beam_search import BeamSearchOutput, beam_search, gather_rows, gnmt_length_penalty
from lsjax.decode.sampling import greedy, sample

# XLA options (``jax.jit(..., compiler_options=WHILE_LOOP_GRAPHS)``) that let XLA:GPU record a whole
# decode loop (``lax.while_loop``) as one command buffer (CUDA graph, conditional nodes): the
# default command-buffer types plus WHILE and CONDITIONAL, so the step's many small kernels are
# replayed from the graph instead of launched one by one, and the loop condition is evaluated
# on the device (no host round trip per step). Every lsjax CUDA handler is command-buffer
# compatible. Ignored on the CPU.
WHILE_LOOP_GRAPHS = {"xla_gpu_enable_command_buffer":
                     "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE"}

__all__ = ["WHILE_LOOP_GRAPHS", "BeamSearchOutput", "beam_search", "gather_rows", "gnmt_length_penalty", "greedy",
           "sample"]
