"""Moving tokens to experts and back, on one device: capacity-based and dropless.

Shapes: G token groups, S tokens per group, E experts, C capacity, D model dim,
F expert hidden dim, k = top_k. A "pair" is one (token, choice): G·S·k of them.

Capacity path (Switch / GShard): every expert has C slots per group. A slot map
(token_GEC: which token sits in each slot, S = empty; gate_GEC: its weight) is built
from the router's choices; then one gather fills the [E, G·C, D] buffer, the experts
run as one batched matmul ("ECD,EDF->ECF"), and one scatter-add returns the weighted
outputs to their tokens. Cost O(G·E·C·D·F) for the experts and O(G·E·C·D) to move
tokens — not the O(G·S·E·C·D) of one-hot dispatch einsums.

Dropless path (MegaBlocks, Gale et al. 2022): no capacity. The pairs are sorted by expert
with a counting sort; the experts run as a grouped matmul over the sorted rows
(`jax.lax.ragged_dot` on GPU/TPU; on CPU a batched matmul over a bulk of rows per
expert plus a block loop over the overflow, `gmm.bulk_block_mlp`); the outputs are gathered
back per pair and summed with their gates. Cost O(G·S·k·D·F).

Experts are `gmm.expert_mlp`: act(x @ w_in) @ w_out, or GLU when `w_gate` is given.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from efficient_attn.moe import gmm
from efficient_attn.platform import by_platform


def expert_capacity(tokens_per_group: int, num_experts: int, top_k: int = 1,
                    capacity_factor: float = 1.25) -> int:
  """C = ceil(capacity_factor · tokens_per_group · top_k / E), clipped to [1, tokens_per_group]."""
  # The small epsilon keeps e.g. 1.1 * 80 / 8 = 11.000000000000002 from becoming 12.
  capacity = math.ceil(capacity_factor * tokens_per_group * top_k / num_experts - 1e-9)
  return max(1, min(tokens_per_group, capacity))


def rank_in_expert(expert, num_experts: int):
  """Counting sort of a flat int array of expert ids (stable).

  Returns (rank: position of each item among the items with the same expert, in item
  order; counts_E: items per expert).
  """
  n = expert.shape[0]
  order = jnp.argsort(expert, stable=True)
  counts_E = jnp.bincount(expert, length=num_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_sorted = jnp.arange(n, dtype=jnp.int32) - starts_E[expert[order]]
  return jnp.zeros(n, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32)), counts_E


def capacity_slots(expert_GSk, gate_GSk, num_experts: int, capacity: int):
  """Slot map of tokens-choose routing with C = `capacity` slots per expert and group.

  Priority (GShard): every token's first choice is placed before any token's second
  choice; within a choice, earlier tokens first. Pairs past an expert's C-th slot are
  dropped. Returns (token_GEC int32 with S for an empty slot, gate_GEC float32,
  keep_GSk bool: the pair got a slot).
  """
  G, S, k = expert_GSk.shape
  expert_by_priority = jnp.swapaxes(expert_GSk, 1, 2).reshape(G, k * S)
  gate_by_priority = jnp.swapaxes(gate_GSk, 1, 2).reshape(G, k * S)
  rank, _ = jax.vmap(rank_in_expert, (0, None))(expert_by_priority, num_experts)
  keep = rank < capacity
  slot = jnp.where(keep, expert_by_priority * capacity + rank, num_experts * capacity)
  token = jnp.broadcast_to(jnp.tile(jnp.arange(S, dtype=jnp.int32), k), (G, k * S))
  g = jnp.arange(G)[:, None]
  token_GEC = jnp.full((G, num_experts * capacity), S, jnp.int32).at[g, slot].set(token, mode="drop")
  gate_GEC = jnp.zeros((G, num_experts * capacity), gate_GSk.dtype).at[g, slot].set(
      gate_by_priority, mode="drop")
  keep_GSk = jnp.swapaxes(keep.reshape(G, k, S), 1, 2)
  shape = (G, num_experts, capacity)
  return token_GEC.reshape(shape), gate_GEC.reshape(shape), keep_GSk


def _flat_token_index_EGC(token_GEC, tokens_per_group: int):
  """Index into the flattened [G·S] tokens of each slot; G·S (out of range) for an empty slot."""
  G = token_GEC.shape[0]
  flat = token_GEC + tokens_per_group * jnp.arange(G, dtype=jnp.int32)[:, None, None]
  flat = jnp.where(token_GEC < tokens_per_group, flat, G * tokens_per_group)
  return jnp.swapaxes(flat, 0, 1)


def dispatch_slots(x_GSD, token_GEC):
  """x_EGCD: the token sitting in each expert slot (zeros in empty slots); one gather."""
  G, S, D = x_GSD.shape
  idx_EGC = _flat_token_index_EGC(token_GEC, S)
  return jnp.take(x_GSD.reshape(G * S, D), idx_EGC, axis=0, mode="fill", fill_value=0)


def combine_slots(y_EGCD, token_GEC, gate_GEC, tokens_per_group: int):
  """y_GSD (float32): each token's sum of gate · expert output over its slots; one scatter-add.

  A token with no slot (dropped, or taken by no expert) gets exactly 0.
  """
  E, G, C, D = y_EGCD.shape
  idx_EGC = _flat_token_index_EGC(token_GEC, tokens_per_group)
  weighted_EGCD = jnp.swapaxes(gate_GEC, 0, 1)[..., None] * y_EGCD.astype(jnp.float32)
  y = jnp.zeros((G * tokens_per_group, D), jnp.float32).at[idx_EGC.reshape(-1)].add(
      weighted_EGCD.reshape(-1, D), mode="drop")
  return y.reshape(G, tokens_per_group, D)


def capacity_experts(x_GSD, token_GEC, gate_GEC, experts, act):
  """Capacity-based expert layer on one device: dispatch, batched experts, combine (float32)."""
  G, S, D = x_GSD.shape
  _, E, C = token_GEC.shape
  x_EGCD = dispatch_slots(x_GSD, token_GEC)
  y_ECD = gmm.expert_mlp(x_EGCD.reshape(E, G * C, D), experts, act)
  return combine_slots(y_ECD.reshape(E, G, C, D), token_GEC, gate_GEC, S)


def sort_by_expert(expert, num_experts: int, *, bulk: int = 0, block: int = 1, num_shards: int = 1):
  """Counting-sort layout of pairs by expert into a buffer of static size.

  The experts are split into `num_shards` equal contiguous ranges (one per device of
  the expert axis), each with `rows_per_shard` rows: first a bulk of `bulk` rows per
  (shard-local) expert, then an overflow region where each expert's remaining rows
  run in blocks of `block` rows (its last block padded). rows_per_shard is the most a
  shard can need (all pairs in one expert), so shapes stay static.
  bulk=0, block=1, num_shards=1 is the plain compact sort that `jax.lax.ragged_dot` takes.

  Args:
    expert: int [n], the expert of each pair.
  Returns:
    row: int [n], the row of each pair in the [num_shards · rows_per_shard] buffer.
    block_expert: int [num_shards, overflow blocks], the shard-local expert of each
      overflow block; E // num_shards for an empty one.
    counts_E: pairs per expert.
    rows_per_shard: int.
  """
  n = expert.shape[0]
  experts_per_shard = num_experts // num_shards
  rank, counts_E = rank_in_expert(expert, num_experts)
  overflow = jnp.maximum(counts_E - bulk, 0)
  padded = ((overflow + block - 1) // block * block).reshape(num_shards, experts_per_shard)
  ends = jnp.cumsum(padded, axis=1)
  starts = (ends - padded).reshape(-1)
  overflow_rows = (max(n - bulk, 0) + experts_per_shard * (block - 1)) // block * block
  bulk_rows = experts_per_shard * bulk
  local_row = jnp.where(rank < bulk, (expert % experts_per_shard) * bulk + rank,
                        bulk_rows + starts[expert] + rank - bulk)
  row = (expert // experts_per_shard) * (bulk_rows + overflow_rows) + local_row
  block_start = jnp.arange(overflow_rows // block, dtype=ends.dtype) * block
  block_expert = jax.vmap(lambda e: jnp.searchsorted(e, block_start, side="right"))(ends)
  return row.astype(jnp.int32), block_expert.astype(jnp.int32), counts_E, bulk_rows + overflow_rows


def gather_rows(x_ND, row, token, num_rows: int):
  """Rows of the sorted buffer: x_ND[token[i]] lands in row[i]; unused rows are zeros."""
  n = x_ND.shape[0]
  row_token = jnp.full((num_rows,), n, jnp.int32).at[row].set(token)
  return jnp.take(x_ND, row_token, axis=0, mode="fill", fill_value=0)


def combine_pairs(y_rows, row, gate_GSk):
  """y_GSD (float32) = Σ over each token's k choices of gate · the output row of that pair."""
  G, S, k = gate_GSk.shape
  y_GSkD = jnp.take(y_rows, row, axis=0).reshape(G, S, k, -1).astype(jnp.float32)
  return jnp.einsum("GSk,GSkD->GSD", gate_GSk, y_GSkD)


