"""The data cache on disk, shared by the pipeline's steps (a base module: it imports no other step).

    DATA_CACHE/tokenizers/KIND-N-KEY.json   tokenizers trained by `tokenizer.get_tokenizer`
    DATA_CACHE/stores/KEY/                  token stores built by `build.build`, opened by `store.open_store`

An entry is made once: `once` lets one process make it under a lock file while the others (on this
host or another sharing the directory) wait for it to appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

FORMAT = 1  # in every key and store: bump it when a store's layout changes


def cache_root(d) -> str:
  """data.cache_dir, else $EFFICIENT_ATTN_DATA_CACHE, else ~/.cache/efficient_attn/data."""
  return os.path.expanduser(d.cache_dir or os.environ.get("EFFICIENT_ATTN_DATA_CACHE")
                            or os.path.join("~", ".cache", "efficient_attn", "data"))


def key(obj) -> str:
  """A short hash of a JSON-able description (source fingerprint, tokenizer, split settings)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def once(done: str, lock: str, make) -> None:
  """Calls `make()` unless the file `done` exists, in one process at a time (holding the file `lock`);
  the others wait until `done` appears (or take over when the maker died)."""
  os.makedirs(os.path.dirname(lock), exist_ok=True)
  while not os.path.isfile(done):
    held = Lock(lock)
    if held.acquire():
      try:
        if not os.path.isfile(done):
          make()
      finally:
        held.release()
    else:
      time.sleep(0.5)  # another process is making it


class Lock:
  """`PATH.lock` created with O_EXCL (pid and host inside); a lock of a dead process on this host is removed."""

  def __init__(self, path: str):
    self.path, self.mine = path, f"{os.getpid()} {socket.gethostname()}"

  def acquire(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(self.path) as f:
          pid, _, host = f.read().strip().partition(" ")
      except FileNotFoundError:
        return False
      if host == socket.gethostname() and pid.isdigit() and not alive(int(pid)):
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
      return False
    with os.fdopen(fd, "w") as f:
      f.write(self.mine)
    return True

  def release(self) -> None:
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def say(msg: str) -> None:
  print(f"efficient-attn: {msg}", file=sys.stderr, flush=True)
