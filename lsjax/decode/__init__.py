"""Decoding inside one ``jax.jit``: beam search (optionally diverse), sampling, greedy.

All functions follow the decoding contract: ``tokens_to_logits(ids int32[N, 1],
cache, encoded) -> (logits [N, vocab], cache)`` with every cache leaf of ndim >= 1
and every ``encoded`` leaf leading with ``N`` rows (``lsjax.models.decoder_fns``
builds them for a Transformer).
"""

from lsjax.decode.beam_search import BeamSearchOutput, beam_search, gnmt_length_penalty
from lsjax.decode.sampling import greedy, sample

__all__ = ["BeamSearchOutput", "beam_search", "gnmt_length_penalty", "greedy", "sample"]
