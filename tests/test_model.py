"""TransformerLM / EncoderClassifier: logical axes, causality, packing, generation, scan, NNX bridge."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attn.config import ModelConfig
from efficient_attn.model import EncoderClassifier, TransformerLM, generate

FAMILIES = ["softmax", "local", "sparse", "linear", "performer"]
T = 32


OPTIONS = {"local": {"window": 8}, "sparse": {"block_size": 8}, "linear": {"chunk_size": 8},
           "performer": {"num_features": 16, "chunk_size": 8}}


def tiny(**kw):
  base = dict(num_layers=2, d_model=32, num_heads=4, ffn_dim=64)
  kw = {**base, **kw}
  kw.setdefault("attention_options", OPTIONS.get(kw.get("attention", "softmax")))
  return ModelConfig(**kw)


def family(kind, **kw):
  """The model each family's tests share (GQA: 4 query heads over 2 key/value heads)."""
  return tiny(attention=kind, num_kv_heads=2, **kw)


_VARIABLES, _APPLY = {}, {}


def _init(cfg, num_classes=None):
  """(model, variables): {"params"} plus {"buffers"} for a family that has them (the Performer).
  One jitted init per config, shared by every test of this module (eager init dispatches op by op)."""
  model = TransformerLM(cfg) if num_classes is None else EncoderClassifier(cfg, num_classes=num_classes)
  if (cfg, num_classes) not in _VARIABLES:
    _VARIABLES[cfg, num_classes] = jax.jit(model.init)(jax.random.PRNGKey(0), _tokens())
  return model, _VARIABLES[cfg, num_classes]


def _apply(model):
  """jitted (variables, tokens, segment_ids=None) -> logits, one per model, shared by the tests."""
  key = (type(model), model.config, getattr(model, "num_classes", None))
  if key not in _APPLY:
    _APPLY[key] = jax.jit(lambda variables, tokens, seg=None: model.apply(variables, tokens, segment_ids=seg))
  return _APPLY[key]


def _tokens(seed=0, B=2):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, 256)


def test_every_param_has_logical_axes():
  tokens = _tokens()
  for cfg in [tiny(), tiny(num_experts=4, moe_every=2, scan_layers=True)]:
    boxed = jax.eval_shape(TransformerLM(cfg).init, jax.random.PRNGKey(0), tokens)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for box in leaves:
      assert len(box.names) == len(box.value.shape)
      assert {"embed", "mlp", "heads", "kv_heads", "vocab", "expert", "head_dim", "layers", "norm"} >= set(box.names)



@pytest.mark.parametrize("kind", FAMILIES)
def test_lm_is_causal_and_respects_segments(kind):
  model, params = _init(family(kind))
  apply = functools.partial(_apply(model), params)
  tokens = _tokens()
  seg = jnp.concatenate([jnp.ones((2, 16), jnp.int32), 2 * jnp.ones((2, 16), jnp.int32)], 1)
  base = apply(tokens, seg)
  assert base.shape == (2, T, 256) and base.dtype == jnp.float32
  # Changing the future never changes the past.
  changed = apply(tokens.at[:, 20:].set((tokens[:, 20:] + 1) % 256), seg)
  np.testing.assert_allclose(changed[:, :20], base[:, :20], atol=1e-5)
  assert not np.allclose(changed[:, 20:], base[:, 20:])
  # Segment 2 (tokens 16..31) is blind to segment 1, and its positions restart:
  # it gives the same logits as the same tokens alone at the start of a row.
  other = apply(tokens.at[:, :16].set((tokens[:, :16] + 7) % 256), seg)
  np.testing.assert_allclose(other[:, 16:], base[:, 16:], atol=1e-5)
  if kind != "sparse":  # a block layout is not shift-invariant: BigBird's global/random blocks move
    alone = apply(jnp.concatenate([tokens[:, 16:], tokens[:, 16:]], 1), seg)
    np.testing.assert_allclose(alone[:, :16], base[:, 16:], atol=1e-4)


@pytest.mark.parametrize("kind, scan", [("softmax", False), ("local", False), ("linear", False),
                                        ("performer", False), ("softmax", True)])
def test_generation_matches_parallel_forward(kind, scan):
  """8 prompt tokens, then 24 generated: the decoding states (GQA KV cache, local window, recurrent
  state, Performer features) give the parallel forward's logits at every position."""
  model, params = _init(family(kind, scan_layers=scan))
  prompt = _tokens(1)[:, :8]
  tokens, logits = generate(model, params, prompt, T - 8)
  assert tokens.shape == (2, T)
  np.testing.assert_array_equal(tokens[:, :8], prompt)
  parallel = _apply(model)(params, tokens)
  np.testing.assert_allclose(logits, parallel[:, :-1], atol=2e-4, rtol=1e-4)
  # Greedy: every generated token is the argmax of the previous position's logits.
  np.testing.assert_array_equal(tokens[:, 8:], jnp.argmax(parallel[:, 7:-1], -1))


