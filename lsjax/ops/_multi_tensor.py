"""Partitioning pieces shared by the multi-tensor ops (``adam_update_multi``, ``all_finite``):
every leaf keeps its own sharding, independently of the other leaves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.sharding import NamedSharding, PartitionSpec


def leaf_shardings(mesh, leaves: Sequence[Any]) -> tuple[NamedSharding, ...]:
    """Each leaf's own ``NamedSharding`` on ``mesh`` (replicated when it has none)."""
    return tuple(NamedSharding(mesh, x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec())
                 for x in leaves)


def leaf_factors(leaves: Sequence[Any]) -> list[str]:
    """Shardy rule factors of each leaf: leaf i of rank r gets ``a{i}_0 ... a{i}_{r-1}``."""
    return [" ".join(f"a{i}_{d}" for d in range(len(t.shape))) for i, t in enumerate(leaves)]
