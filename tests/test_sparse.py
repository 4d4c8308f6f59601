"""block_sparse_attention against the float64 reference, with the layout as a dense mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from efficient_attn.attention import block_sparse_attention, masks
from efficient_attn.measure import compile_fn, temp_bytes
from reference import dense_softmax_jnp, softmax_reference, visibility


def _qkv(B, T, S, N, K, H, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=s).astype(dtype) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))


def _layout_mask(layout, block_size):
  """Layout -> a mask broadcastable to [B, N, T, S] for the reference."""
  m = masks.layout_to_mask(layout, block_size)
  return m[None] if m.ndim == 3 else m[None, None]


_dense = dense_softmax_jnp


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("T, S, N, K, bs, per_head", [
    (32, 32, 4, 4, 8, False),  # MHA, shared layout
    (32, 32, 4, 2, 4, True),   # GQA, per-head layouts
    (16, 24, 2, 1, 4, True),   # MQA, cross-attention lengths
    (32, 32, 4, 1, 8, False),  # MQA, shared layout
])
def test_matches_reference(is_causal, T, S, N, K, bs, per_head):
  q, k, v = _qkv(2, T, S, N, K, 8)
  rng = np.random.default_rng(T + S + N)
  layout = rng.random((N, T // bs, S // bs) if per_head else (T // bs, S // bs)) < 0.5
  fn = functools.partial(block_sparse_attention, is_causal=is_causal, layout=layout, block_size=bs)
  ref = softmax_reference(q, k, v, mask=_layout_mask(layout, bs), is_causal=is_causal)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), ref, atol=2e-5, rtol=2e-5)


def test_without_jit_and_builder_layouts():
  q, k, v = _qkv(1, 48, 48, 2, 1, 4)
  layout = masks.strided_layout(6, 6, stride=2, mode="fixed")
  ref = softmax_reference(q, k, v, mask=_layout_mask(layout, 8), is_causal=True)
  out = block_sparse_attention(q, k, v, is_causal=True, layout=layout, block_size=8)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  bigbird = masks.bigbird_layout(6, 6, window=3, num_global=1, num_random=1, seed=0, num_heads=2)
  ref = softmax_reference(q, k, v, mask=_layout_mask(bigbird, 8))
  out = jax.jit(functools.partial(block_sparse_attention, layout=bigbird, block_size=8))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("per_head", [False, True])
def test_mask_bias_segments(per_head):
  B, T, N, K, bs = 2, 32, 4, 2, 4
  q, k, v = _qkv(B, T, T, N, K, 8, seed=1)
  rng = np.random.default_rng(1)
  layout = rng.random((N, 8, 8) if per_head else (8, 8)) < 0.6
  mask = rng.random((B, 1, T, T)) > 0.3
  bias = rng.normal(size=(1, N, T, T)).astype(np.float32)
  seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
  fn = jax.jit(functools.partial(block_sparse_attention, is_causal=True, layout=layout, block_size=bs))
  ref = softmax_reference(q, k, v, bias=bias, mask=mask & _layout_mask(layout, bs), segment_ids=seg, is_causal=True)
  np.testing.assert_allclose(fn(q, k, v, bias, mask, segment_ids=seg), ref, atol=2e-5, rtol=2e-5)
  # Padding mask [B, 1, 1, S] with a per-head mask [1, N, 1, 1], segment id pair.
  pad = np.arange(T)[None, None, None, :] < np.array([T, T - 9])[:, None, None, None]
  heads = (np.arange(N) != 1)[None, :, None, None]
  ref = softmax_reference(q, k, v, mask=pad & heads & _layout_mask(layout, bs), segment_ids=(seg, seg))
  out = jax.jit(functools.partial(block_sparse_attention, layout=layout, block_size=bs))(
      q, k, v, None, jnp.asarray(pad) & jnp.asarray(heads), segment_ids=(seg, seg))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(out)[:, :, 1], 0.0)  # Head 1 sees nothing: 0.


@pytest.mark.parametrize("is_causal", [True, False])
def test_gradients_match_dense(is_causal):
  B, T, N, K, bs = 1, 24, 4, 2, 4
  q, k, v = _qkv(B, T, T, N, K, 8, seed=2)
  rng = np.random.default_rng(2)
  layout = rng.random((N, 6, 6)) < 0.5
  bias = rng.normal(size=(B, N, T, T)).astype(np.float32)
  vis = visibility(B, N, T, T, mask=_layout_mask(layout, bs), is_causal=is_causal)
  ct = rng.normal(size=q.shape).astype(np.float32)
  loss = lambda f: lambda q, k, v, b: jnp.sum(f(q, k, v, b) * ct)
  sparse = lambda q, k, v, b: block_sparse_attention(q, k, v, b, is_causal=is_causal, layout=layout, block_size=bs)
  got = jax.jit(jax.grad(loss(sparse), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  want = jax.jit(jax.grad(loss(lambda q, k, v, b: _dense(q, k, v, vis, b)), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-4)
  np.testing.assert_array_equal(np.asarray(got[3])[~vis], 0.0)  # Unmarked blocks get no bias gradient.


def test_causality_through_gradients():
  """A fully marked layout with is_causal: blocks above the diagonal are dropped."""
  T, bs, t = 32, 8, 13
  q, k, v = _qkv(1, T, T, 2, 1, 4, seed=3)
  layout = np.ones((T // bs, T // bs), bool)
  out_t = lambda k, v: block_sparse_attention(q, k, v, is_causal=True, layout=layout, block_size=bs)[:, t].sum()
  dk, dv = jax.jit(jax.grad(out_t, argnums=(0, 1)))(k, v)
  seen = np.abs(np.asarray(dk)).sum((0, 2, 3)) + np.abs(np.asarray(dv)).sum((0, 2, 3))
  np.testing.assert_array_equal(np.flatnonzero(seen), np.arange(t + 1))


def test_empty_layout_rows_are_zero():
  q, k, v = _qkv(1, 16, 16, 2, 2, 4, seed=4)
  layout = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], bool)
  f = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, layout=layout, block_size=4))
  out = np.asarray(f(q, k, v))
  np.testing.assert_array_equal(out[:, 4:8], 0.0)
  np.testing.assert_allclose(out, softmax_reference(q, k, v, mask=_layout_mask(layout, 4)), atol=2e-5)
  empty = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, layout=np.zeros((4, 4), bool), block_size=4))
  np.testing.assert_array_equal(np.asarray(empty(q, k, v)), 0.0)
  grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_bfloat16_in_bfloat16_out():
  q, k, v = _qkv(1, 32, 32, 4, 2, 16, seed=5)
  qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  layout = masks.local_layout(4, 4, window=2, causal=True)
  out = jax.jit(functools.partial(block_sparse_attention, is_causal=True, layout=layout, block_size=8))(qb, kb, vb)
  assert out.dtype == jnp.bfloat16
  ref = softmax_reference(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), mask=_layout_mask(layout, 8),
                          is_causal=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)


@settings(max_examples=10, deadline=None)
@given(nq=st.integers(1, 5), nk=st.integers(1, 5), bs=st.sampled_from([1, 2, 4]), density=st.floats(0.0, 1.0),
       is_causal=st.booleans(), per_head=st.booleans(), seed=st.integers(0, 99))
def test_property_any_layout(nq, nk, bs, density, is_causal, per_head, seed):
  N, K = 2, 1
  q, k, v = _qkv(1, nq * bs, nk * bs, N, K, 4, seed=seed)
  layout = np.random.default_rng(seed).random((N, nq, nk) if per_head else (nq, nk)) < density
  fn = jax.jit(functools.partial(block_sparse_attention, is_causal=is_causal, layout=layout, block_size=bs))
  ref = softmax_reference(q, k, v, mask=_layout_mask(layout, bs), is_causal=is_causal)
  np.testing.assert_allclose(fn(q, k, v), ref, atol=3e-5, rtol=3e-5)


def test_no_T_by_S_tensor():
  """With a BigBird layout at T=2048, compiled scratch memory is a small fraction of the dense softmax's."""
  T, bs = 2048, 32
  q, k, v = (jnp.zeros((1, T, 2, 16), jnp.float32) for _ in range(3))
  pad = jnp.ones((1, 1, 1, T), bool)
  layout = masks.bigbird_layout(T // bs, T // bs, window=3, num_global=1, num_random=1, seed=0)
  grad = lambda f: jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))
  sparse = compile_fn(grad(lambda q, k, v: block_sparse_attention(q, k, v, None, pad, layout=layout, block_size=bs)),
                      q, k, v)
  dense = compile_fn(grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=pad, implementation="xla")),
                     q, k, v)
  assert temp_bytes(sparse) * 5 < temp_bytes(dense), (temp_bytes(sparse), temp_bytes(dense))
  assert f"{T},{T}]" not in sparse.as_text()  # No [.., T, S] array anywhere in the compiled program.


@pytest.mark.parametrize("kwargs, match", [
    (dict(layout=np.ones((4, 4), bool), block_size=3), "block_size"),
    (dict(layout=np.ones((4, 4), bool), block_size=0), "block_size"),
    (dict(layout=np.ones((4, 3), bool), block_size=4), "layout"),
    (dict(layout=np.ones((3, 4, 4), bool), block_size=4), "layout"),
    (dict(layout=np.full((4, 4), 0.5), block_size=4), "layout"),
    (dict(layout=np.ones((4, 4), bool), block_size=4, mask=np.ones((2, 1, 16, 16), bool)), "mask"),
    (dict(layout=np.ones((4, 4), bool), block_size=4, segment_ids=np.zeros((1, 16, 1))), "segment_ids"),
])
def test_bad_arguments(kwargs, match):
  q, k, v = _qkv(1, 16, 16, 2, 1, 4)
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, **kwargs)


def test_traced_layout_refused():
  q, k, v = _qkv(1, 16, 16, 2, 1, 4)
  f = jax.jit(lambda q, k, v, layout: block_sparse_attention(q, k, v, layout=layout, block_size=4))
  with pytest.raises(ValueError, match="traced"):
    f(q, k, v, jnp.ones((4, 4), bool))
