"""Linear (kernelized) attention, chunkwise parallel, with a constant-size decoding state.

Katharopoulos et al. 2020, "Transformers are RNNs": replace exp(q·k) by a
feature-map kernel φ(q)·φ(k), so that

    out_t = φ(q_t)ᵀ Σ_s φ(k_s) v_sᵀ / φ(q_t)ᵀ Σ_s φ(k_s)      (s visible from t)

costs O(T·M·H) instead of O(T·S·H). This file holds the shared kernelized core
(`kernelized_attention`, reused by performer.py) and the linear family itself.

Causal (and segmented) attention is chunkwise parallel: the sequence is cut into
chunks of L = `chunk_size` positions; inside a chunk the exact quadratic masked
form φq φkᵀ ⊙ mask is used, and keys of earlier chunks enter through per-chunk
states (Σφ(k)vᵀ, Σφ(k)) carried by `lax.scan` over chunks. Memory
O(T·L·N + T·M·H·K/L); no per-token scan and no T×M×H tensor.
Inside the chunked code C counts chunks and T / S index positions within a chunk.

Segments (`segment_ids`, packed self-attention) are assumed to be contiguous runs
of equal id, aligned between queries and keys (as produced by packing): the state
carried into a chunk then holds exactly the keys of the run that reaches the chunk
boundary, and a query uses it only if it belongs to that run ("reset at segment
starts"). Non-contiguous ids (A B A) are not supported and give wrong results.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from efficient_attn.attention._common import (
    Dims, check_mask, check_qkv, compiled_when_eager, leading_batch_dims, split_segment_ids, stats_dtype)
from efficient_attn.attention.context import check_split
from efficient_attn.attention.registry import Family, Shape

# Tuned on CPU for causal fwd+bwd at T=8192, H=64 (64 and 128 tie; 128 keeps fewer carried
# states and suits matrix units better).
DEFAULT_CHUNK_SIZE = 128

FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
}

# Running key stabiliser before any key was seen (Performer decoding); finite so
# that m_old - m_new never becomes inf - inf.
NO_KEY_MAX = -1e30


class Prepared(NamedTuple):
  """Validated inputs of a kernelized family; key/value in float32 (float64 for float64 inputs), maybe
  expanded to N heads. value may have its own head dim Hv."""
  dims: Dims
  key_BSKH: jax.Array
  value_BSKH: jax.Array
  key_mask_BSK: jax.Array | None  # bool [B, S, K or 1]; True = key may be attended
  segment_ids: tuple[jax.Array, jax.Array] | None
  chunk_size: int


def prepare_kernelized(query, key, value, bias, mask, segment_ids, chunk_size, fn: str) -> Prepared:
  """Trace-time checks shared by linear and Performer attention.

  The kernel trick factorises over keys, so only masks that do not depend on the
  query position can be expressed: a key mask broadcastable to [B, N, 1, S], or
  a key-padding mask [B, S] (read as [B, 1, 1, S]). A per-query-head mask with GQA expands key/value to N heads (correct, costlier).
  """
  dims = check_qkv(query, key, value, fn, value_head_dim=True)
  if bias is not None:
    raise ValueError(
        f"{fn}: `bias` is not supported (got shape {list(jnp.shape(bias))}); an additive logit bias cannot be"
        " factorised into φ(q)·φ(k); use softmax attention or pass bias=None.")
  if mask is not None and jnp.ndim(mask) == 2 and jnp.shape(mask) == (dims.B, dims.S):
    mask = jnp.asarray(mask)[:, None, None, :]  # [B, S]: a key-padding mask (a [T, S] mask is never valid here)
  mask = check_mask(mask, dims, fn)
  key_mask = None
  if mask is not None:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[2] != 1:
      raise ValueError(
          f"{fn}: `mask` of shape {list(mask.shape)} varies over the query axis T={dims.T}; kernelized attention"
          " only supports key masks broadcastable to [B, N, 1, S] (use is_causal / segment_ids for the rest).")
    key_mask = jnp.broadcast_to(mask[:, :, 0, :], (dims.B, mask.shape[1], dims.S)).transpose(0, 2, 1)
  ids = split_segment_ids(segment_ids, dims, fn)
  if ids is not None and dims.T != dims.S:
    raise ValueError(
        f"{fn}: `segment_ids` needs T == S (packed self-attention), got T={dims.T}, S={dims.S}.")
  chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
  if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk <= 0:
    raise ValueError(f"{fn}: `chunk_size` must be a positive integer or None (default {DEFAULT_CHUNK_SIZE}), got {chunk!r}.")
  acc = stats_dtype(jnp.result_type(query, key, value))
  key, value = jnp.asarray(key, acc), jnp.asarray(value, acc)
  if key_mask is not None and key_mask.shape[2] != 1 and dims.K != dims.N:
    key, value = jnp.repeat(key, dims.G, axis=2), jnp.repeat(value, dims.G, axis=2)
  return Prepared(dims, key, value, key_mask, ids, int(chunk))


@jax.custom_vjp
def _normalise(num, den):
  """num / den[..., None], exactly 0 where nothing (or a zero total weight) is visible.

  Hand-written backward: ∂den = −Σ_h ∂out_h out_h / den as a contraction (einsum); the
  multiply-then-reduce autodiff writes for it ran ~15% of linear attention's fwd+bwd on XLA:CPU
  (jax 0.10's YNN reduce fusions)."""
  ok = den > 0
  return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)


