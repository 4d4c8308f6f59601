"""Decay-gated linear attention and the delta rule (RetNet, GLA, Mamba-2, DeltaNet, Gated DeltaNet, Based).

The chunkwise functions against a float64 token-by-token recurrence written from the
equations (outputs and gradients), with chunks that do and do not divide T, GQA, packed
segments, key padding and the bidirectional form; decoding against the parallel forward;
bfloat16 at T = 8192 with strong decays and β = 1; causality through gradients; and the
layers: per-token gate params in Linen and NNX, one-token decoding, each new `model.attention` trains.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attn import attention as A
from efficient_attn import flops
from efficient_attn import layers
from efficient_attn import nnx as enx
from efficient_attn.attention._common import scale_rows
from efficient_attn.attention.delta import delta_rule_attention
from efficient_attn.attention import gated
from efficient_attn.attention.gated import gated_linear_attention
from efficient_attn.config import ModelConfig

B, T, N, K, H, HV = 2, 12, 4, 2, 8, 6
NEW = ["retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "based"]
SEG = np.array([[1] * 5 + [2] * 5 + [3] * 2, [4] * 12])


# ----------------------------------------------------------------------------- the reference recurrence


def recurrence(q, k, v, *, log_decay, beta=None, segment_ids=None, key_mask=None, scale=None, reverse=False):
  """Token by token, in the inputs' dtype: S_t = exp(g_t) ⊙ (I − β_t k_t k_tᵀ) S_{t-1} + [β_t] k_t v_tᵀ
  (β None: the gated form without the delta term), S reset at segment starts, untouched at masked keys;
  o_t = scale · S_tᵀ q_t. q [B, T, N, H], k [B, T, K, H], v [B, T, K, Hv], g [B, T, K(, H)], β [B, T, K]."""
  Bq, Tq, Nq, Hq = q.shape
  Kq, G = k.shape[2], Nq // k.shape[2]
  scale = Hq ** -0.5 if scale is None else scale
  ids = jnp.zeros((Bq, Tq), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
  keep = jnp.ones((Bq, Tq), bool) if key_mask is None else jnp.asarray(key_mask)
  g = log_decay if log_decay.ndim == 4 else log_decay[..., None]
  beta = None if beta is None else beta.astype(q.dtype)
  xs = [q, k, v, g, ids, keep] + ([] if beta is None else [beta])
  xs = [jnp.swapaxes(jnp.flip(x, 1) if reverse else x, 0, 1) for x in xs]  # [T, B, ...]
  xs[4] = jnp.concatenate([jnp.zeros((1, Bq), bool), xs[4][1:] != xs[4][:-1]], 0)  # segment starts

  def step(S, x):
    qt, kt, vt, gt, st, ok = x[:6]
    S = jnp.where(st[:, None, None, None], 0.0, S)
    new = jnp.exp(gt)[..., None] * S
    if beta is None:
      new = new + jnp.einsum("bkh,bkv->bkhv", kt, vt)
    else:
      bt = x[6][..., None]
      kS = jnp.einsum("bkh,bkhv->bkv", kt, S)
      new = jnp.exp(gt)[..., None] * (S - jnp.einsum("bkh,bkv->bkhv", kt, bt * kS)) + jnp.einsum(
          "bkh,bkv->bkhv", kt, bt * vt)
    S = jnp.where(ok[:, None, None, None], new, S)
    out = jnp.einsum("bkgh,bkhv->bkgv", qt.reshape(Bq, Kq, G, Hq) * scale, S)
    return S, out.reshape(Bq, Nq, -1)

  S0 = jnp.zeros((Bq, Kq, Hq, v.shape[-1]), q.dtype)
  _, out = jax.lax.scan(step, S0, tuple(xs))
  out = jnp.flip(out, 0) if reverse else out
  return jnp.swapaxes(out, 0, 1)


def _inputs(seed=0, channel=False, dtype=np.float32, Tn=T, normalise=True):
  r = np.random.default_rng(seed)
  q = r.normal(size=(B, Tn, N, H))
  k = r.normal(size=(B, Tn, K, H))
  if normalise:  # the delta rule's contraction regime (the layer L2-normalises)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = r.normal(size=(B, Tn, K, HV))
  g = -r.uniform(0.0, 1.0, size=(B, Tn, K, H) if channel else (B, Tn, K))
  beta = r.uniform(0.0, 1.0, size=(B, Tn, K))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v, g, beta))


def _call(kind, q, k, v, g, beta, **kw):
  if kind == "gated":
    return gated_linear_attention(q, k, v, g, **kw)
  return delta_rule_attention(q, k, v, beta, log_decay=g, **kw)


def _ref(kind, q, k, v, g, beta, *, mask=None, is_causal=True, **kw):
  kw = dict(kw, key_mask=mask, beta=None if kind == "gated" else beta)
  out = recurrence(q, k, v, log_decay=g, **kw)
  if not is_causal:
    out = out + recurrence(q, k, v, log_decay=g, reverse=True, **kw)
  return out


CASES = [("gated", False), ("gated", True), ("delta", False)]


# Per-channel decays have two exact forms, chosen at run time: "factorised" (one matmul per chunk, taken
# when every chunk's log-decay range is at most gated.FACTORISED_MAX_RANGE) and "elementwise" (any decay).
PATHS = {"factorised": float("inf"), "elementwise": -1.0}


@pytest.mark.parametrize("kind,channel,chunk,sub,path", [
    ("gated", False, 5, 16, None), ("gated", True, 5, 16, "factorised"), ("gated", True, 5, 16, "elementwise"),
    ("delta", False, 5, 16, None), ("gated", True, 6, 2, "elementwise")])
def test_outputs_and_gradients_match_the_recurrence_in_float64(kind, channel, chunk, sub, path, monkeypatch):
  """Causal, GQA (N = 4, K = 2), Hv != H, packed segments, padded keys, a chunk (5) that does not divide
  T = 12: outputs and d loss / d (q, k, v, g, β) of the chunkwise form equal the recurrence's. Per-channel
  decays through both forms, the elementwise one also with chunks of 6 cut into sub-chunks of 2 (the
  two-level form: pairs across sub-chunks and documents that start inside a chunk)."""
  monkeypatch.setattr(gated, "SUBCHUNK_SIZE", sub)
  if path:
    monkeypatch.setattr(gated, "FACTORISED_MAX_RANGE", PATHS[path])
  with jax.enable_x64(True):
    args = tuple(x.astype(jnp.float64) for x in _inputs(3, channel))
    w = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, N, HV)))
    kw = dict(segment_ids=jnp.asarray(SEG), mask=jnp.asarray(np.random.default_rng(2).uniform(size=(B, T)) > 0.3))
    vjp = lambda f: jax.jit(lambda *a: (lambda o, back: (o, back(w)))(*jax.vjp(f, *a)))  # noqa: E731
    out, grads = vjp(lambda *a: _call(kind, *a, chunk_size=chunk, **kw))(*args)
    ref, ref_grads = vjp(lambda *a: _ref(kind, *a, **kw))(*args)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)
    for name, a, b in zip("qkvgb", grads, ref_grads):
      if not (kind == "gated" and name == "b"):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10, err_msg=name)


def test_unit_lower_inverse_and_scale_rows_against_dense_algebra():
  """The blockwise inverse (L padded to a power of two: L = 1, 5, 8) equals numpy's inverse of
  I + strict_tril(A), reads only A's strictly lower part, and its gradient equals autodiff through a dense
  triangular solve; the row scaling's and linear attention's normaliser's hand-written gradients (s
  broadcast over an axis; a zero denominator) equal autodiff of the plain expressions."""
  from efficient_attn.attention import linear
  from efficient_attn.attention.delta import unit_lower_inverse

  def inverse_and_grads(a, w):
    L = a.shape[-1]
    dense = lambda a: jax.lax.linalg.triangular_solve(  # noqa: E731
        jnp.eye(L)[None] + jnp.tril(a, -1), jnp.broadcast_to(jnp.eye(L), a.shape), left_side=True, lower=True)
    return unit_lower_inverse(a), *(jax.grad(lambda a, f=f: jnp.sum(f(a) * w))(a) for f in (unit_lower_inverse, dense))

  def vjps(x, s, den, dy):
    ref = lambda n, d: jnp.where((d > 0)[..., None], n / jnp.where(d > 0, d, 1.0)[..., None], 0.0)  # noqa: E731
    pairs = ((scale_rows, lambda x, s: x * s[..., None], s), (linear._normalise, ref, den))
    return [[(lambda o, back: (o, *back(dy)))(*jax.vjp(f, x, y)) for f in fs] for *fs, y in pairs]

  with jax.enable_x64(True):
    r = np.random.default_rng(0)
    for L in (1, 5, 8):
      a, w = (jnp.asarray(r.normal(size=(3, L, L))) for _ in range(2))
      inv, got, want = jax.jit(inverse_and_grads)(a, w)
      np.testing.assert_allclose(inv, np.linalg.inv(np.eye(L) + np.tril(np.asarray(a), -1)), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    x, s, dy = (jnp.asarray(r.normal(size=z)) for z in ((2, 3, 5, 4), (2, 1, 5), (2, 3, 5, 4)))
    den = jnp.asarray(np.abs(r.normal(size=(2, 3, 5)))).at[0, 0, 0].set(0.0)
    for mine, plain in jax.jit(vjps)(x, s, den, dy):
      for a, b in zip(mine, plain):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,channel,path", [
    ("gated", False, None), ("gated", True, "factorised"), ("gated", True, "elementwise"), ("delta", False, None)])
def test_float32_bidirectional_with_segments_matches_the_recurrence(kind, channel, path, monkeypatch):
  """float32 against the float64 recurrence; a chunk (4) that divides T; is_causal=False sums the
  forward and backward recurrences; the delta rule here without a decay (DeltaNet)."""
  if path:
    monkeypatch.setattr(gated, "FACTORISED_MAX_RANGE", PATHS[path])
  q, k, v, g, beta = _inputs(1, channel)
  g = jnp.zeros_like(g) if kind == "delta" else g
  mask = jnp.asarray(np.random.default_rng(2).uniform(size=(B, T)) > 0.3)
  seg = jnp.asarray(SEG)
  if kind == "delta":
    out = jax.jit(lambda *a: delta_rule_attention(*a, chunk_size=4, segment_ids=seg, mask=mask, is_causal=False))(
        q, k, v, beta)
  else:
    out = jax.jit(lambda *a: _call(kind, *a, chunk_size=4, segment_ids=seg, mask=mask, is_causal=False))(
        q, k, v, g, beta)
  assert out.shape == (B, T, N, HV) and out.dtype == jnp.float32
  with jax.enable_x64(True):
    args = tuple(x.astype(jnp.float64) for x in (q, k, v, g, beta))
    ref = jax.jit(lambda *a: _ref(kind, *a, segment_ids=seg, mask=mask, is_causal=False))(*args)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,channel", [("gated", True), ("delta", False)])
def test_bfloat16_at_8192_with_strong_decays_and_beta_one(kind, channel):
  """Decays as strong as exp(-20) per step and β = 1: chunk-relative exponents keep bf16 finite and near f32."""
  Tn, r = 8192, np.random.default_rng(6)
  q = jnp.asarray(r.normal(size=(1, Tn, 1, 8)), jnp.float32)
  k = r.normal(size=(1, Tn, 1, 8))
  k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.float32)
  v = jnp.asarray(r.normal(size=(1, Tn, 1, 8)), jnp.float32)
  g = jnp.asarray(-r.choice([0.0, 0.01, 20.0], size=(1, Tn, 1) + ((8,) if channel else ())), jnp.float32)
  beta = jnp.ones((1, Tn, 1), jnp.float32)
  f = lambda q, k, v: _call(kind, q, k, v, g, beta)  # noqa: E731
  full, half = jax.jit(lambda *a: (f(*a), f(*(x.astype(jnp.bfloat16) for x in a))))(q, k, v)
  assert half.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(half)))
  err = jnp.abs(half.astype(jnp.float32) - full)
  assert float(jnp.max(err)) < 0.1 * float(jnp.max(jnp.abs(full))) and float(jnp.mean(err)) < 0.02


@pytest.mark.parametrize("is_causal", [True, False])
def test_based_linear_half_equals_the_dense_taylor_kernel(is_causal):
  """Based's linear half (symmetric 1 + d + d(d+1)/2 features between chunks, 1 + z + z²/2 from the raw
  dot product inside them) against the dense quadratic form Σ_s w_ts v_s / Σ_s w_ts, w = 1 + z + z²/2,
  z = q·k / √d, in float64, outputs and gradients: GQA, packed segments, padded keys, a chunk (8) that does
  not divide T = 37."""
  from efficient_attn.attention import based

  r, Tn, d = np.random.default_rng(8), 37, 5
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(r.normal(size=(B, Tn, h, w))) for h, w in ((N, d), (K, d), (K, HV)))
    seg = jnp.asarray(np.array([[1] * 10 + [2] * 20 + [3] * 7, [5] * Tn]))
    mask = jnp.asarray(r.uniform(size=(B, Tn)) > 0.3)
    def dense(q, k, v):
      z = jnp.einsum("btnd,bsnd->bnts", q, jnp.repeat(k, N // K, 2)) / np.sqrt(d)
      vis = (jnp.tril(jnp.ones((Tn, Tn), bool)) if is_causal else jnp.ones((Tn, Tn), bool))[None, None]
      w = (1 + z + z * z / 2) * (vis & (seg[:, None, :, None] == seg[:, None, None, :]) & mask[:, None, None, :])
      den = w.sum(-1).transpose(0, 2, 1)[..., None]
      ref = jnp.einsum("bnts,bsnh->btnh", w, jnp.repeat(v, N // K, 2)) / jnp.where(den > 0, den, 1.0)
      return jnp.where(den > 0, ref, 0.0)

    ct = jnp.asarray(r.normal(size=(B, Tn, N, HV)))
    chunked = lambda *a: based.taylor_attention(*a, is_causal=is_causal, segment_ids=seg, mask=mask,  # noqa: E731
                                                chunk_size=8)
    (out, grads), (ref, ref_grads) = (jax.jit(lambda *a, f=f: (lambda o, back: (o, back(ct)))(*jax.vjp(f, *a)))(
        q, k, v) for f in (chunked, dense))
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip("qkv", grads, ref_grads):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10, err_msg=name)
    x = jnp.asarray(r.normal(size=(3, d)))
    phi = based.taylor_features(x)
    assert phi.shape == (3, based.num_features(d)) == (3, 1 + d + d * (d + 1) // 2)
    zz = x @ x.T / np.sqrt(d)
    np.testing.assert_allclose(phi @ phi.T, 1 + zz + zz * zz / 2, rtol=1e-12)


def _family_inputs(kind, Tn, seed=7):
  """The per-token inputs a layer would compute (random but in range), as the family's keywords."""
  r = np.random.default_rng(seed)
  g = jnp.asarray(-r.uniform(0.0, 0.5, size=(B, Tn, K)), jnp.float32)
  return {"gla": {"log_decay": jnp.asarray(-r.uniform(0.0, 0.5, size=(B, Tn, K, H)), jnp.float32)},
          "mamba2": {"log_decay": g, "dt": -g}, "deltanet": {"beta": jnp.exp(g)},
          "gated_deltanet": {"beta": jnp.exp(g), "log_decay": g}}.get(kind, {})


