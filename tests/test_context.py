"""Context parallelism: a sequence split over a `context` mesh axis gives one device's outputs and gradients.

Each case runs the family inside `jax.shard_map` over P of the 8 emulated devices (the sequence laid
out contiguous or zigzag by `context.to_layout`) and compares with the same call on the whole sequence:
forward and the gradients of every input, float32, max |difference| within 1e-5 of the largest entry.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from efficient_attn.attention import context, delta_rule_attention, gated_linear_attention, linear_attention
from efficient_attn.attention.deltanet import deltanet_attention
from efficient_attn.attention.gated_deltanet import gated_deltanet_attention
from efficient_attn.attention.gla import gla_attention
from efficient_attn.attention.mamba2 import mamba2_attention
from efficient_attn.attention.retnet import retnet_attention

B, T, N, K, H, Hv = 2, 64, 4, 2, 8, 4


def _mesh(shards: int):
  return jax.make_mesh((shards,), ("context",), axis_types=(AxisType.Auto,), devices=jax.devices()[:shards])


def split(fn, shards: int, layout: str):
  """fn(*arrays [B, T, ...], **kw) on `shards` devices, each holding T / shards tokens in `layout`."""

  def run(*arrays, **kw):
    inner = jax.shard_map(lambda *a: fn(*a, context_axis="context", context_layout=layout, **kw),
                          mesh=_mesh(shards), in_specs=P(None, "context"), out_specs=P(None, "context"))
    out = inner(*(context.to_layout(x, shards, layout) for x in arrays))
    return context.from_layout(out, shards, layout)

  return run


def _segments(cuts):
  """int [B, T]: documents starting at `cuts` (row 1 shifted by 5, so boundaries fall inside shards too)."""
  rows = [np.searchsorted(np.asarray(cuts) + shift, np.arange(T), side="right") for shift in (0, 5)]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(per_channel: bool, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H)) / 2
  v = jax.random.normal(ks[2], (B, T, K, Hv))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, K, H) if per_channel else (B, T, K)))
  ct = jax.random.normal(ks[4], (B, T, N, Hv))
  return (q, k, v, g), ct


def _value_and_grads(fn, arrays, ct, **kw):
  def loss(*a):
    out = fn(*a, **kw)
    return jnp.sum(out * ct), out
  floats = tuple(i for i, x in enumerate(arrays) if jnp.issubdtype(x.dtype, jnp.floating))  # not segment ids
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=floats, has_aux=True))(*arrays)
  return out, grads


ERRORS: dict[str, float] = {}  # the largest |difference| of each case (printed by `pytest -s`)


def _assert_close(got, want, what):
  scale = float(np.max(np.abs(want)))
  err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  ERRORS[what] = max(err, ERRORS.get(what, 0.0))
  assert err <= 1e-5 * max(scale, 1.0), f"{what}: max |diff| {err:.2e} (largest entry {scale:.2e})"


def _check_split(fn, arrays, ct, shards: int, layout: str, grad_names):
  """fn split over `shards` devices in `layout` gives one device's output and gradients (named grad_names)."""
  want_out, want_grads = _value_and_grads(fn, arrays, ct)
  got_out, got_grads = _value_and_grads(split(fn, shards, layout), arrays, ct)
  _assert_close(got_out, want_out, "output")
  for name, got, want in zip(grad_names, got_grads, want_grads, strict=True):
    _assert_close(got, want, name)


# (shards, layout, per-channel decays, causal, segment starts): every shard count and layout, both decay
# kinds and directions, documents that cross shard boundaries (starts at 0, 13, 30, 47, and +5 in row 1).
CASES = [
    (2, "contiguous", False, True, (0, 13, 30, 47)),
    (2, "zigzag", True, True, None),
    (4, "zigzag", False, True, (0, 13, 30, 47)),
    (4, "contiguous", True, False, (0, 13, 30, 47)),
    (8, "zigzag", True, True, (0, 13, 30, 47)),
    (8, "contiguous", False, False, None),
]


@pytest.mark.parametrize("shards, layout, per_channel, causal, cuts", CASES)
def test_gated_state_passing_equals_one_device(shards, layout, per_channel, causal, cuts):
  arrays, ct = _inputs(per_channel)
  if cuts is not None:
    arrays = arrays + (_segments(cuts),)

  def fn(q, k, v, g, seg=None, **kw):
    return gated_linear_attention(q, k, v, g, segment_ids=seg, is_causal=causal, chunk_size=4, **kw)

  _check_split(fn, arrays, ct, shards, layout, ("dq", "dk", "dv", "dg"))


# (shards, layout, gated, causal, segment starts) for the delta rule: a matrix transition per piece.
DELTA_CASES = [
    (2, "zigzag", True, True, (0, 13, 30, 47)),
    (4, "contiguous", False, True, (0, 13, 30, 47)),
    (8, "zigzag", True, False, (0, 13, 30, 47)),
    (8, "contiguous", True, True, None),
]


@pytest.mark.parametrize("shards, layout, gated, causal, cuts", DELTA_CASES)
def test_delta_rule_state_passing_equals_one_device(shards, layout, gated, causal, cuts):
  (q, k, v, g), ct = _inputs(False, seed=2)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # a contraction, as the layers make it
  beta = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(3), (B, T, K)))
  arrays = (q, k, v, beta, g) + (() if cuts is None else (_segments(cuts),))

  def fn(q, k, v, beta, g, seg=None, **kw):
    return delta_rule_attention(q, k, v, beta, log_decay=g if gated else None, segment_ids=seg, is_causal=causal,
                                chunk_size=4, **kw)

  _check_split(fn, arrays, ct, shards, layout, ("dq", "dk", "dv", "dbeta", "dg"))


