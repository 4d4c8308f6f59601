"""Block-sparse attention: only the (query block, key block) pairs a layout marks are computed.

As in the Sparse Transformer (Child et al., 2019) and BigBird (Zaheer et al., 2020):
the layout is a bool [T/bs, S/bs] (or per head [N, T/bs, S/bs]) NumPy array, known at
trace time. It becomes static gather indices: for each query block, the list of its
marked key blocks padded with a validity flag to the longest list of its bucket (query
blocks are bucketed by the power of two above their count, so BigBird's few dense
global rows do not make every row dense). The marked K/V blocks are gathered and each
bucket's logits are [B, K, G, u, bs, M, bs], so time and memory are O(marked blocks · bs²),
within 2x, and no [T, S] tensor is formed. The builders of layouts are in
`efficient_attn.attention.masks`. As in splash attention, the description becomes a static
plan once: the model's layout once per (options, shape) (`build_layout`), its block plan
once per layout (`block_plan`), both cached, never rebuilt on a retrace.

Context parallelism (`context_axis`): the layout stays the one of the whole sequence; each shard
gathers all of K / V (`jax.lax.all_gather`), puts them in sequence order and computes its own query
blocks, the layout's rows of the pieces it holds (a static plan per shard, chosen by
`jax.lax.axis_index`). All of K / V moves, O(T): what global and random blocks need anyway.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.attention._common import (
    check_bias, check_divisible, check_mask, check_qkv, compiled_when_eager, gather_block_pairs, leading_batch_dims,
    masked_softmax, resolve_scale, split_segment_ids, stats_dtype)
from efficient_attn.attention import context, kernels, masks
from efficient_attn.attention.registry import Family, Shape

_FN = "block_sparse_attention"


def _static_layout(layout, dims, nq: int, nk: int, is_causal: bool) -> np.ndarray:
  """Checks the layout against the shapes; returns bool NumPy [1 or N, nq, nk]."""
  if isinstance(layout, jax.core.Tracer):
    raise ValueError(f"{_FN}: `layout` must be a concrete NumPy bool array known at trace time, got a traced array;"
                     " close over it (or use functools.partial) instead of passing it as a jit argument.")
  layout = np.asarray(layout)
  if layout.dtype != np.bool_ and not (np.issubdtype(layout.dtype, np.integer) and np.isin(layout, (0, 1)).all()):
    raise ValueError(f"{_FN}: `layout` must be boolean (True = compute this block), got dtype {layout.dtype}.")
  if layout.ndim == 2:
    layout = layout[None]
  if layout.ndim != 3 or layout.shape[1:] != (nq, nk) or layout.shape[0] not in (1, dims.N):
    raise ValueError(f"{_FN}: `layout` of shape {list(layout.shape)} does not match [T/bs, S/bs]={[nq, nk]}"
                     f" or [N, T/bs, S/bs]={[dims.N, nq, nk]}.")
  layout = layout.astype(bool)
  if is_causal:  # Top-left causal: key block j holds a visible key for query block i iff j <= i.
    layout = layout & np.tri(nq, nk, dtype=bool)
  return layout


def block_plan(layout: np.ndarray) -> tuple:
  """The static block plan of a (checked, causal-trimmed) bool layout [h, nq, nk]: `_row_groups`,
  cached by the layout's contents, so retracing the same layout (every layer, every step) reuses it."""
  layout = np.ascontiguousarray(layout, bool)
  return _cached_plan(layout.shape, layout.tobytes())


@functools.lru_cache(maxsize=128)
def _cached_plan(shape: tuple, data: bytes) -> tuple:
  groups = _row_groups(np.frombuffer(data, bool).reshape(shape))
  for arrays in groups:
    for a in arrays:
      a.setflags(write=False)
  return tuple(groups)


