"""``lsjax-demo``: the fused layer norm end to end on this machine.

Runs a small pre-LN residual block (forward + backward) through every
available backend, checks they agree with the XLA reference, and prints the
custom calls XLA compiled. Replaced by the training + translation job once
the model lands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lsjax import ops


def _block_loss(x, residual, scale, bias, w):
    y, stream = ops.layer_norm(x, scale, bias, residual=residual)
    return jnp.mean(jnp.square(y @ w + stream))


def main() -> None:
    keys = jax.random.split(jax.random.key(0), 5)
    tokens, hidden = 256, 1000  # hidden not a multiple of 8: the general path
    x = jax.random.normal(keys[0], (tokens, hidden), jnp.float32)
    residual = jax.random.normal(keys[1], (tokens, hidden), jnp.float32)
    scale = 1 + 0.1 * jax.random.normal(keys[2], (hidden,))
    bias = 0.1 * jax.random.normal(keys[3], (hidden,))
    w = jax.random.normal(keys[4], (hidden, hidden)) / hidden**0.5
    args = (x, residual, scale, bias, w)
    grad_fn = jax.value_and_grad(_block_loss, argnums=(0, 1, 2, 3))
    with ops.use_backend("xla"):
        ref_loss, ref_grads = jax.jit(grad_fn)(*args)
    print(f"devices: {jax.devices()}; backends: {ops.available_backends()}")
    for name in ops.available_backends():
        with ops.use_backend(name):
            step = jax.jit(grad_fn)
            loss, grads = step(*args)
            calls = sorted({line.split('custom_call_target="')[1].split('"')[0]
                            for line in step.lower(*args).compile().as_text().splitlines()
                            if 'custom_call_target="lsjax' in line})
        err = max(float(jnp.max(jnp.abs(g - r))) for g, r in zip(grads, ref_grads))
        print(f"{name:8s} loss {float(loss):.6f} (reference {float(ref_loss):.6f}), "
              f"max grad difference {err:.2e}, custom calls: {calls or 'none (pure XLA)'}")
        if err > 1e-3:
            raise SystemExit(f"backend {name} disagrees with the reference by {err}")


if __name__ == "__main__":
    main()
