"""Numerical robustness: long sequences with large-norm inputs stay finite and exact.

  family (length)                       inputs                      checked
  softmax "xla" (2048, bidirectional)   q, k ~ N(0, 24²), H 32:      forward and all gradients finite over the
  softmax "chunked" (4096, causal)      |q·k|·scale reaches ~2e3    whole sequence, in float32 and bfloat16;
  local, window 256 (4096, causal)      (softmax ~ one-hot; elu+1   the last 128 queries (against all their keys)
  block-sparse BigBird, bs 64 (4096)    features up to ~100; FAVOR+ vs float64; softmax families in float32:
  linear elu+1 (4096, causal)           exponents ~ -1e3 ± 400)     also their dq vs float64
  Performer, M 64 (4096, causal)
  TransformerLM, each family (1024)     bf16, embeddings x1e3,      logits and every parameter gradient finite
                                        q/k kernels x30

tests/test_linear.py / test_performer.py run 16384 tokens at |x| ~ 3; softmax with logits
~1e4 and router ties / extreme router logits are in tests/test_faults.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn.attention import (block_sparse_attention, linear_attention, local_attention, masks,
                                      performer_attention, performer_projection, softmax_attention)
from efficient_attn.attention import names as attention_names
from efficient_attn.config import ModelConfig
from efficient_attn.model import TransformerLM
from reference import elu_plus_one, kernel_reference, softmax_reference

B, N, K, H = 1, 2, 1, 32  # MQA: the kv head is shared, as GQA models do
STD = 24.0                # logits q·k·H^-0.5 have std STD² = 576: max |logit| ~ 2e3 over 4096 keys
ROWS = 128                # the last ROWS queries are checked against float64
WINDOW, BLOCK = 256, 64
W_MH = np.asarray(performer_projection(jax.random.PRNGKey(2), 64, H), np.float64)
# FAVOR+ at these norms: the key features exp(W k' - |k'|²/2 - max) span ~e^±1000, far beyond float32 (e^±88),
# so a float32 Performer cannot reproduce the float64 FAVOR+ estimate; it must stay finite (FEATURE_EPS floors
# the denominator) and remain a weighted mean of the values it sees.


def _bigbird(T):
  return masks.bigbird_layout(T // BLOCK, T // BLOCK, window=3, num_global=1, num_random=2, seed=0)


def _favor_features(x, stabilise_axes):
  """FAVOR+ softmax-kernel features in float64 over their max along `stabilise_axes` (cancels in the ratio)."""
  x = np.asarray(x, np.float64) * H ** -0.25
  logits = x @ W_MH.T - 0.5 * np.sum(x * x, -1, keepdims=True)
  return np.exp(logits - logits.max(axis=stabilise_axes, keepdims=True))


def _softmax_ref(q, k, v, vis):
  return softmax_reference(q, k, v, mask=vis[None, None])


def _linear_ref(q, k, v, vis):
  return kernel_reference(elu_plus_one(q), elu_plus_one(k), v, mask=vis[None, None])


def _performer_ref(q, k, v, vis):
  return kernel_reference(_favor_features(q, -1), _favor_features(k, (1, 3)), v, mask=vis[None, None])


_causal = lambda t, s, T: s <= t  # noqa: E731
_performer = functools.partial(performer_attention, projection=jnp.asarray(W_MH, jnp.float32))

# T, attention function, is_causal, visibility of the last ROWS queries (t [ROWS, 1], s [1, T]), reference
CASES = [
    pytest.param(2048, functools.partial(softmax_attention, implementation="xla"), False,
                 lambda t, s, T: np.ones((ROWS, T), bool), _softmax_ref, id="softmax-xla"),
    pytest.param(4096, functools.partial(softmax_attention, implementation="chunked", chunk_size=512), True,
                 _causal, _softmax_ref, id="softmax-chunked"),
    pytest.param(4096, functools.partial(local_attention, window=WINDOW), True,
                 lambda t, s, T: (s <= t) & (s > t - WINDOW), _softmax_ref, id="local"),
    pytest.param(4096, functools.partial(block_sparse_attention, layout=_bigbird(4096), block_size=BLOCK), False,
                 lambda t, s, T: np.repeat(np.repeat(_bigbird(T)[(T - ROWS) // BLOCK:], BLOCK, 0), BLOCK, 1),
                 _softmax_ref, id="bigbird"),
    pytest.param(4096, linear_attention, True, _causal, _linear_ref, id="linear"),
    pytest.param(4096, _performer, True, _causal, _performer_ref, id="performer"),
]


def _inputs(T, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, N, H)) * STD
  k = rng.normal(size=(B, T, K, H)) * STD
  v = rng.normal(size=(B, T, K, H))
  ct = rng.normal(size=(B, T, N, H))  # the output cotangent
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(ct, jnp.float32),)


def _dq_reference(q, k, v, ct, vis):
  """float64 dq of Σ out·ct for queries q [B, R, N, H] seeing keys vis [R, S]: scale·(P ∘ (dP − Σ P∘dP)) K.

  Also returns the largest |logit| (the test checks the inputs are as extreme as it claims)."""
  q, k, v, ct = (np.asarray(x, np.float64) for x in (q, k, v, ct))
  k, v = (np.repeat(x, N // K, axis=2) for x in (k, v))
  logits = np.where(vis, np.einsum("brnh,bsnh->bnrs", q, k) * H ** -0.5, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("brnh,bsnh->bnrs", ct, v)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  return np.einsum("bnrs,bsnh->brnh", ds, k) * H ** -0.5, np.abs(logits[np.isfinite(logits)]).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T, fn, is_causal, rows_vis, reference", CASES)
def test_long_large_norm_inputs_stay_finite_and_exact(T, fn, is_causal, rows_vis, reference, dtype):
  q, k, v, ct = _inputs(T, dtype)

  @jax.jit
  def forward_and_grads(q, k, v):
    def loss(q, k, v):
      out = fn(q, k, v, is_causal=is_causal)
      return jnp.sum(out.astype(jnp.float32) * ct), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (_, out), grads = forward_and_grads(q, k, v)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  for name, x in [("out", out), ("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2])]:
    assert np.isfinite(np.asarray(x, np.float32)).all(), f"{name} has NaN/inf"

  vis = rows_vis(np.arange(T - ROWS, T)[:, None], np.arange(T)[None, :], T)
  q_rows = q[:, T - ROWS:]
  got = np.asarray(out[:, T - ROWS:], np.float64)
  if reference is _performer_ref:  # see the comment above CASES: bounded, not exact
    v_max = np.abs(np.asarray(v, np.float64)).max()
    assert np.abs(np.asarray(out, np.float64)).max() <= v_max * (1 + 1e-2)
    return
  ref = reference(q_rows, k, v, vis)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, ref, atol=2e-3)
  else:
    # bf16 keeps ~3 significant digits of q·scale, so softmax logits move by ~|logit|·2⁻⁹ ≈ 4:
    # a row whose top two logits are closer than that may pick the other key; most may not.
    row_err = np.abs(got - ref).max(axis=-1)
    assert np.mean(row_err < 0.05) > 0.9, np.sort(row_err.ravel())[-20:]
    assert np.median(row_err) < 0.02
  if reference is _softmax_ref:
    dq_ref, max_logit = _dq_reference(q_rows, k, v, ct[:, T - ROWS:], vis)
    assert max_logit > 1e3  # the inputs are as extreme as this test claims
    if dtype == jnp.float32:
      got_dq = np.asarray(grads[0][:, T - ROWS:], np.float64)
      np.testing.assert_allclose(got_dq, dq_ref, atol=2e-2 * np.abs(dq_ref).max())


def _model_params(model, T, d_model, factors):
  """Parameters drawn in NumPy for the model's shapes (no init to compile): kernels N(0, 1/d_model),
  embeddings N(0, 1), norm scales 1; a leaf whose path names a key of `factors` is multiplied by it."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    names = [getattr(p, "key", "") for p in path]
    if "scale" in names:
      x = np.ones(leaf.shape)
    else:
      x = rng.normal(size=leaf.shape) * (1.0 if "embed" in names else d_model ** -0.5)
    for part, f in factors.items():
      x = x * f if part in names else x
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


