"""Token-by-token softmax attention over a KV cache (the softmax and local families' decoding).

The cache is a ring buffer of L slots: without a window L must exceed the generated length;
with a sliding window L = window is enough, so local attention decodes in O(window) memory.
Each step equals the causal parallel forward (softmax.py, local.py) at that position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from efficient_attn.attention import _common


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