@pytest.mark.parametrize("kind", NEW)
def test_causal_gradients_and_family_decoding(kind):
  """No gradient flows from a later key, value or gate to an earlier output; the registered family's
  decode steps (with their per-token inputs) equal its parallel forward."""
  family, Tn, cut = A.get(kind), 12, 6
  kw = family.call_kwargs({"chunk_size": 4} if kind != "based" else {"window_size": 3, "chunk_size": 4},
                          A.Shape(Tn, Tn, N, K, H, True))
  q, k, v, _, _ = _inputs(8, Tn=Tn, normalise=False)
  extra = _family_inputs(kind, Tn)
  f = jax.jit(lambda k, v, extra: family.fn(q, k, v, is_causal=True, **kw, **extra))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[:, :cut] ** 2), argnums=(0, 1, 2)))(k, v, extra)
  for g in jax.tree.leaves(grads):
    assert float(jnp.max(jnp.abs(g[:, cut:]))) == 0.0 and float(jnp.max(jnp.abs(g[:, :cut]))) > 0.0
  state = family.init_state(B, K, H, dtype=jnp.float32, value_head_dim=HV, **kw)
  step = jax.jit(lambda state, *x: family.step(state, *x[:3], **kw, **x[3]))
  outs = []
  for t in range(Tn):
    o, state = step(state, *jax.tree.map(lambda x: x[:, t:t + 1], (q, k, v, extra)))
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), f(k, v, extra), rtol=2e-4, atol=2e-5)


