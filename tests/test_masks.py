"""Layout builders of efficient_attn.attention.masks, checked against their definitions by hand."""

import numpy as np
import pytest

from efficient_attn.attention import masks


def _brute(nq, nk, rule):
  return np.array([[bool(rule(i, j)) for j in range(nk)] for i in range(nq)])


def test_local_layout_hand_cases():
  expected_causal = np.array([[1, 0, 0, 0],
                              [1, 1, 0, 0],
                              [0, 1, 1, 0],
                              [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(masks.local_layout(4, 4, window=2, causal=True), expected_causal)
  expected = np.array([[1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [0, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(masks.local_layout(3, 5, window=2), expected)
  assert masks.local_layout(3, 5, window=2).dtype == bool


def test_strided_layout_strided_mode():
  got = masks.strided_layout(7, 7, stride=3, mode="strided", causal=True)
  np.testing.assert_array_equal(got, _brute(7, 7, lambda i, j: j <= i and (i - j < 3 or (i - j) % 3 == 0)))
  # Row 6: the band {4, 5, 6} and distances 3, 6 -> blocks 3, 0.
  np.testing.assert_array_equal(np.flatnonzero(got[6]), [0, 3, 4, 5, 6])
  both = masks.strided_layout(7, 7, stride=3, mode="strided", causal=False)
  np.testing.assert_array_equal(np.flatnonzero(both[1]), [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(np.flatnonzero(both[0]), [0, 1, 2, 3, 6])


def test_strided_layout_fixed_mode():
  got = masks.strided_layout(6, 6, stride=3, mode="fixed", causal=True)
  expected = np.array([[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],   # segment {3, 4, 5} + summary block 2 of segment {0, 1, 2}
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(got, expected)
  two = masks.strided_layout(8, 8, stride=4, mode="fixed", causal=False, num_summary=2)
  np.testing.assert_array_equal(np.flatnonzero(two[0]), [0, 1, 2, 3, 6, 7])
  np.testing.assert_array_equal(np.flatnonzero(two[5]), [2, 3, 4, 5, 6, 7])


def test_strided_layout_split_heads_is_the_two_factors():
  split = masks.strided_layout(9, 9, stride=3, mode="strided", split_heads=True)
  assert split.shape == (2, 9, 9)
  np.testing.assert_array_equal(split[0], _brute(9, 9, lambda i, j: 0 <= i - j < 3))
  np.testing.assert_array_equal(split[1], _brute(9, 9, lambda i, j: j <= i and (i - j) % 3 == 0))
  np.testing.assert_array_equal(split[0] | split[1], masks.strided_layout(9, 9, stride=3))


def test_bigbird_layout_structure():
  nq, window, g, r = 12, 3, 2, 2
  lay = masks.bigbird_layout(nq, nq, window=window, num_global=g, num_random=r, seed=0)
  assert lay.dtype == bool and lay.shape == (nq, nq)
  assert lay[:g].all() and lay[:, :g].all()
  for i in range(nq):
    for j in (i - 1, i, i + 1):
      if 0 <= j < nq:
        assert lay[i, j]
  fixed = _brute(nq, nq, lambda i, j: abs(i - j) <= 1 or i < g or j < g)
  extra = (lay & ~fixed).sum(-1)
  np.testing.assert_array_equal(extra[g:], r)  # Room everywhere here: exactly num_random per row.
  np.testing.assert_array_equal(extra[:g], 0)


def test_bigbird_layout_seed_heads_and_room():
  kw = dict(window=3, num_global=1, num_random=3, seed=7)
  np.testing.assert_array_equal(masks.bigbird_layout(16, 16, **kw), masks.bigbird_layout(16, 16, **kw))
  others = [masks.bigbird_layout(16, 16, **{**kw, "seed": s}) for s in range(8, 12)]
  assert any((o != masks.bigbird_layout(16, 16, **kw)).any() for o in others)
  heads = masks.bigbird_layout(16, 16, **kw, num_heads=4)
  assert heads.shape == (4, 16, 16) and any((heads[0] != heads[h]).any() for h in range(1, 4))
  # 5 blocks, window 3 and 1 global leave rows 1..4 with 1 or 2 free blocks: all taken.
  small = masks.bigbird_layout(5, 5, window=3, num_global=1, num_random=4, seed=0)
  assert small.all()


def test_bigbird_layout_causal():
  lay = masks.bigbird_layout(10, 10, window=5, num_global=1, num_random=2, seed=3, causal=True)
  assert not np.triu(lay, 1).any()
  assert lay[:, 0].all() and lay[0, 0] and not lay[0, 1:].any()
  fixed = _brute(10, 10, lambda i, j: j <= i and (i - j <= 2 or j < 1))
  assert (lay >= fixed).all()
  room = (~fixed & np.tri(10, dtype=bool)).sum(-1)
  np.testing.assert_array_equal((lay & ~fixed).sum(-1)[1:], np.minimum(2, room)[1:])


def test_layout_to_mask():
  lay = np.array([[1, 0], [1, 1]], bool)
  got = masks.layout_to_mask(lay, 3)
  assert got.shape == (6, 6) and got.dtype == bool
  np.testing.assert_array_equal(got, np.kron(lay, np.ones((3, 3), bool)))
  per_head = masks.layout_to_mask(np.stack([lay, ~lay]), 2)
  assert per_head.shape == (2, 4, 4)
  np.testing.assert_array_equal(per_head[1], ~masks.layout_to_mask(lay, 2))


@pytest.mark.parametrize("call, match", [
    (lambda: masks.local_layout(4, 4, window=0), "window"),
    (lambda: masks.local_layout(0, 4, window=1), "num_q_blocks"),
    (lambda: masks.strided_layout(4, 4, stride=2, mode="dense"), "mode"),
    (lambda: masks.strided_layout(4, 4, stride=0), "stride"),
    (lambda: masks.strided_layout(4, 4, stride=2, mode="fixed", num_summary=3), "num_summary"),
    (lambda: masks.bigbird_layout(4, 4, window=3, num_global=-1, num_random=1, seed=0), "num_global"),
    (lambda: masks.bigbird_layout(4, 4, window=3, num_global=1, num_random=1.5, seed=0), "num_random"),
    (lambda: masks.layout_to_mask(np.ones((2, 2), bool), 0), "block_size"),
    (lambda: masks.layout_to_mask(np.ones(4, bool), 2), "layout"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
