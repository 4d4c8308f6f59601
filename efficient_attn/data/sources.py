"""Step 1 of the data pipeline (`efficient_attn.data.pipeline`): where documents come from (`data.name`),
read as a stream so memory never holds the corpus, and which split each one belongs to.

    stdlib                      the Python standard library's source files (default, always offline)
    text | json | parquet | arrow   local files: data.files is a path, a glob or a directory
                                (text: one document per file, or per paragraph / line with
                                data.sample_by; the others: one per record's text_field)
    DIR                         a `datasets` save_to_disk directory (a Dataset, or a DatasetDict + data.split)
    NAME                        a Hugging Face hub dataset (+ data.config, data.split, data.validation_split)

Local files are read through `datasets.load_dataset(..., streaming=True)`: record batches come
off the disk and go, so a corpus larger than memory streams through the store builder.
`Source.fingerprint()` names what was read (file paths with sizes and mtimes, or the hub name,
config and split) for the store's cache key. A document goes to train or validation by a CRC of
its bytes (`is_val`, as `text.split_documents`), unless data.validation_split names a split of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import socket
import zlib

from efficient_attn.data.text import DataError, stdlib_files

FILE_BUILDERS = ("text", "json", "parquet", "arrow")
_EXTENSIONS = {"json": (".json", ".jsonl", ".json.gz", ".jsonl.gz"), "parquet": (".parquet",), "arrow": (".arrow",)}


@dataclasses.dataclass(frozen=True)
class Source:
  """A readable corpus. kind: "files" (local files of `builder`) | "hub"; `split`: what train reads."""
  kind: str
  builder: str = ""
  files: tuple[str, ...] = ()
  name: str = ""
  config: str = ""
  split: str = "train"
  validation_split: str = ""
  text_field: str = "text"
  validation_files: tuple[str, ...] = ()  # a save_to_disk DatasetDict's validation split
  sample_by: str = "document"             # text files: one document per file | paragraph | line

  def fingerprint(self) -> dict:
    stat = lambda fs: [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in fs]  # noqa: E731
    return {"kind": self.kind, "builder": self.builder, "files": stat(self.files),
            "validation_files": stat(self.validation_files), "name": self.name, "config": self.config,
            "split": self.split, "validation_split": self.validation_split, "text_field": self.text_field,
            **({"sample_by": self.sample_by} if self.sample_by != "document" else {})}

  @property
  def total_bytes(self) -> int | None:
    """Bytes on disk of the training files (a progress bar's total), None for the hub."""
    return sum(os.path.getsize(f) for f in self.files) if self.kind == "files" else None

  def documents(self, which: str = "train", batch_size: int = 256):
    """Yields lists of non-empty document strings of `which` ("train" | "validation") in a fixed order."""
    files = self.files if which == "train" else self.validation_files
    split = self.split if which == "train" else self.validation_split
    where = f"data.files={self.describe()!r}" if self.kind == "files" else f"data.name={self.name!r}"
    try:
      ds = self._open(files, split)
      for batch in ds.iter(batch_size=batch_size):
        if self.text_field not in batch:
          raise DataError(f"data.text_field={self.text_field!r} is not a column of {where}; columns are"
                          f" {sorted(batch)}.")
        docs = [t for t in batch[self.text_field] if t]
        if docs:
          yield docs
    except DataError:
      raise
    except Exception as e:  # datasets / pyarrow raise many kinds for a bad file: one sentence for the user
      raise _user_error(e, where, self) from None

  def describe(self) -> str:
    return self.files[0] if len(self.files) == 1 else f"{len(self.files)} files from {os.path.dirname(self.files[0])}"

  def _open(self, files, split):
    import datasets

    datasets.disable_progress_bars()
    if self.kind == "files":
      extra = {"sample_by": self.sample_by, "keep_linebreaks": True} if self.builder == "text" else {}
      return datasets.load_dataset(self.builder, data_files={"train": list(files)}, split="train", streaming=True,
                                   **extra)
    return _open_hub(self.name, self.config, split)


def what(source: Source) -> str:
  """The source as the messages name it."""
  return source.name or source.describe()


def split_settings(d) -> dict:
  """How DataConfig `d` splits documents (part of every cache key)."""
  return {"val_fraction": 0.0 if d.validation_split else d.val_fraction, "validation_split": d.validation_split}


def is_val(doc: str | bytes, val_fraction: float) -> bool:
  """The document's split, by a CRC of its UTF-8 bytes (as `text.split_documents`)."""
  return zlib.crc32(doc if isinstance(doc, bytes) else doc.encode("utf-8")) % 10_000 < val_fraction * 10_000


def chunks(batches, budget: int = 4 << 20, max_docs: int = 2048):
  """Regroups document batches into lists of at most ~`budget` characters (or `max_docs` documents), so
  the text, bytes and ids held at once stay small whatever the documents' sizes."""
  buf, size = [], 0
  for docs in batches:
    for t in docs:
      buf.append(t)
      size += len(t)
      if size >= budget or len(buf) >= max_docs:
        yield buf
        buf, size = [], 0
  if buf:
    yield buf


def _user_error(e: Exception, where: str, src: Source) -> DataError:
  cause = e
  while cause is not None and not isinstance(cause, UnicodeDecodeError):
    cause = cause.__cause__ or cause.__context__
  if cause is not None:
    return DataError(f"{where} contains a file that is not UTF-8 text ({cause.reason} at byte {cause.start});"
                     " convert it or remove it.")
  first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
  what = f"{src.builder} data" if src.kind == "files" else "the dataset"
  return DataError(f"{where}: could not read {what} ({type(e).__name__}: {first}).")


def _offline() -> bool:
  return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
  try:
    socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    return True
  except OSError:
    return False


@contextlib.contextmanager
def _offline_mode():
  """datasets and huggingface_hub in offline mode for the block (they read these flags at call time)."""
  import datasets
  import huggingface_hub.constants as hub

  old = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
  datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
  try:
    yield
  finally:
    datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = old


def _open_hub(name: str, config: str, split: str):
  """A hub dataset split: streamed when the hub answers; offline, only a copy in the local datasets cache."""
  import datasets

  online = not _offline() and _hub_reachable()
  try:
    if online:
      return datasets.load_dataset(name, config or None, split=split, streaming=True)
    with _offline_mode():  # only the local datasets cache: no 25 s of retries against an unreachable hub
      return datasets.load_dataset(name, config or None, split=split)
  except ValueError as e:
    if "split" in str(e).lower():
      raise DataError(f"data.split={split!r} is not a split of data.name={name!r}"
                      f" ({str(e).splitlines()[0]}).") from None
    raise DataError(f"data.name={name!r} could not be loaded: {str(e).splitlines()[0]}") from None
  except Exception as e:  # offline, unknown name, gated, needs a config...
    if not online:
      raise DataError(f"data.name={name!r} is neither a local dataset nor in the datasets cache, and the Hugging"
                      " Face hub is unreachable (offline); use stdlib, or text / json / parquet / arrow with"
                      " data.files.") from None
    raise DataError(f"data.name={name!r} (config {config or 'none'}, split {split!r}) could not be loaded from"
                    f" the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None


def _expand(pattern: str, builder: str) -> tuple[str, ...]:
  """Files of data.files: a directory (recursively; by extension for json / parquet / arrow when any match),
  a glob or a path; sorted, hidden files skipped."""
  path = os.path.expanduser(pattern)
  if os.path.isdir(path):
    found = [os.path.join(r, f) for r, dirs, fs in os.walk(path) for f in fs if not f.startswith(".")]
    typed = [f for f in found if f.endswith(_EXTENSIONS.get(builder, ("",)))] if builder in _EXTENSIONS else []
    files = typed or found
  else:
    files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
  if not files:
    raise DataError(f"data.files={pattern!r} matches no file; give a path, a glob or a directory of {builder} files.")
  return tuple(sorted(files))


def _disk_files(root: str, split: str, which: str) -> tuple[str, ...]:
  """The arrow files of one split of a save_to_disk directory (a Dataset, or a DatasetDict's split)."""
  if os.path.isfile(os.path.join(root, "dataset_dict.json")):
    with open(os.path.join(root, "dataset_dict.json")) as f:
      splits = json.load(f).get("splits", [])
    if split not in splits:
      raise DataError(f"data.{which}={split!r} is not a split of the saved dataset {root}; its splits are {splits}.")
    root = os.path.join(root, split)
  with open(os.path.join(root, "state.json")) as f:
    names = [d["filename"] for d in json.load(f)["_data_files"]]
  return tuple(os.path.join(root, n) for n in names)


def is_saved_dataset(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, n)) for n in ("dataset_dict.json", "state.json"))


