"""Language-model data: one straight pipeline, `pipeline`, from the data settings to packed batches.

Each module uses only those listed above it:

    text.py        base: DataError, the packing (`TokenStream`, `PackedStream`), `lm_example`
    cache.py       base: where the data cache lives, its keys, the lock under which one process makes an entry
    sources.py     1. data.name / data.files -> a `Source`: documents streamed, each in train or validation
    tokenizer.py   2. data.tokenizer -> a tokenizer (bpe:N / unigram:N trained on the source's training split once)
    build.py       3. source + tokenizer -> the token store's files (worker processes for many files)
    store.py       4. the token store: keyed by source and tokenizer, built once, memory-mapped -> streams

`listops.py` and `mqar.py` are synthetic tasks of their own (they need none of the above but `text`).
The data package imports nothing above it (no config, trainer or CLI): settings come in duck-typed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from efficient_attn.data.text import TokenStream

if TYPE_CHECKING:
  from efficient_attn.data.store import Store
  from efficient_attn.data.tokenizer import ByteTokenizer, HFTokenizer


@dataclasses.dataclass(frozen=True)
class Batches:
  """What `pipeline` hands `train` and `eval`."""
  train: TokenStream
  validation: TokenStream | None            # seeded seed + 1; None when the split is empty
  token_bytes: np.ndarray                   # bytes of text per token id [V]: validation's bits per byte
  tokenizer: ByteTokenizer | HFTokenizer
  store: Store


def pipeline(d, *, seq_len: int, batch_size: int, seed: int, progress: bool | None = None) -> Batches:
  """The packed batches of DataConfig `d` (any object with its fields): rows of `seq_len + 1` tokens,
  `batch_size` rows a batch, shuffled per epoch by `seed` (validation by `seed + 1`). The store is built
  (and a bpe:N / unigram:N tokenizer trained) on first use, then mapped; DataError, one sentence, for bad data.

  progress: a tqdm bar while building (default: when stderr is a terminal)."""
  # Imported here, not at the top: `python -m efficient_attn.data.build` (a tokenizing worker) imports this
  # package first, and build.py must not be in sys.modules before it runs as __main__.
  from efficient_attn.data import sources, store, tokenizer

  source = sources.resolve(d)                                           # 1. what to read
  tok = tokenizer.get_tokenizer(d, source)                              # 2. how to cut it into tokens
  tokens = store.open_store(d, source, tok, progress=progress)          # 3. + 4. tokenized once, mapped
  train = tokens.stream("train", seq_len, batch_size, seed)
  val = tokens.stream("validation", seq_len, batch_size, seed + 1) if tokens.has("validation") else None
  return Batches(train, val, tokens.token_bytes(), tok, tokens)