def test_scan_layers_equals_the_loop():
  tokens = _tokens()
  loop_model, loop_params = _init(family("softmax"))
  scan_model, scan_variables = _init(family("softmax", scan_layers=True))
  scan_params = nn.unbox(scan_variables["params"])
  layers = [nn.unbox(loop_params["params"])["trunk"][f"block_{i}"] for i in range(loop_model.config.num_layers)]
  scan_params["trunk"]["layers"]["block_0"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  for k in ("embed", "final_norm", "unembed"):
    scan_params[k] = nn.unbox(loop_params["params"])[k]
  np.testing.assert_allclose(_apply(scan_model)({"params": scan_params}, tokens),
                             _apply(loop_model)(loop_params, tokens), atol=1e-5)


def test_moe_model_reports_aux_and_expert_dim_sizes_the_experts():
  from efficient_attn.moe import collect_aux

  model, params = _init(tiny(num_experts=4, top_k=2, moe_every=2, expert_dim=24))
  _, state = jax.jit(lambda p, t: model.apply(p, t, mutable=["intermediates"]))(params, _tokens())
  aux = collect_aux(state["intermediates"])
  assert aux["expert_fraction"].shape == (4,) and float(aux["load_balancing_loss"]) > 0
  params = nn.unbox(params["params"])
  assert params["trunk"]["block_1"]["moe"]["w_in"].shape == (4, 32, 24)
  assert params["trunk"]["block_0"]["ffn"]["w_in"]["kernel"].shape == (32, 64)


def test_nnx_bridge_wraps_the_linen_lm():
  """NNX users wrap the Linen LM with ToNNX; outside a mesh, eager sharding of the logical axes is off."""
  model, _ = _init(family("linear"))
  tokens = _tokens()

  @nnx.jit
  def init_and_call(lm, tokens):
    nnx.bridge.lazy_init(lm, tokens)
    return lm(tokens)

  with nnx.use_eager_sharding(False):
    lm = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0))
    out = init_and_call(lm, tokens)
  pure = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
  linen_params = pure["params"] if "params" in pure else pure
  assert jax.tree.leaves(linen_params)  # the params live in the NNX module after the jitted lazy init
  np.testing.assert_allclose(out, _apply(model)({"params": linen_params}, tokens), atol=1e-5)
  assert out.shape == (2, T, 256)


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_encoder_classifier_ignores_padding(kind):
  model, params = _init(tiny(attention=kind), num_classes=10)
  apply = _apply(model)
  tokens = _tokens()
  seg = jnp.ones((2, T), jnp.int32).at[:, 24:].set(0)
  logits = apply(params, tokens, seg)
  assert logits.shape == (2, 10)
  other = apply(params, tokens.at[:, 24:].set(0), seg)
  np.testing.assert_allclose(other, logits, atol=1e-5)


def test_softmax_impl_reaches_the_layers():
  """The softmax option `implementation` picks the path: same logits, different programs."""
  tokens = _tokens()
  _, params = _init(family("softmax"))
  outs, hlos = [], []
  for impl in ("xla", "chunked"):
    apply = _apply(TransformerLM(family("softmax", attention_options={"implementation": impl})))
    outs.append(apply(params, tokens))
    hlos.append(apply.lower(params, tokens).as_text())
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)
  assert ("while" in hlos[1]) and ("while" not in hlos[0])  # chunked = a loop over key tiles


@pytest.mark.parametrize("scan", [False, True])
def test_performer_projection_is_a_per_layer_buffer(scan):
  """Each layer draws its own projection from the init rng, kept in the "buffers" collection (not trained);
  `redraw_buffers` draws them anew and the model then gives other logits."""
  from efficient_attn.layers import redraw_buffers

  tokens = _tokens()
  model, variables = _init(family("performer", scan_layers=scan))
  assert set(variables) == {"params", "buffers"}
  projections = [x for x in jax.tree.leaves(variables["buffers"])]
  if scan:  # one stacked [layers, M, H] array
    projections = list(projections[0])
  assert len(projections) == model.config.num_layers and projections[0].shape == (16, 8)
  assert not np.allclose(projections[0], projections[1])  # own draw per layer
  # jitted, as the trainer runs it: the example forward is dead code, only the draws remain
  fresh = jax.jit(lambda v, rng, t: redraw_buffers(model, v, rng, t))(variables, jax.random.PRNGKey(7), tokens)
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
  np.testing.assert_array_equal(jax.tree.leaves(fresh["params"])[0], jax.tree.leaves(variables["params"])[0])
  new = jax.tree.leaves(fresh["buffers"])[0]
  assert new.shape == jax.tree.leaves(variables["buffers"])[0].shape
  assert not np.allclose(new, jax.tree.leaves(variables["buffers"])[0])
  apply = _apply(model)
  assert not np.allclose(apply(fresh, tokens), apply(variables, tokens))
  assert "buffers" not in _init(family("linear"))[1]  # families without buffers have none


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_only_with_a_dropout_rng(scan):
  """model.dropout is residual dropout in training (a "dropout" rng given) and the identity otherwise."""
  tokens = _tokens()
  plain, variables = _init(family("softmax", scan_layers=scan))
  dropped = TransformerLM(family("softmax", scan_layers=scan, dropout=0.5))
  with_rng = lambda model: jax.jit(lambda v, t, rng: model.apply(v, t, rngs={"dropout": rng}))
  want = _apply(plain)(variables, tokens)
  np.testing.assert_array_equal(_apply(dropped)(variables, tokens), want)  # eval / generate: no rng, no dropout
  dropped_apply = with_rng(dropped)
  a = dropped_apply(variables, tokens, jax.random.PRNGKey(1))
  b = dropped_apply(variables, tokens, jax.random.PRNGKey(1))
  c = dropped_apply(variables, tokens, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)  # a function of the key
  assert not np.allclose(a, want, atol=1e-3) and not np.allclose(a, c, atol=1e-3)
  np.testing.assert_array_equal(with_rng(plain)(variables, tokens, jax.random.PRNGKey(1)), want)
