"""Shardings of the train state and the jitted, sharded train step.

Everything is one ``jax.jit`` with ``in_shardings``/``out_shardings``: XLA's
partitioner inserts the collectives. What each ZeRO stage changes:

* params: the logical rules (ZeRO-3 configs map ``embed`` to ``data``, so XLA
  all-gathers each weight where it is used and reduce-scatters its gradient);
* optimizer state (stage >= 1): every param-shaped leaf takes its param's
  sharding plus ``data`` on one more dim (:func:`add_data_axis`);
* gradients (stage >= 2): :func:`grad_constraint` pins them to that same
  data-sharded layout, so XLA reduce-scatters instead of all-reducing.

:class:`ShardingPlan` bundles all of it for one model on one mesh (what the
training loop uses); the free functions are its pieces.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsjax.parallel.mesh import DATA_AXIS, OVERLAP_COLLECTIVES, MeshConfig, Rules, _as_tuple, validate

__all__ = [
    "ShardingPlan",
    "add_data_axis",
    "batch_sharding",
    "grad_constraint",
    "grad_shardings",
    "optimizer_state_shardings",
    "param_shardings",
    "replicated",
    "shard_train_step",
]


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh`` (scalars, step counters, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` per param (same tree as the unboxed params) from its logical axes.

    ``abstract_params`` carry ``nn.with_logical_partitioning`` boxes, e.g.
    ``jax.eval_shape(model.init, rng, *inputs)["params"]``.
    """
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params), mesh, list(rules))


def add_data_axis(sharding: NamedSharding, shape: Sequence[int], axis: str = DATA_AXIS) -> NamedSharding:
    """``sharding`` plus ``axis`` on the largest unsharded dim that ``axis``'s size divides.

    Unchanged when ``axis`` is already used, has size 1, or divides no free dim
    (the leaf then stays replicated over ``axis``).
    """
    mesh = sharding.mesh
    size = mesh.shape.get(axis, 1)
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    used = {a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))}
    if size == 1 or axis in used:
        return sharding
    free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % size == 0]
    if not free:
        return sharding
    dim = max(free, key=lambda d: shape[d])
    return NamedSharding(mesh, PartitionSpec(*spec[:dim], axis, *spec[dim + 1 :]))


def _shape(leaf) -> tuple[int, ...]:
    return tuple(np.shape(leaf))


def _with_data_axis(shardings: Any, abstract_params: Any) -> Any:
    return jax.tree.map(lambda s, p: add_data_axis(s, _shape(p)), shardings, nn.unbox(abstract_params))


def optimizer_state_shardings(opt_state: Any, param_shardings: Any, zero_stage: int) -> Any:
    """``NamedSharding`` per optimizer-state leaf (``opt_state`` may be abstract).

    Every sub-tree shaped like the params (Adam moments, fp32 master copies)
    takes the param shardings, plus ``data`` on one more dim when
    ``zero_stage >= 1``; any other array leaf is replicated (or data-sharded
    under ZeRO when a dim divides); scalars (step counts, loss scale) are replicated.
    """
    param_def = jax.tree.structure(param_shardings)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    shard = (lambda s, leaf: add_data_axis(s, _shape(leaf))) if zero_stage >= 1 else (lambda s, leaf: s)

    def is_param_tree(node) -> bool:
        return jax.tree.structure(node) == param_def

    def assign(node):
        if is_param_tree(node):
            return jax.tree.map(shard, param_shardings, node)
        return shard(replicated(mesh), node) if _shape(node) else replicated(mesh)

    return jax.tree.map(assign, opt_state, is_leaf=is_param_tree)


def grad_shardings(param_shardings: Any, abstract_params: Any, zero_stage: int) -> Any:
    """Gradient shardings: the params' own, plus ``data`` on one more dim when ``zero_stage >= 2``."""
    return _with_data_axis(param_shardings, abstract_params) if zero_stage >= 2 else param_shardings


