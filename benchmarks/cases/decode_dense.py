"""Decode dense (layer norm -> matmul -> bias -> activation -> residual) vs its XLA reference.

A transformer-base beam-search step's dense layers at {32, 64} rows (batch x beam), bf16 and fp16:
the self-attention's fused QKV projection (512 -> 1536) and the cross-attention's query projection
(512 -> 512), both after the pre-attention layer norm; the FFN's first layer (512 -> 2048, layer norm,
relu) and its second (2048 -> 512, residual add).
"""

import jax.numpy as jnp

from benchmarks.harness import Case
from lsjax import ops

# (K, N, layer norm, activation, residual)
LAYERS = [(512, 1536, True, "none", False), (512, 512, True, "none", False), (512, 2048, True, "relu", False),
          (2048, 512, False, "none", True)]


def cases() -> list[Case]:
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
        for rows in (32, 64):
            for k, n, ln, act, res in LAYERS:
                def make(rng, rows=rows, k=k, n=n, ln=ln, res=res, dtype=dtype):
                    def normal(shape, dt=dtype, scale=1.0):
                        return jnp.asarray(rng.standard_normal(shape, dtype="float32") * scale).astype(dt)

                    ln_args = (1.0 + normal((k,), jnp.float32, 0.1), normal((k,), jnp.float32, 0.1)) if ln else ()
                    res_args = (normal((rows, n)),) if res else ()
                    return (normal((rows, k)), normal((k, n), scale=k ** -0.5), normal((n,), jnp.float32),
                            *ln_args, *res_args)

                def call(fn, ln=ln, act=act, res=res):
                    def run(x, kernel, bias, *rest):
                        kw = {"activation": act}
                        if ln:
                            kw["ln_scale"], kw["ln_bias"], rest = rest[0], rest[1], rest[2:]
                        if res:
                            kw["residual"] = rest[0]
                        return fn(x, kernel, bias, **kw)
                    return run

                size = jnp.dtype(dtype).itemsize
                out.append(Case(
                    op="decode_dense", shape=f"{rows}x{k}x{n}", dtype=jnp.dtype(dtype).name, make_inputs=make,
                    ours=call(ops.decode_dense), ref=call(ops.decode_dense_reference),
                    # x, the kernel, the bias and layer-norm vectors, the residual, and the output.
                    bytes_fwd=(rows * k + k * n + rows * n * (2 if res else 1)) * size + 4 * (n + (2 * k if ln else 0)),
                    bytes_fwd_bwd=0, modes=("fwd",),
                ))
    return out