def _normalise_fwd(num, den):
  out = _normalise(num, den)
  return out, (out, den)


def _normalise_bwd(res, g):
  out, den = res
  ok = den > 0
  inv = jnp.where(ok, 1.0 / jnp.where(ok, den, 1.0), 0.0)
  return g * inv[..., None], -jnp.einsum("...h,...h->...", g, out) * inv


_normalise.defvjp(_normalise_fwd, _normalise_bwd)


def _carry_in(phi_k_BCSKM, v_BCSKH, kv_ids_BCS, m_BCSK=None):
  """State (Σφ(k)vᵀ, Σφ(k)) of the keys before each chunk that a query of the chunk may see.

  Without segments: all keys of earlier chunks. With segments: only the run of
  equal id that reaches the chunk's start; a chunk whose last id differs from the
  previous chunk's restarts the running state. Per-chunk sums are one parallel
  einsum; only the tiny [B, K, M, H] state goes through `lax.scan` over chunks.
  With a running key stabiliser m (see `kernelized_attention`), key s enters the state
  of a chunk ending at e weighted by exp(m_s − m_e) ≤ 1, and a carried state is rescaled
  by exp(m_e − m_e') when it moves on to the next chunk end e'.
  Returns kv_in [B, C, K, M, H], z_in [B, C, K, M], the id of that run [B, C] (or None)
  and the stabiliser the carried state is relative to [B, C, K] (or None).
  """
  carry_id_BC = None
  keep_BC = jnp.ones(phi_k_BCSKM.shape[:2], phi_k_BCSKM.dtype)
  in_run_BCS = None
  if kv_ids_BCS is not None:
    last_BC = kv_ids_BCS[:, :, -1]
    carry_id_BC = jnp.concatenate([last_BC[:, :1], last_BC[:, :-1]], axis=1)
    keep_BC = (last_BC == carry_id_BC).astype(phi_k_BCSKM.dtype)
    in_run_BCS = kv_ids_BCS == last_BC[:, :, None]
    phi_k_BCSKM = jnp.where(in_run_BCS[..., None, None], phi_k_BCSKM, 0.0)
  if m_BCSK is None:
    kv_BCKMH = jnp.einsum("bcskm,bcskh->bckmh", phi_k_BCSKM, v_BCSKH)
    z_BCKM = phi_k_BCSKM.sum(axis=2)

    def step(state, chunk):
      kv_BKMH, z_BKM = state
      keep_B, local_kv_BKMH, local_z_BKM = chunk
      new = (kv_BKMH * keep_B[:, None, None, None] + local_kv_BKMH, z_BKM * keep_B[:, None, None] + local_z_BKM)
      return new, state

    first = lambda x: jnp.moveaxis(x, 1, 0)
    init = (jnp.zeros_like(kv_BCKMH[:, 0]), jnp.zeros_like(z_BCKM[:, 0]))
    _, (kv_in, z_in) = jax.lax.scan(step, init, (first(keep_BC), first(kv_BCKMH), first(z_BCKM)))
    return jnp.moveaxis(kv_in, 0, 1), jnp.moveaxis(z_in, 0, 1), carry_id_BC, None

  m_end_BCK = m_BCSK[:, :, -1]
  rel_BCSK = m_BCSK - m_end_BCK[:, :, None]
  if in_run_BCS is not None:  # keys outside the run reaching the chunk end are zero: no exp of a reset max
    rel_BCSK = jnp.where(in_run_BCS[..., None], rel_BCSK, -jnp.inf)
  phi_k_BCSKM = phi_k_BCSKM * jnp.exp(rel_BCSK)[..., None]
  kv_BCKMH = jnp.einsum("bcskm,bcskh->bckmh", phi_k_BCSKM, v_BCSKH)
  z_BCKM = phi_k_BCSKM.sum(axis=2)

  def step_stab(state, chunk):
    kv_BKMH, z_BKM, m_BK = state
    keep_B, m_end_BK, local_kv_BKMH, local_z_BKM = chunk
    # keep = 0 (a new run) drops the state before exp can see a reset max; else m_end >= m.
    decay_BK = jnp.where(keep_B[:, None] > 0, jnp.exp(jnp.minimum(m_BK - m_end_BK, 0.0)), 0.0)
    new = (kv_BKMH * decay_BK[..., None, None] + local_kv_BKMH, z_BKM * decay_BK[..., None] + local_z_BKM,
           m_end_BK)
    return new, state

  first = lambda x: jnp.moveaxis(x, 1, 0)
  init = (jnp.zeros_like(kv_BCKMH[:, 0]), jnp.zeros_like(z_BCKM[:, 0]), jnp.full_like(m_end_BCK[:, 0], NO_KEY_MAX))
  _, (kv_in, z_in, m_in) = jax.lax.scan(step_stab, init, (first(keep_BC), first(m_end_BCK), first(kv_BCKMH),
                                                          first(z_BCKM)))
  return jnp.moveaxis(kv_in, 0, 1), jnp.moveaxis(z_in, 0, 1), carry_id_BC, jnp.moveaxis(m_in, 0, 1)


