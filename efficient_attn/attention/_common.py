"""Shared argument checks and small helpers for the attention families.

Every family validates its inputs here, at trace time, so a wrong shape is one
clear ValueError sentence and never an XLA error. Shapes follow the legend:
B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Dims(NamedTuple):
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int

  @property
  def G(self) -> int:
    """Query heads per key/value head (GQA group size)."""
    return self.N // self.K


def check_qkv(query, key, value, fn: str) -> Dims:
  """Validates BTNH / BSKH / BSKH shapes and returns the dimensions."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
          f"{fn}: `{name}` must have rank 4 ({'[B, T, N, H]' if name == 'query' else '[B, S, K, H]'}),"
          f" got shape {getattr(x, 'shape', None)}.")
  B, T, N, H = query.shape
  Bk, S, K, Hk = key.shape
  if key.shape != value.shape:
    raise ValueError(
        f"{fn}: `key` and `value` must have the same shape [B, S, K, H], got {key.shape} and {value.shape}.")
  if Bk != B:
    raise ValueError(f"{fn}: batch sizes differ: query has B={B}, key/value have B={Bk}.")
  if Hk != H:
    raise ValueError(f"{fn}: head dims differ: query has H={H}, key/value have H={Hk}.")
  if N % K:
    raise ValueError(
        f"{fn}: query heads N={N} must be a multiple of key/value heads K={K} (MHA: K=N, GQA: K divides N, MQA: K=1).")
  return Dims(B, T, S, N, K, H)


def resolve_scale(scale, head_dim: int) -> float:
  """`scale` or the default H ** -0.5."""
  return head_dim ** -0.5 if scale is None else scale


def split_segment_ids(segment_ids, dims: Dims, fn: str):
  """Returns (q_ids [B, T], kv_ids [B, S]) int32, or None when not given.

  `segment_ids` is either one int array [B, T] (self-attention, T == S) or a pair
  (q_ids [B, T], kv_ids [B, S]).
  """
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"{fn}: `segment_ids` pair must be (q_ids [B, T], kv_ids [B, S]), got {len(segment_ids)} arrays.")
    q_ids, kv_ids = segment_ids
  else:
    if dims.T != dims.S:
      raise ValueError(
          f"{fn}: a single `segment_ids` array needs T == S (self-attention), got T={dims.T}, S={dims.S};"
          " pass a pair (q_ids [B, T], kv_ids [B, S]).")
    q_ids = kv_ids = segment_ids
  q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
  if q_ids.shape != (dims.B, dims.T):
    raise ValueError(f"{fn}: query `segment_ids` must have shape [B, T]={[dims.B, dims.T]}, got {list(q_ids.shape)}.")
  if kv_ids.shape != (dims.B, dims.S):
    raise ValueError(f"{fn}: key `segment_ids` must have shape [B, S]={[dims.B, dims.S]}, got {list(kv_ids.shape)}.")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def check_mask(mask, dims: Dims, fn: str):
  """Checks that a boolean mask broadcasts to [B, N, T, S]; returns it as bool or None."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  target = (dims.B, dims.N, dims.T, dims.S)
  if mask.ndim > 4 or any(m not in (1, t) for m, t in zip(mask.shape[::-1], target[::-1])):
    raise ValueError(f"{fn}: `mask` of shape {list(mask.shape)} does not broadcast to [B, N, T, S]={list(target)}.")
  if mask.dtype != jnp.bool_:
    raise ValueError(f"{fn}: `mask` must be boolean (True = may attend), got dtype {mask.dtype}.")
  return mask


def check_bias(bias, dims: Dims, fn: str):
  """Checks that an additive bias broadcasts to [B, N, T, S]."""
  if bias is None:
    return None
  bias = jnp.asarray(bias)
  target = (dims.B, dims.N, dims.T, dims.S)
  if bias.ndim > 4 or any(m not in (1, t) for m, t in zip(bias.shape[::-1], target[::-1])):
    raise ValueError(f"{fn}: `bias` of shape {list(bias.shape)} does not broadcast to [B, N, T, S]={list(target)}.")
  return bias


def check_divisible(length: int, block: int, what: str, arg: str, fn: str):
  if block <= 0:
    raise ValueError(f"{fn}: `{arg}` must be a positive integer, got {block}.")
  if length % block:
    raise ValueError(
        f"{fn}: {what} {length} is not divisible by `{arg}`={block}; pad the sequence or pick a {arg} that divides it.")


def masked_softmax(logits, visible, axis=-1):
  """float32 softmax of `logits` over `axis`, restricted to `visible`.

  A row with no visible entry (or only -inf logits) gets all-zero weights, so
  its attention output is exactly 0 and its gradients are finite.
  """
  logits = jnp.where(visible, logits.astype(jnp.float32), -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=axis, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def gather_block_pairs(x, block: int, kv_blocks, q_blocks=None):
  """Blocks of a mask / bias at static (query block, key block) pairs, never expanding it.

  x: broadcastable to [B, N, T, S]; a size-1 axis stays size 1 (a [B, 1, 1, S]
  padding mask is never expanded to T x S). kv_blocks: int NumPy [h, u, M]
  (h = 1 or N), the key block that slot m of the u-th query block reads;
  q_blocks: int NumPy [u], which query blocks those are (default 0 .. u-1).
  Out-of-range key blocks are clipped (the caller masks those slots). T and S
  are zero-padded up to multiples of `block`.
  Returns [B|1, N|1, u|1, block|1, M|1, block|1].
  """
  x = jnp.asarray(x)
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  mb, mn, mt, ms = x.shape
  u = kv_blocks.shape[1]
  q_blocks = np.arange(u) if q_blocks is None else np.asarray(q_blocks)
  tq, bq = (-(-mt // block), block) if mt > 1 else (1, 1)
  tk, bk = (-(-ms // block), block) if ms > 1 else (1, 1)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, tq * bq - mt), (0, tk * bk - ms)))
  x = x.reshape(mb, mn, tq, bq, tk, bk).transpose(0, 1, 2, 4, 3, 5)
  zero = np.zeros((1, 1, 1), np.int32)
  hi = np.arange(mn).reshape(mn, 1, 1) if mn > 1 else zero
  qi = q_blocks.reshape(1, u, 1) if mt > 1 else zero
  ki = np.clip(kv_blocks, 0, tk - 1) if ms > 1 else zero
  return x[:, hi, qi, ki].transpose(0, 1, 2, 4, 3, 5)
