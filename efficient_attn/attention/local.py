"""Local (sliding-window) attention, computed block by block.

Query t sees keys s in [t - window + 1, t] (causal) or [t - window + 1, t + window - 1]
(bidirectional), as in Longformer's sliding window (Beltagy et al., 2020) and the
local heads of the Sparse Transformer (Child et al., 2019).

The sequence is cut into blocks of `block_size` positions (default: about half the window).
Query block i attends only to the key blocks that can hold a visible key:
i - P .. i (causal) or i - P .. i + P (bidirectional), P = ceil((window - 1) / block).
Neighbouring key blocks are gathered by slicing a padded copy of K/V, so no
[T, S] tensor is ever formed: logits are [B, K, G, T/block, block, (2P+1)·block]
at most, and time and memory are O(T · window).

Context parallelism (`context_axis`): each shard's pieces take as neighbour blocks the `before`
(and, bidirectional, `after`) blocks of keys / values / key segment ids next to them, from the shard
that holds the neighbouring piece (`jax.lax.ppermute`, `context.halo`): O(window) numbers move, never O(T).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp

from efficient_attn.attention._common import (
    check_bias, check_mask, check_qkv, compiled_when_eager, gather_block_pairs, leading_batch_dims, masked_softmax,
    mean_visible_keys, resolve_scale, split_segment_ids, stats_dtype)
from efficient_attn.attention import context, kernels
from efficient_attn.attention.registry import Family, Shape
from efficient_attn.attention.softmax_decode import softmax_init_state, softmax_step

_FN = "local_attention"


def _check_positive_int(value, arg: str, hint: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{_FN}: `{arg}` must be a positive integer ({hint}), got {value!r}.")
  return int(value)


def default_block(T: int, window: int) -> int:
  """Half-window blocks read 1.5x window keys per query instead of 2x (measured ~15% faster
  at window 256 on CPU); small windows keep whole-window blocks so the matmuls stay large."""
  return min(T, window if window < 64 else -(-window // 2))


def _neighbour_blocks(x, block: int, before: int, after: int, halo=None):
  """[B, nb·block, ...] -> [B, nb, (before + 1 + after)·block, ...]: each block with its neighbours.

  Blocks outside the sequence are zero padding, or `halo` = (the before·block positions just before it,
  the after·block just after: [B, before·block, ...], [B, after·block, ...]); the caller masks by position.
  """
  nb = x.shape[1] // block
  if halo is None:
    pad = [(0, 0)] * x.ndim
    pad[1] = (before * block, after * block)
    xp = jnp.pad(x, pad)
  else:
    xp = jnp.concatenate([halo[0], x, halo[1]], axis=1)
  xp = xp.reshape(x.shape[0], nb + before + after, block, *x.shape[2:])
  return jnp.concatenate([xp[:, o:o + nb] for o in range(before + 1 + after)], axis=2)


def _split_heads(x, N: int, K: int):
  """[B|1, N|1, ...] -> [B|1, K|1, G|1, ...] (GQA grouping of the query heads)."""
  return x.reshape(x.shape[0], K, N // K, *x.shape[2:]) if x.shape[1] == N else x[:, :, None]


@compiled_when_eager()
@leading_batch_dims(query_mask=True)
def local_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                    window, block_size=None, implementation=None, context_axis=None, context_layout="zigzag"):
  """Sliding-window attention: query t attends to keys within `window` positions.

  Args:
    query: [B, T, N, H]. key: [B, S, K, H], value: [B, S, K, Hv], S == T (self-attention), N % K == 0.
      Any number of leading batch dims [..., T, N, H] (none included) is accepted in place of B.
    bias: additive, broadcastable to [B, N, T, S]. mask: bool, broadcastable to [B, N, T, S],
      True = may attend. Only their blocks near the diagonal are read; a padding mask
      [B, 1, 1, S] stays O(S), but a dense [T, S] mask or bias costs T·S memory by itself.
    query_seq_lengths, key_value_seq_lengths: int [B], as in jax.nn.dot_product_attention:
      keys s >= kv length are invisible; queries t >= q length output 0.
    is_causal: s in [t - window + 1, t]; otherwise s in [t - window + 1, t + window - 1].
    segment_ids: int [B, T] or a pair (q_ids [B, T], kv_ids [B, S]).
    scale: logit scale, default H ** -0.5.
    window: positive int, the number of positions a query sees on each side (itself included).
    block_size: positions per block of the computation (default: half the window, or the
      whole window below 64, at most T); T is padded
      internally to a multiple of it. Smaller blocks waste fewer masked logits, larger ones make
      bigger matmuls.
    implementation: "xla" (the blocks above), "splash" (Pallas splash attention with the window
      as its local mask: the TPU kernel; interpret mode elsewhere) or None: splash when lowered
      for TPU and it takes the call (no bias, no dense mask / lengths), else xla.
    context_axis, context_layout: context parallelism (see `attention.context`): the call runs inside
      `jax.shard_map` over the mesh axis `context_axis` on one shard's T = T_total / P tokens in
      `context_layout` ("zigzag" | "contiguous"), segment ids and a key mask [B|1, 1, 1, T] laid out the
      same way. Each local piece gets the ceil((window − 1) / block) blocks of keys, values, key ids and
      key mask next to it from the shard holding the neighbouring piece (`jax.lax.ppermute`): per piece
      and side B·(window − 1 rounded up to a block)·(K·(H + Hv) + 2) numbers, whatever T. Needs
      window − 1 ≤ the piece length (T / pieces), a block_size dividing it (the default picks one), no
      bias, the xla implementation.

  Returns:
    [B, T, N, Hv] in the query dtype; a query that sees no key outputs 0. Logits and softmax
    in float32 (float64 for float64 inputs).

  Complexity: O(B·N·T·(window + block)·H) time, O(B·N·T·(window + block)) memory.
  """
  dims = check_qkv(query, key, value, _FN, value_head_dim=True)
  B, T, S, N, K, H = dims
  if T != S:
    raise ValueError(f"{_FN}: needs self-attention lengths T == S, got T={T} and S={S}; use block_sparse_attention"
                     " or softmax_attention for cross-attention.")
  window = _check_positive_int(window, "window", "positions a query sees on each side, itself included")
  block = _check_positive_int(default_block(T, window) if block_size is None else block_size, "block_size",
                              "positions per block")
  mask, bias = check_mask(mask, dims, _FN), check_bias(bias, dims, _FN)
  ids = split_segment_ids(segment_ids, dims, _FN)
  scale = resolve_scale(scale, H)
  if context_axis is not None:
    xla = lambda: _local_context(query, key, value, bias, mask, ids, is_causal, scale, window, block_size, dims,
                                 context_axis, context_layout)
    return kernels.xla_or_splash(_FN, implementation, "context parallelism runs the XLA blocks with a halo", xla,
                                 None)
  xla = lambda: _local_blocks(query, key, value, bias, mask, ids, is_causal, scale, window, block, dims)
  splash = lambda interpret: kernels.splash_attention(query, key, value, causal=is_causal, segment_ids=ids,
                                                      scale=scale, window=(window - 1, window - 1),
                                                      interpret=interpret)
  return kernels.xla_or_splash(_FN, implementation, kernels.splash_refusal(T, S, bias=bias, mask=mask), xla, splash)


def _local_blocks(query, key, value, bias, mask, ids, is_causal, scale, window, block, dims):
  """The XLA path on checked arguments (`dims` from `check_qkv`): each query block against its
  neighbour key blocks."""
  B, T, S, N, K, H = dims
  Hv = value.shape[-1]
  nb = -(-T // block)
  Tp = nb * block
  before = -(-(window - 1) // block)
  after = 0 if is_causal else before
  pad_t = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
  q_BnqKGH = jnp.pad(query, pad_t).reshape(B, nb, block, K, N // K, H)
  k_BnkKH = _neighbour_blocks(jnp.pad(key, pad_t), block, before, after)
  v_BnkKV = _neighbour_blocks(jnp.pad(value, pad_t), block, before, after)

  acc = stats_dtype(jnp.result_type(query, key, value))

  # Visibility by position, static NumPy [1, 1, 1, nb, block, W], W = (before + 1 + after)·block;
  # k_pos outside [0, T) are the zero-padded neighbours.
  q_pos = np.arange(Tp).reshape(nb, block, 1)
  k_pos = (np.arange(nb)[:, None, None] - before) * block + np.arange((before + 1 + after) * block)[None, None]
  visible = (k_pos >= 0) & (k_pos < T) & (q_pos - k_pos < window) & (k_pos - q_pos < (1 if is_causal else window))
  visible = jnp.asarray(visible.reshape(1, 1, 1, *visible.shape))
  if ids is not None:
    q_ids, kv_ids = (jnp.pad(x, ((0, 0), (0, Tp - T)), constant_values=-1) for x in ids)
    kv_ids = _neighbour_blocks(kv_ids, block, before, after)
    visible = visible & (q_ids.reshape(B, 1, 1, nb, block, 1) == kv_ids.reshape(B, 1, 1, nb, 1, -1))
  if mask is not None or bias is not None:
    kv_blocks = (np.arange(nb)[:, None] + np.arange(-before, after + 1)[None, :])[None]
    gather = lambda x: _split_heads(gather_block_pairs(x, block, kv_blocks), N, K)
    if mask is not None:
      m = gather(mask)
      visible = visible & m.reshape(*m.shape[:5], -1)
    if bias is not None:
      b = gather(bias).astype(acc)
      bias = b.reshape(*b.shape[:5], -1)
  out = _band(q_BnqKGH, k_BnkKH, v_BnkKV, visible, scale, bias)
  return out.reshape(B, Tp, N, Hv)[:, :T].astype(query.dtype)


def _band(q_BnqKGH, k_BnkKH, v_BnkKV, visible, scale, bias=None):
  """Each query block against its neighbour key blocks: [B, nb, block, K, G, Hv] in the stats dtype.

  visible: bool broadcastable to the logits [B, K, G, nb, block, W]; bias: additive, the same (or None)."""
  acc = stats_dtype(jnp.result_type(q_BnqKGH, k_BnkKH, v_BnkKV))
  logits = jnp.einsum("BnqKGH,BnkKH->BKGnqk", q_BnqKGH, k_BnkKH, preferred_element_type=acc) * scale
  if bias is not None:
    logits = logits + bias
  probs = masked_softmax(logits, visible)
  return jnp.einsum("BKGnqk,BnkKV->BnqKGV", probs.astype(v_BnkKV.dtype), v_BnkKV, preferred_element_type=acc)


# ----------------------------------------------------------------------------- context parallelism


def _piece_block(L: int, window: int, block_size) -> int:
  """The block of a context-parallel call: `block_size` if it divides the piece length L, by default the
  largest divisor of L not above `default_block` (blocks must tile each piece so a halo is whole blocks)."""
  if block_size is None:
    want = default_block(L, window)
    return max(d for d in range(1, want + 1) if L % d == 0)
  if L % block_size:
    raise ValueError(f"{_FN}: under context parallelism `block_size`={block_size} must divide the piece length"
                     f" {L} (the local T over its pieces); pass a divisor of {L} or None.")
  return block_size


def _key_mask(mask, dims):
  """A key mask broadcastable to [B, 1, 1, T] -> bool [B, T]; any other mask is refused (under context a query
  row or a [T, S] block would need the other shards' positions)."""
  m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if m.shape[1:3] != (1, 1):
    raise ValueError(f"{_FN}: under context parallelism `mask` must be a key mask broadcastable to [B, 1, 1, T],"
                     f" got shape {list(mask.shape)}; use segment_ids for packed documents.")
  return jnp.broadcast_to(m[:, 0, 0], (dims.B, dims.T))


def _local_context(query, key, value, bias, mask, ids, is_causal, scale, window, block_size, dims, axis_name,
                   layout):
  """The XLA path on one shard of a sequence split over `axis_name`: each local piece of L tokens is its own
  sequence of blocks whose outer neighbour blocks are the halo from the neighbouring pieces (`context.halo`)."""
  B, T, _, N, K, H = dims
  Hv = value.shape[-1]
  if bias is not None:
    raise ValueError(f"{_FN}: under context parallelism `bias` is not supported (it would need the other shards'"
                     " positions); use a key mask or segment_ids.")
  n = context.local_pieces(layout, T, _FN)
  L = T // n
  if window - 1 > L:
    raise ValueError(f"{_FN}: under context parallelism each piece holds {L} tokens, and `window`={window} reaches"
                     f" past the neighbouring piece; use a window of at most {L + 1} or fewer devices.")
  block = _piece_block(L, window, block_size)
  nb, before = L // block, -(-(window - 1) // block)
  after = 0 if is_causal else before
  q_ids, kv_ids = (None, None) if ids is None else ids
  keys = {"k": key, "v": value}
  if kv_ids is not None:
    keys["ids"] = kv_ids
  if mask is not None:
    keys["ok"] = _key_mask(mask, dims)
  keys = {name: x.reshape(B, n, L, *x.shape[2:]) for name, x in keys.items()}
  ends = lambda lo, hi: {name: x[:, :, lo:hi] for name, x in keys.items()}  # noqa: E731
  none = (ends(0, 0), jnp.zeros(n, bool))  # window 1 / causal: no halo on that side
  prev, has_prev = context.halo(ends(L - before * block, L), axis_name, layout, n, -1) if before else none
  nxt, has_next = context.halo(ends(0, after * block), axis_name, layout, n, +1) if after else none
  Bn = B * n
  flat = lambda x: x.reshape(Bn, *x.shape[2:])  # noqa: E731
  neighbours = lambda name: _neighbour_blocks(flat(keys[name]), block, before, after,  # noqa: E731
                                              (flat(prev[name]), flat(nxt[name])))

  # Visibility: static by position within the piece ([nb, block, W]; k_pos < 0 or >= L is the halo),
  # the halo only where the neighbouring piece exists, then segments and the key mask.
  q_pos = np.arange(L).reshape(nb, block, 1)
  k_pos = (np.arange(nb)[:, None, None] - before) * block + np.arange((before + 1 + after) * block)[None, None]
  near = jnp.asarray((q_pos - k_pos < window) & (k_pos - q_pos < (1 if is_causal else window)))
  edge = lambda flag, where: jnp.tile(flag, B).reshape(Bn, 1, 1, 1) | jnp.asarray(where)  # noqa: E731
  visible = (near & edge(has_prev, k_pos >= 0) & edge(has_next, k_pos < L)).reshape(Bn, 1, 1, nb, block, -1)
  if q_ids is not None:
    visible = visible & (q_ids.reshape(Bn, 1, 1, nb, block, 1) == neighbours("ids").reshape(Bn, 1, 1, nb, 1, -1))
  if mask is not None:
    visible = visible & neighbours("ok").reshape(Bn, 1, 1, nb, 1, -1)
  q_BnqKGH = query.reshape(Bn, nb, block, K, N // K, H)
  out = _band(q_BnqKGH, neighbours("k"), neighbours("v"), visible, scale)
  return out.reshape(B, T, N, Hv).astype(query.dtype)


# ----------------------------------------------------------------------------- the family record


@dataclasses.dataclass(frozen=True)
class LocalOptions:
  """window: positions a query sees on each side, itself included. block_size: positions per
  block of the computation (None = `default_block`). implementation: None (splash on TPU, else
  xla) | "xla" | "splash"."""
  window: int = 128
  block_size: int | None = None
  implementation: str | None = None

  def __post_init__(self):
    _check_positive_int(self.window, "window", "positions a query sees on each side, itself included")
    if self.block_size is not None:
      _check_positive_int(self.block_size, "block_size", "positions per block")
    if self.implementation not in (None, "xla", "splash"):
      raise ValueError(f"implementation={self.implementation!r} is not one of None, 'xla', 'splash'.")


def _flops(o: LocalOptions, shape: Shape) -> dict:
  """The window is ideal; executed is the band of whole neighbour blocks this file computes."""
  T, _, N, _, H, causal = shape
  block = o.block_size or default_block(T, o.window)
  nb = -(-T // block)
  before = -(-(o.window - 1) // block)
  width = (before + 1 + (0 if causal else before)) * block
  return {"ideal": 4 * N * H * mean_visible_keys(T, o.window, causal), "executed": 4 * N * H * nb * block * width / T}


def _check(o: LocalOptions, shape: Shape) -> None:
  if shape.seq_len != shape.kv_len:
    raise ValueError(f"local attention needs self-attention lengths T == S, got T={shape.seq_len}, S={shape.kv_len}.")


def check_window_split(window: int, shape: Shape, shards: int, layout: str, block_size=None, what="window") -> None:
  """`Family.context` of a sliding window: the halo comes from the neighbouring piece only, so window − 1 must
  not exceed a piece (and a given block size must divide it)."""
  piece = context.check_split(None, shape, shards, layout)
  if window - 1 > piece:
    raise ValueError(f"{what}={window} reaches past the neighbouring piece: over {shards} devices ({layout}) a piece"
                     f" holds {piece} tokens; use {what} <= {piece + 1}, a longer T or fewer devices.")
  if block_size is not None and piece % block_size:
    raise ValueError(f"block_size={block_size} does not divide the {piece}-token pieces of a {layout} split over"
                     f" {shards} devices; leave block_size unset or pick a divisor of {piece}.")


def _init_state(batch, num_kv_heads, head_dim, *, max_len=None, dtype=None, window=128, value_head_dim=None, **_):
  """A ring-buffer KV cache of `window` slots: decoding memory is O(window), not O(T)."""
  del max_len
  return softmax_init_state(batch, window, num_kv_heads, head_dim, dtype or jnp.float32, value_head_dim)


def _step(state, query_B1NH, key_B1KH, value_B1KH, *, window=128, scale=None, **_):
  return softmax_step(state, query_B1NH, key_B1KH, value_B1KH, window=window, scale=scale)


FAMILY = Family(
    name="local", fn=local_attention, options=LocalOptions, init_state=_init_state, step=_step,
    decode_window=lambda o: o.window, flops=_flops, check=_check,
    context=lambda o, shape, shards, layout: check_window_split(o.window, shape, shards, layout, o.block_size),
    description="sliding-window softmax attention (Longformer / Sparse Transformer local heads)")
