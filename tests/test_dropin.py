"""softmax_attention as a drop-in for jax.nn.dot_product_attention, flax_attention_fn for Flax's attention_fn.

References are jax.nn.dot_product_attention and Flax's own dot_product_attention on the
same inputs; every test in this module runs under jax_numpy_rank_promotion="raise" (conftest.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import pop

from efficient_attn.attention import flax_attention_fn, performer_projection, softmax_attention, softmax_weights


def _qkv(B=2, T=16, S=16, N=4, K=2, H=8, Hv=None, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  shapes = ((B, T, N, H), (B, S, K, H), (B, S, K, Hv or H))
  return tuple(jnp.asarray(r.normal(size=s), dtype) for s in shapes)


def _jax_nn(q, k, v, bias=None, mask=None, **kw):
  """jax.nn's xla path; GQA by repeating keys / values (jax.nn's GQA reference does the same)."""
  G = q.shape[-2] // k.shape[-2]
  return jax.nn.dot_product_attention(q, jnp.repeat(k, G, -2), jnp.repeat(v, G, -2), bias, mask,
                                      implementation="xla", **kw)


T = S = 16
QL, KL = np.array([16, 9], np.int32), np.array([12, 16], np.int32)  # no query row is left without a key
CUSTOM = np.tril(np.ones((T, S), bool))[None, None]
CASES = {  # jax.nn's mask modes and their combinations
    "plain": {}, "causal": dict(is_causal=True), "padding": dict(query_seq_lengths=QL, key_value_seq_lengths=KL),
    "custom_padding": dict(mask=CUSTOM, query_seq_lengths=QL, key_value_seq_lengths=KL),
    "causal_window_padding": dict(is_causal=True, local_window_size=(3, 2), key_value_seq_lengths=KL + 2),
    "left_window": dict(local_window_size=(3, 0)), "asymmetric_window": dict(local_window_size=(1, 4)),
    "int_window": dict(local_window_size=2),
}


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_equal_jax_nn(case, impl):
  """Output and the gradients of query, key, value and bias (GQA, bias broadcast over batch)."""
  kw = dict(CASES[case])
  mask = kw.pop("mask", None)
  q, k, v = _qkv()
  bias = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, T, S)), jnp.float32)
  ours = lambda q, k, v, b: softmax_attention(q, k, v, b, mask, implementation=impl, chunk_size=(4, 8), **kw)
  ref = lambda q, k, v, b: _jax_nn(q, k, v, b, mask, **kw)
  # (output, the vjp of a cotangent), jitted: op by op, the chunked path dispatches many small programs
  forward_back = lambda f: jax.jit(lambda ct, *a: (lambda o, back: (o, back(ct)))(*jax.vjp(f, *a)))  # noqa: E731
  ct = jax.jit(ref)(q, k, v, bias)
  (out, grads), (out_ref, grads_ref) = (forward_back(f)(ct, q, k, v, bias) for f in (ours, ref))
  np.testing.assert_allclose(out, out_ref, atol=2e-6)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_low_precision_equals_jax_nn(dtype, impl):
  q, k, v = _qkv(dtype=dtype)
  kw = dict(is_causal=True, query_seq_lengths=QL)
  out = softmax_attention(q, k, v, implementation=impl, chunk_size=8, **kw)
  ref = _jax_nn(q, k, v, **kw)
  assert out.dtype == dtype
  tol = 0 if impl == "xla" else 1e-2  # xla: the same operations as jax.nn; chunked: rescaled partial sums
  np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=tol)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_residual_is_jax_nn_logsumexp(impl):
  q, k, v = _qkv()
  out, res = softmax_attention(q, k, v, is_causal=True, local_window_size=(5, 0), return_residual=True,
                               implementation=impl, chunk_size=4)
  out_ref, res_ref = _jax_nn(q, k, v, is_causal=True, local_window_size=(5, 0), return_residual=True)
  assert res.shape == res_ref.shape == (2, T, 4) and res.dtype == res_ref.dtype
  np.testing.assert_allclose(out, out_ref, atol=2e-6)
  np.testing.assert_allclose(res, res_ref, atol=2e-6)
  _, res = softmax_attention(q, k, v, key_value_seq_lengths=np.array([0, 3], np.int32), return_residual=True,
                             implementation=impl)
  assert np.all(np.isneginf(res[0])) and np.all(np.isfinite(res[1]))  # logsumexp over no key is -inf


def test_a_query_that_sees_no_key_outputs_zero_where_jax_nn_averages():
  q, k, v = _qkv()
  lengths = np.array([0, 16], np.int32)
  for impl in ("xla", "chunked"):
    out = softmax_attention(q, k, v, key_value_seq_lengths=lengths, implementation=impl)
    assert np.all(np.asarray(out[0]) == 0)
  ref = _jax_nn(q, k, v, key_value_seq_lengths=lengths)
  np.testing.assert_allclose(ref[0], jnp.broadcast_to(jnp.repeat(v, 2, -2)[0].mean(0), ref[0].shape), atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_any_number_of_leading_batch_dims(impl):
  q, k, v = _qkv(B=6)
  mask = np.random.default_rng(2).random((6, 1, T, S)) < 0.7
  mask[..., 0] = True
  flat = softmax_attention(q, k, v, mask=mask, is_causal=True, implementation=impl, chunk_size=8)
  q5, k5, v5 = (x.reshape((2, 3) + x.shape[1:]) for x in (q, k, v))
  out5 = softmax_attention(q5, k5, v5, mask=mask.reshape(2, 3, 1, T, S), is_causal=True, implementation=impl,
                           chunk_size=8)
  np.testing.assert_array_equal(out5.reshape(flat.shape), flat)
  # a mask broadcast over one of the two batch dims, lengths with the batch shape
  out5 = softmax_attention(q5, k5, v5, mask=mask[:3].reshape(1, 3, 1, T, S), implementation=impl,
                           key_value_seq_lengths=np.full((2, 3), 11, np.int32))
  ref = _jax_nn(q, k, v, mask=np.concatenate([mask[:3]] * 2), key_value_seq_lengths=np.full(6, 11, np.int32))
  np.testing.assert_allclose(out5.reshape(ref.shape), ref, atol=2e-6)
  out3 = softmax_attention(q[0], k[0], v[0], is_causal=True, implementation=impl)  # no batch dim
  np.testing.assert_allclose(out3, _jax_nn(q[0], k[0], v[0], is_causal=True), atol=2e-6)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_vmap_over_examples_with_shared_bias_and_mask(impl):
  q, k, v = _qkv()
  bias = jnp.asarray(np.random.default_rng(3).normal(size=(4, T, S)), jnp.float32)
  mask = np.ones((1, 1, S), bool)
  fn = functools.partial(softmax_attention, is_causal=True, implementation=impl, chunk_size=8)
  out = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None, None)))(q, k, v, bias, mask)
  np.testing.assert_allclose(out, _jax_nn(q, k, v, bias[None], is_causal=True), atol=2e-6)
  grads = jax.jit(jax.grad(lambda b: jnp.sum(jax.vmap(fn, in_axes=(0, 0, 0, None, None))(q, k, v, b, mask) ** 2)))(
      bias)
  grads_ref = jax.jit(jax.grad(lambda b: jnp.sum(_jax_nn(q, k, v, b[None], is_causal=True) ** 2)))(bias)
  np.testing.assert_allclose(grads, grads_ref, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_value_head_dim_may_differ(impl):
  q, k, v = _qkv(Hv=12)
  out = softmax_attention(q, k, v, is_causal=True, implementation=impl, chunk_size=8)
  pad = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, 2),))  # jax.nn needs Hv == H: run each half padded to H
  halves = [_jax_nn(q, k, pad(v[..., :6]), is_causal=True)[..., :6], _jax_nn(q, k, pad(v[..., 6:]), is_causal=True)[..., :6]]
  assert out.shape == (2, T, 4, 12)
  np.testing.assert_allclose(out, jnp.concatenate(halves, -1), atol=2e-6)


def test_float64_under_x64_matches_a_float64_reference():
  q, k, v = (np.asarray(x, np.float64) for x in _qkv())
  logits = np.einsum("btkgh,bskh->bkgts", q.reshape(2, T, 2, 2, 8), k) / np.sqrt(8)
  logits = np.where(np.tril(np.ones((T, S), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  ref = np.einsum("bkgts,bskh->btkgh", p / p.sum(-1, keepdims=True), v).reshape(2, T, 4, 8)
  with jax.enable_x64(True):
    for impl in ("xla", "chunked"):
      out = softmax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True, implementation=impl,
                              chunk_size=8, query_seq_lengths=jnp.array([16, 16]))
      assert out.dtype == jnp.float64
      np.testing.assert_allclose(out, ref, atol=1e-12)


def test_complex_and_bad_keywords_are_one_sentence():
  q, k, v = _qkv()
  bad = [(lambda: softmax_attention(q.astype(jnp.complex64), k, v), "complex"),
         (lambda: softmax_attention(q, k, v, local_window_size=(-1, 2)), "local_window_size"),
         (lambda: softmax_attention(q, k, v, query_seq_lengths=np.ones(3, np.int32)), "batch shape"),
         (lambda: softmax_attention(q, k, v, key_value_seq_lengths=np.ones(2, np.float32)), "integer"),
         (lambda: softmax_attention(q, k, v, dropout_rate=0.1), "dropout_rng"),
         (lambda: softmax_attention(q, k, v, dropout_rate=1.0, dropout_rng=jax.random.key(0)), r"\[0, 1\)"),
         (lambda: softmax_attention(q.reshape(1, 2, T, 4, 8), k, v), "same rank")]
  for fn, words in bad:
    with pytest.raises(ValueError, match=words):
      fn()


def test_softmax_weights_are_jax_nn_weights():
  """Weights [..., N, T, S] times values give jax.nn's output (5-D, window, padding)."""
  q, k, v = _qkv(B=4)
  kw = dict(is_causal=True, local_window_size=(4, 0))
  w = softmax_weights(q.reshape((2, 2) + q.shape[1:]), k.reshape((2, 2) + k.shape[1:]), **kw)
  assert w.shape == (2, 2, 4, T, S)
  out = jnp.einsum("bnts,bsnh->btnh", w.reshape(4, 4, T, S), jnp.repeat(v, 2, -2))
  np.testing.assert_allclose(out, _jax_nn(q, k, v, **kw), atol=2e-6)


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("broadcast", [True, False])
def test_dropout_mask_is_the_same_for_xla_and_any_chunking(broadcast):
  q, k, v = _qkv(B=1, T=12, S=20, Hv=6)
  rng = jax.random.key(7)
  loss = lambda impl, cs: lambda q, k, v: jnp.sum(softmax_attention(
      q, k, v, is_causal=True, implementation=impl, chunk_size=cs, dropout_rate=0.3, dropout_rng=rng,
      broadcast_dropout=broadcast) ** 2)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))  # noqa: E731  (eager: op by op, slower)
  ref_loss, ref_grads = grad(loss("xla", None))(q, k, v)
  for cs in (8, (4, 16)):
    val, grads = grad(loss("chunked", cs))(q, k, v)
    np.testing.assert_allclose(val, ref_loss, rtol=1e-6)
    for g, g_ref in zip(grads, ref_grads):
      np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_dropout_statistics_and_broadcast():
  """Weights of a uniform softmax with values 1: each output is the mean of kept/keep_prob over
  the keys, so the mean stays 1; broadcast shares one [T, S] mask over batch and heads."""
  T = S = 64
  zeros, ones = jnp.zeros((2, T, 2, 8)), jnp.ones((2, S, 2, 1))
  drop = lambda rate, rng, bc, impl="xla": softmax_attention(zeros, zeros, ones, dropout_rate=rate, dropout_rng=rng,
                                                             broadcast_dropout=bc, implementation=impl)
  out = drop(0.25, jax.random.key(0), False)
  kept = np.asarray(out) * 0.75 * S  # number of kept keys per row
  np.testing.assert_allclose(kept, np.round(kept), atol=1e-3)
  assert abs(kept.mean() / S - 0.75) < 0.01 and abs(float(out.mean()) - 1) < 0.015
  assert not np.allclose(out[0], out[1]) and not np.allclose(out[:, :, 0], out[:, :, 1])
  shared = drop(0.25, jax.random.key(0), True)
  np.testing.assert_array_equal(shared[0], shared[1])
  np.testing.assert_array_equal(shared[:, :, 0], shared[:, :, 1])
  assert not np.array_equal(shared, drop(0.25, jax.random.key(1), True))
  np.testing.assert_array_equal(shared, drop(0.25, jax.random.key(0), True, "chunked"))
  # neighbouring rows and columns are not correlated (a weak hash would show it)
  keep = np.asarray(drop(0.5, jax.random.key(2), False)[..., 0]) > 1.0
  assert abs(np.corrcoef(keep[:, 1:].ravel(), keep[:, :-1].ravel())[0, 1]) < 0.1


