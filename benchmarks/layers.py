"""Transformer layer benchmark: lsjax layers vs the plain-Flax reference layers.

    python -m benchmarks.layers --out layers.json            # GPU: base/big, 8k/32k tokens, bf16/fp16
    python -m benchmarks.layers --smoke --out /tmp/l.json    # tiny shapes, runs on CPU

Times one training fwd+bwd (gradients w.r.t. params and input) of one encoder layer
and one decoder layer (self + cross attention, source length = target length), both
with the same weights, dropout on (LightSeq's rates) unless ``--no-dropout``.
Params are stored in the compute dtype (LightSeq's fp16/bf16-params setting). The
lsjax layer runs on the current lsjax backend ("cuda" on a GPU); the reference is
``benchmarks.flax_reference`` (nn.MultiHeadDotProductAttention, nn.LayerNorm,
nn.Dense, nn.Dropout) compiled by XLA. speedup = reference time / lsjax time.

``--attention-impl fused,cudnn`` times the lsjax layer with each attention path against
the same reference timing; with more than one path (or any but ``fused``) attention-prob
dropout is off for all, the one setting in which the paths are interchangeable (this
picks the default path by measurement).

Each timed program alternates 2 input sets: one layer application's working set (inputs,
saved activations, gradients) is larger than the H100's 50 MB L2 at every benchmarked
shape, so a second set already keeps inputs from being cache-hot, and more sets only
multiply compile time (with 8, the 16 rows did not fit in one 10-minute device call).
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.flax_reference import RefDecoderLayer, RefEncoderLayer, layer_params
from benchmarks.harness import copies_for, time_fn
from lsjax import ops
from lsjax.nn import LayerConfig, TransformerDecoderLayer, TransformerEncoderLayer

SIZES = {"base": (512, 2048, 8), "big": (1024, 4096, 16), "tiny": (32, 64, 2)}
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
LAYERS = {"encoder": (TransformerEncoderLayer, RefEncoderLayer), "decoder": (TransformerDecoderLayer, RefDecoderLayer)}


def layer_config(size: str, dtype, tokens: int, seq: int, dropout: bool, attention_impl: str,
                 attention_dropout: bool = True) -> LayerConfig:
    d, ff, heads = SIZES[size]
    rate = 0.1 if dropout else 0.0
    return LayerConfig(hidden_size=d, intermediate_size=ff, nhead=heads,
                       attn_prob_dropout_ratio=rate if attention_dropout and attention_impl == "fused" else 0.0,
                       activation_dropout_ratio=rate, hidden_dropout_ratio=rate, max_batch_tokens=tokens,
                       max_seq_len=seq, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)


def fwd_bwd(module, params, kind: str, deterministic: bool):
    """``(x, memory, mask, cotangent, key) -> (dparams, dx)`` of one layer application."""
    def run(x, memory, mask, cot, key):
        def apply(p, x):
            args = (x, mask) if kind == "encoder" else (x, memory, mask)
            return module.apply({"params": p}, *args, deterministic=deterministic, rngs={"dropout": key})
        _, vjp = jax.vjp(apply, params, x)
        return vjp(cot)
    return run


def bench_row(kind: str, configs: dict[str, LayerConfig], batch: int, seq: int, dropout: bool,
              timing: dict) -> list[dict]:
    """One row per attention path of ``configs`` (same shapes and dtype), each against one reference timing."""
    ours_cls, ref_cls = LAYERS[kind]
    cfg = next(iter(configs.values()))
    rng = np.random.default_rng(0)
    d = cfg.hidden_size

    def inputs(i):
        def act():
            return jnp.asarray(rng.standard_normal((batch, seq, d), np.float32)).astype(cfg.dtype)
        lengths = rng.integers(seq // 2, seq + 1, size=batch)
        mask = jnp.asarray(np.arange(seq) < lengths[:, None])
        return act(), act(), mask, act(), jax.random.key(i)

    one = inputs(0)
    init_args = (one[0], one[2]) if kind == "encoder" else (one[0], one[1], one[2])
    boxed = jax.jit(ours_cls(cfg).init)(jax.random.key(0), *init_args)["params"]
    params = jax.tree.map(lambda p: p.astype(cfg.dtype), nn.meta.unbox(boxed))
    nbytes = 3 * batch * seq * d * jnp.dtype(cfg.dtype).itemsize
    sets = [one] + [inputs(i) for i in range(1, copies_for(nbytes, max_k=2))]
    deterministic = not dropout
    t_ref = time_fn(fwd_bwd(ref_cls(cfg), layer_params(params), kind, deterministic), sets, **timing)
    rows = []
    for impl, c in configs.items():
        t_ours = time_fn(fwd_bwd(ours_cls(c), params, kind, deterministic), sets, **timing)
        rows.append({"layer": kind, "attention_impl": impl, "tokens": batch * seq, "batch": batch, "seq": seq,
                     "hidden": d, "dtype": jnp.dtype(cfg.dtype).name, "lsjax_ms": t_ours * 1e3,
                     "flax_ms": t_ref * 1e3, "speedup": t_ref / t_ours})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results path (rewritten after every row)")
    parser.add_argument("--sizes", default="base,big")
    parser.add_argument("--tokens", default="8192,32768", help="tokens per batch (batch = tokens // seq)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--attention-impl", default="fused",
                        help="comma-separated lsjax attention paths (fused, cudnn, xla)")
    parser.add_argument("--no-dropout", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats (CPU check)")
    args = parser.parse_args(argv)
    timing = {}
    if args.smoke:
        args.sizes, args.tokens, args.seq, args.dtypes = "tiny", "64", 16, "bf16"
        timing = dict(calls=2, trials=2, warmup=1)
    device = jax.devices()[0].device_kind
    impls = args.attention_impl.split(",")
    attention_dropout = impls == ["fused"]
    header = (f"{'layer':<9}{'size':<6}{'tokens':>7}{'dtype':>10}{'attention':>10}{'lsjax ms':>10}{'flax ms':>10}"
              f"{'speedup':>9}")
    print(f"device: {device}; lsjax backend: {ops.get_backend()}; attention: {args.attention_impl}; "
          f"dropout: {not args.no_dropout} (attention-prob: {attention_dropout and not args.no_dropout})\n{header}",
          flush=True)
    rows = []
    for size in args.sizes.split(","):
        for tokens in map(int, args.tokens.split(",")):
            for dtype_name in args.dtypes.split(","):
                configs = {impl: layer_config(size, DTYPES[dtype_name], tokens, args.seq, not args.no_dropout, impl,
                                              attention_dropout) for impl in impls}
                for kind in LAYERS:
                    for row in bench_row(kind, configs, tokens // args.seq, args.seq, not args.no_dropout, timing):
                        rows.append({"size": size, **row})
                        print(f"{kind:<9}{size:<6}{tokens:>7}{row['dtype']:>10}{row['attention_impl']:>10}"
                              f"{row['lsjax_ms']:>10.3f}{row['flax_ms']:>10.3f}{row['speedup']:>8.2f}x", flush=True)
                    with open(args.out, "w") as f:
                        json.dump({"device": device, "backend": ops.get_backend(),
                                   "attention_impl": args.attention_impl, "dropout": not args.no_dropout,
                                   "seq": args.seq, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
