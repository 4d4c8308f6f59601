"""Expert parallelism: experts sharded over a mesh axis, tokens moved by all-to-all.

Layout inside `jax.shard_map`, read from the logical rules table of `efficient_attn.sharding`:
  - batch (token groups G, logical "batch") split over the table's batch axes
    (data, fsdp, expert) ∩ the mesh axes, as far as B divides (the expert axis always:
    tokens must be spread over the devices that hold the experts);
  - experts (logical "expert") split over `expert_axis` (E_local = E / n_expert per
    device); each expert's hidden dim F (logical "mlp") over the table's "mlp" axes
    (tensor) when F divides (Megatron-style column/row split, one psum); D whole
    (FSDP's shards of "embed" are gathered on entry);
  - any other axis holds a replica.

Capacity path (GShard): each device fills its [E, G_local, C, D] slot buffer, an
all-to-all over `expert_axis` turns it into [E_local, n_expert·G_local, C, D], the local
experts run, and the reverse all-to-all brings the outputs home to be combined.

Dropless path: the same, but the buffer is a counting sort of the device's pairs by
expert. On CPU (and any backend without a ragged collective) each destination gets a
fixed-size slice, padded to the static bound (all local pairs might pick one device),
moved by a plain all-to-all; the receiver runs the bulk as one batched matmul and
loops over the non-empty overflow blocks only (`gmm.bulk_block_mlp`). On GPU/TPU the rows move with `jax.lax.ragged_all_to_all` (only the
real rows; XLA:CPU does not implement it) straight into expert-sorted order for
`jax.lax.ragged_dot`. The choice is made by the platform the computation is lowered for
(`efficient_attn.platform.by_platform`), so an export for TPU from a CPU host takes the ragged path.

Routing happens before, outside shard_map, on batch-sharded arrays; since groups are
sequences and every reduction in `aux` is a global mean, sharded == single device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from efficient_attn import sharding
from efficient_attn.moe import dispatch, gmm
from efficient_attn.platform import by_platform

# Logical axes of the expert weights inside shard_map: the params' own names with "embed" whole.
WEIGHT_AXES = {"w_in": ("expert", None, "mlp"), "w_gate": ("expert", None, "mlp"), "w_out": ("expert", "mlp", None)}


def check_mesh(mesh, expert_axis: str, *, num_experts: int, batch: int, fn: str = "moe_ffn"):
  names = tuple(getattr(mesh, "axis_names", ()))
  if expert_axis not in names:
    raise ValueError(f"{fn}: `expert_axis`={expert_axis!r} is not an axis of the mesh; its axes are {list(names)}.")
  n = mesh.shape[expert_axis]
  if num_experts % n:
    raise ValueError(f"{fn}: num_experts={num_experts} is not divisible by the size {n} of mesh axis"
                     f" {expert_axis!r}; use a multiple of {n} experts or a smaller expert axis.")
  if batch % n:
    raise ValueError(f"{fn}: batch size B={batch} is not divisible by the size {n} of mesh axis {expert_axis!r};"
                     f" every expert-axis device needs its own sequences.")


def batch_axes(mesh, batch: int, expert_axis: str) -> tuple[str, ...]:
  """Mesh axes the token groups are split over: the rules' "batch" axes while B divides, the
  expert axis always."""
  (axes,) = sharding.mesh_axes(("batch",), mesh)
  axes += (expert_axis,) * (expert_axis not in axes)
  return sharding.divisible_axes(axes, batch, mesh, keep=(expert_axis,))


def tensor_axes(mesh, hidden_dim: int, expert_axis: str) -> tuple[str, ...]:
  """Mesh axes an expert's hidden dim F is split over: the rules' "mlp" axes (size > 1, not the
  expert axis) while F divides; () = F whole."""
  (axes,) = sharding.mesh_axes(("mlp",), mesh)
  axes = tuple(a for a in axes if a != expert_axis and mesh.shape[a] > 1)
  return sharding.divisible_axes(axes, hidden_dim, mesh)


def _specs(mesh, batch: int, experts, expert_axis: str):
  """shard_map specs: (token groups, {weight name: spec}, tensor axes to psum over)."""
  tax = tensor_axes(mesh, experts["w_in"].shape[-1], expert_axis)
  placed = {"expert": (expert_axis,), "mlp": tax}
  w_specs = {k: sharding.spec([placed[a] if a else () for a in WEIGHT_AXES[k]]) for k in experts}
  return sharding.spec([batch_axes(mesh, batch, expert_axis)]), w_specs, tax


def sharded_capacity_experts(x_GSD, token_GEC, gate_GEC, experts, act, mesh, expert_axis: str = "expert"):
  """`dispatch.capacity_experts` with experts sharded over `expert_axis` (float32 result)."""
  G, S, D = x_GSD.shape
  n_exp = mesh.shape[expert_axis]
  batch_spec, w_specs, tax = _specs(mesh, G, experts, expert_axis)

  def local(x_GSD, token_GEC, gate_GEC, experts):
    x_EGCD = dispatch.dispatch_slots(x_GSD, token_GEC)
    if n_exp > 1:  # [E, G_local, C, D] -> [E_local, n_exp · G_local, C, D]
      x_EGCD = lax.all_to_all(x_EGCD, expert_axis, 0, 1, tiled=True)
    E_local, G_all, C, _ = x_EGCD.shape
    y_EGCD = gmm.expert_mlp(x_EGCD.reshape(E_local, G_all * C, D), experts, act).reshape(x_EGCD.shape)
    if n_exp > 1:
      y_EGCD = lax.all_to_all(y_EGCD, expert_axis, 1, 0, tiled=True)
    y_GSD = dispatch.combine_slots(y_EGCD, token_GEC, gate_GEC, S)
    return lax.psum(y_GSD, tax) if tax else y_GSD

  return jax.shard_map(local, mesh=mesh, in_specs=(batch_spec, batch_spec, batch_spec, w_specs),
                       out_specs=batch_spec)(x_GSD, token_GEC, gate_GEC, experts)


def sharded_dropless_experts(x_GSD, expert_GSk, gate_GSk, experts, act, mesh, expert_axis: str = "expert",
                             *, impl: str | None = None, ragged_all_to_all=None):
  """`dispatch.dropless_experts` with experts sharded over `expert_axis` (float32 result).

  `impl`: "padded" (all_to_all of static-bound slices + block loop; any backend) or
  "ragged" (ragged_all_to_all + ragged_dot; GPU/TPU); None: ragged when lowered for GPU/TPU,
  padded otherwise. `ragged_all_to_all` replaces `jax.lax.ragged_all_to_all` (the tests pass
  `reference_ragged_all_to_all` to run the ragged path on CPU).
  """
  if impl not in (None, "padded", "ragged"):
    raise ValueError(f"sharded_dropless_experts: `impl`={impl!r} is not one of 'padded', 'ragged'.")
  G = x_GSD.shape[0]
  n_exp = mesh.shape[expert_axis]
  batch_spec, w_specs, tax = _specs(mesh, G, experts, expert_axis)

  def sharded(local_experts):
    def local(x_GSD, expert_GSk, gate_GSk, experts):
      y_GSD = local_experts(x_GSD, expert_GSk, gate_GSk, experts, act, expert_axis, n_exp)
      return lax.psum(y_GSD, tax) if tax else y_GSD

    return lambda: jax.shard_map(local, mesh=mesh, in_specs=(batch_spec, batch_spec, batch_spec, w_specs),
                                 out_specs=batch_spec)(x_GSD, expert_GSk, gate_GSk, experts)

  padded = sharded(_padded_local)
  ragged = sharded(lambda *a: _ragged_local(*a, ragged_all_to_all or lax.ragged_all_to_all))
  if impl is not None:
    return {"padded": padded, "ragged": ragged}[impl]()
  return by_platform((), cpu=padded, tpu=ragged, cuda=ragged)


def _pairs(x_GSD, expert_GSk):
  G, S, D = x_GSD.shape
  k = expert_GSk.shape[-1]
  n = G * S * k
  return x_GSD.reshape(G * S, D), expert_GSk.reshape(-1), jnp.arange(n, dtype=jnp.int32) // k, n


def _padded_local(x_GSD, expert_GSk, gate_GSk, experts, act, expert_axis, n_exp):
  """Per device: sort pairs into [n_exp, rows, D] slices (one per destination; bulk +
  overflow blocks), all_to_all, run the local experts, all_to_all back, combine."""
  x_ND, expert, token, n = _pairs(x_GSD, expert_GSk)
  D = x_ND.shape[1]
  E = experts["w_in"].shape[0] * n_exp
  bulk, block = gmm.bulk_rows(n, E), gmm.block_size(n, E)
  row, block_expert, _, rows = dispatch.sort_by_expert(expert, E, bulk=bulk, block=block, num_shards=n_exp)
  send = dispatch.gather_rows(x_ND, row, token, n_exp * rows).reshape(n_exp, rows, D)
  if n_exp > 1:
    send = lax.all_to_all(send, expert_axis, 0, 0, tiled=True)  # now [source, rows, D]
    block_expert = lax.all_to_all(block_expert, expert_axis, 0, 0, tiled=True)
  y_rows = gmm.bulk_block_mlp(send.reshape(-1, D), experts, act, block_expert, bulk, num_sources=n_exp)
  if n_exp > 1:
    y_rows = lax.all_to_all(y_rows.reshape(n_exp, rows, D), expert_axis, 0, 0, tiled=True)
  return dispatch.combine_pairs(y_rows.reshape(-1, D), row, gate_GSk)


def _ragged_local(x_GSD, expert_GSk, gate_GSk, experts, act, expert_axis, n_exp, ragged_a2a):
  """Per device: sort pairs by expert, ragged_all_to_all the real rows into expert-major
  order on their devices, ragged_dot, ragged_all_to_all back, combine.

  Slices are (device, local expert) pairs, so every receiver gets its rows already
  grouped by local expert (sources in order within each): no second sort.
  """
  x_ND, expert, token, n = _pairs(x_GSD, expert_GSk)
  D = x_ND.shape[1]
  E_local = experts["w_in"].shape[0]
  E = E_local * n_exp
  me = lax.axis_index(expert_axis)
  row, _, counts_E, _ = dispatch.sort_by_expert(expert, E)
  counts_E = counts_E.astype(jnp.int32)
  send = dispatch.gather_rows(x_ND, row, token, n)
  counts = lax.all_gather(counts_E, expert_axis).reshape(n_exp, n_exp, E_local)  # [source, dest, local expert]
  per_dest = jnp.sum(counts, axis=0)  # rows each device receives per local expert
  dest_start = jnp.cumsum(per_dest, axis=1) - per_dest  # where each local expert begins there
  before = jnp.cumsum(counts, axis=0) - counts  # rows from earlier sources, same (dest, expert)
  send_start = (jnp.cumsum(counts_E) - counts_E).astype(jnp.int32)
  recv_sizes = counts[:, me, :].reshape(E)
  recv = ragged_a2a(send, jnp.zeros((n_exp * n, D), send.dtype), send_start, counts_E,
                    (dest_start + before[me]).reshape(E), recv_sizes, axis_name=expert_axis)
  y_rows = gmm.ragged_mlp(recv, experts, act, per_dest[me])
  all_send_starts = (jnp.cumsum(counts.reshape(n_exp, E), axis=1) - counts.reshape(n_exp, E))
  back = ragged_a2a(y_rows, jnp.zeros((n, D), y_rows.dtype),
                    (dest_start[me][None, :] + before[:, me, :]).reshape(E), recv_sizes,
                    all_send_starts.reshape(n_exp, n_exp, E_local)[:, me, :].reshape(E), counts_E,
                    axis_name=expert_axis)
  return dispatch.combine_pairs(back, row, gate_GSk)


def reference_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                *, axis_name):
  """`jax.lax.ragged_all_to_all` written with all_gather + scatter (runs on any backend).

  Same semantics as the primitive's docstring: slice i of `operand` (input_offsets[i],
  send_sizes[i]) goes to device i // (len / axis size) at its output_offsets[i]. Moves
  every device's whole operand, so it is for tests, not for speed.
  """
  del recv_sizes  # implied by the senders' send_sizes
  n_dev = lax.axis_size(axis_name)
  me = lax.axis_index(axis_name)
  rows = operand.shape[0]
  gathered = lax.all_gather(operand, axis_name)  # [source, rows, ...]
  per_dev = input_offsets.shape[0] // n_dev
  mine = me * per_dev + jnp.arange(per_dev)  # the slices addressed to this device
  start, size, out = (jnp.take(lax.all_gather(a, axis_name), mine, axis=1)[..., None]
                      for a in (input_offsets, send_sizes, output_offsets))
  r = jnp.arange(rows)
  inside = (start <= r) & (r < start + size)  # [source, slice, row]
  target = jnp.sum(jnp.where(inside, out + r - start, 0), axis=1)
  target = jnp.where(jnp.any(inside, axis=1), target, output.shape[0])
  return output.at[target.reshape(-1)].set(gathered.reshape(-1, *operand.shape[1:]), mode="drop")
