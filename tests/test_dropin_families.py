"""local / sparse / linear / performer as drop-ins for jax.nn.dot_product_attention.

What jax.nn and Flax users pass: any number of leading batch dims (none, one, several;
vmap), jax.nn's query / key-value sequence lengths, a value head dim Hv != H, float64
under x64. Every test runs under jax_numpy_rank_promotion="raise" (no implicit rank
promotion anywhere), and is checked against the float64 NumPy references of
tests/reference.py, jax.nn itself, or the plain 4-D call.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import attention as A
from reference import elu_plus_one, kernel_reference, softmax_reference

T, N, K, H, M = 16, 4, 2, 8, 16
WINDOW, BS = 5, 4
# Per-row block counts 2, 2, 4, 2: two buckets of the block plan.
LAYOUT = np.array([[1, 0, 0, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]], bool)
PROJECTION = np.random.default_rng(7).normal(size=(M, H)).astype(np.float32)  # iid Gaussian FAVOR+ rows

FNS = {
    "local": (A.local_attention, dict(window=WINDOW, block_size=BS)),
    "sparse": (A.block_sparse_attention, dict(layout=LAYOUT, block_size=BS)),
    "linear": (A.linear_attention, dict(chunk_size=4)),
    "performer": (A.performer_attention, dict(projection=PROJECTION, chunk_size=4)),
}
FAMILIES = list(FNS)
KERNELIZED = ("linear", "performer")


@pytest.fixture(autouse=True)
def _rank_promotion_raise():
  with jax.numpy_rank_promotion("raise"):
    yield


def test_fixture_makes_rank_promotion_raise():
  with pytest.raises(ValueError, match="rank_promotion"):
    jnp.ones((2, 3)) + jnp.ones(3)


@functools.lru_cache(maxsize=None)
def _jitted(name, is_causal):
  fn, opts = FNS[name]
  return jax.jit(lambda q, k, v, bias, mask, q_len, kv_len: fn(
      q, k, v, bias, mask, is_causal=is_causal, query_seq_lengths=q_len, key_value_seq_lengths=kv_len, **opts))


def _call(name, q, k, v, bias=None, mask=None, *, is_causal=False, query_seq_lengths=None,
          key_value_seq_lengths=None):
  """The family's function under jit (one compile per shape; eager dispatch is slower on CPU)."""
  return _jitted(name, is_causal)(q, k, v, bias, mask, query_seq_lengths, key_value_seq_lengths)


