"""The delta rule (DeltaNet) and its gated form (Gated DeltaNet), chunkwise via the WY / UT transform.

Schlag et al. 2021 ("Linear Transformers Are Secretly Fast Weight Programmers") replace
linear attention's additive write by a delta-rule write; Yang et al. 2024 ("Parallelizing
Linear Transformers with the Delta Rule over Sequence Length") make it chunkwise parallel;
Yang, Kautz & Hatamizadeh 2024 ("Gated Delta Networks") add a decay. Per kv head, with
state S_t [H, Hv]:

    S_t = exp(g_t) · (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,      o_t = scale · S_tᵀ q_t

Chunkwise (UT transform). Inside a chunk of L tokens that starts from state S_0, with
b_t = Σ_{i ≤ t} g_i (relative to the chunk start) and D_ti = exp(b_t − b_i) (t ≥ i),

    S_t = exp(b_t) S_0 + Σ_{i ≤ t} D_ti k_i u_iᵀ,   u_t = β_t (v_t − exp(b_t) S_0ᵀ k_t − Σ_{i<t} D_ti u_i k_iᵀ k_t)

so (I + strict_tril(diag(β) (K Kᵀ ⊙ D))) U = diag(β) V − diag(β exp(b)) K S_0: the inverse of
that unit lower-triangular matrix (one per chunk, `unit_lower_inverse`) gives U = Ũ − W S_0
(Ũ, W independent of S_0). Then

    O = diag(exp(b)) Q S_0 + (tril(Q Kᵀ) ⊙ D) U,     S_L = (exp(b_L) I − K̂ᵀ W) S_0 + K̂ᵀ Ũ,  K̂_i = exp(b_L − b_i) k_i

and the chunk maps S_0 -> S_L compose by a `lax.scan` over chunks. Every exponent is
≤ 0. Segments, key-padding masks, GQA and the non-causal form follow `gated.py`; a padded
key has β = 0 and g = 0, so the state is untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.attention import context
from efficient_attn.attention._common import compiled_when_eager, scale_rows
from efficient_attn.attention.gated import (
    bidirectional, check_one_token, chunks, incoming_states, masked_exp, prepare_recurrent, runs, token_input)

DEFAULT_CHUNK_SIZE = 64


@jax.custom_vjp
def unit_lower_inverse(a):
  """A⁻¹ for unit lower-triangular A [..., L, L]; only A's strictly lower part is read.

  Blockwise, bottom-up: with the inverses T11, T22 of two diagonal blocks, the inverse of
  [[A11, 0], [A21, A22]] is [[T11, 0], [−T22 A21 T11, T22]]. log2(L) levels of batched
  matmuls (L is padded to a power of two with identity): exact substitution reordered, but
  matmuls instead of LAPACK's per-matrix strsm (XLA:CPU calls it once per chunk and head).
  The backward is matmuls too: dA = −strict_tril(Tᵀ dT Tᵀ).
  """
  L = a.shape[-1]
  P = 1 << max(L - 1, 0).bit_length()
  a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, P - L)] * 2)
  batch, n = a.shape[:-2], 1
  t = jnp.ones(batch + (P, 1, 1), a.dtype)          # the inverses of the 1 x 1 diagonal blocks
  while n < P:
    m = P // (2 * n)
    blocks = a.reshape(*batch, m, 2 * n, m, 2 * n)
    a21 = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)[..., n:, :n]  # [..., m, n, n]
    t = t.reshape(*batch, m, 2, n, n)
    t11, t22 = t[..., 0, :, :], t[..., 1, :, :]
    t21 = -(t22 @ (a21 @ t11))
    t = jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], -1), jnp.concatenate([t21, t22], -1)], -2)
    n *= 2
  return t.reshape(*batch, P, P)[..., :L, :L]


def _inverse_fwd(a):
  t = unit_lower_inverse(a)
  return t, t


def _inverse_bwd(t, dt):
  return (jnp.tril(-jnp.einsum("...ji,...jk,...lk->...il", t, dt, t), -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _delta_causal(q_BTKGH, k_BTKH, v_BTKV, beta_BTK, g_BTK, ids_BT, L, incoming=None):
  """Causal chunkwise delta rule. Returns [B, T, K, G, Hv].

  incoming (context parallelism): a function (transition [B, K, H, H], end state [B, K, H, Hv]) -> the
  state entering this sequence [B, K, H, Hv] (`context.incoming_state`), given this sequence's chunk
  maps composed (S_end = transition · S_start + end state) from a zero start; the chunk states then
  restart from it. The state is linear in S_start, so only the scan over chunks runs twice.

  Works per (chunk, kv head) in [B, C, K, L, ...] layout, with the query heads of a kv head
  stacked along L (rows t = g·L + l), so that Q Kᵀ and K Kᵀ are one matmul, K̂ᵀ Ũ and K̂ᵀ W
  one, and Q S_0 and W S_0 one.
  """
  T, H, G, Hv = q_BTKGH.shape[1], k_BTKH.shape[-1], q_BTKGH.shape[3], v_BTKV.shape[-1]
  to_bckl = lambda x: jnp.moveaxis(chunks(x, L), 2, 3)  # noqa: E731  [B, T, K, ...] -> [B, C, K, L, ...]
  q = jnp.moveaxis(chunks(q_BTKGH, L), 2, 4)            # [B, C, K, G, L, H]
  B, C, K = q.shape[:3]
  k, v, beta = to_bckl(k_BTKH), to_bckl(v_BTKV), to_bckl(beta_BTK)  # padding: β = 0
  r = runs(None if ids_BT is None else chunks(ids_BT, L, "edge"), L)
  b = jnp.moveaxis(jnp.cumsum(chunks(g_BTK, L), axis=2), 2, 3)  # [B, C, K, L]
  b_end = b[..., -1:]
  d = masked_exp(b[..., :, None] - b[..., None, :], r.pairs_BCTS[:, :, None])  # [B, C, K, L, L]
  gam = masked_exp(b, None if r.use_BCT is None else r.use_BCT[:, :, None])
  scores = jnp.einsum("bckth,bcksh->bckts", jnp.concatenate([q.reshape(B, C, K, G * L, H), k], axis=3), k)
  a = scores[..., :G * L, :].reshape(B, C, K, G, L, L) * d[:, :, :, None]  # (Q Kᵀ ⊙ D), causal within runs
  strict = jnp.tril(jnp.ones((L, L), bool), -1)
  tm = scale_rows(jnp.where(strict, scores[..., G * L:, :] * d, 0.0), beta)  # I + tm is the UT system
  rhs = scale_rows(jnp.concatenate([v, scale_rows(k, gam)], axis=-1), beta)
  sol = jnp.einsum("bckts,bcksx->bcktx", unit_lower_inverse(tm), rhs)  # [Ũ | W]: [B, C, K, L, Hv + H]
  # Chunk maps S_0 -> S_L = M S_0 + D, composed over chunks.
  k_hat = scale_rows(k, masked_exp(b_end - b, None if r.run_BCS is None else r.run_BCS[:, :, None]))
  decay = jnp.exp(b_end[..., 0])
  if r.keep_BC is not None:
    decay = jnp.where(r.keep_BC[:, :, None], decay, 0.0)
  kts = jnp.einsum("bckli,bcklx->bckix", k_hat, sol)                  # [K̂ᵀ Ũ | K̂ᵀ W]
  m = decay[..., None, None] * jnp.eye(H, dtype=k.dtype)[None, None, None] - kts[..., Hv:]
  s_in = incoming_states(m, kts[..., :Hv])                             # [B, C, K, H, Hv]
  if incoming is not None:
    end = m[:, -1] @ s_in[:, -1] + kts[:, -1, ..., :Hv]
    s_in = context.prefix_states(m, kts[..., :Hv], initial=incoming(context.product(m), end))
  q_in = scale_rows(q, gam[:, :, :, None]).reshape(B, C, K, G * L, H)
  read = jnp.einsum("bckth,bckhv->bcktv", jnp.concatenate([q_in, sol[..., Hv:]], axis=3), s_in)
  u = sol[..., :Hv] - read[..., G * L:, :]                             # U = Ũ − W S_0
  out = read[..., :G * L, :].reshape(B, C, K, G, L, Hv) + jnp.einsum("bckgts,bcksv->bckgtv", a, u)
  out = jnp.moveaxis(out, 4, 2)                                        # [B, C, L, K, G, Hv]
  return out.reshape(B, -1, *out.shape[3:])[:, :T]


@compiled_when_eager()
def delta_rule_attention(query, key, value, beta, *, log_decay=None, mask=None, is_causal=True, segment_ids=None,
                         scale=None, chunk_size=None, bias=None, context_axis=None, context_layout="zigzag"):
  """Delta-rule attention: S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

  query [B, T, N, H], key [B, T, K, H], value [B, T, K, Hv], beta in [0, 1] [B, T, K],
  log_decay g ≤ 0 [B, T, K] or None (g = 0: DeltaNet; else Gated DeltaNet) -> [B, T, N, Hv]
  in query's dtype; state and sums in float32 (float64 for float64 inputs). Keys are used
  as given: the update is a contraction only for ‖k‖ ≤ 1 (the layer L2-normalises q and k).
  `mask`, `segment_ids`, GQA, `scale` (default H^-½) and `is_causal=False` as in
  `gated_linear_attention`. Chunkwise parallel with L = `chunk_size` (default 64; T need
  not divide it): per chunk the inverse of one L x L unit-triangular matrix (the UT
  transform) applied to H + Hv right-hand sides; O(T·L·(L + H + Hv) + T·H²·Hv/L) time,
  O(T·L + T·H·(H + Hv)·K/L) memory.
  Papers: DeltaNet (Schlag et al. 2021; Yang et al. 2024), Gated DeltaNet (Yang et al. 2024).

  Context parallelism (`context_axis`, `context_layout`: as in `gated_linear_attention`): each piece's
  transition, the H x H product of its chunk maps exp(g)(I − β k kᵀ) in float32, and its end state go
  through one all_gather (P·n·B·K·H·(H + Hv) numbers whatever T); exact.
  """
  fn = "delta_rule_attention"
  p = prepare_recurrent(query, key, value, bias, mask, segment_ids, chunk_size, fn)
  d, acc = p.dims, p.acc
  beta = token_input(beta, d, 0, "beta", fn, acc)
  g = jnp.zeros_like(beta) if log_decay is None else token_input(log_decay, d, 0, "log_decay", fn, acc)
  n = 1 if context_axis is None else context.local_pieces(context_layout, d.T, fn)
  L = min(chunk_size or DEFAULT_CHUNK_SIZE, d.T // n)
  scale = d.H ** -0.5 if scale is None else scale
  q = query.astype(acc).reshape(d.B, d.T, d.K, d.G, d.H) * scale
  k, v = key.astype(acc), value.astype(acc)
  if p.key_mask_BTK is not None:
    beta, g = jnp.where(p.key_mask_BTK, beta, 0.0), jnp.where(p.key_mask_BTK, g, 0.0)
  causal = lambda q, k, v, beta, g, ids, incoming=None: _delta_causal(q, k, v, beta, g, ids, L, incoming)  # noqa: E731
  if context_axis is None:
    out = bidirectional(causal, (q, k, v, beta, g), p.segment_ids_BT, is_causal)
  else:
    def direction(arrays, ids, reverse: bool):  # each piece's chunk states restart from its incoming state
      incoming = lambda A, U: context.incoming_state(A, U, context_axis, context_layout, reverse=reverse,  # noqa: E731
                                                     ids=context.edges(ids))
      return causal(*arrays, ids, incoming)

    out = context.run_pieces(direction, (q, k, v, beta, g), p.segment_ids_BT, is_causal, context_axis, n)
  return out.reshape(d.B, d.T, d.N, -1).astype(query.dtype)


def delta_step(state, query_B1NH, key_B1KH, value_B1KH, beta, *, log_decay=None, scale=None):
  """One token of `delta_rule_attention` (state from `gated.gated_init_state`): beta / log_decay
  [B, 1, K]; returns (out [B, 1, N, Hv], state)."""
  fn = "delta_step"
  d = check_one_token(state, query_B1NH, key_B1KH, value_B1KH, fn)
  S = state["S"]
  beta = token_input(beta, d, 0, "beta", fn, S.dtype)[:, 0]
  k, v = key_B1KH[:, 0].astype(S.dtype), value_B1KH[:, 0].astype(S.dtype)
  if log_decay is not None:
    S = jnp.exp(token_input(log_decay, d, 0, "log_decay", fn, S.dtype)[:, 0])[..., None, None] * S
  err = v - jnp.einsum("bkh,bkhv->bkv", k, S)  # what the state predicts for k_t, corrected by β
  S = S + jnp.einsum("bkh,bkv->bkhv", k, beta[..., None] * err)
  scale = d.H ** -0.5 if scale is None else scale
  q = query_B1NH[:, 0].astype(S.dtype).reshape(d.B, d.K, d.G, d.H) * scale
  out = jnp.einsum("bkgh,bkhv->bkgv", q, S).reshape(d.B, 1, d.N, -1)
  return out.astype(query_B1NH.dtype), {"S": S}


def delta_flops(shape, chunk_size, extra: float = 0.0) -> dict:
  """Forward FLOPs per token: ideal = the recurrence (kᵀS, the rank-1 write, the read-out:
  4·K·H·Hv + 2·N·H·Hv); executed = the chunkwise form (K Kᵀ, the blockwise L x L inverse,
  ≈ ⅔·L³ per chunk, its product with H + Hv right-hand sides, W S_0, Q Kᵀ and A U over all
  L x L pairs, chunk maps)."""
  T, _, N, K, H, causal = shape
  L = min(chunk_size or DEFAULT_CHUNK_SIZE, T)
  ideal = 4 * K * H * H + 2 * N * H * H + extra
  pairs = K * (2 * H + 2 * L / 3 + 2 * 2 * H) + N * (2 * H + 2 * H)  # K Kᵀ, inverse, T·[V | K], Q Kᵀ, A U
  states = 2 * K * H * H * 3 + 2 * N * H * H + 2 * K * H * H * H / L  # K̂ᵀW, K̂ᵀŨ, W S_0, read-out, M S
  executed = (pairs * L + states) * (-(-T // L) * L) / T + extra
  return {"ideal": ideal * (1 if causal else 2), "executed": executed * (1 if causal else 2)}