def grad_constraint(grads: Any, param_shardings: Any, zero_stage: int) -> Any:
    """Inside the step: ZeRO-2/3 pin the gradients to their data-sharded layout (a reduce-scatter).

    Call between ``jax.grad`` and the optimizer update. A no-op for stages 0 and 1.
    """
    if zero_stage < 2:
        return grads
    return jax.lax.with_sharding_constraint(grads, grad_shardings(param_shardings, grads, zero_stage))


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = (DATA_AXIS,)) -> NamedSharding:
    """Leading (batch) dim split over the ``batch_axes`` present in ``mesh``; the rest replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def jit_on_mesh(fn: Callable, mesh: Mesh, rules: Rules, in_shardings: Any, out_shardings: Any,
                donate_argnums: int | tuple[int, ...] = ()) -> Callable:
    """``jax.jit`` of ``fn`` traced with ``mesh`` and the logical ``rules`` in context.

    So ``nn.with_logical_constraint`` inside ``fn`` resolves to mesh axes. The
    result is a ``jax.jit`` object (``.lower(...)`` works).
    """

    def on_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
            return fn(*args)

    return jax.jit(on_mesh, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)


def shard_train_step(
    step_fn: Callable[[Any, Any], tuple[Any, Any]],
    state_shardings: Any,
    batch_sharding: NamedSharding,
    mesh: Mesh,
    rules: Rules = (),
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """``jax.jit`` of ``step_fn(state, batch) -> (state, metrics)`` over ``mesh``.

    The state keeps ``state_shardings`` (a tree matching the state, or a prefix
    of it) and is donated; the batch comes in as ``batch_sharding``; metrics are
    replicated. Traced as :func:`jit_on_mesh`.
    """
    return jit_on_mesh(step_fn, mesh, rules, (state_shardings, batch_sharding),
                       (state_shardings, replicated(mesh)), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where every piece of one model's train step lives on ``mesh`` under ``config``.

    Attributes:
      config, mesh: the mesh config and the mesh built from it.
      params: ``NamedSharding`` per param, from the logical rules; ZeRO-3 also
        puts ``data`` on one more dim of params the rules leave unsharded over it.
      grads: the gradients' layout right after the backward pass (ZeRO-2/3: data-sharded).
      update: the layout params and gradients take inside the optimizer update: the
        optimizer state's (ZeRO >= 1: data-sharded, so each device updates its slice).
      batch: leading (batch) dim over ``data``.

    Build with :meth:`create`.
    """

    config: MeshConfig
    mesh: Mesh
    params: Any
    grads: Any
    update: Any
    batch: NamedSharding

    @classmethod
    def create(cls, config: MeshConfig, mesh: Mesh, abstract_params: Any) -> "ShardingPlan":
        """Validates ``mesh`` and the param shapes against ``config``, then lays everything out.

        ``abstract_params`` carry ``nn.with_logical_partitioning`` boxes
        (``jax.eval_shape(model.init, ...)["params"]``).
        """
        validate(config, mesh, abstract_params)
        stage = config.zero_stage
        params = param_shardings(abstract_params, mesh, config.rules)
        if stage >= 3:
            params = _with_data_axis(params, abstract_params)
        update = _with_data_axis(params, abstract_params) if stage >= 1 else params
        return cls(config, mesh, params, update if stage >= 2 else params, update, batch_sharding(mesh))

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @property
    def batch_divisor(self) -> int:
        """The global batch (rows) must be a multiple of this: the devices it is split over."""
        return math.prod(self.mesh.shape[a] for a in _as_tuple(self.batch.spec[0]))

    def optimizer_state(self, abstract_opt_state: Any) -> Any:
        """Shardings of the optimizer state: param-shaped leaves as :attr:`update`, the rest replicated."""
        return optimizer_state_shardings(abstract_opt_state, self.params, self.config.zero_stage)

    def constrain_grads(self, grads: Any) -> Any:
        """Right after the backward: ZeRO-2/3 pin the gradients to :attr:`grads` (a reduce-scatter)."""
        return jax.lax.with_sharding_constraint(grads, self.grads) if self.config.zero_stage >= 2 else grads

    def for_update(self, tree: Any) -> Any:
        """Params or gradients entering the optimizer: ZeRO >= 1 slices them to :attr:`update`."""
        return jax.lax.with_sharding_constraint(tree, self.update) if self.config.zero_stage >= 1 else tree

    def constrain(self, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        """Pins activation ``x`` to its logical axes (e.g. ``("batch", "length", "vocab")``) via the rules."""
        spec = nn.logical_to_mesh_axes(logical_axes, self.config.rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def jit(self, fn: Callable, in_shardings: Any, out_shardings: Any,
            donate_argnums: int | tuple[int, ...] = ()) -> Callable:
        """``jax.jit`` with these shardings; XLA propagates the rest from them and the constraints.

        No global mesh is set while tracing (unlike :func:`jit_on_mesh`): flax's
        ``DenseGeneral`` re-runs its boxed kernel init on the flat kernel shape and would pin it
        with the unflattened logical axes. Activations are pinned through :meth:`constrain`.
        On more than one device, ``config.overlap_collectives`` adds :data:`OVERLAP_COLLECTIVES`.
        """
        return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums,
                       compiler_options=self.compiler_options)

    @property
    def compiler_options(self) -> dict[str, Any] | None:
        """The XLA options of this plan's programs (None: XLA's defaults)."""
        return OVERLAP_COLLECTIVES if self.config.overlap_collectives and self.mesh.size > 1 else None
