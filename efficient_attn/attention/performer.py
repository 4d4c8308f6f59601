"""Performer attention: FAVOR+ random features on the kernelized (linear) core.

Choromanski et al. 2021, "Rethinking Attention with Performers". With x' =
scale^½·x and W [M, H] a (block-orthogonal) Gaussian projection, the positive
random features

    φ(x) = exp(W x' − |x'|²/2) / √M

satisfy E[φ(q)·φ(k)] = exp(scale·q·k), so kernelized attention with them is an
unbiased-kernel estimate of softmax attention, in O(T·M·H) time. Causal, key
masks and segments behave exactly as in `linear_attention` (same core).

Stabilisers (they cancel in the ratio num / den): each query row subtracts its
own max over M; keys subtract a max per (batch, kv head) under `stop_gradient` —
non-causal: over all *valid* keys; causal: a running max over the keys seen so far
(per segment), with the weight of key s at query t rescaled by exp(m_s − m_t), so no
future key changes an output — and get a 1e-12 floor (`FEATURE_EPS`) so that keys whose
features underflow float32 (large norms) cannot zero the denominator. Decoding keeps the
same running key max and rescales its state when the max grows, like online softmax.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.attention import context
from efficient_attn.attention._common import compiled_when_eager, leading_batch_dims, resolve_scale, stats_dtype
from efficient_attn.attention.linear import (NO_KEY_MAX, _context_parallel, _normalise, check_step,
                                             kernelized_attention, kernelized_sums, linear_init_state,
                                             prepare_kernelized, recurrent_step)
from efficient_attn.attention.registry import Family, Shape

KERNELS = ("softmax", "relu")
RELU_EPS = 1e-3  # keeps the relu-kernel denominator positive (as in the reference FAVOR implementation)
# Added to every valid key's softmax-kernel features. With large-norm keys, exp(W k' - |k'|²/2 - max) spans far
# more than float32's range and underflows to 0 for most keys; without a floor a query whose visible keys all
# underflowed gets den = 0 (output 0) or a denormal den whose 1/den² overflows the gradient into NaN. The
# floor bounds den below by EPS·(visible keys)/M (so 1/den² stays finite in float32) and biases ordinary inputs
# by ~1e-12 relative (FAVOR+ uses 1e-6, which shows in float32 comparisons with the exact kernel).
FEATURE_EPS = 1e-12


def performer_projection(rng, num_features: int, head_dim: int, orthogonal: bool = True) -> jax.Array:
  """Random projection W [M, H] float32 for FAVOR+; a new `rng` is a redraw.

  orthogonal=True: ceil(M/H) independent H×H Haar-orthogonal blocks (QR of a
  Gaussian matrix, signs corrected by diag(R)) stacked and cut to M rows; each row
  is rescaled to a norm drawn from chi(H) (the norm of a Gaussian H-vector), so
  rows are marginally Gaussian but orthogonal within a block (lower variance).
  orthogonal=False: iid N(0, 1) entries.
  """
  for name, v in (("num_features", num_features), ("head_dim", head_dim)):
    if not isinstance(v, int) or v <= 0:
      raise ValueError(f"performer_projection: `{name}` must be a positive integer, got {v!r}.")
  return _draw_projection(rng, num_features, head_dim, bool(orthogonal))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_projection(rng, M: int, H: int, orthogonal: bool):
  if not orthogonal:
    return jax.random.normal(rng, (M, H), jnp.float32)
  rng_q, rng_norm = jax.random.split(rng)
  gauss = jax.random.normal(rng_q, (-(-M // H), H, H), jnp.float32)
  q, r = jnp.linalg.qr(gauss)
  signs = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
  blocks = jnp.swapaxes(q * signs[:, None, :], -1, -2)  # rows = orthonormal columns of Q
  norms_M = jnp.linalg.norm(jax.random.normal(rng_norm, (M, H), jnp.float32), axis=-1)
  return blocks.reshape(-1, H)[:M] * norms_M[:, None]


def _check_options(projection, kernel, scale, H, fn):
  if kernel not in KERNELS:
    raise ValueError(f"{fn}: unknown `kernel` {kernel!r}; valid kernels are {list(KERNELS)}.")
  if projection is None:
    raise ValueError(f"{fn}: `projection` is required; pass projection=performer_projection(rng, num_features, {H}).")
  if getattr(projection, "ndim", None) != 2 or projection.shape[1] != H:
    raise ValueError(
        f"{fn}: `projection` must have shape [M, H] with H={H}, got {list(getattr(projection, 'shape', []))}.")
  scale = resolve_scale(scale, H)
  if not isinstance(scale, jax.Array) and scale <= 0:
    raise ValueError(f"{fn}: `scale` must be positive (features use scale ** 0.5), got {scale}.")
  return jnp.asarray(projection), scale


def _scaled(x_XH, projection_MH, scale):
  """(x' = scale^½ x, W) in float32, or float64 for float64 inputs."""
  x = jnp.asarray(x_XH)
  acc = stats_dtype(x.dtype)
  return x.astype(acc) * jnp.sqrt(jnp.asarray(scale, acc)), jnp.asarray(projection_MH, acc)


def _logits(x_XH, projection_MH, scale):
  """Exponent W x' − |x'|²/2 of the softmax-kernel features (x' = scale^½ x), [..., M] float32 (or float64)."""
  x, w_MH = _scaled(x_XH, projection_MH, scale)
  return jnp.einsum("...h,mh->...m", x, w_MH) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def _relu_features(x_XH, projection_MH, scale):
  x, w_MH = _scaled(x_XH, projection_MH, scale)
  return (jax.nn.relu(jnp.einsum("...h,mh->...m", x, w_MH)) + RELU_EPS) / jnp.sqrt(jnp.asarray(w_MH.shape[0], x.dtype))


def _query_features(q_XH, projection_MH, scale, kernel):
  """φ(q) [..., M]; the per-row stabiliser cancels between numerator and denominator."""
  if kernel == "relu":
    return _relu_features(q_XH, projection_MH, scale)
  logits = _logits(q_XH, projection_MH, scale)
  logits = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  return jnp.exp(logits) / jnp.sqrt(jnp.asarray(projection_MH.shape[0], logits.dtype))


@compiled_when_eager()
@leading_batch_dims(query_mask=False)
def performer_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                        projection=None, kernel="softmax", chunk_size=None, context_axis=None,
                        context_layout="zigzag"):
  """FAVOR+ attention (Choromanski et al. 2021) on the linear-attention core.

  query [B, T, N, H], key [B, S, K, H], value [B, S, K, Hv] -> [B, T, N, Hv] in query's dtype
  (features and sums in float32, float64 for float64 inputs); any number of leading batch
  dims [..., T, N, H] is accepted in place of B, and jax.nn's `query_seq_lengths` /
  `key_value_seq_lengths` (int [B]: rows t >= q length are 0, keys s >= kv length unseen).
  `projection` [M, H] from `performer_projection` (required). `kernel`:
  "softmax" (positive random features estimating exp(scale·q·k), scale default
  H^-½) or "relu" (φ(x) = relu(W x')/√M + eps). `mask` must be a key mask
  (broadcastable to [B, N, 1, S]); `bias` is refused. Cost O(T·M·H) time;
  causal / segmented chunkwise parallel with memory O(T·L·N + T·M·H·K/L).

  Causal: the key stabiliser is a running max over the keys each query has seen (reset at
  segment starts), so output t depends on keys <= t only — exactly what token-by-token
  decoding computes. Non-causal: one max over all valid keys.

  Context parallelism (`context_axis`, `context_layout`: as in `gated_linear_attention`; T == S):
  the stabiliser is the one-device value. Non-causal: a `pmax` of the shards' key maxima [B, K];
  relu, or softmax non-causal, then the linear core's state passing (`linear._context_parallel`).
  Causal softmax (`_causal_context`): one all_gather of each piece's running max [B, K] (+ its
  edge segment ids) gives every key's global running max, then one all_gather of each piece's
  end state Σφ(k)[v, 1]ᵀ [B, K, M, Hv + 1] at that max; both sizes are independent of T.
  """
  fn = "performer_attention"
  p = prepare_kernelized(query, key, value, bias, mask, segment_ids, chunk_size, fn)
  projection, scale = _check_options(projection, kernel, scale, p.dims.H, fn)
  if context_axis is not None:
    if p.dims.T != p.dims.S:
      raise ValueError(f"{fn}: context parallelism splits one sequence of queries and keys; it needs T == S, got"
                       f" T={p.dims.T}, S={p.dims.S}.")
    n = context.local_pieces(context_layout, p.dims.T, fn)
  phi_q = _query_features(query, projection, scale, kernel)
  key_max = None
  if kernel == "relu":
    phi_k = _relu_features(p.key_BSKH, projection, scale)
  else:
    logits_BSKM = _logits(p.key_BSKH, projection, scale)
    valid_BSK1 = True if p.key_mask_BSK is None else p.key_mask_BSK[..., None]
    masked = jnp.where(valid_BSK1, logits_BSKM, -jnp.inf)
    if is_causal and context_axis is not None:
      out = _causal_context(phi_q, masked, valid_BSK1, p, context_axis, context_layout, n)
      return out.astype(query.dtype)
    if is_causal:
      key_max = _running_max(masked.max(axis=-1), None if p.segment_ids is None else p.segment_ids[1])
      stab = key_max[..., None]
    else:
      stab = jax.lax.stop_gradient(jnp.max(masked, axis=(1, 3), keepdims=True))
      if context_axis is not None:
        stab = jax.lax.pmax(stab, context_axis)  # the max over every shard's keys: the one-device constant
      stab = jnp.where(jnp.isfinite(stab), stab, 0.0)
    phi_k = _key_features(masked, valid_BSK1, stab)
  if context_axis is not None:
    return _context_parallel(phi_q, phi_k, p, is_causal, context_axis, context_layout).astype(query.dtype)
  out = kernelized_attention(phi_q, phi_k, p.value_BSKH, is_causal=is_causal, key_mask_BSK=p.key_mask_BSK,
                             segment_ids=p.segment_ids, chunk_size=p.chunk_size, key_max_BSK=key_max)
  return out.astype(query.dtype)


