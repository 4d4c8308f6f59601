"""The base of the data pipeline (`efficient_attn.data.pipeline`): documents -> packed rows with segment ids.

The default corpus is the Python standard library's own source (top-level `.py`
files of `sysconfig`'s stdlib directory), always on disk, loaded through
`datasets` like any other text corpus. Documents are split into train /
validation deterministically (by a CRC of their content), shuffled per epoch
with a seed, concatenated, and cut into rows of `seq_len + 1` bytes. A document
that does not fit continues in the next row as a new segment.

Each row carries `segment_ids` (1, 2, ... per document piece; 0 = padding) so
attention never crosses a document boundary, and the loss never asks a token
to predict the first byte of the next document.

Batch i of the stream is a pure function of (seed, i): the iterator position
saved in a checkpoint is one integer, and resuming reproduces the same batches.

One packing core, `TokenStream` (documents laid end to end in a token array + offsets), serves both
a memory-mapped token store split (`store.Store.stream`, any tokenizer and source: what `train` and
`eval` read) and in-memory byte documents (`PackedStream`). `load_documents` / `split_documents` are
the in-memory form of the pipeline's first steps, the reference the store is tested against.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib

import numpy as np

VOCAB_SIZE = 256  # bytes; document boundaries live in segment_ids, not in a separator token


class DataError(ValueError):
  """A user-facing data problem (missing / empty / undecodable files): one sentence."""


def stdlib_files() -> list[str]:
  """Top-level `.py` files of this interpreter's standard library, sorted."""
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  if not files:
    raise DataError(f"no .py files found in the standard library directory {sysconfig.get_paths()['stdlib']}.")
  return files


def _resolve_files(pattern: str) -> list[str]:
  files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
  if not files:
    raise DataError(f"data.files={pattern!r} matches no file; give a path or glob of local text/json files.")
  return files


def load_documents(name: str = "stdlib", files: str | None = None, text_field: str = "text") -> list[str]:
  """Loads documents (one string each) through `datasets`.

  name: "stdlib" (default corpus), "text" (local text files, one document per
  file, `files` is a path or glob), "json" (local JSON lines, `text_field` per
  record), or a Hugging Face dataset name (needs the network; remote code is
  never run).
  """
  import datasets

  datasets.disable_progress_bars()
  if name in ("stdlib", "text"):
    paths = stdlib_files() if name == "stdlib" else _resolve_files(files or "")
    try:
      ds = datasets.load_dataset("text", data_files={"train": paths}, sample_by="document", split="train")
    except Exception as e:  # datasets wraps decoding errors in DatasetGenerationError
      cause = e
      while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
      if cause is None:
        raise
      raise DataError(f"data.files={files!r} contains a file that is not UTF-8 text ({cause.reason} at byte"
                      f" {cause.start}); convert it or remove it from the glob.") from None
  elif name == "json":
    ds = datasets.load_dataset("json", data_files={"train": _resolve_files(files or "")}, split="train")
  else:
    try:
      ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, gated...: one sentence for the user
      raise DataError(f"data.name={name!r} could not be loaded from the Hugging Face hub ({type(e).__name__});"
                      " use 'stdlib', or 'text' / 'json' with data.files.") from None
  if text_field not in ds.column_names:
    raise DataError(f"data.text_field={text_field!r} is not a column of {name!r}; columns are {ds.column_names}.")
  docs = [t for t in ds[text_field] if t]
  if not docs:
    raise DataError(f"data.name={name!r} (files={files!r}) holds no non-empty document.")
  return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[bytes], list[bytes]]:
  """Deterministic split by content CRC: adding a file never moves another between splits."""
  train, val = [], []
  for d in docs:
    b = d.encode("utf-8")
    (val if zlib.crc32(b) % 10_000 < val_fraction * 10_000 else train).append(b)
  if not train or (val_fraction > 0 and not val):
    train, val = (docs_b := [d.encode("utf-8") for d in docs]), docs_b[-1:]  # tiny corpora: reuse one doc
  return train, val