def test_bench_feeds_each_family_its_per_token_inputs():
  """`bench attention` times GLA with per-channel gates and DeltaNet with β from random inputs (as the layer
  computes them), differentiating through them, not on the pure call's defaults (fixed decays, β = 1/2)."""
  from efficient_attn.bench import attention as bench

  s = bench.bench_settings(bench.ATTENTION_DEFAULTS, {"variants": ["gla"],
                                                      "seq_lens": [16], "num_heads": 4, "num_kv_heads": 2,
                                                      "head_dim": 8, "rounds": 1, "min_time": 0}, "t")
  _, extra = bench._attention_variant("gla", s, 16)
  assert extra["log_decay"].shape == (1, 16, 2, 8) and float(jnp.max(extra["log_decay"])) < 0
  assert float(jnp.std(extra["log_decay"])) > 0  # data-dependent, not RetNet's fixed decays
  _, extra = bench._attention_variant("gated_deltanet", s, 16)
  assert set(extra) == {"beta", "log_decay"} and extra["beta"].shape == (1, 16, 2)
  assert bench._attention_variant("retnet", s, 16)[1] == {}
  rows = bench.bench_attention(s, progress=False)
  assert [r["variant"] for r in rows] == ["gla"] and rows[0]["time_s"] > 0


def test_bad_inputs_are_one_sentence():
  q, k, v, g, beta = _inputs()
  with pytest.raises(ValueError, match="log_decay"):
    gated_linear_attention(q, k, v, g[:, :5])
  with pytest.raises(ValueError, match="T=12, S=7"):
    gated_linear_attention(q, k[:, :7], v[:, :7], g)
  with pytest.raises(ValueError, match="key-padding"):
    delta_rule_attention(q, k, v, beta, mask=jnp.tril(jnp.ones((T, T), bool)))
  with pytest.raises(ValueError, match="bias"):
    delta_rule_attention(q, k, v, beta, bias=jnp.zeros((T, T)))
  with pytest.raises(ValueError, match="input_params"):
    A.Family(name="half", fn=lambda *a, **k: a[0], inputs=lambda *a: {})