@pytest.mark.parametrize("shards, layout, causal, cuts", [(4, "zigzag", True, (0, 13, 30, 47)),
                                                           (2, "contiguous", False, (0, 13, 30, 47)),
                                                           (8, "zigzag", False, None)])
def test_linear_attention_state_passing_equals_one_device(shards, layout, causal, cuts):
  """Linear attention (elu + 1 features, a key-padding mask, GQA): numerator and denominator pass their states."""
  (q, k, v, _), ct = _inputs(False, seed=4)
  keep = jnp.arange(T)[None, :] % 7 != 3  # every 7th key padded
  arrays = (q, k, v, jnp.broadcast_to(keep, (B, T))) + (() if cuts is None else (_segments(cuts),))

  def fn(q, k, v, keep, seg=None, **kw):
    return linear_attention(q, k, v, mask=keep[:, None, None, :], segment_ids=seg, is_causal=causal, chunk_size=4,
                            **kw)

  _check_split(fn, arrays, ct, shards, layout, ("dq", "dk", "dv"))


@pytest.mark.parametrize("family", [retnet_attention, gla_attention, mamba2_attention, deltanet_attention,
                                    gated_deltanet_attention])
def test_families_take_the_context_axis(family):
  (q, k, v, g), _ = _inputs(family is gla_attention, seed=1)
  arrays = (q, k, v) if family in (retnet_attention, deltanet_attention) else (q, k, v, g)

  def fn(q, k, v, *g, **c):
    return family(q, k, v, is_causal=True, chunk_size=4, **({"log_decay": g[0]} if g else {}), **c)

  _assert_close(jax.jit(split(fn, 4, "zigzag"))(*arrays), fn(*arrays), family.__name__)


def test_layouts_round_trip_and_zigzag_pieces():
  x = jnp.arange(16)[None, :, None]
  z = context.to_layout(x, 4, "zigzag")
  # shard r holds pieces r and 7 - r of 8 (2 tokens each)
  assert z[0, :, 0].tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
  np.testing.assert_array_equal(context.from_layout(z, 4, "zigzag"), x)
  np.testing.assert_array_equal(context.to_layout(x, 4, "contiguous"), x)
  with pytest.raises(ValueError, match="T=15 is not a multiple of 8"):
    context.to_layout(jnp.zeros((1, 15)), 4, "zigzag")
  with pytest.raises(ValueError, match="f: the zigzag layout holds two equal pieces per shard; the local length T=7"):
    context.local_pieces("zigzag", 7, "f")
  with pytest.raises(ValueError, match="'ring' is not one of"):
    context.to_layout(x, 4, "ring")


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


def collective_sizes(family, shapes, shards: int = 8) -> dict[str, list[int]]:
  """{collective: sorted result bytes} of the compiled fwd+bwd of `family(*arrays, context_axis="context")` with
  float32 arrays of `shapes` ([B, T, ...] each) already laid out and split over `shards` devices (zigzag):
  only what the family itself moves."""
  import re

  from jax.sharding import NamedSharding

  mesh = _mesh(shards)
  on_shards = NamedSharding(mesh, P(None, "context"))
  args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=on_shards) for s in shapes]
  fn = jax.shard_map(lambda *a: family(*a, context_axis="context"), mesh=mesh, in_specs=P(None, "context"),
                     out_specs=P(None, "context"))
  step = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))), out_shardings=on_shards)
  found: dict[str, list[int]] = {}
  for line in step.lower(*args).compile().as_text().splitlines():
    op = next((c for c in COLLECTIVES if f" {c}(" in line or f" {c}-start(" in line), None)
    if op:
      dims = re.search(r"= \(?(?:f32|s32|u32|pred)\[([\d,]*)\]", line).group(1)
      found.setdefault(op, []).append(4 * int(np.prod([int(d) for d in dims.split(",") if d])))
  return {op: sorted(sizes) for op, sizes in found.items()}


def _collective_bytes(T_total: int, delta: bool) -> dict[str, list[int]]:
  """The gated (or delta-rule) core's collectives at T_total tokens over 8 devices."""
  if delta:  # g doubles as β (only shapes matter here)
    family = lambda q, k, v, g, **c: delta_rule_attention(q, k, v, g, chunk_size=16, **c)  # noqa: E731
  else:
    family = lambda q, k, v, g, **c: gated_linear_attention(q, k, v, g, chunk_size=16, **c)  # noqa: E731
  return collective_sizes(family, [(B, T_total, N, H), (B, T_total, K, H), (B, T_total, K, Hv), (B, T_total, K)])


@pytest.mark.parametrize("delta", [False, True], ids=["gated", "delta"])
def test_state_passing_moves_the_same_bytes_at_any_length(delta):
  """One all_gather of the per-piece summaries forward (its transpose backward): the same bytes at 4096 and
  32768 tokens, and no collective of the sequence itself."""
  short, long = _collective_bytes(4096, delta), _collective_bytes(32768, delta)
  # Per shard, 2 zigzag pieces x (transition: K scalar decays or K H x H matrices, + K end states), float32.
  summary = 4 * B * 2 * (K * (H * H if delta else 1) + K * H * Hv)
  assert short == long == {"all-gather": [8 * summary], "reduce-scatter": [summary]}, (short, long)


def teardown_module():
  if ERRORS:
    print("\ncontext parallelism, max |sharded - one device|:", {k: f"{v:.1e}" for k, v in sorted(ERRORS.items())})
