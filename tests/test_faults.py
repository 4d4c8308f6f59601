"""Fault catalogue: what a training run survives, and what it never loses.

  fault                                         expected behaviour
  SIGTERM (preemption notice)                   finish the step, save it, exit 0; resume = uninterrupted losses
  SIGINT (Ctrl-C)                               the same, exit 130; previous handlers restored
  SIGTERM to one process of a 2-process run     both agree, save the same step, exit 0; resume = same losses
  SIGKILL while checkpoints are being written   resume from the newest intact one; same losses; tmp dirs cleaned
  truncated / missing file in latest checkpoint fall back to the previous one, warn naming both steps,
                                                move the bad one to <step>.corrupt (never overwrite, never delete);
                                                nothing else on stderr (orbax's teardown noise is contained)
  every checkpoint unreadable                   CheckpointError, nothing moved
  a second run on a live run's workdir          refused: one sentence, exit 2
  a stale lock from a killed run                taken over with a warning
  non-finite loss / gradient                    stop: no checkpoint at or after the step; skip: old params kept
  a different mesh on resume                    MoE expert axis 4 -> 2 -> 1, tensor 2 -> 1, 8 devices -> 1,
                                                same losses

Runs are tiny (2 layers, d_model 32, seq_len 32, ~4 ms a step) and signalled runs have
10 000 steps, so a signal always lands mid-run; reference runs then go just past it.
"""

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from efficient_attn import cli, reliability, sharding
from efficient_attn.config import Config, with_overrides, parse_overrides, validate
from efficient_attn.data.text import lm_example, PackedStream
from efficient_attn.model import TransformerLM
from efficient_attn.state import init_state
from efficient_attn.train import NonFiniteError, make_optimizer, make_train_step, train
from reference import one_device_env

TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.ffn_dim=64", "train.seq_len=32",
        "train.batch_size=8", "train.steps=10000", "train.warmup_steps=5", "train.log_every=1",
        "train.checkpoint_every=1000", "data.val_fraction=0.0", "mesh.data=1"]
ONE = jax.devices()[:1]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(*extra: str) -> Config:
  return with_overrides(Config(), parse_overrides(TINY + list(extra)))


def sets(*extra: str) -> list[str]:
  return [a for kv in TINY + list(extra) for a in ("--set", kv)]


def rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def rows_logged(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def steps_on_disk(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """reference(n): the losses of steps 1..n of one uninterrupted run (one device), run once per module.

  Run on first use, before any CLI process starts: those processes then load its compiled train step
  from the suite's compilation cache instead of compiling their own."""
  cache: list[float] = []

  def losses(n: int) -> list[float]:
    if len(cache) < n:  # the signalled runs stop a few steps after their first log line (<= 7 here), rarely more
      workdir = tmp_path_factory.mktemp("reference")
      train(tiny(), str(workdir), devices=ONE, stop_after=max(n, 2 * len(cache), 32))  # uninterrupted
      cache[:] = [r["loss"] for r in rows(workdir)]
    return cache[:n]

  losses(1)
  return losses


def assert_same_losses(workdir, ref: list[float], atol=1e-5, rtol=0.0):
  """A resumed run against the uninterrupted one: same program and device count, so bit-identical in
  practice; atol=1e-5 also holds under another summation order (~1e-7 relative drift in 20 steps)."""
  got = rows(workdir)
  assert [r["step"] for r in got] == list(range(1, len(ref) + 1))
  np.testing.assert_allclose([r["loss"] for r in got], ref, atol=atol, rtol=rtol)


def start_cli(workdir, *extra: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "efficient_attn.cli", "train", "--workdir", str(workdir),
                           *sets(*extra)],
                          env=one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step: int, proc=None, timeout=180.0) -> None:
  """Polls metrics.jsonl until it logs `step` (no fixed sleeps)."""
  path, deadline = os.path.join(workdir, "metrics.jsonl"), time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.exists(path):
      with open(path) as f:
        lines = [line for line in f if line.endswith("\n")]
      if lines and json.loads(lines[-1])["step"] >= step:
        return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the run ended early: {proc.communicate()}")
    time.sleep(0.02)
  raise AssertionError(f"no step {step} in {path} after {timeout}s")


# ----------------------------------------------------------------------------- signals and kills


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_and_a_second_writer_is_refused(tmp_path, capsys, reference):
  run = tmp_path / "run"
  proc = start_cli(run)
  try:
    wait_for_step(run, 1, proc)
    # A second run on the same workdir while the first is alive: one sentence, exit 2, nothing touched.
    assert cli.main(["train", "--workdir", str(run), *sets("mesh.data=-1")]) == 2
    err = capsys.readouterr().err
    assert f"in use by process {proc.pid}" in err and err.count("\n") == 1 and "Traceback" not in err
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  line = [x for x in err.splitlines() if "stopped by" in x]
  assert len(line) == 1 and line[0].endswith("checkpoint saved."), err
  stopped = int(line[0].split("at step ")[1].split(";")[0])
  assert rows(run)[-1]["step"] == stopped and str(stopped) in steps_on_disk(run)
  assert not os.path.exists(run / ".lock")  # released on the way out
  last = stopped + 3
  train(tiny(), str(run), devices=ONE, stop_after=last)
  assert_same_losses(run, reference(last))


@pytest.mark.slow
def test_sigint_in_process_exits_130_and_restores_handlers(tmp_path, capsys):
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  done = threading.Event()

  def interrupt():  # Ctrl-C once the run logs its first step
    try:
      wait_for_step(tmp_path, 1, timeout=120)
    except AssertionError:
      return
    if not done.is_set():
      os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=interrupt, daemon=True).start()
  try:
    rc = cli.main(["train", "--workdir", str(tmp_path), *sets("mesh.data=-1")])
  finally:
    done.set()
  err = capsys.readouterr().err
  assert rc == 130 and "stopped by SIGINT at step" in err, err
  stopped = int(err.split("at step ")[1].split(";")[0])
  assert rows(tmp_path)[-1]["step"] == stopped and str(stopped) in steps_on_disk(tmp_path)
  assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_sigkill_during_checkpointing_resumes_exactly(tmp_path, reference):
  run = tmp_path / "run"
  proc = start_cli(run, "train.checkpoint_every=1")  # a save in flight at almost any moment
  try:
    wait_for_step(run, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert os.path.exists(run / ".lock")  # left behind by the killed run
  ckpt = run / "checkpoints"
  newest = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
  # Whatever the kill left, also plant a half-written save past the newest one.
  half = ckpt / f"{newest + 1}.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(ckpt / str(newest) / "state", half / "state")
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 99999, "loss": 1.')  # a log line cut short by the kill
  last = max(r["step"] for r in rows_logged(run)) + 3
  with pytest.warns(UserWarning, match="took over the stale lock"):
    train(tiny("train.checkpoint_every=1"), str(run), devices=ONE, stop_after=last)
  assert not [d for d in os.listdir(ckpt) if "tmp" in d]
  assert not os.path.exists(run / ".lock")
  assert_same_losses(run, reference(last))


def launched(launcher: subprocess.Popen) -> dict[int, int]:
  """{JAX_PROCESS_ID: pid} of the processes scripts/launch_local.sh started (read from /proc)."""
  found = {}
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except (OSError, ValueError):  # gone meanwhile, or not ours to read
      continue
    if parent == launcher.pid and b"JAX_PROCESS_ID" in env:
      found[int(env[b"JAX_PROCESS_ID"])] = int(pid)
  return found


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, reference):
  """A preemption notice that reaches one host only: both processes save the same step and exit 0.
  The README's launcher as it comes (2 processes x 4 devices, one 4 x 2 data x fsdp mesh across them):
  this is also the suite's test that a 2-process run trains at all."""
  run, logs, mesh = tmp_path / "run", tmp_path / "logs", ("mesh.data=4", "mesh.fsdp=2")
  logs.mkdir()
  env = one_device_env(EFFICIENT_ATTN=f"{sys.executable} -m efficient_attn.cli", LOG_DIR=str(logs))
  launcher = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "launch_local.sh"), "train", "--workdir",
                               str(run), *sets(*mesh)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
  pids = {}
  try:
    wait_for_step(run, 2, launcher)
    pids = launched(launcher)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGTERM)  # not the process that logs and holds the lock
    out, err = launcher.communicate(timeout=120)
  finally:
    launcher.kill()
    for pid in pids.values():  # a process left waiting in a collective would never exit
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  assert launcher.returncode == 0, out + err
  said = [(logs / f"process_{i}.log").read_text() for i in (0, 1)]
  stopped = [int(log.split("stopped by SIGTERM at step ")[1].split(";")[0]) for log in said]
  assert stopped[0] == stopped[1] and all(log.rstrip().endswith("checkpoint saved.") for log in said), said
  assert rows(run)[-1]["step"] == stopped[0] and str(stopped[0]) in steps_on_disk(run)
  assert not os.path.exists(run / ".lock")
  last = stopped[0] + 3  # resume on one device: the losses of an uninterrupted one-device run
  train(tiny(), str(run), devices=ONE, stop_after=last)
  assert_same_losses(run, reference(last), rtol=2e-4)