# ----------------------------------------------------------------------------- the layers and the LM


def _tiny(kind, num_layers=2):
  options = {"based": {"window_size": 4, "chunk_size": 8}}.get(kind, {"chunk_size": 8})
  return ModelConfig(attention=kind, attention_options=options, num_layers=num_layers, d_model=32, num_heads=4,
                     num_kv_heads=2, ffn_dim=64)


def test_flops_are_the_families_own():
  for kind in NEW:
    att = flops.attention_flops(kind, 1024, num_heads=4, head_dim=64, num_kv_heads=2)
    assert 0 < att["ideal"] <= att["executed"] < att["backward"]
  lin = flops.attention_flops("linear", 1024, num_heads=4, head_dim=64, num_kv_heads=2)
  delta = flops.attention_flops("deltanet", 1024, num_heads=4, head_dim=64, num_kv_heads=2)
  assert delta["executed"] > lin["executed"]  # the UT transform's solve and chunk maps cost extra


def test_layers_with_token_inputs_decode_and_nnx_equals_linen():
  """Gated DeltaNet's gate params live beside q / k / v in Linen and NNX (same paths, same outputs);
  one-token calls (Linen decode_state, NNX cache) compute the gates per token and equal the parallel call."""
  kind, x = "gated_deltanet", jax.random.normal(jax.random.PRNGKey(2), (2, 10, 32))
  linen = layers.MultiHeadAttention(4, 2, kind, {"chunk_size": 4})
  variables = jax.jit(linen.init)(jax.random.PRNGKey(3), x)  # eager init dispatches op by op: slower
  family = A.get(kind)
  assert set(variables["params"]) - {"query", "key", "value", "out"} == set(
      family.input_params(family.make_options(None), A.Shape(1, 1, 4, 2, 8), 32))
  full = jax.jit(linen.apply)(variables, x)
  state, outs = A.init_decode_state(kind, 2, 2, 8), []
  step = jax.jit(lambda x1, p, state: linen.apply(variables, x1, positions=p, decode_state=state))
  for t in range(10):
    y, state = step(x[:, t:t + 1], jnp.full((2, 1), t), state)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)
  mha = enx.MultiHeadAttention(4, 32, num_kv_heads=2, attention=kind, attention_options={"chunk_size": 4},
                               rngs=nnx.Rngs(0))
  enx.load_linen(mha, variables)
  call = nnx.jit(lambda m, x, decode: m(x, decode=decode), static_argnums=2)
  np.testing.assert_allclose(call(mha, x, False), full, atol=1e-5)
  mha.init_cache(2, 10)
  np.testing.assert_allclose(jnp.concatenate([call(mha, x[:, :4], True), call(mha, x[:, 4:], True)], 1), full,
                             atol=1e-4)


