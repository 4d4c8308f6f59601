"""Context parallelism for exact softmax attention: ring attention, and an all_gather of the keys.

Inside `jax.shard_map` over a mesh axis of P devices, each holding T_l = T / P tokens of q, k, v
(and segment ids) in a `context` layout ("contiguous" or "zigzag": see context.py):

  ring        queries stay put; each shard's K/V block (and its key segment ids) travels round the
              ring with `jax.lax.ppermute`, one hop per step of a `lax.scan` over the P steps, sent
              before the step's compute so the two can overlap. Each step attends the local query
              pieces to the visiting key pieces, one (query piece, key piece) pair at a time, and
              folds the pair's (output, log-sum-exp) into the running pair in float32 (the online
              softmax). Causal calls decide per PAIR from the pieces' sequence positions: a key
              piece before the query piece is fully visible, the same piece is causal within
              itself, a later piece is skipped (`lax.cond`: no work, no [T, T] mask). A custom VJP
              keeps memory O(T_l) per device: the forward saves q, k, v, out and the log-sum-exp;
              the backward runs a second ring carrying K/V with their float32 dK/dV accumulators,
              which one last hop brings home to the block's owner (Liu et al. 2023, "Ring Attention
              with Blockwise Transformers"; Brandon et al. 2023, "Striped Attention" for the balance
              idea that zigzag serves here). Traffic per device and step: one hop of K/V
              ([B, T_l, K, H + Hv], + int [B, T_l] key ids) forward; backward, K/V and their float32
              dK/dV. P hops each way (the forward's last, back home, is unused: kept so that every
              hop is sent before the step's compute). FLOPs about one device's / P, balanced by the
              zigzag layout: after the first step every shard computes 2 of its 4 pairs per step.
  all_gather  K/V (and key segment ids) gathered whole (`jax.lax.all_gather`, tiled) and put in sequence
              order; queries stay split; causality from the global positions of queries and keys (a
              [T_l, T] mask). Autodiff transposes the gather to a reduce-scatter of dK/dV. Simple, and
              the better choice for short rings; memory O(T) per device for the gathered K/V.

Per ring step the pair runs softmax_chunked's block kernel on every platform (one tile, i.e. the
materialised "xla" form, when a piece is short): the fused kernels (splash, cudnn, triton) do not
return the block's log-sum-exp that the merge needs.

Legend: B batch, T_l local tokens, n pieces per shard (1 contiguous, 2 zigzag), Tp = T_l / n the piece
length, N query heads, K kv heads, G = N / K, H head dim, Hv value head dim, P shards.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from efficient_attn.attention import context
from efficient_attn.attention.softmax_chunked import block_forward, block_grads

STRATEGIES = ("ring", "all_gather")


class Ring(NamedTuple):
  """The static plan of a ring call (hashable: a custom_vjp non-diff argument)."""
  axis: str
  layout: str
  causal: bool
  scale: float
  chunk: tuple[int, int]  # the block kernel's (query_chunk, key_chunk)


def ring_attention(query_BTNH, key_BSKH, value_BSKH, seg, plan: Ring):
  """One shard's rows of exact softmax attention over the whole ring: [B, T_l, N, Hv] in query's dtype.

  query [B, T_l, N, H], key / value [B, T_l, K, H | Hv] and seg (q_ids, kv_ids), int [B, T_l] each, or None,
  all laid out by `plan.layout`.
  """
  B, T, N, H = query_BTNH.shape
  K, Hv = key_BSKH.shape[2], value_BSKH.shape[-1]
  mark = functools.partial(context.varying, axis_name=plan.axis, like=query_BTNH)
  q_BKGTH = mark(jnp.moveaxis(query_BTNH.reshape(B, T, K, N // K, H), 1, 3))
  k_BKSH, v_BKSH = (mark(jnp.moveaxis(x, 1, 2)) for x in (key_BSKH, value_BSKH))
  seg = None if seg is None else tuple(map(mark, seg))
  out_BKGTH = _ring(plan, q_BKGTH, k_BKSH, v_BKSH, seg)
  return jnp.moveaxis(out_BKGTH, 3, 1).reshape(B, T, N, Hv)


# ----------------------------------------------------------------------------- the ring and its VJP


def _pieces(x, axis: int, n: int):
  """x cut into its n equal pieces along `axis` (a tuple; None stays None)."""
  return None if x is None else tuple(jnp.split(x, n, axis=axis))


def _pairs(plan: Ring, n: int, s, run, skip):
  """{(a, b): run(a, b, diagonal) or skip(a, b)} for the query pieces a and key pieces b of the block held at
  step s. Step 0 (s None) is the shard's own block, known statically: causal, a piece sees itself causally,
  an earlier local piece fully and a later one not at all (left out; in both layouts a shard's later piece
  is later in the sequence). At
  s >= 1 the pieces differ, and a causal pair is either fully visible or skipped: a `lax.cond` on their
  sequence positions, so skipped pairs cost nothing."""
  if s is not None and plan.causal:
    P = lax.axis_size(plan.axis)
    order = jnp.asarray(context.piece_order(P, plan.layout).reshape(P, n))
    r = lax.axis_index(plan.axis)
    q_pos, kv_pos = order[r], order[(r - s) % P]
  out = {}
  for a in range(n):
    for b in range(n):
      if not plan.causal:
        out[a, b] = run(a, b, False)
      elif s is None:
        if a >= b:
          out[a, b] = run(a, b, a == b)
      else:
        out[a, b] = lax.cond(q_pos[a] > kv_pos[b], lambda a=a, b=b: run(a, b, False), lambda a=a, b=b: skip(a, b))
  return out


def _merge(out_a, lse_a, out_b, lse_b):
  """The online-softmax union of two (output [.., T, Hv], log-sum-exp [.., T]) pairs over disjoint keys (lse -inf:
  no key)."""
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(m > -jnp.inf, m, 0.0)
  w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = w_a + w_b
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  out = (out_a * w_a[..., None] + out_b * w_b[..., None]) / safe[..., None]
  return out, jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def _hop(plan: Ring, x):
  """x (a pytree) sent one shard on round the ring: shard i's block goes to shard i + 1."""
  P = lax.axis_size(plan.axis)
  return lax.ppermute(x, plan.axis, [(i, (i + 1) % P) for i in range(P)])


