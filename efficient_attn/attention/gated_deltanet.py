"""Gated DeltaNet: the delta rule with Mamba-2's scalar decay (Yang, Kautz & Hatamizadeh 2024,
"Gated Delta Networks: Improving Mamba2 with Delta Rule").

    α_t = exp(−softplus(x_t w_Δ + b_Δ) · exp(A_log)),  β_t = sigmoid(x_t w_β),  q, k L2-normalised,
    S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

The layer computes β and log α = `log_decay` [B, T, K] from its input x (`Family.inputs`,
params as `deltanet` + `mamba2`). The pure call without them uses β = 1/2 and RetNet's fixed
decays. Chunkwise parallel via the UT transform; decoding state [B, K, H, Hv].
"""

from __future__ import annotations

from efficient_attn.attention._common import compiled_when_eager, leading_batch_dims
from efficient_attn.attention.deltanet import _flops, beta_inputs, beta_params, deltanet_attention, step
from efficient_attn.attention.mamba2 import decay_inputs, decay_params
from efficient_attn.attention.context import check_split
from efficient_attn.attention.registry import Family, Shape
from efficient_attn.attention.retnet import ChunkOptions, _init_state, fixed_log_decay


@compiled_when_eager()
@leading_batch_dims(query_mask=False)
def gated_deltanet_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None,
                             scale=None, chunk_size=None, beta=None, log_decay=None, context_axis=None,
                             context_layout="zigzag"):
  """Gated DeltaNet: as `deltanet_attention` with log_decay [B, T, K] (None = RetNet's fixed decays)."""
  return deltanet_attention(query, key, value, bias, mask, is_causal=is_causal, segment_ids=segment_ids,
                            scale=scale, chunk_size=chunk_size, beta=beta,
                            log_decay=fixed_log_decay(query, key, log_decay), context_axis=context_axis,
                            context_layout=context_layout)


def _step(state, query_B1NH, key_B1KH, value_B1KH, *, beta=None, log_decay=None, scale=None, **_):
  return step(state, query_B1NH, key_B1KH, value_B1KH, beta=beta,
              log_decay=fixed_log_decay(query_B1NH, key_B1KH, log_decay), scale=scale)


def _input_params(o: ChunkOptions, shape: Shape, d_model: int) -> dict:
  return {**beta_params(shape, d_model), **decay_params(shape, d_model)}


def _inputs(params, x_BTD, o: ChunkOptions, shape: Shape) -> dict:
  return {**beta_inputs(params, x_BTD), "log_decay": decay_inputs(params, x_BTD)["log_decay"]}


FAMILY = Family(
    name="gated_deltanet", fn=gated_deltanet_attention, options=ChunkOptions, init_state=_init_state, step=_step,
    flops=_flops, input_params=_input_params, inputs=_inputs,
    context=check_split,
    short_conv=4,  # the paper's short convolution on q / k / v (kernel 4; model.short_conv=0 turns it off)
    description="Gated DeltaNet: delta rule + scalar decay, chunkwise via the UT transform (Yang et al. 2024)")
