"""Softmax attention by an online softmax over key chunks, with a custom VJP: O(T·chunk) memory.

Follows FlashAttention-2 (Dao, 2023, arXiv:2307.08691): an outer loop over query chunks,
an inner loop over key chunks with an online softmax, and a custom VJP that saves only
the output and the per-row logsumexp and recomputes logit tiles in the backward pass.
The largest live tensor is one [B, K, G, Cq, Ck] tile, so memory is O(T·chunk) forward
and backward. With `is_causal` the inner loop stops at the diagonal: key chunks that no
query of the chunk can see are never computed (about half the tiles for T == S); a
sliding window skips the chunks outside it. Each tile is masked and dropped out by
softmax_xla's `visibility` / `dropout_keep` at its absolute position, so any chunk size
gives the materialised path's numbers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from efficient_attn.attention import _common
from efficient_attn.attention.softmax_xla import Dropout, apply_dropout, dropout_keep, visibility

# Measured on a 2-core CPU, causal and full fwd+bwd, f32, H=64 (see the module tests / report).
DEFAULT_CHUNK = (256, 256)
# Test seam: when set, called as hook(pass_name, q_chunk, k_chunk) for every executed tile.
_TILE_HOOK = None


class _Tiling(NamedTuple):
  """Static tiling of a chunked call (hashable: it is a custom_vjp non-diff argument)."""
  causal: bool
  scale: float
  cq: int  # query chunk
  ck: int  # key chunk
  nq: int
  ns: int
  kv_len: int | None  # true S when keys were padded, else None
  window: tuple[int, int] | None = None  # (left, right) sliding window
  dropout: tuple[float, bool] | None = None  # (rate, broadcast)

  def key_range(self, i):
    """(start, full, end) key chunks for query chunk i: chunks outside [start, end) are never
    visible; [start, full) need no position mask, [full, end) do."""
    if not self.causal:
      end = self.ns
      full = end - 1 if self.kv_len is not None else end
    else:
      end = jnp.minimum(self.ns, ((i + 1) * self.cq - 1) // self.ck + 1)
      full = jnp.minimum(end, (i * self.cq + 1) // self.ck)
      if self.kv_len is not None:
        full = jnp.minimum(full, self.ns - 1)
    if self.window is None:
      return 0, full, end
    left, right = self.window
    start = jnp.maximum(0, (i * self.cq - left) // self.ck)
    end = jnp.minimum(end, ((i + 1) * self.cq - 1 + right) // self.ck + 1)
    return start, start, end  # every tile of a window is position-masked

  def drop(self, seed):
    return None if self.dropout is None else Dropout(*self.dropout, seed)


def _pad_to(x, axis, length, value=0):
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def chunked_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, causal, window, scale, chunk, drop, want_lse):
  """Pads T and S to chunk multiples, runs the custom-VJP kernel, crops.

  q [B, K, G, T, H], k / v [B, K, S, H | Hv]; bias / mask grouped as `softmax_xla.group_heads`;
  chunk (query_chunk, key_chunk). Returns (out [B, K, G, T, Hv] in q's dtype, the rows' logsumexp
  [B, K, G, T] in the stats dtype (-inf where nothing is visible) if `want_lse`, else None).
  """
  T = q_BKGTH.shape[3]
  tiling, q, k, v, bias, mask, seg = _padded(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, causal, window, scale, chunk,
                                             drop)
  seed = None if drop is None else drop.seed
  if want_lse:
    out, lse = _flash_with_lse(tiling, q, k, v, bias, mask, seg, seed)
    return out[:, :, :, :T], jnp.where(jnp.isinf(lse), -jnp.inf, lse)[:, :, :, :T]
  return _flash(tiling, q, k, v, bias, mask, seg, seed)[:, :, :, :T], None


def _padded(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, causal, window, scale, chunk, drop):
  """The static tiling of a call and its arguments padded to whole chunks (padded keys are invisible)."""
  T, S = q_BKGTH.shape[3], k_BKSH.shape[2]
  cq, ck = min(chunk[0], T), min(chunk[1], S)
  nq, ns = -(-T // cq), -(-S // ck)
  Tp, Sp = nq * cq, ns * ck
  tiling = _Tiling(bool(causal), float(scale), cq, ck, nq, ns, S if Sp != S else None, window,
                   None if drop is None else (drop.rate, drop.broadcast))
  q = _pad_to(q_BKGTH, 3, Tp)
  k, v = (_pad_to(x, 2, Sp) for x in (k_BKSH, v_BKSH))
  bias, mask = (None if x is None else _pad_tiles(x, Tp, Sp) for x in (bias, mask))
  if seg is not None:
    seg = (_pad_to(seg[0], 1, Tp, -1), _pad_to(seg[1], 1, Sp, -2))
  return tiling, q, k, v, bias, mask, seg


def block_forward(q_BKGTH, k_BKSH, v_BKSH, seg, causal, scale, chunk):
  """One block of a longer attention (a ring step): the online softmax of these queries over these keys alone.

  Returns (out [B, K, G, T, Hv], logsumexp [B, K, G, T]) in the stats dtype, -inf where the block shows a row
  nothing; no VJP of its own: the caller merges blocks and differentiates them with `block_grads`.
  """
  T = q_BKGTH.shape[3]
  tiling, q, k, v, _, _, seg = _padded(q_BKGTH, k_BKSH, v_BKSH, None, None, seg, causal, None, scale, chunk, None)
  out, lse = _flash_forward(tiling, q, k, v, None, None, seg, None)
  return out[:, :, :, :T], jnp.where(jnp.isinf(lse), -jnp.inf, lse)[:, :, :, :T]


def block_grads(q_BKGTH, k_BKSH, v_BKSH, seg, causal, scale, chunk, lse_BKGT, delta_BKGT, d_out_BKGTH):
  """(dq, dk, dv) in the stats dtype of one block of a longer attention, FlashAttention-2's backward given the
  whole row's logsumexp (-inf: the row sees nothing anywhere) and delta = rowsum(dO ∘ O) of the whole output."""
  T, S = q_BKGTH.shape[3], k_BKSH.shape[2]
  tiling, q, k, v, _, _, seg = _padded(q_BKGTH, k_BKSH, v_BKSH, None, None, seg, causal, None, scale, chunk, None)
  Tp = q.shape[3]
  lse = _pad_to(jnp.where(jnp.isinf(lse_BKGT), jnp.inf, lse_BKGT), 3, Tp, jnp.inf)  # +inf: p = 0, never NaN
  delta, d_out = _pad_to(delta_BKGT, 3, Tp), _pad_to(d_out_BKGTH, 3, Tp)
  dq, dk, dv, _ = _flash_grads(tiling, q, k, v, None, None, seg, None, lse, delta, d_out)
  return dq[:, :, :, :T], dk[:, :, :S], dv[:, :, :S]


