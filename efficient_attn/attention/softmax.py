"""Exact softmax attention: materialised (xla), chunked online softmax, cuDNN; KV-cache decoding.

    out_BTNH = softmax_attention(query_BTNH, key_BSKH, value_BSKH, bias=None, mask=None, *,
                                 is_causal=False, segment_ids=None, scale=None,
                                 implementation=None, chunk_size=None)

Internally queries are grouped as [B, K, G, T, H] (G = N // K query heads per
key/value head), so GQA / MQA never repeat keys or values.

"chunked" follows FlashAttention-2 (Dao, 2023, arXiv:2307.08691): an outer loop
over query chunks, an inner loop over key chunks with an online softmax, and a
custom VJP that saves only the output and the per-row logsumexp and recomputes
logit tiles in the backward pass. The largest live tensor is one [B, N, Cq, Ck]
tile, so memory is O(T·chunk) forward and backward. With `is_causal` the inner
loop stops at the diagonal: key chunks that no query of the chunk can see are
never computed (about half the tiles for T == S).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from efficient_attn.attention import _common
from efficient_attn.attention.registry import Family, Shape

_FN = "softmax_attention"
IMPLEMENTATIONS = ("xla", "chunked", "cudnn")
# Measured on a 2-core CPU, causal and full fwd+bwd, f32, H=64 (see the module tests / report).
DEFAULT_CHUNK = (256, 256)
# Auto-selection: at T·S >= this the chunked form is no slower than the materialised one on CPU.
CHUNKED_MIN_TS = 256 * 256
# Test seam: when set, called as hook(pass_name, q_chunk, k_chunk) for every executed tile.
_TILE_HOOK = None


def softmax_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None,
                      scale=None, implementation=None, chunk_size=None):
  """Exact scaled dot-product attention softmax(q kᵀ · scale + bias) v.

  Args:
    query: [B, T, N, H]; key, value: [B, S, K, H] with N % K == 0 (MHA, GQA, MQA).
    bias: additive, broadcastable to [B, N, T, S]; differentiable.
    mask: bool, broadcastable to [B, N, T, S]; True = may attend.
    is_causal: query t sees keys s <= t (top-left alignment).
    segment_ids: int [B, T] (T == S) or a pair (q_ids [B, T], kv_ids [B, S]).
    scale: logit scale, default H ** -0.5.
    implementation: "xla" (materialised [B, N, T, S] logits), "chunked" (online softmax,
      O(T·chunk) memory, causal skips masked chunks), "cudnn" (fused kernel, GPU only) or
      None: cudnn when on GPU and supported, else chunked when T·S >= CHUNKED_MIN_TS, else xla.
    chunk_size: int or (query_chunk, key_chunk) for "chunked"; lengths that are not
      multiples are padded internally. Default DEFAULT_CHUNK.

  Returns [B, T, N, H] in query's dtype; softmax statistics are float32. A query that
  sees no key outputs 0 and passes no gradient.
  Cost: O(B·N·T·S·H) FLOPs (about half when causal, except "xla"); memory O(B·N·T·S)
  for "xla", O(B·N·T·chunk) for "chunked" and "cudnn".
  """
  dims = _common.check_qkv(query, key, value, _FN)
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"{_FN}: `implementation`={implementation!r} is not one of {[None, *IMPLEMENTATIONS]}.")
  chunk = _resolve_chunk(chunk_size)
  bias = _common.check_bias(bias, dims, _FN)
  mask = _common.check_mask(mask, dims, _FN)
  seg = _common.split_segment_ids(segment_ids, dims, _FN)
  scale = _common.resolve_scale(scale, dims.H)
  impl = implementation or _pick_implementation(dims, query.dtype, bias)
  if impl == "cudnn":
    return _cudnn_attention(query, key, value, bias, mask, seg, is_causal, scale, dims)
  q_BKGTH = jnp.moveaxis(query.reshape(dims.B, dims.T, dims.K, dims.G, dims.H), 1, 3)
  k_BKSH, v_BKSH = (jnp.moveaxis(x, 1, 2) for x in (key, value))
  bias, mask = (None if x is None else _group_heads(x, dims) for x in (bias, mask))
  if impl == "xla":
    out_BKGTH = _xla_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, is_causal, scale)
  else:
    out_BKGTH = _chunked_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, is_causal, scale, chunk)
  return jnp.moveaxis(out_BKGTH, 3, 1).reshape(query.shape).astype(query.dtype)


def _resolve_chunk(chunk_size):
  if chunk_size is None:
    return DEFAULT_CHUNK
  pair = tuple(chunk_size) if isinstance(chunk_size, (tuple, list)) else (chunk_size, chunk_size)
  if len(pair) != 2 or not all(isinstance(c, int) and c > 0 for c in pair):
    raise ValueError(f"{_FN}: `chunk_size`={chunk_size!r} must be a positive int or a pair (query_chunk, key_chunk).")
  return pair


def _pick_implementation(dims, dtype, bias) -> str:
  return pick_implementation(dims.T, dims.S, dims.H, dtype, has_bias=bias is not None)


def pick_implementation(T: int, S: int, H: int, dtype, *, has_bias: bool = False, backend: str | None = None) -> str:
  """What `implementation=None` runs: cudnn on GPU where supported, else chunked at T·S >= CHUNKED_MIN_TS, else xla.

  The one rule, used by the function and by its FLOPs count (`backend` defaults to JAX's default backend).
  """
  # The shapes cuDNN's flash kernel takes on every GPU generation (jax checks the rest and raises).
  cudnn_ok = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and H % 8 == 0 and H <= 128
              and (not has_bias or (T % 2 == 0 and S % 2 == 0)))
  if (backend or jax.default_backend()) == "gpu" and cudnn_ok:
    return "cudnn"
  return "chunked" if T * S >= CHUNKED_MIN_TS else "xla"


def _group_heads(x, dims):
  """Bias / mask broadcastable to [B, N, T, S] -> [b, K|1, G|1, t, s] (size-1 dims kept)."""
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  b, n, t, s = x.shape
  return x.reshape(b, dims.K, dims.G, t, s) if n == dims.N else x.reshape(b, 1, 1, t, s)


def _visibility(T, S, t0, s0, mask, seg, causal, kv_len=None):
  """bool, broadcastable to [B, K, G, T, S], for queries t0 + [0, T) and keys s0 + [0, S); None if all visible."""
  vis = None

  def conj(a, b):
    return b if a is None else a & b

  if causal or kv_len is not None:
    s_pos = s0 + lax.broadcasted_iota(jnp.int32, (T, S), 1)
    if causal:
      vis = conj(vis, t0 + lax.broadcasted_iota(jnp.int32, (T, S), 0) >= s_pos)
    if kv_len is not None:
      vis = conj(vis, s_pos < kv_len)
  if seg is not None:
    q_ids, kv_ids = seg
    vis = conj(vis, q_ids[:, None, None, :, None] == kv_ids[:, None, None, None, :])
  if mask is not None:
    vis = conj(vis, mask)
  return vis


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _xla_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, causal, scale):
  """Materialised logits [B, K, G, T, S]; float32 softmax; rows with no visible key -> 0."""
  T, S = q_BKGTH.shape[3], k_BKSH.shape[2]
  q_BKGTH = (q_BKGTH.astype(jnp.float32) * scale).astype(q_BKGTH.dtype)  # scale T·H values, not T·S
  logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  vis = _visibility(T, S, 0, 0, mask, seg, causal)
  if vis is None:
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32)
  # A finite mask value keeps exp and its gradient NaN-free; a row whose max is the
  # mask value sees no key, and its (uniform) output is zeroed by `seen`.
  logits = jnp.where(vis, logits, _MASKED)
  m = lax.stop_gradient(logits.max(-1, keepdims=True))
  p = jnp.exp(logits - m)
  p = p / p.sum(-1, keepdims=True)
  out = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32)
  seen = m > _MASKED / 2
  return jnp.where(seen, out, 0.0)


# ----------------------------------------------------------------------------- chunked


class _Tiling(NamedTuple):
  """Static tiling of a chunked call (hashable: it is a custom_vjp non-diff argument)."""
  causal: bool
  scale: float
  cq: int  # query chunk
  ck: int  # key chunk
  nq: int
  ns: int
  kv_len: int | None  # true S when keys were padded, else None

  def key_range(self, i):
    """(first key chunk needing a position mask, end) for query chunk i; chunks >= end are never visible."""
    if not self.causal:
      end = self.ns
      full = end - 1 if self.kv_len is not None else end
    else:
      end = jnp.minimum(self.ns, ((i + 1) * self.cq - 1) // self.ck + 1)
      full = jnp.minimum(end, (i * self.cq + 1) // self.ck)
      if self.kv_len is not None:
        full = jnp.minimum(full, self.ns - 1)
    return full, end


def _pad_to(x, axis, length, value=0):
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _chunked_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, causal, scale, chunk):
  """Pads T and S to chunk multiples, runs the custom-VJP kernel, crops."""
  T, S = q_BKGTH.shape[3], k_BKSH.shape[2]
  cq, ck = min(chunk[0], T), min(chunk[1], S)
  nq, ns = -(-T // cq), -(-S // ck)
  Tp, Sp = nq * cq, ns * ck
  tiling = _Tiling(bool(causal), float(scale), cq, ck, nq, ns, S if Sp != S else None)
  q = _pad_to(q_BKGTH, 3, Tp)
  k, v = (_pad_to(x, 2, Sp) for x in (k_BKSH, v_BKSH))
  bias, mask = (None if x is None else _pad_tiles(x, Tp, Sp) for x in (bias, mask))
  if seg is not None:
    seg = (_pad_to(seg[0], 1, Tp, -1), _pad_to(seg[1], 1, Sp, -2))
  return _flash(tiling, q, k, v, bias, mask, seg)[:, :, :, :T]


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
  """Scaled, biased, masked float32 logits [B, K, G, Cq, Ck] of query chunk i against key chunk j."""
  cq, ck = tiling.cq, tiling.ck
  if _TILE_HOOK is not None:
    jax.debug.callback(_TILE_HOOK, pass_name, i, j)
  k_j = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=2)
  s = jnp.einsum("BKGTH,BKSH->BKGTS", q_i, k_j, preferred_element_type=jnp.float32) * tiling.scale
  if bias is not None:
    s = s + _tile(bias, i * cq, j * ck, cq, ck).astype(jnp.float32)
  seg_tile = None if seg is None else (lax.dynamic_slice_in_dim(seg[0], i * cq, cq, axis=1),
                                       lax.dynamic_slice_in_dim(seg[1], j * ck, ck, axis=1))
  vis = _visibility(cq, ck, i * cq, j * ck, None if mask is None else _tile(mask, i * cq, j * ck, cq, ck),
                    seg_tile, tiling.causal and position_masked, tiling.kv_len if position_masked else None)
  return s if vis is None else jnp.where(vis, s, -jnp.inf)


def _two_loops(tiling, i, body, carry):
  """Runs body(j, carry, position_masked) over the visible key chunks of query chunk i."""
  full, end = tiling.key_range(i)
  carry = lax.fori_loop(0, full, lambda j, c: body(j, c, False), carry)
  return lax.fori_loop(full, end, lambda j, c: body(j, c, True), carry)


def _flash_forward(tiling, q, k, v, bias, mask, seg):
  """Online softmax. Returns out [B, K, G, Tp, H] (float32) and logsumexp [B, K, G, Tp] (+inf if nothing visible)."""
  B, K, G, _, H = q.shape
  cq = tiling.cq

  def q_chunk(i):
    q_i = lax.dynamic_slice_in_dim(q, i * cq, cq, axis=3)

    def body(j, carry, position_masked):
      m, l, acc = carry
      s = _logit_tile(tiling, i, j, q_i, k, bias, mask, seg, position_masked, "fwd")
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)  # no -inf - -inf for rows that saw nothing yet
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      v_j = lax.dynamic_slice_in_dim(v, j * tiling.ck, tiling.ck, axis=2)
      pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    init = (jnp.full((B, K, G, cq), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, cq), jnp.float32),
            jnp.zeros((B, K, G, cq, H), jnp.float32))
    m, l, acc = _two_loops(tiling, i, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)

  out, lse = lax.map(q_chunk, jnp.arange(tiling.nq))  # [nq, B, K, G, Cq, (H)]
  return jnp.moveaxis(out, 0, 3).reshape(B, K, G, -1, H), jnp.moveaxis(lse, 0, 3).reshape(B, K, G, -1)


def _reduce_to(x, shape):
  """Sums a [B, K, G, Cq, Ck] tile gradient over the dims a broadcast bias tile has as 1."""
  axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
  return x.sum(axes, keepdims=True) if axes else x


def _add_at(acc, x, starts):
  return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, starts, x.shape) + x, starts)


def _flash_backward(tiling, res, d_out):
  """FlashAttention-2 backward: recomputes each visible tile; dK, dV (and dbias) accumulate across query chunks."""
  q, k, v, bias, mask, seg, out, lse = res
  cq, ck = tiling.cq, tiling.ck
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # rowsum(dO * O) [B, K, G, Tp]

  def q_chunk(carry, i):
    q_i, do_i = (lax.dynamic_slice_in_dim(x, i * cq, cq, axis=3) for x in (q, d_out))
    lse_i, delta_i = (lax.dynamic_slice_in_dim(x, i * cq, cq, axis=3)[..., None] for x in (lse, delta))

    def body(j, c, position_masked):
      dq_i, dk, dv, db = c
      s = _logit_tile(tiling, i, j, q_i, k, bias, mask, seg, position_masked, "bwd")
      p = jnp.exp(s - lse_i)  # lse is +inf for rows that saw nothing: p = 0, never NaN
      k_j, v_j = (lax.dynamic_slice_in_dim(x, j * ck, ck, axis=2) for x in (k, v))
      dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i)  # d loss / d logits
      dv = _add_at(dv, jnp.einsum("BKGTS,BKGTH->BKSH", p.astype(do_i.dtype), do_i,
                                  preferred_element_type=jnp.float32), (0, 0, j * ck, 0))
      dk = _add_at(dk, jnp.einsum("BKGTS,BKGTH->BKSH", ds.astype(q.dtype), q_i,
                                  preferred_element_type=jnp.float32), (0, 0, j * ck, 0))
      dq_i = dq_i + jnp.einsum("BKGTS,BKSH->BKGTH", ds.astype(k.dtype), k_j, preferred_element_type=jnp.float32)
      if db is not None:
        t, s_len = db.shape[3:]
        db = _add_at(db, _reduce_to(ds, db.shape[:3] + (cq if t > 1 else 1, ck if s_len > 1 else 1)),
                     (0, 0, 0, i * cq if t > 1 else 0, j * ck if s_len > 1 else 0))
      return dq_i, dk, dv, db

    dq_i, *carry = _two_loops(tiling, i, body, (jnp.zeros(q_i.shape, jnp.float32), *carry))
    return tuple(carry), dq_i

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
          None if bias is None else jnp.zeros(bias.shape, jnp.float32))
  (dk, dv, db), dq = lax.scan(q_chunk, init, jnp.arange(tiling.nq))
  dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape) * tiling.scale
  return ((dq.astype(q.dtype), (dk * tiling.scale).astype(k.dtype), dv.astype(v.dtype),
           None if bias is None else db.astype(bias.dtype), None, None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(tiling, q, k, v, bias, mask, seg):
  return _flash_forward(tiling, q, k, v, bias, mask, seg)[0].astype(q.dtype)


def _flash_fwd(tiling, q, k, v, bias, mask, seg):
  out, lse = _flash_forward(tiling, q, k, v, bias, mask, seg)
  out = out.astype(q.dtype)
  return out, (q, k, v, bias, mask, seg, out, lse)


_flash.defvjp(_flash_fwd, _flash_backward)


# ----------------------------------------------------------------------------- cuDNN


def _cudnn_attention(query, key, value, bias, mask, seg, causal, scale, dims):
  """jax.nn.dot_product_attention(implementation="cudnn") with segments folded into the mask.

  cuDNN turns a mask into a large negative bias, so a row that sees no key would
  average all values; such rows are zeroed here to keep the library's convention.
  """
  if jax.default_backend() != "gpu":
    raise ValueError(f"{_FN}: implementation='cudnn' needs a GPU backend, but the default backend is "
                     f"{jax.default_backend()!r}; use 'chunked', 'xla' or None.")
  if jnp.dtype(query.dtype) not in (jnp.bfloat16, jnp.float16) or dims.H % 8:
    raise ValueError(f"{_FN}: implementation='cudnn' needs bfloat16/float16 inputs and a head dim divisible by 8,"
                     f" got {jnp.dtype(query.dtype).name} with H={dims.H}; use 'chunked' or None.")
  if seg is not None:
    seg_mask = (seg[0][:, None, :, None] == seg[1][:, None, None, :])
    mask = seg_mask if mask is None else mask & seg_mask
  if bias is not None:  # cuDNN wants full [.., T, S] bias in the query dtype
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (dims.T, dims.S)).astype(query.dtype)
  if mask is not None:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  out = jax.nn.dot_product_attention(query, key, value, bias, mask, scale=scale, is_causal=causal,
                                     implementation="cudnn")
  if mask is None:
    return out
  seen = mask & jnp.tril(jnp.ones((dims.T, dims.S), bool)) if causal else mask
  seen_BTN = jnp.broadcast_to(seen.any(-1), (dims.B, dims.N, dims.T)).transpose(0, 2, 1)
  return jnp.where(seen_BTN[..., None], out, 0).astype(query.dtype)


# ----------------------------------------------------------------------------- decoding


def softmax_init_state(batch, max_len, num_kv_heads, head_dim, dtype=jnp.float32):
  """Empty KV cache: {"k": [B, L, K, H], "v": [B, L, K, H], "pos": int32 scalar (tokens seen)}.

  L = max_len slots, used as a ring buffer: with a `window` in `softmax_step`,
  max_len = window is enough; without one, max_len must exceed the generated length.
  """
  for name, val in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
    if not isinstance(val, int) or val <= 0:
      raise ValueError(f"softmax_init_state: `{name}` must be a positive int, got {val!r}.")
  zeros = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
  return {"k": zeros, "v": zeros, "pos": jnp.zeros((), jnp.int32)}


def softmax_step(state, query_B1NH, key_B1KH, value_B1KH, *, scale=None, window=None, is_causal=True,
                 implementation=None, chunk_size=None):
  """One decoding step: caches this token's key/value at `pos`, attends to the cached prefix.

  The query at position pos sees positions (pos - window, pos] (all of [0, pos] without a
  window): token by token this equals softmax_attention(..., is_causal=True), or the causal
  sliding window of local attention. `is_causal`, `implementation` and `chunk_size` are the
  parallel call's options and are ignored (decoding is causal). O(L·N·H) per step; jit-able.
  Returns (out [B, 1, N, H] in the query's dtype, new state).
  """
  del is_causal, implementation, chunk_size
  fn = "softmax_step"
  cache_k, cache_v, pos = state["k"], state["v"], state["pos"]
  B, L, K, H = cache_k.shape
  if query_B1NH.ndim != 4 or query_B1NH.shape[1] != 1 or query_B1NH.shape[0] != B or query_B1NH.shape[3] != H:
    raise ValueError(f"{fn}: `query` must have shape [B, 1, N, H] with B={B}, H={H}, got {query_B1NH.shape}.")
  if key_B1KH.shape != (B, 1, K, H) or value_B1KH.shape != (B, 1, K, H):
    raise ValueError(f"{fn}: `key` and `value` must have shape [B, 1, K, H]={[B, 1, K, H]}, "
                     f"got {key_B1KH.shape} and {value_B1KH.shape}.")
  N = query_B1NH.shape[2]
  if N % K:
    raise ValueError(f"{fn}: query heads N={N} must be a multiple of the cache's key/value heads K={K}.")
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"{fn}: `window` must be a positive int or None, got {window!r}.")
  slot = pos % L
  cache_k = lax.dynamic_update_slice(cache_k, key_B1KH.astype(cache_k.dtype), (0, slot, 0, 0))
  cache_v = lax.dynamic_update_slice(cache_v, value_B1KH.astype(cache_v.dtype), (0, slot, 0, 0))
  age = (slot - jnp.arange(L)) % L  # how many steps ago each slot was written
  vis_L = age <= pos
  if window is not None:
    vis_L &= age < window
  q_BKGH = query_B1NH.reshape(B, K, N // K, H)
  logits = jnp.einsum("BKGH,BLKH->BKGL", q_BKGH, cache_k, preferred_element_type=jnp.float32)
  logits = jnp.where(vis_L, logits * _common.resolve_scale(scale, H), -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)  # the current token is always visible: no empty rows
  out = jnp.einsum("BKGL,BLKH->BKGH", p.astype(cache_v.dtype), cache_v, preferred_element_type=jnp.float32)
  new_state = {"k": cache_k, "v": cache_v, "pos": pos + 1}
  return out.reshape(query_B1NH.shape).astype(query_B1NH.dtype), new_state


# ----------------------------------------------------------------------------- the family record


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
  """implementation: None (best for the platform) | "xla" | "chunked" | "cudnn".
  chunk_size: the chunked path's tile, an int or (query_chunk, key_chunk); None = DEFAULT_CHUNK."""
  implementation: str | None = None
  chunk_size: int | tuple[int, int] | None = None

  def __post_init__(self):
    if self.implementation not in (None, *IMPLEMENTATIONS):
      raise ValueError(f"implementation={self.implementation!r} is not one of {[None, *IMPLEMENTATIONS]}.")
    if self.chunk_size is not None:
      object.__setattr__(self, "chunk_size", _resolve_chunk(self.chunk_size))


def _mean_visible(T: int, window: int, causal: bool) -> float:
  """Mean number of keys a query sees (T == S, top-left causal, keys within `window` positions)."""
  W = min(window, T)
  if causal:
    return (W * (W + 1) / 2 + (T - W) * W) / T
  return (T + 2 * ((W - 1) * T - (W - 1) * W / 2)) / T


def _flops(o: SoftmaxOptions, shape: Shape) -> dict:
  """4·N·H per visible (query, key) pair; xla computes all T·S pairs, chunked whole [Cq, Ck] tiles
  (and its backward recomputes the logits: 5 tile matmuls against 2 forward, FlashAttention-2)."""
  T, S, N, _, H, causal = shape
  per_pair = 4 * N * H  # q·k (2H) and p·v (2H) per head
  ideal = per_pair * (_mean_visible(T, T, causal) if T == S else (S + 1) / 2 if causal else S)
  impl = o.implementation or pick_implementation(T, S, H, jnp.float32)
  if impl == "xla":
    return {"ideal": ideal, "executed": per_pair * S}
  if impl == "cudnn":  # fused kernel; its tile skipping is not modelled here
    return {"ideal": ideal, "executed": ideal}
  cq, ck = o.chunk_size or DEFAULT_CHUNK
  cq, ck = min(cq, T), min(ck, S)
  nq, ns = -(-T // cq), -(-S // ck)
  # As _Tiling.key_range: query chunk i stops at the key chunk holding its last query's diagonal.
  tiles = sum(min(ns, ((i + 1) * cq - 1) // ck + 1) for i in range(nq)) if causal else nq * ns
  executed = per_pair * tiles * cq * ck / T
  return {"ideal": ideal, "executed": executed, "backward": 2.5 * executed}


def _init_state(batch, num_kv_heads, head_dim, *, max_len=None, dtype=None, **_):
  if max_len is None:
    raise ValueError("init_decode_state('softmax'): `max_len` (cache length) is required for a KV cache.")
  return softmax_init_state(batch, max_len, num_kv_heads, head_dim, dtype or jnp.float32)


FAMILY = Family(
    name="softmax", fn=softmax_attention, options=SoftmaxOptions, init_state=_init_state, step=softmax_step,
    flops=_flops, description="exact softmax attention (xla / chunked online softmax / cudnn); KV-cache decoding")
