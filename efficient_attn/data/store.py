"""Step 4 of the data pipeline (`efficient_attn.data.pipeline`): the token store, a corpus tokenized once
into memory-mapped arrays and shared by every later run.

    DATA_CACHE/stores/KEY/        KEY = hash(source fingerprint, tokenizer, split settings)
      meta.json                   what was built, per split: documents, tokens, bytes of text
      train.bin  validation.bin   token ids, documents back to back (uint8 / uint16 / uint32)
      train.idx  validation.idx   int64 document offsets [docs + 1] into the .bin
      token_bytes.npy             bytes of text per token id [V] (bits per byte)

`open_store` keys the store by the source of step 1 and the tokenizer of step 2; one process builds it
(step 3, `build.build`) under a lock file, the others (and later runs) wait for it and map it.

`TokenStream` packs a split exactly as `text.PackedStream` packs a list of documents (same
per-epoch document order, same rows, same segment ids), reading through the memory map only
the rows a process feeds: RSS does not grow with the corpus's tokens (24 bytes per document remain:
lengths, the epoch's order and its cumulative ends).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from efficient_attn.data import build, cache, sources
from efficient_attn.data.text import TokenStream


@dataclasses.dataclass
class Store:
  """A built token store (memory-mapped on demand)."""
  path: str
  meta: dict

  def has(self, split: str) -> bool:
    return self.meta["splits"].get(split, {}).get("docs", 0) > 0

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N], offsets [docs + 1]) of `split`, both memory-mapped read-only."""
    s = self.meta["splits"][split]
    tokens = np.memmap(os.path.join(self.path, f"{split}.bin"), np.dtype(self.meta["dtype"]), "r",
                       shape=(s["tokens"],)) if s["tokens"] else np.zeros(0, self.meta["dtype"])
    offsets = np.memmap(os.path.join(self.path, f"{split}.idx"), np.int64, "r", shape=(s["docs"] + 1,))
    return tokens, offsets

  def token_bytes(self) -> np.ndarray:
    return np.load(os.path.join(self.path, "token_bytes.npy"))

  def stream(self, split: str, seq_len: int, batch_size: int, seed: int) -> TokenStream:
    return TokenStream(*self.arrays(split), seq_len=seq_len, batch_size=batch_size, seed=seed)


def open_store(d, source: sources.Source, tok, *, progress: bool | None = None) -> Store:
  """The token store of DataConfig `d` with `source` and `tok` (steps 1 and 2), built on first use, then mapped."""
  key = cache.key([cache.FORMAT, source.fingerprint(), tok.fingerprint, sources.split_settings(d)])
  path = os.path.join(cache.cache_root(d), "stores", key)
  cache.once(os.path.join(path, "meta.json"), path + ".lock", lambda: build.build(source, tok, d, path, progress))
  with open(os.path.join(path, "meta.json")) as f:
    return Store(path, json.load(f))
