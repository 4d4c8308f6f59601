"""Context parallelism for Performer: a sequence split over a `context` mesh axis gives one device's
outputs and gradients, and moves the same bytes at any length.

Each case runs `performer_attention` inside `jax.shard_map` over P of the 8 emulated devices (the
sequence laid out by `context.to_layout`) and compares with the same call on the whole sequence:
forward and dq / dk / dv, float32, max |difference| within 1e-5 of the largest entry. Key norms vary
token to token, so the causal running key max grows inside and across shards.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import test_context
from efficient_attn.attention import performer_attention, performer_projection
from test_context import _assert_close, _mesh, _segments, _value_and_grads, collective_sizes, split

B, T, N, K, H, Hv = 2, 64, 4, 2, 8, 4
W = performer_projection(jax.random.key(0), 16, H)  # M = 16
CUTS = (0, 13, 30, 47)  # documents cross shard boundaries at every P (row 1 shifted by 5)


def _inputs(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H)) * jax.random.uniform(ks[2], (B, T, 1, 1), minval=0.3, maxval=2.5)
  v = jax.random.normal(ks[3], (B, T, K, Hv))
  ct = jax.random.normal(ks[4], (B, T, N, Hv))
  return (q, k, v), ct


# (shards, layout, kernel, causal, segments, key-padding mask)
CASES = [
    (2, "contiguous", "softmax", True, True, False),
    (4, "zigzag", "softmax", True, True, True),
    (8, "zigzag", "softmax", True, False, False),
    (8, "contiguous", "softmax", True, True, True),
    (4, "contiguous", "softmax", False, True, False),
    (2, "zigzag", "softmax", False, False, True),
    (8, "zigzag", "relu", True, True, True),
    (4, "zigzag", "relu", False, False, False),
]


@pytest.mark.parametrize("shards, layout, kernel, causal, segments, padded", CASES)
def test_performer_split_equals_one_device(shards, layout, kernel, causal, segments, padded):
  (q, k, v), ct = _inputs(seed=shards)
  keep = jnp.broadcast_to(jnp.arange(T)[None, :] % 7 != 3, (B, T))  # every 7th key padded ...
  k = jnp.where(keep[..., None, None], k, 40.0) if padded else k     # ... and huge: it must not move the max
  arrays = (q, k, v) + ((keep,) if padded else ()) + ((_segments(CUTS),) if segments else ())

  def fn(q, k, v, *rest, **kw):
    keep, seg = (rest[0] if padded else None), (rest[-1] if segments else None)
    return performer_attention(q, k, v, mask=None if keep is None else keep[:, None, None, :], segment_ids=seg,
                               is_causal=causal, projection=W, kernel=kernel, chunk_size=4, **kw)

  want_out, want_grads = _value_and_grads(fn, arrays, ct)
  got_out, got_grads = _value_and_grads(split(fn, shards, layout), arrays, ct)
  _assert_close(got_out, want_out, f"performer {kernel} output")
  for name, got, want in zip(("dq", "dk", "dv"), got_grads, want_grads):
    _assert_close(got, want, f"performer {kernel} {name}")


def test_context_errors_name_the_function():
  (q, k, v), _ = _inputs()

  def run(layout, length):
    def fn(q, k, v):
      return performer_attention(q, k, v, is_causal=True, projection=W, context_axis="context", context_layout=layout)

    return jax.shard_map(fn, mesh=_mesh(2), in_specs=P(None, "context"), out_specs=P(None, "context"))(
        q[:, :length], k[:, :length], v[:, :length])

  with pytest.raises(ValueError, match="performer_attention: `context_layout`='ring' is not one of"):
    run("ring", T)
  with pytest.raises(ValueError, match="performer_attention: the zigzag layout holds two equal pieces"):
    run("zigzag", 14)
  with pytest.raises(ValueError, match="performer_attention: context parallelism .* needs T == S, got T=64, S=32"):
    performer_attention(q, k[:, :32], v[:, :32], projection=W, context_axis="context")


def _collective_bytes(T_total: int, causal: bool) -> dict[str, list[int]]:
  """Performer's collectives at T_total tokens over 8 devices (zigzag)."""
  family = lambda q, k, v, **c: performer_attention(q, k, v, is_causal=causal, projection=W, chunk_size=16,  # noqa: E731
                                                    **c)
  return collective_sizes(family, [(B, T_total, N, H), (B, T_total, K, H), (B, T_total, K, Hv)])


def test_causal_softmax_moves_the_same_bytes_at_any_length():
  """Causal: an all_gather of each piece's running key max [B, K], then one of its state Σφ(k)[v, 1]ᵀ
  [B, K, M, Hv + 1] (+ its transition [B, K]); backward, the state gather's transpose. Nothing grows with T."""
  short, long = _collective_bytes(256, True), _collective_bytes(1024, True)
  M, pieces = W.shape[0], 2  # zigzag: 2 pieces per shard
  maxima = 4 * B * pieces * K
  state = 4 * B * pieces * (K + K * M * (Hv + 1))
  assert short == long == {"all-gather": sorted([8 * maxima, 8 * state]), "reduce-scatter": [state]}, (short, long)


def test_bidirectional_softmax_moves_the_same_bytes_at_any_length():
  """Non-causal: a pmax of the key maxima [B, K], then the linear core's state passing (both directions)."""
  short, long = _collective_bytes(256, False), _collective_bytes(1024, False)
  M, pieces = W.shape[0], 2
  state = 4 * B * pieces * (K + K * M * (Hv + 1))  # one state gather per direction
  assert short == long == {"all-reduce": [4 * B * K], "all-gather": [8 * state] * 2, "reduce-scatter": [state] * 2}, (
      short, long)


def teardown_module():
  errors = {k: v for k, v in test_context.ERRORS.items() if k.startswith("performer")}
  if errors:
    print("\nperformer context parallelism, max |sharded - one device|:",
          {k: f"{v:.1e}" for k, v in sorted(errors.items())})


def test_attend_splits_performer_over_a_context_mesh():
  """The family's context hook: `attend` under a (data 2, context 4) mesh runs it split, with the projection
  whole on every device, and equals the one-device call."""
  from jax.sharding import AxisType

  from efficient_attn.attention import attend, context, get

  get("performer").validate_context({"num_features": 16}, (T, T, N, K, H, True), 4, "zigzag")
  with pytest.raises(ValueError, match="T=60 is not a multiple of 8"):
    get("performer").validate_context({"num_features": 16}, (60, 60, N, K, H, True), 4, "zigzag")
  (q, k, v), _ = _inputs(seed=5)
  seg = _segments(CUTS)
  kw = dict(is_causal=True, projection=W, chunk_size=4)
  want = attend("performer", q, k, v, segment_ids=seg, **kw)
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(AxisType.Explicit,) * 2)
  on_mesh = NamedSharding(mesh, P("data", "context"))  # as the trainer places a laid-out batch
  lay = lambda x: jax.device_put(context.to_layout(x, 4, "zigzag"), on_mesh)  # noqa: E731
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v, seg: attend("performer", q, k, v, segment_ids=seg, **kw))(
        lay(q), lay(k), lay(v), lay(seg))
  _assert_close(context.from_layout(np.asarray(got), 4, "zigzag"), want, "performer attend output")
