"""Step 2 of the data pipeline (`efficient_attn.data.pipeline`): the tokenizer `data.tokenizer` names,
given the source of step 1 (a trained one learns from its training split).

`data.tokenizer` takes
    bytes            UTF-8 bytes, V = 256 (the default; document boundaries live in segment_ids)
    PATH             a Hugging Face `tokenizers` file (tokenizer.json) or a directory holding one
                     (what `save_pretrained` writes)
    bpe:N | unigram:N   a byte-level BPE / Unigram tokenizer of N tokens trained with the `tokenizers`
                     library on the training split (offline, in seconds for small corpora), saved in
                     the data cache and reused

Every tokenizer knows, per token id, how many bytes of text it stands for (`token_bytes` [V]),
so validation reports bits per byte (total nats / total bytes / ln 2) that compare across
tokenizers.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from efficient_attn.data import cache, sources
from efficient_attn.data.text import DataError

BYTES_VOCAB = 256
MIN_TRAINED_VOCAB = 260  # the 256 byte-level symbols plus a few merges
_TRAINED = re.compile(r"^(bpe|unigram):(\d+)$")


def parse_spec(spec: str) -> tuple[str, int | None]:
  """'bytes' -> ('bytes', 256); 'bpe:8192' -> ('bpe', 8192); anything else -> ('file', None)."""
  if spec == "bytes":
    return "bytes", BYTES_VOCAB
  m = _TRAINED.match(spec)
  if m:
    return m.group(1), int(m.group(2))
  return "file", None


def check_spec(spec: str) -> str | None:
  """One sentence if `data.tokenizer` is malformed (before anything loads), else None."""
  if not isinstance(spec, str) or not spec:
    return f"data.tokenizer={spec!r} must be bytes, bpe:N, unigram:N or the path of a tokenizer.json."
  kind, n = parse_spec(spec)
  if kind in ("bpe", "unigram") and n < MIN_TRAINED_VOCAB:
    return (f"data.tokenizer={spec!r}: a trained vocabulary needs at least {MIN_TRAINED_VOCAB} tokens"
            f" (the 256 byte symbols plus merges); use e.g. {kind}:8192.")
  if kind == "file" and re.match(r"^\w+:", spec) and not os.path.exists(os.path.expanduser(spec)):
    return f"data.tokenizer={spec!r} is not bytes, bpe:N or unigram:N, nor an existing tokenizer file."
  return None


def _byte_chars() -> dict[str, int]:
  """The byte-level alphabet (GPT-2's): printable bytes stand for themselves, the others are shifted
  past U+0100, so every byte is one visible character. Returns {char: byte}."""
  keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  chars, shift = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + shift)] = b
      shift += 1
  return chars


class ByteTokenizer:
  """UTF-8 bytes: token id = byte value."""

  spec = "bytes"
  vocab_size = BYTES_VOCAB
  fingerprint = "bytes"

  def encode_batch(self, texts: list[str], raw: list[bytes] | None = None) -> list[np.ndarray]:
    """Token ids of each text (`raw`: their UTF-8 bytes, when the caller has them)."""
    return [np.frombuffer(r, np.uint8) for r in (raw or [t.encode("utf-8") for t in texts])]

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")

  def token_bytes(self) -> np.ndarray:
    return np.ones(BYTES_VOCAB, np.float32)


class HFTokenizer:
  """A `tokenizers.Tokenizer`; `spec` is what data.tokenizer said, `fingerprint` a hash of its JSON."""

  def __init__(self, tok, spec: str):
    self.tok, self.spec = tok, spec
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.fingerprint = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]

  def encode_batch(self, texts: list[str], raw: list[bytes] | None = None) -> list[np.ndarray]:
    # encode_batch runs in parallel threads inside the Rust library.
    return [np.asarray(e.ids, np.uint32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    """Bytes of text per token id [V]: exact for byte-level vocabularies (ours, GPT-2's); for
    SentencePiece-style ones '▁' counts as a space and <0xNN> as one byte; special tokens 0."""
    chars = _byte_chars()
    special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(self.vocab_size, np.float32)
    for token, i in self.tok.get_vocab(with_added_tokens=True).items():
      if token in special:
        continue
      if all(c in chars for c in token):
        out[i] = len(token)
      elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        out[i] = 1
      else:
        out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return out


def load_file(spec: str) -> HFTokenizer:
  """The tokenizer at `spec`: a tokenizer.json, or a directory holding one."""
  from tokenizers import Tokenizer

  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise DataError(f"data.tokenizer={spec!r}: no tokenizer file at {path}; give a tokenizer.json, a directory"
                    " holding one, bytes, bpe:N or unigram:N.")
  try:
    return HFTokenizer(Tokenizer.from_file(path), spec)
  except Exception as e:  # the Rust library raises its own Exception type for a malformed file
    raise DataError(f"data.tokenizer={spec!r}: {path} is not a readable tokenizers file ({e}).") from None


def train_tokenizer(kind: str, vocab_size: int, texts, path: str, spec: str) -> HFTokenizer:
  """Trains a byte-level `kind` ("bpe" | "unigram") tokenizer of `vocab_size` on the iterable of
  strings `texts` and saves it to `path` atomically (a killed run leaves no half-written file)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if kind == "bpe":
    tok = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
  else:
    tok = Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, unk_token="<unk>",
                                      special_tokens=["<unk>"], show_progress=False)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainer=trainer)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)
  return HFTokenizer(tok, spec)


def get_tokenizer(d, source: sources.Source | None = None):
  """The tokenizer DataConfig `d` names; bpe:N / unigram:N trained on the training split of `source`
  (default: the one `d` names) once, kept in the data cache and loaded from there afterwards."""
  kind, n = parse_spec(d.tokenizer)
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "file":
    return load_file(d.tokenizer)
  source = source or sources.resolve(d)
  settings = sources.split_settings(d)
  path = os.path.join(cache.cache_root(d), "tokenizers",
                      f"{kind}-{n}-{cache.key([cache.FORMAT, source.fingerprint(), settings])}.json")

  def train():
    cache.say(f"training a {kind} tokenizer of {n} tokens on the training split of {sources.what(source)}")
    train_tokenizer(kind, n, _train_texts(source, settings["val_fraction"]), path, d.tokenizer)

  cache.once(path, path + ".lock", train)  # one process trains; the others wait and read the same file
  tok = load_file(path)
  tok.spec = d.tokenizer
  return tok


def _train_texts(source: sources.Source, val_fraction: float):
  """The training split's documents, one string at a time (the tokenizer trainer's input)."""
  for docs in sources.chunks(source.documents("train", batch_size=32)):
    yield from (t for t in docs if not sources.is_val(t, val_fraction))


def vocab_size_of(spec: str) -> int:
  """Tokens the model must embed for data.tokenizer=`spec`, known without building anything: 256 for bytes,
  N for bpe:N / unigram:N (a small corpus may leave some unused), the file's size for a file."""
  kind, n = parse_spec(spec)
  return n if n is not None else load_file(spec).vocab_size