def dropless_experts(x_GSD, expert_GSk, gate_GSk, experts, act, impl: str | None = None):
  """Dropless expert layer on one device (float32 result).

  `impl`: "ragged_dot" (GPU/TPU: compact sort + `jax.lax.ragged_dot`) or "blocked"
  (CPU: bulk + overflow blocks, `gmm.bulk_block_mlp`); None picks by the platform the
  computation is lowered for (`platform.by_platform`).
  """
  if impl not in (None, "ragged_dot", "blocked"):
    raise ValueError(f"dropless_experts: `impl`={impl!r} is not one of 'ragged_dot', 'blocked'.")
  G, S, D = x_GSD.shape
  k = expert_GSk.shape[-1]
  E = experts["w_in"].shape[0]
  n = G * S * k
  token = jnp.arange(n, dtype=jnp.int32) // k

  def ragged_dot():
    row, _, counts_E, num_rows = sort_by_expert(expert_GSk.reshape(-1), E)
    x_rows = gather_rows(x_GSD.reshape(G * S, D), row, token, num_rows)
    return combine_pairs(gmm.ragged_mlp(x_rows, experts, act, counts_E.astype(jnp.int32)), row, gate_GSk)

  def blocked():
    bulk, block = gmm.bulk_rows(n, E), gmm.block_size(n, E)
    row, block_expert, _, num_rows = sort_by_expert(expert_GSk.reshape(-1), E, bulk=bulk, block=block)
    x_rows = gather_rows(x_GSD.reshape(G * S, D), row, token, num_rows)
    return combine_pairs(gmm.bulk_block_mlp(x_rows, experts, act, block_expert, bulk), row, gate_GSk)

  if impl is not None:
    return {"ragged_dot": ragged_dot, "blocked": blocked}[impl]()
  return by_platform((), cpu=blocked, tpu=ragged_dot, cuda=ragged_dot)
