"""Training, top to bottom: data -> mesh -> state -> jitted step -> loop -> checkpoints.

    state  = init_state(...)            eval_shape -> shardings -> jit(init, out_shardings)   (state.py)
    step   = jax.jit(train_step, in/out shardings, donate the state)
    loop:  batch i is a pure function of (seed, i); log metrics.jsonl (runlog.py); save with orbax (state.py)
    resume: the latest checkpoint holds the state and the data position (= step);
            DIR/config.json holds the config, and a rerun that changes the model / data is refused

The same code runs on one CPU, an emulated 8-device CPU mesh, a GPU cluster or a
TPU pod (`jax.distributed.initialize()` is called when launched multi-process).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from efficient_attn import platform, reliability, runlog, sharding
from efficient_attn.config import CONFIG_JSON, Config, ConfigError, resolve_vocab, save_config_json, validate
from efficient_attn.attention import context
from efficient_attn.data import pipeline
from efficient_attn.data.text import TokenStream, lm_example
from efficient_attn.model import TransformerLM
from efficient_attn.moe import collect_aux
from efficient_attn.state import (checkpoint_manager, compiled_redraw, init_state, restore_checkpoint,
                                  save_checkpoint)


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN/inf; nothing from that step was saved."""


# ----------------------------------------------------------------------------- pieces


def make_schedule(t) -> optax.Schedule:
  """Learning rate per step: linear warmup over train.warmup_steps to train.learning_rate, then
  train.schedule: "cosine" decays to 10% at train.steps; "linear" decays linearly to 10%;
  "constant" stays; "wsd" (warmup-stable-decay, Hu et al. 2024) stays until the last 20% of
  train.steps, then decays linearly to 10%. A resume that changes train.steps stretches it."""
  lr, warm, steps = t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1)
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, steps, lr * 0.1)
  if t.schedule == "linear":
    parts, bounds = [optax.linear_schedule(lr, lr * 0.1, steps - warm)], []
  elif t.schedule == "constant":
    parts, bounds = [optax.constant_schedule(lr)], []
  else:  # wsd
    stable_end = max(warm, steps - max(1, round(0.2 * steps)))
    parts = [optax.constant_schedule(lr), optax.linear_schedule(lr, lr * 0.1, steps - stable_end)]
    bounds = [stable_end]
  if warm:
    parts, bounds = [optax.linear_schedule(0.0, lr, warm), *parts], [warm, *bounds]
  return optax.join_schedules(parts, bounds) if bounds else parts[0]


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on `make_schedule(t)`, global-norm clipping; no weight decay on norms/biases."""
  schedule = make_schedule(t)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay, mask=decay_mask))
  return tx, schedule


def loss_fn(params, batch, model, t, buffers=None, dropout_rng=None):
  """Mean next-byte cross-entropy over weighted targets, plus MoE aux losses.

  `buffers`: the model's non-trainable "buffers" collection (the Performer's projections), if any.
  `dropout_rng`: turns on the model's dropout (model.dropout > 0); None = deterministic.
  """
  variables = {"params": params, **({"buffers": buffers} if buffers else {})}
  rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
  logits, mutated = model.apply(variables, batch["inputs"], segment_ids=batch["segment_ids"],
                                positions=batch.get("positions"), mutable=["intermediates"], rngs=rngs)
  nll = token_nll(logits, batch["targets"])
  w = batch["weights"]
  loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
  aux = collect_aux(mutated.get("intermediates", {}))
  total = loss
  if aux:
    total = total + t.aux_loss_weight * aux["load_balancing_loss"] + t.z_loss_weight * aux["router_z_loss"]
  return total, {"loss": loss, **aux}


def token_nll(logits_BTV, targets_BT):
  """Negative log-likelihood [B, T] of each target under the logits (float32)."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
  return -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]