def _key_features(masked_BSKM, valid_BSK1, stab):
  """Softmax-kernel key features (exp(logits − stab) + FEATURE_EPS) / √M; masked logits (−inf) give exactly 0.

  Invalid keys get exp(-inf) = 0 before the exponential, so no inf·0 in the gradient; only valid keys get
  the FEATURE_EPS floor."""
  floor = FEATURE_EPS if valid_BSK1 is True else jnp.where(valid_BSK1, FEATURE_EPS, 0.0)
  M = masked_BSKM.shape[-1]
  return (jnp.exp(masked_BSKM - stab) + floor) / jnp.sqrt(jnp.asarray(M, masked_BSKM.dtype))


def _segmented_max(a, b):
  """The associative combine of a running max that restarts: (reset, max) pairs, a reset in b discards a."""
  (reset_a, max_a), (reset_b, max_b) = a, b
  return reset_a | reset_b, jnp.where(reset_b, max_b, jnp.maximum(max_a, max_b))


def _running_max(x_BSK, kv_ids_BS=None):
  """m_s = max of x over keys <= s (of s's segment when ids are given), >= NO_KEY_MAX; no gradient.

  The causal key stabiliser: like decoding's running max, it never looks ahead.
  """
  x = jax.lax.stop_gradient(jnp.maximum(x_BSK, NO_KEY_MAX))
  if kv_ids_BS is None:
    return jax.lax.cummax(x, axis=1)
  start_BS = jnp.concatenate([jnp.ones_like(kv_ids_BS[:, :1], bool), kv_ids_BS[:, 1:] != kv_ids_BS[:, :-1]], 1)
  start = jnp.broadcast_to(start_BS[..., None], x.shape)
  return jax.lax.associative_scan(_segmented_max, (start, x), axis=1)[1]