# ----------------------------------------------------------------------------- corrupt checkpoints


def truncate_largest_file(step_dir) -> None:
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


@pytest.mark.slow
def test_corrupt_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, reference, caplog):
  run, cfg = tmp_path / "run", tiny("train.checkpoint_every=4")
  train(cfg, str(run), devices=ONE, stop_after=12)  # checkpoints 4, 8, 12
  truncate_largest_file(run / "checkpoints" / "12")  # half-written
  os.remove(run / "checkpoints" / "8" / "state" / "manifest.ocdbt")  # a file missing
  leaked, hook = [], sys.unraisablehook  # what orbax's abandoned reads print ("Event loop is closed", ...)
  sys.unraisablehook = leaked.append
  try:
    with pytest.warns(UserWarning) as caught:
      train(cfg, str(run), devices=ONE, stop_after=16)
    said = " ".join(str(w.message) for w in caught)
    assert "step 12 could not be restored" in said and "step 8 could not be restored" in said
    assert "resuming from step 4" in said
    # Moved aside, not deleted; the redone steps 8 and 12 are new directories next to them.
    assert {"8.corrupt", "12.corrupt", "8", "12", "16"} <= set(steps_on_disk(run))
    assert_same_losses(run, reference(16))
    # Every checkpoint unreadable (here: a changed model in a workdir from before config.json, which
    # would refuse it up front): refuse, restart nothing, move nothing, store no config.
    before = steps_on_disk(run)
    os.remove(run / "config.json")
    with pytest.raises(reliability.CheckpointError, match=r"no checkpoint .* could be restored \(steps \[16, 12, 8\]"):
      train(tiny("model.d_model=64"), str(run), devices=ONE, stop_after=20)
    assert steps_on_disk(run) == before and not os.path.exists(run / ".lock")
    assert not os.path.exists(run / "config.json")
    gc.collect()
  finally:
    sys.unraisablehook = hook
  # Only our warnings: none of orbax's teardown noise got out of the restore.
  assert not leaked, [(u.exc_value, u.object) for u in leaked[:3]]
  assert not [r.getMessage()[:200] for r in caplog.records if r.name == "asyncio"]
  assert not [w for w in caught if "never awaited" in str(w.message)]


# ----------------------------------------------------------------------------- one workdir, one writer


def test_lock_refuses_live_owner_takes_over_stale_and_releases(tmp_path):
  lock = tmp_path / ".lock"
  lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live process on this host
  with pytest.raises(reliability.WorkdirBusyError, match=f"in use by process {os.getpid()} on this host"):
    reliability.workdir_lock(str(tmp_path)).__enter__()
  lock.write_text("1234 some-other-host\n")  # cannot be checked from here: refuse, say which file to remove
  with pytest.raises(reliability.WorkdirBusyError, match="host some-other-host.*delete"):
    reliability.workdir_lock(str(tmp_path)).__enter__()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock.write_text(f"{dead.pid} {socket.gethostname()}\n")
  with pytest.raises(RuntimeError, match="boom"):
    with pytest.warns(UserWarning, match=f"stale lock .* of process {dead.pid}"):
      with reliability.workdir_lock(str(tmp_path)):
        assert lock.read_text().split()[0] == str(os.getpid())
        raise RuntimeError("boom")
  assert not lock.exists()  # released on an exception too


# ----------------------------------------------------------------------------- divergence


def finite_checkpoints(workdir) -> dict[int, bool]:
  out = {}
  for name in steps_on_disk(workdir):
    with ocp.StandardCheckpointer() as c:
      tree = c.restore(os.path.abspath(os.path.join(workdir, "checkpoints", name, "state")))
    out[int(name)] = all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree))
  return out


def test_skip_keeps_the_old_params_for_a_non_finite_step():
  cfg = tiny("train.on_nonfinite='skip'")
  sizes = validate(cfg, 1)
  mesh = sharding.make_mesh(sizes, ONE)
  model, (tx, schedule) = TransformerLM(cfg.model), make_optimizer(cfg.train)
  batch_sh = sharding.batch_sharding(mesh)
  stream = PackedStream([bytes(range(32, 127)) * 40], 32, 8, 0)
  with jax.set_mesh(mesh):
    state, state_sh = init_state(model, tx, mesh, jnp.zeros((8, 32), jnp.int32), jax.random.PRNGKey(0))
    step = make_train_step(model, tx, schedule, cfg.train, state_sh, {k: batch_sh for k in
                           ("inputs", "targets", "segment_ids", "weights")})
    batch = lambda i: {k: jnp.asarray(v) for k, v in lm_example(stream.batch(i)).items()}  # noqa: E731
    state, m1 = step(state, batch(0))
    before = jax.device_get(state)
    poisoned = {**batch(1), "weights": batch(1)["weights"].at[0, 0].set(jnp.nan)}
    state, m2 = step(state, poisoned)
    after = jax.device_get(state)
    state, m3 = step(state, batch(2))
  assert bool(m1["ok"]) and not bool(m2["ok"]) and bool(m3["ok"])
  assert int(after["step"]) == 2 and int(state["step"]) == 3
  jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
  jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state))


