"""Expert parallelism on 8 emulated CPU devices: sharded == single device, all-to-all in the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import moe, platform
from efficient_attn.moe import dispatch, parallel

B, T, D, F, E = 8, 16, 8, 16, 8
CONFIGS = {
    "top1_cf1.0": dict(top_k=1, capacity_factor=1.0),
    "top2_cf1.0": dict(top_k=2, capacity_factor=1.0),
    "experts_choose": dict(router="experts_choose", capacity_factor=1.0),
    "dropless_top2": dict(dropless=True, top_k=2),
}
MESHES = {"data2_expert4": ((2, 4), ("data", "expert")), "data1_expert8": ((1, 8), ("data", "expert")),
          "data2_expert2_tensor2": ((2, 2, 2), ("data", "expert", "tensor"))}


def make_mesh(name):
  shape, names = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@pytest.fixture(scope="module")
def data():
  k = jax.random.split(jax.random.key(0), 6)
  params = {"router": jax.random.normal(k[0], (D, E)), "w_in": jax.random.normal(k[1], (E, D, F)) * D ** -0.5,
            "w_out": jax.random.normal(k[2], (E, F, D)) * F ** -0.5, "w_gate": jax.random.normal(k[3], (E, D, F))}
  return jax.random.normal(k[4], (B, T, D)), params, jax.random.normal(k[5], (B, T, D))


def _loss_fn(opts, r, mesh=None):
  def loss(params, x):
    y, aux = moe.moe_ffn(x, params, mesh=mesh, **opts)
    return jnp.sum(y * r) + aux["load_balancing_loss"] + aux["router_z_loss"], (y, aux)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


_single = {}


def single_device(name, data):
  if name not in _single:
    x, params, r = data
    _single[name] = jax.jit(_loss_fn(CONFIGS[name], r))(params, x)
  return _single[name]


def assert_trees_close(a, b, atol=2e-5, rtol=1e-4):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, atol=atol, rtol=rtol)


@pytest.mark.parametrize("mesh_name, name", [(m, c) for m in ("data2_expert4", "data1_expert8") for c in CONFIGS]
                         + [("data2_expert2_tensor2", "top2_cf1.0"), ("data2_expert2_tensor2", "dropless_top2")])
def test_sharded_equals_single_device(data, mesh_name, name):
  x, params, r = data
  mesh = make_mesh(mesh_name)
  compiled = jax.jit(_loss_fn(CONFIGS[name], r, mesh)).lower(params, x).compile()
  assert "all-to-all" in compiled.as_text()
  if mesh.shape.get("tensor", 1) > 1:
    assert "all-reduce" in compiled.as_text()  # the expert hidden dim is split over "tensor"
  (loss, (y, aux)), grads = compiled(params, x)
  (loss_1, (y_1, aux_1)), grads_1 = single_device(name, data)
  np.testing.assert_allclose(y, y_1, atol=2e-5, rtol=1e-4)
  assert_trees_close(aux, aux_1)
  assert_trees_close(grads, grads_1)


@pytest.mark.parametrize("mesh_name", ["data2_expert4", "data1_expert8"])
def test_ragged_all_to_all_path(data, mesh_name):
  """The GPU/TPU dropless path, run on CPU with the all_gather emulation of ragged_all_to_all."""
  x, params, r = data
  mesh = make_mesh(mesh_name)
  expert, gate = moe.tokens_choose(jax.nn.softmax(x @ params["router"]), 2)
  experts = {k: params[k] for k in ("w_in", "w_out", "w_gate")}

  def loss(experts, x, sharded):
    if sharded:
      y = parallel.sharded_dropless_experts(x, expert, gate, experts, jax.nn.gelu, mesh, impl="ragged",
                                            ragged_all_to_all=parallel.reference_ragged_all_to_all)
    else:
      y = dispatch.dropless_experts(x, expert, gate, experts, jax.nn.gelu, impl="blocked")
    return jnp.sum(y * r)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  assert_trees_close(grad(experts, x, True), grad(experts, x, False))


def test_ragged_path_lowers_with_the_real_primitive(data):
  """With jax.lax.ragged_all_to_all itself the GPU/TPU path traces and lowers (fwd + grad);
  only XLA:CPU's compiler lacks the op."""
  x, params, _ = data
  expert, gate = moe.tokens_choose(jax.nn.softmax(x @ params["router"]), 2)
  experts = {k: params[k] for k in ("w_in", "w_out")}
  loss = lambda experts, x: jnp.sum(parallel.sharded_dropless_experts(
      x, expert, gate, experts, jax.nn.gelu, make_mesh("data2_expert4"), impl="ragged"))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(experts, x).as_text()
  assert "ragged_all_to_all" in text