def dropout_key(t, step):
  """The dropout key of optimizer step `step`: a function of (train.seed, step), so a resumed run drops
  what an uninterrupted one does (micro-batch i of train.grad_accum folds in i)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(t.seed), _DROPOUT_STREAM), step)


_DROPOUT_STREAM = 1  # PRNGKey(seed) itself inits the params; the Performer redraw uses PRNGKey(seed + 1)


def make_train_step(model, tx, schedule, t, state_sh, batch_sh):
  """The one jitted update: explicit shardings, the old state donated.

  With train.grad_accum = k > 1 the batch is k micro-batches whose gradients are summed in a
  `lax.scan` (one micro-batch's activations alive at a time), each weighted by its target
  count, so the update equals the whole batch's (MoE aux losses: the micro-batches' mean).
  """

  def grads_of(params, buffers, batch, rng):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, model, t, buffers, rng)
    return grads, metrics

  def train_step(state, batch):
    rng = dropout_key(t, state["step"]) if model.config.dropout > 0 else None
    if t.grad_accum == 1:
      grads, metrics = grads_of(state["params"], state.get("buffers"), batch, rng)
    else:
      grads, metrics = _accumulate(grads_of, state["params"], state.get("buffers"), batch, rng, t.grad_accum,
                                   state_sh["params"], batch_sh)
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


def _accumulate(grads_of, params, buffers, batch, rng, k, params_sh, batch_sh):
  """(grads, metrics) of the whole batch from k micro-batches, each weighted by its sum of target weights.

  Micro-batch j holds rows j, j+k, j+2k, ...: every device keeps its own rows (no resharding).
  """
  def split(x, sh):  # [B, ...] -> [k, B/k, ...]
    x = jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)
    return jax.lax.with_sharding_constraint(x, NamedSharding(sh.mesh, P(None, *sh.spec)))

  micro = {name: split(x, batch_sh[name]) for name, x in batch.items()}

  def body(acc, xs):
    i, mb = xs
    sums, total = acc
    w = jnp.sum(mb["weights"]).astype(jnp.float32)
    out = grads_of(params, buffers, mb, None if rng is None else jax.random.fold_in(rng, i))
    return (jax.tree.map(lambda a, x: a + (w * x).astype(a.dtype), sums, out), total + w), None

  shapes = jax.eval_shape(grads_of, params, buffers, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = (jax.tree.map(lambda s, sh: jax.lax.with_sharding_constraint(jnp.zeros(s.shape, s.dtype), sh),
                        shapes[0], params_sh),
           jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1]))
  (sums, total), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(k), micro))
  return jax.tree.map(lambda x: (x / jnp.maximum(total, 1.0)).astype(x.dtype), sums)


def make_eval_step(model, t, state_sh, batch_sh, token_bytes_V):
  """Jitted (params, buffers, batch) -> (total nats, targets counted, bytes of text they stand for).

  token_bytes_V: bytes of text per token id, so bits per byte compare across tokenizers.
  """
  bytes_V = jnp.asarray(token_bytes_V, jnp.float32)

  def eval_step(params, buffers, batch):
    variables = {"params": params, **({"buffers": buffers} if buffers else {})}
    logits = model.apply(variables, batch["inputs"], segment_ids=batch["segment_ids"], positions=batch.get("positions"))
    w = batch["weights"]
    return (jnp.sum(token_nll(logits, batch["targets"]) * w), jnp.sum(w),
            jnp.sum(bytes_V[batch["targets"]] * w))

  return jax.jit(eval_step, in_shardings=(state_sh["params"], state_sh.get("buffers"), batch_sh))


# ----------------------------------------------------------------------------- the loop


@platform.for_this_host()
def train(cfg: Config, workdir: str, *, progress: bool | None = None, devices=None,
          stop_after: int | None = None, announce: str | None = None) -> dict[str, Any]:
  """Trains (or resumes) a TransformerLM in `workdir`; returns the run's summary row.

  devices: the devices of the mesh (default: all). stop_after: stop once this
  many steps are done, as if preempted (tests and drills; checkpoint first).
  SIGTERM / SIGINT stop the same way after the current step; the returned row then
  has `stopped_by` (the signal's name) and `stopped_at` (the step saved). announce: a line for stderr
  once the workdir is ours (the CLI's "continuing the run in DIR ..."), never before a refusal.
  progress: a tqdm bar on stderr (default: when stderr is a terminal); without it every
  logged step prints one plain line. Either way a resume prints "resumed from step N
  (checkpoint DIR)" and the run ends with a summary line (`runlog.RunLog.summary`). The state is built,
  saved and restored by `efficient_attn.state`; the rows' fields come from `runlog`.
  The workdir keeps the config in DIR/config.json; a rerun whose model / data / optimiser
  settings differ is refused before compiling (`reliability.check_same_run`).
  The summary row: step, loss (mean over the last logging window), val_loss (nats per token), val_bpb
  (bits per byte of text: comparable across tokenizers), val_perplexity,
  tokens_per_sec (this invocation's training steps), time_s (training seconds, all
  invocations), wall_s (this invocation).
  """
  wall0 = time.perf_counter()
  devices = jax.devices() if devices is None else list(devices)
  sizes = validate(cfg, len(devices))  # every user error surfaces here, before compiling
  m, t = cfg.model, cfg.train
  if t.tensorboard:
    runlog.require_tensorboard()
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory; pass a directory (it is created if missing).")
  cfg = resolve_vocab(cfg)  # model.vocab_size follows data.tokenizer unless set
  m = cfg.model
  # Another run's workdir is refused here; an older one without config.json gets a note.
  note = reliability.check_same_run(workdir, cfg, reliability.has_checkpoints(workdir))
  # The store is built (and the tokenizer trained) once, then mapped.
  data = pipeline(cfg.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed, progress=progress)
  stream, val_stream = data.train, data.validation
  os.makedirs(workdir, exist_ok=True)
  main = jax.process_index() == 0
  lock = reliability.workdir_lock(workdir) if main else contextlib.nullcontext()
  with lock, reliability.StopSignals() as stop, contextlib.closing(checkpoint_manager(workdir, t)) as mngr:
    if announce and main:
      print(f"efficient-attn: {announce}", file=sys.stderr, flush=True)
    mesh = sharding.make_mesh(sizes, devices)
    model = TransformerLM(m, mesh=mesh if m.num_experts and sizes['expert'] > 1 else None,
                          context_layout=cfg.mesh.context_layout)
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
      if main:  # the config this workdir's checkpoints now belong to
        save_config_json(cfg, os.path.join(workdir, CONFIG_JSON))
      keys = ("inputs", "targets", "segment_ids", "weights") + (("positions",) if sizes["context"] > 1 else ())
      shardings = {k: batch_sh for k in keys}
      train_step = make_train_step(model, tx, schedule, t, state_sh, shardings)
      eval_step = make_eval_step(model, t, state_sh, shardings, data.token_bytes)

      def get_batch(s: TokenStream, i: int):  # each process reads only its own rows, laid out for the context axis
        example = lm_example(s.batch(i, jax.process_index(), jax.process_count()))
        return context.global_example(example, mesh, cfg.mesh.context_layout)

      def evaluate(state) -> dict:  # the same eval_batches held-out batches every time, token-weighted
        sums = [eval_step(state["params"], state.get("buffers"), get_batch(val_stream, i))
                for i in range(t.eval_batches)]
        return runlog.val_metrics(*(float(sum(float(s[k]) for s in sums)) for k in range(3)))

      redraw = compiled_redraw(model, t, state_sh, dummy, state)

      compiled = train_step.lower(state, get_batch(stream, start)).compile()
      log = runlog.RunLog(workdir, t, start, progress=progress, enabled=main)
      try:
        if note:
          log.say(note)
        if m.hybrid:  # the expanded pattern, as config.json's model.attention_pattern cycles it
          log.say(f"layers: {', '.join(m.layer_families())}")
        if restored is not None:
          log.say(f"resumed from step {start} (checkpoint {os.path.join(str(mngr.directory), str(start))})")
        evaluate = evaluate if val_stream is not None else None
        state, row, val, speed = _loop(cfg, compiled, state, get_batch, stream, start, mngr, log, stop,
                                       len(devices), stop_after, evaluate, redraw)
        summary = log.summary(step=int(state["step"]), row=row, val=val, tokens_per_sec=speed,
                              wall_s=time.perf_counter() - wall0)
      finally:  # the checkpoint manager's close() waits for an in-flight save
        log.close()
  if stop.received:
    summary = {**summary, "stopped_by": stop.received, "stopped_at": int(state["step"])}
  return summary


def _loop(cfg, compiled, state, get_batch, stream, start, mngr, log, stop, num_devices, stop_after,
          evaluate=None, redraw=None):
  """Steps `start..train.steps`, logging and checkpointing; returns (state, last logged row, final
  validation row ({} unless this call reached train.steps), tokens/s).

  Each row has `loss` (the logged step's), `loss_avg` (mean over the steps since the last
  row), `time_s` (training seconds so far, compile and evaluation excluded, carried
  across resumes), `tokens_per_sec` and `mfu` (None with `mfu_note` when it cannot be
  trusted: see `flops.honest_mfu`). With train.eval_every, every eval_every-th step (a
  multiple of log_every) also logs {"step", "val_loss", "val_perplexity", "val_bpb", "time_s"} on the same
  held-out batches. tokens/s returned: over this call's training steps (None if none ran)."""
  t = cfg.train
  tokens = t.batch_size * t.seq_len
  cost = runlog.cost_fields(cfg, compiled, num_devices)
  row: dict[str, Any] = {}
  t_last, steps_since, loss_sum = time.perf_counter(), 0, 0.0
  t_start, train_s, timed, elapsed = t_last, 0.0, 0, log.elapsed
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
      host = runlog.to_host(metrics)
      dt = time.perf_counter() - t_last
      tps = tokens * steps_since / dt
      elapsed, train_s, timed = elapsed + dt, train_s + dt, timed + steps_since
      row = {"step": done, "loss": host.pop("loss"), "loss_avg": float(loss_sum) / steps_since, **host,
             "time_s": elapsed, "tokens_per_sec": tps, **runlog.mfu_fields(cost, tps, num_devices), **cost}
      row.pop("ok", None)
      log.elapsed = elapsed
      eta = (time.perf_counter() - t_start) / (done - start) * (t.steps - done)
      log.step(row, eta)
      if evaluate is not None and t.eval_every and done % t.eval_every == 0 and done < t.steps:
        log.val({"step": done, **evaluate(state), "time_s": elapsed})  # not counted as training
      t_last, steps_since, loss_sum = time.perf_counter(), 0, 0.0
    stopping = (stop_after is not None and done >= stop_after) or stop.requested()
    if done % t.checkpoint_every == 0 or done == t.steps or stopping:
      save_checkpoint(mngr, done, state, position=done)
    log.advance()
    if stopping:
      break
  mngr.wait_until_finished()
  val = {}
  if evaluate is not None and start < t.steps and int(state["step"]) == t.steps:  # the final validation
    val = {"step": t.steps, **evaluate(state), "time_s": log.elapsed}
    log.val(val)
  return state, row, val, (tokens * timed / train_s if timed else None)
