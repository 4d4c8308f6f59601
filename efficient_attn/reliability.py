"""What keeps a run alive and its workdir intact: one writer, clean stops, checkpoint fallback.

    with workdir_lock(workdir), StopSignals() as stop:   # DIR/.lock; SIGTERM / SIGINT -> a flag
      state, step = restore_newest_intact(mngr, restore)  # a corrupt latest -> the previous one
      for step ...:
        ...
        if stop.requested(): save, wait, break            # the loop decides when to stop

- A preemptible VM sends SIGTERM (then SIGKILL after a grace period). The handler only
  sets a flag; the loop finishes its step, saves a checkpoint and exits with status 0.
- SIGKILL cannot be caught: orbax writes each step into `<step>.orbax-checkpoint-tmp-*`
  and renames it on commit, so a killed save leaves only a tmp directory, which is
  ignored and cleaned when the next run opens the checkpoint manager.
- A checkpoint that fails to restore is moved aside to `<step>.corrupt` (never deleted,
  never overwritten) and the previous one is used, with a warning naming both steps.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import warnings

from efficient_attn.config import ConfigError


class WorkdirBusyError(ConfigError):
  """Another live run holds the workdir's lock (exit status 2 on the command line)."""


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir could be restored."""


# ----------------------------------------------------------------------------- one workdir, one writer


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None


class workdir_lock:
  """Holds `DIR/.lock` (PID and hostname, created with O_CREAT | O_EXCL) for the life of a run.

  A lock whose process is alive refuses the second run (WorkdirBusyError). A lock left
  by a dead process on this host (a SIGKILLed run) is taken over with a warning; one
  from another host cannot be checked, so it refuses and says which file to remove.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.mine = f"{os.getpid()} {socket.gethostname()}\n"

  def __enter__(self):
    for _ in range(5):  # each round either takes the lock or clears one stale lock
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._clear_stale()
        continue
      with os.fdopen(fd, "w") as f:
        f.write(self.mine)
      return self
    raise WorkdirBusyError(f"could not take the lock {self.path}; another run keeps replacing it.")

  def _clear_stale(self) -> None:
    owner = _read(self.path)
    if owner is None:  # released meanwhile
      return
    pid, _, host = owner.strip().partition(" ")
    here = host == socket.gethostname()
    if pid.isdigit() and (not here or _pid_alive(int(pid))):
      where = "this host" if here else f"host {host}"
      raise WorkdirBusyError(
          f"workdir {os.path.dirname(self.path)} is in use by process {pid} on {where}; wait for it, use"
          f" another --workdir, or delete {self.path} if that run is gone.")
    # Move the stale lock aside atomically; if a racing run replaced it first, put theirs back.
    aside = f"{self.path}.stale-{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    if _read(aside) != owner:
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.unlink(aside)
      return
    os.unlink(aside)
    warnings.warn(f"took over the stale lock {self.path} of process {pid or '?'}, which no longer runs.",
                  stacklevel=3)

  def __exit__(self, *exc):
    if _read(self.path) == self.mine:
      os.unlink(self.path)
    return False


# ----------------------------------------------------------------------------- SIGTERM / SIGINT


class StopSignals:
  """While active, SIGTERM and SIGINT set `.received` ("SIGTERM" / "SIGINT") instead of exiting.

  The training loop polls `requested()` after each step. A second SIGINT raises
  KeyboardInterrupt (a user who insists); repeated SIGTERMs are ignored so they cannot
  cut the final save short. Previous handlers come back on exit. Outside the main
  thread (where Python cannot install handlers) this is a no-op.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = self.received or signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
    return False

  def requested(self) -> bool:
    """True once any process got a signal; every process sees the same answer at the same step."""
    import jax

    if jax.process_count() == 1:
      return self.received is not None
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(self.received is not None))))


# ----------------------------------------------------------------------------- checkpoint fallback


def restore_newest_intact(mngr, restore):
  """Restores the newest checkpoint that loads; returns `restore(step)`'s result and the step, or None.

  A checkpoint that fails is renamed to `<step>.corrupt` only once an older one has
  restored (so a config change that breaks every checkpoint moves nothing: it raises
  CheckpointError with the first failure instead).
  """
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      out = restore(step)
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds for a damaged file
      failed.append((step, e))
      continue
    for bad, err in failed:
      if _primary():
        path = os.path.join(str(mngr.directory), str(bad))
        os.rename(path, _free_name(path + ".corrupt"))
      warnings.warn(f"checkpoint step {bad} could not be restored ({type(err).__name__}: {str(err)[:200]});"
                    f" resuming from step {step} instead and moved it aside to {bad}.corrupt.", stacklevel=2)
    if failed:
      _barrier("efficient_attn_corrupt_aside")  # every process sees the renames before it reloads
      mngr.reload()
    return out, step
  if failed:
    step, err = failed[0]
    raise CheckpointError(f"no checkpoint in {mngr.directory} could be restored (steps {[s for s, _ in failed]});"
                          f" step {step} failed with {type(err).__name__}: {str(err)[:300]}") from err
  return None


def _primary() -> bool:
  import jax

  return jax.process_index() == 0


def _barrier(name: str) -> None:
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _free_name(path: str) -> str:
  """`path`, or `path.1`, `path.2`, ... : never overwrite an earlier aside copy."""
  candidate, i = path, 0
  while os.path.exists(candidate):
    i += 1
    candidate = f"{path}.{i}"
  return candidate
