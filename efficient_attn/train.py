"""Training, top to bottom: data -> mesh -> state -> jitted step -> loop -> checkpoints.

    state  = init_state(...)            eval_shape -> shardings -> jit(init, out_shardings)
    step   = jax.jit(train_step, in/out shardings, donate the state)
    loop:  batch i is a pure function of (seed, i); log metrics.jsonl; save with orbax
    resume: the latest checkpoint holds the state and the data position (= step)

The same code runs on one CPU, an emulated 8-device CPU mesh, a GPU cluster or a
TPU pod (`jax.distributed.initialize()` is called when launched multi-process).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from efficient_attn import flops, reliability, sharding
from efficient_attn.config import Config, ConfigError, validate
from efficient_attn.data.text import PackedStream, lm_example, load_documents, split_documents
from efficient_attn.layers import redraw_buffers
from efficient_attn.measure import temp_bytes, xla_flops
from efficient_attn.model import TransformerLM
from efficient_attn.moe import collect_aux


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN/inf; nothing from that step was saved."""


# ----------------------------------------------------------------------------- pieces


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay to 10%, global-norm clipping; no decay on norms/biases."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps,
                                                max(t.steps, t.warmup_steps + 1), t.learning_rate * 0.1)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay, mask=decay_mask))
  return tx, schedule


def loss_fn(params, batch, model, t, buffers=None):
  """Mean next-byte cross-entropy over weighted targets, plus MoE aux losses.

  `buffers`: the model's non-trainable "buffers" collection (the Performer's projections), if any.
  """
  variables = {"params": params, **({"buffers": buffers} if buffers else {})}
  logits, mutated = model.apply(variables, batch["inputs"], segment_ids=batch["segment_ids"],
                                mutable=["intermediates"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  w = batch["weights"]
  loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
  aux = collect_aux(mutated.get("intermediates", {}))
  total = loss
  if aux:
    total = total + t.aux_loss_weight * aux["load_balancing_loss"] + t.z_loss_weight * aux["router_z_loss"]
  return total, {"loss": loss, **aux}


def init_state(model, tx, mesh, dummy, rng, *, abstract_only=False):
  """Builds the sharded train state: eval_shape -> shardings by the rules table -> jit(init).

  abstract_only: return ShapeDtypeStructs instead (a resume restores into them and
  never compiles init, which for XLA's threefry takes longer than the train step).
  """

  def init(rng):
    variables = model.init(rng, dummy)
    params = variables["params"]
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if variables.get("buffers"):  # non-trainable (Performer projections): saved, never optimised
      state["buffers"] = variables["buffers"]
    return state

  abstract = jax.eval_shape(init, rng)  # boxed with logical axis names (nn.Partitioned)
  state_sh = sharding.param_shardings(abstract, mesh)
  if abstract_only:
    return nn.unbox(abstract), state_sh
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=state_sh)(rng)
  return state, state_sh


def make_train_step(model, tx, schedule, t, state_sh, batch_sh):
  """The one jitted update: explicit shardings, the old state donated."""

  def train_step(state, batch):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, model, t,
                                                                    state.get("buffers"))
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {**state, "step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt_state": opt_state}
    if t.on_nonfinite == "skip":  # keep the old params and moments, still count the step
      new = {**jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), "step": state["step"] + 1}
    return new, {**metrics, "grad_norm": grad_norm, "ok": ok, "learning_rate": schedule(state["step"])}

  return jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                 donate_argnums=0)


def make_eval_step(model, t, state_sh, batch_sh):
  def eval_step(params, buffers, batch):
    return loss_fn(params, batch, model, t, buffers)[1]["loss"]

  return jax.jit(eval_step, in_shardings=(state_sh["params"], state_sh.get("buffers"), batch_sh))


def make_redraw(model, t, state_sh, dummy):
  """Jitted (state, step) -> state with every attention buffer drawn anew (FAVOR+ feature redraw).

  The draw for step s uses fold_in(PRNGKey(train.seed + 1), s), so a resumed run redraws the same
  features as an uninterrupted one. Only the buffers are computed (the forward pass is dead code).
  """

  def redraw(state, step):
    rng = jax.random.fold_in(jax.random.PRNGKey(t.seed + 1), step)
    variables = {"params": state["params"], "buffers": state["buffers"]}
    return {**state, "buffers": redraw_buffers(model, variables, rng, dummy)["buffers"]}

  return jax.jit(redraw, in_shardings=(state_sh, None), out_shardings=state_sh, donate_argnums=0)


