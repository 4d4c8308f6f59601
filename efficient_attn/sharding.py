"""Meshes and the one table that maps logical parameter axes to mesh axes.

Mesh axes: `data`, `fsdp`, `tensor`, `expert`. The batch is split over
(data, fsdp, expert); parameters over fsdp (their `embed` axis, ZeRO-3 style),
tensor (heads / mlp / vocab) and expert (the expert axis of MoE weights).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (None = replicated). Flax drops a mesh axis that a
# dimension cannot use twice, so the same table serves dense and MoE layers.
RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
    ("norm", None),
)


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A 4-axis mesh (data, fsdp, tensor, expert) with Auto axis types (GSPMD-style propagation).

  `devices` defaults to all devices (of every process in a multi-process run).
  """
  shape = tuple(sizes[a] for a in MESH_AXES)
  kw = {} if devices is None else {"devices": devices}
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), **kw)


def param_shardings(abstract_boxed_params, mesh) -> object:
  """NamedShardings for a (possibly `nn.Partitioned`-boxed) param tree, by RULES."""
  specs = nn.get_partition_spec(abstract_boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over (data, fsdp, expert); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles per-process numpy rows into global arrays sharded over the batch axes.

  In a single-process run `local` is the whole batch; in a multi-process run
  process p passes its contiguous block of rows [p·B/P, (p+1)·B/P) of the
  global batch, the layout `jax.make_array_from_process_local_data` expects.
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}
