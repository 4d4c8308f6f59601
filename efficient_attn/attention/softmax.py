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
import numpy as np
from jax import lax

from efficient_attn.attention import _common, kernels
from efficient_attn.attention.registry import Family, Shape

_FN = "softmax_attention"
IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash", "triton")
# Measured on a 2-core CPU, causal and full fwd+bwd, f32, H=64 (see the module tests / report).
DEFAULT_CHUNK = (256, 256)
# Auto-selection: at T·S >= this the chunked form is no slower than the materialised one on CPU.
CHUNKED_MIN_TS = 256 * 256
# Test seam: when set, called as hook(pass_name, q_chunk, k_chunk) for every executed tile.
_TILE_HOOK = None


@_common.leading_batch_dims(query_mask=True)
def softmax_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None,
                      scale=None, implementation=None, chunk_size=None, local_window_size=None,
                      return_residual=False, dropout_rate=0.0, dropout_rng=None, broadcast_dropout=True):
  """Exact scaled dot-product attention softmax(q kᵀ · scale + bias) v; a drop-in for
  `jax.nn.dot_product_attention` (same arguments, same numbers) with GQA, packing and dropout.

  Args:
    query: [..., T, N, H]; key: [..., S, K, H]; value: [..., S, K, Hv] with N % K == 0
      (MHA, GQA, MQA). `...` is any number of batch dims, none included (`jax.vmap` works).
    bias: additive, broadcastable to [..., N, T, S]; differentiable.
    mask: bool, broadcastable to [..., N, T, S]; True = may attend.
    is_causal: query t sees keys s <= t (top-left alignment, as jax.nn).
    segment_ids: int [..., T] (T == S) or a pair (q_ids [..., T], kv_ids [..., S]): packed
      sequences, a query sees keys of its own segment only.
    scale: logit scale, default H ** -0.5.
    query_seq_lengths, key_value_seq_lengths: int [...] (jax.nn's padding): keys at
      s >= kv_len are invisible and queries at t >= q_len output 0.
    local_window_size: int w or (left, right) (jax.nn's sliding window): query t sees keys
      t - left <= s <= t + right; w means (w, w). Chunked skips the key chunks outside it.
    return_residual: also return the logsumexp of each row's visible logits, [..., T, N] in
      the key's dtype, gradient-stopped (as jax.nn; -inf for a row that sees no key).
    implementation: "xla" (materialised [B, N, T, S] logits), "chunked" (online softmax,
      O(T·chunk) memory, causal / windowed calls skip invisible chunks), "cudnn" (cuDNN's
      fused kernel; bf16/f16 on a GPU build of jax), "splash" (Pallas splash attention, the
      TPU kernel), "triton" (the Pallas GPU flash kernel) or None: the best for the platform
      the call is lowered for (`kernels.by_platform`): splash on TPU; cudnn, else triton on
      CUDA; chunked when T·S >= CHUNKED_MIN_TS, else xla, on CPU and for what a kernel
      refuses (bias, dense masks / lengths, dropout, the residual; see `kernels`). "splash" /
      "triton" off their platform run the same kernel in Pallas interpret mode (slow; tests).
    chunk_size: int or (query_chunk, key_chunk) for "chunked"; lengths that are not
      multiples are padded internally. Default DEFAULT_CHUNK.
    dropout_rate, dropout_rng, broadcast_dropout: attention dropout as Flax applies it (on
      the softmax weights, kept ones scaled by 1 / (1 - rate)); broadcast_dropout shares one
      [T, S] mask across batch and heads. Each element's keep bit is a hash of `dropout_rng`
      and its (batch, head, query, key) position, so "xla" and "chunked" (any chunk size)
      drop exactly the same weights for the same rng. Not with "cudnn".

  Returns [..., T, N, Hv] in query's dtype (and the residual when asked); softmax statistics
  are float32 (float64 for float64 inputs). A query that sees no key outputs 0 and passes no
  gradient; jax.nn's "xla" path instead returns the mean of the values for such a row
  (its masked logits are a large finite negative). Cost: O(B·N·T·S·H) FLOPs (about half when
  causal, except "xla"); memory O(B·N·T·S) for "xla", O(B·N·T·chunk) for "chunked" and "cudnn".
  """
  dims = _common.check_qkv(query, key, value, _FN, value_head_dim=True)
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"{_FN}: `implementation`={implementation!r} is not one of {[None, *IMPLEMENTATIONS]}.")
  chunk = _resolve_chunk(chunk_size)
  window = _resolve_window(local_window_size)
  drop = _resolve_dropout(dropout_rate, dropout_rng, broadcast_dropout)
  bias = _common.check_bias(bias, dims, _FN)
  mask = _common.check_mask(mask, dims, _FN)
  seg = _common.split_segment_ids(segment_ids, dims, _FN)
  scale = _common.resolve_scale(scale, dims.H)
  Hv = value.shape[-1]
  refusals = _kernel_refusals(dims, query.dtype, Hv, bias, mask, seg, is_causal, window, drop, return_residual)
  if implementation in ("splash", "triton", "cudnn") and refusals[implementation]:
    raise ValueError(f"{_FN}: implementation={implementation!r}: {refusals[implementation]}; use None, 'chunked' or"
                     " 'xla'.")

  def run(impl):
    return lambda: _attend(impl, query, key, value, bias, mask, seg, is_causal, window, local_window_size, scale,
                           chunk, drop, return_residual, dims)

  if implementation is None:  # the best each platform has; lowering keeps one (kernels.by_platform)
    base = _xla_or_chunked(dims.T, dims.S)
    tpu = "splash" if not refusals["splash"] else base
    cuda = "cudnn" if not refusals["cudnn"] else "triton" if not refusals["triton"] else base
    branches = {name: run(name) for name in {base, tpu, cuda}}
    return kernels.by_platform((), cpu=branches[base], tpu=branches[tpu], cuda=branches[cuda])
  if implementation == "splash":  # the compiled kernel on TPU, interpret mode elsewhere
    return kernels.by_platform((), cpu=run("splash_interpret"), tpu=run("splash"))
  if implementation == "triton":
    return kernels.by_platform((), cpu=run("triton_interpret"), cuda=run("triton"))
  return run(implementation)()