def _compiled_redraw(model, t, state_sh, dummy, state):
  """`make_redraw` compiled ahead of the loop (its compile time is not training time); None if nothing to redraw."""
  if not t.redraw_every or "buffers" not in state:
    return None
  compiled = make_redraw(model, t, state_sh, dummy).lower(state, jnp.int32(0)).compile()
  return lambda state, step: compiled(state, jnp.int32(step))


# ----------------------------------------------------------------------------- checkpoints and logs


def checkpoint_manager(workdir: str, t) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save cut short by SIGKILL leaves only `<step>.orbax-checkpoint-tmp-*`.
  options = ocp.CheckpointManagerOptions(max_to_keep=t.max_to_keep, create=True,
                                         enable_async_checkpointing=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save_checkpoint(mngr, step: int, state, position: int) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave({"position": position})))


def restore_checkpoint(mngr, step: int, state_like, state_sh):
  """Restores onto `state_sh` (any mesh: orbax reshards), returns (state, data position)."""
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, state_sh)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                   data=ocp.args.JsonRestore()))
  return out["state"], int(out["data"]["position"])


def _metrics_log(workdir: str, resume_step: int):
  """Opens metrics.jsonl for appending, first dropping rows past the resumed step (they will be redone)
  and a last line cut short by a kill. Returns (file, training seconds logged up to the resumed step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  elapsed = 0.0
  if os.path.exists(path):
    with open(path) as f:
      rows = [r for r in f if r.endswith("\n") and (row := _json_or_none(r)) is not None
              and row.get("step", 0) <= resume_step]
    with open(path + ".tmp", "w") as f:
      f.writelines(rows)
    os.replace(path + ".tmp", path)
    elapsed = max([json.loads(r).get("time_s", 0.0) for r in rows], default=0.0)
  return open(path, "a"), elapsed


def _json_or_none(line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


def _to_host(metrics: dict) -> dict:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = v.tolist() if v.ndim else v.item()
  return out


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, workdir: str, *, progress: bool | None = None, devices=None,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) a TransformerLM in `workdir`; returns the last logged metrics row.

  devices: the devices of the mesh (default: all). stop_after: stop once this
  many steps are done, as if preempted (tests and drills; checkpoint first).
  SIGTERM / SIGINT stop the same way after the current step; the returned row then
  has `stopped_by` (the signal's name) and `stopped_at` (the step saved).
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = validate(cfg, len(devices))  # every user error surfaces here, before compiling
  m, t = cfg.model, cfg.train
  docs = load_documents(cfg.data.name, cfg.data.files or None, cfg.data.text_field)
  train_docs, val_docs = split_documents(docs, cfg.data.val_fraction)
  stream = PackedStream(train_docs, t.seq_len, t.batch_size, t.seed)
  val_stream = PackedStream(val_docs or train_docs, t.seq_len, t.batch_size, t.seed + 1) \
      if cfg.data.val_fraction > 0 else None
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory; pass a directory (it is created if missing).")
  os.makedirs(workdir, exist_ok=True)
  lock = reliability.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, reliability.StopSignals() as stop, contextlib.closing(checkpoint_manager(workdir, t)) as mngr:
    mesh = sharding.make_mesh(sizes, devices)
    model = TransformerLM(m, mesh=mesh if m.num_experts and sizes['expert'] > 1 else None)
    tx, schedule = make_optimizer(t)
    batch_sh = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
      dummy = jnp.zeros((t.batch_size, t.seq_len), jnp.int32)
      rng = jax.random.PRNGKey(t.seed)
      shapes, state_sh = init_state(model, tx, mesh, dummy, rng, abstract_only=True)
      restored = reliability.restore_newest_intact(
          mngr, lambda step: restore_checkpoint(mngr, step, shapes, state_sh))
      if restored is not None:
        (state, start), _ = restored
      else:
        (state, _), start = init_state(model, tx, mesh, dummy, rng), 0
      shardings = {k: batch_sh for k in ("inputs", "targets", "segment_ids", "weights")}
      train_step = make_train_step(model, tx, schedule, t, state_sh, shardings)
      eval_step = make_eval_step(model, t, state_sh, shardings)

      def get_batch(s: PackedStream, i: int):  # each process builds only its own rows
        return sharding.global_batch(lm_example(s.batch(i, jax.process_index(), jax.process_count())), mesh)

      def evaluate(state) -> float:  # mean loss over the same eval_batches held-out batches every time
        return float(np.mean([float(eval_step(state["params"], state.get("buffers"), get_batch(val_stream, i)))
                              for i in range(t.eval_batches)]))

      redraw = _compiled_redraw(model, t, state_sh, dummy, state)

      compiled = train_step.lower(state, get_batch(stream, start)).compile()
      log, elapsed = _metrics_log(workdir, start) if jax.process_index() == 0 else (None, 0.0)
      try:
        state, row = _loop(cfg, compiled, state, get_batch, stream, start, mngr, log, stop, len(devices),
                           progress, stop_after, elapsed, evaluate if val_stream is not None else None, redraw)
        if val_stream is not None and start < t.steps and int(state["step"]) == t.steps:
          val = evaluate(state)
          row = {"step": t.steps, "val_loss": val, "val_bpb": val / np.log(2), "time_s": row.get("time_s")}
          if log:
            log.write(json.dumps(row) + "\n")
      finally:  # the checkpoint manager's close() waits for an in-flight save
        if log:
          log.close()
  if stop.received:
    row = {**row, "stopped_by": stop.received, "stopped_at": int(state["step"])}
  return row


def _loop(cfg, compiled, state, get_batch, stream, start, mngr, log, stop, num_devices, progress, stop_after,
          elapsed=0.0, evaluate=None, redraw=None):
  """Steps `start..train.steps`, logging and checkpointing; returns (state, last logged row).

  Each row has `loss` (the logged step's), `loss_avg` (mean over the steps since the last
  row) and `time_s` (training seconds so far, compile and evaluation excluded, carried
  across resumes). With train.eval_every, every eval_every-th step (a multiple of
  log_every) also logs {"step", "val_loss", "time_s"} on the same held-out batches."""
  m, t = cfg.model, cfg.train
  tokens = t.batch_size * t.seq_len
  fpt = flops.model_flops_per_token(m, t.seq_len)["train"]
  peak, _ = flops.peak_flops_per_device(m.dtype if m.dtype != "bfloat16" else "float32")
  # cost_analysis of an SPMD program is one device's share: every device executes its partition.
  executed = xla_flops(compiled) * num_devices / tokens
  # Emulated CPU devices share one machine, whose measured matmul rate is the peak.
  peak_devices = 1 if jax.devices()[0].platform == "cpu" else num_devices
  static = {"flops_per_token": fpt, "executed_flops_per_token": executed, "temp_bytes": temp_bytes(compiled)}
  from tqdm.auto import tqdm
  bar = tqdm(total=t.steps, initial=start, desc="train", unit="step",
             disable=not (sys.stderr.isatty() if progress is None else progress) or jax.process_index() != 0)
  row: dict[str, Any] = {}
  t_last, steps_since, loss_sum = time.perf_counter(), 0, 0.0
  for step in range(start, t.steps):
    if redraw is not None and step > 0 and step % t.redraw_every == 0:
      state = redraw(state, step)
    state, metrics = compiled(state, get_batch(stream, step))
    steps_since += 1
    loss_sum = loss_sum + metrics["loss"]  # on device: no host sync in the step loop
    if t.on_nonfinite == "stop" and not bool(metrics["ok"]):
      mngr.wait_until_finished()
      raise NonFiniteError(f"non-finite loss or gradient at step {step + 1} (loss={float(metrics['loss'])});"
                           f" stopped without saving it; the last checkpoint is step {mngr.latest_step()}.")
    done = step + 1
    if done % t.log_every == 0 or done == t.steps:
      host = _to_host(metrics)
      dt = time.perf_counter() - t_last
      tps = tokens * steps_since / dt
      elapsed += dt
      row = {"step": done, "loss": host.pop("loss"), "loss_avg": float(loss_sum) / steps_since, **host,
             "time_s": elapsed, "tokens_per_sec": tps,
             "mfu": flops.mfu(fpt, tps, peak_devices, peak), **static}
      row.pop("ok", None)
      if log:
        log.write(json.dumps(row) + "\n")
        log.flush()
      bar.set_postfix(loss=f"{row['loss']:.3f}")
      if evaluate is not None and t.eval_every and done % t.eval_every == 0 and done < t.steps:
        val = {"step": done, "val_loss": evaluate(state), "time_s": elapsed}  # not counted as training
        if log:
          log.write(json.dumps(val) + "\n")
          log.flush()
      t_last, steps_since, loss_sum = time.perf_counter(), 0, 0.0
    stopping = (stop_after is not None and done >= stop_after) or stop.requested()
    if done % t.checkpoint_every == 0 or done == t.steps or stopping:
      save_checkpoint(mngr, done, state, position=done)
    bar.update(1)
    if stopping:
      break
  bar.close()
  mngr.wait_until_finished()
  return state, row