def _add_carry(num, den, phi_q_BCTKGM, kv_BCKMH, z_BCKM, use_BCT, m_in_BCK=None, m_BCTK=None):
  if m_in_BCK is not None:  # the carried state is relative to m_in; query t reads it at exp(m_in − m_t) <= 1
    rel_BCTK = m_in_BCK[:, :, None] - m_BCTK
    if use_BCT is not None:
      rel_BCTK = jnp.where(use_BCT[..., None], rel_BCTK, -jnp.inf)
    phi_q_BCTKGM = phi_q_BCTKGM * jnp.exp(jnp.minimum(rel_BCTK, 0.0))[..., None, None]
  elif use_BCT is not None:
    phi_q_BCTKGM = phi_q_BCTKGM * use_BCT[..., None, None, None].astype(phi_q_BCTKGM.dtype)
  num = num + jnp.einsum("bctkgm,bckmh->bctkgh", phi_q_BCTKGM, kv_BCKMH)
  den = den + jnp.einsum("bctkgm,bckm->bctkg", phi_q_BCTKGM, z_BCKM)
  return num, den


def _chunked(phi_q_BCTKGM, phi_k_BCSKM, v_BCSKH, ids, is_causal, m_BCSK=None, a_BCKGTS=None):
  """Numerator [B,C,T,K,G,H] and denominator [B,C,T,K,G] of chunked kernelized attention.

  a_BCKGTS: the intra-chunk weights φq·φk if the caller has a cheaper exact form (Based's
  Taylor kernel from the raw dot product), finite, with masked / padded keys already zero."""
  L = phi_q_BCTKGM.shape[2]
  vis_BCTS = jnp.ones((1, 1, L, L), bool)
  if is_causal:
    vis_BCTS = jnp.tril(vis_BCTS)
  if ids is not None:
    q_ids_BCT, kv_ids_BCS = ids
    vis_BCTS = vis_BCTS & (q_ids_BCT[:, :, :, None] == kv_ids_BCS[:, :, None, :])
  # Exact quadratic form inside each chunk.
  given = a_BCKGTS is not None
  if not given:
    a_BCKGTS = jnp.einsum("bctkgm,bcskm->bckgts", phi_q_BCTKGM, phi_k_BCSKM)
  if m_BCSK is not None:  # weight exp(m_s − m_t) <= 1 for visible pairs; masked before exp (no inf · 0)
    rel_BCKTS = jnp.moveaxis(m_BCSK, -1, 2)[:, :, :, None, :] - jnp.moveaxis(m_BCSK, -1, 2)[:, :, :, :, None]
    rel_BCKTS = jnp.where(vis_BCTS[:, :, None], rel_BCKTS, -jnp.inf)
    a_BCKGTS = a_BCKGTS * jnp.exp(jnp.minimum(rel_BCKTS, 0.0))[:, :, :, None]
  if given:  # finite weights: a float mask (XLA:CPU's select is ~3x slower than a multiply on [.., L, L])
    a_BCKGTS = a_BCKGTS * vis_BCTS[:, :, None, None].astype(a_BCKGTS.dtype)
  else:
    a_BCKGTS = jnp.where(vis_BCTS[:, :, None, None], a_BCKGTS, 0.0)
  num = jnp.einsum("bckgts,bcskh->bctkgh", a_BCKGTS, v_BCSKH)
  den = jnp.moveaxis(a_BCKGTS.sum(-1), -1, 2)
  # Keys of earlier chunks (and, non-causal, of later chunks) through carried states.
  kv_ids_BCS = None if ids is None else ids[1]
  kv, z, carry_id, m_in = _carry_in(phi_k_BCSKM, v_BCSKH, kv_ids_BCS, m_BCSK)
  use = None if ids is None else ids[0] == carry_id[:, :, None]
  num, den = _add_carry(num, den, phi_q_BCTKGM, kv, z, use, m_in, m_BCSK)
  if not is_causal:  # only reached with segments: the same pass from the right
    flip = lambda x: None if x is None else jnp.flip(x, axis=(1, 2))
    kv, z, carry_id, _ = _carry_in(flip(phi_k_BCSKM), flip(v_BCSKH), flip(kv_ids_BCS))
    kv, z, carry_id = jnp.flip(kv, 1), jnp.flip(z, 1), jnp.flip(carry_id, 1)
    num, den = _add_carry(num, den, phi_q_BCTKGM, kv, z, ids[0] == carry_id[:, :, None])
  return num, den