def _attend(impl, query, key, value, bias, mask, seg, is_causal, window, local_window_size, scale, chunk, drop,
            return_residual, dims):
  """One implementation on checked arguments: [B, T, N, Hv] (and the residual when asked)."""
  if impl == "cudnn":
    return _cudnn_attention(query, key, value, bias, mask, seg, is_causal, scale, dims, local_window_size,
                            return_residual)
  if impl.startswith("splash"):
    return kernels.splash_attention(query, key, value, causal=is_causal, segment_ids=seg, scale=scale, window=window,
                                    interpret=impl.endswith("interpret"))
  if impl.startswith("triton"):
    return kernels.triton_attention(query, key, value, causal=is_causal, segment_ids=seg, scale=scale,
                                    interpret=impl.endswith("interpret"))
  Hv = value.shape[-1]
  q_BKGTH = jnp.moveaxis(query.reshape(dims.B, dims.T, dims.K, dims.G, dims.H), 1, 3)
  k_BKSH, v_BKSH = (jnp.moveaxis(x, 1, 2) for x in (key, value))
  bias, mask = (None if x is None else _group_heads(x, dims) for x in (bias, mask))
  if impl == "xla":
    out_BKGTH, lse_BKGT = _xla_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, is_causal, window, scale, drop)
  else:
    out_BKGTH, lse_BKGT = _chunked_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, is_causal, window, scale,
                                             chunk, drop, return_residual)
  out = jnp.moveaxis(out_BKGTH, 3, 1).reshape(dims.B, dims.T, dims.N, Hv).astype(query.dtype)
  if not return_residual:
    return out
  lse_BTN = jnp.moveaxis(lse_BKGT, 3, 1).reshape(dims.B, dims.T, dims.N)
  return out, lax.stop_gradient(lse_BTN).astype(key.dtype)


def softmax_weights(query, key, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                    local_window_size=None):
  """The attention weights softmax(q kᵀ · scale + bias) under the masks, [..., N, T, S] float32
  (float64 for float64 inputs); a row that sees no key is all zeros. Materialises T·S per head:
  for inspection (Flax's `sow_weights`), not for long sequences."""
  value = jnp.zeros(key.shape[:-1] + (1,), key.dtype)
  return _weights_fn(query, key, value, bias, mask, is_causal=is_causal, segment_ids=segment_ids, scale=scale,
                     local_window_size=local_window_size)[1]


