"""The short depthwise causal convolution (model.short_conv): a NumPy loop reference, packing, decoding,
the context-parallel halo (forward and gradient equal one device), and the model wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import flops, sharding
from efficient_attn.attention import context
from efficient_attn.attention.short_conv import init_short_conv_state, short_conv, short_conv_step
from efficient_attn.config import ConfigError, ModelConfig, with_overrides, validate, Config


def _reference(x, w, ids):
  """y[b, t] = Σ_j w[k−1−j] x[b, t−j] over taps inside t's document, by explicit loops."""
  B, T, C = x.shape
  k = w.shape[0]
  y = np.zeros_like(x)
  for b in range(B):
    for t in range(T):
      for j in range(k):
        if t - j >= 0 and (ids is None or ids[b, t - j] == ids[b, t]):
          y[b, t] += w[k - 1 - j] * x[b, t - j]
  return y


def _inputs(B=2, T=32, C=6, k=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, T, C)).astype(np.float32)
  w = rng.standard_normal((k, C)).astype(np.float32)
  ids = np.repeat(np.array([[0] * 5 + [1] * 14 + [2] * 13, [3] * 32]), 1, 0).astype(np.int32)[:B, :T]
  return x, w, ids


@pytest.mark.parametrize("k", [1, 2, 4])
def test_matches_the_loop_reference_with_and_without_documents(k):
  x, w, ids = _inputs(k=k)
  np.testing.assert_allclose(short_conv(jnp.asarray(x), jnp.asarray(w)), _reference(x, w, None), atol=1e-5)
  np.testing.assert_allclose(short_conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(ids)), _reference(x, w, ids),
                             atol=1e-5)


def test_decoding_step_by_step_equals_the_parallel_call():
  x, w, _ = _inputs()
  state = init_short_conv_state(2, 4, 6)
  outs = []
  for t in range(x.shape[1]):
    y, state = short_conv_step(jnp.asarray(x[:, t:t + 1]), jnp.asarray(w), state)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), _reference(x, w, None), atol=1e-5)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_split_over_four_devices_equals_one_device_forward_and_gradient(layout):
  """T 32 over 4 context devices (zigzag: 8 pieces of 4 tokens, so the halo of 3 crosses shards and documents)."""
  x, w, ids = _inputs()
  P = 4
  mesh = sharding.make_mesh({"context": P, "data": 2}, jax.devices()[:2 * P])
  xl, idl = context.to_layout(jnp.asarray(x), P, layout), context.to_layout(jnp.asarray(ids), P, layout)

  def loss(x, w, ids, split):
    y = short_conv(x, w, ids, context_layout=layout)
    return (y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))).sum(), y

  one = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, jnp.asarray(ids), False), argnums=(0, 1), has_aux=True))
  (l1, y1), (gx1, gw1) = one(jnp.asarray(x), jnp.asarray(w))
  with jax.set_mesh(mesh):
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "context"))
    xs, ids_s = jax.device_put(xl, spec), jax.device_put(idl, spec)
    # The weighting must follow the tokens: permute it into the layout too.
    def split_loss(x, w):
      y = short_conv(x, w, ids_s, context_layout=layout)
      weights = context.to_layout(jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)), P, layout)
      return (y * weights).sum(), y
    (l2, y2), (gx2, gw2) = jax.jit(jax.value_and_grad(split_loss, argnums=(0, 1), has_aux=True))(xs, jnp.asarray(w))
    text = jax.jit(split_loss).lower(xs, jnp.asarray(w)).compile().as_text()
  np.testing.assert_allclose(context.from_layout(y2, P, layout), y1, atol=1e-5)
  np.testing.assert_allclose(context.from_layout(gx2, P, layout), gx1, atol=1e-5)
  np.testing.assert_allclose(gw2, gw1, rtol=1e-5, atol=1e-5)
  assert abs(float(l2) - float(l1)) < 1e-4
  assert "collective-permute" in text and "all-gather" not in text  # a halo, never the sequence


def test_the_model_applies_it_per_layer_family_and_counts_its_flops():
  # The families' defaults: on (kernel 4) for Mamba-2, DeltaNet and Gated DeltaNet as their papers, else off.
  assert {f: ModelConfig(attention=f).conv_kernel for f in ("mamba2", "deltanet", "gated_deltanet", "gla", "softmax")
          } == {"mamba2": 4, "deltanet": 4, "gated_deltanet": 4, "gla": 0, "softmax": 0}
  assert ModelConfig(attention="gated_deltanet", short_conv=0).conv_kernel == 0
  assert ModelConfig(attention="gla", short_conv=3).conv_kernel == 3
  mixed = ModelConfig(num_layers=2, attention="gated_deltanet", full_attention_every=2)
  assert [m.conv_kernel for m in mixed.layer_configs()] == [4, 0]  # per layer: the softmax layer has none
  hybrid = ModelConfig(num_layers=4, short_conv=4, attention_pattern=("gla", "softmax"))
  assert [m.conv_kernel for m in hybrid.layer_configs()] == [4] * 4
  base = flops.model_flops_per_token(ModelConfig(num_layers=2, short_conv=0), 64)
  conv = flops.model_flops_per_token(ModelConfig(num_layers=2, short_conv=4), 64)
  N = K = 4
  H = 64
  assert conv["forward"] - base["forward"] == 2 * (2 * 4 * (N + 2 * K) * H)
  with pytest.raises(ConfigError, match="model.short_conv=-2 must be a kernel size"):
    validate(with_overrides(Config(), {"model.short_conv": -2}), 1)


def test_the_model_with_a_short_conv_is_exact_under_context_parallelism():
  from efficient_attn.model import TransformerLM

  cfg = ModelConfig(attention="gated_deltanet", num_layers=2, d_model=32, num_heads=2, ffn_dim=64, short_conv=4)
  model = TransformerLM(cfg)
  T, P = 32, 4
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, 256)
  ids = jnp.asarray(_inputs()[2])
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)
  assert "query_conv" in variables["params"]["trunk"]["block_0"]["attention"]
  one = jax.jit(model.apply)(variables, tokens, segment_ids=ids)
  mesh = sharding.make_mesh({"context": P, "data": 2}, jax.devices()[:2 * P])
  ex = context.lay_out_example({"inputs": np.asarray(tokens), "segment_ids": np.asarray(ids),
                                "positions": context.positions(np.asarray(ids))}, P, "zigzag")
  with jax.set_mesh(mesh):
    split = jax.jit(lambda v, t, s, p: model.apply(v, t, segment_ids=s, positions=p))(
        variables, ex["inputs"], ex["segment_ids"], ex["positions"])
  np.testing.assert_allclose(context.from_layout(split, P, "zigzag"), one, atol=2e-5)


def test_the_nnx_block_matches_the_linen_block_and_decodes_several_tokens_a_call():
  from flax import nnx

  from efficient_attn import layers
  from efficient_attn import nnx as ean

  cfg = ModelConfig(attention="gla", d_model=32, num_heads=2, ffn_dim=64, short_conv=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 32))
  linen = layers.Block(cfg)
  variables = linen.init(jax.random.PRNGKey(1), x)
  block = ean.Block(32, 2, 64, attention="gla", short_conv=3, rngs=nnx.Rngs(0))
  ean.load_linen(block, variables)
  ref = linen.apply(variables, x)
  np.testing.assert_allclose(block(x), ref, atol=1e-5)
  block.init_cache(2, 16)
  steps = [block(x[:, :5], decode=True), block(x[:, 5:6], decode=True), block(x[:, 6:], decode=True)]
  np.testing.assert_allclose(jnp.concatenate(steps, 1), ref, atol=1e-4)