def test_divergence_stops_naming_the_step_and_never_checkpoints_non_finite_values(tmp_path):
  cfg = tiny("train.learning_rate=1e12", "train.grad_clip=0.0", "train.warmup_steps=0", "train.steps=30",
             "train.checkpoint_every=1")
  with pytest.raises(NonFiniteError, match=r"at step \d+") as e:
    train(cfg, str(tmp_path), devices=ONE)
  failed = int(str(e.value).split("at step ")[1].split(" ")[0])
  saved = finite_checkpoints(tmp_path)
  assert saved and max(saved) < failed and all(saved.values()), (failed, saved)


# ----------------------------------------------------------------------------- mesh changes


@pytest.mark.slow
def test_moe_checkpoint_restores_across_expert_parallel_sizes_and_onto_one_device(tmp_path):
  moe = ("model.num_experts=4", "model.top_k=2", "train.log_every=2", "train.checkpoint_every=100")
  train(tiny(*moe, "mesh.data=1", "mesh.tensor=2", "mesh.expert=4"), str(tmp_path / "run"), stop_after=4)
  train(tiny(*moe, "mesh.data=4", "mesh.expert=2"), str(tmp_path / "run"), stop_after=8)
  train(tiny(*moe), str(tmp_path / "run"), devices=ONE, stop_after=12)  # expert axis 1, 8 devices -> 1
  train(tiny(*moe), str(tmp_path / "ref"), devices=ONE, stop_after=12)
  got, ref = rows(tmp_path / "run"), rows(tmp_path / "ref")
  assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(2, 13, 2))
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=2e-4)


# ----------------------------------------------------------------------------- numerical faults


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_softmax_with_extreme_logits_is_finite_and_exact(implementation):
  from efficient_attn.attention import softmax_attention
  from reference import random_qkv, softmax_reference

  q, k, v = random_qkv(1, 64, 64, 2, 2, 16, seed=3, std=100.0)  # logits ~ +-1e4 (fp32 exp overflows at 88)
  fn = jax.jit(lambda q, k, v: softmax_attention(q, k, v, is_causal=True, implementation=implementation,
                                                 chunk_size=16))
  out = fn(q, k, v)
  np.testing.assert_allclose(out, softmax_reference(q, k, v, is_causal=True), atol=2e-3)
  grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  out_bf16 = fn(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out_bf16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out_bf16, np.float32)).all()


@pytest.mark.parametrize("router_scale", [0.0, 1e4], ids=["all-tied", "extreme"])
@pytest.mark.parametrize("opts", [dict(top_k=1), dict(top_k=2), dict(router="experts_choose"),
                                  dict(dropless=True, top_k=2)], ids=["top1", "top2", "experts_choose", "dropless"])
def test_router_ties_and_extreme_logits_stay_finite(router_scale, opts):
  from efficient_attn.moe import moe_ffn

  rng = np.random.default_rng(0)
  D, F, E = 16, 24, 4
  x = jnp.asarray(rng.normal(size=(2, 32, D)), jnp.float32)
  params = {"router": jnp.asarray(rng.normal(size=(D, E)) * router_scale, jnp.float32),
            "w_in": jnp.asarray(rng.normal(size=(E, D, F)) * D ** -0.5, jnp.float32),
            "w_out": jnp.asarray(rng.normal(size=(E, F, D)) * F ** -0.5, jnp.float32)}

  def loss(params, x):
    y, aux = moe_ffn(x, params, capacity_factor=1.25, **opts)
    return jnp.sum(y ** 2) + aux["load_balancing_loss"] + 1e-9 * aux["router_z_loss"], (y, aux)

  (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
  assert np.isfinite(np.asarray(y)).all() and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(aux))
  frac = np.asarray(aux["expert_fraction"])
  assert frac.shape == (E,) and (frac >= 0).all() and np.isclose(frac.sum(), 1.0)
  assert 0.0 <= float(aux["dropped_fraction"]) <= 1.0
