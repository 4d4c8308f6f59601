"""RetNet retention: the gated recurrence with fixed per-head decays (Sun et al. 2023, "Retentive Network").

    S_t = γ_k S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   γ_k = 1 − 2^(−5−k) for kv head k

(`gated.gated_linear_attention` with a constant log-decay per kv head; rotary positions come
from the layer, as RetNet's xPos does). No per-token inputs: the decays are not learned.
Chunkwise parallel, O(T) memory, constant-size decoding state [B, K, H, Hv].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from efficient_attn.attention._common import compiled_when_eager, leading_batch_dims
from efficient_attn.attention.gated import (
    gated_flops, gated_init_state, gated_linear_attention, gated_step, retnet_log_decay)
from efficient_attn.attention.context import check_split
from efficient_attn.attention.registry import Family, Shape


@dataclasses.dataclass(frozen=True)
class ChunkOptions:
  """chunk_size: positions per chunk of the chunkwise-parallel form (None = the core's default)."""
  chunk_size: int | None = None

  def __post_init__(self):
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive integer or None.")


def fixed_log_decay(query, key, log_decay=None):
  """`log_decay` or RetNet's fixed decays broadcast to [B, T, K] (the default of every gated family)."""
  if log_decay is not None:
    return log_decay
  B, T, K = key.shape[0], key.shape[1], key.shape[2]
  return jnp.broadcast_to(retnet_log_decay(K), (B, T, K))


@compiled_when_eager()
@leading_batch_dims(query_mask=False)
def retnet_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                     chunk_size=None, context_axis=None, context_layout="zigzag"):
  """Retention (RetNet): query [B, T, N, H], key [B, T, K, H], value [B, T, K, Hv] -> [B, T, N, Hv].

  Decay 1 − 2^(−5−k) for kv head k; everything else as `gated_linear_attention`.
  """
  return gated_linear_attention(query, key, value, fixed_log_decay(query, key), mask=mask, is_causal=is_causal,
                                segment_ids=segment_ids, scale=scale, chunk_size=chunk_size, bias=bias,
                                context_axis=context_axis, context_layout=context_layout)


def _init_state(batch, num_kv_heads, head_dim, *, dtype=None, value_head_dim=None, **_):
  return gated_init_state(batch, num_kv_heads, head_dim, value_head_dim, dtype or jnp.float32)


def _step(state, query_B1NH, key_B1KH, value_B1KH, *, scale=None, **_):
  return gated_step(state, query_B1NH, key_B1KH, value_B1KH, fixed_log_decay(query_B1NH, key_B1KH), scale=scale)


def _flops(o: ChunkOptions, shape: Shape) -> dict:
  return gated_flops(shape, o.chunk_size, per_channel=False)


FAMILY = Family(
    name="retnet", fn=retnet_attention, options=ChunkOptions, init_state=_init_state, step=_step, flops=_flops,
    context=check_split,
    description="RetNet retention: fixed per-head decays, chunkwise (Sun et al. 2023)")
