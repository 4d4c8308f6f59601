"""Synthetic tasks: LRA ListOps and Zoology's multi-query associative recall."""

import numpy as np
import pytest

from efficient_attn.data import listops
from efficient_attn.data.listops import VOCAB, detokenize, evaluate, generate_listops, tokenize
from efficient_attn.data.mqar import generate_mqar

# Values worked out by hand.
HAND_EXAMPLES = [
    ("[MIN 3 8 ]", 3),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),  # MIN -> 4; MAX(2, 9, 4, 0)
    ("[MED 7 2 9 ]", 7),  # odd count: sorted 2 7 9
    ("[MED 1 2 ]", 1),  # even: 1.5 truncated
    ("[MED 3 8 1 6 ]", 4),  # even: sorted 1 3 6 8 -> 4.5 truncated
    ("[MED 9 9 8 8 ]", 8),  # even: 8.5 truncated
    ("[SM 1 2 3 ]", 6),  # no wrap
    ("[SM 5 7 ]", 2),  # 12 wraps
    ("[SM 9 9 9 9 ]", 6),  # 36 wraps
    ("[MAX [MIN 9 3 ] [SM 8 8 ] [MED 0 5 ] ]", 6),  # MAX(3, 6, 2)
    # MAX(1,2)=2, MIN(7,8)=7, MED(2,7,9)=7; SM(6,6)=2, MIN(4,2)=2; SM(7,2,3)=2
    ("[SM [MED [MAX 1 2 ] [MIN 7 8 ] 9 ] [MIN 4 [SM 6 6 ] ] 3 ]", 2),
    ("[MIN [MAX 0 0 ] 5 ]", 0),
]


@pytest.mark.parametrize("text,value", HAND_EXAMPLES)
def test_listops_hand_examples(text, value):
  assert evaluate(text) == value
  assert listops.to_text(listops.parse(text)) == text
  assert evaluate(listops.parse(text)) == value


def test_listops_tree_and_lra_parentheses():
  tree = ("MAX", (2, 9, ("MIN", (4, 7)), 0))
  assert evaluate(tree) == 9
  assert listops.to_text(tree) == "[MAX 2 9 [MIN 4 7 ] 0 ]"
  # LRA's TSV writes "( ... )" around every node of a binarised tree; they carry no information.
  lra_text = "( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) ] )"
  assert evaluate(lra_text) == 9
  assert detokenize(tokenize(lra_text)) == "[MAX 2 9 [MIN 4 7 ] ]"


def test_listops_median_matches_numpy_truncation():
  rng = np.random.default_rng(0)
  for n in range(2, 11):
    for _ in range(20):
      args = rng.integers(0, 10, n).tolist()
      text = "[MED " + " ".join(map(str, args)) + " ]"
      assert evaluate(text) == int(np.median(args))


def test_listops_vocab_and_round_trip():
  assert VOCAB[0] == "<pad>" and len(VOCAB) == len(set(VOCAB)) == 16
  for text, _ in HAND_EXAMPLES:
    ids = tokenize(text)
    assert 0 not in ids
    assert detokenize(ids) == text
    assert detokenize(ids + [0, 0, 0]) == text
  with pytest.raises(ValueError, match="unknown"):
    tokenize("[MAX 1 12 ]")
  with pytest.raises(ValueError):
    evaluate("[MAX 1 2")
  with pytest.raises(ValueError):
    evaluate("[MAX 1 2 ] 3")


def _walk(text):
  """Independent of listops.parse: (tree depth counting digits as a level, list of argument counts)."""
  open_args, counts, depth = [], [], 0
  for tok in text.split():
    if tok.startswith("["):
      if open_args:
        open_args[-1] += 1
      open_args.append(0)
      depth = max(depth, len(open_args))
    elif tok == "]":
      counts.append(open_args.pop())
    else:
      open_args[-1] += 1
      depth = max(depth, len(open_args) + 1)
  assert not open_args
  return depth, counts


@pytest.mark.parametrize("min_length,max_length,max_depth,max_args", [
    (100, 200, 10, 10),
    (5, 40, 3, 5),
    (500, 2000, 10, 10),
])
def test_listops_generated_examples(min_length, max_length, max_depth, max_args):
  n = 24 if max_length > 1000 else 64
  data = generate_listops(n, seed=3, min_length=min_length, max_length=max_length,
                          max_depth=max_depth, max_args=max_args)
  tokens, lengths, labels = data["tokens"], data["lengths"], data["labels"]
  assert tokens.shape == (n, max_length) and tokens.dtype == np.int32
  assert lengths.dtype == np.int32 and labels.dtype == np.int32
  assert np.all((lengths >= min_length) & (lengths <= max_length))
  assert np.all((labels >= 0) & (labels <= 9))
  depths = []
  for row, length, label in zip(tokens, lengths, labels):
    assert np.all(row[:length] != 0) and np.all(row[length:] == 0)
    text = detokenize(row)
    assert tokenize(text) == row[:length].tolist()
    assert evaluate(text) == label
    depth, counts = _walk(text)
    assert depth <= max_depth
    assert min(counts) >= 2 and max(counts) <= max_args
    depths.append(depth)
  if max_depth == 3:
    assert max(depths) == 3  # the depth limit binds and is reached


