"""efficient_attn.nnx: the NNX modules equal the Linen layers for the same weights, decode like the
parallel forward, keep MoE aux as overwritten state, need no mesh, and train under nnx.jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from efficient_attn import layers, moe
from efficient_attn.config import ModelConfig
from efficient_attn import nnx as ean
from efficient_attn.sharding import make_mesh

B, T, D = 2, 16, 32
OPTIONS = {"local": {"window": 4}, "linear": {"chunk_size": 8}, "performer": {"num_features": 16, "chunk_size": 8}}


def _x(seed=1, shape=(B, T, D)):
  return jax.random.normal(jax.random.key(seed), shape)


def _shapes(tree):
  return jax.tree.map(jnp.shape, tree)


def _as_linen(linen, source, *args):
  """Linen variables holding `source`'s weights (an NNX module with another seed); the Linen layer must
  have the same param names and shapes (checked on its abstract init: nothing runs)."""
  abstract = nn.meta.unbox(jax.eval_shape(linen.init, jax.random.key(0), *args))
  variables = {"params": nnx.to_pure_dict(nnx.state(source, nnx.Param))}
  if "buffers" in abstract:
    variables["buffers"] = {source.attention: source.buffers.get_value()}
  assert _shapes(variables) == _shapes(dict(abstract))
  return variables


@pytest.mark.parametrize("kind", ["softmax", "local", "linear", "performer"])
def test_attention_equals_linen_with_the_same_weights(kind):
  """GQA (N=4, K=2), packed segments: Linen params and buffers copied in give the same outputs."""
  x = _x()
  seg = jnp.concatenate([jnp.ones((B, 10), jnp.int32), 2 * jnp.ones((B, T - 10), jnp.int32)], 1)
  make = lambda seed: ean.MultiHeadAttention(4, D, num_kv_heads=2, attention=kind,  # noqa: E731
                                             attention_options=OPTIONS.get(kind), rngs=nnx.Rngs(seed))
  linen = layers.MultiHeadAttention(4, 2, kind, OPTIONS.get(kind))
  variables = _as_linen(linen, make(7), x, seg)
  mha = ean.load_linen(make(0), variables)
  if kind == "performer":
    np.testing.assert_array_equal(mha.buffers.get_value()["projection"],
                                  variables["buffers"]["performer"]["projection"])
  y, y_ref = nnx.jit(lambda m: m(x, seg))(mha), jax.jit(linen.apply)(variables, x, seg)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opts", [dict(top_k=1), dict(top_k=2, glu=True, activation="silu", shared_hidden_dim=16),
                                  dict(top_k=2, dropless=True)], ids=["top1", "top2_glu_shared", "dropless"])
def test_moe_equals_linen_with_the_same_weights(opts):
  x = _x()
  linen = layers.MoEFeedForward(4, 64, capacity_factor=1.0, **opts)
  make = lambda seed: ean.MoEFeedForward(D, 4, 64, capacity_factor=1.0, rngs=nnx.Rngs(seed), **opts)  # noqa: E731
  variables = _as_linen(linen, make(7), x)
  ffn = ean.load_linen(make(0), variables)
  y, aux = nnx.jit(lambda m: m(x, return_aux=True))(ffn)
  y_ref, state = jax.jit(lambda v: linen.apply(v, x, mutable=["intermediates"]))(variables)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  ref_aux = moe.collect_aux(state["intermediates"])
  for name in ref_aux:
    np.testing.assert_allclose(aux[name], ref_aux[name], rtol=1e-6)
  if not opts.get("dropless"):
    assert float(aux["dropped_fraction"]) > 0  # capacity 1.0 drops some: the paths really differ


def test_block_equals_linen_block():
  """The pre-norm block (GQA attention, a SwiGLU top-2 MoE) from a ModelConfig's settings."""
  cfg = ModelConfig(d_model=D, num_heads=4, num_kv_heads=2, ffn_dim=64, ffn_activation="swiglu", num_experts=4, top_k=2)
  x = _x()
  linen = layers.Block(cfg, use_moe=True)
  make = lambda seed: ean.Block(D, 4, 64, num_kv_heads=2, ffn_activation="swiglu", num_experts=4,  # noqa: E731
                                moe_options=dict(top_k=2, capacity_factor=cfg.capacity_factor), rngs=nnx.Rngs(seed))
  variables = {"params": nnx.to_pure_dict(nnx.state(make(7), nnx.Param))}
  abstract = nn.meta.unbox(jax.eval_shape(linen.init, jax.random.key(0), x))
  assert _shapes(variables) == _shapes(dict(abstract))
  block = ean.load_linen(make(0), variables)
  np.testing.assert_allclose(nnx.jit(lambda m: m(x))(block), jax.jit(linen.apply)(variables, x), rtol=1e-5, atol=1e-5)


