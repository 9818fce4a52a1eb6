"""Mesh configs, shardings (data / tensor parallel, ZeRO-1/2/3) and the sharded train step.

The training loop (:mod:`lsjax.training.loop`) uses :class:`ShardingPlan`::

    mesh = make_mesh(cfg := load_mesh_config("zero3"))
    plan = ShardingPlan.create(cfg, mesh, jax.eval_shape(model.init, rng, src, tgt_in)["params"])
    # plan.params / plan.optimizer_state(abstract_opt) / plan.batch; in the step:
    # grads = plan.constrain_grads(grads); tx.update(plan.for_update(grads), opt, plan.for_update(params))

The same by hand, piece by piece::

    maybe_initialize_distributed()
    cfg = load_mesh_config("zero3")
    mesh = make_mesh(cfg)
    abstract = jax.eval_shape(model.init, rng, src, tgt_in)["params"]   # with logical boxes
    validate(cfg, mesh, abstract)
    p_shard = param_shardings(abstract, mesh, cfg.rules)
    o_shard = optimizer_state_shardings(jax.eval_shape(tx.init, nn.unbox(abstract)), p_shard, cfg.zero_stage)
    state_shard = (p_shard, o_shard, replicated(mesh))                   # + scalars (step, loss scale)
    # inside step_fn: grads = grad_constraint(grads, p_shard, cfg.zero_stage)
    step = shard_train_step(step_fn, state_shard, batch_sharding(mesh), mesh, cfg.rules)
    state, metrics = step(jax.device_put(state, state_shard), batch)
"""

from lsjax.parallel.checkpoint import restore_state, save_state
from lsjax.parallel.distributed import maybe_initialize_distributed
from lsjax.parallel.mesh import OVERLAP_COLLECTIVES, MeshConfig, load_mesh_config, make_mesh, validate
from lsjax.parallel.sharding import (
    ShardingPlan,
    add_data_axis,
    batch_sharding,
    grad_constraint,
    grad_shardings,
    jit_on_mesh,
    optimizer_state_shardings,
    param_shardings,
    replicated,
    shard_train_step,
)

__all__ = [
    "OVERLAP_COLLECTIVES",
    "MeshConfig",
    "ShardingPlan",
    "add_data_axis",
    "batch_sharding",
    "grad_constraint",
    "grad_shardings",
    "jit_on_mesh",
    "load_mesh_config",
    "make_mesh",
    "maybe_initialize_distributed",
    "optimizer_state_shardings",
    "param_shardings",
    "replicated",
    "restore_state",
    "save_state",
    "shard_train_step",
    "validate",
]