class TokenStream:
  """Packed rows of `seq_len + 1` tokens from documents laid end to end in one token array
  (a memory-mapped store split, `store.Store.stream`, or in-memory bytes, `PackedStream`).

  tokens [total] (any integer dtype), offsets [num_docs + 1]: document d is tokens[offsets[d]:offsets[d + 1]].
  `batch(i)` returns global batch i: tokens [B, seq_len + 1] int32, segment_ids [B, seq_len + 1] int32.
  Epoch e uses a document order permuted by (seed, e); batches never straddle epochs. Per epoch only the
  order and its cumulative ends are held (~16 bytes per document); a batch copies just its rows.
  """

  unit = "tokens"  # how the refusal of a too-small corpus counts it

  def __init__(self, tokens: np.ndarray, offsets: np.ndarray, *, seq_len: int, batch_size: int, seed: int = 0):
    self.tokens, self.offsets = tokens, offsets
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.lengths = np.diff(np.asarray(offsets))
    total = int(offsets[-1]) if len(offsets) else 0
    self.rows_per_epoch = total // (seq_len + 1)
    self.batches_per_epoch = self.rows_per_epoch // batch_size
    if self.batches_per_epoch < 1:
      raise DataError(f"the corpus has {total} {self.unit}, fewer than one batch of {batch_size} x"
                      f" {seq_len + 1}; lower train.batch_size or train.seq_len, or add data.")
    self._epoch, self._cache = None, None

  def _epoch_arrays(self, epoch: int):
    if self._epoch != epoch:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
      self._epoch, self._cache = epoch, (order, np.cumsum(self.lengths[order]))
    return self._cache

  def batch(self, i: int, shard: int = 0, num_shards: int = 1) -> dict[str, np.ndarray]:
    """Global batch i, or its contiguous block of rows `shard` of `num_shards` (one per process)."""
    epoch, j = divmod(i, self.batches_per_epoch)
    order, ends = self._epoch_arrays(epoch)
    L, rows = self.seq_len + 1, self.batch_size // num_shards
    start = (j * self.batch_size + shard * rows) * L
    stop = start + rows * L
    tok, doc = np.empty(rows * L, np.int32), np.empty(rows * L, np.int64)
    k, pos = int(np.searchsorted(ends, start, side="right")), start
    while pos < stop:  # copy the pieces of the documents that cover [start, stop)
      d = order[k]
      doc_start = int(ends[k]) - int(self.lengths[d])
      a, b = pos - doc_start, min(stop, int(ends[k])) - doc_start
      base = int(self.offsets[d])
      tok[pos - start:pos - start + b - a] = self.tokens[base + a:base + b]
      doc[pos - start:pos - start + b - a] = k
      pos, k = pos + b - a, k + 1
    tok, doc = tok.reshape(rows, L), doc.reshape(rows, L)
    seg = np.cumsum(np.concatenate([np.ones((rows, 1), np.int64), np.diff(doc, axis=1) != 0], 1), 1)
    return {"tokens": tok, "segment_ids": seg.astype(np.int32)}


class PackedStream(TokenStream):
  """`TokenStream` over a list of byte documents (tokens are bytes, V = 256): in memory, batch for batch
  what a byte-level store's stream yields. `PackedStream(docs, seq_len, batch_size, seed)`; joined once."""

  unit = "bytes"

  def __init__(self, docs: list[bytes], seq_len: int, batch_size: int, seed: int = 0):
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)])
    super().__init__(np.frombuffer(b"".join(docs), np.uint8), offsets, seq_len=seq_len, batch_size=batch_size,
                     seed=seed)


def lm_example(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Shifts a packed batch into inputs / targets / loss weights (all [B, seq_len]).

  A target counts only when it is in the same segment as its input, so no token
  is asked to predict the first byte of an unrelated document.
  """
  tok, seg = batch["tokens"], batch["segment_ids"]
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": seg[:, :-1],
          "weights": ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(np.float32)}