def _pad_tiles(x, Tp, Sp):
  """Pads the full-length T / S dims of a grouped bias / mask (zeros / False); size-1 dims stay."""
  x = _pad_to(x, 3, Tp) if x.shape[3] > 1 else x
  return _pad_to(x, 4, Sp) if x.shape[4] > 1 else x


def _tile(x, t_axis_start, s_axis_start, cq, ck):
  """The [.., Cq|1, Ck|1] tile of a grouped bias / mask whose last two dims are full or 1."""
  t, s = x.shape[3:]
  starts = (0, 0, 0, t_axis_start if t > 1 else 0, s_axis_start if s > 1 else 0)
  return lax.dynamic_slice(x, starts, x.shape[:3] + (cq if t > 1 else 1, ck if s > 1 else 1))


def _logit_tile(tiling, i, j, q_i, k, bias, mask, seg, position_masked: bool, pass_name: str):
  """Scaled, biased, masked logits [B, K, G, Cq, Ck] (stats dtype) of query chunk i against key chunk j."""
  cq, ck = tiling.cq, tiling.ck
  if _TILE_HOOK is not None:
    jax.debug.callback(_TILE_HOOK, pass_name, i, j)
  sd = _common.stats_dtype(q_i.dtype)
  k_j = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=2)
  s = jnp.einsum("BKGTH,BKSH->BKGTS", q_i, k_j, preferred_element_type=sd) * jnp.asarray(tiling.scale, sd)
  if bias is not None:
    s = s + _tile(bias, i * cq, j * ck, cq, ck).astype(sd)
  seg_tile = None if seg is None else (lax.dynamic_slice_in_dim(seg[0], i * cq, cq, axis=1),
                                       lax.dynamic_slice_in_dim(seg[1], j * ck, ck, axis=1))
  vis = visibility(cq, ck, i * cq, j * ck, None if mask is None else _tile(mask, i * cq, j * ck, cq, ck),
                   seg_tile, tiling.causal and position_masked, tiling.kv_len if position_masked else None,
                   tiling.window if position_masked else None)
  return s if vis is None else jnp.where(vis, s, -jnp.inf)


