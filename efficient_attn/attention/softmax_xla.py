"""Softmax attention with materialised logits, and the visibility and dropout rules every softmax path shares.

Queries arrive grouped as [B, K, G, T, H] (G = N // K query heads per key/value head), so
GQA / MQA never repeat keys or values. `xla_attention` forms the whole [B, K, G, T, S]
logits; the chunked path (softmax_chunked.py) forms one [.., Cq, Ck] tile of them at a
time and asks `visibility` and `dropout_keep` about each tile by its absolute position, so
both paths mask and drop exactly the same entries.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from efficient_attn.attention import _common


class Dropout(NamedTuple):
  """Attention dropout of one call: rate in (0, 1), `broadcast` = one [T, S] mask for all batch and heads."""
  rate: float
  broadcast: bool
  seed: jax.Array  # uint32 [2], drawn from the rng


def _mix(h):
  """A 32-bit integer finaliser (xor-shift-multiply): every input bit flips about half the output bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def dropout_keep(drop: Dropout, shape, t0, s0):
  """bool keep mask for the [B, K, G, T, S] block of logits at query / key offsets (t0, s0).

  A pure function of the seed and each element's absolute (batch, head, query, key)
  position, so any tiling of the same logits draws the same mask; with `broadcast`
  the batch and head are left out (one [T, S] mask for all), as Flax's broadcast_dropout.
  """
  B, K, G, T, S = shape
  shape = (1, 1, 1, T, S) if drop.broadcast else shape
  iota = functools.partial(lax.broadcasted_iota, jnp.uint32, shape)
  t = iota(3) + jnp.asarray(t0).astype(jnp.uint32)
  s = iota(4) + jnp.asarray(s0).astype(jnp.uint32)
  h = _mix(t ^ drop.seed[0])
  h = _mix(h ^ (s * jnp.uint32(0x9E3779B1) + drop.seed[1]))
  if not drop.broadcast:
    head = iota(1) * jnp.uint32(G) + iota(2)
    h = _mix(h ^ (head * jnp.uint32(0x85EBCA77) + iota(0) * jnp.uint32(0xC2B2AE3D)))
  threshold = jnp.uint32(min(int(round(drop.rate * (1 << 24))), (1 << 24) - 1))
  return (h >> 8) >= threshold  # P(keep) = 1 - rate (to 2^-24)


def apply_dropout(p, drop, t0, s0):
  """Weights p [B, K, G, T, S] with dropped entries zeroed and kept ones scaled by 1 / (1 - rate)."""
  if drop is None:
    return p
  keep = dropout_keep(drop, p.shape, t0, s0)
  return jnp.where(keep, p * (1.0 / (1.0 - drop.rate)), jnp.zeros((), p.dtype))


def group_heads(x, dims):
  """Bias / mask broadcastable to [B, N, T, S] -> [b, K|1, G|1, t, s] (size-1 dims kept)."""
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  b, n, t, s = x.shape
  return x.reshape(b, dims.K, dims.G, t, s) if n == dims.N else x.reshape(b, 1, 1, t, s)


def visibility(T, S, t0, s0, mask, seg, causal, kv_len=None, window=None):
  """bool, broadcastable to [B, K, G, T, S] (always rank 5), for queries t0 + [0, T) and keys
  s0 + [0, S); None if all visible."""
  vis = None

  def conj(a, b):
    return b if a is None else a & b

  if causal or kv_len is not None or window is not None:
    t_pos = t0 + lax.broadcasted_iota(jnp.int32, (1, 1, 1, T, S), 3)
    s_pos = s0 + lax.broadcasted_iota(jnp.int32, (1, 1, 1, T, S), 4)
    if causal:
      vis = conj(vis, t_pos >= s_pos)
    if window is not None:
      vis = conj(vis, (s_pos >= t_pos - window[0]) & (s_pos <= t_pos + window[1]))
    if kv_len is not None:
      vis = conj(vis, s_pos < kv_len)
  if seg is not None:
    q_ids, kv_ids = seg
    vis = conj(vis, q_ids[:, None, None, :, None] == kv_ids[:, None, None, None, :])
  if mask is not None:
    vis = conj(vis, mask)
  return vis


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def xla_probs(q_BKGTH, k_BKSH, bias, mask, seg, causal, window, scale):
  """Materialised softmax weights [B, K, G, T, S] (stats dtype) and the rows' logsumexp [B, K, G, T]."""
  T, S = q_BKGTH.shape[3], k_BKSH.shape[2]
  sd = _common.stats_dtype(q_BKGTH.dtype)
  logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH, preferred_element_type=sd) * jnp.asarray(scale, sd)
  if bias is not None:
    logits = logits + bias.astype(sd)
  vis = visibility(T, S, 0, 0, mask, seg, causal, window=window)
  if vis is None:
    return jax.nn.softmax(logits, axis=-1), jax.nn.logsumexp(logits, axis=-1)
  # A finite mask value keeps exp and its gradient NaN-free; a row whose max is the
  # mask value sees no key, and its (uniform) weights are zeroed by `seen_rows`.
  logits = jnp.where(vis, logits, jnp.asarray(_MASKED, sd))
  m = lax.stop_gradient(logits.max(-1, keepdims=True))
  p = jnp.exp(logits - m)
  total = p.sum(-1, keepdims=True)
  seen = m > _MASKED / 2
  lse = jnp.where(seen, m + jnp.log(total), -jnp.inf)[..., 0]
  return p / total, lse  # uniform on rows that see nothing (lse -inf): callers zero those rows


def seen_rows(lse):
  """bool [.., T, 1]: the rows that see at least one key."""
  return (lse > -jnp.inf)[..., None]


def xla_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, causal, window, scale, drop):
  """Materialised logits [B, K, G, T, S]; softmax in stats dtype; rows with no visible key -> 0.

  Returns (out [B, K, G, T, Hv], logsumexp [B, K, G, T]), both in the stats dtype.
  """
  p, lse = xla_probs(q_BKGTH, k_BKSH, bias, mask, seg, causal, window, scale)
  p = apply_dropout(p, drop, 0, 0)
  out = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=p.dtype)
  # Zeroing the [.., T, H] output (not the [.., T, S] weights) keeps no extra T·S array for the backward.
  return jnp.where(seen_rows(lse), out, jnp.zeros((), out.dtype)), lse
