"""Expert MLPs: the one MLP every expert path runs, and grouped matmuls over rows sorted by expert.

`expert_mlp(x, experts, act, matmul)` is the MLP; `matmul` says how rows meet weights:
batched per expert (`jnp.matmul` on [E, C, D] x [E, D, F]), one expert's rows (`jnp.matmul`
on [R, D] x [D, F]) or rows in contiguous runs per expert (`ragged_matmul`).

Grouped matmuls, two implementations chosen by the lowering platform (`dispatch.dropless_experts`):

- "ragged_dot" (GPU/TPU): `jax.lax.ragged_dot(x, w, group_sizes)` over rows in one
  contiguous run per expert, a native kernel there. XLA:CPU lowers ragged_dot densely
  (every row against every expert: E times the FLOPs), so it is the accelerator path only.
- "blocked" (CPU): rows laid out as a *bulk* of `bulk` rows per expert, run as one batched
  matmul ("ECD,EDF->ECF", the efficient shape on CPU), then an *overflow* region for
  the rows of experts with more than `bulk` rows, in blocks of a fixed size that each
  belong to one expert. A loop runs the whole MLP block by block over the non-empty
  blocks only (`block_mlp`, a custom VJP whose backward loop recomputes the hidden
  activations rather than storing them). With a balanced router the bulk holds nearly
  every row and the loop runs a few blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax



def expert_mlp(x, experts, act, matmul=jnp.matmul):
  """The expert MLP: act(x @ w_in) @ w_out, or with `w_gate` the GLU (act(x @ w_gate) ⊙ (x @ w_in)) @ w_out
  (Shazeer 2020).

  experts: {"w_in", "w_out"[, "w_gate"]}. `matmul(x, w)`: `jnp.matmul` runs every expert
  on its own rows ([E, C, D] x [E, D, F] -> [E, C, F], batched over E) or one expert
  ([R, D] x [D, F]); `ragged_matmul(group_sizes_E)` runs [R, D] rows in contiguous runs per
  expert against [E, D, F]. Cost 2·rows·D·F per weight.
  """
  h = matmul(x, experts["w_in"])
  h = act(matmul(x, experts["w_gate"])) * h if "w_gate" in experts else act(h)
  return matmul(h, experts["w_out"])


def ragged_matmul(group_sizes_E):
  """`matmul` for `expert_mlp` over rows in runs of group_sizes_E rows per expert (`jax.lax.ragged_dot`)."""
  return functools.partial(lax.ragged_dot, group_sizes=group_sizes_E)


def ragged_mlp(x_rows, experts, act, group_sizes_E):
  """Expert MLP over rows in contiguous runs of group_sizes_E rows per expert (`jax.lax.ragged_dot`)."""
  return expert_mlp(x_rows, experts, act, ragged_matmul(group_sizes_E))


def _varying_axes(x) -> frozenset:
  """The shard_map axes `x` varies over (`.vma` in older jax, `.manual_axis_type.varying` now)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
  return frozenset(vma)


def _match_varying_axes(tree):
  """Marks every array of `tree` as varying over the union of their shard_map axes.

  Inside shard_map, tokens vary over the batch axes and weights over the expert (and
  tensor) axes. Autodiff turns these explicit casts into the psums the cotangents need
  (e.g. dw summed over the data axis), so the custom VJP below sees one type throughout.
  """
  leaves = jax.tree.leaves(tree)
  vma = frozenset().union(*(_varying_axes(a) for a in leaves))
  cast = lambda a: a if _varying_axes(a) == vma else lax.pcast(a, tuple(sorted(vma - _varying_axes(a))), to="varying")
  return jax.tree.map(cast, tree), vma


def _zeros(shape, dtype, vma):
  zeros = jnp.zeros(shape, dtype)
  return lax.pcast(zeros, tuple(sorted(vma)), to="varying") if vma else zeros


def _valid_blocks(block_expert, num_experts):
  """Indices of the non-empty blocks first (in order), and how many there are."""
  valid = block_expert < num_experts
  return jnp.argsort(~valid, stable=True), jnp.sum(valid)