def test_moe_aux_is_overwritten_not_accumulated():
  """Every call overwrites `aux` (same structure, the last call's values); jitter only when not deterministic."""
  ffn = ean.MoEFeedForward(D, 4, 64, top_k=2, jitter=0.1, rngs=nnx.Rngs(0))
  structure = jax.tree.structure(ffn.aux.get_value())
  call = nnx.jit(lambda model, x: model(x))
  first, second = _x(1), _x(2)
  assert not np.allclose(call(ffn, first), call(ffn, first))  # training: a new jitter draw per call
  evaluation = nnx.view(ffn, deterministic=True)
  for x in (first, second, second):
    call(evaluation, x)
  expected = jax.jit(lambda x: moe.moe_ffn(x, ffn._params(), top_k=2)[1])(second)
  assert jax.tree.structure(evaluation.aux.get_value()) == structure
  for name, value in expected.items():
    np.testing.assert_allclose(evaluation.aux.get_value()[name], value, rtol=1e-6)
  np.testing.assert_allclose(ean.collect_aux(evaluation)["load_balancing_loss"], expected["load_balancing_loss"],
                             rtol=1e-6)
  assert evaluation.aux.get_value()["expert_fraction"].shape == (4,)


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_decode_equals_parallel_causal_forward(kind):
  x = _x()
  mha = ean.MultiHeadAttention(4, D, num_kv_heads=2, attention=kind, attention_options=OPTIONS.get(kind),
                               rngs=nnx.Rngs(0))
  parallel = nnx.jit(lambda m, x: m(x))(mha, x)
  decode = nnx.jit(lambda m, x: m(x, decode=True))
  mha.init_cache(B, T)
  prefill = decode(mha, x[:, :5])  # several tokens per call, then one at a time
  steps = [decode(mha, x[:, t:t + 1]) for t in range(5, T)]
  np.testing.assert_allclose(jnp.concatenate([prefill, *steps], 1), parallel, rtol=2e-5, atol=2e-5)
  assert int(mha.cache["index"]) == T


def test_buffers_redraw_and_stay_out_of_params():
  mha = ean.MultiHeadAttention(4, D, attention="performer", attention_options={"num_features": 16},
                               rngs=nnx.Rngs(0))
  before = mha.buffers.get_value()["projection"]
  assert before.shape == (16, D // 4)
  assert len(jax.tree.leaves(nnx.state(mha, nnx.Param))) == 4  # q, k, v, out kernels
  assert len(jax.tree.leaves(nnx.state(mha, ean.Buffer))) == 1
  mha.redraw_buffers(jax.random.key(5))
  assert not np.allclose(mha.buffers.get_value()["projection"], before)


def test_no_sharding_context_and_logical_axes():
  """Built under Flax's default eager sharding with no mesh; the logical names map by sharding.RULES."""
  with nnx.use_eager_sharding(True):
    ffn = ean.MoEFeedForward(D, 4, 64, rngs=nnx.Rngs(0))
    mha = ean.MultiHeadAttention(4, D, rngs=nnx.Rngs(0))
  mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
  assert ean.param_shardings(mha, mesh)["query"]["kernel"].get_value().spec == P("fsdp", "tensor", None)
  nnx.update(ffn, jax.device_put(nnx.state(ffn, nnx.Param), ean.param_shardings(ffn, mesh)))
  assert ffn.w_in[...].sharding.spec == P("expert", "fsdp", "tensor")


class TinyLM(nnx.Module):
  """A user's model: embedding, one MoE block (residual dropout on) from efficient_attn.nnx, tied unembedding."""

  def __init__(self, vocab, rngs):
    self.embed = nnx.Embed(vocab, D, rngs=rngs)
    self.block = ean.Block(D, 4, 64, num_experts=4, moe_options=dict(top_k=2), dropout=0.1, rngs=rngs)

  def __call__(self, tokens_BT):
    return self.embed.attend(self.block(self.embed(tokens_BT)))


def test_jitted_nnx_train_step_reduces_loss():
  model = TinyLM(16, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (B, T + 1), 0, 16)

  @nnx.jit
  def train_step(model, optimizer, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
      return ce + 0.01 * ean.collect_aux(model)["load_balancing_loss"]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, tokens)) for _ in range(6)]
  assert losses[-1] < losses[0] - 0.1, losses
  assert np.isfinite(float(ean.collect_aux(model)["router_z_loss"]))