@_common.leading_batch_dims(query_mask=True)
def _weights_fn(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                local_window_size=None):
  """softmax_weights on 4-D inputs, returned as an (output-shaped dummy, weights) pair so the
  batch-dims decorator restores the leading dims of the weights."""
  dims = _common.check_qkv(query, key, value, "softmax_weights", value_head_dim=True)
  bias = _common.check_bias(bias, dims, "softmax_weights")
  mask = _common.check_mask(mask, dims, "softmax_weights")
  seg = _common.split_segment_ids(segment_ids, dims, "softmax_weights")
  q_BKGTH = jnp.moveaxis(query.reshape(dims.B, dims.T, dims.K, dims.G, dims.H), 1, 3)
  bias, mask = (None if x is None else _group_heads(x, dims) for x in (bias, mask))
  p_BKGTS, lse = _xla_probs(q_BKGTH, jnp.moveaxis(key, 1, 2), bias, mask, seg, is_causal,
                            _resolve_window(local_window_size), _common.resolve_scale(scale, dims.H))
  p_BKGTS = jnp.where(_seen(lse), p_BKGTS, jnp.zeros((), p_BKGTS.dtype))
  return jnp.zeros((dims.B, 1)), p_BKGTS.reshape(dims.B, dims.N, dims.T, dims.S)


def _resolve_chunk(chunk_size):
  if chunk_size is None:
    return DEFAULT_CHUNK
  pair = tuple(chunk_size) if isinstance(chunk_size, (tuple, list)) else (chunk_size, chunk_size)
  if len(pair) != 2 or not all(isinstance(c, int) and c > 0 for c in pair):
    raise ValueError(f"{_FN}: `chunk_size`={chunk_size!r} must be a positive int or a pair (query_chunk, key_chunk).")
  return pair


def _resolve_window(local_window_size):
  """None, or (left, right) with query t seeing keys t - left <= s <= t + right."""
  if local_window_size is None:
    return None
  pair = (tuple(local_window_size) if isinstance(local_window_size, (tuple, list))
          else (local_window_size, local_window_size))
  if len(pair) != 2 or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0
                               for w in pair):
    raise ValueError(f"{_FN}: `local_window_size`={local_window_size!r} must be a non-negative int or a pair"
                     " (left, right) of them.")
  return int(pair[0]), int(pair[1])


class _Dropout(NamedTuple):
  rate: float
  broadcast: bool
  seed: jax.Array  # uint32 [2], drawn from the rng


def _resolve_dropout(rate, rng, broadcast):
  if isinstance(rate, jax.core.Tracer):
    raise ValueError(f"{_FN}: `dropout_rate` must be a Python float (it is static), got a traced value.")
  rate = float(rate)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{_FN}: `dropout_rate` must be in [0, 1), got {rate}.")
  if rate == 0.0:
    return None
  if rng is None:
    raise ValueError(f"{_FN}: dropout_rate={rate} needs a `dropout_rng` (a jax.random key); pass one, or"
                     " dropout_rate=0.0 (Flax: deterministic=True) for no dropout.")
  return _Dropout(rate, bool(broadcast), jax.random.bits(rng, (2,), jnp.uint32))


def _mix(h):
  """A 32-bit integer finaliser (xor-shift-multiply): every input bit flips about half the output bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _dropout_keep(drop: _Dropout, shape, t0, s0):
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


def _apply_dropout(p, drop, t0, s0):
  """Weights p [B, K, G, T, S] with dropped entries zeroed and kept ones scaled by 1 / (1 - rate)."""
  if drop is None:
    return p
  keep = _dropout_keep(drop, p.shape, t0, s0)
  return jnp.where(keep, p * (1.0 / (1.0 - drop.rate)), jnp.zeros((), p.dtype))


def _xla_or_chunked(T: int, S: int) -> str:
  """The XLA path by size: materialised logits below CHUNKED_MIN_TS = T·S, online softmax above."""
  return "chunked" if T * S >= CHUNKED_MIN_TS else "xla"


def _cudnn_refusal(T: int, S: int, H: int, Hv: int, dtype, *, has_bias=False, dropout=False,
                   window=None, causal=False) -> str | None:
  """Why cuDNN's flash kernel cannot run this call here (None when it can): the shapes it takes on
  every GPU generation (jax checks the rest), and jax's CUDA plugin to trace it at all."""
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or H % 8 or H > 128:
    return f"cuDNN needs bfloat16/float16 inputs and a head dim divisible by 8 up to 128, got {jnp.dtype(dtype).name}, H={H}"
  if Hv != H or dropout:
    return f"cuDNN (as wrapped here) takes no dropout and needs value's head dim == key's, got Hv={Hv}, H={H}"
  if has_bias and (T % 2 or S % 2):
    return f"cuDNN needs even lengths with a bias, got T={T}, S={S}"
  if window is not None and not causal and window[1] != 0:
    return "cuDNN's sliding window is causal only"
  if not kernels.cudnn_available():
    return "cuDNN needs a GPU build of jax (pip install 'jax[cuda12]'); this one cannot trace it"
  return None