def _ring_forward(plan: Ring, q, k, v, seg):
  """(out [B, K, G, T_l, Hv], lse [B, K, G, T_l]) in float32 (the stats dtype); lse -inf where no key is visible."""
  P = lax.axis_size(plan.axis)
  n = context.local_pieces(plan.layout, q.shape[3], "softmax_attention")
  sd = jnp.promote_types(q.dtype, jnp.float32)
  q_p = _pieces(q, 3, n)
  q_ids = None if seg is None else _pieces(seg[0], 1, n)
  mark = functools.partial(context.varying, axis_name=plan.axis, like=q)
  none_out = mark(jnp.zeros(q_p[0].shape[:-1] + (v.shape[-1],), sd))
  none_lse = mark(jnp.full(q_p[0].shape[:-1], -jnp.inf, sd))

  def step(acc, block, s):
    k_b, v_b, kv_ids = block
    k_p, v_p, kv_p = _pieces(k_b, 2, n), _pieces(v_b, 2, n), _pieces(kv_ids, 1, n)

    def run(a, b, diagonal):
      ids = None if seg is None else (q_ids[a], kv_p[b])
      return block_forward(q_p[a], k_p[b], v_p[b], ids, diagonal, plan.scale, plan.chunk)

    pairs = _pairs(plan, n, s, run, lambda a, b: (none_out, none_lse))
    acc = list(acc)
    for (a, _), (o, l) in pairs.items():
      acc[a] = _merge(*acc[a], o.astype(sd), l.astype(sd))
    return tuple(acc)

  def body(carry, s):
    acc, block = carry
    nxt = _hop(plan, block)  # sent before the step's compute, which it does not wait for
    return (step(acc, block, s), nxt), None

  block = (k, v, None if seg is None else seg[1])
  nxt = _hop(plan, block)
  acc = step(tuple((none_out, none_lse) for _ in range(n)), block, None)
  (acc, _), _ = lax.scan(body, (acc, nxt), jnp.arange(1, P))  # the last hop, home, is not used
  return jnp.concatenate([o for o, _ in acc], axis=3), jnp.concatenate([l for _, l in acc], axis=3)