# ----------------------------------------------------------------------------- context parallelism


def _causal_context(phi_q_BTNM, masked_BTKM, valid_BTK1, p, axis_name, layout: str, n: int):
  """Causal softmax-kernel Performer on one shard's n pieces of a sequence split over `axis_name`: [B, T, N, Hv].

  1. Each piece's running key max μ from its own start; `_incoming_max` (one all_gather of μ at each
     piece's end) gives m_in, the running max of the keys before the piece in its first document, so
     m_s = max(m_in, μ_s) in that document and μ_s after it: the one-device stabiliser, exactly.
  2. Features φk_s relative to m_s; the piece's own keys by the chunked core (`kernelized_sums`).
  3. The piece's end state U = Σ_s φk_s exp(m_s − m_end) [v_s, 1]ᵀ over its last document, and the
     transition exp(m_in − m_end) (0 when a document starts inside it), folded over earlier pieces by
     `context.incoming_state`; query t of the first document reads it at exp(m_in − m_t) <= 1.
  """
  d = p.dims
  piece = lambda x: None if x is None else context.to_pieces(context.varying(x, axis_name, like=masked_BTKM), n)  # noqa: E731
  ids = None if p.segment_ids is None else piece(p.segment_ids[1])
  key_mask = piece(p.key_mask_BSK)
  masked = piece(masked_BTKM)                                             # [Bn, T, K, M]
  mu_BTK = _running_max(masked.max(axis=-1), ids)
  m_in_BK = _incoming_max(mu_BTK[:, -1], ids, axis_name, layout)
  first_BT1 = True if ids is None else (ids == ids[:, :1])[..., None]   # the piece's first document
  last_BT1 = True if ids is None else (ids == ids[:, -1:])[..., None]   # the document reaching its end
  m_BTK = jnp.where(first_BT1, jnp.maximum(m_in_BK[:, None], mu_BTK), mu_BTK)
  phi_k = _key_features(masked, True if valid_BTK1 is True else key_mask[..., None], m_BTK[..., None])
  phi_q, v = piece(phi_q_BTNM), piece(p.value_BSKH)
  num, den = kernelized_sums(phi_q, phi_k, v, is_causal=True, key_mask_BSK=key_mask,
                             segment_ids=None if ids is None else (ids, ids), chunk_size=p.chunk_size,
                             key_max_BSK=m_BTK)
  m_end_BK = m_BTK[:, -1]
  v1 = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)         # [Bn, T, K, Hv + 1]: numerator, denominator
  to_end_BTK = jnp.exp(jnp.where(last_BT1, m_BTK - m_end_BK[:, None], -jnp.inf))
  end_BKMV = jnp.einsum("btkm,btk,btkv->bkmv", phi_k, to_end_BTK, v1)
  transition_BK = jnp.exp(m_in_BK - m_end_BK)
  if ids is not None:
    transition_BK = jnp.where(ids[:, :1] == ids[:, -1:], transition_BK, 0.0)
  s_in_BKMV = context.incoming_state(transition_BK[..., None], end_BKMV, axis_name, layout,
                                     ids=context.edges(ids))
  read_BTK = jnp.exp(jnp.where(first_BT1, m_in_BK[:, None] - m_BTK, -jnp.inf))
  Bn, T, K = m_BTK.shape  # K = N when a per-query-head key mask expanded the kv heads
  q = phi_q.astype(end_BKMV.dtype).reshape(Bn, T, K, -1, phi_q.shape[-1])
  carried = jnp.einsum("btkgm,btk,bkmv->btkgv", q, read_BTK, s_in_BKMV).reshape(Bn, T, d.N, -1)
  out = _normalise(num + carried[..., :-1], den + carried[..., -1])
  return context.from_pieces(out, n)