def _block_mlp_fwd_impl(x_RD, experts, block_expert, act):
  E = experts["w_in"].shape[0]
  b = x_RD.shape[0] // block_expert.shape[0]
  order, count = _valid_blocks(block_expert, E)
  _, vma = _match_varying_axes((x_RD, experts))

  def one_block(i, y_RD):
    start = order[i] * b
    e = block_expert[order[i]]
    y_bD = expert_mlp(lax.dynamic_slice_in_dim(x_RD, start, b), {k: w[e] for k, w in experts.items()}, act)
    return lax.dynamic_update_slice_in_dim(y_RD, y_bD.astype(y_RD.dtype), start, 0)

  return lax.fori_loop(0, count, one_block, _zeros(x_RD.shape[:1] + experts["w_out"].shape[-1:], x_RD.dtype, vma))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def block_mlp(x_RD, experts, block_expert, act):
  """y_RD[r] = MLP_e(x_RD[r]) for e = block_expert[r // block]; rows of blocks with id >= E give 0.

  R = num_blocks · block rows (block = R // len(block_expert)). The loop visits the
  non-empty blocks only, forward and backward, so padding blocks cost nothing; the
  backward recomputes each block's hidden activations (one extra [block, D] @ [D, F])
  and accumulates dw in place in the loop carry.
  """
  return _block_mlp_fwd_impl(x_RD, experts, block_expert, act)


def _block_mlp_fwd(x_RD, experts, block_expert, act):
  return _block_mlp_fwd_impl(x_RD, experts, block_expert, act), (x_RD, experts, block_expert)


def _block_mlp_bwd(act, residuals, dy_RD):
  x_RD, experts, block_expert = residuals
  E = experts["w_in"].shape[0]
  b = x_RD.shape[0] // block_expert.shape[0]
  order, count = _valid_blocks(block_expert, E)
  _, vma = _match_varying_axes((x_RD, experts, dy_RD))

  def one_block(i, carry):
    dx_RD, dw = carry
    start = order[i] * b
    e = block_expert[order[i]]
    w = {k: v[e] for k, v in experts.items()}
    _, vjp = jax.vjp(lambda x, w: expert_mlp(x, w, act), lax.dynamic_slice_in_dim(x_RD, start, b), w)
    dx_bD, dw_e = vjp(lax.dynamic_slice_in_dim(dy_RD, start, b).astype(x_RD.dtype))
    dx_RD = lax.dynamic_update_slice_in_dim(dx_RD, dx_bD, start, 0)
    return dx_RD, {k: dw[k].at[e].add(dw_e[k]) for k in dw}

  init = (_zeros(x_RD.shape, x_RD.dtype, vma), {k: _zeros(v.shape, v.dtype, vma) for k, v in experts.items()})
  dx_RD, dw = lax.fori_loop(0, count, one_block, init)
  return dx_RD, dw, None


block_mlp.defvjp(_block_mlp_fwd, _block_mlp_bwd)


def bulk_block_mlp(x_rows, experts, act, block_expert, bulk: int, num_sources: int = 1):
  """Expert MLP over the blocked layout of `dispatch.sort_by_expert` (CPU path).

  x_rows: [num_sources · rows, D], per source (device that sent them) first a bulk of
  E·bulk rows (expert-major, `bulk` rows each), then the overflow blocks described by
  block_expert [num_sources, blocks]. The bulk of all sources runs as one batched matmul
  [E, num_sources · bulk, D]; the overflow through `block_mlp`.
  """
  E, D = experts["w_in"].shape[0], x_rows.shape[-1]
  x = x_rows.reshape(num_sources, -1, D)
  x_bulk, x_over = x[:, :E * bulk], x[:, E * bulk:]
  parts = []
  if bulk:
    x_ECD = jnp.swapaxes(x_bulk.reshape(num_sources, E, bulk, D), 0, 1).reshape(E, num_sources * bulk, D)
    y_ECD = expert_mlp(x_ECD, experts, act)
    parts.append(jnp.swapaxes(y_ECD.reshape(E, num_sources, bulk, D), 0, 1).reshape(num_sources, E * bulk, D))
  if x_over.shape[1]:
    blocks = _match_varying_axes((x_over.reshape(-1, D), experts))[0]
    y_over = block_mlp(*blocks, block_expert.reshape(-1), act)
    parts.append(y_over.reshape(num_sources, -1, D))
  return jnp.concatenate(parts, axis=1).reshape(-1, D)


def bulk_rows(rows: int, num_experts: int) -> int:
  """Bulk rows per expert for `rows` pairs: the balanced share, so a balanced router fills the bulk."""
  return rows // num_experts


@functools.lru_cache(maxsize=None)
def block_size(rows: int, num_experts: int) -> int:
  """Rows per overflow block: 1/8 of the balanced share, between 8 and 64 (padding vs. small-matmul cost)."""
  target = max(8, rows // (8 * num_experts))
  size = 8
  while size * 2 <= min(target, 64):
    size *= 2
  return size