def _two_loops(tiling, i, body, carry):
  """Runs body(j, carry, position_masked) over the visible key chunks of query chunk i."""
  start, full, end = tiling.key_range(i)
  carry = lax.fori_loop(start, full, lambda j, c: body(j, c, False), carry)
  return lax.fori_loop(full, end, lambda j, c: body(j, c, True), carry)


def _flash_forward(tiling, q, k, v, bias, mask, seg, seed):
  """Online softmax. Returns out [B, K, G, Tp, Hv] and logsumexp [B, K, G, Tp] (+inf if nothing
  visible), both in the stats dtype."""
  B, K, G, _, _ = q.shape
  Hv = v.shape[-1]
  cq = tiling.cq
  sd = _common.stats_dtype(q.dtype)
  drop = tiling.drop(seed)

  def q_chunk(i):
    q_i = lax.dynamic_slice_in_dim(q, i * cq, cq, axis=3)

    def body(j, carry, position_masked):
      m, l, acc = carry
      s = _logit_tile(tiling, i, j, q_i, k, bias, mask, seg, position_masked, "fwd")
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new > -jnp.inf, m_new, jnp.zeros((), sd))  # no -inf - -inf for rows that saw nothing yet
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      v_j = lax.dynamic_slice_in_dim(v, j * tiling.ck, tiling.ck, axis=2)
      p_v = apply_dropout(p, drop, i * cq, j * tiling.ck)
      pv = jnp.einsum("BKGTS,BKSH->BKGTH", p_v.astype(v.dtype), v_j, preferred_element_type=sd)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    # Built from q_i, not from shapes: inside shard_map the carry then varies over the mesh axes as q does.
    init = (jnp.full_like(q_i, -jnp.inf, sd, shape=(B, K, G, cq)), jnp.zeros_like(q_i, sd, shape=(B, K, G, cq)),
            jnp.zeros_like(q_i, sd, shape=(B, K, G, cq, Hv)))
    m, l, acc = _two_loops(tiling, i, body, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, jnp.ones((), sd))
    return acc / safe_l[..., None], jnp.where(seen, m + jnp.log(safe_l), jnp.inf)

  out, lse = lax.map(q_chunk, jnp.arange(tiling.nq))  # [nq, B, K, G, Cq, (Hv)]
  return jnp.moveaxis(out, 0, 3).reshape(B, K, G, -1, Hv), jnp.moveaxis(lse, 0, 3).reshape(B, K, G, -1)


def _reduce_to(x, shape):
  """Sums a [B, K, G, Cq, Ck] tile gradient over the dims a broadcast bias tile has as 1."""
  axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
  return x.sum(axes, keepdims=True) if axes else x


def _add_at(acc, x, starts):
  return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, starts, x.shape) + x, starts)


def _flash_backward(tiling, res, d_out):
  """FlashAttention-2 backward of `_flash` / `_flash_with_lse`."""
  q, k, v, bias, mask, seg, seed, out, lse = res
  if isinstance(d_out, tuple):  # _flash_with_lse: the logsumexp output is gradient-stopped
    d_out = d_out[0]
  sd = _common.stats_dtype(q.dtype)
  delta = jnp.sum(d_out.astype(sd) * out.astype(sd), -1)  # rowsum(dO * O) [B, K, G, Tp]
  dq, dk, dv, db = _flash_grads(tiling, q, k, v, bias, mask, seg, seed, lse, delta, d_out)
  return ((dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
           None if bias is None else db.astype(bias.dtype), None, None, None))


