"""Routers are records: each returns `Slots` or `Pairs`, and `moe_ffn` runs the experts by the record's type."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import moe
from efficient_attn.moe import gmm, router as routing

B, T, D, F, E = 2, 16, 8, 12, 4


@pytest.fixture(scope="module")
def data():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"router": jax.random.normal(k[0], (D, E)), "w_in": jax.random.normal(k[1], (E, D, F)) * D ** -0.5,
            "w_out": jax.random.normal(k[2], (E, F, D)) * F ** -0.5}
  return jax.random.normal(k[3], (B, T, D)), params


@pytest.mark.parametrize("key, record", [(("tokens_choose", False), routing.Slots),
                                         (("tokens_choose", True), routing.Pairs),
                                         (("experts_choose", False), routing.Slots)])
def test_each_router_returns_its_record(data, key, record):
  x, params = data
  probs = jax.nn.softmax(x @ params["router"])
  routed = routing.ROUTES[key](probs, top_k=2, capacity_factor=1.0)
  assert type(routed) is record
  assert routed.expert_GSk.shape == (B, T, 2) and routed.dropped_fraction.shape == ()
  if record is routing.Slots:
    C = moe.expert_capacity(T, E, 2, 1.0)
    assert routed.token_GEC.shape == routed.gate_GEC.shape == (B, E, C)
  assert moe.ROUTERS == ("tokens_choose", "experts_choose")


def route_hash(probs_GSE, *, top_k, capacity_factor):
  """Hash routing (Roller et al. 2021): token t of each group goes to expert t mod E, weight 1."""
  del top_k, capacity_factor
  G, S, E_ = probs_GSE.shape
  expert_GSk = jnp.broadcast_to((jnp.arange(S, dtype=jnp.int32) % E_)[None, :, None], (G, S, 1))
  return routing.Pairs(expert_GSk, jnp.ones((G, S, 1), jnp.float32), jnp.zeros((), jnp.float32))


def test_a_registered_router_runs_by_its_record_alone(data, monkeypatch):
  """One function + one line in ROUTES: moe_ffn never names a router."""
  x, params = data
  monkeypatch.setitem(routing.ROUTES, ("hash", True), route_hash)
  y, aux = jax.jit(lambda x, p: moe.moe_ffn(x, p, router="hash", dropless=True))(x, params)
  experts = {k: params[k] for k in ("w_in", "w_out")}
  y_ref = jnp.stack([gmm.expert_mlp(x[:, t], {k: w[t % E] for k, w in experts.items()}, jax.nn.gelu)
                     for t in range(T)], axis=1)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(aux["expert_fraction"], np.full(E, 1 / E))
  with pytest.raises(ValueError, match="dropless"):  # registered dropless only
    moe.moe_ffn(x, params, router="hash")


def test_expert_mlp_is_one_function_for_every_matmul(data):
  """Batched per expert, one expert's rows and ragged runs of rows give the same MLP."""
  x, params = data
  experts = {k: params[k] for k in ("w_in", "w_out")} | {"w_gate": params["w_in"] * 0.5}
  rows = x.reshape(E, -1, D)  # [E, C, D]: C rows per expert
  batched = gmm.expert_mlp(rows, experts, jax.nn.silu)
  one = jnp.stack([gmm.expert_mlp(rows[e], {k: w[e] for k, w in experts.items()}, jax.nn.silu) for e in range(E)])
  sizes = jnp.full((E,), rows.shape[1], jnp.int32)
  ragged = gmm.expert_mlp(rows.reshape(-1, D), experts, jax.nn.silu, gmm.ragged_matmul(sizes)).reshape(rows.shape)
  np.testing.assert_allclose(batched, one, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(ragged, one, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_aux_is_one_mean_over_moe_layers_looped_or_scanned(scan):
  """nn.scan stacks each layer's aux along a leading axis; collect_aux still returns scalars and [E]."""
  from efficient_attn.config import ModelConfig
  from efficient_attn.model import TransformerLM

  cfg = ModelConfig(num_layers=2, d_model=16, num_heads=2, ffn_dim=32, num_experts=E, scan_layers=scan)
  model, tokens = TransformerLM(cfg), jnp.zeros((2, 8), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  _, state = jax.jit(lambda v, t: model.apply(v, t, mutable=["intermediates"]))(variables, tokens)
  aux = moe.collect_aux(state["intermediates"])
  assert aux["expert_fraction"].shape == (E,) and aux["load_balancing_loss"].shape == ()
  np.testing.assert_allclose(jnp.sum(aux["expert_fraction"]), 1.0, rtol=1e-6)
