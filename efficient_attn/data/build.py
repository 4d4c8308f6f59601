"""Step 3 of the data pipeline (`efficient_attn.data.pipeline`): building a token store from the source
of step 1 and the tokenizer of step 2 (`store.open_store` calls it once, under the store's lock).
Stream documents, split, tokenize, append, rename into place:

    build(source, tokenizer, d, path)
      PATH.tmp-HOST-PID/            written here first; renamed to PATH when complete (atomic), so a
                                    killed build leaves no store (and its tmp dir is cleared next time)
        train.bin / .idx, validation.bin / .idx, token_bytes.npy, meta.json

Documents stream from the source in chunks of a few MB (memory stays flat whatever the corpus or
document sizes), go to train or validation by a CRC of their bytes (`sources.is_val`; or
come from data.validation_split), and are tokenized a chunk at a time (`tokenizers` encodes a batch
in parallel threads). With data.num_proc > 1 and several local files, contiguous groups of files are tokenized
by worker processes (fresh interpreters, never forks of this one: JAX's threads and fork do not mix),
each writing its own part, and the parts are concatenated in file order: the store is the same
whatever num_proc.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import socket
import sys
import time

import numpy as np

from efficient_attn.data import cache, sources
from efficient_attn.data.text import DataError

SPLITS = ("train", "validation")


def dtype_for(vocab_size: int):
  return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


class SplitWriter:
  """Appends documents' tokens to DIR/NAME.bin and their end offsets to DIR/NAME.idx (int64, from 0)."""

  def __init__(self, directory: str, name: str, dtype):
    self.dtype = dtype
    self.bin = open(os.path.join(directory, f"{name}.bin"), "wb", buffering=1 << 22)
    self.idx = open(os.path.join(directory, f"{name}.idx"), "wb", buffering=1 << 20)
    self.idx.write(np.zeros(1, np.int64).tobytes())
    self.docs = self.tokens = self.bytes = 0

  def add(self, ids_list: list[np.ndarray], nbytes: list[int]) -> None:
    kept = [(ids, b) for ids, b in zip(ids_list, nbytes) if len(ids)]
    if not kept:
      return
    lengths = np.fromiter((len(ids) for ids, _ in kept), np.int64, len(kept))
    self.bin.write(np.concatenate([ids for ids, _ in kept]).astype(self.dtype, copy=False).tobytes())
    self.idx.write((self.tokens + np.cumsum(lengths)).tobytes())
    self.docs, self.tokens = self.docs + len(kept), self.tokens + int(lengths.sum())
    self.bytes += sum(b for _, b in kept)

  def close(self) -> dict:
    self.bin.close()
    self.idx.close()
    return {"docs": self.docs, "tokens": self.tokens, "bytes": self.bytes}


def _tokenize_into(writers: dict, batches, tok, val_fraction: float, bar=None):
  """Tokenizes document batches into the train / validation writers; returns the last document's
  (ids, bytes) or None."""
  last = None
  for docs in sources.chunks(batches):
    raw = [t.encode("utf-8") for t in docs]
    ids, nbytes = tok.encode_batch(docs, raw), [len(r) for r in raw]
    val = [sources.is_val(r, val_fraction) for r in raw]
    for s, want in (("train", False), ("validation", True)):
      writers[s].add([x for x, v in zip(ids, val) if v == want], [b for b, v in zip(nbytes, val) if v == want])
    last = (ids[-1], nbytes[-1])
    if bar is not None:
      bar.update(sum(nbytes))
  return last


