"""Multi-query associative recall (MQAR), generated locally and seeded.

Zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in
Efficient Language Models"): a sequence opens with key-value pairs, and later
the keys come back as queries; at each query the model must predict the value
that followed that key in the opening. Layout of one row (T = seq_len):

    k1 v1 k2 v2 ... kP vP | f f k2 v2 f k1 v1 f f ...
    <---- 2P tokens ----> | query region: Q queries, each "key value",
                             on slot boundaries, gaps filled with fillers f

Vocabulary (V = vocab_size): id 0 is never emitted (free for padding / BOS),
keys come from [1, V//2), values from [V//2, V), so the two ranges are
disjoint. Keys are distinct within a row, values too (as in Zoology), and each
query asks a different key. Fillers are uniform over [1, V) minus the row's
keys, so every queried key occurs exactly once before its query, followed by
its value.

Query placement follows Zoology's power law: the query region holds
(T - 2P) // 2 two-token slots, and slot g (0-based) is drawn with probability
proportional to (g + 1) ** (power_a - 1) without replacement (Gumbel top-k);
power_a = 0.01 crowds the queries near the start of the region, power_a = 1
is uniform.

Targets are next-token targets, `targets[:, t] = inputs[:, t + 1]` (the last
one 0), and `weights` is 1.0 exactly at the query positions, whose target is the
recalled value. Unlike Zoology, which leaves a random token after each query,
the value is written after its query, so the rows are ordinary LM sequences:
this suits causal models only (a bidirectional model would see the answer).
"""

from __future__ import annotations

import numpy as np


def _distinct_per_row(rng: np.random.Generator, num_rows: int, low: int, high: int, k: int) -> np.ndarray:
  """[num_rows, k] ints from [low, high), distinct within each row."""
  return np.stack([rng.choice(high - low, size=k, replace=False) + low for _ in range(num_rows)]) \
      if num_rows else np.zeros((0, k), np.int64)


def _fillers(rng: np.random.Generator, shape: tuple[int, int], vocab_size: int, keys_BP: np.ndarray) -> np.ndarray:
  """Uniform over [1, V) minus each row's keys: draw from a range of V-1-P ids, then step over the keys."""
  num_rows, num_pairs = keys_BP.shape
  draw_BT = rng.integers(1, vocab_size - num_pairs, size=shape)
  # A draw d lands on d + #{i : key_(i) - i <= d}, with key_(i) the row's i-th smallest key;
  # one searchsorted over all rows, kept apart by an offset of vocab_size per row.
  thresholds_BP = np.sort(keys_BP, axis=1) - np.arange(num_pairs)
  offset_B1 = np.arange(num_rows)[:, None] * vocab_size
  skip_BT = np.searchsorted((thresholds_BP + offset_B1).reshape(-1), draw_BT + offset_B1, side="right")
  return draw_BT + skip_BT - offset_B1 // vocab_size * num_pairs


def _check_args(num_examples, seq_len, num_kv_pairs, num_queries, vocab_size, power_a):
  if num_examples < 0:
    raise ValueError(f"num_examples={num_examples} is negative; it must be >= 0.")
  if num_kv_pairs < 1:
    raise ValueError(f"num_kv_pairs={num_kv_pairs} must be >= 1.")
  if not 1 <= num_queries <= num_kv_pairs:
    raise ValueError(f"num_queries={num_queries} must lie in 1..num_kv_pairs={num_kv_pairs} "
                     "(each query asks a different key).")
  need = 2 * num_kv_pairs + 2 * num_queries
  if seq_len < need:
    raise ValueError(f"seq_len={seq_len} is too short for {num_kv_pairs} key-value pairs and {num_queries} "
                     f"queries; need 2*pairs + 2*queries = {need} <= seq_len.")
  if vocab_size // 2 - 1 < num_kv_pairs:
    raise ValueError(f"vocab_size={vocab_size} is too small for {num_kv_pairs} distinct keys in [1, vocab_size//2); "
                     f"need vocab_size >= {2 * num_kv_pairs + 2}.")
  if not power_a > 0:
    raise ValueError(f"power_a={power_a} must be > 0 (1.0 = uniform query placement).")


def generate_mqar(num_examples: int, *, seq_len: int, num_kv_pairs: int, vocab_size: int, seed: int,
                  num_queries: int | None = None, power_a: float = 0.01) -> dict:
  """Samples `num_examples` MQAR rows (Zoology's construction, see the module docstring).

  num_queries defaults to num_kv_pairs (every key is asked once, as in
  Zoology's MQAR). Deterministic per `seed` (`np.random.default_rng(seed)`).
  Cost O(B * T * log P) time and O(B * T) memory, plus one `rng.choice`
  per row for the keys and values.

  Returns a dict of NumPy arrays:
    inputs   int32   [B, T]
    targets  int32   [B, T]   next-token targets, inputs shifted left, last 0
    weights  float32 [B, T]   1.0 at the num_queries query positions, else 0

  Raises ValueError when 2*num_kv_pairs + 2*num_queries > seq_len, when
  vocab_size // 2 - 1 < num_kv_pairs (too few keys), or for other bad values.
  """
  num_queries = num_kv_pairs if num_queries is None else num_queries
  _check_args(num_examples, seq_len, num_kv_pairs, num_queries, vocab_size, power_a)
  rng = np.random.default_rng(seed)
  B, T, P, Q = num_examples, seq_len, num_kv_pairs, num_queries
  half = vocab_size // 2
  keys_BP = _distinct_per_row(rng, B, 1, half, P)
  values_BP = _distinct_per_row(rng, B, half, vocab_size, P)

  inputs_BT = _fillers(rng, (B, T), vocab_size, keys_BP)
  inputs_BT[:, 0:2 * P:2] = keys_BP
  inputs_BT[:, 1:2 * P:2] = values_BP

  # Power-law slot choice without replacement: top-Q of log p + Gumbel noise.
  num_slots = (T - 2 * P) // 2
  log_p = (power_a - 1.0) * np.log(np.arange(1, num_slots + 1))
  scores = log_p + rng.gumbel(size=(B, num_slots))
  slots_BQ = np.argpartition(-scores, Q - 1, axis=1)[:, :Q] if B else np.zeros((0, Q), np.int64)
  pairs_BQ = np.argsort(rng.random((B, P)), axis=1)[:, :Q]  # which pairs are asked, in random order
  rows_B1 = np.arange(B)[:, None]
  query_pos_BQ = 2 * P + 2 * slots_BQ
  inputs_BT[rows_B1, query_pos_BQ] = keys_BP[rows_B1, pairs_BQ]
  inputs_BT[rows_B1, query_pos_BQ + 1] = values_BP[rows_B1, pairs_BQ]

  targets_BT = np.zeros_like(inputs_BT)
  targets_BT[:, :-1] = inputs_BT[:, 1:]
  weights_BT = np.zeros((B, T), np.float32)
  weights_BT[rows_B1, query_pos_BQ] = 1.0
  return {"inputs": inputs_BT.astype(np.int32), "targets": targets_BT.astype(np.int32), "weights": weights_BT}