def _row_groups(layout: np.ndarray):
  """Static gather indices, with query blocks grouped by how many key blocks they read.

  Padding every row to the longest one would make a few dense rows (BigBird's global
  blocks) cost as much as dense attention, so rows are bucketed by the power of two
  above their count (taking the max over heads) and each bucket is padded to its own
  longest row: less than 2x waste. Returns [(rows int [u], kv_blocks int [h, u, M],
  valid bool [h, u, M])], one per bucket, the rows of all buckets covering 0 .. nq-1.
  """
  counts = layout.sum(-1).max(0)
  bucket = np.ceil(np.log2(np.maximum(counts, 1))).astype(int)
  groups = []
  for b in np.unique(bucket):
    rows = np.flatnonzero(bucket == b)
    sub = layout[:, rows]
    M = max(1, int(sub.sum(-1).max()))
    order = np.argsort(~sub, axis=-1, kind="stable")[..., :M]  # Marked blocks first, in increasing order.
    # int32 indices: JAX mis-normalises a cached int64 NumPy index once x64 is switched on (int32 + int64).
    groups.append((rows.astype(np.int32), order.astype(np.int32), np.take_along_axis(sub, order, axis=-1)))
  return groups


def _gather_kv(x_BSKH, kv_blocks, bs: int, K: int):
  """[B, S, K, H] -> the marked blocks: [B, K, u, M, bs, H] for a shared layout, else [B, K, G, u, M, bs, H].

  (Also used for value [B, S, K, Hv].)"""
  B, S, _, H = x_BSKH.shape
  x_BKnbH = x_BSKH.reshape(B, S // bs, bs, K, H).transpose(0, 3, 1, 2, 4)
  h, u, M = kv_blocks.shape
  if h == 1:  # One layout for all heads: no copy per query head.
    return x_BKnbH[:, :, kv_blocks[0]]
  return x_BKnbH[:, np.arange(K)[:, None, None, None], kv_blocks.reshape(K, h // K, u, M)]


def _by_head(x, N: int, K: int):
  """[B|1, N|1, ...] -> [B|1, K|1, G|1, ...]."""
  return x.reshape(x.shape[0], K, N // K, *x.shape[2:]) if x.shape[1] == N else x[:, :, None]


@compiled_when_eager(static=("layout",))
@leading_batch_dims(query_mask=True)
def block_sparse_attention(query, key, value, bias=None, mask=None, *, is_causal=False, segment_ids=None,
                           scale=None, layout, block_size, implementation=None, context_axis=None,
                           context_layout="zigzag"):
  """Softmax attention restricted to the blocks that `layout` marks.

  Args:
    query: [B, T, N, H]. key: [B, S, K, H], value: [B, S, K, Hv], N % K == 0; T and S divisible
      by block_size. Any number of leading batch dims [..., T, N, H] (none included) is accepted
      in place of B.
    bias: additive, broadcastable to [B, N, T, S]. mask: bool, broadcastable to [B, N, T, S].
      Only their marked blocks are read (a [B, 1, 1, S] padding mask stays O(S); a dense
      [T, S] mask costs T·S memory by itself).
    query_seq_lengths, key_value_seq_lengths: int [B], as in jax.nn.dot_product_attention:
      keys s >= kv length are invisible; queries t >= q length output 0.
    is_causal: top-left causal; blocks above the diagonal are dropped even if marked.
    segment_ids: int [B, T] or a pair (q_ids [B, T], kv_ids [B, S]).
    scale: logit scale, default H ** -0.5.
    layout: concrete bool NumPy [T/bs, S/bs] or per head [N, T/bs, S/bs] (not a traced array).
    implementation: "xla" (the gathers below), "splash" (Pallas splash attention with the layout
      as its per-head static mask: the TPU kernel; interpret mode elsewhere) or None: splash
      when lowered for TPU and it takes the call (T == S, every diagonal block marked, no bias,
      no dense mask / lengths), else xla.
    block_size: positions per block, for queries and keys.
    context_axis, context_layout: context parallelism (see `attention.context`): the call runs inside
      `jax.shard_map` over the mesh axis `context_axis` on one shard's T = T_total / P queries and
      S = S_total / P keys in `context_layout` ("zigzag" | "contiguous"), segment ids and a key mask
      [B|1, 1, 1, S] laid out the same way; `layout` is the whole sequence's [T_total/bs, S_total/bs].
      One all_gather of K, V (+ key ids and mask): B·S_total·K·(H + Hv) numbers per shard; the shard
      then computes the layout's rows of its own pieces. block_size must divide the piece lengths
      (T / pieces, S / pieces); no bias, the xla implementation.

  Returns:
    [B, T, N, Hv] in the query dtype; a query that sees no key outputs 0. Logits and softmax
    in float32 (float64 for float64 inputs).

  Complexity: O(B·N·nnz·bs²·H) time and O(B·N·nnz·bs²) memory, nnz = marked blocks
  (within 2x: rows are padded to the power of two above their count).
  """
  dims = check_qkv(query, key, value, _FN, value_head_dim=True)
  B, T, S, N, K, H = dims
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise ValueError(f"{_FN}: `block_size` must be a positive integer, got {block_size!r}.")
  if context_axis is not None:
    mask, bias = check_mask(mask, dims, _FN), check_bias(bias, dims, _FN)
    xla = lambda: _sparse_context(query, key, value, bias, mask, split_segment_ids(segment_ids, dims, _FN),
                                  is_causal, resolve_scale(scale, H), layout, int(block_size), dims, context_axis,
                                  context_layout)
    return kernels.xla_or_splash(_FN, implementation, "context parallelism runs the XLA gathers", xla, None)
  check_divisible(T, block_size, "query length T", "block_size", _FN)
  check_divisible(S, block_size, "key length S", "block_size", _FN)
  bs, nq, nk = int(block_size), T // block_size, S // block_size
  layout = _static_layout(layout, dims, nq, nk, is_causal)
  mask, bias = check_mask(mask, dims, _FN), check_bias(bias, dims, _FN)
  ids = split_segment_ids(segment_ids, dims, _FN)
  scale = resolve_scale(scale, H)
  xla = lambda: _gathered_blocks(query, key, value, bias, mask, ids, is_causal, scale, layout, bs)
  splash = lambda interpret: kernels.splash_attention(query, key, value, causal=is_causal, segment_ids=ids,
                                                      scale=scale, layout=kernels.layout_key(layout, bs),
                                                      interpret=interpret)
  refusal = kernels.splash_refusal(T, S, bias=bias, mask=mask, layout=layout)
  return kernels.xla_or_splash(_FN, implementation, refusal, xla, splash)


def _gathered_blocks(query, key, value, bias, mask, ids, is_causal, scale, layout, bs, q_rows=None):
  """The XLA path on checked arguments: each query block against its gathered marked key blocks.

  q_rows: int NumPy [T/bs], the sequence's block index of each query block (default 0 .. T/bs − 1; a
  shard's own rows under context parallelism), which the causal test inside blocks reads."""
  B, T, N, H = query.shape
  K, nq = key.shape[2], T // bs
  q_BiqKGH = query.reshape(B, nq, bs, K, N // K, H)
  groups = block_plan(layout)
  parts, rows = [], []
  for rows_u, kv_blocks, valid in groups:
    q_u = q_BiqKGH if len(groups) == 1 else q_BiqKGH[:, rows_u]
    parts.append(_attend_rows(q_u, key, value, bias, mask, ids, is_causal, scale, rows_u,
                              kv_blocks, valid, bs, q_rows))
    rows.append(rows_u)
  out_BiqKGH = parts[0]
  if len(parts) > 1:  # Back to query-block order.
    out_BiqKGH = jnp.concatenate(parts, axis=1)[:, np.argsort(np.concatenate(rows))]
  return out_BiqKGH.reshape(B, T, N, value.shape[-1]).astype(query.dtype)


def _attend_rows(q_BuqKGH, key, value, bias, mask, ids, is_causal, scale, rows, kv_blocks, valid, bs: int,
                 q_rows=None):
  """Attention of the query blocks `rows` to their marked key blocks: [B, u, bs, K, G, Hv], float32
  (float64 for float64 inputs).

  kv_blocks / valid: int / bool [h, u, M] (h = 1 shared layout, or N per head).
  Logits are [B, K, G, u, bs, M, bs]: query block, query in block, slot, key in slot.
  """
  B, u, _, K, G, H = q_BuqKGH.shape
  N, nk, h = K * G, key.shape[1] // bs, kv_blocks.shape[0]
  k_blocks, v_blocks = _gather_kv(key, kv_blocks, bs, K), _gather_kv(value, kv_blocks, bs, K)
  k_spec, v_spec = ("BKumkH", "BKumkV") if h == 1 else ("BKGumkH", "BKGumkV")
  acc = stats_dtype(jnp.result_type(q_BuqKGH, key, value))
  logits = jnp.einsum(f"BuqKGH,{k_spec}->BKGuqmk", q_BuqKGH, k_blocks, preferred_element_type=acc) * scale

  # Visibility [B|1, K|1, G|1, u, bs|1, M, bs|1]: a real slot, causal inside blocks, segments, mask.
  as_heads = lambda x: _by_head(jnp.asarray(x)[None], N, K)
  valid_hu1M1 = valid[:, :, None, :, None]
  if is_causal:  # static: key position <= query position, [h, u, bs, M, bs]
    k_pos = (kv_blocks * bs)[:, :, None, :, None] + np.arange(bs).reshape(1, 1, 1, 1, bs)
    at = np.asarray(rows) if q_rows is None else np.asarray(q_rows)[rows]
    q_pos = (at * bs).reshape(1, u, 1, 1, 1) + np.arange(bs).reshape(1, 1, bs, 1, 1)
    valid_hu1M1 = valid_hu1M1 & (k_pos <= q_pos)
  visible = as_heads(valid_hu1M1)
  if ids is not None:
    q_ids, kv_ids = ids
    q_ids = q_ids.reshape(B, -1, bs)[:, rows]
    kv_ids = kv_ids.reshape(B, nk, bs)[:, kv_blocks]  # [B, h, u, M, bs]
    visible = visible & (q_ids.reshape(B, 1, 1, u, bs, 1, 1) == _by_head(kv_ids[:, :, :, None], N, K))
  if mask is not None:
    visible = visible & _by_head(gather_block_pairs(mask, bs, kv_blocks, rows), N, K)
  if bias is not None:
    logits = logits + _by_head(gather_block_pairs(bias, bs, kv_blocks, rows), N, K).astype(acc)

  probs = masked_softmax(logits, visible, axis=(-2, -1))
  return jnp.einsum(f"BKGuqmk,{v_spec}->BuqKGV", probs.astype(value.dtype), v_blocks, preferred_element_type=acc)


def _sparse_context(query, key, value, bias, mask, ids, is_causal, scale, layout, bs: int, dims, axis_name,
                    layout_name: str):
  """The XLA path on one shard of a sequence split over `axis_name` (see `block_sparse_attention`): K, V, key
  ids and a key mask gathered whole in sequence order; this shard's query blocks against them."""
  B, T, S, N, K, H = dims
  if bias is not None:
    raise ValueError(f"{_FN}: under context parallelism `bias` is not supported (it would need the other shards'"
                     " positions); use a key mask or segment_ids.")
  if mask is not None and mask.reshape((1,) * (4 - mask.ndim) + mask.shape).shape[1:3] != (1, 1):
    raise ValueError(f"{_FN}: under context parallelism `mask` must be a key mask broadcastable to [B, 1, 1, S],"
                     f" got shape {list(mask.shape)}; use segment_ids for packed documents.")
  n = context.local_pieces(layout_name, T, _FN)
  if T % (n * bs) or S % (n * bs):
    raise ValueError(f"{_FN}: under context parallelism `block_size`={bs} must divide the piece lengths"
                     f" T/{n}={T / n:g} and S/{n}={S / n:g} (a block may not straddle two pieces).")
  P = jax.lax.axis_size(axis_name)
  layout = _static_layout(layout, dims, P * T // bs, P * S // bs, is_causal)
  order = context.piece_order(P, layout_name)
  slot = np.argsort(order)                  # gathered piece holding each sequence position

  def whole(x, t_axis=1):                   # [.., S, ..] on this shard -> [.., P·S, ..] in sequence order
    x = jax.lax.all_gather(x, axis_name, axis=t_axis, tiled=True)
    pieces = x.reshape(*x.shape[:t_axis], P * n, S // n, *x.shape[t_axis + 1:])
    return jnp.take(pieces, jnp.asarray(slot), axis=t_axis).reshape(x.shape)

  key, value = whole(key), whole(value)
  ids = None if ids is None else (ids[0], whole(ids[1]))
  if mask is not None and mask.shape[-1] > 1:  # [B|1, 1, 1, S]
    mask = whole(mask.reshape((1,) * (4 - mask.ndim) + mask.shape), t_axis=3)
  nq = T // n // bs                         # query blocks per piece

  def branch(s: int):                       # shard s: the layout's rows of its pieces, in its order
    rows = (order.reshape(P, n)[s][:, None] * nq + np.arange(nq)).reshape(-1)
    return lambda: _gathered_blocks(query, key, value, None, mask, ids, is_causal, scale, layout[:, rows], bs,
                                    q_rows=rows)

  return jax.lax.switch(jax.lax.axis_index(axis_name), [branch(s) for s in range(P)])


# ----------------------------------------------------------------------------- the family record

PATTERNS = ("bigbird", "local", "strided", "fixed")


@dataclasses.dataclass(frozen=True)
class SparseOptions:
  """block_size: positions per block. pattern: which `masks` builder makes the static layout —
  "bigbird" (window + num_global + num_random blocks, drawn with `seed`), "local" (a band of
  `window` blocks), "strided" / "fixed" (Sparse Transformer patterns with `stride`).
  implementation: None (splash on TPU, else xla) | "xla" | "splash"."""
  block_size: int = 64
  pattern: str = "bigbird"
  window: int = 3
  num_global: int = 1
  num_random: int = 1
  stride: int = 4
  seed: int = 0
  implementation: str | None = None

  def __post_init__(self):
    if self.implementation not in (None, "xla", "splash"):
      raise ValueError(f"implementation={self.implementation!r} is not one of None, 'xla', 'splash'.")
    if self.pattern not in PATTERNS:
      raise ValueError(f"pattern={self.pattern!r} is not one of {list(PATTERNS)}.")
    for name in ("block_size", "window", "stride"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
    for name in ("num_global", "num_random"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")


@functools.lru_cache(maxsize=64)
def build_layout(o: SparseOptions, num_q_blocks: int, num_k_blocks: int) -> np.ndarray:
  """The static bool [T/bs, S/bs] layout the options describe (cached per shape; never traced)."""
  if o.pattern == "bigbird":
    layout = masks.bigbird_layout(num_q_blocks, num_k_blocks, window=o.window, num_global=o.num_global,
                                  num_random=o.num_random, seed=o.seed)
  elif o.pattern == "local":
    layout = masks.local_layout(num_q_blocks, num_k_blocks, window=o.window)
  else:
    layout = masks.strided_layout(num_q_blocks, num_k_blocks, stride=o.stride, mode=o.pattern, causal=False)
  layout = np.asarray(layout)
  layout.setflags(write=False)
  return layout


def _check(o: SparseOptions, shape: Shape) -> None:
  for what, n in (("query length", shape.seq_len), ("key length", shape.kv_len)):
    if n % o.block_size:
      raise ValueError(f"block-sparse attention: {what} {n} is not divisible by block_size={o.block_size};"
                       f" pick a length that is a multiple of {o.block_size}.")


def _check_context(o: SparseOptions, shape: Shape, shards: int, layout: str) -> None:
  piece = context.check_split(o, shape, shards, layout)
  if piece % o.block_size:
    raise ValueError(f"block_size={o.block_size} does not divide the {piece}-token pieces of a {layout} split over"
                     f" {shards} devices; pick a block size that divides {piece}, a longer T or fewer devices.")


def _prepare(o: SparseOptions, shape: Shape) -> dict:
  _check(o, shape)
  return {"layout": build_layout(o, shape.seq_len // o.block_size, shape.kv_len // o.block_size),
          "block_size": o.block_size, "implementation": o.implementation}


def layout_flops(layout, block_size: int, shape: Shape) -> dict:
  """FLOPs per token of a given layout: visible pairs of the marked blocks (ideal) and the padded
  rows `block_sparse_attention` computes (executed)."""
  T, _, N, _, H, causal = shape
  bs = block_size
  layout = np.asarray(layout).astype(bool)
  layout = layout[None] if layout.ndim == 2 else layout
  if causal:
    layout = layout & np.tri(*layout.shape[1:], dtype=bool)
  diagonal = np.trace(layout, axis1=1, axis2=2).sum() if causal else 0  # half-visible blocks
  pairs = (layout.sum() * bs * bs - diagonal * bs * (bs - 1) / 2) / layout.shape[0]
  slots = sum(len(rows) * valid.shape[-1] for rows, _, valid in block_plan(layout))
  return {"ideal": 4 * N * H * pairs / T, "executed": 4 * N * H * slots * bs * bs / T}


def _flops(o: SparseOptions, shape: Shape) -> dict:
  return layout_flops(_prepare(o, shape)["layout"], o.block_size, shape)


FAMILY = Family(
    name="sparse", fn=block_sparse_attention, options=SparseOptions, prepare=_prepare, flops=_flops, check=_check,
    context=_check_context,
    description="block-sparse softmax attention on a static layout (BigBird / Sparse Transformer)")