def _kernel_refusals(dims, dtype, Hv, bias, mask, seg, causal, window, drop, residual) -> dict:
  """{"splash" | "triton" | "cudnn": why that kernel cannot run this call, or None}."""
  T, S, H = dims.T, dims.S, dims.H
  return {
      "splash": kernels.splash_refusal(T, S, bias=bias, mask=mask, dropout=drop is not None, residual=residual),
      "triton": kernels.triton_refusal(T, S, H, Hv, bias=bias, mask=mask, dropout=drop is not None,
                                       residual=residual, window=window, segment_ids=seg),
      "cudnn": _cudnn_refusal(T, S, H, Hv, dtype, has_bias=bias is not None, dropout=drop is not None,
                              window=window, causal=causal)}


def pick_implementation(T: int, S: int, H: int, dtype, *, has_bias: bool = False, platform: str = "cpu") -> str:
  """What `implementation=None` runs when lowered for `platform` ("cpu" | "tpu" | "cuda"), for a call
  with no mask, dropout or window: splash on TPU; cudnn (bf16/f16, where jax can trace it), else
  triton on CUDA; elsewhere (and for what the kernels refuse) chunked at T·S >= CHUNKED_MIN_TS, else xla.
  """
  if platform == "tpu" and not kernels.splash_refusal(T, S, bias=True if has_bias else None):
    return "splash"
  if platform in ("cuda", "gpu"):
    if not _cudnn_refusal(T, S, H, H, dtype, has_bias=has_bias):
      return "cudnn"
    if not kernels.triton_refusal(T, S, H, H, bias=True if has_bias else None):
      return "triton"
  return _xla_or_chunked(T, S)


def _group_heads(x, dims):
  """Bias / mask broadcastable to [B, N, T, S] -> [b, K|1, G|1, t, s] (size-1 dims kept)."""
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  b, n, t, s = x.shape
  return x.reshape(b, dims.K, dims.G, t, s) if n == dims.N else x.reshape(b, 1, 1, t, s)


def _visibility(T, S, t0, s0, mask, seg, causal, kv_len=None, window=None):
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


def _xla_probs(q_BKGTH, k_BKSH, bias, mask, seg, causal, window, scale):
  """Materialised softmax weights [B, K, G, T, S] (stats dtype) and the rows' logsumexp [B, K, G, T]."""
  T, S = q_BKGTH.shape[3], k_BKSH.shape[2]
  sd = _common.stats_dtype(q_BKGTH.dtype)
  logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH, preferred_element_type=sd) * jnp.asarray(scale, sd)
  if bias is not None:
    logits = logits + bias.astype(sd)
  vis = _visibility(T, S, 0, 0, mask, seg, causal, window=window)
  if vis is None:
    return jax.nn.softmax(logits, axis=-1), jax.nn.logsumexp(logits, axis=-1)
  # A finite mask value keeps exp and its gradient NaN-free; a row whose max is the
  # mask value sees no key, and its (uniform) weights are zeroed by `seen`.
  logits = jnp.where(vis, logits, jnp.asarray(_MASKED, sd))
  m = lax.stop_gradient(logits.max(-1, keepdims=True))
  p = jnp.exp(logits - m)
  total = p.sum(-1, keepdims=True)
  seen = m > _MASKED / 2
  lse = jnp.where(seen, m + jnp.log(total), -jnp.inf)[..., 0]
  return p / total, lse  # uniform on rows that see nothing (lse -inf): callers zero those rows


def _seen(lse):
  """bool [.., T, 1]: the rows that see at least one key."""
  return (lse > -jnp.inf)[..., None]


