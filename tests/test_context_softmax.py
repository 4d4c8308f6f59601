"""Context parallelism for exact softmax attention: the ring and the all_gather strategy equal one device.

Each case runs `softmax_attention` inside `jax.shard_map` over P of the 8 emulated devices (the sequence laid
out contiguous or zigzag) and compares with the same call on the whole sequence, forward and the gradients of
q, k, v, float32, max |difference| within 1e-5 of the largest entry (as test_context.py).
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from test_context import _assert_close, _mesh, _segments, _value_and_grads, split

from efficient_attn.attention import FAMILIES, softmax_attention
from efficient_attn.attention.softmax import SoftmaxOptions

B, T, N, K, H = 2, 64, 4, 2, 8
CUTS = (0, 13, 30, 47)  # document starts (+5 in row 1): boundaries inside and between shards


def _inputs():
  ks = jax.random.split(jax.random.PRNGKey(7), 4)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H))
  v = jax.random.normal(ks[2], (B, T, K, H))
  return (q, k, v), jax.random.normal(ks[3], (B, T, N, H))


def _attention(causal, **options):
  def fn(q, k, v, seg=None, **kw):
    return softmax_attention(q, k, v, is_causal=causal, segment_ids=seg, **options, **kw)
  return fn


@functools.cache
def _one_device(causal: bool, cuts):
  arrays, ct = _inputs()
  arrays = arrays + (() if cuts is None else (_segments(cuts),))
  return arrays, ct, _value_and_grads(_attention(causal), arrays, ct)


# (shards, layout, causal, segment starts, options): every shard count, both layouts, directions and strategies;
# one ring case with several chunked tiles per step (16-token pieces, 8 x 4 tiles).
CASES = [
    (2, "zigzag", True, CUTS, {"implementation": "chunked", "chunk_size": (8, 4)}),
    (2, "contiguous", False, CUTS, {"context_strategy": "all_gather"}),
    (4, "zigzag", True, CUTS, {}),
    (4, "contiguous", True, None, {}),
    (4, "zigzag", False, CUTS, {}),
    (8, "zigzag", True, CUTS, {"context_strategy": "all_gather"}),
    (8, "contiguous", False, CUTS, {}),
    (8, "zigzag", True, None, {}),
]


@pytest.mark.parametrize("shards, layout, causal, cuts, options", CASES)
def test_split_softmax_equals_one_device(shards, layout, causal, cuts, options):
  arrays, ct, (want_out, want_grads) = _one_device(causal, cuts)
  got_out, got_grads = _value_and_grads(split(_attention(causal, **options), shards, layout), arrays, ct)
  _assert_close(got_out, want_out, "output")
  for name, got, want in zip(("dq", "dk", "dv"), got_grads, want_grads, strict=True):
    _assert_close(got, want, name)


def _collectives(strategy: str) -> set[str]:
  """The collectives in the compiled forward + backward of a causal 4-way zigzag split."""
  mesh = _mesh(4)
  on_shards = NamedSharding(mesh, P(None, "context"))
  args = [jax.ShapeDtypeStruct((B, T, n, H), jnp.float32, sharding=on_shards) for n in (N, K, K)]
  inner = functools.partial(softmax_attention, is_causal=True, context_axis="context", context_strategy=strategy)
  fn = jax.shard_map(inner, mesh=mesh, in_specs=P(None, "context"), out_specs=P(None, "context"))
  step = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2)), out_shardings=on_shards)
  text = step.lower(*args).compile().as_text()
  return set(re.findall(r" (all-gather|collective-permute|reduce-scatter|all-reduce|all-to-all)(?:-start)?\(", text))


def test_ring_permutes_and_all_gather_gathers():
  ring = _collectives("ring")
  assert "collective-permute" in ring and "all-gather" not in ring, ring
  assert "all-gather" in _collectives("all_gather")


def test_bad_context_calls_are_one_sentence():
  (q, k, v), _ = _inputs()
  call = functools.partial(softmax_attention, q, k, v, context_axis="context")
  with pytest.raises(ValueError, match=r"softmax_attention: `context_strategy`='ringg' is not one of"):
    call(context_strategy="ringg")
  with pytest.raises(ValueError, match=r"softmax_attention: context parallelism \(context_axis='context'\) does not"
                     r" take bias, local_window_size; use segment_ids"):
    call(bias=jnp.zeros((1, 1, T, T)), local_window_size=4)
  with pytest.raises(ValueError, match=r"does not take mask \(or sequence lengths\)"):
    call(key_value_seq_lengths=jnp.full((B,), T))
  with pytest.raises(ValueError, match=r"is self-attention, query and key/value the same local length; got T=64,"
                     r" S=32"):
    softmax_attention(q, k[:, :32], v[:, :32], context_axis="context")
  with pytest.raises(ValueError, match=r"implementation='splash' cannot run under context parallelism"):
    call(implementation="splash")
  with pytest.raises(ValueError, match=r"softmax_attention: the zigzag layout .* local length T=63 is odd"):
    softmax_attention(q[:, :63], k[:, :63], v[:, :63], context_axis="context")
  with pytest.raises(ValueError, match=r"softmax_attention: `context_layout`='ring' is not one of"):
    call(context_layout="ring")
  with pytest.raises(ValueError, match=r"context_strategy='ppermute' is not one of \['ring', 'all_gather'\]"):
    SoftmaxOptions(context_strategy="ppermute")
  assert FAMILIES["softmax"].make_options({"context_strategy": "all_gather"}).context_strategy == "all_gather"


def teardown_module():
  from test_context import ERRORS
  if ERRORS:
    errors = {k: f"{v:.1e}" for k, v in sorted(ERRORS.items())}
    print("\nsoftmax context parallelism, max |sharded - one device|:", errors)
