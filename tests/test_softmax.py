"""Exact softmax attention (xla / chunked / cudnn) and KV-cache decoding against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attn.attention import softmax as sm
from efficient_attn.attention import softmax_chunked
from efficient_attn.attention.softmax import softmax_attention, softmax_init_state, softmax_step
from tests.reference import softmax_reference, visibility

IMPLS = ["xla", "chunked", pytest.param("cudnn", marks=pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="cuDNN needs a GPU"))]
CHUNK = (16, 8)  # small and not dividing the lengths below, so padding is always exercised


def _arrays(B=2, T=37, S=37, N=4, K=2, H=8, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)  # NumPy: jax.random would compile threefry for every new shape
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))


def _segments(B, L, seed):
  """Sorted packed-sequence ids, e.g. [0 0 0 1 1 2 ...]."""
  return np.sort(np.random.default_rng(seed).integers(0, 3, (B, L)), axis=1).astype(np.int32)


def _call(impl, q, k, v, jit, **kw):
  fn = lambda q, k, v, b: softmax_attention(q, k, v, b, kw.get("mask"), is_causal=kw.get("is_causal", False),
                                            segment_ids=kw.get("segment_ids"), scale=kw.get("scale"),
                                            implementation=impl, chunk_size=CHUNK)
  return (jax.jit(fn) if jit else fn)(q, k, v, kw.get("bias"))


def _dense(q, k, v, bias, vis, scale=None):
  """Plain jnp float32 masked softmax, for reference gradients; vis is a constant bool [B, N, T, S]."""
  N, H = q.shape[2], q.shape[3]
  k, v = (jnp.repeat(x, N // x.shape[2], axis=2) for x in (k, v))
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * (H ** -0.5 if scale is None else scale)
  if bias is not None:
    logits = logits + bias.reshape((1,) * (4 - bias.ndim) + bias.shape)  # explicit: tests run rank-strict
  p = jax.nn.softmax(jnp.where(vis, logits, -1e30), axis=-1) * vis  # all-masked rows -> 0
  return jnp.einsum("bnts,bsnh->btnh", p, v)


def _case(name, T=37, S=37, K=2):
  """(arrays, kwargs) for a named configuration."""
  q, k, v = _arrays(T=T, S=S, K=K)
  B, N = q.shape[0], q.shape[2]
  rng = np.random.default_rng(1)
  kw = {
      "plain": {},
      "causal": {"is_causal": True},
      "bias": {"bias": jnp.asarray(rng.normal(size=(B, N, T, S)), jnp.float32), "is_causal": True},
      "bias_bcast": {"bias": jnp.asarray(rng.normal(size=(N, 1, S)), jnp.float32)},
      "padding_mask": {"mask": jnp.asarray(rng.random((B, 1, 1, S)) > 0.3), "is_causal": True, "scale": 0.3},
      "segments": {"segment_ids": _segments(B, T, 2), "is_causal": True},
      "segment_pair": {"segment_ids": (_segments(B, T, 3), _segments(B, S, 4))},
  }[name]
  return (q, k, v), kw


def _ref(q, k, v, **kw):
  kw = {**kw, "bias": None if kw.get("bias") is None else np.asarray(kw["bias"])}
  return softmax_reference(np.asarray(q), np.asarray(k), np.asarray(v), **kw)


def _vis(q, k, **kw):
  B, T, N, _ = q.shape
  return visibility(B, N, T, k.shape[1], **{n: kw[n] for n in ("mask", "is_causal", "segment_ids") if n in kw})


# Default heads N=4, K=2 (GQA); K=1 is MQA.
FWD_CASES = [("plain", {}), ("causal", {}), ("bias", {}), ("bias_bcast", {"K": 1}), ("padding_mask", {}),
             ("segments", {}), ("segment_pair", {"T": 29, "S": 43}), ("causal", {"T": 21, "S": 50, "K": 1})]


# Every case runs jitted; the eager path is checked on the feature-richest cases (`jit=False`).
JIT_CASES = [(name, shape, True) for name, shape in FWD_CASES] + [("bias", {}, False), ("segment_pair", {}, False)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,shape,jit", JIT_CASES)
def test_forward_matches_reference(impl, name, shape, jit):
  (q, k, v), kw = _case(name, **shape)
  out = _call(impl, q, k, v, jit, **kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, _ref(q, k, v, **kw), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,shape,jit", [("bias", {}, True), ("bias_bcast", {"K": 1}, True),
                                            ("padding_mask", {}, True), ("segment_pair", {"T": 29, "S": 43}, True),
                                            ("bias_bcast", {}, False)])
def test_gradients_match_dense(impl, name, shape, jit):
  (q, k, v), kw = _case(name, **shape)
  bias = kw.get("bias", jnp.zeros((1, 1, 1, 1)))
  vis = jnp.asarray(_vis(q, k, **kw))
  ct = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
  loss = lambda q, k, v, b: jnp.sum(_call(impl, q, k, v, False, **{**kw, "bias": b}) * ct)
  ref_loss = lambda q, k, v, b: jnp.sum(_dense(q, k, v, b, vis, kw.get("scale")) * ct)
  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  grads = (jax.jit(grad) if jit else grad)(q, k, v, bias)
  ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for g, r in zip(grads, ref):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_causality_through_gradients(impl):
  q, k, v = _arrays(T=40, S=40)
  grad_kv = jax.jit(lambda ct: jax.vjp(lambda k, v: _call(impl, q, k, v, False, is_causal=True), k, v)[1](ct))
  for t in (0, 5, 17, 39):  # inside chunks and on chunk edges
    ct = jnp.zeros_like(q).at[:, t].set(1.0)
    dk, dv = grad_kv(ct)
    for g in (dk, dv):
      assert np.all(np.asarray(g[:, t + 1:]) == 0.0), f"key/value after {t} influence out[:, {t}]"
    # (with a single visible key the softmax is constant, so d/dk is 0 there: check k only for t > 0)
    assert np.all(np.abs(np.asarray(dv[:, :t + 1])).sum(axis=(2, 3)) > 0)
    assert t == 0 or np.all(np.abs(np.asarray(dk[:, :t + 1])).sum(axis=(2, 3)) > 0)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_rows_with_no_visible_key_are_zero_with_finite_grads(impl):
  q, k, v = _arrays(T=24, S=30)
  mask = np.ones((2, 1, 24, 30), bool)
  mask[:, :, 3] = False  # row 3 masked out everywhere
  mask[0, :, 20:] = False  # a whole tail of batch 0, covering a full query chunk
  seg = (np.full((2, 24), 1, np.int32), np.full((2, 30), 1, np.int32))
  seg[0][1, 10] = 7  # a query whose segment has no keys
  bias = jnp.zeros((1, 4, 24, 30))
  f = lambda q, k, v, b: softmax_attention(q, k, v, b, jnp.asarray(mask), segment_ids=seg,
                                           implementation=impl, chunk_size=CHUNK)
  out = jax.jit(f)(q, k, v, bias)
  np.testing.assert_allclose(out, _ref(q, k, v, mask=mask, segment_ids=seg), atol=2e-5)
  for b, t in ((0, 3), (1, 3), (0, 21), (1, 10)):
    assert np.all(np.asarray(out[b, t]) == 0.0)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0][0, 20:]) == 0.0) and np.all(np.asarray(grads[3][:, :, 3]) == 0.0)


def test_fully_masked_chunk_tail_padding():
  """T and S not multiples of the chunk: padded keys must never be attended, padded queries are cropped."""
  q, k, v = _arrays(T=33, S=17, K=1)
  for chunk in ((8, 8), (5, 7), (64, 64)):
    out = jax.jit(lambda q, k, v: softmax_attention(q, k, v, is_causal=True, implementation="chunked",
                                                    chunk_size=chunk))(q, k, v)
    np.testing.assert_allclose(out, _ref(q, k, v, is_causal=True), atol=2e-5, err_msg=str(chunk))


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 40), S=st.integers(1, 40), K=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 3]), H=st.sampled_from([4, 8]), causal=st.booleans(),
       cq=st.integers(1, 24), ck=st.integers(1, 24), seed=st.integers(0, 100))
def test_property_chunked_equals_reference(B, T, S, K, G, H, causal, cq, ck, seed):
  q, k, v = _arrays(B=B, T=T, S=S, N=K * G, K=K, H=H, seed=seed)
  out = jax.jit(lambda q, k, v: softmax_attention(q, k, v, is_causal=causal, implementation="chunked",
                                                  chunk_size=(cq, ck)))(q, k, v)
  np.testing.assert_allclose(out, _ref(q, k, v, is_causal=causal), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked", None])
def test_bfloat16_in_bfloat16_out(impl):
  q, k, v = _arrays(dtype=jnp.bfloat16)
  out = softmax_attention(q, k, v, is_causal=True, implementation=impl, chunk_size=CHUNK)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), _ref(q, k, v, is_causal=True), atol=3e-2, rtol=3e-2)


def test_auto_implementation_picks_by_length():
  q, k, v = _arrays(T=16, S=16)
  assert sm.pick_implementation(16, 16, 8, q.dtype) == "xla"
  q, k, v = _arrays(B=1, T=512, S=512, N=2, K=1, H=4)
  assert sm.pick_implementation(512, 512, 4, q.dtype) == "chunked"
  np.testing.assert_allclose(softmax_attention(q, k, v, is_causal=True), _ref(q, k, v, is_causal=True), atol=2e-5)


@pytest.mark.parametrize("window,max_len", [(None, 20), (5, 20), (5, 5)])
def test_decode_matches_parallel(window, max_len):
  """Token-by-token decoding == the causal (sliding-window) parallel forward; max_len=window is a ring buffer."""
  q, k, v = _arrays(B=2, T=20, S=20, N=4, K=2)
  step = jax.jit(lambda st, q, k, v: softmax_step(st, q, k, v, window=window, is_causal=True))
  state, outs = softmax_init_state(2, max_len, 2, 8), []
  for t in range(20):
    out, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    outs.append(out)
  decoded = jnp.concatenate(outs, axis=1)
  assert int(state["pos"]) == 20
  np.testing.assert_allclose(decoded, _ref(q, k, v, is_causal=True, window=window), atol=2e-5)
  band = None if window is None else np.tril(np.triu(np.ones((20, 20), bool), -(window - 1)))
  np.testing.assert_allclose(decoded, softmax_attention(q, k, v, mask=band, is_causal=True), atol=2e-5)


def test_cudnn_glue_with_a_stand_in_kernel(monkeypatch):
  """The cuDNN path's own logic (segments -> mask, bias broadcast, empty rows -> 0), with the XLA kernel standing in."""
  calls, real = [], jax.nn.dot_product_attention

  def stand_in(q, k, v, bias, mask, *, implementation, **kw):
    calls.append(implementation)
    return real(q, k, v, bias, mask, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  monkeypatch.setattr(sm.kernels, "cudnn_available", lambda: True)
  q, k, v = _arrays(T=24, S=24, H=8, dtype=jnp.bfloat16)
  seg = _segments(2, 24, 5)
  seg[1, 23] = 9  # a query alone in its segment whose key is masked below: sees nothing
  mask = np.ones((2, 1, 1, 24), bool)
  mask[1, ..., 23] = False
  bias = np.random.default_rng(0).normal(size=(4, 1, 24)).astype(np.float32)
  kw = dict(bias=bias, mask=mask, segment_ids=seg, is_causal=True)
  out = softmax_attention(q, k, v, jnp.asarray(bias), jnp.asarray(mask), is_causal=True, segment_ids=seg,
                          implementation="cudnn")
  assert calls == ["cudnn"] and out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), _ref(q, k, v, **kw), atol=3e-2, rtol=3e-2)
  assert np.all(np.asarray(out[1, 23]) == 0)
  assert sm.pick_implementation(24, 24, 8, q.dtype, platform="cuda") == "cudnn"
  with pytest.raises(ValueError, match="bfloat16"):
    softmax_attention(q.astype(jnp.float32), k, v, implementation="cudnn")