def _incoming_max(mu_end_BK, ids_BT, axis_name, layout: str):
  """Each local piece's incoming running key max [B·n, K]: the max over the keys of its first document that
  lie in earlier pieces (NO_KEY_MAX if none). mu_end_BK: each piece's running max at its end (from its own
  start); ids_BT: its segment ids or None. One all_gather of (μ_end, first id, last id) per piece
  (P·n·B·(K + 2) numbers), the pieces put in sequence order, a segmented prefix max (`_segmented_max`:
  a piece restarts the max when a document starts at or inside it)."""
  n = context.check_layout(layout, "performer_attention")
  Bn, K = mu_end_BK.shape
  B = Bn // n
  parts = [mu_end_BK]
  if ids_BT is not None:  # segment ids travel as floats (exact below 2^24 documents per row)
    parts.append(context.edges(ids_BT).astype(mu_end_BK.dtype))
  every = jax.lax.all_gather(jnp.concatenate(parts, axis=-1).reshape(B, n, -1), axis_name)  # [P, B, n, F]
  P = every.shape[0]
  order = context.piece_order(P, layout)
  every = jnp.moveaxis(every, 0, 1).reshape(B, P * n, -1)[:, np.argsort(order)]              # sequence order
  mu_BMK = every[..., :K]
  link_BM = jnp.zeros((B, P * n), bool).at[:, 1:].set(True)
  if ids_BT is not None:
    first, last = every[..., K].astype(jnp.int32), every[..., K + 1].astype(jnp.int32)
    link_BM = link_BM.at[:, 1:].set(first[:, 1:] == last[:, :-1])
    restart = ~link_BM | (first != last)
    upto_BMK = jax.lax.associative_scan(_segmented_max, (jnp.broadcast_to(restart[..., None], mu_BMK.shape), mu_BMK),
                                        axis=1)[1]
  else:
    upto_BMK = jax.lax.cummax(mu_BMK, axis=1)
  before_BMK = jnp.concatenate([jnp.full_like(mu_BMK[:, :1], NO_KEY_MAX), upto_BMK[:, :-1]], axis=1)
  m_in_BMK = jnp.where(link_BM[..., None], before_BMK, NO_KEY_MAX)
  mine = jnp.asarray(order.reshape(P, n))[jax.lax.axis_index(axis_name)]
  return jnp.take(m_in_BMK, mine, axis=1).reshape(Bn, K)