# ----------------------------------------------------------------------------- Flax


def _flax_inputs(B=2, T=6, N=4, H=8, seed=0):
  r = np.random.default_rng(seed)
  return tuple(jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32) for _ in range(3))


@pytest.mark.parametrize("mask_dtype", [jnp.float32, jnp.int32, jnp.bool_])
def test_flax_masks_of_any_dtype_and_batch_dims(mask_dtype):
  q, k, v = _flax_inputs(B=4)
  q, k, v = (x.reshape((2, 2) + x.shape[1:]) for x in (q, k, v))
  mask = nn.combine_masks(nn.make_causal_mask(jnp.ones((2, 2, 6))),
                          nn.make_attention_mask(jnp.ones((2, 2, 6)), jnp.broadcast_to(jnp.arange(6) < 4, (2, 2, 6)))).astype(mask_dtype)
  ours = flax_attention_fn("softmax")(q, k, v, mask=mask, deterministic=True)
  np.testing.assert_allclose(ours, nn.dot_product_attention(q, k, v, mask=mask), atol=2e-6)


def test_flax_dropout_follows_flax_semantics():
  q, k, v = _flax_inputs()
  fn, rng = flax_attention_fn("softmax"), jax.random.key(0)
  plain = fn(q, k, v, deterministic=True)
  np.testing.assert_array_equal(fn(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=True), plain)
  dropped = fn(q, k, v, dropout_rate=0.5, dropout_rng=rng)  # deterministic defaults to False, as in Flax
  assert not np.allclose(dropped, plain)
  np.testing.assert_array_equal(dropped, fn(q, k, v, dropout_rate=0.5, dropout_rng=rng))
  np.testing.assert_allclose(dropped, flax_attention_fn("softmax", implementation="chunked", chunk_size=2)(
      q, k, v, dropout_rate=0.5, dropout_rng=rng), atol=2e-6)
  with pytest.raises(ValueError, match="no dropout"):
    flax_attention_fn("linear")(q, k, v, dropout_rate=0.1, dropout_rng=rng)
  flax_attention_fn("linear")(q, k, v, dropout_rate=0.1, dropout_rng=rng, deterministic=True)  # not requested: fine