def build(source: sources.Source, tok, d, path: str, progress: bool | None) -> None:
  """Tokenizes `source` into a temporary directory and renames it to `path` once complete."""
  from tqdm.auto import tqdm

  host = socket.gethostname()
  for old in glob.glob(f"{glob.escape(path)}.tmp-{glob.escape(host)}-*"):  # builds killed on this host
    pid = old.rsplit("-", 1)[-1]
    if pid.isdigit() and not cache.alive(int(pid)):
      shutil.rmtree(old, ignore_errors=True)
  tmp = f"{path}.tmp-{host}-{os.getpid()}"
  os.makedirs(tmp)
  t0 = time.perf_counter()
  dtype, settings = dtype_for(tok.vocab_size), sources.split_settings(d)
  progress = sys.stderr.isatty() if progress is None else progress
  num_proc = min(getattr(d, "num_proc", 1), len(source.files))
  parallel = num_proc > 1 and source.kind == "files" and not settings["validation_split"]
  # Announced unless the source is known to be small (under 1 MB builds in well under a second): a bad
  # small input then reads as the one sentence that refuses it.
  loud = source.total_bytes is None or source.total_bytes >= 1_000_000
  if loud:
    cache.say(f"building the token store of {sources.what(source)} with data.tokenizer={d.tokenizer}"
        f"{f' (num_proc={num_proc})' if parallel else ''} in {path}")
  bar = tqdm(total=source.total_bytes if source.builder == "text" else None, unit="B", unit_scale=True,
             desc="tokenizing", disable=not progress or parallel, file=sys.stderr)
  try:
    if parallel:
      stats, last = _build_parallel(source, tok, tmp, dtype, settings["val_fraction"], num_proc, progress)
    else:
      writers = {s: SplitWriter(tmp, s, dtype) for s in SPLITS}
      last = _tokenize_into(writers, source.documents("train", batch_size=32), tok, settings["val_fraction"], bar)
      if settings["validation_split"]:
        for docs in sources.chunks(source.documents("validation", batch_size=32)):
          writers["validation"].add(tok.encode_batch(docs), [len(t.encode("utf-8")) for t in docs])
      stats = {s: w.close() for s, w in writers.items()}
    if last is None:
      raise DataError(f"data.name={d.name!r} (files={d.files!r}) holds no non-empty document.")
    stats = _tiny_corpus_fallback(tmp, stats, last, settings, dtype)
    np.save(os.path.join(tmp, "token_bytes.npy"), tok.token_bytes())
    meta = {"format": cache.FORMAT, "source": source.fingerprint(), "tokenizer": d.tokenizer,
            "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "split": settings, "splits": stats, "build_s": time.perf_counter() - t0}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
    os.rename(tmp, path)  # atomic: the store appears complete or not at all
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    bar.close()
  gb = (stats["train"]["bytes"] + stats["validation"]["bytes"]) / 1e9
  rate = f", {meta['build_s'] / gb:.0f} s/GB" if gb >= 0.01 else ""
  if loud:
    cache.say(f"built the token store in {meta['build_s']:.1f} s ({stats['train']['tokens']} train tokens,"
        f" {stats['validation']['tokens']} validation tokens{rate})")


def _build_parallel(source, tok, tmp: str, dtype, val_fraction: float, num_proc: int, progress: bool):
  """Tokenizes contiguous groups of files in up to `num_proc` worker processes, each writing its own
  part (named by its first file's index); the parts are concatenated in file order.

  The workers are fresh interpreters (`python -m efficient_attn.data.build PARTS NAME...`), never forks:
  this process may already run JAX's threads, and a fork of a multithreaded process can deadlock. They
  read the job (source, tokenizer, dtype, split) from PARTS/job.pkl and each group's files from
  NAME.files.json.
  """
  import pickle
  import subprocess

  from tqdm.auto import tqdm

  parts = os.path.join(tmp, "parts")
  os.makedirs(parts)
  with open(os.path.join(parts, "job.pkl"), "wb") as f:
    pickle.dump({"source": source, "tok": tok, "dtype": np.dtype(dtype).str, "val_fraction": val_fraction}, f)
  group = max(1, math.ceil(len(source.files) / (4 * num_proc)))  # a few groups per worker: balance
  names = []
  for start in range(0, len(source.files), group):
    names.append(f"{start:09d}")
    with open(os.path.join(parts, f"{names[-1]}.files.json"), "w") as f:
      json.dump(source.files[start:start + group], f)
  # Worker w takes groups w, w + num_proc, ...; it writes NAME.stats.json as each group completes.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the workers never touch JAX
  workers, errs = [], []
  bar = tqdm(total=len(names), unit="group", desc="tokenizing files", disable=not progress, file=sys.stderr)
  try:
    for w in range(min(num_proc, len(names))):
      errs.append(os.path.join(parts, f"worker{w}.err"))
      with open(errs[-1], "wb") as err:
        workers.append(subprocess.Popen([sys.executable, "-m", "efficient_attn.data.build", parts,
                                         *names[w::num_proc]], env=env, stdout=subprocess.DEVNULL, stderr=err))
    done = 0
    while True:
      codes = [p.poll() for p in workers]  # before counting: a worker that exited 0 wrote all its groups
      now = sum(os.path.exists(os.path.join(parts, f"{n}.stats.json")) for n in names)
      bar.update(now - done)
      done = now
      for code, e in zip(codes, errs):
        if code:  # a worker failed: one sentence from its last line
          with open(e, encoding="utf-8", errors="replace") as f:
            tail = f.read().strip().splitlines()[-1:] or ["(no message)"]
          raise DataError(f"a tokenizing worker (data.num_proc={num_proc}) failed: {tail[0]}")
      if all(code == 0 for code in codes):
        if done < len(names):
          raise DataError(f"the tokenizing workers (data.num_proc={num_proc}) exited before every file was read.")
        break
      time.sleep(0.05)
  finally:
    bar.close()
    for p in workers:
      if p.poll() is None:
        p.kill()
        p.wait()
  part_stats = {}
  for name in names:
    with open(os.path.join(parts, f"{name}.stats.json")) as f:
      part_stats[name] = json.load(f)
  stats, last = {}, None
  for s in SPLITS:
    with open(os.path.join(tmp, f"{s}.bin"), "wb") as fbin, open(os.path.join(tmp, f"{s}.idx"), "wb") as fidx:
      fidx.write(np.zeros(1, np.int64).tobytes())
      total = {"docs": 0, "tokens": 0, "bytes": 0}
      for name in names:
        st = part_stats[name][s]
        with open(os.path.join(parts, f"{name}.{s}.bin"), "rb") as f:
          shutil.copyfileobj(f, fbin, 1 << 22)
        idx = np.fromfile(os.path.join(parts, f"{name}.{s}.idx"), np.int64)[1:]
        fidx.write((idx + total["tokens"]).tobytes())
        total = {k: total[k] + st[k] for k in total}
      stats[s] = total
  for name in names:
    if part_stats[name]["last_bytes"] >= 0:
      last = (np.load(os.path.join(parts, f"{name}.last.npy")), part_stats[name]["last_bytes"])
  shutil.rmtree(parts)
  return stats, last


def _tokenize_groups(parts: str, *names: str) -> None:
  """One worker's job (see `_build_parallel`): each NAME.files.json into NAME.{split}.bin / .idx."""
  import pickle

  with open(os.path.join(parts, "job.pkl"), "rb") as f:
    job = pickle.load(f)
  for name in names:
    _tokenize_group(parts, name, job)


def _tokenize_group(parts: str, name: str, job: dict) -> None:
  with open(os.path.join(parts, f"{name}.files.json")) as f:
    files = tuple(json.load(f))
  writers = {s: SplitWriter(parts, f"{name}.{s}", np.dtype(job["dtype"])) for s in SPLITS}
  group = dataclasses.replace(job["source"], files=files)
  last = _tokenize_into(writers, group.documents("train", batch_size=32), job["tok"], job["val_fraction"])
  stats = {s: w.close() for s, w in writers.items()}
  stats["last_bytes"] = -1 if last is None else last[1]  # the group's last document: its bytes (ids: .last.npy)
  if last is not None:
    np.save(os.path.join(parts, f"{name}.last.npy"), last[0])
  with open(os.path.join(parts, f"{name}.stats.tmp"), "w") as f:
    json.dump(stats, f)
  os.rename(os.path.join(parts, f"{name}.stats.tmp"), os.path.join(parts, f"{name}.stats.json"))  # complete


def _tiny_corpus_fallback(tmp: str, stats: dict, last, settings: dict, dtype) -> dict:
  """As `text.split_documents`: no train document -> train on all; a validation split that the CRC left
  empty -> the last document (so tiny corpora still validate)."""
  if settings["val_fraction"] > 0 and (not stats["train"]["docs"] or not stats["validation"]["docs"]):
    if not stats["train"]["docs"]:  # every document fell into validation: train on them all
      for ext in ("bin", "idx"):
        shutil.copyfile(os.path.join(tmp, f"validation.{ext}"), os.path.join(tmp, f"train.{ext}"))
      stats["train"] = dict(stats["validation"])
    w = SplitWriter(tmp, "validation", dtype)
    w.add([last[0]], [last[1]])
    stats["validation"] = w.close()
  return stats


if __name__ == "__main__":  # a tokenizing worker of _build_parallel
  try:
    _tokenize_groups(*sys.argv[1:])
  except DataError as e:  # the parent reports the last line of stderr
    print(e, file=sys.stderr)
    sys.exit(1)
