"""Mesh configs, shardings (data / tensor parallel, ZeRO-1/2/3) and the sharded train step.

Typical use (see :func:`shard_train_step`)::

    cfg = load_mesh_config("zero3")
    mesh = make_mesh(cfg)
    abstract = jax.eval_shape(model.init, rng, src, tgt_in)["params"]
    validate(cfg, mesh, abstract)
    p_shard = param_shardings(abstract, mesh, cfg.rules)
"""

from lsjax.parallel.distributed import maybe_initialize_distributed
from lsjax.parallel.mesh import MeshConfig, load_mesh_config, make_mesh, validate
from lsjax.parallel.sharding import (
    add_data_axis,
    batch_sharding,
    grad_constraint,
    grad_shardings,
    optimizer_state_shardings,
    param_shardings,
    replicated,
    shard_train_step,
)

__all__ = [
    "MeshConfig",
    "add_data_axis",
    "batch_sharding",
    "grad_constraint",
    "grad_shardings",
    "load_mesh_config",
    "make_mesh",
    "maybe_initialize_distributed",
    "optimizer_state_shardings",
    "param_shardings",
    "replicated",
    "shard_train_step",
    "validate",
]
