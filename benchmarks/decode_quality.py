"""Decode quality of a trained run on each device path: BLEU and agreement with the reference backend.

    python -m benchmarks.decode_quality --run-dir RUN --data-dir .data/multi30k [--sentences 1000]
                                        [--variants reference,cuda,...] [--out decode_quality.json]

Loads the run's best checkpoint and translates the first ``--sentences`` pairs of Multi30k
test2016 with beam 4 under each variant: ``reference`` (the ``"xla"`` backend: every op's
pure-JAX reference), ``cuda`` (the defaults), and ``cuda`` with one piece swapped back to
XLA or to the older path: ``gather`` (beam reorder by gathering every cache leaf instead of
cache indirection), ``attn_fused`` (the fused attention softmax instead of cuDNN where
``"auto"`` picks it), ``attn_xla`` (``jax.nn.dot_product_attention``'s XLA path everywhere,
no decode-attention kernels), ``ln_fused`` (our layer norm op in the decode steps). Each
row gives BLEU and the share of sentences identical to the reference backend's.

Then a teacher-forced check on one batch of test sentences: the decode steps' logits on
the ``"cuda"`` backend against the reference backend's full forward (max |difference| and
argmax agreement per position), which separates a wrong decode step from a wrong search.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from lsjax import data as lsdata
from lsjax import decode, ops
from lsjax.models import decoder_fns, reorder_decode_cache
from lsjax.translate import Translator

VARIANTS = ("reference", "cuda", "gather", "attn_fused", "ln_fused", "attn_xla")


class _VariantTranslator(Translator):
    """A :class:`Translator` whose search can gather the cache and whose decode steps can use
    the fused layer norm."""

    def __init__(self, *args, reorder_cache=reorder_decode_cache, layer_norm_impl: str = "xla", **kwargs):
        self.reorder_cache, self.layer_norm_impl = reorder_cache, layer_norm_impl
        super().__init__(*args, **kwargs)

    def _decoder_fns(self, params, src, max_len):
        return decoder_fns(self.model, params, src, max_len, layer_norm_impl=self.layer_norm_impl)


def _variant(name: str, model, backend: str):
    """``(backend, model, translator kwargs)`` of a variant (``backend``: the device backend)."""
    def with_impl(impl):  # (attention dropout plays no part in decoding; "xla" refuses a nonzero rate)
        return model.clone(config=dataclasses.replace(model.config, attention_impl=impl, attn_prob_dropout_ratio=0.0))

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    backend, make_model, kwargs = {
        "reference": ("xla", lambda: model, {}),
        "cuda": (backend, lambda: model, {}),
        "gather": (backend, lambda: model, {"reorder_cache": decode.gather_rows}),
        "attn_fused": (backend, lambda: with_impl("fused"), {}),
        "attn_xla": (backend, lambda: with_impl("xla"), {}),
        "ln_fused": (backend, lambda: model, {"layer_norm_impl": "fused"}),
    }[name]
    return backend, make_model(), kwargs


def teacher_forced(model, params, tokenizer, pairs, backend: str, length: int = 32, batch: int = 64) -> dict:
    """Decode-step logits on ``backend`` vs the reference backend's full forward, one test batch."""
    batch = max(1, min(batch, model.config.max_batch_tokens // length))
    def ids(texts, prefix):
        out = np.zeros((batch, length), np.int32)
        for r, seq in enumerate(tokenizer.encode_batch(texts)):
            seq = (prefix + seq)[:length]
            out[r, :len(seq)] = seq
        return jnp.asarray(out)

    src, tgt_in = ids([s for s, _ in pairs[:batch]], []), ids([t for _, t in pairs[:batch]], [lsdata.BOS_ID])
    with ops.use_backend("xla"):
        full = np.asarray(jax.jit(lambda p, s, t: model.apply({"params": p}, s, t))(params, src, tgt_in), np.float32)
    with ops.use_backend(backend):
        fns, cache, encoded = decoder_fns(model, params, src, length)
        step = jax.jit(fns)
        diffs, agree = [], []
        for t in range(length):
            logits, cache = step(tgt_in[:, t:t + 1], cache, encoded)
            real = np.asarray(tgt_in[:, t] != lsdata.PAD_ID)
            if not real.any():
                break
            got = np.asarray(logits, np.float32)[real]
            diffs.append(float(np.abs(got - full[real, t]).max()))
            agree.append(float((got.argmax(-1) == full[real, t].argmax(-1)).mean()))
    return {"max_abs_diff_per_step": diffs, "argmax_agreement_per_step": agree}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data-dir", default=".data/multi30k")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--backend", default="cuda", help="the device backend the variants run on "
                        "(cpu_ffi checks the script on a CPU)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from lsjax.training.loop import load_for_inference

    model, params, tokenizer, buckets = load_for_inference(args.run_dir)
    pairs = lsdata.read_parallel(*lsdata.multi30k_files(args.data_dir, "test2016"))[:args.sentences]
    refs = [[t for _, t in pairs]]
    report: dict = {"run_dir": args.run_dir, "sentences": len(pairs), "variants": {}}
    report["teacher_forced"] = tf = teacher_forced(model, params, tokenizer, pairs, args.backend)
    print(f"teacher forced, {args.backend} decode steps vs reference forward: max |diff| per step",
          " ".join(f"{d:.3g}" for d in tf["max_abs_diff_per_step"]), "\n  argmax agreement",
          " ".join(f"{a:.2f}" for a in tf["argmax_agreement_per_step"]), flush=True)
    hyps: dict[str, list[str]] = {}
    for name in args.variants.split(","):
        backend, variant_model, kwargs = _variant(name, model, args.backend)
        translator = _VariantTranslator(variant_model, tokenizer, buckets, batch_size=128, **kwargs)
        try:
            with ops.use_backend(backend):
                hyps[name] = translator.translate(params, [s for s, _ in pairs])
        except Exception as e:  # noqa: BLE001  a variant that fails is reported, the others still run
            report["variants"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name:>11}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        bleu = sacrebleu.corpus_bleu(hyps[name], refs, tokenize="13a").score
        same = (float(np.mean([a == b for a, b in zip(hyps[name], hyps["reference"])]))
                if "reference" in hyps else None)
        report["variants"][name] = {"bleu": bleu, "same_as_reference": same, "samples": hyps[name][:3]}
        print(f"{name:>11}: BLEU {bleu:5.2f}  same as reference {same}  e.g. {hyps[name][0]!r}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
