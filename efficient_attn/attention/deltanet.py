"""DeltaNet: linear attention with the delta-rule write (Schlag et al. 2021; chunkwise: Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length").

    β_t = sigmoid(x_t w_β) ∈ (0, 1)^K,   q, k ← q / ‖q‖, k / ‖k‖,
    S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

The layer computes β [B, T, K] from its input x (`Family.inputs`); this family's function
L2-normalises q and k (so each write is a contraction) and calls
`delta.delta_rule_attention`. The pure call without `beta` uses β = 1/2 (a zero-initialised
gate). Chunkwise parallel via the UT transform; decoding state [B, K, H, Hv].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.attention._common import compiled_when_eager, leading_batch_dims, stats_dtype
from efficient_attn.attention.delta import delta_flops, delta_rule_attention, delta_step
from efficient_attn.attention.context import check_split
from efficient_attn.attention.registry import Family, Shape
from efficient_attn.attention.retnet import ChunkOptions, _init_state


def l2_normalise(x, eps: float = 1e-6):
  """x / ‖x‖ over the head dim, in float32 (float64 for float64)."""
  x = jnp.asarray(x).astype(stats_dtype(jnp.result_type(x)))
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def default_beta(key, beta=None):
  """`beta` or 1/2 for every token and kv head, [B, T, K]."""
  return jnp.full(key.shape[:-1], 0.5, jnp.float32) if beta is None else beta


@compiled_when_eager()
@leading_batch_dims(query_mask=False)
def deltanet_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                       chunk_size=None, beta=None, log_decay=None, context_axis=None, context_layout="zigzag"):
  """DeltaNet: query [B, T, N, H], key [B, T, K, H], value [B, T, K, Hv], beta [B, T, K] in [0, 1]
  (None = 1/2), log_decay [B, T, K] (None: no decay) -> [B, T, N, Hv]; q and k are L2-normalised
  here; see `delta_rule_attention`."""
  out = delta_rule_attention(l2_normalise(query), l2_normalise(key), value, default_beta(key, beta),
                             log_decay=log_decay, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
                             scale=scale, chunk_size=chunk_size, bias=bias, context_axis=context_axis,
                             context_layout=context_layout)
  return out.astype(query.dtype)


def step(state, query_B1NH, key_B1KH, value_B1KH, *, beta=None, log_decay=None, scale=None, **_):
  """One decoding token of `deltanet_attention` (and of Gated DeltaNet with `log_decay`)."""
  out, state = delta_step(state, l2_normalise(query_B1NH), l2_normalise(key_B1KH), value_B1KH,
                          default_beta(key_B1KH, beta), log_decay=log_decay, scale=scale)
  return out.astype(query_B1NH.dtype), state


def beta_params(shape: Shape, d_model: int) -> dict:
  return {"beta_proj": ((d_model, shape.num_kv_heads), ("embed", "kv_heads"), jax.nn.initializers.lecun_normal())}


def beta_inputs(params, x_BTD) -> dict:
  return {"beta": jax.nn.sigmoid(x_BTD.astype(jnp.float32) @ params["beta_proj"].astype(jnp.float32))}


def _flops(o: ChunkOptions, shape: Shape) -> dict:
  norms = 3 * shape.head_dim * (shape.num_heads + shape.num_kv_heads)
  return delta_flops(shape, o.chunk_size, extra=norms)


FAMILY = Family(
    name="deltanet", fn=deltanet_attention, options=ChunkOptions, init_state=_init_state, step=step,
    flops=_flops, input_params=lambda o, shape, d_model: beta_params(shape, d_model),
    inputs=lambda params, x, o, shape: beta_inputs(params, x),
    context=check_split,
    short_conv=4,  # the paper's short convolution on q / k / v (kernel 4; model.short_conv=0 turns it off)
    description="DeltaNet: delta-rule linear attention, chunkwise via the UT transform (Schlag et al. 2021)")