def resolve(d) -> Source:
  """The Source that DataConfig `d` names (DataError, one sentence, if it cannot be read)."""
  if d.name in ("stdlib", *FILE_BUILDERS):
    if d.split not in ("train", ""):
      raise DataError(f"data.split={d.split!r}: local files form one split, 'train' (use data.val_fraction for"
                      " a held-out part).")
    files = tuple(stdlib_files()) if d.name == "stdlib" else _expand(d.files, d.name)
    return Source("files", "text" if d.name == "stdlib" else d.name, files, text_field=d.text_field,
                  sample_by="document" if d.name == "stdlib" else d.sample_by)
  path = os.path.expanduser(d.name)
  if os.path.isdir(path):
    if not is_saved_dataset(path):
      raise DataError(f"data.name={d.name!r} is a directory but not a datasets save_to_disk one (no state.json or"
                      " dataset_dict.json); for a folder of files use data.name=text|json|parquet|arrow with"
                      " data.files=DIR.")
    val = _disk_files(path, d.validation_split, "validation_split") if d.validation_split else ()
    return Source("files", "arrow", _disk_files(path, d.split or "train", "split"), name=d.name,
                  split=d.split, validation_split=d.validation_split, text_field=d.text_field, validation_files=val)
  return Source("hub", name=d.name, config=d.config, split=d.split or "train", validation_split=d.validation_split,
                text_field=d.text_field)
