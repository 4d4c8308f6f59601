"""Context parallelism of the windowed and block-sparse families: local, block-sparse and Based split over a
`context` mesh axis give one device's outputs and gradients (q, k, v), float32, within 1e-5 of the largest entry.

Local moves only a halo of the window (ppermute, the same bytes at any T); block-sparse gathers all of K / V;
Based passes its Taylor feature state and takes the local halo.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from efficient_attn.attention.based import based_attention
from efficient_attn.attention.local import local_attention
from efficient_attn.attention.sparse import SparseOptions, block_sparse_attention, build_layout
from test_context import B, ERRORS, K, N, T, H, _check_split, _inputs, _mesh, _segments, split

CUTS = (0, 13, 30, 47)  # documents crossing shard boundaries (+5 in row 1)


def _arrays(cuts, key_mask: bool):
  (q, k, v, _), ct = _inputs(False, seed=5)
  arrays = (q, k, v)
  if key_mask:
    arrays += (jnp.broadcast_to(jnp.arange(T)[None, :] % 7 != 3, (B, T)),)  # every 7th key padded
  if cuts is not None:
    arrays += (_segments(cuts),)
  return arrays, ct


def _call(family, key_mask: bool, cuts, **options):
  """family(q, k, v, mask=, segment_ids=, **options) taking the optional arrays positionally, after q, k, v."""
  def fn(q, k, v, *rest, **kw):
    rest = list(rest)
    mask = rest.pop(0)[:, None, None, :] if key_mask else None
    seg = rest.pop(0) if cuts is not None else None
    return family(q, k, v, mask=mask, segment_ids=seg, **options, **kw)
  return fn


# (shards, layout, causal, window, block_size, key mask, segment starts)
LOCAL_CASES = [
    (2, "contiguous", True, 8, None, False, None),
    (4, "zigzag", False, 8, 4, False, CUTS),       # two blocks of halo on each side
    (8, "zigzag", True, 5, None, True, CUTS),      # window − 1 = the whole piece (4 tokens)
    (4, "contiguous", False, 9, None, True, CUTS),
]


@pytest.mark.parametrize("shards, layout, causal, window, block, key_mask, cuts", LOCAL_CASES)
def test_local_halo_equals_one_device(shards, layout, causal, window, block, key_mask, cuts):
  arrays, ct = _arrays(cuts, key_mask)
  fn = _call(local_attention, key_mask, cuts, is_causal=causal, window=window, block_size=block)
  _check_split(fn, arrays, ct, shards, layout, ("dq", "dk", "dv"))


# (shards, layout, causal, block_size, pattern, key mask, segment starts)
SPARSE_CASES = [
    (2, "zigzag", True, 8, "bigbird", False, CUTS),
    (4, "contiguous", False, 8, "bigbird", True, None),
    (8, "contiguous", True, 8, "strided", False, CUTS),
]


@pytest.mark.parametrize("shards, layout, causal, bs, pattern, key_mask, cuts", SPARSE_CASES)
def test_block_sparse_gather_equals_one_device(shards, layout, causal, bs, pattern, key_mask, cuts):
  arrays, ct = _arrays(cuts, key_mask)
  grid = build_layout(SparseOptions(block_size=bs, pattern=pattern, num_random=2), T // bs, T // bs)
  fn = _call(block_sparse_attention, key_mask, cuts, is_causal=causal, layout=grid, block_size=bs)
  _check_split(fn, arrays, ct, shards, layout, ("dq", "dk", "dv"))


@pytest.mark.parametrize("shards, layout, causal, key_mask, cuts", [(2, "contiguous", True, False, None),
                                                                     (4, "zigzag", False, True, CUTS)])
def test_based_equals_one_device(shards, layout, causal, key_mask, cuts):
  arrays, ct = _arrays(cuts, key_mask)
  fn = _call(based_attention, key_mask, cuts, is_causal=causal, feature_dim=4, window_size=5, chunk_size=4)
  _check_split(fn, arrays, ct, shards, layout, ("dq", "dk", "dv"))


def _local_collectives(T_total: int, shards: int = 4) -> dict[str, list[int]]:
  """{collective: sorted result bytes} of the compiled fwd+bwd of a bidirectional zigzag local call."""
  mesh = _mesh(shards)
  on_shards = NamedSharding(mesh, P(None, "context"))
  shape = lambda *d: jax.ShapeDtypeStruct(d, jnp.float32, sharding=on_shards)  # noqa: E731
  args = (shape(B, T_total, N, H), shape(B, T_total, K, H), shape(B, T_total, K, H))
  family = lambda q, k, v: local_attention(q, k, v, window=8, context_axis="context")  # noqa: E731
  fn = jax.shard_map(family, mesh=mesh, in_specs=P(None, "context"), out_specs=P(None, "context"))
  step = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2)), out_shardings=on_shards)
  found: dict[str, list[int]] = {}
  for line in step.lower(*args).compile().as_text().splitlines():
    op = re.search(r" (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", line)
    if op:
      shapes = re.findall(r"(?:f32|s32|pred)\[([\d,]*)\]", line.split("=", 1)[1].split(op.group(0))[0])
      found.setdefault(op.group(1), []).append(sum(4 * int(np.prod([int(d) for d in s.split(",") if d]))
                                                   for s in shapes))
  return {op: sorted(sizes) for op, sizes in found.items()}


def test_local_moves_a_halo_the_same_at_any_length():
  """Only collective-permutes (no all-gather), of the halo: the same bytes at 256 and 1024 tokens."""
  short, long = _local_collectives(256), _local_collectives(1024)
  halo = 4 * B * 8 * K * H  # one block of 8 keys (window 8) of k or v
  # zigzag, both sides: 2 ppermutes per side of k and v forward, their transposes backward.
  assert short == long == {"collective-permute": [halo] * 16}, (short, long)


def test_refusals_are_one_sentence():
  (q, k, v, _), _ = _inputs(False)
  # 4 zigzag shards of 64 tokens: pieces of 8.
  with pytest.raises(ValueError, match=r"local_attention: under context parallelism each piece holds 8 tokens, and"
                                       r" `window`=10 reaches past the neighbouring piece; use a window of at most 9"):
    split(lambda q, k, v, **c: local_attention(q, k, v, window=10, **c), 4, "zigzag")(q, k, v)
  with pytest.raises(ValueError, match=r"local_attention: under context parallelism `block_size`=3 must divide the"
                                       r" piece length 8"):
    split(lambda q, k, v, **c: local_attention(q, k, v, window=4, block_size=3, **c), 4, "zigzag")(q, k, v)
  with pytest.raises(ValueError, match=r"local_attention: under context parallelism `mask` must be a key mask"):
    split(lambda q, k, v, **c: local_attention(q, k, v, mask=jnp.ones((16, 16), bool), window=4, **c), 4,
          "zigzag")(q, k, v)
  with pytest.raises(ValueError, match=r"based_attention: under context parallelism each piece holds 8 tokens, and"
                                       r" `window_size`=64 reaches past"):
    split(lambda q, k, v, **c: based_attention(q, k, v, **c), 4, "zigzag")(q, k, v)
  grid = build_layout(SparseOptions(block_size=16), T // 16, T // 16)
  with pytest.raises(ValueError, match=r"block_sparse_attention: under context parallelism `block_size`=16 must"
                                       r" divide the piece lengths T/2=8"):
    split(lambda q, k, v, **c: block_sparse_attention(q, k, v, layout=grid, block_size=16, **c), 4,
          "zigzag")(q, k, v)
  with pytest.raises(ValueError, match=r"block_sparse_attention: implementation='splash': context parallelism"):
    split(lambda q, k, v, **c: block_sparse_attention(q, k, v, layout=grid, block_size=16, implementation="splash",
                                                      **c), 2, "contiguous")(q, k, v)


def teardown_module():
  if ERRORS:
    print("\nlocal / sparse / based context parallelism, max |sharded - one device|:",
          {k: f"{v:.1e}" for k, v in sorted(ERRORS.items())})
