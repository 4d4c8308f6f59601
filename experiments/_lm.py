"""Shared by the language-model experiments (quickstart, equal_compute, moe_scaling).

`train_variant` runs `efficient_attn.train.train` in the variant's directory (so a
killed variant resumes from its checkpoint) and turns its metrics.jsonl into one
result row: final train / validation loss, throughput, MFU, compiled memory, the
training FLOPs spent, and the loss curve for the plots. `--set mesh.context=P` splits
every variant's sequences over P devices, a P times larger mesh (`base_config`); a dense
model's losses stay the same.
"""

from __future__ import annotations

import json
import math
import os

from efficient_attn.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, TrainConfig, validate

# Flat experiment keys that map onto the training config (experiment key -> "section.field").
MODEL_KEYS = ("d_model", "num_layers", "num_heads", "ffn_dim", "dtype")
TRAIN_KEYS = ("batch_size", "seq_len", "learning_rate", "warmup_steps", "seed", "log_every", "eval_batches",
              "eval_every")


def base_config(cfg: dict, *, steps: int, mesh: dict | None = None, **model) -> Config:
  """The training Config of one variant: the experiment's shared settings + the variant's model fields.

  mesh: the variant's data / fsdp / expert sizes (default one device), times cfg["mesh.context"] devices
  that each sequence is split over in cfg["mesh.context_layout"] (the runner's keys). Under a launcher
  (several processes) a mesh that the processes do not divide gets its data axis multiplied by their
  number, so every process holds an equal part of every run (`devices_for`)."""
  model.setdefault("attention_options", cfg.get("attention_options", {}).get(model.get("attention", "softmax")))
  m = ModelConfig(**{k: cfg[k] for k in MODEL_KEYS if k in cfg}, **model)
  # At most 4 checkpoints a run (every ceil(steps / 4) steps): a killed variant resumes from its last quarter.
  t = TrainConfig(steps=steps, checkpoint_every=max(-(-steps // 4), 1), max_to_keep=1,
                  **{k: cfg[k] for k in TRAIN_KEYS if k in cfg})
  data = DataConfig(**{"val_fraction": cfg.get("val_fraction", 0.05), "tokenizer": cfg.get("tokenizer", "bytes"),
                       **cfg.get("data", {})})  # an experiment's "data": DataConfig fields (its own corpus)
  context = {"context": cfg["mesh.context"], "context_layout": cfg["mesh.context_layout"]}
  mesh = dict(mesh or {"data": 1})
  procs = _process_count()
  size = math.prod(mesh.values()) * cfg["mesh.context"]
  if procs > 1 and mesh.get("data", 1) != -1 and size % procs:
    mesh["data"] = mesh.get("data", 1) * procs  # under a launcher every process holds a part of every run's mesh
  return Config(model=m, train=t, data=data, mesh=MeshConfig(**mesh, **context))


def _process_count() -> int:
  import jax

  return jax.process_count()


def devices_for(config: Config):
  """The first data x fsdp x context x tensor x expert devices; ConfigError if the machine has fewer."""
  import jax

  m = config.mesh
  have = jax.devices()
  if m.data == -1:  # every device (of every process)
    return have
  need = m.data * m.fsdp * m.context * m.tensor * m.expert
  if need > len(have):
    raise ConfigError(f"the mesh needs {need} devices but {len(have)} are available; on CPU set"
                      f" XLA_FLAGS=--xla_force_host_platform_device_count={need} or use a smaller mesh.")
  procs = jax.process_count()
  if procs == 1 or need == len(have):
    return have[:need]
  # Under a launcher: the same number of devices from each process, so every process takes part.
  by_process: dict = {}
  for d in have:
    by_process.setdefault(d.process_index, []).append(d)
  return [d for p in sorted(by_process) for d in by_process[p][:need // procs]]


def check_trainable(config: Config, what: str) -> None:
  """Validates a variant's training config before anything runs (one sentence on failure)."""
  try:
    validate(config, len(devices_for(config)))
  except ConfigError as e:
    raise ConfigError(f"{what}: {e}") from None


def train_variant(config: Config, ctx) -> dict:
  """Trains one variant in ctx.workdir; returns its result row (curve included)."""
  from efficient_attn import flops, train

  train.train(config, ctx.workdir, progress=ctx.progress, devices=devices_for(config))
  with open(os.path.join(ctx.workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f if line.strip()]
  steps_rows = [r for r in logged if "loss" in r]
  evals = [r for r in logged if "val_loss" in r]
  final_eval = evals[-1] if evals else {}
  t = config.train
  tokens = t.batch_size * t.seq_len
  fpt = flops.model_flops_per_token(config.model, t.seq_len)
  last = steps_rows[-1]
  tps = sorted(r["tokens_per_sec"] for r in steps_rows[1:] or steps_rows)  # the first window has warm-up
  return {
      "attention": config.model.attention, "num_experts": config.model.num_experts, "steps": t.steps,
      "seq_len": t.seq_len, "batch_size": t.batch_size,
      "flops_per_token": fpt["train"], "executed_flops_per_token": fpt["executed_train"],
      "xla_flops_per_token": last.get("executed_flops_per_token"),
      "flops": fpt["train"] * tokens * t.steps,
      "loss": last["loss_avg"], "val_loss": final_eval.get("val_loss"), "val_bpb": final_eval.get("val_bpb"),
      "val_perplexity": final_eval.get("val_perplexity"), "tokenizer": config.data.tokenizer,
      "tokens_per_sec": tps[len(tps) // 2], "step_time_s": tokens / tps[len(tps) // 2],
      "mfu": last.get("mfu"), "memory_bytes": last.get("temp_bytes"), "time_s": last["time_s"],
      "curve_step": [r["step"] for r in steps_rows], "curve_loss": [r["loss_avg"] for r in steps_rows],
      "curve_time_s": [r["time_s"] for r in steps_rows],
      "curve_flops": [fpt["train"] * tokens * r["step"] for r in steps_rows],
      "val_step": [r["step"] for r in evals], "val_curve": [r["val_loss"] for r in evals],
      "val_time_s": [r["time_s"] for r in evals],
  }


SMOOTH = 5  # logged points in the trailing mean: single batches of source files differ a lot in difficulty


def smoothed(row: dict) -> list[float]:
  """The logged train loss as a trailing mean over SMOOTH logging windows (same length as the curve)."""
  losses = row["curve_loss"]
  windows = [losses[max(0, i - SMOOTH + 1):i + 1] for i in range(len(losses))]
  return [sum(w) / len(w) for w in windows]


def _uses_val(row: dict) -> bool:
  return len(row.get("val_curve") or []) >= 2


def final_loss(row: dict) -> float:
  """The quality the others must reach: the final validation loss when validation ran during training
  (the same held-out batches each time, so curves compare), else the end of the smoothed train loss."""
  return row["val_curve"][-1] if _uses_val(row) else smoothed(row)[-1]


def _first(row: dict, target: float, key: str):
  if _uses_val(row):
    pairs = zip(row["val_curve"], row["val_step" if key == "curve_step" else "val_time_s"])
  else:
    pairs = zip(smoothed(row), row[key])
  for loss, x in pairs:
    if loss <= target:
      return x
  return None


def time_to_loss(row: dict, target: float) -> float | None:
  """Training seconds until the validation (else smoothed train) loss first reaches `target`; None if never."""
  return _first(row, target, "curve_time_s")


def steps_to_loss(row: dict, target: float) -> int | None:
  """Steps until the validation (else smoothed train) loss first reaches `target`; None if never."""
  return _first(row, target, "curve_step")


def loss_curves(rows: list[dict], x: str) -> dict:
  """{variant: (xs, losses)} for the plots: validation curves when there are some, else smoothed train loss.
  x: "step" | "time_s" | "flops"."""
  out = {}
  for r in rows:
    if _uses_val(r):
      xs = {"step": r["val_step"], "time_s": r["val_time_s"],
            "flops": [r["flops"] * s / r["steps"] for s in r["val_step"]]}[x]
      out[r["variant"]] = (xs, r["val_curve"])
    else:
      out[r["variant"]] = ({"step": r["curve_step"], "time_s": r["curve_time_s"], "flops": r["curve_flops"]}[x],
                           smoothed(r))
  return out


def fmt(v, spec: str = ".3g") -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  return format(v, spec)