def test_reference_ragged_all_to_all_matches_documented_example():
  mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  args = [jnp.array(a, jnp.int32) for a in (
      [[1, 2, 2], [3, 4, 0]],  # operand
      [[0, 0, 0, 0], [0, 0, 0, 0]],  # output
      [[0, 1], [0, 1]],  # input_offsets
      [[1, 2], [1, 1]],  # send_sizes
      [[0, 0], [1, 2]],  # output_offsets
      [[1, 1], [2, 1]])]  # recv_sizes
  f = jax.shard_map(lambda *a: parallel.reference_ragged_all_to_all(*(v[0] for v in a), axis_name="x")[None],
                    mesh=mesh, in_specs=(jax.P("x"),) * 6, out_specs=jax.P("x"))
  np.testing.assert_array_equal(f(*args), [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.all_platforms
def test_platform_selection_never_runs_ragged_on_cpu():
  """Default impl on a CPU lowering: no ragged collective or ragged_dot; an export for TPU / CUDA picks them."""
  assert platform.platform_of(make_mesh("data1_expert8")) == platform.platform_of() == "cpu"
  assert platform.is_accelerator("tpu") and not platform.is_accelerator(make_mesh("data1_expert8"))
  mesh = make_mesh("data1_expert8")
  x = jnp.ones((8, 4, 8), jnp.float32)
  expert = jnp.asarray(np.arange(64).reshape(8, 4, 2) % 8, jnp.int32)
  gate = jnp.full((8, 4, 2), 0.5, jnp.float32)
  w = {"w_in": jnp.ones((8, 8, 16)), "w_out": jnp.ones((8, 16, 8))}
  f = jax.jit(lambda x: parallel.sharded_dropless_experts(x, expert, gate, w, jax.nn.gelu, mesh))
  g = jax.jit(lambda x: dispatch.dropless_experts(x, expert, gate, w, jax.nn.gelu))
  for fn in (f, g):
    text = fn.lower(x).as_text()
    assert "ragged" not in text
  for plat in ("tpu", "cuda"):
    text = jax.export.export(g, platforms=[plat])(x).mlir_module()
    assert "ragged_dot" in text, plat


def test_batch_axes():
  mesh = make_mesh("data2_expert4")
  assert parallel.batch_axes(mesh, 8, "expert") == ("data", "expert")
  assert parallel.batch_axes(mesh, 4, "expert") == ("expert",)  # B too small for data too: replicated over it
  assert parallel.tensor_axes(make_mesh("data2_expert2_tensor2"), 16, "expert") == ("tensor",)
  assert parallel.tensor_axes(make_mesh("data2_expert2_tensor2"), 15, "expert") == ()  # F whole


@pytest.mark.parametrize("mesh_name, E_, B_, axis, match", [
    ("data1_expert8", 4, B, "expert", "num_experts=4 is not divisible"),
    ("data2_expert4", E, 2, "expert", "batch size B=2"),
    ("data2_expert4", E, B, "experts", "expert_axis"),
])
def test_bad_mesh_is_one_clear_value_error(data, mesh_name, E_, B_, axis, match):
  _, params, _ = data
  params = {k: v[..., :E_] if k == "router" else v[:E_] for k, v in params.items()}
  x = jnp.zeros((B_, T, D))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x, p: moe.moe_ffn(x, p, mesh=make_mesh(mesh_name), expert_axis=axis), x, params)