def test_bad_inputs_raise_value_errors():
  q, k, v = _arrays(T=8, S=8)
  bad = [
      (lambda: softmax_attention(q[0], k, v), "same rank"),
      (lambda: softmax_attention(q[:, :, :3], k, v), "multiple of key/value heads"),
      (lambda: softmax_attention(q, k, v, implementation="flash"), "implementation"),
      (lambda: softmax_attention(q, k, v, implementation="chunked", chunk_size=0), "chunk_size"),
      (lambda: softmax_attention(q, k, v, mask=jnp.ones((2, 4, 8, 9), bool)), "mask"),
      (lambda: softmax_attention(q, k, v, mask=jnp.ones((1, 1, 8, 8), jnp.int32)), "boolean"),
      (lambda: softmax_attention(q, k, v, bias=jnp.ones((3, 1, 8, 8))), "bias"),
      (lambda: softmax_attention(q, k, v, segment_ids=np.zeros((2, 7), np.int32)), "segment_ids"),
      (lambda: softmax_step(softmax_init_state(2, 4, 2, 8), q[:, :1], k[:, :2], v[:, :2]), "key"),
      (lambda: softmax_step(softmax_init_state(2, 4, 2, 8), q[:, :1], k[:, :1], v[:, :1], window=0), "window"),
  ]
  if jax.default_backend() != "gpu":
    bad.append((lambda: softmax_attention(q, k, v, implementation="cudnn"), "cuDNN"))
  for fn, words in bad:
    with pytest.raises(ValueError, match=words):
      fn()


