"""Causality of every causal family: an output never depends on a later key or value.

Changing only the keys / values at positions > t (including one key whose features dwarf
every other, ~30 nats above them for the Performer) must leave outputs 0..t unchanged —
to float32 rounding, and in practice bit for bit — for every registered family that runs
causally, and token-by-token decoding must still equal the parallel forward. The causal
Performer used to fail this: one stabiliser over all positions let a large future key
turn earlier outputs into uniform averages through the feature floor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn import attention as A
from reference import decode_sequence

B, T, N, K, H = 2, 32, 4, 2, 8
CUT = 19  # positions <= CUT keep their keys / values; later ones change


def _family_kwargs(kind):
  family = A.get(kind)
  options = {"local": {"window": 8}, "sparse": {"block_size": 8, "pattern": "local", "window": 2},
             "linear": {"chunk_size": 8}, "performer": {"num_features": 16, "chunk_size": 8},
             "softmax": {"implementation": "chunked", "chunk_size": 8}}.get(kind, {})
  options = family.make_options(options)
  shape = A.Shape(T, T, N, K, H, True)
  kw = family.call_kwargs(options, shape)
  if family.buffers is not None:
    kw.update(family.buffers(jax.random.PRNGKey(3), options, shape))
  return family, kw


def _inputs(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H))
  v = jax.random.normal(ks[2], (B, T, K, H))
  # Future keys / values changed, one future key made huge: it is the largest feature by far.
  k2 = k.at[:, CUT + 1:].set(jax.random.normal(ks[3], (B, T - CUT - 1, K, H)))
  k2 = k2.at[:, T - 1].set(12.0 * jnp.ones((B, K, H)))
  v2 = v.at[:, CUT + 1:].set(jax.random.normal(ks[4], (B, T - CUT - 1, K, H)) * 100.0)
  return q, k, v, k2, v2


CAUSAL = sorted(A.names())
EXTRA = [("softmax", {"implementation": "xla"}), ("linear", {"feature_map": "relu", "chunk_size": 8}),
         ("performer", {"num_features": 16, "chunk_size": 4, "kernel": "relu"})]


@pytest.mark.parametrize("kind,options", [(k, None) for k in CAUSAL] + EXTRA)
def test_future_keys_do_not_change_earlier_outputs(kind, options):
  family, kw = _family_kwargs(kind)
  if options is not None:
    kw = {**kw, **family.call_kwargs(family.make_options(options), A.Shape(T, T, N, K, H, True))}
  q, k, v, k2, v2 = _inputs()
  f = jax.jit(lambda q, k, v: family.fn(q, k, v, is_causal=True, **kw))
  before, after = f(q, k, v), f(q, k2, v2)
  assert bool(jnp.all(jnp.isfinite(after)))
  np.testing.assert_allclose(after[:, :CUT + 1], before[:, :CUT + 1], rtol=1e-6, atol=1e-7)
  # The change is real: the last outputs do move.
  assert float(jnp.max(jnp.abs(after[:, -1] - before[:, -1]))) > 1e-3


@pytest.mark.parametrize("kind", ["softmax", "performer", "linear"])
def test_causal_gradients_ignore_future_keys(kind):
  """d(output t)/d(key s) = 0 for s > t: no gradient flows from the future (stabilisers included)."""
  family, kw = _family_kwargs(kind)
  q, k, v, k2, _ = _inputs(1)
  g = jax.jit(jax.grad(lambda k: jnp.sum(family.fn(q, k, v, is_causal=True, **kw)[:, :CUT + 1] ** 2)))(k2)
  assert float(jnp.max(jnp.abs(g[:, CUT + 1:]))) == 0.0
  assert float(jnp.max(jnp.abs(g[:, :CUT + 1]))) > 0.0


@pytest.mark.parametrize("kind", [k for k in CAUSAL if A.get(k).decodes])
def test_decoding_equals_parallel_with_a_huge_future_key(kind):
  family, kw = _family_kwargs(kind)
  _, _, _, k2, v2 = _inputs(2)
  q = jax.random.normal(jax.random.PRNGKey(9), (B, T, N, H))
  parallel = jax.jit(lambda q, k, v: family.fn(q, k, v, is_causal=True, **kw))(q, k2, v2)
  np.testing.assert_allclose(decode_sequence(kind, q, k2, v2, **kw), parallel, rtol=2e-4, atol=2e-4)


def test_performer_huge_key_is_the_old_failure():
  """The report's scenario: one future key whose FAVOR+ logits exceed every earlier key's by many nats.
  With one global stabiliser the 1e-12 floor turned earlier outputs into uniform averages (at this
  seed the old code moved them by 2.1); now they equal the outputs without that key."""
  from efficient_attn.attention.performer import _logits

  family, kw = _family_kwargs("performer")
  W = kw["projection"]
  q, k, v, _, _ = _inputs(4)
  k = k * 6.0  # large-norm keys: their features sit far below the best possible one
  m = int(jnp.argmax(jnp.sum(W * W, -1)))
  k_big = k.at[:, T - 1].set(jnp.broadcast_to(W[m] * H ** 0.25, (B, K, H)))  # x' = W_m: the largest logit
  logits = _logits(k_big, W, H ** -0.5)
  gap = float(jnp.min(logits[:, T - 1].max(-1) - logits[:, :T - 1].max((1, 3))))
  assert gap > 8.0
  f = jax.jit(lambda k: family.fn(q, k, v, is_causal=True, **kw))
  np.testing.assert_allclose(f(k_big)[:, :T - 1], f(k)[:, :T - 1], rtol=1e-6, atol=1e-7)


def test_performer_segments_reset_the_stabiliser():
  """Packed causal Performer: a huge key in segment 1 does not flatten segment 2 (its max restarts)."""
  family, kw = _family_kwargs("performer")
  q, k, v, _, _ = _inputs(5)
  seg = jnp.concatenate([jnp.ones((B, 12), jnp.int32), 2 * jnp.ones((B, T - 12), jnp.int32)], axis=1)
  W = kw["projection"]
  m = int(jnp.argmax(jnp.sum(W * W, -1)))
  k = k * 6.0
  k_big = k.at[:, 3].set(jnp.broadcast_to(W[m] * H ** 0.25, (B, K, H)))
  f = jax.jit(lambda k: family.fn(q, k, v, is_causal=True, segment_ids=seg, **kw))
  np.testing.assert_allclose(f(k_big)[:, 12:], f(k)[:, 12:], rtol=1e-5, atol=1e-6)
