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

so (I + strict_tril(diag(β) (K Kᵀ ⊙ D))) U = diag(β) V − diag(β exp(b)) K S_0: one unit
lower-triangular solve per chunk gives U = Ũ − W S_0 (Ũ, W independent of S_0). Then

    O = diag(exp(b)) Q S_0 + (tril(Q Kᵀ) ⊙ D) U,     S_L = (exp(b_L) I − K̂ᵀ W) S_0 + K̂ᵀ Ũ,  K̂_i = exp(b_L − b_i) k_i

and the chunk maps S_0 -> S_L compose by a `lax.scan` over chunks. Every exponent is
≤ 0. Segments, key-padding masks, GQA and the non-causal form follow `gated.py`; a padded
key has β = 0 and g = 0, so the state is untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.attention.gated import (
    bidirectional, check_one_token, chunks, incoming_states, masked_exp, prepare_recurrent, runs, token_input)

DEFAULT_CHUNK_SIZE = 64


@jax.custom_vjp
def unit_lower_solve(a, b):
  """X = A⁻¹ B for unit lower-triangular A [..., L, L] (its diagonal and upper part are not read)."""
  return jax.lax.linalg.triangular_solve(a, b, left_side=True, lower=True, unit_diagonal=True)


def _solve_fwd(a, b):
  x = unit_lower_solve(a, b)
  return x, (a, x)


def _solve_bwd(res, dx):
  # dB = A⁻ᵀ dX, dA = −dB Xᵀ on the strictly lower part. Written out because XLA:CPU's own
  # transpose of the batched solve ran for minutes at T = 8192.
  a, x = res
  db = jax.lax.linalg.triangular_solve(a, dx, left_side=True, lower=True, transpose_a=True, unit_diagonal=True)
  return jnp.tril(-jnp.einsum("...ir,...jr->...ij", db, x), -1), db


unit_lower_solve.defvjp(_solve_fwd, _solve_bwd)


def _delta_causal(q_BTKGH, k_BTKH, v_BTKV, beta_BTK, g_BTK, ids_BT, L):
  """Causal chunkwise delta rule. Returns [B, T, K, G, Hv]."""
  T, H = q_BTKGH.shape[1], k_BTKH.shape[-1]
  q, k, v = chunks(q_BTKGH, L), chunks(k_BTKH, L), chunks(v_BTKV, L)
  beta = chunks(beta_BTK, L)                                  # [B, C, L, K]; padding: β = 0
  r = runs(None if ids_BT is None else chunks(ids_BT, L, "edge"), L)
  b = jnp.moveaxis(jnp.cumsum(chunks(g_BTK, L), axis=2), 2, 3)  # [B, C, K, L]
  b_end = b[..., -1:]
  to_bckl = lambda x: jnp.moveaxis(x, 2, 3)  # noqa: E731  [B, C, L, K, ...] -> [B, C, K, L, ...]
  d_BCKTS = masked_exp(b[..., :, None] - b[..., None, :], r.pairs_BCTS[:, :, None])
  gam_BCKL = masked_exp(b, None if r.use_BCT is None else r.use_BCT[:, :, None])
  kc, vc, bc = to_bckl(k), to_bckl(v), to_bckl(beta)
  kk = jnp.einsum("bckth,bcksh->bckts", kc, kc)
  strict = jnp.tril(jnp.ones((1, 1, 1, L, L), bool), -1)
  tm = jnp.eye(L, dtype=kk.dtype)[None, None, None] + jnp.where(strict, bc[..., None] * kk * d_BCKTS, 0.0)
  rhs = jnp.concatenate([bc[..., None] * vc, (bc * gam_BCKL)[..., None] * kc], axis=-1)
  sol = unit_lower_solve(tm, rhs)
  u0, w = sol[..., :vc.shape[-1]], sol[..., vc.shape[-1]:]    # Ũ [B, C, K, L, Hv], W [B, C, K, L, H]
  # Chunk maps S_0 -> S_L = M S_0 + D, composed over chunks.
  run = None if r.run_BCS is None else r.run_BCS[:, :, None]
  k_hat = kc * masked_exp(b_end - b, run)[..., None]
  decay = jnp.exp(b_end[..., 0])
  if r.keep_BC is not None:
    decay = jnp.where(r.keep_BC[:, :, None], decay, 0.0)
  m = decay[..., None, None] * jnp.eye(H, dtype=kk.dtype)[None, None, None] - jnp.einsum("bckli,bcklj->bckij", k_hat, w)
  s_in = incoming_states(m, jnp.einsum("bckli,bcklv->bckiv", k_hat, u0))  # [B, C, K, H, Hv]
  u = u0 - jnp.einsum("bcklh,bckhv->bcklv", w, s_in)
  out = jnp.einsum("bctkgh,bckhv->bctkgv", q * jnp.moveaxis(gam_BCKL, 2, 3)[..., None, None], s_in)
  a = jnp.einsum("bctkgh,bcskh->bckgts", q, k) * d_BCKTS[:, :, :, None]
  out = out + jnp.einsum("bckgts,bcksv->bctkgv", a, u)
  return out.reshape(out.shape[0], -1, *out.shape[3:])[:, :T]


