"""Exact softmax attention, the `softmax` family: the public function, its dispatch, the FAMILY record.

    out_BTNH = softmax_attention(query_BTNH, key_BSKH, value_BSKH, bias=None, mask=None, *,
                                 is_causal=False, segment_ids=None, scale=None,
                                 implementation=None, chunk_size=None)

The implementations live beside this file:
  softmax_xla.py      "xla": materialised [B, K, G, T, S] logits; the visibility and dropout
                      rules every path shares (any tiling masks and drops the same entries).
  softmax_chunked.py  "chunked": online softmax over key chunks with a FlashAttention-2 custom
                      VJP (Dao, 2023), O(T·chunk) memory; causal / windowed calls skip invisible tiles.
  kernels.py          "cudnn", "splash", "triton": the fused kernels' glue and what each refuses.
  softmax_decode.py   KV-cache decoding (`softmax_init_state`, `softmax_step`), shared with local.
  ring.py             context parallelism: ring attention and the all_gather strategy.

Internally queries are grouped as [B, K, G, T, H] (G = N // K query heads per
key/value head), so GQA / MQA never repeat keys or values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from efficient_attn.attention import _common, context, kernels, ring
from efficient_attn.attention.registry import Family, Shape
from efficient_attn.attention.softmax_chunked import DEFAULT_CHUNK, chunked_attention
from efficient_attn.attention.softmax_decode import softmax_init_state, softmax_step
from efficient_attn.attention.softmax_xla import Dropout, group_heads, seen_rows, xla_attention, xla_probs

_FN = "softmax_attention"
IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash", "triton")
# Auto-selection: at T·S >= this the chunked form is no slower than the materialised one on CPU.
CHUNKED_MIN_TS = 256 * 256


@_common.compiled_when_eager()
@_common.leading_batch_dims(query_mask=True)
def softmax_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None,
                      scale=None, implementation=None, chunk_size=None, local_window_size=None,
                      return_residual=False, dropout_rate=0.0, dropout_rng=None, broadcast_dropout=True,
                      context_axis=None, context_layout="zigzag", context_strategy="ring"):
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
    context_axis, context_layout, context_strategy: context parallelism. With `context_axis` (a
      mesh axis name) the call runs inside `jax.shard_map` over that axis on one shard's T / P
      tokens of query, key, value and segment_ids, laid out by `context_layout` ("zigzag":
      pieces r and 2P - 1 - r of 2P; "contiguous"; see `context.to_layout`), and returns that
      shard's rows of the whole sequence's output: exact, forward and gradients.
      `context_strategy` "ring" (ring attention: K/V blocks travel by `ppermute`, causal pairs
      of pieces skipped, O(T / P) memory; per step softmax_chunked's block kernel on every
      platform, one tile when a piece is short) or "all_gather" (K/V gathered whole, a causal
      [T / P, T] mask; the dispatch below picks the lowering); see `ring`. Self-attention only
      (T == S), without bias, mask / lengths, window, dropout or the residual; `implementation`
      None, "xla" (one tile per ring step) or "chunked".

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
  if context_strategy not in ring.STRATEGIES:
    raise ValueError(f"{_FN}: `context_strategy`={context_strategy!r} is not one of {list(ring.STRATEGIES)}.")
  if context_axis is not None:
    n = _check_context(dims, implementation, context_axis, context_layout, bias, mask, window, drop, return_residual)
    if context_strategy == "ring":
      T_piece = dims.T // n
      impl = implementation or _xla_or_chunked(T_piece, T_piece)
      plan = ring.Ring(context_axis, context_layout, bool(is_causal), float(scale),
                       (T_piece, T_piece) if impl == "xla" else chunk)
      return ring.ring_attention(query, key, value, seg, plan).astype(query.dtype)
    key, value, seg, mask = ring.gather_keys(key, value, seg, context_axis, context_layout, is_causal)
    dims, is_causal = dims._replace(S=key.shape[1]), False
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
    branches = {name: run(name) for name in dict.fromkeys((base, tpu, cuda))}  # ordered: the same trace every run
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
    return kernels.cudnn_attention(query, key, value, bias, mask, seg, is_causal, scale, dims, local_window_size,
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
  bias, mask = (None if x is None else group_heads(x, dims) for x in (bias, mask))
  if impl == "xla":
    out_BKGTH, lse_BKGT = xla_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, is_causal, window, scale, drop)
  else:
    out_BKGTH, lse_BKGT = chunked_attention(q_BKGTH, k_BKSH, v_BKSH, bias, mask, seg, is_causal, window, scale,
                                            chunk, drop, return_residual)
  out = jnp.moveaxis(out_BKGTH, 3, 1).reshape(dims.B, dims.T, dims.N, Hv).astype(query.dtype)
  if not return_residual:
    return out
  lse_BTN = jnp.moveaxis(lse_BKGT, 3, 1).reshape(dims.B, dims.T, dims.N)
  return out, lax.stop_gradient(lse_BTN).astype(key.dtype)


@_common.compiled_when_eager()
@_common.leading_batch_dims(query_mask=True, result="BNTS")
def softmax_weights(query, key, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                    local_window_size=None):
  """The attention weights softmax(q kᵀ · scale + bias) under the masks, [..., N, T, S] float32
  (float64 for float64 inputs); a row that sees no key is all zeros. query [..., T, N, H], key
  [..., S, K, H]; the other arguments as `softmax_attention`'s. Materialises T·S per head: for
  inspection (Flax's `sow_weights`), not for long sequences."""
  fn = "softmax_weights"
  dims = _common.check_qkv(query, key, None, fn)
  bias = _common.check_bias(bias, dims, fn)
  mask = _common.check_mask(mask, dims, fn)
  seg = _common.split_segment_ids(segment_ids, dims, fn)
  q_BKGTH = jnp.moveaxis(query.reshape(dims.B, dims.T, dims.K, dims.G, dims.H), 1, 3)
  bias, mask = (None if x is None else group_heads(x, dims) for x in (bias, mask))
  p_BKGTS, lse_BKGT = xla_probs(q_BKGTH, jnp.moveaxis(key, 1, 2), bias, mask, seg, is_causal,
                                _resolve_window(local_window_size), _common.resolve_scale(scale, dims.H))
  p_BKGTS = jnp.where(seen_rows(lse_BKGT), p_BKGTS, jnp.zeros((), p_BKGTS.dtype))
  return p_BKGTS.reshape(dims.B, dims.N, dims.T, dims.S)


def _check_context(dims, implementation, axis, layout, bias, mask, window, drop, return_residual) -> int:
  """The number of local pieces of a context-parallel call, or one sentence saying what it cannot take."""
  unsupported = [name for name, given in (("bias", bias is not None), ("mask (or sequence lengths)", mask is not None),
                                          ("local_window_size", window is not None), ("dropout", drop is not None),
                                          ("return_residual", return_residual)) if given]
  if unsupported:
    raise ValueError(f"{_FN}: context parallelism (context_axis={axis!r}) does not take {', '.join(unsupported)};"
                     " use segment_ids and is_causal for packing and causality.")
  if dims.T != dims.S:
    raise ValueError(f"{_FN}: context parallelism (context_axis={axis!r}) is self-attention, query and key/value"
                     f" the same local length; got T={dims.T}, S={dims.S}.")
  if implementation not in (None, "xla", "chunked"):
    raise ValueError(f"{_FN}: implementation={implementation!r} cannot run under context parallelism (the ring"
                     " needs each block's log-sum-exp and the all_gather strategy a dense mask, which the fused kernels"
                     " do not give or take); use None, 'chunked' or 'xla'.")
  return context.local_pieces(layout, dims.T, _FN)


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
  return Dropout(rate, bool(broadcast), jax.random.bits(rng, (2,), jnp.uint32))


def _xla_or_chunked(T: int, S: int) -> str:
  """The XLA path by size: materialised logits below CHUNKED_MIN_TS = T·S, online softmax above."""
  return "chunked" if T * S >= CHUNKED_MIN_TS else "xla"


def _kernel_refusals(dims, dtype, Hv, bias, mask, seg, causal, window, drop, residual) -> dict:
  """{"splash" | "triton" | "cudnn": why that kernel cannot run this call, or None}."""
  T, S, H = dims.T, dims.S, dims.H
  return {
      "splash": kernels.splash_refusal(T, S, bias=bias, mask=mask, dropout=drop is not None, residual=residual),
      "triton": kernels.triton_refusal(T, S, H, Hv, bias=bias, mask=mask, dropout=drop is not None,
                                       residual=residual, window=window, segment_ids=seg),
      "cudnn": kernels.cudnn_refusal(T, S, H, Hv, dtype, has_bias=bias is not None, dropout=drop is not None,
                                     window=window, causal=causal)}


def pick_implementation(T: int, S: int, H: int, dtype, *, has_bias: bool = False, platform: str = "cpu") -> str:
  """What `implementation=None` runs when lowered for `platform` ("cpu" | "tpu" | "cuda"), for a call
  with no mask, dropout or window: splash on TPU; cudnn (bf16/f16, where jax can trace it), else
  triton on CUDA; elsewhere (and for what the kernels refuse) chunked at T·S >= CHUNKED_MIN_TS, else xla.
  """
  if platform == "tpu" and not kernels.splash_refusal(T, S, bias=True if has_bias else None):
    return "splash"
  if platform in ("cuda", "gpu"):
    if not kernels.cudnn_refusal(T, S, H, H, dtype, has_bias=has_bias):
      return "cudnn"
    if not kernels.triton_refusal(T, S, H, H, bias=True if has_bias else None):
      return "triton"
  return _xla_or_chunked(T, S)


# ----------------------------------------------------------------------------- the family record


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
  """implementation: None (best for the lowering platform) | "xla" | "chunked" | "cudnn" | "splash" | "triton".
  chunk_size: the chunked path's tile, an int or (query_chunk, key_chunk); None = DEFAULT_CHUNK.
  context_strategy: how a call with a `context_axis` moves keys: "ring" (ppermute round the ring) | "all_gather"."""
  implementation: str | None = None
  chunk_size: int | tuple[int, int] | None = None
  context_strategy: str = "ring"

  def __post_init__(self):
    if self.implementation not in (None, *IMPLEMENTATIONS):
      raise ValueError(f"implementation={self.implementation!r} is not one of {[None, *IMPLEMENTATIONS]}.")
    if self.context_strategy not in ring.STRATEGIES:
      raise ValueError(f"context_strategy={self.context_strategy!r} is not one of {list(ring.STRATEGIES)}.")
    if self.chunk_size is not None:
      object.__setattr__(self, "chunk_size", _resolve_chunk(self.chunk_size))


def _flops(o: SoftmaxOptions, shape: Shape) -> dict:
  """4·N·H per visible (query, key) pair; xla computes all T·S pairs, chunked whole [Cq, Ck] tiles
  (and its backward recomputes the logits: 5 tile matmuls against 2 forward, FlashAttention-2)."""
  T, S, N, _, H, causal = shape
  per_pair = 4 * N * H  # q·k (2H) and p·v (2H) per head
  ideal = per_pair * (_common.mean_visible_keys(T, T, causal) if T == S else (S + 1) / 2 if causal else S)
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
  # As softmax_chunked._Tiling.key_range: query chunk i stops at the key chunk holding its last query's diagonal.
  tiles = sum(min(ns, ((i + 1) * cq - 1) // ck + 1) for i in range(nq)) if causal else nq * ns
  executed = per_pair * tiles * cq * ck / T
  return {"ideal": ideal, "executed": executed, "backward": 2.5 * executed}


def _init_state(batch, num_kv_heads, head_dim, *, max_len=None, dtype=None, value_head_dim=None, **_):
  if max_len is None:
    raise ValueError("init_decode_state('softmax'): `max_len` (cache length) is required for a KV cache.")
  return softmax_init_state(batch, max_len, num_kv_heads, head_dim, dtype or jnp.float32, value_head_dim)


def _step(state, query_B1NH, key_B1KH, value_B1KH, *, context_strategy="ring", **kw):
  """`softmax_step` under the family's options (decoding has no context axis)."""
  del context_strategy
  return softmax_step(state, query_B1NH, key_B1KH, value_B1KH, **kw)


def _check_split(o: SoftmaxOptions, shape: Shape, shards: int, layout: str) -> None:
  """`Family.context`: any split of T into equal pieces; each ring step runs the chunked / xla block (the fused
  kernels return no log-sum-exp to merge steps with)."""
  context.check_split(o, shape, shards, layout)
  if o.implementation in ("splash", "triton", "cudnn"):
    raise ValueError(f"implementation={o.implementation!r} cannot run a {o.context_strategy} step (no log-sum-exp"
                     " to merge blocks with); use None, 'chunked' or 'xla' under context parallelism.")


FAMILY = Family(
    name="softmax", fn=softmax_attention, options=SoftmaxOptions, init_state=_init_state, step=_step,
    flops=_flops, context=_check_split,
    description="exact softmax attention (xla / chunked online softmax / cudnn / splash / triton); KV-cache decoding")
