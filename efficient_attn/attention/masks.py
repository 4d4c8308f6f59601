"""Block layouts for `block_sparse_attention`, as bool NumPy arrays.

A layout [nq, nk] (or per head [N, nq, nk]) says which key blocks each query
block reads: layout[i, j] = True lets query block i attend to key block j.
Block indices use the same top-left alignment as causal masking: block i of
the queries faces block i of the keys, and "causal" keeps j <= i.

Builders:
  local_layout    a band of `window` blocks on each side (sliding window).
  strided_layout  the Sparse Transformer's strided and fixed patterns (Child et al., 2019).
  bigbird_layout  BigBird's window + global + random blocks (Zaheer et al., 2020).
  layout_to_mask  the dense [T, S] element mask a layout stands for (for tests / references).
"""

from __future__ import annotations

import numpy as np


def _positive(value, arg: str, fn: str, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{fn}: `{arg}` must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _grid(num_q_blocks, num_k_blocks, fn: str):
  """(i [nq, 1], j [1, nk]) block index grids."""
  nq = _positive(num_q_blocks, "num_q_blocks", fn)
  nk = _positive(num_k_blocks, "num_k_blocks", fn)
  return np.arange(nq)[:, None], np.arange(nk)[None, :]


def local_layout(num_q_blocks: int, num_k_blocks: int, *, window: int, causal: bool = False) -> np.ndarray:
  """Sliding-window band: block i reads blocks j with i - window < j <= i (causal) or |i - j| < window.

  `window` counts blocks (the diagonal block included), like `local_attention`'s
  window counts positions. Returns bool [num_q_blocks, num_k_blocks].
  """
  i, j = _grid(num_q_blocks, num_k_blocks, "local_layout")
  window = _positive(window, "window", "local_layout")
  return (i - j < window) & (j - i < (1 if causal else window))


def strided_layout(num_q_blocks: int, num_k_blocks: int, *, stride: int, mode: str = "strided",
                   causal: bool = True, num_summary: int = 1, split_heads: bool = False) -> np.ndarray:
  """The factorized patterns of the Sparse Transformer (Child et al., 2019, "Generating Long
  Sequences with Sparse Transformers", section 4.2), on blocks.

  mode="strided": a local band of `stride` blocks (|i - j| < stride) plus every block
    whose distance is a multiple of `stride` ((i - j) % stride == 0): for data with a
    period, such as image rows.
  mode="fixed": the blocks of the same `stride`-sized segment (i // stride == j // stride)
    plus the last `num_summary` blocks of every segment ("summary" blocks that carry
    the segment to later ones): for text.
  causal keeps j <= i. The paper splits the two parts over heads; `split_heads=True`
  returns them separately as bool [2, nq, nk] (a per-head layout for 2 heads, or to
  tile over heads), otherwise their union [nq, nk].
  """
  fn = "strided_layout"
  i, j = _grid(num_q_blocks, num_k_blocks, fn)
  stride = _positive(stride, "stride", fn)
  if mode == "strided":
    first, second = np.abs(i - j) < stride, (i - j) % stride == 0
  elif mode == "fixed":
    num_summary = _positive(num_summary, "num_summary", fn)
    if num_summary > stride:
      raise ValueError(f"{fn}: `num_summary`={num_summary} must be at most `stride`={stride}.")
    first, second = i // stride == j // stride, j % stride >= stride - num_summary
  else:
    raise ValueError(f"{fn}: `mode` must be 'strided' or 'fixed', got {mode!r}.")
  parts = np.stack(np.broadcast_arrays(first, second))
  if causal:
    parts &= j <= i
  return parts if split_heads else parts[0] | parts[1]


def bigbird_layout(num_q_blocks: int, num_k_blocks: int, *, window: int, num_global: int, num_random: int,
                   seed: int, causal: bool = False, num_heads: int | None = None) -> np.ndarray:
  """BigBird's block pattern (Zaheer et al., 2020, "Big Bird: Transformers for Longer Sequences").

  - window: a band of `window` blocks centred on the diagonal, j in
    [i - window // 2, i + (window - 1) // 2] (BigBird's default is 3: itself and one each side).
  - global: the first `num_global` query blocks read every key block, and every query
    block reads the first `num_global` key blocks (BigBird-ITC).
  - random: each other query block reads `num_random` more key blocks drawn uniformly,
    without replacement, from those it does not read yet (fewer when fewer are left),
    from `np.random.default_rng(seed)`: the same seed gives the same layout.
  causal keeps j <= i only (random blocks are then drawn among j <= i).
  num_heads: None -> bool [nq, nk]; an int -> [num_heads, nq, nk] with independent random
  blocks per head, as BigBird draws them.
  """
  fn = "bigbird_layout"
  i, j = _grid(num_q_blocks, num_k_blocks, fn)
  window = _positive(window, "window", fn)
  num_global = _positive(num_global, "num_global", fn, minimum=0)
  num_random = _positive(num_random, "num_random", fn, minimum=0)
  heads = 1 if num_heads is None else _positive(num_heads, "num_heads", fn)
  allowed = (j <= i) if causal else np.ones((i.size, j.size), bool)
  fixed = (j - i >= -(window // 2)) & (j - i <= (window - 1) // 2)
  fixed = (fixed | (i < num_global) | (j < num_global)) & allowed
  rng = np.random.default_rng(seed)
  layout = np.repeat(fixed[None], heads, axis=0)
  for h in range(heads):
    for row in range(num_global, i.size):
      free = np.flatnonzero(allowed[row] & ~fixed[row])
      picked = rng.choice(free, size=min(num_random, free.size), replace=False)
      layout[h, row, picked] = True
  return layout if num_heads is not None else layout[0]


def layout_to_mask(layout, block_size: int) -> np.ndarray:
  """bool [..., nq, nk] block layout -> bool [..., nq·block_size, nk·block_size] element mask.

  The dense mask costs T·S memory; it is meant for tests and references.
  """
  block_size = _positive(block_size, "block_size", "layout_to_mask")
  layout = np.asarray(layout, bool)
  if layout.ndim not in (2, 3):
    raise ValueError(f"layout_to_mask: `layout` must be [nq, nk] or [N, nq, nk], got shape {list(layout.shape)}.")
  return np.repeat(np.repeat(layout, block_size, axis=-2), block_size, axis=-1)