def delta_rule_attention(query, key, value, beta, *, log_decay=None, mask=None, is_causal=True, segment_ids=None,
                         scale=None, chunk_size=None, bias=None):
  """Delta-rule attention: S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

  query [B, T, N, H], key [B, T, K, H], value [B, T, K, Hv], beta in [0, 1] [B, T, K],
  log_decay g ≤ 0 [B, T, K] or None (g = 0: DeltaNet; else Gated DeltaNet) -> [B, T, N, Hv]
  in query's dtype; state and sums in float32 (float64 for float64 inputs). Keys are used
  as given: the update is a contraction only for ‖k‖ ≤ 1 (the layer L2-normalises q and k).
  `mask`, `segment_ids`, GQA, `scale` (default H^-½) and `is_causal=False` as in
  `gated_linear_attention`. Chunkwise parallel with L = `chunk_size` (default 64; T need
  not divide it): per chunk one L x L unit-triangular solve (the UT transform) with H + Hv
  right-hand sides; O(T·L·(H + Hv) + T·H²·Hv/L) time, O(T·L + T·H·(H + Hv)·K/L) memory.
  Papers: DeltaNet (Schlag et al. 2021; Yang et al. 2024), Gated DeltaNet (Yang et al. 2024).
  """
  fn = "delta_rule_attention"
  p = prepare_recurrent(query, key, value, bias, mask, segment_ids, chunk_size, fn)
  d, acc = p.dims, p.acc
  beta = token_input(beta, d, 0, "beta", fn, acc)
  g = jnp.zeros_like(beta) if log_decay is None else token_input(log_decay, d, 0, "log_decay", fn, acc)
  L = min(chunk_size or DEFAULT_CHUNK_SIZE, d.T)
  scale = d.H ** -0.5 if scale is None else scale
  q = query.astype(acc).reshape(d.B, d.T, d.K, d.G, d.H) * scale
  k, v = key.astype(acc), value.astype(acc)
  if p.key_mask_BTK is not None:
    beta, g = jnp.where(p.key_mask_BTK, beta, 0.0), jnp.where(p.key_mask_BTK, g, 0.0)
  causal = lambda q, k, v, beta, g, ids: _delta_causal(q, k, v, beta, g, ids, L)  # noqa: E731
  out = bidirectional(causal, (q, k, v, beta, g), p.segment_ids_BT, is_causal)
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
  4·K·H·Hv + 2·N·H·Hv); executed = the chunkwise form (K Kᵀ, the triangular solve with
  H + Hv right-hand sides, W S_0, Q Kᵀ and A U over all L x L pairs, chunk maps)."""
  T, _, N, K, H, causal = shape
  L = min(chunk_size or DEFAULT_CHUNK_SIZE, T)
  ideal = 4 * K * H * H + 2 * N * H * H + extra
  pairs = K * 2 * H + K * (2 * H) + N * (2 * H + 2 * H)   # K Kᵀ, solve (≈ L²·(H+Hv) per chunk), Q Kᵀ, A U
  states = 2 * K * H * H * 3 + 2 * N * H * H + 2 * K * H * H * H / L  # K̂ᵀW, K̂ᵀŨ, W S_0, read-out, M S
  executed = (pairs * L + states) * (-(-T // L) * L) / T + extra
  return {"ideal": ideal * (1 if causal else 2), "executed": executed * (1 if causal else 2)}