def _ring_backward(plan: Ring, res, d_out):
  """dq, dk, dv: a second ring carrying each K/V block with its dK/dV (float32), one last hop home."""
  q, k, v, seg, out, lse = res
  P = lax.axis_size(plan.axis)
  n = context.local_pieces(plan.layout, q.shape[3], "softmax_attention")
  sd = jnp.promote_types(q.dtype, jnp.float32)
  delta = jnp.sum(d_out.astype(sd) * out.astype(sd), -1)  # rowsum(dO ∘ O) [B, K, G, T_l]
  q_p, do_p, lse_p, delta_p = _pieces(q, 3, n), _pieces(d_out, 3, n), _pieces(lse, 3, n), _pieces(delta, 3, n)
  q_ids = None if seg is None else _pieces(seg[0], 1, n)
  mark = functools.partial(context.varying, axis_name=plan.axis, like=q)
  zeros = lambda shape: mark(jnp.zeros(shape, sd))  # noqa: E731

  def step(dq, block, grads, s):
    k_b, v_b, kv_ids = block
    k_p, v_p, kv_p = _pieces(k_b, 2, n), _pieces(v_b, 2, n), _pieces(kv_ids, 1, n)

    def run(a, b, diagonal):
      ids = None if seg is None else (q_ids[a], kv_p[b])
      return block_grads(q_p[a], k_p[b], v_p[b], ids, diagonal, plan.scale, plan.chunk, lse_p[a], delta_p[a], do_p[a])

    def skip(a, b):
      return zeros(q_p[a].shape), zeros(k_p[b].shape), zeros(v_p[b].shape)

    dq = list(dq)
    dk, dv = (list(_pieces(g, 2, n)) for g in grads)
    for (a, b), (dq_ab, dk_ab, dv_ab) in _pairs(plan, n, s, run, skip).items():
      dq[a], dk[b], dv[b] = dq[a] + dq_ab, dk[b] + dk_ab, dv[b] + dv_ab
    return tuple(dq), (jnp.concatenate(dk, axis=2), jnp.concatenate(dv, axis=2))

  def body(carry, s):
    dq, block, grads = carry
    nxt = _hop(plan, block)
    dq, grads = step(dq, block, grads, s)
    return (dq, nxt, _hop(plan, grads)), None

  block = (k, v, None if seg is None else seg[1])
  nxt = _hop(plan, block)
  dq, grads = step(tuple(zeros(x.shape) for x in q_p), block, (zeros(k.shape), zeros(v.shape)), None)
  (dq, _, (dk, dv)), _ = lax.scan(body, (dq, nxt, _hop(plan, grads)), jnp.arange(1, P))  # P hops: dK/dV are home
  dq = jnp.concatenate(dq, axis=3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan: Ring, q, k, v, seg):
  return _ring_forward(plan, q, k, v, seg)[0].astype(q.dtype)


def _ring_fwd(plan: Ring, q, k, v, seg):
  out, lse = _ring_forward(plan, q, k, v, seg)
  out = out.astype(q.dtype)
  return out, (q, k, v, seg, out, lse)


_ring.defvjp(_ring_fwd, _ring_backward)


# ----------------------------------------------------------------------------- all_gather


def gather_keys(key_BSKH, value_BSKH, seg, axis: str, layout: str, causal: bool):
  """The whole sequence's keys for this shard's queries: (key [B, P·T_l, K, H], value [B, P·T_l, K, Hv] in
  sequence order, seg (q_ids [B, T_l], kv_ids [B, P·T_l]) or None, mask bool [1, 1, T_l, P·T_l] or None (causal:
  query sees key where its global position is not earlier)). One tiled all_gather per array."""
  P = lax.axis_size(axis)
  T = key_BSKH.shape[1]
  n = context.local_pieces(layout, T, "softmax_attention")
  gather = lambda x: context.from_layout(lax.all_gather(x, axis, axis=1, tiled=True), P, layout)  # noqa: E731
  key, value = gather(key_BSKH), gather(value_BSKH)
  seg = None if seg is None else (seg[0], gather(seg[1]))
  if not causal:
    return key, value, seg, None
  Tp = T // n
  mine = jnp.asarray(context.piece_order(P, layout).reshape(P, n))[lax.axis_index(axis)]
  q_pos = (mine[:, None] * Tp + jnp.arange(Tp)).reshape(T)
  mask = q_pos[:, None] >= jnp.arange(P * T)[None, :]
  return key, value, seg, mask[None, None]