def _flash_grads(tiling, q, k, v, bias, mask, seg, seed, lse, delta, d_out):
  """Recomputes each visible tile (and its dropout mask); dK, dV (and dbias) accumulate across query chunks.
  lse: +inf where a row sees nothing. Returns (dq, dk, dv, dbias or None) in the stats dtype."""
  cq, ck = tiling.cq, tiling.ck
  sd = _common.stats_dtype(q.dtype)
  drop = tiling.drop(seed)

  def q_chunk(carry, i):
    q_i, do_i = (lax.dynamic_slice_in_dim(x, i * cq, cq, axis=3) for x in (q, d_out))
    lse_i, delta_i = (lax.dynamic_slice_in_dim(x, i * cq, cq, axis=3)[..., None] for x in (lse, delta))

    def body(j, c, position_masked):
      dq_i, dk, dv, db = c
      s = _logit_tile(tiling, i, j, q_i, k, bias, mask, seg, position_masked, "bwd")
      p = jnp.exp(s - lse_i)  # lse is +inf for rows that saw nothing: p = 0, never NaN
      k_j, v_j = (lax.dynamic_slice_in_dim(x, j * ck, ck, axis=2) for x in (k, v))
      dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_i, v_j, preferred_element_type=sd)
      p_v = p
      if drop is not None:  # out = Σ D∘p v: dV sees D∘p, dp picks up D
        keep = dropout_keep(drop, p.shape, i * cq, j * ck)
        factor = jnp.where(keep, jnp.asarray(1.0 / (1.0 - drop.rate), sd), jnp.zeros((), sd))
        p_v, dp = p * factor, dp * factor
      ds = p * (dp - delta_i)  # d loss / d logits
      dv = _add_at(dv, jnp.einsum("BKGTS,BKGTH->BKSH", p_v.astype(do_i.dtype), do_i,
                                  preferred_element_type=sd), (0, 0, j * ck, 0))
      dk = _add_at(dk, jnp.einsum("BKGTS,BKGTH->BKSH", ds.astype(q.dtype), q_i,
                                  preferred_element_type=sd), (0, 0, j * ck, 0))
      dq_i = dq_i + jnp.einsum("BKGTS,BKSH->BKGTH", ds.astype(k.dtype), k_j, preferred_element_type=sd)
      if db is not None:
        t, s_len = db.shape[3:]
        db = _add_at(db, _reduce_to(ds, db.shape[:3] + (cq if t > 1 else 1, ck if s_len > 1 else 1)),
                     (0, 0, 0, i * cq if t > 1 else 0, j * ck if s_len > 1 else 0))
      return dq_i, dk, dv, db

    dq_i, *carry = _two_loops(tiling, i, body, (jnp.zeros_like(q_i, sd), *carry))
    return tuple(carry), dq_i

  init = (jnp.zeros_like(k, sd), jnp.zeros_like(v, sd), None if bias is None else jnp.zeros_like(bias, sd))
  (dk, dv, db), dq = lax.scan(q_chunk, init, jnp.arange(tiling.nq))
  dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape) * tiling.scale
  return dq, dk * tiling.scale, dv, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(tiling, q, k, v, bias, mask, seg, seed):
  return _flash_forward(tiling, q, k, v, bias, mask, seg, seed)[0].astype(q.dtype)


def _flash_fwd(tiling, q, k, v, bias, mask, seg, seed):
  out, lse = _flash_forward(tiling, q, k, v, bias, mask, seg, seed)
  out = out.astype(q.dtype)
  return out, (q, k, v, bias, mask, seg, seed, out, lse)


_flash.defvjp(_flash_fwd, _flash_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_with_lse(tiling, q, k, v, bias, mask, seg, seed):
  """_flash that also returns the rows' logsumexp (+inf where nothing is visible; no gradient)."""
  out, lse = _flash_forward(tiling, q, k, v, bias, mask, seg, seed)
  return out.astype(q.dtype), lse


def _flash_with_lse_fwd(tiling, q, k, v, bias, mask, seg, seed):
  out, lse = _flash_forward(tiling, q, k, v, bias, mask, seg, seed)
  out = out.astype(q.dtype)
  return (out, lse), (q, k, v, bias, mask, seg, seed, out, lse)


_flash_with_lse.defvjp(_flash_with_lse_fwd, _flash_backward)
