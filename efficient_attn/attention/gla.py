"""GLA: gated linear attention with low-rank data-dependent per-channel gates (Yang et al. 2024,
"Gated Linear Attention Transformers with Hardware-Efficient Training").

    α_t = sigmoid(x_t W₁ W₂ + b)^(1/τ) ∈ (0, 1)^[K, H],   S_t = α_t ⊙ S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

W₁ [D, r], W₂ [r, K, H] (rank r = 16, τ = 16 as in the paper, §4.1), computed by the layer
from its input x (`Family.inputs`) and passed as `log_decay` [B, T, K, H] = log α. The
pure call without `log_decay` falls back to RetNet's fixed decays. Chunkwise parallel with
the per-channel form of `gated.gated_linear_attention`; decoding state [B, K, H, Hv].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from efficient_attn.attention._common import compiled_when_eager, leading_batch_dims
from efficient_attn.attention.gated import gated_flops, gated_linear_attention, gated_step
from efficient_attn.attention.context import check_split
from efficient_attn.attention.registry import Family, Shape
from efficient_attn.attention.retnet import _init_state, fixed_log_decay


@dataclasses.dataclass(frozen=True)
class GLAOptions:
  """gate_rank: r of the low-rank gate projection. gate_temperature: τ (α = sigmoid(·)^(1/τ)).
  chunk_size: positions per chunk (None = 64 in the factorised form, 16 in the elementwise fallback; see gated.py)."""
  gate_rank: int = 16
  gate_temperature: float = 16.0
  chunk_size: int | None = None

  def __post_init__(self):
    if self.gate_rank < 1:
      raise ValueError(f"gate_rank={self.gate_rank} must be a positive integer.")
    if not self.gate_temperature > 0:
      raise ValueError(f"gate_temperature={self.gate_temperature} must be positive.")
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive integer or None.")


@compiled_when_eager()
@leading_batch_dims(query_mask=False)
def gla_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                  chunk_size=None, log_decay=None, context_axis=None, context_layout="zigzag"):
  """GLA: query [B, T, N, H], key [B, T, K, H], value [B, T, K, Hv], log_decay [B, T, K, H] (≤ 0;
  None = RetNet's fixed decays) -> [B, T, N, Hv]; see `gated_linear_attention`."""
  return gated_linear_attention(query, key, value, fixed_log_decay(query, key, log_decay), mask=mask,
                                is_causal=is_causal, segment_ids=segment_ids, scale=scale, chunk_size=chunk_size,
                                bias=bias, context_axis=context_axis, context_layout=context_layout)


def _prepare(o: GLAOptions, shape: Shape) -> dict:
  return {"chunk_size": o.chunk_size}


def _input_params(o: GLAOptions, shape: Shape, d_model: int) -> dict:
  K, H = shape.num_kv_heads, shape.head_dim
  lecun = jax.nn.initializers.lecun_normal()
  return {"gate_down": ((d_model, o.gate_rank), ("embed", "norm"), lecun),
          "gate_up": ((o.gate_rank, K, H), ("norm", "kv_heads", "head_dim"),
                      jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))),
          "gate_bias": ((K, H), ("kv_heads", "head_dim"), jax.nn.initializers.zeros)}


def _inputs(params, x_BTD, o: GLAOptions, shape: Shape) -> dict:
  low_BTR = x_BTD.astype(jnp.float32) @ params["gate_down"].astype(jnp.float32)
  logits_BTKH = jnp.einsum("btr,rkh->btkh", low_BTR, params["gate_up"].astype(jnp.float32)) + params["gate_bias"][None, None]
  return {"log_decay": jax.nn.log_sigmoid(logits_BTKH) / o.gate_temperature}


def _step(state, query_B1NH, key_B1KH, value_B1KH, *, log_decay=None, scale=None, **_):
  return gated_step(state, query_B1NH, key_B1KH, value_B1KH, fixed_log_decay(query_B1NH, key_B1KH, log_decay),
                    scale=scale)


def _flops(o: GLAOptions, shape: Shape) -> dict:
  return gated_flops(shape, o.chunk_size, per_channel=True)


FAMILY = Family(
    name="gla", fn=gla_attention, options=GLAOptions, prepare=_prepare, init_state=_init_state, step=_step,
    flops=_flops, input_params=_input_params, inputs=_inputs,
    context=check_split,
    description="gated linear attention, low-rank data-dependent per-channel gates (Yang et al. 2024)")