# The LM-level learning runs (tests/test_train.py::test_tiny_lm_learns) cover softmax, Performer, MoE and bf16.
LAYER_OPTIONS = {"local": {"window": 4}, "sparse": {"block_size": 4}, "linear": {"chunk_size": 8}, "softmax": {}}


@pytest.mark.parametrize("kind", NEW + list(LAYER_OPTIONS))
def test_every_family_layer_trains(kind):
  """model.attention=kind: a few Adam steps of its attention layer (gate params included) on a fixed
  regression batch lower the loss, and every param gets a gradient."""
  import optax

  layer = layers.MultiHeadAttention(4, 2, kind, LAYER_OPTIONS[kind] if kind in LAYER_OPTIONS else _tiny(kind).options)
  x, y = (jax.random.normal(jax.random.PRNGKey(i), (2, 12, 32)) for i in (5, 6))
  params = layer.init(jax.random.PRNGKey(7), x)["params"]
  tx = optax.adam(3e-2)
  loss = lambda p: jnp.mean((layer.apply({"params": p}, x) - y) ** 2)  # noqa: E731

  @jax.jit
  def step(p, opt):
    value, grads = jax.value_and_grad(loss)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, value, grads

  opt, values = tx.init(params), []
  for _ in range(4):
    params, opt, value, grads = step(params, opt)
    values.append(float(value))
  assert all(np.isfinite(values)) and values[-1] < values[0], values
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads)), kind