def kernelized_attention(phi_q_BTNM, phi_k_BSKM, value_BSKH, *, is_causal=False, key_mask_BSK=None,
                         segment_ids=None, chunk_size=DEFAULT_CHUNK_SIZE, key_max_BSK=None, intra_weights=None):
  """Masked kernel attention from features: Σ vis·(φq·φk) v / Σ vis·(φq·φk), [B, T, N, Hv].

  Computed in float32, or float64 for float64 inputs; value [B, S, K, Hv] may have its own head dim.

  The shared core of linear and Performer attention. `key_mask_BSK` (bool
  [B, S, K or 1]) removes keys from numerator and denominator; `segment_ids` is
  (q_ids [B, T], kv_ids [B, S]) with T == S, contiguous runs. Non-causal without
  segments: O(T·M·H) via the global state Σφ(k)vᵀ. Otherwise chunkwise parallel
  (see the module docstring); T and S are padded to a multiple of `chunk_size`
  with masked keys. Rows that see nothing (zero denominator) are 0.

  key_max_BSK (causal only): a running key stabiliser m_s [B, S, K], non-decreasing along
  each segment, already divided out of φk_s (φk_s ∝ exp(· − m_s)). Query t then weights
  key s <= t by exp(m_s − m_t) <= 1, so every feature is relative to the keys t has seen:
  output t depends on keys <= t only (the Performer's causal stabiliser; decoding
  rescales its state the same way).

  intra_weights (chunked path only): a callable `chunks -> a [B, C, K, G, L, L]` giving the
  exact φq·φk inside each chunk more cheaply than from the features (e.g. Based's Taylor
  kernel, 1 + z + z²/2 from the raw dot product z); `chunks(x)` pads [B, T, ...] to whole
  chunks and returns [B, C, L, ...]. Masked and padded keys are zeroed here.
  """
  return _normalise(*kernelized_sums(
      phi_q_BTNM, phi_k_BSKM, value_BSKH, is_causal=is_causal, key_mask_BSK=key_mask_BSK, segment_ids=segment_ids,
      chunk_size=chunk_size, key_max_BSK=key_max_BSK, intra_weights=intra_weights))


