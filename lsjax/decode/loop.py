"""A decode loop that checks its stop condition once every few steps.

XLA:GPU runs a ``lax.while_loop`` whose trip count it cannot know by copying the
condition to the host and waiting for the device after every iteration, so each
decode step would end in a host round trip (the device idles while the next
step's kernels are launched). A loop with a static trip count runs without that
wait. :func:`while_loop_in_blocks` runs blocks of ``block`` steps (an inner
static loop) and checks the condition between blocks: one host round trip per
block instead of per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

State = TypeVar("State")
Scratch = TypeVar("Scratch")


def while_loop_in_blocks(cond_fun: Callable[[State], jax.Array],
                         body_fun: Callable[[State, Scratch], tuple[State, Scratch]],
                         init: tuple[State, Scratch], *, block: int,
                         keep_stopped_state: bool = True) -> tuple[State, Scratch]:
    """``lax.while_loop`` over ``(state, scratch)`` with the condition checked every ``block`` steps.

    The result's ``state`` equals that of ``lax.while_loop(cond_fun, body_fun, ...)``
    exactly (unless ``keep_stopped_state`` is False): a step taken after ``cond_fun(state)``
    turned False inside a block is computed and discarded (``state`` kept by a select on the
    device). ``scratch``
    (e.g. a decoder's KV cache, not copied by a select) keeps every step's update,
    so ``body_fun`` may run up to ``block - 1`` times after the stop, also past the
    last step the condition allows: its scratch must tolerate that (XLA's
    ``dynamic_update_slice`` and gathers clamp their indices, so caches indexed by
    a step counter do, as the lsjax decoder's).

    Args:
      cond_fun: ``state -> bool`` scalar.
      body_fun: ``(state, scratch) -> (state, scratch)``.
      init: ``(state, scratch)``.
      block: steps per condition check (>= 1; 1 is a plain ``lax.while_loop``).
      keep_stopped_state: False skips the select, so the state also keeps the steps after the
        stop (one select kernel a state leaf a step fewer): only for a body whose further steps
        leave what the caller reads of the state unchanged.
    """
    if block < 1:
        raise ValueError(f"while_loop_in_blocks: block must be >= 1, got {block}")
    if block == 1:
        return jax.lax.while_loop(lambda c: cond_fun(c[0]), lambda c: body_fun(*c), init)

    def step(_, carry):
        state, scratch = carry
        new_state, scratch = body_fun(state, scratch)
        if not keep_stopped_state:
            return new_state, scratch
        live = cond_fun(state)
        return jax.tree.map(lambda new, old: jnp.where(live, new, old), new_state, state), scratch

    return jax.lax.while_loop(lambda c: cond_fun(c[0]), lambda c: jax.lax.fori_loop(0, block, step, c), init)
