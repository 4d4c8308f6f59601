"""The token store: a corpus tokenized once into memory-mapped arrays, shared by every later run.

    DATA_CACHE/stores/KEY/        KEY = hash(source fingerprint, tokenizer, split settings)
      meta.json                   what was built, per split: documents, tokens, bytes of text
      train.bin  validation.bin   token ids, documents back to back (uint8 / uint16 / uint32)
      train.idx  validation.idx   int64 document offsets [docs + 1] into the .bin
      token_bytes.npy             bytes of text per token id [V] (bits per byte)
    DATA_CACHE/tokenizers/        bpe:N / unigram:N tokenizers trained on a source's training split

`build.py` streams the source into it (a killed build leaves nothing that looks finished).
One process builds under a lock file; the others (and later runs) wait for it and map it.

`TokenStream` packs a split exactly as `text.PackedStream` packs a list of documents (same
per-epoch document order, same rows, same segment ids), reading through the memory map only
the rows a process feeds: RSS does not grow with the corpus's tokens (24 bytes per document remain:
lengths, the epoch's order and its cumulative ends).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from efficient_attn.data import build, sources, tokenizer as tokenizers_lib
from efficient_attn.data.text import TokenStream  # noqa: F401  (re-exported: the stream a Store opens)

FORMAT = build.FORMAT


def cache_root(d) -> str:
  """data.cache_dir, else $EFFICIENT_ATTN_DATA_CACHE, else ~/.cache/efficient_attn/data."""
  return os.path.expanduser(d.cache_dir or os.environ.get("EFFICIENT_ATTN_DATA_CACHE")
                            or os.path.join("~", ".cache", "efficient_attn", "data"))


def _key(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def _train_texts(source: sources.Source, d):
  """The training split's documents, one string at a time (the tokenizer trainer's input)."""
  settings = build.split_settings(d)
  for docs in build.chunks(source.documents("train", batch_size=32)):
    yield from (t for t in docs if not build.is_val(t, settings["val_fraction"]))


def get_tokenizer(d, source: sources.Source | None = None):
  """The tokenizer data.tokenizer names; bpe:N / unigram:N trained on the source's training split once."""
  kind, n = tokenizers_lib.parse_spec(d.tokenizer)
  if kind == "bytes":
    return tokenizers_lib.ByteTokenizer()
  if kind == "file":
    return tokenizers_lib.load_file(d.tokenizer)
  source = source or sources.resolve(d)
  path = os.path.join(cache_root(d), "tokenizers",
                      f"{kind}-{n}-{_key([FORMAT, source.fingerprint(), build.split_settings(d)])}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  while not os.path.isfile(path):  # one process trains; the others wait and read the same file
    lock = build.BuildLock(path + ".lock")
    if lock.acquire():
      try:
        if not os.path.isfile(path):
          build.say(f"training a {kind} tokenizer of {n} tokens on the training split of {build.what(source)}")
          tokenizers_lib.train_tokenizer(kind, n, _train_texts(source, d), path, d.tokenizer)
      finally:
        lock.release()
    else:
      time.sleep(0.5)
  tok = tokenizers_lib.load_file(path)
  tok.spec = d.tokenizer
  return tok


def vocab_size_of(d) -> int:
  """Tokens the model must embed for data.tokenizer, known without building anything: 256 for bytes,
  N for bpe:N / unigram:N (a small corpus may leave some unused), the file's size for a file."""
  kind, n = tokenizers_lib.parse_spec(d.tokenizer)
  return n if n is not None else tokenizers_lib.load_file(d.tokenizer).vocab_size


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

  def stream(self, split: str, seq_len: int, batch_size: int, seed: int) -> "TokenStream":
    return TokenStream(*self.arrays(split), seq_len=seq_len, batch_size=batch_size, seed=seed)


def open_store(d, *, progress: bool | None = None) -> Store:
  """The token store of DataConfig `d`, built (and its tokenizer trained) on first use."""
  source = sources.resolve(d)
  tok = get_tokenizer(d, source)
  root = os.path.join(cache_root(d), "stores")
  key = _key([FORMAT, source.fingerprint(), tok.fingerprint, build.split_settings(d)])
  path = os.path.join(root, key)
  os.makedirs(root, exist_ok=True)
  while not os.path.isfile(os.path.join(path, "meta.json")):
    lock = build.BuildLock(path + ".lock")
    if lock.acquire():
      try:
        if not os.path.isfile(os.path.join(path, "meta.json")):
          build.build(source, tok, d, path, progress)
      finally:
        lock.release()
    else:
      time.sleep(0.5)  # another process is building this store
  with open(os.path.join(path, "meta.json")) as f:
    return Store(path, json.load(f))


def resolve_vocab(cfg):
  """`cfg` with model.vocab_size following data.tokenizer when left at its default (256); a smaller
  explicit size than the tokenizer's is a ConfigError naming both (checked before anything compiles)."""
  from efficient_attn.config import ConfigError, ModelConfig

  m, d = cfg.model, cfg.data
  if d.tokenizer == "bytes":
    return cfg
  n = vocab_size_of(d)
  if m.vocab_size == ModelConfig.vocab_size:
    return dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=n))
  if m.vocab_size < n:
    raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the {n} tokens of"
                      f" data.tokenizer={d.tokenizer!r}; use at least {n} (or leave model.vocab_size unset).")
  return cfg