def kernelized_sums(phi_q_BTNM, phi_k_BSKM, value_BSKH, *, is_causal=False, key_mask_BSK=None, segment_ids=None,
                    chunk_size=DEFAULT_CHUNK_SIZE, key_max_BSK=None, intra_weights=None):
  """The numerator Σ vis·(φq·φk) v [B, T, N, Hv] and denominator Σ vis·(φq·φk) [B, T, N] of
  `kernelized_attention` (same arguments), before the division: what a caller adds more keys to (the
  state of earlier shards under context parallelism) before normalising."""
  B, T, N, M = phi_q_BTNM.shape
  _, S, K, _ = phi_k_BSKM.shape
  H = value_BSKH.shape[-1]
  acc = stats_dtype(jnp.result_type(phi_q_BTNM, phi_k_BSKM, value_BSKH))
  phi_q = phi_q_BTNM.astype(acc).reshape(B, T, K, N // K, M)
  phi_k, v = phi_k_BSKM.astype(acc), value_BSKH.astype(acc)
  if key_max_BSK is not None and not is_causal:
    raise ValueError("kernelized_attention: `key_max_BSK` (a running stabiliser) is only meaningful with is_causal.")
  if key_mask_BSK is not None:
    phi_k = jnp.where(key_mask_BSK[..., None], phi_k, 0.0)
  if not is_causal and segment_ids is None:
    kv_BKMH = jnp.einsum("bskm,bskh->bkmh", phi_k, v)
    num = jnp.einsum("btkgm,bkmh->btkgh", phi_q, kv_BKMH)
    den = jnp.einsum("btkgm,bkm->btkg", phi_q, phi_k.sum(axis=1))
    return num.reshape(B, T, N, H), den.reshape(B, T, N)
  L = min(chunk_size, max(T, S))
  P = -(-max(T, S) // L) * L
  # Padded keys have zero features (invisible); padded queries are sliced off.
  pad = lambda x, n, **kw: jnp.pad(x, [(0, 0), (0, P - n)] + [(0, 0)] * (x.ndim - 2), **kw)
  chunks = lambda x: x.reshape(B, P // L, L, *x.shape[2:])
  ids = None
  if segment_ids is not None:
    ids = tuple(chunks(pad(x, T, mode="edge")) for x in segment_ids)
  m = None
  if key_max_BSK is not None:
    m = chunks(pad(jax.lax.stop_gradient(key_max_BSK.astype(acc)), S, mode="edge"))
    if m.shape[-1] != K:
      m = jnp.broadcast_to(m, (*m.shape[:-1], K))
  a = None
  if intra_weights is not None:
    if key_max_BSK is not None:
      raise ValueError("kernelized_attention: `intra_weights` does not take a running stabiliser `key_max_BSK`.")
    a = intra_weights(lambda x: chunks(pad(x, x.shape[1])))
    if P > S or key_mask_BSK is not None:  # (nothing to zero when every key is real and unmasked)
      keep_BS1 = jnp.arange(P)[None, :, None] < S
      if key_mask_BSK is not None:
        keep_BS1 = keep_BS1 & pad(key_mask_BSK, S)
      keep_BCSK = chunks(jnp.broadcast_to(keep_BS1, (B, P, K)))
      a = a * jnp.moveaxis(keep_BCSK, 3, 2)[:, :, :, None, None, :].astype(acc)
  num, den = _chunked(chunks(pad(phi_q, T)), chunks(pad(phi_k, S)), chunks(pad(v, S)), ids, is_causal, m, a)
  return num.reshape(B, P, N, H)[:, :T], den.reshape(B, P, N)[:, :T]


def _context_parallel(phi_q_BTNM, phi_k_BTKM, p: Prepared, is_causal: bool, axis_name: str, layout: str):
  """Linear attention on one shard of a sequence split over `axis_name`: Σ φq·φk [v, 1] is decay-free gated
  linear attention of the features (whose state passing is context parallel), split into numerator and
  denominator and normalised. Its bidirectional form counts the current token in both directions; the
  diagonal term is taken off once."""
  from efficient_attn.attention.gated import gated_linear_attention

  d = p.dims
  phi_k = phi_k_BTKM if p.key_mask_BSK is None else jnp.where(p.key_mask_BSK[..., None], phi_k_BTKM, 0.0)
  v = jnp.concatenate([p.value_BSKH, jnp.ones(p.value_BSKH.shape[:-1] + (1,), p.value_BSKH.dtype)], axis=-1)
  ids = None if p.segment_ids is None else p.segment_ids[0]
  no_decay = jnp.zeros(phi_k.shape[:3], phi_k.dtype)
  both = gated_linear_attention(phi_q_BTNM.astype(phi_k.dtype), phi_k, v, no_decay, is_causal=is_causal,
                                segment_ids=ids, scale=1.0, chunk_size=p.chunk_size, context_axis=axis_name,
                                context_layout=layout)                       # [B, T, N, Hv + 1]
  if not is_causal:
    q = phi_q_BTNM.astype(phi_k.dtype).reshape(d.B, d.T, d.K, d.G, -1)
    diag = jnp.einsum("btkgm,btkm,btkv->btkgv", q, phi_k, v).reshape(both.shape)
    both = both - diag
  return _normalise(both[..., :-1], both[..., -1])


def _feature_map(feature_map, fn: str):
  if callable(feature_map):
    return feature_map
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"{fn}: unknown `feature_map` {feature_map!r}; valid ones are {sorted(FEATURE_MAPS)} or a callable.")
  return FEATURE_MAPS[feature_map]


def _scaled(x, scale):
  x = jnp.asarray(x)
  x = x.astype(stats_dtype(x.dtype))
  return x if scale is None else x * scale


@compiled_when_eager()
@leading_batch_dims(query_mask=False)
def linear_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None, scale=None,
                     feature_map="elu", chunk_size=None, context_axis=None, context_layout="zigzag"):
  """Linear attention (Katharopoulos et al. 2020): φ(q)(Σφ(k)vᵀ) / φ(q)Σφ(k).

  query [B, T, N, H], key [B, S, K, H], value [B, S, K, Hv] -> [B, T, N, Hv] in query's
  dtype (features and sums in float32, float64 for float64 inputs); any number of leading
  batch dims [..., T, N, H] is accepted in place of B, and jax.nn's `query_seq_lengths` /
  `key_value_seq_lengths` (int [B]: rows t >= q length are 0, keys s >= kv length unseen).
  `feature_map`: "elu" (elu(x) + 1, the paper's),
  "relu", or a callable applied elementwise. φ sees the *unscaled* query and key:
  `scale=None` means no scaling here (not H^-½); an explicit `scale` multiplies
  the query before φ. `mask` must be a key mask (broadcastable to [B, N, 1, S]);
  `bias` is refused. Cost: non-causal O(T·H²); causal / segmented chunkwise
  parallel, O(T·L·H + T·H²) time and O(T·L·N + T·H²·K/L) memory, L = `chunk_size`
  (default DEFAULT_CHUNK_SIZE; T need not divide it).

  Context parallelism (`context_axis`, `context_layout`: as in `gated_linear_attention`): the
  numerator and denominator are the state-passing recurrence with no decay (one all_gather of each
  piece's Σφ(k)[v, 1]ᵀ, whatever T), normalised after.
  """
  fn = "linear_attention"
  phi = _feature_map(feature_map, fn)
  p = prepare_kernelized(query, key, value, bias, mask, segment_ids, chunk_size, fn)
  if context_axis is not None:
    out = _context_parallel(phi(_scaled(query, scale)), phi(p.key_BSKH), p, is_causal, context_axis, context_layout)
    return out.astype(query.dtype)
  out = kernelized_attention(phi(_scaled(query, scale)), phi(p.key_BSKH), p.value_BSKH, is_causal=is_causal,
                             key_mask_BSK=p.key_mask_BSK, segment_ids=p.segment_ids, chunk_size=p.chunk_size)
  return out.astype(query.dtype)


# ----------------------------------------------------------------------------- decoding


def linear_init_state(batch: int, num_kv_heads: int, feature_dim: int, head_dim: int, dtype=jnp.float32):
  """Empty recurrent state of linear / Performer decoding (constant size in T).

  {"kv": Σφ(k)vᵀ [B, K, M, Hv], "z": Σφ(k) [B, K, M], "m": running key-feature
  stabiliser [B, K] (Performer's softmax kernel; linear leaves it alone)}; `head_dim` is the
  value's head dim Hv. float32, or float64 for dtype float64; decoding steps compute in it.
  """
  acc = stats_dtype(dtype)
  return {
      "kv": jnp.zeros((batch, num_kv_heads, feature_dim, head_dim), acc),
      "z": jnp.zeros((batch, num_kv_heads, feature_dim), acc),
      "m": jnp.full((batch, num_kv_heads), NO_KEY_MAX, acc),
  }


def check_step(state, query, key, value, fn: str) -> Dims:
  """Shapes of one decoding step: T == S == 1 and a state matching K and the value head dim Hv."""
  dims = check_qkv(query, key, value, fn, value_head_dim=True)
  if dims.T != 1 or dims.S != 1:
    raise ValueError(f"{fn}: decoding takes one token, query [B, 1, N, H] and key/value [B, 1, K, H]; got T={dims.T}, S={dims.S}.")
  B, K, _, Hv = state["kv"].shape
  if (B, K, Hv) != (dims.B, dims.K, value.shape[-1]):
    raise ValueError(f"{fn}: state is for (B, K, Hv)={(B, K, Hv)} but the inputs have"
                     f" {(dims.B, dims.K, value.shape[-1])}.")
  return dims


def recurrent_step(state, phi_q_BNM, phi_k_BKM, value_BKH, m_BK=None):
  """Adds one key to (Σφ(k)vᵀ, Σφ(k)) and reads it with one query; returns (out [B, N, Hv], state).

  Computed in the state's dtype (float32, or float64 from `linear_init_state(..., dtype)`).
  """
  B, N, M = phi_q_BNM.shape
  K = phi_k_BKM.shape[1]
  kv, z = state["kv"], state["z"]
  if kv.shape[2] != M:
    raise ValueError(f"decoding: state has M={kv.shape[2]} features but the feature map gives M={M}; re-create the state.")
  phi_k_BKM = phi_k_BKM.astype(kv.dtype)
  kv = kv + jnp.einsum("bkm,bkh->bkmh", phi_k_BKM, value_BKH.astype(kv.dtype))
  z = z + phi_k_BKM
  phi_q = phi_q_BNM.astype(kv.dtype).reshape(B, K, N // K, M)
  num = jnp.einsum("bkgm,bkmh->bkgh", phi_q, kv)
  den = jnp.einsum("bkgm,bkm->bkg", phi_q, z)
  new_state = {"kv": kv, "z": z, "m": state["m"] if m_BK is None else m_BK.astype(state["m"].dtype)}
  return _normalise(num, den).reshape(B, N, -1), new_state


def linear_step(state, query_B1NH, key_B1KH, value_B1KH, *, feature_map="elu", scale=None, **ignored):
  """One causal decoding step of `linear_attention`: returns (out [B, 1, N, Hv], new state).

  Token by token it equals the causal parallel forward (to float32 rounding).
  Other options of the parallel call (chunk_size, is_causal, ...) are ignored.
  """
  del ignored
  fn = "linear_step"
  phi = _feature_map(feature_map, fn)
  check_step(state, query_B1NH, key_B1KH, value_B1KH, fn)
  phi_q = phi(_scaled(query_B1NH[:, 0], scale))
  phi_k = phi(_scaled(key_B1KH[:, 0], None))
  out, state = recurrent_step(state, phi_q, phi_k, value_B1KH[:, 0])
  return out[:, None].astype(query_B1NH.dtype), state


# ----------------------------------------------------------------------------- the family record


@dataclasses.dataclass(frozen=True)
class LinearOptions:
  """feature_map: "elu" (elu + 1, the paper's) | "relu". chunk_size: the causal / segmented chunk
  (None = DEFAULT_CHUNK_SIZE)."""
  feature_map: str = "elu"
  chunk_size: int | None = None

  def __post_init__(self):
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(f"feature_map={self.feature_map!r} is not one of {sorted(FEATURE_MAPS)}.")
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive integer or None.")


def kernelized_flops(shape: Shape, M: int, chunk_size: int | None, features: float, pair: float | None = None) -> dict:
  """FLOPs per token of the kernelized core with M features (+ `features` for computing them).

  A state update 2·K·M·H (+ K·M for Σφ(k)) and a read-out 2·N·M·(H+1) per token; causal is
  chunkwise: the exact L x L form inside a chunk, its causal half ideal, all of it executed.
  `pair`: FLOPs of one intra-chunk weight φq·φk per query head (default 2·M).
  """
  T, _, N, K, H, causal = shape
  update = K * M * (2 * H + 1)   # Σφ(k)vᵀ and Σφ(k)
  readout = 2 * N * M * (H + 1)  # φ(q)ᵀ(Σφ(k)vᵀ) and φ(q)ᵀΣφ(k)
  if not causal:
    return {"ideal": features + update + readout, "executed": features + update + readout}
  L = min(chunk_size or DEFAULT_CHUNK_SIZE, T)
  padded = -(-T // L) * L
  intra = N * ((2 * M if pair is None else pair) + 2 * H + 1)  # per (query, key) pair inside a chunk: φq·φk, a·v, Σa
  r = T % L
  pairs = ((T // L) * L * (L + 1) / 2 + r * (r + 1) / 2) / T  # causal half, per real token
  return {"ideal": features + update + readout + intra * pairs,
          "executed": features + (update + readout + intra * L) * padded / T}


def _flops(o: LinearOptions, shape: Shape) -> dict:
  return kernelized_flops(shape, shape.head_dim, o.chunk_size, 0)  # elementwise φ keeps M = H and is free


def _init_state(batch, num_kv_heads, head_dim, *, dtype=None, value_head_dim=None, **_):
  """elu / relu keep M = H features; `value_head_dim` (default H) sizes Σφ(k)vᵀ."""
  return linear_init_state(batch, num_kv_heads, head_dim, value_head_dim or head_dim, dtype or jnp.float32)


FAMILY = Family(
    name="linear", fn=linear_attention, options=LinearOptions, init_state=_init_state, step=linear_step,
    flops=_flops, context=check_split,
    description="linear (kernelized) attention, chunkwise parallel (Katharopoulos et al. 2020)")
