"""Decode benchmark: lsjax beam search vs plain Flax decoding the flax-wmt way, and the top-k op alone.

    python -m benchmarks.decode [--out decode.json] [--batches 1,8,64] [--dtypes bfloat16,float16]
                                [--xla-options default,while] [--steps-per-check 1,8] [--no-topk] [--smoke]

Transformer-base (vocab 32000), source length 32, 64 forced steps (eos disabled),
batch {1, 8, 64}, beam 4, bf16 and fp16: ms per decode call (encoder included) and per
step. Ours: the lsjax ``Transformer`` (fused ops, encoder K/V projected once) under
:func:`lsjax.decode.beam_search` with ``reorder_decode_cache`` (cache indirection: the K/V
caches are never gathered). Peer: the plain-Flax ``RefTransformer`` with the same
weights in the same dtype, decoded as flax's examples/wmt does (``nn.MultiHeadDotProductAttention``
with ``decode=True``, cross-attention K/V projected again every step) under
``benchmarks.flax_beam_search`` (``lax.top_k`` over beam*vocab, every cache leaf gathered
each step); both should produce the same tokens, and every row records the share of
output tokens on which they agree (``same_tokens``: a check of the device path, not
only of its speed; 16-bit rounding may flip a near-tie now and then). Then ``beam_topk`` vs ``lax.top_k`` over
beam*vocab at vocab {32k, 128k, 256k}. ``--smoke`` runs a tiny toy decoder on
any machine to check the script. Each (dtype, batch) row compiles two transformer-base
beam searches; compilation dominates the run time, so split the rows over calls with
``--batches`` / ``--dtypes`` when time is short. ``--xla-options while,cublas`` also times
both searches compiled with those XLA option sets (``benchmarks.profile.XLA_OPTIONS``: command
buffers around the while loop, cuBLAS GEMMs): every row then names its setting.
``--layer-norm xla,fused`` likewise times our decode step with each ``layer_norm_impl``, and
``--decode-dense xla,fused`` with each ``decode_dense_impl`` (``xla``: XLA GEMMs and their epilogues,
the default; ``fused``: every projection one :func:`lsjax.ops.decode_dense`), and ``--steps-per-check 1,8``
with each ``beam_search(steps_per_check=...)`` (decoder steps between the loop's early-stop checks, each a
device-to-host copy and wait; 8 is the default, 1 checks every step as the peer does).
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flax_beam_search
from benchmarks.profile import XLA_OPTIONS
from benchmarks.cases import beam_topk as topk_cases
from benchmarks.harness import measure_copy_bandwidth, run_case, time_fn
from lsjax import ops
from lsjax.decode import beam_search, gather_rows

BEAM, SRC_LEN, STEPS, VOCAB = 4, 32, 64, 32000


def _searches(ours_fns, peer_fns, steps_per_check, reorder_cache=gather_rows):
    """(lsjax, peer) searches: each takes its inputs, which its ``*_fns`` turn into decoder fns;
    ours reorders its cache with ``reorder_cache`` and checks its stop every ``steps_per_check`` steps."""
    def ours(*inputs):
        f, cache, enc = ours_fns(*inputs)
        return beam_search(f, cache, enc, beam_size=BEAM, max_len=STEPS, eos_id=-1,
                           reorder_cache=reorder_cache, steps_per_check=steps_per_check).sequences

    def peer(*inputs):
        f, cache, enc = peer_fns(*inputs)
        return flax_beam_search.beam_search(f, cache, enc, beam_size=BEAM, max_len=STEPS, eos_id=-1)[0]

    return ours, peer


def _transformer_inputs(batch, dtype, rng, layer_norm="xla", decode_dense="xla", steps_per_check=8):
    """``((ours, peer) searches, (ours, peer) input lists)``: the lsjax Transformer (decoded
    with ``layer_norm_impl`` = ``layer_norm``, ``decode_dense_impl`` = ``decode_dense``), and the
    plain-Flax ``RefTransformer`` with the same weights (cast to ``dtype``) decoded the flax-wmt way."""
    from benchmarks.flax_reference import ref_decoder_fns, reference_params
    from lsjax.models import Transformer, decoder_fns, load_model_config, reorder_decode_cache

    name = jnp.dtype(dtype).name
    config = load_model_config("transformer-base", vocab_size=VOCAB, dtype=name)
    model = Transformer(config)
    src = [jnp.asarray(rng.integers(4, VOCAB, (batch, SRC_LEN)), jnp.int32) for _ in range(2)]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), src[0], src[0])["params"])
    ref_config = load_model_config("transformer-base", vocab_size=VOCAB, dtype=name, param_dtype=name)
    ref_params = jax.tree.map(lambda p: p.astype(dtype), reference_params(params))
    searches = _searches(lambda p, s: decoder_fns(model, p, s, STEPS, layer_norm_impl=layer_norm,
                                                  decode_dense_impl=decode_dense),
                         lambda p, s: ref_decoder_fns(ref_config, p, s, STEPS), steps_per_check, reorder_decode_cache)
    return searches, ([(params, s) for s in src], [(ref_params, s) for s in src])


def _toy_inputs(batch, dtype, rng, layer_norm="xla", decode_dense="xla", steps_per_check=8):
    from benchmarks.toy_decoder import toy_decoder

    f, cache, enc = toy_decoder(rng, batch=batch, vocab=64, max_len=STEPS)
    fns = lambda c, e: (f, c, e)  # noqa: E731
    inputs = [(cache, enc)] * 2
    return _searches(fns, fns, steps_per_check), (inputs, inputs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="comma-separated compute dtypes")
    parser.add_argument("--xla-options", default="default",
                        help=f"comma-separated XLA compile-option sets, of {sorted(XLA_OPTIONS)}")
    parser.add_argument("--layer-norm", default="xla",
                        help="comma-separated layer norms of our decode step (xla: decoder_fns' default, fused)")
    parser.add_argument("--decode-dense", default="xla",
                        help="comma-separated decode_dense_impl of our decode step (xla: the default, fused)")
    parser.add_argument("--steps-per-check", default="8",
                        help="comma-separated beam_search steps_per_check of our search (8: the default)")
    parser.add_argument("--no-topk", action="store_true", help="skip the top-k op table")
    parser.add_argument("--smoke", action="store_true", help="toy decoder, tiny sizes (CPU check)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.dtypes = "1,2", "bfloat16"
    rng = np.random.default_rng(0)
    device = jax.devices()[0].device_kind
    results = {"device": device, "backend": ops.get_backend(), "decode": [], "topk": []}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    print(f"device: {device}; backend: {ops.get_backend()}; beam {BEAM}, {STEPS} forced steps", flush=True)
    make_inputs = _toy_inputs if args.smoke else _transformer_inputs
    rows = [(jnp.dtype(d), int(b), ln, dd, int(c)) for d in args.dtypes.split(",") for b in args.batches.split(",")
            for ln in args.layer_norm.split(",") for dd in args.decode_dense.split(",")
            for c in args.steps_per_check.split(",")]
    for dtype, batch, layer_norm, decode_dense, per_check in rows:
        (ours, peer), (ours_inputs, peer_inputs) = make_inputs(batch, dtype, rng, layer_norm, decode_dense, per_check)
        for setting in args.xla_options.split(","):
            timing = dict(calls=2 if args.smoke else 5, trials=3 if args.smoke else 5,
                          compiler_options=XLA_OPTIONS[setting])
            t_ours, seqs = time_fn(ours, ours_inputs, return_outputs=True, **timing)
            t_peer, peer_seqs = time_fn(peer, peer_inputs, return_outputs=True, **timing)
            same = float(np.mean([np.mean(np.asarray(a) == np.asarray(b)) for a, b in zip(seqs, peer_seqs)]))
            row = {"dtype": jnp.dtype(dtype).name, "batch": batch, "beam": BEAM, "steps": STEPS,
                   "xla_options": setting, "layer_norm": layer_norm, "decode_dense": decode_dense,
                   "steps_per_check": per_check,
                   "ours_ms": t_ours * 1e3,
                   "peer_ms": t_peer * 1e3, "ours_ms_per_step": t_ours * 1e3 / STEPS,
                   "peer_ms_per_step": t_peer * 1e3 / STEPS, "speedup": t_peer / t_ours, "same_tokens": same}
            results["decode"].append(row)
            print(f"beam search {row['dtype']:<9} batch {batch:<3} XLA {setting:<12} LN {layer_norm:<5} dense "
                  f"{decode_dense:<5} check/{per_check:<2} ours "
                  f"{row['ours_ms']:9.3f} ms ({row['ours_ms_per_step']:.4f}/step)  flax-style {row['peer_ms']:9.3f} "
                  f"ms ({row['peer_ms_per_step']:.4f}/step)  {row['speedup']:.2f}x  same tokens "
                  f"{row['same_tokens']:.1%}", flush=True)
            save()
    if args.no_topk:
        return

    copy_bw = measure_copy_bandwidth(1 << 20 if args.smoke else 1 << 28)
    for case in topk_cases.cases()[:1] if args.smoke else topk_cases.cases():
        for r in run_case(case, rng, copy_bw):
            results["topk"].append(r)
            print(f"beam_topk {r['shape']:<14}{r['dtype']:<9} ours {r['ours_ms']:.4f} ms  lax.top_k "
                  f"{r['xla_ms']:.4f} ms  {r['speedup']:.2f}x", flush=True)
        save()


if __name__ == "__main__":
    main()
