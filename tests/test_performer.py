"""Performer (FAVOR+) attention: exact against the kernel reference with NumPy-recomputed
features, statistical against exact softmax attention."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn.attention import (decode_step, init_decode_state, performer_attention, performer_projection,
                                      performer_step)
from efficient_attn.attention.performer import RELU_EPS
from reference import kernel_reference, random_qkv, softmax_reference, visibility


_qkv = random_qkv


def np_features(x, W, scale=None, kernel="softmax"):
  """FAVOR+ features in float64 NumPy, without any stabiliser."""
  x = np.asarray(x, np.float64)
  W = np.asarray(W, np.float64)
  M, H = W.shape
  x = x * math.sqrt(H ** -0.5 if scale is None else scale)
  wx = x @ W.T
  if kernel == "relu":
    return (np.maximum(wx, 0.0) + RELU_EPS) / math.sqrt(M)
  return np.exp(wx - 0.5 * np.sum(x * x, -1, keepdims=True)) / math.sqrt(M)


def _reference(q, k, v, W, scale=None, kernel="softmax", **vis_kw):
  return kernel_reference(np_features(q, W, scale, kernel), np_features(k, W, scale, kernel), v, **vis_kw)


W16 = performer_projection(jax.random.key(0), 24, 8)  # M not a multiple of H: a cut block


@pytest.mark.parametrize("is_causal,N,K,chunk,kernel", [
    (False, 4, 2, None, "softmax"), (True, 4, 2, 12, "softmax"), (True, 4, 1, 8, "relu"),
    (False, 2, 2, 16, "relu"), (True, 6, 2, None, "softmax")])
def test_matches_reference(is_causal, N, K, chunk, kernel):
  q, k, v = _qkv(2, 40, 40, N, K, 8, seed=N + K)
  fn = jax.jit(functools.partial(performer_attention, is_causal=is_causal, projection=W16, kernel=kernel,
                                 chunk_size=chunk, scale=0.3))
  out = fn(q, k, v)
  ref = _reference(q, k, v, W16, scale=0.3, kernel=kernel, is_causal=is_causal)
  np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5)


def test_masks_and_segments_with_and_without_jit():
  B, T = 2, 40
  ids = np.zeros((B, T), np.int32)
  ids[0, 6:], ids[0, 21:], ids[1, 30:] = 1, 2, 3  # segment 1 of row 0 spans chunk boundaries
  mask = np.ones((B, 1, 1, T), bool)
  mask[1, ..., 30:] = False
  mask[0, ..., 2] = False
  q, k, v = _qkv(B, T, T, 4, 2, 8, seed=3)
  k = k.at[1, 30:].set(50.0)  # huge padded keys must not affect the key stabiliser
  for is_causal in (False, True):
    fn = functools.partial(performer_attention, is_causal=is_causal, projection=W16, chunk_size=16)
    out = (fn if is_causal else jax.jit(fn))(q, k, v, mask=mask, segment_ids=ids)
    ref = _reference(q, k, v, W16, is_causal=is_causal, segment_ids=ids, mask=mask)
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5)


def test_gradients_and_causality():
  B, T, N, K, H = 1, 24, 4, 2, 8
  q, k, v = _qkv(B, T, T, N, K, H, seed=5)
  ids = np.repeat(np.array([[0] * 9 + [1] * 15]), B, 0)
  vis = jnp.asarray(visibility(B, N, T, T, is_causal=True, segment_ids=ids), jnp.float32)
  ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  W = jnp.asarray(W16)

  def phi(x):  # plain jnp features, no stabiliser
    x = x * (H ** -0.25)
    return jnp.exp(x @ W.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / math.sqrt(W.shape[0])

  def quadratic(q, k, v):
    G = N // K
    a = jnp.einsum("btnm,bsnm->bnts", phi(q), jnp.repeat(phi(k), G, 2)) * vis
    return jnp.einsum("bnts,bsnh->btnh", a / a.sum(-1, keepdims=True), jnp.repeat(v, G, 2))

  ours = lambda q, k, v: performer_attention(q, k, v, is_causal=True, segment_ids=ids, projection=W, chunk_size=5)
  g_ours = jax.jit(jax.grad(lambda *a: jnp.sum(ct * ours(*a)), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(ct * quadratic(*a)), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)
  # Causality through gradients: the key stabiliser looks at all keys, under stop_gradient.
  t0 = 13
  gk, gv = jax.jit(jax.grad(lambda k, v: ours(q, k, v)[:, t0].sum(), argnums=(0, 1)))(k, v)
  assert np.all(np.asarray(gk[:, t0 + 1:]) == 0) and np.all(np.asarray(gv[:, t0 + 1:]) == 0)
  assert np.abs(gk[:, 9:t0 + 1]).sum() > 0 and np.all(np.asarray(gk[:, :9]) == 0)  # other segment


def test_approximation_improves_with_features():
  """Mean |performer - softmax| falls as M grows (averaged over fixed seeds: deterministic)."""
  q, k, v = _qkv(1, 64, 64, 2, 2, 16, seed=7, std=0.7)
  exact = softmax_reference(q, k, v)
  errors = []
  for M in (16, 256, 1024):
    err = jax.jit(lambda keys: jax.vmap(lambda r: jnp.abs(
        performer_attention(q, k, v, projection=performer_projection(r, M, 16)) - exact).mean())(keys))
    errors.append(float(err(jax.random.split(jax.random.key(0), 3)).mean()))
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.05, errors


def test_features_estimate_softmax_kernel():
  """φ(q)·φ(k) is an unbiased estimate of exp(scale·q·k): check it at a large M."""
  H, scale = 8, 8 ** -0.5
  rng = np.random.default_rng(11)
  q, k = rng.normal(size=(2, 6, H)) * 0.5
  W = performer_projection(jax.random.key(3), 1 << 15, H)
  est = np_features(q, W) @ np_features(k, W).T
  exact = np.exp(scale * q @ k.T)
  np.testing.assert_allclose(est, exact, rtol=0.05)


def test_projection_orthogonal_blocks_and_chi_norms():
  M, H = 4096, 16
  W = performer_projection(jax.random.key(0), M, H)
  assert W.shape == (M, H) and W.dtype == jnp.float32
  W = np.asarray(W, np.float64)
  norms = np.linalg.norm(W, axis=1)
  unit = (W / norms[:, None]).reshape(M // H, H, H)
  gram = np.einsum("bih,bjh->bij", unit, unit)
  np.testing.assert_allclose(gram, np.broadcast_to(np.eye(H), gram.shape), atol=1e-5)
  # chi(H): E = √2·Γ((H+1)/2)/Γ(H/2), Var = H − E².
  mean = math.sqrt(2) * math.exp(math.lgamma((H + 1) / 2) - math.lgamma(H / 2))
  assert abs(norms.mean() - mean) < 0.05 and abs(norms.var() - (H - mean ** 2)) < 0.05
  # Different blocks are independent, so rows of different blocks are not orthogonal.
  assert np.abs(unit[0] @ unit[1].T).max() > 0.1
  # Same key -> same matrix; a new key is a redraw; iid Gaussian when not orthogonal.
  np.testing.assert_array_equal(performer_projection(jax.random.key(0), M, H), W.astype(np.float32))
  assert not np.allclose(performer_projection(jax.random.key(1), M, H), W)
  iid = np.asarray(performer_projection(jax.random.key(0), M, H, orthogonal=False))
  assert abs(iid.mean()) < 0.02 and abs(iid.var() - 1) < 0.03
  assert performer_projection(jax.random.key(0), 20, 16).shape == (20, 16)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_decode_matches_parallel(kernel):
  B, T, N, K, H = 2, 16, 4, 2, 8
  q, k, v = _qkv(B, T, T, N, K, H, seed=13)
  k = k * jnp.linspace(0.2, 3.0, T)[None, :, None, None]  # growing keys: the running max is rescaled
  state = init_decode_state("performer", B, K, H, projection=W16)
  step = jax.jit(functools.partial(decode_step, "performer", projection=W16, kernel=kernel, chunk_size=4))
  outs = []
  for t in range(T):
    out, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    outs.append(out)
  parallel = jax.jit(functools.partial(performer_attention, is_causal=True, kernel=kernel, chunk_size=4))(
      q, k, v, projection=W16)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), parallel, atol=3e-5, rtol=3e-5)


def test_bf16_long_sequence_finite():
  q, k, v = _qkv(1, 16384, 16384, 2, 1, 16, seed=17, dtype=jnp.bfloat16, std=3 / 4)  # |x| ~ 3
  W = performer_projection(jax.random.key(2), 64, 16)
  fn = functools.partial(performer_attention, is_causal=True, projection=W)
  out = jax.jit(fn)(q, k, v)
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
  ref = _reference(q[:, :256], k[:, :256], v[:, :256], W, is_causal=True)
  np.testing.assert_allclose(np.asarray(out[:, :256], np.float32), ref, atol=3e-2, rtol=3e-2)
  g = jax.jit(jax.grad(lambda q: fn(q, k[:, :1024], v[:, :1024]).astype(jnp.float32).sum()))(q[:, :1024])
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("kwargs,match", [
    ({"kernel": "cosine"}, "kernel"),
    ({"projection": None}, "projection"),
    ({"projection": np.zeros((16, 5), np.float32)}, "projection"),
    ({"bias": np.zeros((1, 1, 8, 8))}, "bias"),
    ({"mask": np.ones((1, 1, 8, 8), bool)}, "mask"),
    ({"chunk_size": -1}, "chunk_size"),
    ({"scale": -1.0}, "scale"),
])
def test_bad_inputs(kwargs, match):
  q, k, v = _qkv(1, 8, 8, 2, 1, 8)
  kwargs = {"projection": W16, **kwargs}
  with pytest.raises(ValueError, match=match):
    performer_attention(q, k, v, **kwargs)
  with pytest.raises(ValueError, match="num_features"):
    performer_projection(jax.random.key(0), 0, 8)
  with pytest.raises(ValueError, match="projection"):
    performer_step(init_decode_state("performer", 1, 1, 8, projection=W16), q[:, :1], k[:, :1], v[:, :1])
