"""Decay-gated linear attention, chunkwise parallel, with a constant-size decoding state.

One recurrence covers RetNet (Sun et al. 2023, fixed per-head decays), GLA (Yang et al.
2024, "Gated Linear Attention Transformers with Hardware-Efficient Training", per-channel
data-dependent gates) and Mamba-2 (Dao & Gu 2024, "Transformers are SSMs": the SSD scalar
decay per head). Per kv head, with state S_t [H, Hv] (key dim x value dim):

    S_t = exp(g_t) ⊙ S_{t-1} + k_t v_tᵀ,        o_t = scale · S_tᵀ q_t

g_t = `log_decay` ≤ 0 is [B, T, K] (one decay per kv head and step) or [B, T, K, H] (one
per key channel; it scales S's rows). No normaliser.

Chunkwise parallel (GLA §3): positions are cut into chunks of L; b_t = Σ_{i ≤ t} g_i is the
cumulative log-decay *relative to the chunk start*, so every exponent the code takes is a
difference b_t − b_s ≤ 0 (masked before exp): nothing overflows however strong the decay.
Inside a chunk the exact masked form Σ_s (q_t ⊙ exp(b_t − b_s))·k_s v_s; earlier chunks
enter through the state at the chunk start, read as (q_t ⊙ exp(b_t))ᵀ S_in; chunk states
go through a `lax.scan` over chunks. Memory O(T·L + T·H·Hv·K/L).

Per-channel decays make the in-chunk weights an [L, L, H] elementwise product, not a matmul.
When every chunk's log-decay range −b_L is at most FACTORISED_MAX_RANGE (decays no stronger
than e^-60 over a chunk of 64, e.g. every GLA gate at initialisation), they are computed as one
matmul of q_t ⊙ exp(b_t − m) with k_s ⊙ exp(m − b_s), m = b_L / 2, whose factors then lie
within e^±30 (GLA §4.1's factorisation, with the chunk's middle as reference); otherwise by the
elementwise form in chunks of 16 (`channel_scores`), exact for any decay. `lax.cond` picks one
per call at run time; both are compiled.

Segments (packing) reset the state at document starts exactly; they are contiguous runs
of equal id, as in `linear.py`. Masked (padded) keys leave the state untouched: no k vᵀ
and no decay. Non-causal calls run the recurrence both ways and add the two outputs (the
current token counts in both), as bidirectional state-space models do.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.attention import context
from efficient_attn.attention._common import (Dims, check_mask, check_qkv, compiled_when_eager, split_segment_ids,
                                             stats_dtype)

DEFAULT_CHUNK_SIZE = 64          # scalar decays: the L x L form is a matmul
DEFAULT_CHANNEL_CHUNK_SIZE = 16  # per-channel decays: one l x l x H elementwise block (see `channel_scores`)
SUBCHUNK_SIZE = 16               # per-channel decays: the l x l x H elementwise blocks on the diagonal
# Per-channel decays take the factorised (matmul) form, chunks of DEFAULT_CHUNK_SIZE, when no chunk's
# cumulative log-decay spans more than this (every factor then lies in [e^-30, e^30]); else the exact
# elementwise form above. See `_factorisable`.
FACTORISED_MAX_RANGE = 60.0


class Recurrent(NamedTuple):
  """Validated inputs of a recurrent family (see `prepare_recurrent`)."""
  dims: Dims
  key_mask_BTK: jax.Array | None    # bool [B, T, 1 or K]; False = a padded key (state untouched)
  segment_ids_BT: jax.Array | None  # int [B, T]
  acc: jnp.dtype                    # float32 (float64 for float64 inputs)


def prepare_recurrent(query, key, value, bias, mask, segment_ids, chunk_size, fn: str) -> Recurrent:
  """Trace-time checks shared by the gated and delta-rule families.

  A recurrence runs over one sequence (T == S, self-attention). Only key masks are
  expressible (a [B, S] padding mask, or one broadcastable to [B, 1 or K, 1, S] with K
  = N): a mask that varies over queries or over the query heads of one kv head is refused.
  """
  dims = check_qkv(query, key, value, fn, value_head_dim=True)
  if bias is not None:
    raise ValueError(f"{fn}: `bias` is not supported (got shape {list(jnp.shape(bias))}); a recurrence has no"
                     " logits to add it to; pass bias=None.")
  if dims.T != dims.S:
    raise ValueError(f"{fn}: the recurrence runs over one sequence, so query and key lengths must match"
                     f" (self-attention); got T={dims.T}, S={dims.S}.")
  if mask is not None and jnp.ndim(mask) == 2 and jnp.shape(mask) == (dims.B, dims.S):
    mask = jnp.asarray(mask)[:, None, None, :]
  mask = check_mask(mask, dims, fn)
  key_mask = None
  if mask is not None:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[2] != 1 or (mask.shape[1] != 1 and dims.N != dims.K):
      raise ValueError(f"{fn}: `mask` of shape {list(mask.shape)} varies over queries or over the query heads"
                       " of one kv head; a recurrent state only takes key-padding masks ([B, S] or [B, 1, 1, S]).")
    key_mask = jnp.broadcast_to(mask[:, :, 0, :], (dims.B, mask.shape[1], dims.S)).transpose(0, 2, 1)
  ids = split_segment_ids(segment_ids, dims, fn)
  if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool)
                                 or chunk_size <= 0):
    raise ValueError(f"{fn}: `chunk_size` must be a positive integer or None, got {chunk_size!r}.")
  acc = stats_dtype(jnp.result_type(query, key, value))
  return Recurrent(dims, key_mask, None if ids is None else ids[0], acc)


def token_input(x, dims: Dims, trailing: int, name: str, fn: str, acc):
  """A per-token input (`log_decay`, `beta`) as [B, T, K, *rest] in `acc`: its leading dims are
  flattened like the query's; [B, T, 1, ...] broadcasts over kv heads."""
  x = jnp.asarray(x)
  rank = 3 + trailing
  if x.ndim < rank:
    raise ValueError(f"{fn}: `{name}` must be [B, T, K{', H' * trailing}] (got shape {list(x.shape)}).")
  x = x.reshape((-1,) + x.shape[x.ndim - rank + 1:]) if x.ndim != rank else x
  want = (dims.B, dims.T, dims.K) + ((dims.H,) if trailing else ())
  if x.shape[:2] != want[:2] or x.shape[2] not in (1, dims.K) or x.shape[3:] != want[3:]:
    raise ValueError(f"{fn}: `{name}` must have shape [B, T, K{', H' * trailing}]={list(want)}, got {list(x.shape)}.")
  return jnp.broadcast_to(x.astype(acc), want)


