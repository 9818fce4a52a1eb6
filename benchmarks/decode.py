"""Decode benchmark: lsjax beam search vs the flax-wmt-style peer, and the top-k op alone.

    python -m benchmarks.decode [--out decode.json] [--batches 1,8,64] [--dtypes bfloat16,float16]
                                [--no-topk] [--smoke]

Transformer-base (vocab 32000), source length 32, 64 forced steps (eos disabled),
batch {1, 8, 64}, beam 4, bf16 and fp16: ms per decode call (encoder included,
the same for both) and per step. Then ``beam_topk`` vs ``lax.top_k`` over
beam*vocab at vocab {32k, 128k, 256k}. ``--smoke`` runs a tiny toy decoder on
any machine to check the script. Each (dtype, batch) row compiles two transformer-base
beam searches; compilation dominates the run time, so split the rows over calls with
``--batches`` / ``--dtypes`` when time is short.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flax_beam_search
from benchmarks.cases import beam_topk as topk_cases
from benchmarks.harness import measure_copy_bandwidth, run_case, time_fn
from lsjax import ops
from lsjax.decode import beam_search

BEAM, SRC_LEN, STEPS, VOCAB = 4, 32, 64, 32000


def _searches(make_fns):
    """(lsjax, peer) functions of the inputs that ``make_fns(*inputs)`` turns into decoder fns."""
    def ours(*inputs):
        f, cache, enc = make_fns(*inputs)
        return beam_search(f, cache, enc, beam_size=BEAM, max_len=STEPS, eos_id=-1).sequences

    def peer(*inputs):
        f, cache, enc = make_fns(*inputs)
        return flax_beam_search.beam_search(f, cache, enc, beam_size=BEAM, max_len=STEPS, eos_id=-1)[0]

    return ours, peer


def _transformer_inputs(batch, dtype, rng):
    from lsjax.models import Transformer, decoder_fns, load_model_config

    config = load_model_config("transformer-base", vocab_size=VOCAB, dtype=jnp.dtype(dtype).name)
    model = Transformer(config)
    src = [jnp.asarray(rng.integers(4, VOCAB, (batch, SRC_LEN)), jnp.int32) for _ in range(2)]
    params = jax.jit(model.init)(jax.random.key(0), src[0], src[0])["params"]
    return (lambda p, s: decoder_fns(model, p, s, STEPS)), [(params, s) for s in src]


def _toy_inputs(batch, dtype, rng):
    from benchmarks.toy_decoder import toy_decoder

    f, cache, enc = toy_decoder(rng, batch=batch, vocab=64, max_len=STEPS)
    return (lambda c, e: (f, c, e)), [(cache, enc)] * 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="comma-separated compute dtypes")
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
    for dtype in map(jnp.dtype, args.dtypes.split(",")):
        for batch in map(int, args.batches.split(",")):
            make_fns, inputs = make_inputs(batch, dtype, rng)
            ours, peer = _searches(make_fns)
            t_ours = time_fn(ours, inputs, calls=2 if args.smoke else 5, trials=3 if args.smoke else 5)
            t_peer = time_fn(peer, inputs, calls=2 if args.smoke else 5, trials=3 if args.smoke else 5)
            row = {"dtype": jnp.dtype(dtype).name, "batch": batch, "beam": BEAM, "steps": STEPS,
                   "ours_ms": t_ours * 1e3, "peer_ms": t_peer * 1e3, "ours_ms_per_step": t_ours * 1e3 / STEPS,
                   "peer_ms_per_step": t_peer * 1e3 / STEPS, "speedup": t_peer / t_ours}
            results["decode"].append(row)
            print(f"beam search {row['dtype']:<9} batch {batch:<3} ours {row['ours_ms']:9.3f} ms "
                  f"({row['ours_ms_per_step']:.4f}/step)  flax-style {row['peer_ms']:9.3f} ms "
                  f"({row['peer_ms_per_step']:.4f}/step)  {row['speedup']:.2f}x", flush=True)
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