@pytest.mark.parametrize("attention", attention_names())
def test_bf16_model_with_huge_embeddings_and_logits_stays_finite(attention):
  T, D = 1024, 64
  options = {"local": {"window": 128}, "sparse": {"block_size": 64}, "performer": {"num_features": 64}}
  cfg = ModelConfig(attention=attention, attention_options=options.get(attention), num_layers=1, d_model=D,
                    num_heads=2, ffn_dim=128, dtype="bfloat16")
  model = TransformerLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, T + 1)), jnp.int32)
  # Embeddings ~1e3 (the residual stream); q and k ~30 after the norm, so attention logits ~1e3.
  params = _model_params(model, T, D, {"embed": 1e3, "query": 30.0, "key": 30.0})
  # The Performer's projections as init draws them (only the buffers are computed: params init is dead code).
  buffers = jax.jit(lambda: model.init(jax.random.PRNGKey(0), tokens[:, :-1]).get("buffers", {}))()

  @jax.jit
  def loss_and_grads(params):
    def loss(params):
      logits = model.apply({"params": params, **({"buffers": buffers} if buffers else {})}, tokens[:, :-1])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, logits), grads = loss_and_grads(params)
  assert np.isfinite(float(loss)) and np.isfinite(np.asarray(logits, np.float32)).all()
  bad = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
         if not np.isfinite(np.asarray(g, np.float32)).all()]
  assert not bad, f"non-finite gradients: {bad}"
  assert all(np.abs(np.asarray(g, np.float32)).max() > 0 for g in jax.tree.leaves(grads))
