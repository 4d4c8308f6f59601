"""Based: Taylor-feature linear attention beside a sliding-window softmax, in one layer
(Arora et al. 2024, "Simple linear attention language models balance the recall-throughput tradeoff").

    o_t = φ(q'_t)ᵀ Σ_{s≤t} φ(k'_s) v_sᵀ / φ(q'_t)ᵀ Σ_{s≤t} φ(k'_s)  +  softmax attention over s ∈ (t − w, t]

q', k' are the first `feature_dim` (d' = 16, the paper's; at most H) channels of each head's query and
key (a learned d'-dim projection, since q / k are learned); φ(x) = [1, x̃, x̃ ⊗ x̃ / √2] with
x̃ = x / d'^¼ is the 2nd-order Taylor expansion of exp(q'·k' / √d'), so φ(q)·φ(k) = 1 + z + z²/2
with z = q̃·k̃. x̃ ⊗ x̃ is symmetric, so the state keeps its d'(d'+1)/2 distinct products
(x̃_i² / √2 and x̃_i x̃_j for i < j): M = 1 + d' + d'(d'+1)/2 = 153 features rather than
1 + d' + d'² = 273, the same kernel. On the linear core (`linear.kernelized_attention`,
chunkwise) the weights inside a chunk come straight from z (a d'-dim dot product), the
features only carry earlier chunks. The window part is `local.local_attention`
(w = `window_size`, 64 by default as in the paper). Based alternates the two in separate
layers; here one layer sums them, so every layer has both exact local recall and the global
linear state. Decoding: the linear state plus a ring buffer of w keys.

Context parallelism (`context_axis`): the linear half passes its state between shards
(`linear._context_parallel` on the Taylor features: one all_gather of each piece's Σφ(k)[v, 1]ᵀ,
M·(Hv + 1) numbers per kv head, whatever T), the window half takes a halo of w − 1 keys from the
neighbouring pieces (`local.local_attention`'s ppermutes). Exact, like both halves.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.attention import context, linear, local
from efficient_attn.attention._common import compiled_when_eager, leading_batch_dims
from efficient_attn.attention.linear import kernelized_flops, linear_init_state, linear_step
from efficient_attn.attention.registry import Family, Shape


@dataclasses.dataclass(frozen=True)
class BasedOptions:
  """feature_dim: d', the query / key channels the Taylor map sees (at most H). window_size: w of the sliding
  softmax. chunk_size: positions per chunk of the linear part (None = its default)."""
  feature_dim: int = 16
  window_size: int = 64
  chunk_size: int | None = None

  def __post_init__(self):
    for name in ("feature_dim", "window_size"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer.")
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive integer or None.")


def taylor_features(x):
  """[..., d'] -> [..., 1 + d' + d'(d'+1)/2]: φ(q)·φ(k) = 1 + z + z²/2 with z = q·k / √d' (always > 0).

  φ = [1, x̃, then each distinct product x̃_i x̃_j (i ≤ j), x̃_i² scaled by 1/√2] with x̃ = x / d'^¼;
  the products' dot products sum to (q̃·k̃)² / 2. Computed as (x̂ P_i) ⊙ (x̂ P_j) with x̂ = [x̃, 1] and
  0/1 selection matrices P (two small matmuls; a concatenation of d' slices ran ~2x slower on CPU).
  """
  d = x.shape[-1]
  x = x * d ** -0.25
  i, j, w = _feature_pairs(d)
  x1 = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
  eye = np.eye(d + 1)
  # HIGHEST: TPU's default f32 matmul would round x̃ to bfloat16 here.
  pick = lambda p: jnp.matmul(x1, jnp.asarray(p, x.dtype), precision=jax.lax.Precision.HIGHEST)  # noqa: E731
  return pick(eye[:, i]) * pick(eye[:, j] * w)


def _feature_pairs(d: int):
  """Index pairs (i, j) into [x̃, 1] and weights: (d, d) -> 1, (i, d) -> x̃_i, (i, j ≥ i) -> x̃_i x̃_j (√½ if i = j)."""
  i, j = np.triu_indices(d)
  i = np.concatenate([[d], np.arange(d), i])
  j = np.concatenate([[d], np.full(d, d), j])
  w = np.where((i == j) & (i < d), 0.5 ** 0.5, 1.0)
  return i, j, w


def num_features(feature_dim: int) -> int:
  """M = 1 + d' + d'(d'+1)/2, the length of `taylor_features`."""
  return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


def taylor_attention(query, key, value, *, mask=None, is_causal=False, segment_ids=None, chunk_size=None,
                     context_axis=None, context_layout="zigzag"):
  """The linear half of Based: Σ_s (1 + z + z²/2) v_s / Σ_s (1 + z + z²/2), z = q·k / √d (d = the last dim).

  query [B, T, N, d], key [B, S, K, d], value [B, S, K, Hv] -> [B, T, N, Hv]. Chunkwise, the weights
  inside a chunk come from z directly (O(L·d) per query rather than O(L·M)); earlier chunks
  enter through the states of `taylor_features` (M = 1 + d + d(d+1)/2). With `context_axis` (one shard of a
  sequence split over that mesh axis, see `based_attention`): the states of the features pass between shards."""
  fn = "based_attention"
  p = linear.prepare_kernelized(query, key, value, None, mask, segment_ids, chunk_size, fn)
  d, dims = query.shape[-1], p.dims
  q = jnp.asarray(query).astype(p.key_BSKH.dtype)
  k = p.key_BSKH
  if context_axis is not None:
    out = linear._context_parallel(taylor_features(q), taylor_features(k), p, is_causal, context_axis, context_layout)
    return out.astype(query.dtype)
  Kc = k.shape[2]

  def intra(chunks):
    qc = chunks(q * d ** -0.25)
    qc = qc.reshape(*qc.shape[:3], Kc, dims.N // Kc, d)  # [B, C, L, K, G, d]
    z = jnp.einsum("bctkgd,bcskd->bckgts", qc, chunks(k * d ** -0.25))
    return 1.0 + z + 0.5 * z * z

  out = linear.kernelized_attention(taylor_features(q), taylor_features(k), p.value_BSKH, is_causal=is_causal,
                                    key_mask_BSK=p.key_mask_BSK, segment_ids=p.segment_ids,
                                    chunk_size=p.chunk_size, intra_weights=intra)
  return out.astype(query.dtype)


@compiled_when_eager()
@leading_batch_dims(query_mask=False)
def based_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                    feature_dim=16, window_size=64, chunk_size=None, context_axis=None, context_layout="zigzag"):
  """Based: query [B, T, N, H], key [B, T, K, H], value [B, T, K, Hv] -> [B, T, N, Hv].

  Taylor linear attention on the first `feature_dim` channels + sliding-window softmax
  (`scale`, default H^-½, is the window's). O(T·(d'² + w)·H) time, O(T) memory.

  Context parallelism: `context_axis` (a mesh axis name) says the call runs inside `jax.shard_map` on one
  shard's T = T_total / P tokens in `context_layout` ("zigzag" | "contiguous", see `attention.context`),
  segment ids and a key mask laid out the same way. The linear half passes each piece's feature state
  (one all_gather of P·n·B·K·M·(Hv + 1) numbers), the window half a halo of ceil(w − 1) keys per piece
  and side (ppermutes; window_size − 1 must fit in a piece): exact, and nothing of size T moves.
  """
  d = min(feature_dim, query.shape[-1])
  if context_axis is not None:
    L = query.shape[1] // context.local_pieces(context_layout, query.shape[1], "based_attention")
    if window_size - 1 > L:
      raise ValueError(f"based_attention: under context parallelism each piece holds {L} tokens, and"
                       f" `window_size`={window_size} reaches past the neighbouring piece; use a window_size of at"
                       f" most {L + 1} or fewer devices.")
  cp = {"context_axis": context_axis, "context_layout": context_layout}
  lin = taylor_attention(query[..., :d], key[..., :d], value, mask=mask, is_causal=is_causal,
                         segment_ids=segment_ids, chunk_size=chunk_size, **cp)
  win = local.local_attention(query, key, value, bias, mask, is_causal=is_causal, segment_ids=segment_ids,
                              scale=scale, window=window_size, **cp)
  return (lin.astype(jnp.float32) + win.astype(jnp.float32)).astype(query.dtype)


def _init_state(batch, num_kv_heads, head_dim, *, dtype=None, feature_dim=16, window_size=64, value_head_dim=None,
                **_):
  Hv, d = value_head_dim or head_dim, min(feature_dim, head_dim)
  return {"linear": linear_init_state(batch, num_kv_heads, num_features(d), Hv, dtype or jnp.float32),
          "local": local.FAMILY.init_state(batch, num_kv_heads, head_dim, dtype=dtype, window=window_size,
                                           value_head_dim=value_head_dim)}


def _step(state, query_B1NH, key_B1KH, value_B1KH, *, feature_dim=16, window_size=64, scale=None, **_):
  d = min(feature_dim, query_B1NH.shape[-1])
  lin, s_lin = linear_step(state["linear"], query_B1NH[..., :d], key_B1KH[..., :d], value_B1KH,
                           feature_map=taylor_features)
  win, s_loc = local.FAMILY.step(state["local"], query_B1NH, key_B1KH, value_B1KH, window=window_size, scale=scale)
  out = (lin.astype(jnp.float32) + win.astype(jnp.float32)).astype(query_B1NH.dtype)
  return out, {"linear": s_lin, "local": s_loc}


def _check(o: BasedOptions, shape: Shape) -> None:
  local.FAMILY.check(local.LocalOptions(window=o.window_size), shape)


def _flops(o: BasedOptions, shape: Shape) -> dict:
  d, N, K = min(o.feature_dim, shape.head_dim), shape.num_heads, shape.num_kv_heads
  # Features: d(d+1)/2 products per query and key head; intra-chunk pair: z (2d), 1 + z + z²/2 (3).
  lin = kernelized_flops(shape, num_features(d), o.chunk_size, (N + K) * d * (d + 1) / 2, pair=2 * d + 3)
  win = local.FAMILY.flops_per_token(local.LocalOptions(window=o.window_size), shape)
  return {"ideal": lin["ideal"] + win["ideal"], "executed": lin["executed"] + win["executed"]}


FAMILY = Family(
    name="based", fn=based_attention, options=BasedOptions, init_state=_init_state, step=_step, flops=_flops,
    check=_check, description="Based: Taylor linear attention + sliding-window softmax (Arora et al. 2024)",
    context=lambda o, shape, shards, layout: local.check_window_split(o.window_size, shape, shards, layout,
                                                                      what="window_size"))
