"""Shared by the synthetic-task experiments (listops, mqar): one small jitted training loop.

    train_and_eval(model, loss_fn, batch_fn, eval_batches, ...)

batch i is `batch_fn(i)`, a pure function of the step (the generators are seeded
per step, see `step_seed`), built on a background thread while step i - 1 runs;
the update is one jitted AdamW step (`train.make_optimizer`) compiled ahead of
time, so its compiled temp memory is known before the first step. `loss_fn(variables,
batch) -> (loss, (correct, count))` is the task (`variables`: the model's {"params"} plus its
fixed {"buffers"} if it has any): the step differentiates the loss w.r.t. the params,
evaluation sums `correct` and `count` over the held-out batches. One device, unless
`mesh` (`experiment.context_mesh`: the runner's `mesh.context` = P devices) is given: then every
batch, train and eval, is laid out for the split (`attention.context.lay_out_example`, which adds the
"positions" RoPE needs: the model must take them) and sharded over it, the params are replicated, and
the step runs under `jax.set_mesh`, where `attend` splits each sequence over the P devices. The task
losses are means over tokens, so the order of the laid-out tokens does not change them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.config import Config, ConfigError, MeshConfig, TrainConfig, validate
from efficient_attn.measure import temp_bytes
from efficient_attn.train import make_optimizer


def step_seed(seed: int, stream: int, step: int = 0) -> int:
  """An int seed for the data of `step` in `stream` (0 = train, 1 = eval): disjoint streams, pure."""
  return int(np.random.SeedSequence((seed, stream, step)).generate_state(1)[0])


def check_counts(cfg: dict, experiment: str, keys: tuple[str, ...], hint: str = "") -> None:
  """ConfigError unless cfg[k] >= 1 for every k in keys and eval_examples is whole batches."""
  for k in keys:
    if cfg[k] < 1:
      raise ConfigError(f"experiment {experiment}: {k}={cfg[k]} must be a positive integer{hint}.")
  if cfg["eval_examples"] % cfg["batch_size"]:
    raise ConfigError(f"experiment {experiment}: eval_examples={cfg['eval_examples']} is not a multiple of"
                      f" batch_size={cfg['batch_size']}; evaluation runs whole batches.")


def check_model(m, *, seq_len: int, batch_size: int, what: str, context: int = 1,
                layout: str = "zigzag") -> None:
  """ConfigError (one sentence, prefixed by `what`) if ModelConfig `m` cannot train on [batch_size, seq_len]
  with each sequence split over `context` devices in `layout`."""
  mesh = MeshConfig(data=1, context=context, context_layout=layout)
  try:
    validate(Config(model=m, train=TrainConfig(seq_len=seq_len, batch_size=batch_size), mesh=mesh), context,
             text_data=False)  # the task's own tokens, not data.tokenizer's
  except ConfigError as e:
    raise ConfigError(f"{what}: {e}") from None


def placement(mesh, layout: str) -> tuple[Callable[[dict], dict], Any]:
  """(place, whole) of a run on `mesh` (None: one device, unsplit: the identity and None).

  place: a batch of [B, T] NumPy arrays -> in `layout` order for the mesh's `context` axis with "positions"
  added, sharded over the mesh (T on `context`); whole: the sharding of the rest (params, optimiser state,
  loss), replicated on every device."""
  if mesh is None:
    return (lambda batch: batch), None
  from efficient_attn import sharding
  from efficient_attn.attention import context

  return (lambda batch: context.global_example(batch, mesh, layout)), sharding.replicated(mesh)


def train_and_eval(model, loss_fn: Callable, batch_fn: Callable[[int], dict], eval_batches: list[dict], *,
                   steps: int, learning_rate: float, warmup_steps: int, seed: int, tokens_per_batch: int,
                   eval_every: int = 0, progress: bool = False, desc: str = "train", mesh=None,
                   context_layout: str = "zigzag") -> dict[str, Any]:
  """Trains `model` for `steps` AdamW steps and evaluates on `eval_batches`.

  Returns the final eval loss / accuracy, the train-loss curve (means over
  ~20 windows), the eval curve (every `eval_every` steps and at the end),
  tokens/s of the jitted step alone (median over steps), its compiled temp
  bytes (per device), and wall / compile (init and step) seconds. A non-finite train loss
  stops the run: `diverged_at_step` is that step (else None). `mesh`: each sequence split over its
  `context` axis in `context_layout` (the model's own `context_layout` must be the same), see the module doc.
  """
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):  # where `attend` finds the split
    return _train_and_eval(model, loss_fn, batch_fn, eval_batches, steps=steps, learning_rate=learning_rate,
                           warmup_steps=warmup_steps, seed=seed, tokens_per_batch=tokens_per_batch,
                           eval_every=eval_every, progress=progress, desc=desc, mesh=mesh, layout=context_layout)


def _train_and_eval(model, loss_fn, batch_fn, eval_batches, *, steps, learning_rate, warmup_steps, seed,
                    tokens_per_batch, eval_every, progress, desc, mesh, layout) -> dict[str, Any]:
  from tqdm.auto import tqdm

  place, whole = placement(mesh, layout)
  tx, _ = make_optimizer(TrainConfig(steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
                                     seed=seed))
  t0 = time.perf_counter()
  raw = batch_fn(0)
  first, eval_batches = place(raw), [place(b) for b in eval_batches]
  # rbg keys: XLA:CPU compiles threefry init for several seconds, rbg in a fraction of that. The params do
  # not depend on the tokens' order: on a mesh they are drawn unsplit on one device, then copied to all.
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(None):
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(seed, impl="rbg"), raw["inputs"]))
  if mesh is not None:
    variables = jax.device_put(variables, whole)
  params = variables["params"]
  # Non-trainable buffers (the Performer's per-layer projections) ride along, fixed: never optimised.
  fixed = {"buffers": variables["buffers"]} if "buffers" in variables else {}
  task_loss = lambda params, batch: loss_fn({"params": params, **fixed}, batch)  # noqa: E731
  state = (params, tx.init(params)) if mesh is None else jax.device_put((params, tx.init(params)), whole)

  def train_step(state, batch):
    params, opt = state
    (loss, _), grads = jax.value_and_grad(task_loss, has_aux=True)(params, batch)
    updates, opt = tx.update(grads, opt, params)
    return (jax.tree.map(jnp.add, params, updates), opt), loss

  # On a mesh the new state stays whole on every device, like the one the compiled step takes.
  pinned = {} if mesh is None else {"out_shardings": whole}
  step = jax.jit(train_step, donate_argnums=0, **pinned).lower(state, first).compile()
  evaluate = jax.jit(task_loss)
  compile_s = time.perf_counter() - t0

  def run_eval():
    total = correct = count = 0.0
    for b in eval_batches:
      loss, (c, n) = evaluate(state[0], b)
      total, correct, count = total + float(loss) * float(n), correct + float(c), count + float(n)
    return total / count, correct / count

  window = max(steps // 20, 1)
  curve_step, curve_loss, eval_step, eval_loss, eval_acc, step_times, losses = [], [], [], [], [], [], []
  diverged = None
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    nxt = pool.submit(lambda: first)
    for i in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
      batch = nxt.result()
      if i + 1 < steps:
        nxt = pool.submit(lambda j: place(batch_fn(j)), i + 1)
      t1 = time.perf_counter()
      state, loss = step(state, batch)
      losses.append(float(loss))  # blocks: the step time below is the step's own
      step_times.append(time.perf_counter() - t1)
      # A non-finite loss means the last update wrote NaN/inf into the params: every later step is lost too.
      diverged = None if np.isfinite(losses[-1]) else i + 1
      if (i + 1) % window == 0 or i + 1 == steps or diverged:
        curve_step.append(i + 1)
        curve_loss.append(float(np.mean(losses[-window:])))
      if (eval_every and (i + 1) % eval_every == 0) or i + 1 == steps or diverged:
        el, ea = run_eval()
        eval_step.append(i + 1), eval_loss.append(el), eval_acc.append(ea)
      if diverged:
        break
  step_s = float(np.median(step_times))
  return {
      "steps": steps, "diverged_at_step": diverged, "eval_loss": eval_loss[-1], "accuracy": eval_acc[-1],
      "loss": curve_loss[-1],
      "tokens_per_sec": tokens_per_batch / step_s, "step_time_s": step_s, "memory_bytes": temp_bytes(step),
      "time_s": time.perf_counter() - t0, "compile_s": compile_s,
      "curve_step": curve_step, "curve_loss": curve_loss,
      "eval_curve_step": eval_step, "eval_curve_loss": eval_loss, "eval_curve_accuracy": eval_acc,
  }
