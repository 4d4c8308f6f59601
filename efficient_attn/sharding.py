"""Meshes and the one table that maps logical axes to mesh axes, for params and activations.

Mesh axes: `data`, `fsdp`, `context`, `tensor`, `expert`. The batch is split over
(data, fsdp, expert), the sequence (`length`) over context; parameters over fsdp (their
`embed` axis, ZeRO-3 style), tensor (heads / mlp / vocab) and expert (the expert axis of
MoE weights). Parameters are whole on `context`: its devices hold the same weights and
different pieces of each sequence (`attention.context`).

Params carry logical names from `nn.with_logical_partitioning`; activations are named at
layer boundaries with `constrain(x, ("batch", "length", "embed"))` (MaxText style), and the
MoE's `shard_map` specs are read from the same table (`mesh_axes`), so RULES alone places
everything.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (None = replicated). A mesh axis serves one dimension of an
# array, the first rule that claims it (an activation ("batch", "length", "embed") keeps
# "embed" whole: "batch" took fsdp first), so the same table serves params and activations.
RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
    ("length", "context"),
    ("layers", None),
    ("norm", None),
    ("conv", None),
)


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A 5-axis mesh (data, fsdp, context, tensor, expert) with Auto axis types (GSPMD-style propagation).

  `sizes`: {axis: size}, a missing axis is 1. `devices` defaults to all devices (of every process in a
  multi-process run). Context sits next to tensor, inside data / fsdp: its ring neighbours are near devices.
  """
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  kw = {} if devices is None else {"devices": devices}
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), **kw)


def param_shardings(abstract_boxed_params, mesh) -> object:
  """NamedShardings for a (possibly `nn.Partitioned`-boxed) param tree, by RULES."""
  import flax.linen as nn  # here only: the MoE's and the kernels' shard_maps read RULES without importing Flax

  specs = nn.get_partition_spec(abstract_boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def mesh_axes(logical_axes, mesh, rules=RULES) -> tuple[tuple[str, ...], ...]:
  """Per dimension, the mesh axes RULES place it on, among `mesh`'s axes.

  Rules claim mesh axes in table order and a mesh axis serves one dimension: a later rule
  skips the axes an earlier one took (Flax's params follow the same table order).
  `logical_axes`: one name (or None = replicated) per dimension.
  """
  present = set(getattr(mesh, "axis_names", ()))
  out: list[tuple[str, ...]] = [() for _ in logical_axes]
  used: set[str] = set()
  for name, target in rules:
    if name not in logical_axes or target is None:
      continue
    target = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in target if a in present and a not in used)
    out[logical_axes.index(name)] = axes
    used.update(axes)
  return tuple(out)


def divisible_axes(axes, size: int, mesh, keep=()) -> tuple[str, ...]:
  """The axes (in their order) that split a dimension of `size` evenly: `keep` always, the others
  while the size still divides (greedily, in order). E.g. a batch of 4 on data=2 x expert=4,
  keeping "expert": ("expert",)."""
  chosen, shards = set(keep), math.prod(mesh.shape[a] for a in keep)
  for a in axes:
    if a not in chosen and size % (shards * mesh.shape[a]) == 0:
      chosen.add(a)
      shards *= mesh.shape[a]
  return tuple(a for a in axes if a in chosen)


def spec(dims) -> P:
  """PartitionSpec from per-dimension tuples of mesh axes: () -> None, (a,) -> a."""
  return P(*(None if not axes else axes[0] if len(axes) == 1 else tuple(axes) for axes in dims))


def logical_spec(logical_axes, mesh, shape=None, rules=RULES) -> P:
  """The PartitionSpec RULES give an array whose dimensions are named `logical_axes`.

  With `shape`, a dimension keeps only the mesh axes its size divides (`divisible_axes`).
  """
  dims = mesh_axes(logical_axes, mesh, rules)
  if shape is not None:
    dims = tuple(divisible_axes(axes, n, mesh) for axes, n in zip(dims, shape, strict=True))
  return spec(dims)


def constrain(x, logical_axes):
  """Pins activation `x` to the sharding RULES give `logical_axes`, under the current mesh.

  The activation counterpart of the params' logical names (MaxText style): e.g.
  `constrain(x_BTD, ("batch", "length", "embed"))` is batch-sharded and whole in D. A no-op
  without a mesh (`jax.set_mesh`), so modules run unchanged on one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(logical_axes, mesh, x.shape))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over the batch axes (data, fsdp, expert), the second (length) over context;
  the rest replicated."""
  return NamedSharding(mesh, logical_spec(("batch", "length")[:ndim] + (None,) * (ndim - 2), mesh))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles per-process numpy rows into global arrays sharded over the batch axes.

  In a single-process run `local` is the whole batch; in a multi-process run
  process p passes its contiguous block of rows [p·B/P, (p+1)·B/P) of the
  global batch, the layout `jax.make_array_from_process_local_data` expects.
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}