def test_flax_linen_module_dropout_rngs():
  """Linen MHA with our function: the same 'dropout' rng repeats, another differs, deterministic has none."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  m = nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.5, attention_fn=flax_attention_fn("softmax"))
  variables = m.init(jax.random.key(0), x, deterministic=True)
  a = m.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  b = m.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  c = m.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  d = m.apply(variables, x, deterministic=True)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)
  np.testing.assert_allclose(d, m.clone(attention_fn=nn.dot_product_attention).apply(variables, x, deterministic=True),
                             atol=2e-6)


def test_flax_sowed_weights_equal_flax_own():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 8)), jnp.float32)
  mask = nn.make_causal_mask(jnp.ones((3, 5)))
  ours = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=flax_attention_fn("softmax"))
  variables = ours.init(jax.random.key(0), x)
  _, state = ours.apply(variables, x, mask=mask, sow_weights=True, mutable=["intermediates"])
  _, state_ref = ours.clone(attention_fn=nn.dot_product_attention).apply(variables, x, mask=mask, sow_weights=True,
                                                                         mutable=["intermediates"])
  w, w_ref = state["intermediates"]["attention_weights"][0], state_ref["intermediates"]["attention_weights"][0]
  assert w.shape == (3, 2, 5, 5)
  np.testing.assert_allclose(w, w_ref, atol=1e-6)
  model = nnx.MultiHeadAttention(num_heads=2, in_features=8, attention_fn=flax_attention_fn("softmax"),
                                 decode=False, rngs=nnx.Rngs(0))
  model(x, sow_weights=True)
  sowed = nnx.pop(model, nnx.Intermediate)["attention_weights"].get_value()[0]
  np.testing.assert_allclose(sowed.sum(-1), np.ones((3, 2, 5)), atol=1e-6)
  class Recorder:  # what Flax's module.sow receives
    def sow(self, collection, name, value):
      self.got = (collection, name, value.dtype)

  xb = x.reshape(3, 5, 2, 4).astype(jnp.bfloat16)
  for force, dtype in ((True, jnp.float32), (False, jnp.bfloat16)):  # Flax's force_fp32_for_softmax
    recorder = Recorder()
    flax_attention_fn("softmax")(xb, xb, xb, module=recorder, force_fp32_for_softmax=force)
    assert recorder.got == ("intermediates", "attention_weights", dtype)
  with pytest.raises(ValueError, match="materialised"):
    flax_attention_fn("linear")(x.reshape(3, 5, 2, 4), x.reshape(3, 5, 2, 4), x.reshape(3, 5, 2, 4),
                                module=object())


def test_flax_keywords_are_honoured_or_refused():
  q, k, v = _flax_inputs()
  fn = flax_attention_fn("softmax")
  half = fn(q, k, v, dtype=jnp.float16, deterministic=True)
  assert half.dtype == jnp.float16
  np.testing.assert_allclose(half, nn.dot_product_attention(q, k, v, dtype=jnp.float16), atol=2e-3)
  for precision in (jax.lax.Precision.HIGHEST, "highest", (jax.lax.Precision.HIGH,) * 2):
    hlo = jax.jit(lambda q: fn(q, k, v, precision=precision, deterministic=True)).lower(q).as_text()
    assert "HIGHEST" in hlo or "HIGH" in hlo
  with pytest.raises(ValueError, match="einsum"):
    fn(q, k, v, qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum)
  with pytest.raises(ValueError, match="complex"):
    fn(q.astype(jnp.complex64), k, v)


def _projection():
  return performer_projection(jax.random.key(1), 16, 4)


DECODERS = {"softmax": {}, "softmax_chunked": dict(implementation="chunked", chunk_size=2), "local": dict(window=3),
            "linear": {}, "performer": dict(projection=_projection())}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_flax_decode_equals_the_parallel_causal_forward(name):
  """Linen and NNX MHA with decode=True: token-by-token outputs equal one causal call."""
  kind = name.split("_")[0]
  fn = flax_attention_fn(kind, is_causal=True, **DECODERS[name])
  B, T, F = 2, 7, 12
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, F)), jnp.float32)
  linen = nn.MultiHeadDotProductAttention(num_heads=3, attention_fn=fn, deterministic=True)
  cache, params = pop(jax.jit(linen.clone(decode=True).init)(jax.random.key(2), x), "params")
  parallel = jax.jit(linen.apply)({"params": params}, x)
  # jitted as a decoding loop would be (one compile for every step; eager Flax dispatches op by op)
  step = jax.jit(lambda cache, x1: linen.clone(decode=True).apply({"params": params, **cache}, x1, mutable=["cache"]))
  steps = []
  for t in range(T):
    y, cache = step(cache, x[:, t:t + 1])
    steps.append(y)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), parallel, atol=1e-5)
  model = nnx.MultiHeadAttention(num_heads=3, in_features=F, attention_fn=fn, decode=False, rngs=nnx.Rngs(0))
  call = nnx.jit(lambda m, x, decode: m(x, decode=decode), static_argnums=2)
  parallel = call(model, x, False)
  model.init_cache(x.shape)
  steps = [call(model, x[:, t:t + 1], True) for t in range(T)]
  np.testing.assert_allclose(jnp.concatenate(steps, 1), parallel, atol=1e-5)
