"""Batched translation by length bucket, and ``lsjax-translate --checkpoint RUN_DIR``.

Examples::

    echo "a man rides a bike ." | lsjax-translate --checkpoint runs/multi30k --beam 4
    lsjax-translate --checkpoint runs/multi30k --input test.en --sampling top_p=0.9,temperature=0.8
    lsjax-translate --checkpoint runs/multi30k --input test.en --averaged  # eval.average_last > 1

Sentences are grouped by the bucket their token length falls in; each bucket decodes with one
fixed batch shape, so at most one program per bucket is compiled.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from lsjax import data as lsdata
from lsjax import decode
from lsjax.models import decoder_fns, reorder_decode_cache


class Translator:
    """Translates text with a :class:`lsjax.models.Transformer`.

    Args:
      model, tokenizer: the model and its joint tokenizer.
      buckets: source length ladder; longer sources are truncated to the last bucket.
      batch_size: sentences per decode call (the last batch of a bucket is padded); lowered
        for long buckets so ``batch * length`` stays within the model's ``max_batch_tokens``.
      beam_size, length_penalty: beam search settings; ``sampling`` (``{"top_k", "top_p",
        "temperature", "seed"}``) switches to sampling instead.
      max_len_a, max_len_b: decode at most ``a * L + b`` tokens for bucket length ``L``
        (capped by the model's ``max_seq_len``).
      compiler_options: XLA options of the decode programs, e.g.
        :data:`lsjax.decode.WHILE_LOOP_GRAPHS` (the decode loop as one CUDA graph).
    """

    def __init__(self, model, tokenizer: lsdata.Tokenizer, buckets: Sequence[int], *, batch_size: int = 64,
                 beam_size: int = 4, length_penalty: float = 0.6, sampling: dict | None = None,
                 max_len_a: float = 1.5, max_len_b: int = 8, compiler_options: dict | None = None):
        self.model, self.tokenizer, self.buckets = model, tokenizer, tuple(buckets)
        self.batch_size, self.beam_size, self.length_penalty = batch_size, beam_size, length_penalty
        self.sampling = sampling
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self._decode = jax.jit(self._decode_ids, static_argnames=("max_len",), compiler_options=compiler_options)

    def _max_len(self, length: int) -> int:
        return min(self.model.config.max_seq_len, int(self.max_len_a * length) + self.max_len_b)

    def _batch_size(self, length: int) -> int:
        """``batch_size``, lowered so a bucket's source batch fits the model's ``max_batch_tokens``."""
        return max(1, min(self.batch_size, self.model.config.max_batch_tokens // length))

    # The cache reorder of beam search, and the decoding functions (hooks for benchmarks.decode_quality).
    reorder_cache = staticmethod(reorder_decode_cache)

    def _decoder_fns(self, params: Any, src: jax.Array, max_len: int):
        return decoder_fns(self.model, params, src, max_len)

    def _decode_ids(self, params: Any, src: jax.Array, key: jax.Array, *, max_len: int) -> jax.Array:
        fns = self._decoder_fns(params, src, max_len)
        if self.sampling is not None:
            s = self.sampling
            return decode.sample(*fns, key=key, max_len=max_len, eos_id=lsdata.EOS_ID,
                                 temperature=s.get("temperature", 1.0), top_k=s.get("top_k", 0),
                                 top_p=s.get("top_p", 1.0))
        out = decode.beam_search(*fns, beam_size=self.beam_size, max_len=max_len, eos_id=lsdata.EOS_ID,
                                 length_penalty=self.length_penalty, reorder_cache=self.reorder_cache)
        return out.sequences[:, 0]

    def translate(self, params: Any, sentences: Sequence[str]) -> list[str]:
        """Translations of ``sentences`` in their original order."""
        ids = self.tokenizer.encode_batch(list(sentences))
        longest = self.buckets[-1]
        by_bucket: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            length = next((b for b in self.buckets if len(seq) <= b), longest)
            by_bucket.setdefault(length, []).append(i)
        out: list[str] = [""] * len(ids)
        key = jax.random.key((self.sampling or {}).get("seed", 0))
        for length, rows in sorted(by_bucket.items()):
            batch = self._batch_size(length)
            for start in range(0, len(rows), batch):
                chunk = rows[start:start + batch]
                src = np.zeros((batch, length), np.int32)
                for r, i in enumerate(chunk):
                    seq = ids[i][:length]
                    src[r, :len(seq)] = seq
                key, sub = jax.random.split(key)
                tokens = np.asarray(self._decode(params, jnp.asarray(src), sub, max_len=self._max_len(length)))
                for r, i in enumerate(chunk):
                    out[i] = self.tokenizer.decode(tokens[r].tolist())
        return out

    def bleu(self, params: Any, pairs: Sequence[tuple[str, str]], *, max_sentences: int | None = None) -> float:
        """Corpus sacreBLEU (cased, 13a) of translating the sources against the targets."""
        pairs = list(pairs)[:max_sentences]
        hyps = self.translate(params, [s for s, _ in pairs])
        return sacrebleu.corpus_bleu(hyps, [[t for _, t in pairs]], tokenize="13a").score


def _parse_sampling(text: str | None) -> dict | None:
    if text is None:
        return None
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in ("top_k", "top_p", "temperature", "seed"):
            raise ValueError(f"--sampling takes top_k=,top_p=,temperature=,seed= items, got {item!r}")
        out[name] = int(value) if name in ("top_k", "seed") else float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lsjax-translate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run directory written by lsjax-train")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="checkpoint step (default: best, else latest)")
    which.add_argument("--averaged", action="store_true",
                       help="the run's best averaged params (eval.average_last > 1) instead of a checkpoint")
    parser.add_argument("--input", help="text file (plain or .gz); default stdin")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=0.6)
    parser.add_argument("--max-len", type=int, help="decode at most N tokens (else a * source length + b)")
    parser.add_argument("--max-len-a", type=float, default=1.5)
    parser.add_argument("--max-len-b", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sampling", help="e.g. top_p=0.9,temperature=0.8,seed=1 (instead of beam search)")
    args = parser.parse_args(argv)
    if args.max_len is not None:
        if args.max_len < 1:
            parser.error(f"--max-len must be >= 1, got {args.max_len}")
        args.max_len_a, args.max_len_b = 0.0, args.max_len
    sampling = _parse_sampling(args.sampling)
    from lsjax.training.loop import load_for_inference

    model, params, tokenizer, buckets = load_for_inference(args.checkpoint, step=args.step, averaged=args.averaged)
    translator = Translator(model, tokenizer, buckets, batch_size=args.batch_size, beam_size=args.beam,
                            length_penalty=args.length_penalty, sampling=sampling,
                            max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    lines = list(lsdata.iter_lines(args.input)) if args.input else [line.rstrip("\n") for line in sys.stdin]
    for line in translator.translate(params, lines):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
