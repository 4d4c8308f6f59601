"""What keeps a run alive and its workdir intact: one writer, one run, clean stops, checkpoint fallback.

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
  never overwritten) and the previous one is used, with a warning naming both steps;
  the noise orbax prints after a failed restore is kept out of the way.
- A workdir keeps its resolved config (`config.json`), which `efficient-attn train` starts a rerun
  from; a rerun that changes the model, the data or the optimiser is refused before compiling
  (`check_same_run`), so two runs never mix.
- Multi-process: every process polls `requested()` at the same step and gets the same
  answer, though the signal may have reached only one of them; process 0 alone takes
  the lock and renames corrupt checkpoints, behind a barrier.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
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


# ----------------------------------------------------------------------------- one workdir, one run

# What a rerun may change and still resume (README, "The command line"): how long to train, how often to
# log / evaluate / save, what to do on a non-finite step, TensorBoard, and how the same maths is laid out
# (mesh.*: checkpoints reshard, a context split is exact in any layout; train.grad_accum: micro-batches give the same update; model.remat), and where
# and how the token store is built (data.cache_dir, data.num_proc: the same tokens either way).
# Any other difference (model, data, optimiser, schedule, seed, ...) would mix two runs in one workdir.
MAY_CHANGE_ON_RESUME = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                        "train.max_to_keep", "train.eval_batches", "train.on_nonfinite", "train.tensorboard",
                        "train.grad_accum", "model.remat", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert",
                        "mesh.context", "mesh.context_layout", "data.cache_dir", "data.num_proc")


def has_checkpoints(workdir: str) -> bool:
  """True when DIR/checkpoints holds a committed step (a killed save's tmp directory does not count)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def check_same_run(workdir: str, cfg, has_checkpoints: bool) -> str | None:
  """Refuses to resume a workdir whose `config.json` differs from `cfg` outside MAY_CHANGE_ON_RESUME.

  Raises ConfigError (before anything compiles) naming each differing key with both values.
  A workdir without checkpoints has nothing to resume: it starts afresh whatever its
  config.json says. One with checkpoints but no config.json (written before workdirs kept
  their config) resumes with `cfg`; the returned note says so for the log. Else None.
  """
  from efficient_attn import config as config_lib

  path = os.path.join(workdir, config_lib.CONFIG_JSON)
  if not has_checkpoints:
    return None
  if not os.path.isfile(path):
    return (f"{workdir} has checkpoints but no {config_lib.CONFIG_JSON} (an older workdir): resuming with the"
            f" config given now and storing it there.")
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({e}); move it aside to resume with the config given now.") from None
  now = json.loads(json.dumps(config_lib.flatten(cfg)))  # tuples -> lists, as stored
  defaults = json.loads(json.dumps(config_lib.flatten(config_lib.Config())))
  family_changed = stored.get("model.attention") != now["model.attention"]
  missing = object()
  diffs = []
  for key in sorted(set(stored) | set(now)):
    option = key.startswith(config_lib.OPTIONS_PREFIX)
    if key in MAY_CHANGE_ON_RESUME or (option and (family_changed or key not in stored)):
      continue  # another family's options differ anyway; an option newer than the file has its default
    old = stored.get(key, defaults.get(key, missing))  # a key newer than the file: its default
    new = now.get(key, missing)
    if old != new:
      diffs.append(f"{key}={_shown(old, missing)} there, {_shown(new, missing)} now")
  if diffs:
    raise ConfigError(f"workdir {workdir} holds another run ({path}): {'; '.join(diffs)}; use another --workdir"
                      f" or the stored values (a resume may change only {', '.join(MAY_CHANGE_ON_RESUME)}).")
  return None


def _shown(value, missing) -> str:
  return "(unset)" if value is missing else repr(value)


# ----------------------------------------------------------------------------- SIGTERM / SIGINT


class StopSignals:
  """While active, SIGTERM and SIGINT set `.received` ("SIGTERM" / "SIGINT") instead of exiting.

  The training loop polls `requested()` after each step. A second SIGINT raises
  KeyboardInterrupt (a user who insists); repeated SIGTERMs are ignored so they cannot
  cut the final save short. Previous handlers come back on exit. Outside the main
  thread (where Python cannot install handlers) no signal is caught, but `requested()`
  still takes part in the multi-process agreement.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None  # why the run stops: a signal here, or one another process got
    self._local: str | None = None    # the signal this process got
    self._previous = {}

  def _handle(self, signum, frame):
    if self._local and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self._local = self._local or signal.Signals(signum).name
    self.received = self.received or self._local

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
    """True once any process got a signal; every process gets the same answer from the same call.

    A preemption notice may reach only some hosts; a process that stopped alone would
    leave the others waiting in the next collective. So with several processes each
    call all-gathers one int per process (the signal number, 0 for none): the step
    counts, not the moment the signal landed. A process that got none adopts the name
    of the first one that did, so every process reports the same reason.
    """
    import jax

    if jax.process_count() == 1:
      return self.received is not None
    import numpy as np
    from jax.experimental import multihost_utils

    local = self._local  # read once: the handler may run during the all-gather
    codes = np.asarray(multihost_utils.process_allgather(np.int32(signal.Signals[local] if local else 0)))
    if codes.any() and self.received is None:
      self.received = signal.Signals(int(codes[codes > 0][0])).name
    return bool(codes.any())


# ----------------------------------------------------------------------------- checkpoint fallback


def restore_newest_intact(mngr, restore):
  """Restores the newest checkpoint that loads; returns `restore(step)`'s result and the step, or None.

  A checkpoint that fails is renamed to `<step>.corrupt` (by process 0) only once an
  older one has restored (so a config change that breaks every checkpoint moves nothing:
  it raises CheckpointError with the first failure instead). Failures are kept as text:
  the exception objects would keep orbax's abandoned reads alive (see below).
  """
  failed: list[tuple[int, str]] = []
  with _quiet_abandoned_reads() as quiet:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        out = restore(step)
        break
      except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds for a damaged file
        failed.append((step, quiet.failed(e)))
    else:
      step = None
  if step is None:
    if failed:
      raise CheckpointError(f"no checkpoint in {mngr.directory} could be restored (steps {[s for s, _ in failed]});"
                            f" step {failed[0][0]} failed with {failed[0][1][:300]}")
    return None
  for bad, why in failed:
    if _primary():
      path = os.path.join(str(mngr.directory), str(bad))
      os.rename(path, _free_name(path + ".corrupt"))
    warnings.warn(f"checkpoint step {bad} could not be restored ({why[:200]});"
                  f" resuming from step {step} instead and moved it aside to {bad}.corrupt.", stacklevel=2)
  if failed:
    _barrier("efficient_attn_corrupt_aside")  # every process sees the renames before it reloads
    mngr.reload()
  return out, step


class _quiet_abandoned_reads:
  """Hides what orbax leaves behind after a failed restore, and nothing else.

  orbax 0.12 reads the arrays with `asyncio.gather` on a fresh event loop and closes that
  loop as soon as one read fails, with the other reads still in flight
  (`asyncio_utils._run_sync_via_new_loop`). When they land, tensorstore's callbacks hit
  the closed loop ("RuntimeError: Event loop is closed", a traceback per array), and the
  abandoned tasks, once collected, print "Exception ignored in <coroutine ...>", "Task was
  destroyed but it is pending", "... exception was never retrieved" or "coroutine ... was
  never awaited": hundreds of lines under our one warning. The bug is orbax's, so this
  filters exactly those messages, only inside the block, and on exit waits (at most
  DRAIN_S) for the abandoned reads to end and collects them, so none of it escapes later.
  """

  DRAIN_S = 30.0  # normally well under a second; a loaded machine can take many
  STALL_S = 1.0   # ... as long as reads keep ending; none for this long: stop waiting
  LOGGED = ("Task was destroyed but it is pending", "exception was never retrieved")

  def __enter__(self):
    self.loops: list[asyncio.AbstractEventLoop] = []
    self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
    self._warnings = warnings.catch_warnings()
    self._warnings.__enter__()
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
    logging.getLogger("asyncio").addFilter(self._log_filter)
    return self

  def failed(self, err: BaseException) -> str:
    """Notes the event loops in `err`'s frames (orbax's, closed mid-read); returns "Type: message".

    The caller keeps only that text: while `err` lived, the abandoned reads stayed pending
    (seen with orbax 0.12.8 / tensorstore 0.1.86), so the drain below could not end them."""
    tb = err.__traceback__
    while tb is not None:
      self.loops += [v for v in tb.tb_frame.f_locals.values() if isinstance(v, asyncio.AbstractEventLoop)]
      tb = tb.tb_next
    return f"{type(err).__name__}: {err}"

  def _unraisable(self, unraisable):
    err, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    noise = ((isinstance(err, RuntimeError) and str(err) == "Event loop is closed")
             or (isinstance(err, RuntimeWarning) and "was never awaited" in str(err))
             or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename))
    if not noise:
      self._hook(unraisable)

  def _log_filter(self, record: logging.LogRecord) -> bool:
    return not any(m in record.getMessage() for m in self.LOGGED)

  def __exit__(self, *exc):
    try:
      start = last_change = time.monotonic()
      pending = None
      while self.loops:
        gc.collect()  # an abandoned task is freed, in a reference cycle, once its read has ended
        now, left = time.monotonic(), sum(len(asyncio.all_tasks(loop)) for loop in self.loops)
        if left != pending:
          pending, last_change = left, now
        # Done, or nothing ended for STALL_S: the loops are closed, so the rest can only end with reads
        # that tensorstore never completes (seen: every read of a checkpoint whose manifest is missing).
        if not left or now - last_change > self.STALL_S or now - start > self.DRAIN_S:
          break
        time.sleep(0.05)
    finally:
      had_failures, self.loops = bool(self.loops), []
      logging.getLogger("asyncio").removeFilter(self._log_filter)
      self._warnings.__exit__(*exc)
      sys.unraisablehook = self._hook
      if had_failures:  # an abandoned read still pending past the drain is collected later: keep hiding those
        _hide_orbax_coroutines_for_good()
    return False


def _from_orbax(record: logging.LogRecord) -> bool:
  """True for an asyncio log record about an exception raised inside orbax (an abandoned read's
  "_GatheringFuture exception was never retrieved", collected after the restore block ended)."""
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _hide_orbax_coroutines_for_good() -> None:
  """Once: drops unraisable errors of orbax's own coroutines and asyncio's log records of
  exceptions raised inside orbax; everything else still gets through."""
  log = logging.getLogger("asyncio")
  if not any(getattr(f, "_efficient_attn_orbax_filter", False) for f in log.filters):
    def keep(record: logging.LogRecord) -> bool:
      return not _from_orbax(record)

    keep._efficient_attn_orbax_filter = True
    log.addFilter(keep)
  previous = sys.unraisablehook
  if getattr(previous, "_efficient_attn_orbax_filter", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is None or f"{os.sep}orbax{os.sep}" not in code.co_filename:
      previous(unraisable)

  hook._efficient_attn_orbax_filter = True
  sys.unraisablehook = hook


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