def performer_step(state, query_B1NH, key_B1KH, value_B1KH, *, projection=None, kernel="softmax", scale=None,
                   **ignored):
  """One causal decoding step of `performer_attention`: returns (out [B, 1, N, Hv], new state).

  `state` from `linear_init_state(B, K, M, Hv)`; computed in the state's dtype. For the softmax kernel the
  state carries a running key max "m" [B, K]; when it grows, (Σφ(k)vᵀ, Σφ(k)) are
  rescaled by exp(m_old − m_new). Equals the causal parallel forward token by
  token (to float32 rounding). Other options (chunk_size, ...) are ignored.
  """
  del ignored
  fn = "performer_step"
  dims = check_step(state, query_B1NH, key_B1KH, value_B1KH, fn)
  projection, scale = _check_options(projection, kernel, scale, dims.H, fn)
  M = projection.shape[0]
  phi_q = _query_features(query_B1NH[:, 0], projection, scale, kernel)
  if kernel == "relu":
    out, state = recurrent_step(state, phi_q, _relu_features(key_B1KH[:, 0], projection, scale), value_B1KH[:, 0])
    return out[:, None].astype(query_B1NH.dtype), state
  logits_BKM = _logits(key_B1KH[:, 0], projection, scale).astype(state["m"].dtype)
  m_new = jnp.maximum(state["m"], logits_BKM.max(axis=-1))
  rescale_BK = jnp.exp(state["m"] - m_new)
  state = {**state, "kv": state["kv"] * rescale_BK[..., None, None], "z": state["z"] * rescale_BK[..., None]}
  phi_k = (jnp.exp(logits_BKM - m_new[..., None]) + FEATURE_EPS) / jnp.sqrt(jnp.asarray(M, m_new.dtype))
  out, state = recurrent_step(state, phi_q, phi_k, value_B1KH[:, 0], m_BK=m_new)
  return out[:, None].astype(query_B1NH.dtype), state


# ----------------------------------------------------------------------------- the family record


@dataclasses.dataclass(frozen=True)
class PerformerOptions:
  """num_features: M random features. kernel: "softmax" (FAVOR+) | "relu". orthogonal: block-orthogonal
  projection rows. chunk_size: the causal / segmented chunk (None = the linear core's default)."""
  num_features: int = 128
  kernel: str = "softmax"
  orthogonal: bool = True
  chunk_size: int | None = None

  def __post_init__(self):
    if self.num_features < 1:
      raise ValueError(f"num_features={self.num_features} must be a positive integer.")
    if self.kernel not in KERNELS:
      raise ValueError(f"kernel={self.kernel!r} is not one of {list(KERNELS)}.")
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive integer or None.")


def _prepare(o: PerformerOptions, shape: Shape) -> dict:
  return {"kernel": o.kernel, "chunk_size": o.chunk_size}


def _buffers(rng, o: PerformerOptions, shape: Shape) -> dict:
  """The projection W [M, H]: a per-layer buffer, redrawn by drawing again with a new rng."""
  return {"projection": performer_projection(rng, o.num_features, shape.head_dim, o.orthogonal)}


def _flops(o: PerformerOptions, shape: Shape) -> dict:
  from efficient_attn.attention.linear import kernelized_flops

  T, _, N, K, H, causal = shape
  features = 2 * o.num_features * H * (N + K)  # W·x for queries and keys
  return kernelized_flops(shape, o.num_features, o.chunk_size, features)


def _init_state(batch, num_kv_heads, head_dim, *, projection=None, num_features=None, dtype=None,
                value_head_dim=None, **_):
  """Recurrent state sized by the projection's M (or `num_features`) and `value_head_dim` (default H)."""
  if projection is None and num_features is None:
    raise ValueError("init_decode_state('performer'): pass `projection=` (from performer_projection).")
  M = projection.shape[0] if projection is not None else num_features
  return linear_init_state(batch, num_kv_heads, M, value_head_dim or head_dim, dtype or jnp.float32)


FAMILY = Family(
    name="performer", fn=performer_attention, options=PerformerOptions, prepare=_prepare, buffers=_buffers,
    init_state=_init_state, step=performer_step, flops=_flops, context=context.check_split,
    description="FAVOR+ random-feature attention (Choromanski et al. 2021); recurrent decoding")
