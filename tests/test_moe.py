"""MoE routing and dispatch on one device against the per-token reference (tests/moe_reference.py)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from efficient_attn import moe
from efficient_attn.layers import MoEFeedForward
from efficient_attn.moe import dispatch, gmm
from moe_reference import dense_moe_jnp, moe_reference, softmax

B, T, D, F, E = 2, 32, 16, 24, 4
STATIC = ("top_k", "capacity_factor", "router", "dropless", "jitter", "activation", "mesh", "expert_axis")
ffn = jax.jit(moe.moe_ffn, static_argnames=STATIC)  # one compilation per config, not one per op


def make_params(key, D=D, F=F, E=E, glu=False, shared=0):
  k = jax.random.split(key, 7)
  p = {"router": jax.random.normal(k[0], (D, E)),
       "w_in": jax.random.normal(k[1], (E, D, F)) * D ** -0.5,
       "w_out": jax.random.normal(k[2], (E, F, D)) * F ** -0.5}
  if glu:
    p["w_gate"] = jax.random.normal(k[3], (E, D, F)) * D ** -0.5
  if shared:
    p["shared_w_in"] = jax.random.normal(k[4], (D, shared)) * D ** -0.5
    p["shared_w_out"] = jax.random.normal(k[5], (shared, D)) * shared ** -0.5
    if glu:
      p["shared_w_gate"] = jax.random.normal(k[6], (D, shared)) * D ** -0.5
  return p


@pytest.fixture(scope="module")
def data():
  return jax.random.normal(jax.random.key(0), (B, T, D)), make_params(jax.random.key(1))


CONFIGS = {
    "top1_cf1.0": dict(top_k=1, capacity_factor=1.0),
    "top1_cf1.25": dict(top_k=1, capacity_factor=1.25),
    "top2_cf1.0": dict(top_k=2, capacity_factor=1.0),
    "experts_choose": dict(router="experts_choose", capacity_factor=1.0),
    "experts_choose_k2": dict(router="experts_choose", top_k=2, capacity_factor=0.75),
    "dropless_top1": dict(dropless=True),
    "dropless_top2": dict(dropless=True, top_k=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_per_token_reference(data, name):
  x, params = data
  opts = CONFIGS[name]
  y, aux = jax.jit(lambda x, p: moe.moe_ffn(x, p, **opts))(x, params)
  y_ref, dropped_ref, _, _ = moe_reference(x, params, **opts)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(aux["dropped_fraction"], dropped_ref, atol=1e-6)
  if name in ("top1_cf1.0", "top2_cf1.0", "experts_choose"):
    assert dropped_ref > 0  # the drop logic is exercised


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_dropless_equals_capacity_without_drops(data, impl, top_k):
  x, params = data
  probs = jax.nn.softmax(x @ params["router"])
  expert, gate = moe.tokens_choose(probs, top_k)
  experts = {k: params[k] for k in ("w_in", "w_out")}
  y_dropless = jax.jit(dispatch.dropless_experts, static_argnums=(4, 5))(x, expert, gate, experts, jax.nn.gelu, impl)
  y_cap, aux = ffn(x, params, top_k=top_k, capacity_factor=float(E))  # C = T: nothing dropped
  assert float(aux["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(y_dropless, y_cap, atol=1e-5, rtol=1e-5)


def test_capacity_overflow_drops_to_zero():
  x = jax.random.normal(jax.random.key(2), (B, T, D)).at[..., 0].set(1.0)
  params = make_params(jax.random.key(3))
  params["router"] = params["router"] * 0.01
  params["router"] = params["router"].at[0, 0].set(50.0)  # every token prefers expert 0
  y, aux = ffn(x, params, top_k=1, capacity_factor=1.0)
  C = math.ceil(1.0 * T / E)
  np.testing.assert_allclose(aux["dropped_fraction"], 1 - C / T, atol=1e-7)
  np.testing.assert_allclose(aux["expert_fraction"], [1, 0, 0, 0], atol=1e-7)
  assert np.all(np.asarray(y[:, C:]) == 0.0)  # over capacity: exactly 0, the residual carries them
  assert np.all(np.abs(np.asarray(y[:, :C])).sum(-1) > 0)
  np.testing.assert_allclose(y, moe_reference(x, params, capacity_factor=1.0)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_dropless_with_collapsed_router(impl):
  """Every token on one expert: the whole load lands in the overflow blocks, nothing dropped."""
  x = jax.random.normal(jax.random.key(2), (B, T, D)).at[..., 0].set(1.0)
  params = make_params(jax.random.key(3))
  params["router"] = (params["router"] * 0.01).at[0, 2].set(50.0)
  expert, gate = moe.tokens_choose(jax.nn.softmax(x @ params["router"]), 2)
  experts = {k: params[k] for k in ("w_in", "w_out")}
  y = jax.jit(dispatch.dropless_experts, static_argnums=(4, 5))(x, expert, gate, experts, jax.nn.gelu, impl)
  y_ref, dropped, _, _ = moe_reference(x, params, top_k=2, dropless=True)
  assert dropped == 0 and np.all(np.asarray(expert[..., 0]) == 2)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_losses_match_paper_formulas(data, top_k):
  x, params = data
  _, aux = ffn(x, params, top_k=top_k)
  logits = np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64)
  probs = softmax(logits)
  choice = np.argsort(-probs, axis=-1)[..., :top_k]
  f = np.bincount(choice.reshape(-1), minlength=E) / choice.size  # Switch eq. 4: f_i
  P = probs.reshape(-1, E).mean(0)  # P_i
  np.testing.assert_allclose(aux["load_balancing_loss"], E * np.sum(f * P), rtol=1e-5)
  np.testing.assert_allclose(aux["expert_fraction"], f, atol=1e-6)
  lse = np.log(np.exp(logits).sum(-1))  # ST-MoE eq. 5
  np.testing.assert_allclose(aux["router_z_loss"], np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(aux["router_entropy"], np.mean(-(probs * np.log(probs)).sum(-1)), rtol=1e-4)
  np.testing.assert_allclose(aux["router_confidence"], probs.max(-1).mean(), rtol=1e-5)


def test_load_balancing_loss_is_one_when_uniform():
  probs = jnp.full((2, 8, 4), 0.25)
  expert = jnp.tile(jnp.arange(4), 4).reshape(2, 8, 1)
  np.testing.assert_allclose(moe.load_balancing_loss(probs, expert), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["top1_cf1.0", "top2_cf1.0", "experts_choose", "dropless_top2"])
def test_gradients_match_dense_reference_and_reach_every_expert(data, name):
  x, params = data
  opts = CONFIGS[name]
  _, _, combine, topk = moe_reference(x, params, **opts)
  r = jax.random.normal(jax.random.key(4), x.shape)
  loss = lambda p, x: jnp.sum(moe.moe_ffn(x, p, **opts)[0] * r)
  loss_ref = lambda p, x: jnp.sum(dense_moe_jnp(x, p, combine, topk, opts.get("top_k", 1)) * r)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  grads_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(params, x)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, atol=5e-5, rtol=1e-4)
  g_params = grads[0]
  assert np.abs(np.asarray(g_params["router"])).sum() > 0
  for key in ("w_in", "w_out"):
    assert np.all(np.abs(np.asarray(g_params[key])).sum(axis=(1, 2)) > 0), f"{key}: an expert got no gradient"


def test_aux_losses_train_the_router(data):
  x, params = data
  g = jax.jit(jax.grad(lambda p: sum(moe.moe_ffn(x, p)[1][k] for k in ("load_balancing_loss", "router_z_loss"))))(params)
  assert np.abs(np.asarray(g["router"])).sum() > 0


@pytest.mark.parametrize("opts", [dict(top_k=2, capacity_factor=1.0), dict(dropless=True, top_k=2)])
def test_glu_and_shared_expert(opts):
  x = jax.random.normal(jax.random.key(5), (B, T, D))
  params = make_params(jax.random.key(6), glu=True, shared=8)
  silu = lambda h: h / (1 + np.exp(-h))
  y_ref, _, combine, topk = moe_reference(x, params, act=silu, **opts)
  xs, p64 = np.asarray(x, np.float64), {k: np.asarray(v, np.float64) for k, v in params.items()}
  y_ref = y_ref + (silu(xs @ p64["shared_w_gate"]) * (xs @ p64["shared_w_in"])) @ p64["shared_w_out"]
  loss = lambda p: (lambda y: (jnp.sum(y), y))(moe.moe_ffn(x, p, activation="silu", **opts)[0])
  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
  grads_ref = jax.jit(jax.grad(lambda p: jnp.sum(dense_moe_jnp(x, p, combine, topk, 2, act=jax.nn.silu))))(params)
  for k in params:
    np.testing.assert_allclose(grads[k], grads_ref[k], atol=5e-5, rtol=1e-4, err_msg=k)


def test_jitter_needs_rng_and_is_reproducible(data):
  x, params = data
  key = jax.random.key(7)

  @jax.jit
  def logits(x, router):
    return (moe.router_logits(x, router), moe.router_logits(x, router, jitter=0.1),
            moe.router_logits(x, router, jitter=0.1, rng=key))

  base, no_rng, jittered = logits(x, params["router"])
  np.testing.assert_array_equal(no_rng, base)
  noise = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, 0.9, 1.1))
  assert noise.min() >= 0.9 and noise.max() <= 1.1
  np.testing.assert_allclose(jittered, (np.asarray(x) * noise) @ np.asarray(params["router"]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(jittered, base)


def test_expert_capacity_formula():
  assert dispatch.expert_capacity(512, 8, 1, 1.25) == 80
  assert dispatch.expert_capacity(512, 8, 2, 1.25) == 160
  assert dispatch.expert_capacity(80, 8, 1, 1.1) == 11  # not 12 from float rounding
  assert dispatch.expert_capacity(10, 4, 1, 1.0) == 3  # ceil
  assert dispatch.expert_capacity(8, 2, 2, 4.0) == 8  # at most all tokens


@pytest.mark.parametrize("bulk, block", [(0, 1), (0, 4), (2, 2)])
def test_sort_by_expert_layout(bulk, block):
  expert = jnp.array([2, 0, 2, 1, 0, 2, 3, 3, 3, 3, 0, 3, 3])
  row, block_expert, counts, rows = dispatch.sort_by_expert(expert, 4, bulk=bulk, block=block, num_shards=2)
  row, block_expert = np.asarray(row), np.asarray(block_expert)
  assert len(set(row.tolist())) == len(row)  # every pair has its own row
  np.testing.assert_array_equal(counts, [3, 1, 3, 6])
  seen = {}
  for i, e in enumerate(np.asarray(expert)):
    shard, local = divmod(int(e), 2)
    assert row[i] // rows == shard
    r = row[i] % rows
    rank = seen.setdefault(int(e), 0)
    seen[int(e)] += 1
    if rank < bulk:  # bulk: rows [local * bulk, (local + 1) * bulk) of the shard, in item order
      assert r == local * bulk + rank
    else:  # overflow: a block owned by this expert
      assert block_expert[shard, (r - 2 * bulk) // block] == local
  # stable: same expert keeps item order
  for i in range(len(expert)):
    for j in range(i):
      if expert[i] == expert[j]:
        assert row[j] < row[i]
  assert np.sum(block_expert < 2) == sum(-(-max(c - bulk, 0) // block) for c in [3, 1, 3, 6])


def test_block_mlp_skips_empty_blocks_and_matches_autodiff():
  k = jax.random.split(jax.random.key(8), 5)
  x = jax.random.normal(k[0], (5 * 4, 6))
  experts = {"w_in": jax.random.normal(k[1], (3, 6, 7)), "w_gate": jax.random.normal(k[2], (3, 6, 7)),
             "w_out": jax.random.normal(k[3], (3, 7, 6))}
  block_expert = jnp.array([1, 3, 0, 1, 2])  # block 1 is empty (id >= E)
  per_row = jnp.repeat(block_expert, 4)
  valid = (per_row < 3)[:, None]

  def ref(x, experts):
    w = {n: v[jnp.minimum(per_row, 2)] for n, v in experts.items()}
    h = jax.nn.silu(jnp.einsum("RD,RDF->RF", x, w["w_gate"])) * jnp.einsum("RD,RDF->RF", x, w["w_in"])
    return jnp.where(valid, jnp.einsum("RF,RFD->RD", h, w["w_out"]), 0.0)

  r = jax.random.normal(k[4], (20, 6))
  loss = lambda f: jax.jit(jax.value_and_grad(lambda x, e: jnp.sum(f(x, e) * r), argnums=(0, 1)))(x, experts)
  (l, g), (l_ref, g_ref) = loss(lambda x, e: gmm.block_mlp(x, e, block_expert, jax.nn.silu)), loss(ref)
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@settings(max_examples=4, deadline=None)
@given(E_=st.sampled_from([2, 3, 8]), k=st.integers(1, 3), cf=st.sampled_from([0.5, 1.0, 2.0]),
       T_=st.sampled_from([5, 16]), seed=st.integers(0, 1000))
def test_random_configs_match_reference(E_, k, cf, T_, seed):
  k = min(k, E_)
  x = jax.random.normal(jax.random.key(seed), (2, T_, 8))
  params = make_params(jax.random.key(seed + 1), D=8, F=8, E=E_)
  y, aux = jax.jit(lambda x, p: moe.moe_ffn(x, p, top_k=k, capacity_factor=cf))(x, params)
  y_ref, dropped, _, _ = moe_reference(x, params, top_k=k, capacity_factor=cf)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(aux["dropped_fraction"], dropped, atol=1e-6)


def _bad(**kw):
  x = kw.pop("x", jnp.zeros((B, T, D)))
  params = kw.pop("params", make_params(jax.random.key(0)))
  jax.eval_shape(lambda x, p: moe.moe_ffn(x, p, **kw), x, params)  # trace only, no compilation


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(router="hash"), "router"),
    (dict(activation="tanhh"), "activation"),
    (dict(jitter=1.5), "jitter"),
    (dict(dropless=True, router="experts_choose"), "dropless"),
    (dict(x=jnp.zeros((B, T, D + 1))), "router"),
    (dict(x=jnp.zeros((T, D))), "x_BTD"),
    (dict(params={"router": jnp.zeros((D, E)), "w_in": jnp.zeros((E, D, F))}), "w_out"),
    (dict(params={**make_params(jax.random.key(0)), "w_in": jnp.zeros((E + 1, D, F))}), "w_in"),
    (dict(params={**make_params(jax.random.key(0)), "w_out": jnp.zeros((E, F + 1, D))}), "w_out"),
    (dict(params={**make_params(jax.random.key(0)), "w_gate": jnp.zeros((E, D, 3))}), "w_gate"),
    (dict(params={**make_params(jax.random.key(0)), "bias": jnp.zeros((D,))}), "unknown key"),
    (dict(params={**make_params(jax.random.key(0)), "shared_w_in": jnp.zeros((D, 8))}), "shared"),
])
def test_bad_input_is_one_clear_value_error(kw, match):
  with pytest.raises(ValueError, match=match) as err:
    _bad(**kw)
  assert str(err.value).startswith("moe_ffn:") and str(err.value).count(". ") == 0


def test_linen_module_params_axes_and_aux():
  x = jax.random.normal(jax.random.key(11), (B, T, D))
  layer = MoEFeedForward(num_experts=E, hidden_dim=F, top_k=2, glu=True, shared_hidden_dim=8, jitter=0.01)
  variables = jax.jit(layer.init)(jax.random.key(12), x)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["router"] == jax.sharding.PartitionSpec("embed", "expert")
  assert specs["w_in"] == specs["w_gate"] == jax.sharding.PartitionSpec("expert", "embed", "mlp")
  assert specs["w_out"] == jax.sharding.PartitionSpec("expert", "mlp", "embed")
  assert specs["shared_w_in"] == specs["shared_w_gate"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert specs["shared_w_out"] == jax.sharding.PartitionSpec("mlp", "embed")
  params = nn.unbox(variables)["params"]
  assert params["w_in"].shape == (E, D, F) and params["router"].shape == (D, E)

  @jax.jit
  def apply(variables, x, key):
    y, state = layer.apply(variables, x, mutable=["intermediates"])
    y_train = layer.apply(variables, x, deterministic=False, rngs={"dropout": key})
    return y, moe.collect_aux(state["intermediates"]), y_train

  y, aux, y_train = apply(variables, x, jax.random.key(13))
  y_ref, dropped, _, _ = moe_reference(x, params, top_k=2, act=lambda h: np.asarray(jax.nn.gelu(h)))
  xs = np.asarray(x, np.float64)
  hs = np.asarray(jax.nn.gelu(xs @ params["shared_w_gate"]), np.float64) * (xs @ params["shared_w_in"])
  np.testing.assert_allclose(y, y_ref + hs @ np.asarray(params["shared_w_out"], np.float64), atol=3e-5, rtol=1e-4)
  np.testing.assert_allclose(aux["dropped_fraction"], dropped, atol=1e-6)
  assert aux["expert_fraction"].shape == (E,) and float(aux["load_balancing_loss"]) >= 1.0 - 1e-6
  assert y_train.shape == x.shape and not np.allclose(y_train, y)  # jitter in training only


def test_linen_module_through_nnx_bridge():
  from flax import nnx
  x = jnp.ones((B, 8, D))
  with nnx.use_eager_sharding(False):  # logical names are metadata here, not a placement (no mesh)
    model = nnx.bridge.ToNNX(MoEFeedForward(num_experts=E, hidden_dim=F), rngs=nnx.Rngs(0))
    nnx.jit(nnx.bridge.lazy_init)(model, x)
    y = nnx.jit(lambda m, x: m(x))(model, x)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert set(params) == {"router", "w_in", "w_out"}
  np.testing.assert_allclose(y, moe_reference(x, params)[0], atol=2e-5, rtol=1e-4)


def test_flops_per_token():
  f = moe.flops_per_token(256, 1024, 8, top_k=1, capacity_factor=1.25, tokens_per_group=512)
  assert f["ideal"] == 2 * 256 * 8 + 4 * 256 * 1024
  assert f["executed"] == 2 * 256 * 8 + 1.25 * 4 * 256 * 1024


def test_bench_moe_rows_and_settings():
  from efficient_attn.bench.moe import bench_moe, format_moe_table
  with pytest.raises(ValueError, match="unknown key 'batch_size' for bench moe"):
    bench_moe({"batch_size": 4})
  with pytest.raises(ValueError, match="unknown variant 'top3'"):
    bench_moe({"variants": ["top3"]})
  rows = bench_moe({"batch": 2, "seq_len": 16, "d_model": 8, "hidden_dim": 16, "num_experts": [4],
                    "variants": ["dense", "dropless"], "repeats": 1, "min_time": 0.0, "rounds": 1}, progress=False)
  assert [(r["variant"], r["num_experts"]) for r in rows] == [("dense", None), ("dropless", 4)]
  assert rows[0]["time_vs_dense"] == 1.0 and rows[1]["time_s"] > 0 and rows[1]["temp_bytes"] > 0
  assert rows[1]["flops_per_token"] == 3 * (2 * 8 * 4 + 4 * 8 * 16)
  assert "| dropless | 4 |" in format_moe_table(rows)
