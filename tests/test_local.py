"""local_attention against the float64 reference (softmax_reference with window=)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from efficient_attn.attention import local_attention
from efficient_attn.measure import compile_fn, temp_bytes
from reference import dense_softmax_jnp, softmax_reference, visibility


def _qkv(B, T, N, K, H, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=s).astype(dtype) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))


_dense = dense_softmax_jnp


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("T, N, K, window, block_size", [
    (64, 4, 4, 16, None),   # MHA, block = window
    (64, 4, 2, 16, 8),      # GQA, two blocks of look-back
    (50, 4, 1, 7, 5),       # MQA, T not divisible by the block: padded internally
    (24, 2, 2, 40, None),   # window longer than the sequence
    (32, 2, 1, 1, 4),       # window 1: only itself
])
def test_matches_reference(is_causal, T, N, K, window, block_size):
  q, k, v = _qkv(2, T, N, K, 8)
  fn = functools.partial(local_attention, is_causal=is_causal, window=window, block_size=block_size)
  ref = softmax_reference(q, k, v, is_causal=is_causal, window=window)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), ref, atol=2e-5, rtol=2e-5)


def test_without_jit():
  q, k, v = _qkv(1, 20, 2, 1, 4)
  ref = softmax_reference(q, k, v, is_causal=True, window=6)
  np.testing.assert_allclose(local_attention(q, k, v, is_causal=True, window=6, block_size=4), ref, atol=2e-5)


@pytest.mark.parametrize("is_causal", [True, False])
def test_mask_bias_segments(is_causal):
  B, T, N, K = 2, 48, 4, 2
  q, k, v = _qkv(B, T, N, K, 8, seed=1)
  rng = np.random.default_rng(1)
  mask = rng.random((B, 1, T, T)) > 0.3
  bias = rng.normal(size=(1, N, T, T)).astype(np.float32)
  seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
  fn = jax.jit(functools.partial(local_attention, is_causal=is_causal, window=10, block_size=8))
  ref = softmax_reference(q, k, v, bias=bias, mask=mask, segment_ids=seg, is_causal=is_causal, window=10)
  np.testing.assert_allclose(fn(q, k, v, bias, mask, segment_ids=seg), ref, atol=2e-5, rtol=2e-5)
  # Padding mask [B, 1, 1, S] and per-query mask [1, 1, T, 1] (broadcast axes), segment id pair.
  pad = np.arange(T)[None, None, None, :] < np.array([T, T - 13])[:, None, None, None]
  rows = (np.arange(T) % 5 != 0)[None, None, :, None]
  ref = softmax_reference(q, k, v, mask=pad & rows, segment_ids=(seg, seg), is_causal=is_causal, window=10)
  out = jax.jit(functools.partial(local_attention, is_causal=is_causal, window=10, block_size=8))(
      q, k, v, None, jnp.asarray(pad) & jnp.asarray(rows), segment_ids=(seg, seg))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(out)[:, ::5], 0.0)  # Rows with no visible key are 0.


@pytest.mark.parametrize("is_causal", [True, False])
def test_gradients_match_dense(is_causal):
  B, T, N, K, window = 1, 40, 4, 2, 9
  q, k, v = _qkv(B, T, N, K, 8, seed=2)
  rng = np.random.default_rng(2)
  bias = rng.normal(size=(B, N, T, T)).astype(np.float32)
  mask = rng.random((B, 1, 1, T)) > 0.2
  vis = visibility(B, N, T, T, mask=mask, is_causal=is_causal, window=window)
  ct = rng.normal(size=q.shape).astype(np.float32)
  loss = lambda f: lambda q, k, v, b: jnp.sum(f(q, k, v, b) * ct)
  local = lambda q, k, v, b: local_attention(q, k, v, b, mask, is_causal=is_causal, window=window, block_size=4)
  got = jax.jit(jax.grad(loss(local), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  want = jax.jit(jax.grad(loss(lambda q, k, v, b: _dense(q, k, v, vis, b)), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-4)
  # Bias outside the band gets no gradient.
  np.testing.assert_array_equal(np.asarray(got[3])[~np.broadcast_to(vis, bias.shape)], 0.0)


def test_causality_through_gradients():
  B, T, N, K, window, t = 1, 32, 2, 1, 6, 17
  q, k, v = _qkv(B, T, N, K, 8, seed=3)
  out_t = lambda k, v: local_attention(q, k, v, is_causal=True, window=window, block_size=4)[:, t].sum()
  dk, dv = jax.jit(jax.grad(out_t, argnums=(0, 1)))(k, v)
  seen = np.abs(np.asarray(dk)).sum((0, 2, 3)) + np.abs(np.asarray(dv)).sum((0, 2, 3))
  np.testing.assert_array_equal(np.flatnonzero(seen), np.arange(t - window + 1, t + 1))


def test_empty_rows_are_zero_with_finite_gradients():
  q, k, v = _qkv(1, 16, 2, 2, 4, seed=4)
  mask = np.ones((1, 1, 16, 16), bool)
  mask[..., 3, :] = False
  f = lambda q, k, v: local_attention(q, k, v, None, mask, window=4)
  np.testing.assert_array_equal(np.asarray(jax.jit(f)(q, k, v))[:, 3], 0.0)
  grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_bfloat16_in_bfloat16_out():
  q, k, v = _qkv(1, 32, 4, 2, 16, seed=5)
  qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  out = jax.jit(functools.partial(local_attention, is_causal=True, window=8))(qb, kb, vb)
  assert out.dtype == jnp.bfloat16
  ref = softmax_reference(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), is_causal=True, window=8)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 40), window=st.integers(1, 20), block=st.one_of(st.none(), st.integers(1, 16)),
       is_causal=st.booleans(), heads=st.sampled_from([(2, 2), (2, 1), (3, 1)]))
def test_property_any_shape(T, window, block, is_causal, heads):
  N, K = heads
  q, k, v = _qkv(1, T, N, K, 4, seed=T)
  fn = jax.jit(functools.partial(local_attention, is_causal=is_causal, window=window, block_size=block))
  ref = softmax_reference(q, k, v, is_causal=is_causal, window=window)
  np.testing.assert_allclose(fn(q, k, v), ref, atol=3e-5, rtol=3e-5)


def test_no_T_by_S_tensor():
  """Compiled scratch memory at T=2048, window 64 is a small fraction of the dense softmax's."""
  T, window = 2048, 64
  q, k, v = (jnp.zeros((1, T, 2, 16), jnp.float32) for _ in range(3))
  pad = jnp.ones((1, 1, 1, T), bool)
  grad = lambda f: jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))
  local = compile_fn(grad(lambda q, k, v: local_attention(q, k, v, None, pad, is_causal=True, window=window)), q, k, v)
  dense = compile_fn(grad(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=pad, is_causal=True, implementation="xla")), q, k, v)
  assert temp_bytes(local) * 5 < temp_bytes(dense), (temp_bytes(local), temp_bytes(dense))
  assert f"{T},{T}]" not in local.as_text()  # No [.., T, S] array anywhere in the compiled program.
  longer = [jnp.zeros((1, 2 * T, 2, 16), jnp.float32)] * 3
  pad2 = jnp.ones((1, 1, 1, 2 * T), bool)
  local2 = compile_fn(grad(lambda q, k, v: local_attention(q, k, v, None, pad2, is_causal=True, window=window)),
                      *longer)
  assert temp_bytes(local2) <= 2.5 * temp_bytes(local)  # Linear in T.


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(window=4, block_size=0), "block_size"),
    (dict(window=4, mask=np.ones((1, 1, 16, 16), np.int32)), "mask"),
    (dict(window=4, mask=np.ones((1, 1, 15, 16), bool)), "mask"),
    (dict(window=4, bias=np.ones((3, 16, 16), np.float32)), "bias"),
    (dict(window=4, segment_ids=np.zeros((1, 15), np.int32)), "segment_ids"),
])
def test_bad_arguments(kwargs, match):
  q, k, v = _qkv(1, 16, 2, 2, 4)
  with pytest.raises(ValueError, match=match):
    local_attention(q, k, v, **kwargs)


def test_cross_attention_lengths_refused():
  q, _, _ = _qkv(1, 16, 2, 2, 4)
  _, k, v = _qkv(1, 24, 2, 2, 4)
  with pytest.raises(ValueError, match="T == S"):
    local_attention(q, k, v, window=4)