def _favor(x, scale):
  """Unstabilised FAVOR+ features exp(W x' − |x'|²/2) / √M in float64 (the stabilisers cancel)."""
  x = np.asarray(x, np.float64) * np.sqrt(scale)
  w = PROJECTION.astype(np.float64)
  return np.exp(x @ w.T - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(M)


def _reference(name, q, k, v, *, bias=None, mask=None, is_causal=False):
  """float64 NumPy output of family `name` on 4-D inputs (v may have its own head dim)."""
  if name == "local":
    return softmax_reference(q, k, v, bias=bias, mask=mask, is_causal=is_causal, window=WINDOW)
  if name == "sparse":
    dense = np.kron(LAYOUT, np.ones((BS, BS), bool)).astype(bool)
    mask = dense if mask is None else dense & np.asarray(mask)
    return softmax_reference(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
  assert bias is None
  if name == "linear":
    return kernel_reference(elu_plus_one(q), elu_plus_one(k), v, mask=mask, is_causal=is_causal)
  return kernel_reference(_favor(q, H ** -0.5), _favor(k, H ** -0.5), v, mask=mask, is_causal=is_causal)


def _qkv(batch, seed=0, Hv=H, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(*batch, T, N, H)) * 0.5
  k = rng.normal(size=(*batch, T, K, H)) * 0.5
  v = rng.normal(size=(*batch, T, K, Hv))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _mask_bias(name, lead, seed=1):
  """(bias, mask) of shape lead + [..., T|1, S]: a general mask and bias for the softmax families,
  a key mask (no bias) for the kernelized ones. Every row keeps key 0 or its own position."""
  rng = np.random.default_rng(seed)
  if name in KERNELIZED:
    mask = rng.random((*lead, 1, 1, T)) < 0.7
    mask[..., 0] = True
    return None, mask
  mask = rng.random((*lead, 1, T, T)) < 0.7
  mask |= np.eye(T, dtype=bool)
  bias = rng.normal(size=(*lead, N, T, T)).astype(np.float32)
  return bias, mask


def _flat(x, batch):
  """Broadcast x over the batch dims `batch`, then flatten them into one."""
  x = np.asarray(x)
  x = np.broadcast_to(x, (*batch, *x.shape[len(batch):]))
  return x.reshape(-1, *x.shape[len(batch):])


# ----------------------------------------------------------------------------- (a) leading batch dims


@pytest.mark.parametrize("name", FAMILIES)
def test_five_dim_and_three_dim_inputs_equal_the_flattened_call(name):
  batch = (2, 3)
  q, k, v = _qkv(batch)
  bias, mask = _mask_bias(name, (2, 1))  # varies over the first batch dim only
  out = _call(name, q, k, v, bias, mask)
  assert out.shape == (*batch, T, N, H)

  q4, k4, v4 = (x.reshape(6, *x.shape[2:]) for x in (q, k, v))
  bias4 = None if bias is None else _flat(bias, batch)
  out4 = _call(name, q4, k4, v4, bias4, _flat(mask, batch))
  np.testing.assert_allclose(out.reshape(out4.shape), out4, rtol=1e-5, atol=1e-6)
  ref = _reference(name, q4, k4, v4, bias=bias4, mask=_flat(mask, batch))
  np.testing.assert_allclose(out4, ref, rtol=2e-4, atol=2e-5)

  out3 = _call(name, q[1, 2], k[1, 2], v[1, 2], None if bias is None else bias[1, 0], mask[1, 0])
  assert out3.shape == (T, N, H)
  np.testing.assert_allclose(out3, out[1, 2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_leading_dims_are_one_sentence(name):
  q, k, v = _qkv((2, 3))
  with pytest.raises(ValueError, match="leading batch dims differ"):
    _call(name, q, k[:, :2], v[:, :2])
  with pytest.raises(ValueError, match="key_value_seq_lengths"):
    _call(name, q, k, v, key_value_seq_lengths=np.ones((6,), np.int32))


# ----------------------------------------------------------------------------- (b) vmap


@pytest.mark.parametrize("name", FAMILIES)
def test_vmap_over_qkv_equals_the_batched_call(name):
  q, k, v = _qkv((3,), seed=4)
  bias, mask = _mask_bias(name, (), seed=5)  # unbatched: [N, T, S] / [1, T, S] or a key mask [1, 1, S]
  fn, opts = FNS[name]
  vmapped = jax.jit(jax.vmap(lambda q, k, v, b, m: fn(q, k, v, b, m, **opts), in_axes=(0, 0, 0, None, None)))
  out = vmapped(q, k, v, bias, mask)
  batched = _call(name, q, k, v, bias, mask)
  assert out.shape == batched.shape == (3, T, N, H)
  np.testing.assert_allclose(out, batched, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched, _reference(name, q, k, v, bias=bias, mask=mask), rtol=2e-4, atol=2e-5)


# ----------------------------------------------------------------------------- (c) sequence lengths


@pytest.mark.parametrize("name", FAMILIES)
def test_seq_lengths_equal_an_explicit_key_mask_and_zero_rows(name):
  batch = (2, 3)
  q, k, v = _qkv(batch, seed=6)
  q_len = np.array([[16, 5, 1], [9, 0, 12]], np.int32)
  kv_len = np.array([[16, 1, 7], [9, 12, 3]], np.int32)
  out = _call(name, q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
  assert out.shape == (*batch, T, N, H)

  q4, k4, v4 = (x.reshape(6, *x.shape[2:]) for x in (q, k, v))
  key_mask = (np.arange(T) < kv_len.reshape(6, 1)).reshape(6, 1, 1, T)
  rows = (np.arange(T) < q_len.reshape(6, 1)).reshape(6, T, 1, 1)
  explicit = _call(name, q4, k4, v4, mask=key_mask)
  out4 = np.asarray(out).reshape(explicit.shape)
  np.testing.assert_allclose(out4, np.where(rows, explicit, 0.0), rtol=1e-5, atol=1e-6)
  assert (out4[np.broadcast_to(~rows, out4.shape)] == 0).all()
  ref = np.where(rows, _reference(name, q4, k4, v4, mask=key_mask), 0.0)
  np.testing.assert_allclose(out4, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("name", ["local", "sparse"])
def test_seq_lengths_match_jax_nn(name, is_causal):
  """jax.nn.dot_product_attention with the same window / layout and lengths; rows that see no key are 0
  here (jax.nn averages all values in a fully masked row it does not zero)."""
  q, k, v = _qkv((4,), seed=8)
  q_len, kv_len = np.array([16, 11, 3, 0], np.int32), np.array([16, 2, 13, 8], np.int32)
  out = _call(name, q, k, v, is_causal=is_causal, query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
  if name == "local":
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, query_seq_lengths=q_len,
                                            key_value_seq_lengths=kv_len,
                                            local_window_size=(WINDOW - 1, 0 if is_causal else WINDOW - 1))
    t, s = np.arange(T)[:, None], np.arange(T)[None]
    allowed = (t - s < WINDOW) & (s - t < (1 if is_causal else WINDOW))
  else:
    allowed = np.kron(LAYOUT, np.ones((BS, BS), bool)).astype(bool)
    if is_causal:
      allowed &= np.tri(T, dtype=bool)
    expected = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(allowed), query_seq_lengths=q_len,
                                            key_value_seq_lengths=kv_len)
  sees = (allowed[None] & (np.arange(T) < kv_len[:, None, None]) & (np.arange(T)[:, None] < q_len[:, None, None]))
  sees_BT11 = sees.any(-1)[:, :, None, None]
  assert sees_BT11.sum() > 10 and (~sees_BT11).sum() > 10
  np.testing.assert_allclose(np.where(sees_BT11, out, 0.0), np.where(sees_BT11, expected, 0.0), rtol=1e-5,
                             atol=1e-6)
  assert (np.asarray(out)[np.broadcast_to(~sees_BT11, out.shape)] == 0).all()


# ----------------------------------------------------------------------------- (d) value head dim


# Causal kernelized attention is a different (chunked) code path; local / sparse causal only change the mask.
FAMILY_CAUSAL = [("local", False), ("sparse", True)] + [(n, c) for n in KERNELIZED for c in (False, True)]


@pytest.mark.parametrize("name,is_causal", FAMILY_CAUSAL)
def test_value_head_dim_equals_per_chunk_calls(name, is_causal):
  q, k, v = _qkv((2,), seed=9, Hv=2 * H)
  bias, mask = _mask_bias(name, (2,), seed=10)
  out = _call(name, q, k, v, bias, mask, is_causal=is_causal)
  assert out.shape == (2, T, N, 2 * H)
  halves = [_call(name, q, k, v[..., i * H:(i + 1) * H], bias, mask, is_causal=is_causal) for i in range(2)]
  np.testing.assert_allclose(out, jnp.concatenate(halves, axis=-1), rtol=1e-5, atol=1e-6)
  ref = _reference(name, q, k, v, bias=bias, mask=mask, is_causal=is_causal)
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-5)
  odd = _call(name, q, k, v[..., :3], bias, mask, is_causal=is_causal)  # Hv = 3, not a divisor of H
  np.testing.assert_allclose(odd, out[..., :3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("name", KERNELIZED)
def test_decoding_with_value_head_dim(name, x64):
  """Token-by-token decoding with Hv != H (and a float64 state under x64) equals the causal reference."""
  with jax.enable_x64(x64):
    dtype = np.float64 if x64 else np.float32
    q, k, v = _qkv((2,), seed=11, Hv=3, dtype=dtype)
    opts = {"projection": PROJECTION} if name == "performer" else {}
    state = A.init_decode_state(name, 2, K, H, value_head_dim=3, dtype=dtype, **opts)
    assert state["kv"].shape == (2, K, M if name == "performer" else H, 3) and state["kv"].dtype == dtype
    step = jax.jit(lambda st, q1, k1, v1: A.decode_step(name, st, q1, k1, v1, **opts))
    outs = []
    for t in range(T):
      o, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
      outs.append(o)
    out = jnp.concatenate(outs, axis=1)
    assert out.dtype == dtype and state["kv"].dtype == dtype
    tol = dict(rtol=1e-9, atol=1e-11) if x64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out, _reference(name, q, k, v, is_causal=True), **tol)


# ----------------------------------------------------------------------------- (f) float64, (g) complex


@pytest.mark.parametrize("name,is_causal", FAMILY_CAUSAL)
def test_float64_inputs_compute_in_float64(name, is_causal):
  with jax.enable_x64(True):
    q, k, v = _qkv((2,), seed=12, dtype=np.float64)
    bias, mask = _mask_bias(name, (2,), seed=13)
    bias = None if bias is None else jnp.asarray(bias, jnp.float64)
    out = _call(name, q, k, v, bias, mask, is_causal=is_causal)
    assert out.dtype == jnp.float64
    ref = _reference(name, q, k, v, bias=bias, mask=mask, is_causal=is_causal)
    # float32 statistics would be off by ~1e-7; the FAVOR+ feature floor (1e-12) is the Performer's only bias.
    np.testing.assert_allclose(out, ref, rtol=1e-8 if name == "performer" else 1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_complex_inputs_are_refused(name):
  q, k, v = _qkv((2,))
  with pytest.raises(ValueError, match="complex"):
    _call(name, q.astype(jnp.complex64), k, v)
  with pytest.raises(ValueError, match="complex"):
    _call(name, q, k, v.astype(jnp.complex64))


# ----------------------------------------------------------------------------- Flax


def test_flax_module_with_two_batch_dims_equals_flax_default():
  """Flax's MultiHeadDotProductAttention on [B1, B2, T, D] with a padding mask: local attention whose
  window covers the sequence equals Flax's own dot_product_attention."""
  x = jnp.asarray(np.random.default_rng(14).normal(size=(2, 3, T, 16)), jnp.float32)
  pad = np.arange(T) < np.array([[16, 9, 4], [1, 12, 16]])[..., None]
  mask = nn.make_attention_mask(pad, pad)  # [2, 3, 1, T, T]
  base = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=16)
  params = jax.jit(base.init)(jax.random.PRNGKey(0), x, mask=mask)
  expected = jax.jit(base.apply)(params, x, mask=mask)
  local = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=16,
                                          attention_fn=A.flax_attention_fn("local", window=T, block_size=BS))
  out = jax.jit(local.apply)(params, x, mask=mask)
  rows = pad[..., None]
  np.testing.assert_allclose(np.where(rows, out, 0.0), np.where(rows, expected, 0.0), rtol=1e-5, atol=1e-5)
