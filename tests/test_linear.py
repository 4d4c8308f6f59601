"""Linear attention against the float64 NumPy kernel reference (tests/reference.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attn.attention import decode_step, init_decode_state, linear_attention, linear_init_state, linear_step
from reference import elu_plus_one, kernel_reference, random_qkv, visibility

PHI = {"elu": elu_plus_one, "relu": lambda x: np.maximum(np.asarray(x, np.float64), 0.0)}


_qkv = random_qkv


def _reference(q, k, v, feature_map="elu", scale=None, **vis_kw):
  q64 = np.asarray(q, np.float64) * (1.0 if scale is None else scale)
  return kernel_reference(PHI[feature_map](q64), PHI[feature_map](k), v, **vis_kw)


def _segments(B, T, bounds):
  """int [B, T]: row b has segment starts `bounds[b]` (contiguous runs, as packing makes)."""
  ids = np.zeros((B, T), np.int32)
  for b, starts in enumerate(bounds):
    for i, s in enumerate(starts):
      ids[b, s:] = 10 * b + i + 1
  return ids


def quadratic_jnp(phi_q, phi_k, v, vis_BNTS):
  """Plain jnp masked kernel form; the gradient reference."""
  G = phi_q.shape[2] // phi_k.shape[2]
  phi_k, v = jnp.repeat(phi_k, G, axis=2), jnp.repeat(v, G, axis=2)
  a = jnp.einsum("btnm,bsnm->bnts", phi_q, phi_k) * vis_BNTS
  den = a.sum(-1, keepdims=True)
  return jnp.einsum("bnts,bsnh->btnh", a / jnp.where(den != 0, den, 1.0), v)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("N,K,chunk", [(4, 4, 8), (4, 2, 12), (6, 1, 16), (2, 1, None)])
def test_matches_reference(is_causal, N, K, chunk):
  q, k, v = _qkv(2, 40, 40, N, K, 8, seed=N + K)
  out = jax.jit(functools.partial(linear_attention, is_causal=is_causal, chunk_size=chunk))(q, k, v)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  np.testing.assert_allclose(out, _reference(q, k, v, is_causal=is_causal), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_without_jit(is_causal):
  q, k, v = _qkv(1, 20, 20, 4, 2, 8, seed=1)
  out = linear_attention(q, k, v, is_causal=is_causal, chunk_size=8)
  np.testing.assert_allclose(out, _reference(q, k, v, is_causal=is_causal), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("T,S", [(24, 40), (40, 24)])
def test_cross_lengths_relu_and_scale(is_causal, T, S):
  q, k, v = _qkv(2, T, S, 4, 2, 8, seed=3)
  out = linear_attention(q, k, v, is_causal=is_causal, feature_map="relu", scale=0.5, chunk_size=16)
  ref = _reference(q, k, v, feature_map="relu", scale=0.5, is_causal=is_causal)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("is_causal,mask_shape", [
    (True, (2, 1, 1, 40)), (False, (1, 40)), (False, (2, 4, 1, 40)), (True, (2, 4, 1, 40))])
def test_key_masks(is_causal, mask_shape):
  q, k, v = _qkv(2, 40, 40, 4, 2, 8, seed=5)
  mask = np.random.default_rng(1).random(mask_shape) > 0.3
  out = jax.jit(functools.partial(linear_attention, is_causal=is_causal, chunk_size=16))(q, k, v, mask=mask)
  np.testing.assert_allclose(out, _reference(q, k, v, is_causal=is_causal, mask=mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_batch_by_key_padding_mask(is_causal):
  """A 2-D [B, S] mask is key padding: the same as [B, 1, 1, S]."""
  q, k, v = _qkv(3, 40, 40, 4, 2, 8, seed=6)
  mask_BS = np.random.default_rng(2).random((3, 40)) > 0.3
  out = linear_attention(q, k, v, mask=mask_BS, is_causal=is_causal, chunk_size=16)
  ref = _reference(q, k, v, is_causal=is_causal, mask=mask_BS[:, None, None, :])
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("chunk", [8, 12, 64])
def test_segments(is_causal, chunk):
  # Row 0: a segment spans the chunk boundary at 8/16/24 and one segment is a single token;
  # row 1: one segment only, then padding masked out.
  B, T = 2, 40
  ids = _segments(B, T, [[0, 5, 19, 20, 33], [0]])
  mask = np.ones((B, 1, 1, T), bool)
  mask[1, ..., 30:] = False
  q, k, v = _qkv(B, T, T, 4, 2, 8, seed=7)
  fn = jax.jit(functools.partial(linear_attention, is_causal=is_causal, chunk_size=chunk))
  out = fn(q, k, v, mask=mask, segment_ids=ids)
  ref = _reference(q, k, v, is_causal=is_causal, segment_ids=ids, mask=mask)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  if chunk == 12 and is_causal:  # the pair form gives the same answer
    np.testing.assert_allclose(fn(q, k, v, mask=mask, segment_ids=(ids, ids)), out, atol=1e-6)


def test_rows_that_see_nothing_are_zero():
  q, k, v = _qkv(2, 16, 16, 2, 2, 4, seed=9)
  mask = np.ones((2, 1, 1, 16), bool)
  mask[0] = False
  out = jax.jit(functools.partial(linear_attention, chunk_size=4))(q, k, v, mask=mask)
  assert np.all(np.asarray(out[0]) == 0.0) and np.all(np.isfinite(out))
  fn = lambda q, k, v: linear_attention(q, k, v, mask=mask, is_causal=True, chunk_size=4)
  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  assert np.all(np.asarray(out[0]) == 0.0) and np.all(np.isfinite(out))
  assert all(np.all(np.isfinite(g)) for g in vjp(jnp.ones_like(out)))
  # relu features: a query with all-negative entries has φ(q) = 0, so a zero denominator.
  out = jax.jit(functools.partial(linear_attention, feature_map="relu"))(-jnp.abs(q), k, v)
  assert np.all(np.asarray(out) == 0.0)


@pytest.mark.parametrize("is_causal,segmented", [(True, False), (False, True), (True, True)])
def test_gradients_match_quadratic_form(is_causal, segmented):
  B, T, N, K, H = 2, 24, 4, 2, 8
  q, k, v = _qkv(B, T, T, N, K, H, seed=11)
  ids = _segments(B, T, [[0, 7, 13], [0, 20]]) if segmented else None
  mask = np.ones((B, 1, 1, T), bool)
  mask[0, ..., 3] = False
  vis = jnp.asarray(visibility(B, N, T, T, is_causal=is_causal, segment_ids=ids, mask=mask), jnp.float32)
  ct = jnp.asarray(np.random.default_rng(0).normal(size=q.shape), jnp.float32)
  phi = lambda x: jax.nn.elu(x) + 1.0
  ours = lambda q, k, v: jnp.sum(ct * linear_attention(
      q, k, v, mask=mask, is_causal=is_causal, segment_ids=ids, chunk_size=5))
  ref = lambda q, k, v: jnp.sum(ct * quadratic_jnp(phi(q), phi(k), v, vis))
  g_ours = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_causality_through_gradients():
  T, t0 = 32, 13
  q, k, v = _qkv(1, T, T, 2, 1, 4, seed=13)
  f = lambda q, k, v: linear_attention(q, k, v, is_causal=True, chunk_size=8)[:, t0].sum()
  gq, gk, gv = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  assert np.all(np.asarray(gk[:, t0 + 1:]) == 0) and np.all(np.asarray(gv[:, t0 + 1:]) == 0)
  assert np.all(np.asarray(gq[:, :t0]) == 0) and np.all(np.asarray(gq[:, t0 + 1:]) == 0)
  assert np.abs(gk[:, :t0 + 1]).sum() > 0 and np.abs(gq[:, t0]).sum() > 0


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_decode_matches_parallel(feature_map):
  B, T, N, K, H = 2, 20, 4, 2, 8
  q, k, v = _qkv(B, T, T, N, K, H, seed=17)
  state = init_decode_state("linear", B, K, H)
  assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, linear_init_state(B, K, H, H))
  step = jax.jit(functools.partial(decode_step, "linear", feature_map=feature_map, chunk_size=8, scale=0.7))
  outs = []
  for t in range(T):
    out, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    outs.append(out)
  parallel = jax.jit(functools.partial(linear_attention, is_causal=True, feature_map=feature_map, chunk_size=8,
                                       scale=0.7))(q, k, v)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), parallel, atol=2e-5, rtol=2e-5)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 21), K=st.sampled_from([1, 2]), G=st.sampled_from([1, 3]),
       H=st.integers(1, 6), chunk=st.integers(1, 9), is_causal=st.booleans(), segmented=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_shapes(B, T, K, G, H, chunk, is_causal, segmented, seed):
  q, k, v = _qkv(B, T, T, K * G, K, H, seed=seed)
  rng = np.random.default_rng(seed)
  ids = np.cumsum(rng.random((B, T)) < 0.2, axis=1) if segmented else None
  fn = jax.jit(functools.partial(linear_attention, is_causal=is_causal, chunk_size=chunk))
  out = fn(q, k, v, segment_ids=ids)
  ref = _reference(q, k, v, is_causal=is_causal, segment_ids=ids)
  np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5)


def test_bf16_in_bf16_out_and_long_sequence_finite():
  q, k, v = _qkv(1, 16384, 16384, 2, 1, 16, seed=19, dtype=jnp.bfloat16, std=3 / 4)  # |x| ~ 3
  out = jax.jit(functools.partial(linear_attention, is_causal=True))(q, k, v)
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
  ref = _reference(q[:, :256], k[:, :256], v[:, :256], is_causal=True)
  np.testing.assert_allclose(np.asarray(out[:, :256], np.float32), ref, atol=3e-2, rtol=3e-2)
  g = jax.jit(jax.grad(lambda k: linear_attention(q[:, :1024], k, v[:, :1024], is_causal=True)
                       .astype(jnp.float32).sum()))(k[:, :1024])
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("kwargs,match", [
    ({"feature_map": "softplus"}, "feature_map"),
    ({"bias": np.zeros((1, 1, 8, 8))}, "bias"),
    ({"mask": np.tril(np.ones((8, 8), bool))}, "mask"),
    ({"mask": np.ones((1, 1, 1, 8), np.float32)}, "mask"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
    ({"segment_ids": np.zeros((1, 7), np.int32)}, "segment_ids"),
])
def test_bad_inputs(kwargs, match):
  q, k, v = _qkv(1, 8, 8, 2, 1, 4)
  with pytest.raises(ValueError, match=match):
    linear_attention(q, k, v, **kwargs)


def test_bad_shapes_and_state():
  q, k, v = _qkv(1, 8, 8, 3, 2, 4)
  with pytest.raises(ValueError, match="multiple"):
    linear_attention(q, k, v)
  q, k, v = _qkv(1, 8, 6, 2, 1, 4)
  with pytest.raises(ValueError, match="segment_ids"):
    linear_attention(q, k, v, segment_ids=(np.zeros((1, 8)), np.zeros((1, 6))))
  with pytest.raises(ValueError, match="one token"):
    linear_step(linear_init_state(1, 1, 4, 4), q[:, :2], k[:, :2], v[:, :2])
  with pytest.raises(ValueError, match="state"):
    linear_step(linear_init_state(1, 2, 4, 4), q[:, :1], k[:, :1], v[:, :1])
