"""Byte-level corpus loading, deterministic split and packing with segment ids."""

import numpy as np
import pytest

from efficient_attn.data.text import (DataError, PackedStream, lm_example, load_documents, split_documents,
                                      stdlib_files)


@pytest.fixture(scope="module")
def stdlib_docs():
  return load_documents("stdlib")


def test_default_corpus_is_the_stdlib_source(stdlib_docs):
  files = stdlib_files()
  assert len(stdlib_docs) == len(files) > 50
  with open(files[0], encoding="utf-8") as f:
    assert f.read() in stdlib_docs


def test_split_is_deterministic_and_disjoint(stdlib_docs):
  train, val = split_documents(stdlib_docs, 0.1)
  train2, val2 = split_documents(list(reversed(stdlib_docs)), 0.1)
  assert set(train) == set(train2) and set(val) == set(val2)
  assert not set(train) & set(val) and 0 < len(val) < len(train)


def test_packing_keeps_documents_apart():
  docs = [b"aaaa", b"bbbbbbb", b"cc", b"ddddddddd"]
  s = PackedStream(docs, seq_len=5, batch_size=2, seed=3)
  b = s.batch(0)
  assert b["tokens"].shape == b["segment_ids"].shape == (2, 6)
  for row_tok, row_seg in zip(b["tokens"], b["segment_ids"]):
    assert row_seg[0] == 1 and np.all(np.diff(row_seg) >= 0)
    for seg in np.unique(row_seg):  # every segment holds bytes of a single document
      assert len(set(row_tok[row_seg == seg].tolist())) == 1
  ex = lm_example(b)
  np.testing.assert_array_equal(ex["inputs"], b["tokens"][:, :-1])
  np.testing.assert_array_equal(ex["targets"], b["tokens"][:, 1:])
  # A target is weighted only when input and target belong to the same document.
  same = ex["inputs"] == ex["targets"]
  np.testing.assert_array_equal(ex["weights"] == 1.0, same)


def test_packing_equals_joining_the_epochs_documents_in_order():
  """The stream against the plain definition: epoch e joins the documents in the order
  permutation(seed, e) and cuts consecutive rows of seq_len + 1; segment ids count document
  pieces from 1 in every row. Documents of uneven lengths, batches inside and across epochs."""
  docs = [bytes([65 + i % 26]) * (3 + (7 * i) % 11) for i in range(30)]
  s = PackedStream(docs, 6, 3, seed=4)
  L, per_epoch = 7, s.batches_per_epoch
  for i in (0, 1, per_epoch - 1, per_epoch, 2 * per_epoch + 2):
    epoch, j = divmod(i, per_epoch)
    order = np.random.default_rng([4, epoch]).permutation(len(docs))
    joined = b"".join(docs[d] for d in order)
    owner = np.concatenate([[k] * len(docs[d]) for k, d in enumerate(order)])
    rows = slice(j * 3 * L, (j + 1) * 3 * L)
    want = np.frombuffer(joined, np.uint8)[rows].reshape(3, L)
    doc = owner[rows].reshape(3, L)
    seg = np.cumsum(np.concatenate([np.ones((3, 1), int), (doc[:, 1:] != doc[:, :-1])], 1), 1)
    got = s.batch(i)
    np.testing.assert_array_equal(got["tokens"], want)
    np.testing.assert_array_equal(got["segment_ids"], seg)


def test_batches_are_a_pure_function_of_the_index():
  docs = [bytes([i]) * (10 + i) for i in range(20)]
  a, b = PackedStream(docs, 7, 3, seed=1), PackedStream(docs, 7, 3, seed=1)
  for i in [5, 0, 5, 2 * a.batches_per_epoch + 1]:
    np.testing.assert_array_equal(a.batch(i)["tokens"], b.batch(i)["tokens"])
  # Different epochs use different document orders.
  assert not np.array_equal(a.batch(0)["tokens"], a.batch(a.batches_per_epoch)["tokens"])


def test_local_text_and_json_files(tmp_path):
  (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
  (tmp_path / "b.txt").write_text("second\n")
  assert sorted(load_documents("text", str(tmp_path / "*.txt"))) == ["first document\nwith two lines\n", "second\n"]
  (tmp_path / "d.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n')
  assert load_documents("json", str(tmp_path / "d.jsonl"), text_field="body") == ["x y", "z"]


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "matches no file"),
    (lambda p: (p / "e.txt").write_text(""), "no non-empty document"),
    (lambda p: (p / "e.txt").write_bytes(b"\xff\xfe\xfa bad"), "not UTF-8"),
])
def test_bad_data_files_are_one_sentence(tmp_path, setup, match):
  setup(tmp_path)
  with pytest.raises(DataError, match=match):
    load_documents("text", str(tmp_path / "*.txt"))


def test_corpus_smaller_than_a_batch():
  with pytest.raises(DataError, match="fewer than one batch"):
    PackedStream([b"tiny"], seq_len=64, batch_size=2)


def test_process_shards_tile_the_global_batch():
  docs = [bytes([i]) * (30 + i) for i in range(40)]
  s = PackedStream(docs, 9, 4, seed=2)
  whole = s.batch(3)
  parts = [s.batch(3, p, 2) for p in range(2)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
