"""Independent float64 NumPy references for the attention tests.

Deliberately naive: build the full [B, N, T, S] visibility matrix, then either a
masked softmax or a masked quadratic kernel form φ(q)φ(k)ᵀ. A query that sees no
key returns 0 (the convention every family in efficient_attn follows).
"""

import numpy as np


def visibility(B, N, T, S, *, mask=None, is_causal=False, segment_ids=None, window=None):
  """bool [B, N, T, S]: True where query t may attend key s.

  Causal alignment is top-left (query t sees keys s <= t), as in jax.nn.dot_product_attention.
  `window` (local attention): causal -> s in [t-window+1, t]; otherwise |t - s| < window.
  """
  vis = np.ones((B, N, T, S), bool)
  t = np.arange(T)[:, None]
  s = np.arange(S)[None, :]
  if is_causal:
    vis &= (s <= t)[None, None]
  if window is not None:
    vis &= ((t - s < window) & (s - t < (1 if is_causal else window)))[None, None]
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_ids, kv_ids = (np.asarray(x) for x in segment_ids)
    else:
      q_ids = kv_ids = np.asarray(segment_ids)
    vis &= (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
  if mask is not None:
    vis &= np.broadcast_to(np.asarray(mask, bool), (B, N, T, S))
  return vis


def _expand_kv(x, N):
  """[B, S, K, H] -> [B, S, N, H] by repeating each kv head N // K times (GQA)."""
  x = np.asarray(x, np.float64)
  return np.repeat(x, N // x.shape[2], axis=2)


def softmax_reference(q, k, v, *, bias=None, scale=None, **vis_kw):
  """Exact masked softmax attention in float64. q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]."""
  q = np.asarray(q, np.float64)
  B, T, N, H = q.shape
  S = k.shape[1]
  k, v = _expand_kv(k, N), _expand_kv(v, N)
  scale = H ** -0.5 if scale is None else scale
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  vis = visibility(B, N, T, S, **vis_kw)
  logits = np.where(vis, logits, -np.inf)
  m = np.max(logits, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(vis, np.exp(logits - m), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom > 0, denom, 1.0)
  return np.einsum("bnts,bsnh->btnh", p, v)


def kernel_reference(phi_q, phi_k, v, **vis_kw):
  """Masked quadratic kernel attention in float64.

  phi_q [B,T,N,M], phi_k [B,S,K,M], v [B,S,K,H]:
  out[t] = Σ_s vis·(φq_t·φk_s) v_s / Σ_s vis·(φq_t·φk_s), 0 where nothing is visible.
  """
  phi_q = np.asarray(phi_q, np.float64)
  B, T, N, _ = phi_q.shape
  S = phi_k.shape[1]
  phi_k, v = _expand_kv(phi_k, N), _expand_kv(v, N)
  a = np.einsum("btnm,bsnm->bnts", phi_q, phi_k) * visibility(B, N, T, S, **vis_kw)
  denom = a.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", a / np.where(denom != 0, denom, 1.0), v)


def elu_plus_one(x):
  x = np.asarray(x, np.float64)
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def random_qkv(B, T, S, N, K, H, seed=0, dtype=np.float32, std=1.0):
  """Seeded NumPy-drawn q [B,T,N,H], k/v [B,S,K,H] as jnp arrays (no jax.random compile per shape)."""
  import jax.numpy as jnp

  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, N, H)) * std
  k = rng.normal(size=(B, S, K, H)) * std
  v = rng.normal(size=(B, S, K, H))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def dense_softmax_jnp(q, k, v, vis, bias=None):
  """Plain jnp masked softmax in float32, differentiable (gradient reference).

  q [B,T,N,H], k/v [B,S,K,H], vis bool [B,N,T,S]; rows with nothing visible give 0.
  """
  import jax.numpy as jnp

  N = q.shape[2]
  k, v = (jnp.repeat(x, N // x.shape[2], axis=2) for x in (k, v))
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * q.shape[-1] ** -0.5
  as4 = lambda x: jnp.asarray(x).reshape((1,) * (4 - jnp.ndim(x)) + jnp.shape(x))  # no implicit rank promotion
  if bias is not None:
    logits = logits + as4(bias)
  vis = as4(vis)
  logits = jnp.where(vis, logits, -jnp.inf)
  m = jnp.max(logits, -1, keepdims=True)
  p = jnp.where(vis, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  return jnp.einsum("BNTS,BSNH->BTNH", p, v)


def decode_sequence(kind, q, k, v, **opts):
  """Runs `efficient_attn.attention`'s decoding API token by token over [B, T, ...] inputs: [B, T, N, H].

  Not a reference itself: what the tests compare with the parallel forward.
  """
  import jax
  import jax.numpy as jnp

  from efficient_attn import attention as A

  B, T, K, H = k.shape
  state = A.init_decode_state(kind, B, K, H, max_len=T, **opts)
  step = jax.jit(lambda st, q1, k1, v1: A.decode_step(kind, st, q1, k1, v1, **opts))
  outs = []
  for t in range(T):
    o, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    outs.append(o)
  return jnp.concatenate(outs, axis=1)


def one_device_env(**extra: str) -> dict:
  """Not a reference: the environment for a command-line process the tests start, with one CPU device
  (the suite's device count removed from XLA_FLAGS; a launcher or the CLI sets its own) and the suite's
  other XLA flags (its compile options) kept; `extra` added."""
  import os

  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  return {**os.environ, "XLA_FLAGS": flags, **extra}
