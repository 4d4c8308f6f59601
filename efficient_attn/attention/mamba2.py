"""Mamba-2's SSD as attention: a scalar data-dependent decay per head (Dao & Gu 2024, "Transformers
are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality").

    Δ_t = softplus(x_t w_Δ + b_Δ),  a_t = Δ_t · A (A = −exp(A_log) < 0),
    S_t = exp(a_t) S_{t-1} + Δ_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

(SSD's C, B, X are our q, k, v; one Δ and A per kv head; no D skip. The short convolution is the
layer's: `model.short_conv`, kernel 4 by default for this family.) The
layer computes Δ [B, T, K] and a = `log_decay` [B, T, K] from its input x (`Family.inputs`;
Δ init in [1e-3, 1e-1] log-uniformly and A in [1, 16], Mamba's ranges). The pure call
without them falls back to RetNet's fixed decays and Δ = 1. Chunkwise parallel with the
scalar form of `gated.gated_linear_attention`; decoding state [B, K, H, Hv].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.attention._common import compiled_when_eager, leading_batch_dims
from efficient_attn.attention.gated import gated_flops, gated_linear_attention, gated_step
from efficient_attn.attention.context import check_split
from efficient_attn.attention.registry import Family, Shape
from efficient_attn.attention.retnet import ChunkOptions, _init_state, fixed_log_decay


def _scaled_key(key, dt):
  return key if dt is None else key * jnp.asarray(dt)[..., None].astype(key.dtype)


@compiled_when_eager()
@leading_batch_dims(query_mask=False)
def mamba2_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                     chunk_size=None, log_decay=None, dt=None, context_axis=None, context_layout="zigzag"):
  """SSD: query [B, T, N, H], key [B, T, K, H], value [B, T, K, Hv], log_decay = Δ·A [B, T, K] (≤ 0),
  dt = Δ [B, T, K] scaling each key (None: 1) -> [B, T, N, Hv]; see `gated_linear_attention`."""
  if dt is not None:
    dt = jnp.asarray(dt).reshape(key.shape[:-1])
  return gated_linear_attention(query, _scaled_key(key, dt), value, fixed_log_decay(query, key, log_decay),
                                mask=mask, is_causal=is_causal, segment_ids=segment_ids, scale=scale,
                                chunk_size=chunk_size, bias=bias, context_axis=context_axis,
                                context_layout=context_layout)


def _dt_bias_init(key, shape, dtype=jnp.float32):
  """softplus⁻¹ of Δ drawn log-uniformly in [1e-3, 1e-1] (Mamba's dt init)."""
  dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, jnp.log(1e-3), jnp.log(1e-1)))
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def decay_params(shape: Shape, d_model: int) -> dict:
  """Params of the SSD decay from x: w_Δ [D, K], b_Δ [K], A_log [K] (shared with Gated DeltaNet)."""
  K = shape.num_kv_heads
  return {"dt_proj": ((d_model, K), ("embed", "kv_heads"), jax.nn.initializers.lecun_normal()),
          "dt_bias": ((K,), ("kv_heads",), _dt_bias_init),
          "a_log": ((K,), ("kv_heads",), _a_log_init)}


def decay_inputs(params, x_BTD) -> dict:
  """{"dt": Δ [B, T, K], "log_decay": Δ · A [B, T, K]} in float32."""
  logits_BTK = x_BTD.astype(jnp.float32) @ params["dt_proj"].astype(jnp.float32) + params["dt_bias"][None, None]
  dt = jax.nn.softplus(logits_BTK)
  return {"dt": dt, "log_decay": -dt * jnp.exp(params["a_log"].astype(jnp.float32))[None, None]}


def _step(state, query_B1NH, key_B1KH, value_B1KH, *, log_decay=None, dt=None, scale=None, **_):
  if dt is not None:
    dt = jnp.asarray(dt).reshape(key_B1KH.shape[:-1])
  return gated_step(state, query_B1NH, _scaled_key(key_B1KH, dt), value_B1KH,
                    fixed_log_decay(query_B1NH, key_B1KH, log_decay), scale=scale)


def _flops(o: ChunkOptions, shape: Shape) -> dict:
  return gated_flops(shape, o.chunk_size, per_channel=False, extra=shape.num_kv_heads * shape.head_dim)


FAMILY = Family(
    name="mamba2", fn=mamba2_attention, options=ChunkOptions, init_state=_init_state, step=_step, flops=_flops,
    input_params=lambda o, shape, d_model: decay_params(shape, d_model),
    inputs=lambda params, x, o, shape: decay_inputs(params, x),
    context=check_split,
    short_conv=4,  # the paper's short convolution on q / k / v (kernel 4; model.short_conv=0 turns it off)
    description="Mamba-2 SSD: scalar data-dependent decay per head, chunkwise (Dao & Gu 2024)")