def chunks(x, L: int, mode="constant"):
  """[B, T, ...] -> [B, C, L, ...], T padded up to a multiple of L (zeros; ids repeat their last value)."""
  B, T = x.shape[:2]
  P = -(-T // L) * L
  x = jnp.pad(x, [(0, 0), (0, P - T)] + [(0, 0)] * (x.ndim - 2), mode=mode)
  return x.reshape(B, P // L, L, *x.shape[2:])


class Runs(NamedTuple):
  """Which pairs and chunk states a segment structure allows, per chunk.

  pairs_BCTS: t ≥ s in one run (intra-chunk visibility, diagonal included); use_BCT: token t
  continues the run carried into its chunk (reads the incoming state); run_BCS: key s is in
  the run that reaches the chunk end (enters the outgoing state); keep_BC: that run also
  started before the chunk (the incoming state survives the chunk).
  """
  pairs_BCTS: jax.Array
  use_BCT: jax.Array | None
  run_BCS: jax.Array | None
  keep_BC: jax.Array | None


def runs(ids_BCL, L: int) -> Runs:
  tril = jnp.tril(jnp.ones((L, L), bool))[None, None]
  if ids_BCL is None:
    return Runs(tril, None, None, None)
  last_BC = ids_BCL[:, :, -1]
  # The state entering chunk 0 belongs to the first token's document (zero on one device; the previous
  # shard's state under context parallelism).
  carry_BC = jnp.concatenate([ids_BCL[:, :1, 0], last_BC[:, :-1]], axis=1)
  return Runs(tril & (ids_BCL[:, :, :, None] == ids_BCL[:, :, None, :]), ids_BCL == carry_BC[:, :, None],
              ids_BCL == last_BC[:, :, None], last_BC == carry_BC)


def masked_exp(x, ok):
  """exp(x) where ok, else exactly 0, for x ≤ 0 wherever ok (every exponent here is a log-decay difference).

  exp(x − relu(x)) · ok: a masked entry (whose x may be large and positive) becomes exp(0) · 0, so
  nothing overflows and its gradient is exactly 0; where x ≤ 0 it is exp(x) with the gradient of
  exp. Written with a float mask rather than `where(ok, x, -inf)`: XLA:CPU's select is ~3x slower
  than a multiply on these [.., L, L, ..] tensors.
  """
  if ok is None:
    return jnp.exp(x)
  return jnp.exp(x - jax.nn.relu(x)) * ok.astype(x.dtype)


def incoming_states(decay, update):
  """State at each chunk's start from per-chunk (decay, update): S_{c+1} = decay_c ∘ S_c + update_c, S_0 = 0.

  decay acts elementwise ([B, C, K, H or 1, 1]) or as a matrix ([B, C, K, H, H], the delta
  rule). Only this small state goes through `lax.scan` over chunks (C = T / L steps); the same
  combine joins the shards' summaries under context parallelism (`context.prefix_states`).
  """
  return context.prefix_states(decay, update)


def _diag_decay(b, ok):
  """exp(b_t − b_s) where ok[t, s], else 0: b [B, C, n, l, K, H], ok [B|1, C|1, n, l, l] -> [B, C, n, l, l, K, H]."""
  return masked_exp(b[:, :, :, :, None] - b[:, :, :, None, :], ok[..., None, None])


@jax.custom_vjp
def _diag_scores(q, k, b, ok):
  """a[.., n, k, g, t, s] = Σ_h q_t[h] k_s[h] exp(b_t[h] − b_s[h]) for t, s in sub-chunk n where ok (else 0).

  q [B, C, n, l, K, G, H], k and b [B, C, n, l, K, H], ok bool [B|1, C|1, n, l, l]. The backward
  recomputes the decays and uses ∂/∂b_i = Σ_g q_ig ⊙ dq_ig − k_i ⊙ dk_i (b_i enters every pair as
  +b_t when i = t and −b_s when i = s), instead of materialising the gradient of the [l, l, H] decays.
  """
  return jnp.einsum("bcntkgh,bcnskh,bcntskh->bcnkgts", q, k, _diag_decay(b, ok))


def _diag_fwd(q, k, b, ok):
  return _diag_scores(q, k, b, ok), (q, k, b, ok)


def _diag_bwd(res, da):
  q, k, b, ok = res
  w = _diag_decay(b, ok)
  dq = jnp.einsum("bcnkgts,bcnskh,bcntskh->bcntkgh", da, k, w)
  dk = jnp.einsum("bcnkgts,bcntkgh,bcntskh->bcnskh", da, q, w)
  return dq, dk, jnp.sum(q * dq, axis=-2) - k * dk, None


_diag_scores.defvjp(_diag_fwd, _diag_bwd)


def channel_scores(q, k, b, pairs, l: int):
  """Intra-chunk scores with per-channel decays, A_ts = Σ_h q_t[h] k_s[h] exp(b_t[h] − b_s[h]) where pairs[t, s].

  q [B, C, L, K, G, H], k and b [B, C, L, K, H] (b: cumulative log-decay from the chunk start),
  pairs bool [B|1, C|1, L, L] -> [B, C, K, G, L, L]. Two levels (GLA §4, secondary chunking): the
  chunk is cut into sub-chunks of l; a pair inside one sub-chunk takes the exact elementwise
  decay (an l x l x H block); a pair across sub-chunks (query sub-chunk i, earlier key) factors
  through the position r_i just before sub-chunk i, exp(b_t − b_s) = exp(b_t − b_r) · exp(b_r − b_s),
  both exponents ≤ 0, so it is a matmul of (q ⊙ exp(b − b_r)) with each earlier key ⊙ exp(b_r − b_s).
  Elementwise work per token O((l + L/l)·H) instead of O(L·H).
  """
  B, C, L = q.shape[:3]
  n = L // l if L % l == 0 else 1
  l = L // n
  sub = lambda x: x.reshape(x.shape[0], x.shape[1], n, l, *x.shape[3:])  # noqa: E731
  qs, bs = sub(q), sub(b)
  blocks = pairs.reshape(*pairs.shape[:2], n, l, n, l)
  ok = jnp.moveaxis(jnp.diagonal(blocks, axis1=2, axis2=4), -1, 2)     # [B|1, C|1, n, l, l]
  a_diag = _diag_scores(qs, sub(k), bs, ok)                             # [B, C, n, K, G, l, l]
  if n == 1:
    return a_diag[:, :, 0]
  eye = jnp.eye(n, dtype=a_diag.dtype)
  a = jnp.einsum("bcnkgts,nm->bckgntms", a_diag, eye).reshape(B, C, *a_diag.shape[3:5], L, L)
  ref = jnp.concatenate([jnp.zeros_like(bs[:, :, :1, -1]), bs[:, :, :-1, -1]], axis=2)   # [B, C, n, K, H]
  q_hat = qs * jnp.exp(bs - ref[:, :, :, None])[:, :, :, :, :, None]                   # [B, C, n, l, K, G, H]
  earlier = jnp.arange(L)[None, :] < (jnp.arange(n) * l)[:, None]                      # [n, L]: s before sub-chunk i
  k_hat = k[:, :, None] * masked_exp(ref[:, :, :, None] - b[:, :, None], earlier[None, None, :, :, None, None])
  a_off = jnp.einsum("bcitkgh,bciskh->bckgits", q_hat, k_hat).reshape(a.shape)
  if pairs.shape[0] > 1 or pairs.shape[1] > 1:  # segments: drop cross-document pairs
    a_off = jnp.where(pairs[:, :, None, None], a_off, 0.0)
  return a + a_off


def _gated_causal(q_BTKGH, k_BTKH, v_BTKV, g, ids_BT, L, factorised=False, with_end=False):
  """Causal chunkwise gated recurrence from a zero state; g [B, T, K] or [B, T, K, H]. Returns [B, T, K, G, Hv]
  (with_end: and the state after the last token, [B, K, H, Hv]).

  factorised (per-channel g only): the intra-chunk weights as one matmul of q ⊙ exp(b_t − m) and
  k ⊙ exp(m − b_s), m = b_end / 2 the middle of the chunk's log-decay range; exact, and safe when
  that range is at most FACTORISED_MAX_RANGE (`_factorisable`), since then both factors lie within
  e^±30. Otherwise the [L, L, H] elementwise form (`channel_scores`), safe for any decay."""
  T = q_BTKGH.shape[1]
  per_channel = g.ndim == 4
  q, k, v = chunks(q_BTKGH, L), chunks(k_BTKH, L), chunks(v_BTKV, L)
  r = runs(None if ids_BT is None else chunks(ids_BT, L, "edge"), L)
  b = jnp.cumsum(chunks(g if per_channel else g[..., None], L), axis=2)  # [B, C, L, K, H or 1]
  b_end = b[:, :, -1:]
  # Intra-chunk: weight of key s for query t is q_t·(k_s ⊙ exp(b_t − b_s)), t ≥ s in one run.
  if per_channel and factorised:
    mid = jax.lax.stop_gradient(0.5 * b_end)  # cancels exactly; no (rounding-level) gradient to later gates
    q_rel = q * jnp.exp(b - mid)[:, :, :, :, None, :]
    a_BCKGTS = jnp.einsum("bctkgh,bcskh->bckgts", q_rel, k * jnp.exp(mid - b))
    a_BCKGTS = a_BCKGTS * r.pairs_BCTS[:, :, None, None].astype(a_BCKGTS.dtype)
  elif per_channel:
    a_BCKGTS = channel_scores(q, k, b, r.pairs_BCTS, min(SUBCHUNK_SIZE, L))
  else:
    w = masked_exp(b[:, :, :, None] - b[:, :, None, :], r.pairs_BCTS[..., None, None])  # [B, C, T, S, K, 1]
    a_BCKGTS = jnp.einsum("bctkgh,bcskh->bckgts", q, k) * jnp.moveaxis(w[..., 0], 4, 2)[:, :, :, None]
  out = jnp.einsum("bckgts,bcskv->bctkgv", a_BCKGTS, v)
  # Chunk states: key s enters at exp(b_end − b_s); the carried state decays by exp(b_end).
  run = None if r.run_BCS is None else r.run_BCS[..., None, None]
  update = jnp.einsum("bcskh,bcskv->bckhv", k * masked_exp(b_end - b, run), v)
  decay = jnp.exp(b_end[:, :, 0])                                      # [B, C, K, H or 1]
  if r.keep_BC is not None:
    decay = jnp.where(r.keep_BC[:, :, None, None], decay, 0.0)
  s_in = incoming_states(decay[..., None], update)                     # [B, C, K, H, Hv]
  use = None if r.use_BCT is None else r.use_BCT[..., None, None]
  q_in = q * masked_exp(b, use)[:, :, :, :, None, :]
  out = out + jnp.einsum("bctkgh,bckhv->bctkgv", q_in, s_in)
  out = out.reshape(out.shape[0], -1, *out.shape[3:])[:, :T]
  if with_end:
    return out, context.apply_transition(decay[:, -1], s_in[:, -1]) + update[:, -1]
  return out


def _factorisable(g_BTKH, L: int):
  """True when no chunk of L positions has a cumulative log-decay range above FACTORISED_MAX_RANGE
  (g ≤ 0, so the range of a chunk is −Σ g over it; both directions of a non-causal call are covered)."""
  return jnp.max(-jnp.sum(chunks(g_BTKH, L), axis=2)) <= FACTORISED_MAX_RANGE


def bidirectional(causal_fn, arrays, ids, is_causal):
  """causal_fn(*arrays, ids) and, non-causal, + the same over the reversed sequence."""
  out = causal_fn(*arrays, ids)
  if is_causal:
    return out
  flip = lambda x: None if x is None else jnp.flip(x, axis=1)  # noqa: E731
  return out + flip(causal_fn(*(flip(a) for a in arrays), flip(ids)))


def _piece_direction(causal, axis_name, layout: str):
  """`direction` for `context.run_pieces` (see context.py): each piece runs from a zero state (`causal` gives
  its output and end state U); its transition is exp(Σ g) (zero when a document starts inside it);
  `context.incoming_state` folds every piece's (transition, U) into this piece's incoming state S0, and
  token t of the piece's first document adds (q_t ⊙ exp(Σ_{i ≤ t} g_i))ᵀ S0. The reverse recurrence of a
  non-causal call (flipped pieces) takes the suffix combine."""

  def direction(arrays, ids, reverse: bool):
    q, k, v, g = arrays  # q [B·n, T, K, G, H], k, v, g [B·n, T, K(, H)]
    out, end_BKHV = causal(q, k, v, g, ids)
    cum_BTKH = jnp.cumsum(g if g.ndim == 4 else g[..., None], axis=1)   # log-decay since the piece start
    transition_BKH, first = jnp.exp(cum_BTKH[:, -1]), None
    if ids is not None:
      transition_BKH = jnp.where((ids[:, -1] == ids[:, 0])[:, None, None], transition_BKH, 0.0)
      first = (ids == ids[:, :1])[:, :, None, None]                    # the piece's first document
    s0_BKHV = context.incoming_state(transition_BKH, end_BKHV, axis_name, layout, reverse=reverse,
                                     ids=context.edges(ids))
    q0 = q * masked_exp(cum_BTKH, first)[:, :, :, None, :]
    return out + jnp.einsum("btkgh,bkhv->btkgv", q0, s0_BKHV)

  return direction


@compiled_when_eager()
def gated_linear_attention(query, key, value, log_decay, *, mask=None, is_causal=True, segment_ids=None,
                           scale=None, chunk_size=None, bias=None, context_axis=None, context_layout="zigzag"):
  """Decay-gated linear attention: S_t = exp(g_t) ⊙ S_{t-1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

  query [B, T, N, H], key [B, T, K, H], value [B, T, K, Hv], log_decay g ≤ 0 [B, T, K]
  (RetNet, Mamba-2) or [B, T, K, H] (GLA) -> [B, T, N, Hv] in query's dtype; state and sums
  in float32 (float64 for float64 inputs). GQA: query head n reads kv head n // (N / K).
  `mask`: key-padding (bool [B, T] or [B, 1, 1, T]); a masked key adds nothing and decays
  nothing. `segment_ids` [B, T]: contiguous packed documents; the state resets at each start.
  `scale` defaults to H^-½. `is_causal=False`: forward + backward recurrences summed.
  Chunkwise parallel with L = `chunk_size` (default 64; per-channel decays stronger than
  FACTORISED_MAX_RANGE over a chunk: 16, elementwise; T need not divide it): O(T·L·H + T·H·Hv)
  time, O(T·L + T·H·Hv·K/L) memory (the elementwise form: O(T·L·H)). Papers: RetNet (Sun et
  al. 2023), GLA (Yang et al. 2024), Mamba-2 SSD (Dao & Gu 2024).

  Context parallelism: `context_axis` (a mesh axis name) says the call runs inside `jax.shard_map`
  on one shard's T = T_total / P tokens, laid out by `context_layout` ("zigzag": pieces r and
  2P − 1 − r of 2P; "contiguous"; see `context.to_layout`), mask and segment ids laid out the same
  way. Each piece's end state and decay go through one all_gather (P·n·B·K·H·(Hv + 1) numbers
  whatever T), and the outputs are corrected with the piece's incoming state: exact.
  """
  fn = "gated_linear_attention"
  p = prepare_recurrent(query, key, value, bias, mask, segment_ids, chunk_size, fn)
  d, acc = p.dims, p.acc
  g = jnp.asarray(log_decay)
  g = token_input(g, d, int(g.ndim == 4), "log_decay", fn, acc)
  n = 1 if context_axis is None else context.local_pieces(context_layout, d.T, fn)
  T = d.T // n  # the length of each sequence the recurrence runs over
  L = min(chunk_size or (DEFAULT_CHANNEL_CHUNK_SIZE if g.ndim == 4 else DEFAULT_CHUNK_SIZE), T)
  scale = d.H ** -0.5 if scale is None else scale
  q = query.astype(acc).reshape(d.B, d.T, d.K, d.G, d.H) * scale
  k, v = key.astype(acc), value.astype(acc)
  if p.key_mask_BTK is not None:
    k = jnp.where(p.key_mask_BTK[..., None], k, 0.0)
    g = jnp.where(p.key_mask_BTK[..., None] if g.ndim == 4 else p.key_mask_BTK, g, 0.0)
  end = context_axis is not None  # each piece's end state too
  causal = lambda q, k, v, g, ids: _gated_causal(q, k, v, g, ids, L, with_end=end)  # noqa: E731
  if g.ndim == 4:  # per-channel: the matmul form when the decays allow it (decided at run time), else elementwise
    L_fast = min(chunk_size or DEFAULT_CHUNK_SIZE, T)
    fast = lambda q, k, v, g, ids: _gated_causal(q, k, v, g, ids, L_fast, factorised=True, with_end=end)  # noqa: E731
    exact = causal
    causal = lambda q, k, v, g, ids: jax.lax.cond(  # noqa: E731
        _factorisable(g, L_fast), fast, exact, q, k, v, g, ids)
  if context_axis is None:
    out = bidirectional(causal, (q, k, v, g), p.segment_ids_BT, is_causal)
  else:
    out = context.run_pieces(_piece_direction(causal, context_axis, context_layout), (q, k, v, g), p.segment_ids_BT,
                             is_causal, context_axis, n)
  return out.reshape(d.B, d.T, d.N, -1).astype(query.dtype)


# ----------------------------------------------------------------------------- decoding


def gated_init_state(batch: int, num_kv_heads: int, head_dim: int, value_head_dim: int | None = None,
                     dtype=jnp.float32):
  """Empty decoding state {"S": [B, K, H, Hv]} in float32 (float64 for float64): constant in T."""
  return {"S": jnp.zeros((batch, num_kv_heads, head_dim, value_head_dim or head_dim), stats_dtype(dtype))}


def check_one_token(state, query, key, value, fn: str) -> Dims:
  dims = check_qkv(query, key, value, fn, value_head_dim=True)
  if dims.T != 1 or dims.S != 1:
    raise ValueError(f"{fn}: decoding takes one token, query [B, 1, N, H] and key/value [B, 1, K, H]; got"
                     f" T={dims.T}, S={dims.S}.")
  want = (dims.B, dims.K, dims.H, value.shape[-1])
  if state["S"].shape != want:
    raise ValueError(f"{fn}: state is for (B, K, H, Hv)={state['S'].shape} but the inputs have {want}.")
  return dims


def gated_step(state, query_B1NH, key_B1KH, value_B1KH, log_decay, *, scale=None):
  """One token of `gated_linear_attention`: log_decay [B, 1, K] or [B, 1, K, H]; returns (out [B, 1, N, Hv], state)."""
  fn = "gated_step"
  d = check_one_token(state, query_B1NH, key_B1KH, value_B1KH, fn)
  S = state["S"]
  g = token_input(log_decay, d, int(jnp.ndim(log_decay) == 4), "log_decay", fn, S.dtype)[:, 0]
  decay = jnp.exp(g)[..., None] if g.ndim == 3 else jnp.exp(g)[..., None, None]
  k, v = key_B1KH[:, 0].astype(S.dtype), value_B1KH[:, 0].astype(S.dtype)
  S = decay * S + jnp.einsum("bkh,bkv->bkhv", k, v)
  scale = d.H ** -0.5 if scale is None else scale
  q = query_B1NH[:, 0].astype(S.dtype).reshape(d.B, d.K, d.G, d.H) * scale
  out = jnp.einsum("bkgh,bkhv->bkgv", q, S).reshape(d.B, 1, d.N, -1)
  return out.astype(query_B1NH.dtype), {"S": S}


def retnet_log_decay(num_heads: int):
  """RetNet's fixed decays log(1 − 2^(−5−h)), h = 0 .. num_heads − 1 (Sun et al. 2023, §2.2), float32 [num_heads]."""
  return jnp.asarray(np.log1p(-2.0 ** (-5.0 - np.arange(num_heads))), jnp.float32)


def gated_flops(shape, chunk_size, per_channel: bool, extra: float = 0.0) -> dict:
  """Forward FLOPs per token: ideal = the recurrence (state update 2·K·H·Hv, read-out 2·N·H·Hv);
  executed = the chunkwise form (all of the L x L pairs, + chunk states). Per-channel decays are
  counted in their factorised form (the usual one; the elementwise fallback for decays stronger
  than FACTORISED_MAX_RANGE does ~1.5x the pair work in chunks of 16)."""
  T, _, N, K, H, causal = shape
  L = min(chunk_size or DEFAULT_CHUNK_SIZE, T)
  ideal = 2 * K * H * H + 2 * N * H * H + extra
  pair = N * (2 * H + 2 * H + 2)  # q·k, a·v, the decay / mask
  scaling = 3 * (N + K) * H if per_channel else 0  # q ⊙ exp(b − m), k ⊙ exp(m − b)
  states = 2 * K * H * H + 2 * N * H * H + 2 * K * H * H / L  # chunk update, read-out, the scan
  executed = (pair * L + states + scaling) * (-(-T // L) * L) / T + extra
  return {"ideal": ideal * (1 if causal else 2), "executed": executed * (1 if causal else 2)}
