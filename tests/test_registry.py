"""The registry, the Flax drop-in and the shared decoding API, across all families."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attn import attention as A
from tests.reference import decode_sequence, softmax_reference

B, T, N, K, H = 2, 32, 4, 2, 8


def _qkv(seed=0, T=T, K=K):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
          jax.random.normal(ks[2], (B, T, K, H)))


def _opts(kind):
  return {
      "softmax": {},
      "local": {"window": 8},
      "sparse": {"layout": A.masks.local_layout(T // 8, T // 8, window=2, causal=True), "block_size": 8},
      "linear": {"chunk_size": 8},
      "performer": {"projection": A.performer_projection(jax.random.PRNGKey(1), 16, H), "chunk_size": 8},
  }.get(kind, {})


def test_registry_names():
  assert set(A.ATTENTION) >= {"softmax", "local", "sparse", "linear", "performer", "retnet", "gla", "mamba2",
                              "deltanet", "gated_deltanet", "based"}


@pytest.mark.parametrize("kind", sorted(A.ATTENTION))
def test_attend_dispatches_to_the_family(kind):
  q, k, v = _qkv()
  opts = _opts(kind)  # jitted: op by op, a delta-rule call dispatches hundreds of small programs
  out = jax.jit(lambda q, k, v: A.attend(kind, q, k, v, is_causal=True, **opts))(q, k, v)
  direct = jax.jit(lambda q, k, v: A.ATTENTION[kind](q, k, v, is_causal=True, **opts))(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(direct))


def test_attend_unknown_kind():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="unknown attention kind 'flash'; valid kinds"):
    A.attend("flash", q, k, v)
  with pytest.raises(ValueError, match="unknown attention kind 'lineer'; did you mean 'linear'\\? valid kinds are"
                                       " \\['based', .*'linear', 'local', .*'performer', .*'softmax', 'sparse'\\]."):
    A.get("lineer")
  with pytest.raises(ValueError, match="has no option 'num_feature'; did you mean 'num_features'\\? its options"):
    A.get("performer").make_options({"num_feature": 8})
  with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['windw'\]; did you mean 'window'\? the family's"):
    A.flax_attention_fn("local", windw=4)


def test_local_with_a_window_wider_than_the_sequence_is_causal_softmax():
  q, k, v = _qkv(3)
  out = A.attend("local", q, k, v, is_causal=True, window=T)
  np.testing.assert_allclose(out, softmax_reference(q, k, v, is_causal=True), atol=2e-5)


def test_flax_linen_drop_in_matches_reference():
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, N * H))
  mha = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H,
                                        attention_fn=A.flax_attention_fn("softmax", is_causal=True))
  params = mha.init(jax.random.PRNGKey(1), x)
  out = mha.apply(params, x)
  # Same params with Flax's own attention and its causal mask: the outputs agree.
  ref = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H).apply(
      params, x, mask=nn.make_causal_mask(jnp.ones((B, T))))
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("kind", ["linear", "local"])
def test_flax_nnx_drop_in(kind):
  rngs = nnx.Rngs(0)
  opts = {"local": {"window": T}, "linear": {"chunk_size": 8}}[kind]
  mha = nnx.MultiHeadAttention(num_heads=N, in_features=N * H, qkv_features=N * H, decode=False, rngs=rngs,
                               attention_fn=A.flax_attention_fn(kind, **opts))
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, N * H))
  out = mha(x, is_causal=True)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  if kind == "local":  # window >= T: exactly causal softmax, which nnx's default attention computes too
    ref_mha = nnx.MultiHeadAttention(num_heads=N, in_features=N * H, qkv_features=N * H, decode=False,
                                     rngs=nnx.Rngs(0))
    np.testing.assert_allclose(out, ref_mha(x, is_causal=True), atol=2e-5)


def test_flax_attention_fn_refuses_dropout():
  fn = A.flax_attention_fn("softmax")
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="dropout"):
    fn(q, k, v, dropout_rate=0.1, deterministic=False)


@pytest.mark.parametrize("kind", ["softmax", "local", "linear", "performer"])
def test_decode_api_matches_parallel_forward(kind):
  q, k, v = _qkv(2)
  opts = _opts(kind)
  parallel = A.attend(kind, q, k, v, is_causal=True, **opts)
  np.testing.assert_allclose(decode_sequence(kind, q, k, v, **opts), parallel, atol=5e-5, rtol=1e-4)


def test_decode_api_errors():
  with pytest.raises(ValueError, match="max_len"):
    A.init_decode_state("softmax", B, K, H)
  with pytest.raises(ValueError, match="projection"):
    A.init_decode_state("performer", B, K, H)
  with pytest.raises(ValueError, match="sparse"):
    A.init_decode_state("sparse", B, K, H, max_len=T)


def test_flax_attention_fn_prepares_typed_options_per_shape():
  """Options are checked when the function is made and prepared for the length it is called with."""
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, N * H))
  mha = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H,
                                        attention_fn=A.flax_attention_fn("sparse", block_size=8, pattern="local",
                                                                         window=T // 8))
  params = mha.init(jax.random.PRNGKey(1), x)
  ref = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H).apply(params, x)  # all blocks: full
  np.testing.assert_allclose(mha.apply(params, x), ref, atol=2e-5)
  with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['windw'\].*'window'"):
    A.flax_attention_fn("local", windw=4)
  with pytest.raises(ValueError, match="`window` must be a positive integer"):
    A.flax_attention_fn("local", window=0)


def test_eager_calls_compile_once_per_configuration():
  """compiled_when_eager: concrete arrays -> one jitted program per (structure, fixed options); tracers and
  jax.disable_jit() run the function as written; a fixed NumPy layout keys the cache by its contents."""
  from efficient_attn.attention._common import compiled_when_eager

  traces = []

  @compiled_when_eager(static=("layout",))
  def f(x, y=None, *, scale=1.0, layout=None):
    traces.append(isinstance(x, jax.core.Tracer))
    return x * scale + (0 if y is None else y) + (0 if layout is None else float(layout.sum()))

  x = jnp.arange(3.0)
  np.testing.assert_array_equal(f(x, scale=2.0), 2 * x)
  np.testing.assert_array_equal(f(x + 1, scale=2.0), 2 * x + 2)  # same program
  assert traces == [True]
  f(x, scale=3.0)
  f(x, x, scale=3.0)  # another option value, another structure: two more programs
  assert len(traces) == 3
  np.testing.assert_array_equal(f(x, layout=np.array([1, 2])), x + 3)  # read concretely inside the trace
  f(x, layout=np.array([1, 2]))
  np.testing.assert_array_equal(f(x, layout=np.array([1, 4])), x + 5)  # other contents: retraced
  assert len(traces) == 5
  np.testing.assert_array_equal(jax.jit(lambda x: f(x, scale=2.0))(x), 2 * x)  # inside jit: runs as written
  with jax.disable_jit():
    f(x, scale=2.0)
  assert traces[-2:] == [True, False]
  # A family: the same numbers as under jit, and a bad shape is still one ValueError before compiling.
  q, k, v = _qkv()
  np.testing.assert_array_equal(A.linear_attention(q, k, v, is_causal=True, chunk_size=8),
                                jax.jit(lambda *a: A.linear_attention(*a, is_causal=True, chunk_size=8))(q, k, v))
  with pytest.raises(ValueError, match="linear_attention"):
    A.linear_attention(q[..., :4], k, v, is_causal=True)
