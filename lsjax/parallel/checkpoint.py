"""Save a sharded train state and restore it onto any mesh (orbax).

Orbax writes each array once (every process its own shards) and, given target
shardings, reads back only the pieces each device needs, so a state saved
under ZeRO-3 on 8 devices restores under data parallelism on 2 (or any other
mesh) without going through one host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_state(path: str | Path, state: Any) -> None:
    """Writes ``state`` (a pytree of sharded arrays) to the new directory ``path``; blocks until done."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), state)
        ckptr.wait_until_finished()


def restore_state(path: str | Path, abstract_state: Any, shardings: Any) -> Any:
    """Reads the state saved at ``path`` laid out as ``shardings`` (a tree matching ``abstract_state``).

    ``abstract_state`` gives shapes and dtypes (e.g. ``jax.eval_shape`` of the
    state's init); the saved layout and mesh do not matter.
    """
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), target)