def _xla_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, causal, window, scale, drop):
  """Materialised logits [B, K, G, T, S]; softmax in stats dtype; rows with no visible key -> 0."""
  p, lse = _xla_probs(q_BKGTH, k_BKSH, bias, mask, seg, causal, window, scale)
  p = _apply_dropout(p, drop, 0, 0)
  out = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=p.dtype)
  # Zeroing the [.., T, H] output (not the [.., T, S] weights) keeps no extra T·S array for the backward.
  return jnp.where(_seen(lse), out, jnp.zeros((), out.dtype)), lse


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
    return None if self.dropout is None else _Dropout(*self.dropout, seed)


def _pad_to(x, axis, length, value=0):
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _chunked_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, causal, window, scale, chunk, drop, want_lse):
  """Pads T and S to chunk multiples, runs the custom-VJP kernel, crops. Returns (out, lse or None)."""
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
  seed = None if drop is None else drop.seed
  if want_lse:
    out, lse = _flash_with_lse(tiling, q, k, v, bias, mask, seg, seed)
    return out[:, :, :, :T], jnp.where(jnp.isinf(lse), -jnp.inf, lse)[:, :, :, :T]
  return _flash(tiling, q, k, v, bias, mask, seg, seed)[:, :, :, :T], None


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
  vis = _visibility(cq, ck, i * cq, j * ck, None if mask is None else _tile(mask, i * cq, j * ck, cq, ck),
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
      p_v = _apply_dropout(p, drop, i * cq, j * tiling.ck)
      pv = jnp.einsum("BKGTS,BKSH->BKGTH", p_v.astype(v.dtype), v_j, preferred_element_type=sd)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    init = (jnp.full((B, K, G, cq), -jnp.inf, sd), jnp.zeros((B, K, G, cq), sd), jnp.zeros((B, K, G, cq, Hv), sd))
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
  """FlashAttention-2 backward: recomputes each visible tile (and its dropout mask); dK, dV
  (and dbias) accumulate across query chunks."""
  q, k, v, bias, mask, seg, seed, out, lse = res
  if isinstance(d_out, tuple):  # _flash_with_lse: the logsumexp output is gradient-stopped
    d_out = d_out[0]
  cq, ck = tiling.cq, tiling.ck
  sd = _common.stats_dtype(q.dtype)
  drop = tiling.drop(seed)
  delta = jnp.sum(d_out.astype(sd) * out.astype(sd), -1)  # rowsum(dO * O) [B, K, G, Tp]

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
        keep = _dropout_keep(drop, p.shape, i * cq, j * ck)
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

    dq_i, *carry = _two_loops(tiling, i, body, (jnp.zeros(q_i.shape, sd), *carry))
    return tuple(carry), dq_i

  init = (jnp.zeros(k.shape, sd), jnp.zeros(v.shape, sd), None if bias is None else jnp.zeros(bias.shape, sd))
  (dk, dv, db), dq = lax.scan(q_chunk, init, jnp.arange(tiling.nq))
  dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape) * tiling.scale
  return ((dq.astype(q.dtype), (dk * tiling.scale).astype(k.dtype), dv.astype(v.dtype),
           None if bias is None else db.astype(bias.dtype), None, None, None))


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


# ----------------------------------------------------------------------------- cuDNN


def _cudnn_attention(query, key, value, bias, mask, seg, causal, scale, dims, window, return_residual):
  """jax.nn.dot_product_attention(implementation="cudnn") with segments folded into the mask.

  cuDNN turns a mask into a large negative bias, so a row that sees no key would
  average all values; such rows are zeroed here to keep the library's convention.
  """
  if seg is not None:
    seg_mask = (seg[0][:, None, :, None] == seg[1][:, None, None, :])
    mask = seg_mask if mask is None else mask & seg_mask.reshape((1,) * (mask.ndim - 4) + seg_mask.shape)
  if bias is not None:  # cuDNN wants full [.., T, S] bias in the query dtype
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (dims.T, dims.S)).astype(query.dtype)
  if mask is not None:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  out = jax.nn.dot_product_attention(query, key, value, bias, mask, scale=scale, is_causal=causal,
                                     local_window_size=window, implementation="cudnn",
                                     return_residual=return_residual)
  res = None
  if return_residual:
    out, res = out
  if mask is not None:
    seen = mask & jnp.tril(jnp.ones((1, 1, dims.T, dims.S), bool)) if causal else mask
    seen_BTN = jnp.broadcast_to(seen.any(-1), (dims.B, dims.N, dims.T)).transpose(0, 2, 1)
    out = jnp.where(seen_BTN[..., None], out, jnp.zeros((), out.dtype)).astype(query.dtype)
    if res is not None:
      res = jnp.where(seen_BTN, res, jnp.asarray(-jnp.inf, res.dtype))
  return out if res is None else (out, res)