def test_listops_deterministic_per_seed():
  a = generate_listops(16, seed=7, min_length=50, max_length=120)
  b = generate_listops(16, seed=7, min_length=50, max_length=120)
  c = generate_listops(16, seed=8, min_length=50, max_length=120)
  for k in ("tokens", "lengths", "labels"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["tokens"], c["tokens"])


@pytest.mark.parametrize("kwargs", [
    dict(min_length=300, max_length=200),
    dict(min_length=1, max_length=3),
    dict(max_args=1),
    dict(max_depth=1),
    dict(min_length=5, max_length=10, max_depth=2, max_args=2),  # longest tree is 4 tokens
])
def test_listops_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    generate_listops(4, seed=0, **kwargs)


# ---------------------------------------------------------------- MQAR

MQAR_CONFIGS = [
    dict(seq_len=64, num_kv_pairs=4, vocab_size=64),
    dict(seq_len=33, num_kv_pairs=8, vocab_size=20),  # odd length, tight vocab (9 keys for 8 pairs)
    dict(seq_len=32, num_kv_pairs=8, vocab_size=128),  # no spare slot: 2P + 2Q == T
    dict(seq_len=128, num_kv_pairs=16, vocab_size=256, num_queries=5, power_a=1.0),
]


@pytest.mark.parametrize("cfg", MQAR_CONFIGS)
def test_mqar_solvable_by_brute_force(cfg):
  n = 32
  data = generate_mqar(n, seed=1, **cfg)
  inputs, targets, weights = data["inputs"], data["targets"], data["weights"]
  T, P, V = cfg["seq_len"], cfg["num_kv_pairs"], cfg["vocab_size"]
  Q = cfg.get("num_queries", P)
  assert inputs.shape == targets.shape == weights.shape == (n, T)
  assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
  assert np.all((inputs >= 1) & (inputs < V))
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  assert set(np.unique(weights)) <= {0.0, 1.0}
  np.testing.assert_array_equal(weights.sum(1), np.full(n, Q))
  for b in range(n):
    keys, values = inputs[b, 0:2 * P:2], inputs[b, 1:2 * P:2]
    assert len(set(keys.tolist())) == P
    assert np.all((keys >= 1) & (keys < V // 2)) and np.all(values >= V // 2)
    asked = []
    for t in np.flatnonzero(weights[b]):
      key = inputs[b, t]
      earlier = [j for j in range(t) if inputs[b, j] == key]
      assert len(earlier) == 1, (b, t, earlier)
      assert inputs[b, earlier[0] + 1] == targets[b, t]
      assert earlier[0] < 2 * P <= t
      asked.append(key)
    assert len(set(asked)) == Q


def test_mqar_deterministic_and_seeded():
  cfg = dict(seq_len=64, num_kv_pairs=8, vocab_size=512)
  a, b, c = (generate_mqar(8, seed=s, **cfg) for s in (5, 5, 6))
  for k in ("inputs", "targets", "weights"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_mqar_power_law_crowds_queries_early():
  cfg = dict(seq_len=256, num_kv_pairs=8, vocab_size=512)
  mean_pos = {}
  for power_a in (0.01, 1.0):
    w = generate_mqar(200, seed=0, power_a=power_a, **cfg)["weights"]
    mean_pos[power_a] = np.mean(np.nonzero(w)[1])
  # Uniform slots over 16..254 average ~135; the power law pulls the queries well before that.
  assert mean_pos[0.01] < mean_pos[1.0] - 30


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=15, num_kv_pairs=4, vocab_size=64), "seq_len"),
    (dict(seq_len=64, num_kv_pairs=8, vocab_size=16), "vocab_size"),
    (dict(seq_len=64, num_kv_pairs=4, vocab_size=64, num_queries=5), "num_queries"),
    (dict(seq_len=64, num_kv_pairs=0, vocab_size=64), "num_kv_pairs"),
])
def test_mqar_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    generate_mqar(2, seed=0, **kwargs)

