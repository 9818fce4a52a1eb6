"""Mesh configs: named mesh axes, a ZeRO stage and logical-axis rules.

A config (``configs/mesh/<name>.yaml``) looks like::

    axes: {data: -1, tensor: 1}   # mesh axis -> size; one -1 takes the remaining devices
    zero_stage: 3                 # 0 (plain data parallel), 1, 2 or 3
    rules:                        # logical axis -> mesh axis (or null), first match wins
      - [batch, data]
      - [embed, data]

Logical axes used by :mod:`lsjax.models`: params ``embed``, ``heads``, ``kv``,
``mlp``, ``vocab``; activations ``batch``, ``length``. A logical axis without
a rule is replicated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import yaml
from jax.sharding import AxisType, Mesh

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "mesh"
DATA_AXIS = "data"
TENSOR_AXIS = "tensor"

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How to lay the devices out and shard params, gradients and optimizer state.

    Attributes:
      axes: ordered ``(mesh_axis, size)`` pairs; at most one size is -1 (the rest of the devices).
      zero_stage: 0 = replicated state; 1 = optimizer state sharded over ``data``;
        2 = also gradients reduce-scattered over ``data``; 3 = also params sharded (via the rules).
      rules: ``(logical_axis, mesh_axis | None)`` pairs for ``flax.linen`` logical partitioning.
      name: the config's name (for logs).
      overlap_collectives: compile multi-device steps with XLA:GPU's latency-hiding scheduler
        (:data:`OVERLAP_COLLECTIVES`), so gradient all-reduces, reduce-scatters and ZeRO-3's
        parameter all-gathers run under the compute instead of between it. Ignored on the CPU.
    """

    axes: tuple[tuple[str, int], ...]
    zero_stage: int = 0
    rules: Rules = ()
    name: str = "custom"
    overlap_collectives: bool = True

    def __post_init__(self):
        names = [a for a, _ in self.axes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"mesh config {self.name!r}: axes must be non-empty and unique, got {names}")
        sizes = [s for _, s in self.axes]
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(
                f"mesh config {self.name!r}: axis sizes must be positive, with at most one -1, got {dict(self.axes)}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"mesh config {self.name!r}: zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage and DATA_AXIS not in names:
            raise ValueError(f"mesh config {self.name!r}: ZeRO needs a {DATA_AXIS!r} mesh axis, got {names}")
        for logical, mesh_axes in self.rules:
            unknown = set(_as_tuple(mesh_axes)) - set(names)
            if unknown:
                raise ValueError(
                    f"mesh config {self.name!r}: rule {logical!r} -> {mesh_axes!r} names mesh axes {sorted(unknown)} "
                    f"that are not in {names}"
                )

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    def axis_sizes(self, num_devices: int) -> tuple[int, ...]:
        """Sizes with the -1 axis filled in; ValueError if they do not tile ``num_devices``."""
        sizes = [s for _, s in self.axes]
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh config {self.name!r}: axes {dict(self.axes)} need a multiple of {fixed} devices, "
                    f"got {num_devices}"
                )
            sizes[sizes.index(-1)] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"mesh config {self.name!r}: axes {dict(self.axes)} need {fixed} devices, got {num_devices} "
                f"(pass devices=jax.devices()[:{fixed}], or make one axis -1)"
            )
        return tuple(sizes)


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return tuple(mesh_axes) if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)


# XLA:GPU issues each collective's start and done back to back unless its latency-hiding scheduler
# (off by default) moves them apart: with it, the collectives of a sharded step overlap the
# compute on their own stream. Passed as ``jax.jit(..., compiler_options=...)``; ignored on the CPU.
OVERLAP_COLLECTIVES = {"xla_gpu_enable_latency_hiding_scheduler": True}


def load_mesh_config(name_or_path: str | Path, **overrides: Any) -> MeshConfig:
    """Reads ``configs/mesh/<name>.yaml`` (or a YAML path); ``overrides`` replace top-level keys.

    ``axes`` may be overridden with a mapping, e.g. ``load_mesh_config("dp_tp", axes={"data": 2, "tensor": 4})``.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no mesh config {str(name_or_path)!r}: {path} does not exist (known: {known})")
    raw = {**(yaml.safe_load(path.read_text()) or {}), **overrides}
    unknown = set(raw) - {"axes", "zero_stage", "rules", "name", "overlap_collectives"}
    if unknown:
        raise ValueError(f"mesh config {path}: unknown keys {sorted(unknown)}")
    axes = raw.get("axes") or {}
    rules = tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in raw.get("rules") or ())
    return MeshConfig(
        axes=tuple((str(k), int(v)) for k, v in (axes.items() if isinstance(axes, Mapping) else axes)),
        zero_stage=int(raw.get("zero_stage", 0)),
        rules=rules,
        name=str(raw.get("name", path.stem)),
        overlap_collectives=bool(raw.get("overlap_collectives", True)),
    )


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh of ``cfg`` over ``devices`` (default: all of them), with Auto axis types.

    A config of one device (all sizes 1, e.g. ``single``) takes the first device.
    Auto axes (not the Explicit default of ``jax.make_mesh``) let XLA propagate
    shardings from the jit in/out shardings and the sharding constraints.
    """
    devices = list(jax.devices() if devices is None else devices)
    if all(size == 1 for _, size in cfg.axes):
        devices = devices[:1]
    sizes = cfg.axis_sizes(len(devices))
    return jax.make_mesh(sizes, cfg.axis_names, axis_types=(AxisType.Auto,) * len(sizes), devices=devices)


def logical_axes(abstract_params: Any) -> Any:
    """The logical ``PartitionSpec`` of every param (``PartitionSpec()`` where not annotated)."""
    return nn.get_partition_spec(abstract_params)


def validate(cfg: MeshConfig, mesh: Mesh, abstract_params: Any) -> None:
    """ValueError unless ``mesh`` matches ``cfg`` and every sharded param dim divides by its mesh axes.

    ``abstract_params`` are the (possibly ``jax.eval_shape``-d) params with their
    ``nn.with_logical_partitioning`` boxes.
    """
    expected = dict(zip(cfg.axis_names, cfg.axis_sizes(mesh.size)))
    if dict(mesh.shape) != expected:
        raise ValueError(f"mesh {dict(mesh.shape)} does not match config {cfg.name!r} axes {expected}")
    specs = logical_axes(abstract_params)
    shapes = nn.unbox(abstract_params)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]
    for (path, spec), leaf in zip(flat_specs, jax.tree.leaves(shapes)):
        shape = np.shape(leaf)
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), cfg.rules) if len(spec) else ()
        for dim, (logical, mesh_axes) in enumerate(zip(spec, mesh_spec)):
            size = math.prod(mesh.shape[a] for a in _as_tuple(mesh_axes))
            if shape[dim] % size:
                raise ValueError(
                    f"param {jax.tree_util.keystr(path)} {shape}: dim {dim} ({logical!r}, size {shape[dim]}) is not "
                    f"divisible by mesh axis {mesh_axes!r} of size {size} (config {cfg.name!r}); pick a model size "
                    f"divisible by {size} or a smaller {mesh_axes!r} axis"
                )


def _is_spec(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)