def test_chunked_fwd_bwd_temp_memory_is_far_below_materialised():
  q, k, v = _arrays(B=1, T=2048, S=2048, N=4, K=4, H=64)
  ct = jnp.ones_like(q)

  def temp(impl):
    loss = lambda q, k, v: jnp.sum(softmax_attention(q, k, v, is_causal=True, implementation=impl) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  assert temp("chunked") * 8 < temp("xla")


@pytest.mark.parametrize("causal,T,S,chunk", [(True, 40, 40, (8, 8)), (True, 24, 40, (16, 8)),
                                              (False, 20, 30, (8, 16))])
def test_causal_computes_only_visible_tiles(monkeypatch, causal, T, S, chunk):
  """Every executed tile (forward and backward) has a visible entry; no needed tile is skipped."""
  seen = []
  monkeypatch.setattr(softmax_chunked, "_TILE_HOOK", lambda name, i, j: seen.append((name, int(i), int(j))))
  q, k, v = _arrays(B=1, T=T, S=S, N=2, K=1)
  loss = lambda q, k, v: jnp.sum(softmax_attention(q, k, v, is_causal=causal, implementation="chunked",
                                                   chunk_size=chunk))
  jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
  cq, ck = chunk
  vis = visibility(1, 1, -(-T // cq) * cq, -(-S // ck) * ck, is_causal=causal)[0, 0]
  expected = {(i, j) for i in range(-(-T // cq)) for j in range(-(-S // ck))
              if vis[i * cq:(i + 1) * cq, j * ck:(j + 1) * ck].any()}
  for name in ("fwd", "bwd"):
    executed = [(i, j) for n, i, j in seen if n == name]
    assert len(executed) == len(set(executed)) and set(executed) == expected
  if causal:
    assert len(expected) < -(-T // cq) * -(-S // ck)