# ----------------------------------------------------------------------------- decoding


def softmax_init_state(batch, max_len, num_kv_heads, head_dim, dtype=jnp.float32, value_head_dim=None):
  """Empty KV cache: {"k": [B, L, K, H], "v": [B, L, K, Hv], "pos": int32 scalar (tokens seen)}.

  Hv = value_head_dim, default H.
  L = max_len slots, used as a ring buffer: with a `window` in `softmax_step`,
  max_len = window is enough; without one, max_len must exceed the generated length.
  """
  for name, val in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
    if not isinstance(val, int) or val <= 0:
      raise ValueError(f"softmax_init_state: `{name}` must be a positive int, got {val!r}.")
  Hv = head_dim if value_head_dim is None else value_head_dim
  if not isinstance(Hv, int) or Hv <= 0:
    raise ValueError(f"softmax_init_state: `value_head_dim` must be a positive int, got {value_head_dim!r}.")
  return {"k": jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype),
          "v": jnp.zeros((batch, max_len, num_kv_heads, Hv), dtype), "pos": jnp.zeros((), jnp.int32)}


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
  Hv = cache_v.shape[-1]
  if key_B1KH.shape != (B, 1, K, H) or value_B1KH.shape != (B, 1, K, Hv):
    raise ValueError(f"{fn}: `key` and `value` must have shapes [B, 1, K, H]={[B, 1, K, H]} and [B, 1, K, Hv]="
                     f"{[B, 1, K, Hv]}, got {key_B1KH.shape} and {value_B1KH.shape}.")
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
  sd = _common.stats_dtype(query_B1NH.dtype)
  logits = jnp.einsum("BKGH,BLKH->BKGL", q_BKGH, cache_k, preferred_element_type=sd)
  logits = jnp.where(vis_L.reshape(1, 1, 1, L), logits * jnp.asarray(_common.resolve_scale(scale, H), sd), -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)  # the current token is always visible: no empty rows
  out = jnp.einsum("BKGL,BLKH->BKGH", p.astype(cache_v.dtype), cache_v, preferred_element_type=sd)
  new_state = {"k": cache_k, "v": cache_v, "pos": pos + 1}
  return out.reshape(query_B1NH.shape[:3] + (Hv,)).astype(query_B1NH.dtype), new_state


# ----------------------------------------------------------------------------- the family record


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
  """implementation: None (best for the lowering platform) | "xla" | "chunked" | "cudnn" | "splash" | "triton".
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
  platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())  # accounting for this machine
  impl = o.implementation or pick_implementation(T, S, H, jnp.float32, platform=platform)
  if impl == "xla":
    return {"ideal": ideal, "executed": per_pair * S}
  if impl == "cudnn":  # fused kernel; its tile skipping is not modelled here
    return {"ideal": ideal, "executed": ideal}
  cq, ck = o.chunk_size or DEFAULT_CHUNK
  if impl in ("splash", "triton"):  # whole kernel tiles, like the chunked path
    cq = ck = kernels.splash_tile(T) if impl == "splash" else 128
  cq, ck = min(cq, T), min(ck, S)
  nq, ns = -(-T // cq), -(-S // ck)
  # As _Tiling.key_range: query chunk i stops at the key chunk holding its last query's diagonal.
  tiles = sum(min(ns, ((i + 1) * cq - 1) // ck + 1) for i in range(nq)) if causal else nq * ns
  executed = per_pair * tiles * cq * ck / T
  return {"ideal": ideal, "executed": executed, "backward": 2.5 * executed}


def _init_state(batch, num_kv_heads, head_dim, *, max_len=None, dtype=None, value_head_dim=None, **_):
  if max_len is None:
    raise ValueError("init_decode_state('softmax'): `max_len` (cache length) is required for a KV cache.")
  return softmax_init_state(batch, max_len, num_kv_heads, head_dim, dtype or jnp.float32, value_head_dim)


FAMILY = Family(
    name="softmax", fn=softmax_attention, options=SoftmaxOptions, init_state=_init_state, step=softmax_step,
    flops=_flops, description="exact softmax attention (xla / chunked online softmax / cudnn / splash / triton); KV-cache decoding")
