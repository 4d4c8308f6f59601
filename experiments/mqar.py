"""MQAR (Zoology): multi-query associative recall accuracy vs model width per attention family.

    efficient-attn experiment mqar --workdir runs/mqar

Multi-query associative recall (Arora et al. 2023, "Zoology", Figure 2), generated
locally and seeded (`efficient_attn.data.mqar`): a row opens with key-value pairs,
then the keys come back as queries and the model must predict each one's value.
A causal `TransformerLM` per family x width, trained with next-token cross-entropy
on the query positions only; accuracy is the fraction of held-out queries whose
argmax prediction is the value. Every variant trains the same steps on the same
batches (batch i is a pure function of i). CPU scale: 64-token rows with 8 pairs,
widths 32 / 64 / 128, 2 layers, about 8 minutes on 2 cores. Writes `mqar_accuracy.png`
(accuracy vs width per family). `--set smoke=true` trains two tiny models for a few steps.
`--set mesh.context=P` splits every row over P devices (`_synthetic.train_and_eval`): the same losses.
"""

from __future__ import annotations

import os

from efficient_attn.config import ConfigError
from efficient_attn.experiment import attention_option, check_attention_variants, line_plot

from ._papers import MQAR_PUBLISHED, MQAR_PUBLISHED_NOTE, ZOOLOGY_NOTE

CONTEXT_PARALLEL = True  # --set mesh.context=P: every row split over P devices


def get_config() -> dict:
  return {
      "smoke": False, "families": ["softmax", "linear", "performer"], "widths": [32, 64, 128],
      "seq_len": 64, "num_kv_pairs": 8, "vocab_size": 64, "power_a": 0.01, "num_layers": 2, "num_heads": 1,
      "ffn_mult": 2, "batch_size": 64, "steps": 400,
      "attention_options": {"local": {"window": 16}, "sparse": {"block_size": 16}, "performer": {"num_features": 64}},
      "learning_rate": 3e-3, "warmup_steps": 40, "eval_examples": 512, "seed": 0,
      # The short convolution on q / k / v (model.short_conv): 0 = none (the first table's runs), -1 = each
      # family's default, k = a kernel of k for every family. learning_rates: more than one trains each
      # (family, width) at each rate and reports the best, as Zoology's sweep does ([] = learning_rate alone).
      "short_conv": 0, "learning_rates": [],
  }


SMOKE = {"families": ["softmax", "linear"], "widths": [16], "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32,
         "num_layers": 1, "batch_size": 8, "steps": 4, "warmup_steps": 1, "eval_examples": 16,
         "attention_options": {"local": {"window": 16}, "sparse": {"block_size": 16},
                               "performer": {"num_features": 16}}}


def _rates(cfg: dict) -> list[float]:
  return list(cfg["learning_rates"]) or [cfg["learning_rate"]]


def _split(name: str) -> tuple[str, int]:
  family, width = name.split("-lr")[0].rsplit("-d", 1)
  return family, int(width)


def _rate(cfg: dict, name: str) -> float:
  return float(name.rsplit("-lr", 1)[1]) if "-lr" in name else cfg["learning_rate"]


def model_config(cfg: dict, family: str, width: int):
  from efficient_attn.config import ModelConfig

  return ModelConfig(attention=family, attention_options=cfg["attention_options"].get(family), d_model=width,
                     ffn_dim=cfg["ffn_mult"] * width, short_conv=cfg["short_conv"],
                     **{k: cfg[k] for k in ("num_layers", "num_heads", "vocab_size")})


def check(cfg: dict) -> None:
  from efficient_attn.data.mqar import generate_mqar

  from ._synthetic import check_counts, check_model

  check_attention_variants(cfg, cfg["families"], "mqar", "families")
  if not cfg["widths"] or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in cfg["widths"]):
    raise ConfigError(f"widths={cfg['widths']} for experiment mqar: need a list of positive integers such as [32, 64].")
  check_counts(cfg, "mqar", ("steps", "batch_size", "eval_examples", "ffn_mult"), " (at least one step's worth)")
  if cfg["short_conv"] < -1 or any(not lr > 0 for lr in cfg["learning_rates"]):
    raise ConfigError(f"experiment mqar: short_conv={cfg['short_conv']} must be >= -1 and learning_rates="
                      f"{cfg['learning_rates']} positive numbers.")
  try:
    generate_mqar(0, seq_len=cfg["seq_len"], num_kv_pairs=cfg["num_kv_pairs"], vocab_size=cfg["vocab_size"],
                  seed=0, power_a=cfg["power_a"])
  except ValueError as e:
    raise ConfigError(f"experiment mqar: {e}") from None
  for name in variants(cfg):
    check_model(model_config(cfg, *_split(name)), seq_len=cfg["seq_len"], batch_size=cfg["batch_size"],
                what=f"experiment mqar, variant {name}", context=cfg["mesh.context"],
                layout=cfg["mesh.context_layout"])


def variants(cfg: dict) -> list[str]:
  if not cfg["learning_rates"]:
    return [f"{f}-d{w}" for f in cfg["families"] for w in cfg["widths"]]
  return [f"{f}-d{w}-lr{lr:g}" for f in cfg["families"] for w in cfg["widths"] for lr in cfg["learning_rates"]]


def _batch(cfg: dict, seed: int, n: int) -> dict:
  from efficient_attn.data.mqar import generate_mqar

  return generate_mqar(n, seq_len=cfg["seq_len"], num_kv_pairs=cfg["num_kv_pairs"], vocab_size=cfg["vocab_size"],
                       seed=seed, power_a=cfg["power_a"])


def task_loss(logits_BTV, batch):
  """(cross-entropy, (correct, count)) on the query positions only (weights 1), where the target is the value."""
  import jax
  import jax.numpy as jnp

  targets_BT, w_BT = batch["targets"], batch["weights"]
  nll_BT = -jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), targets_BT[..., None], axis=-1)[..., 0]
  count = jnp.sum(w_BT)
  correct = jnp.sum((jnp.argmax(logits_BTV, -1) == targets_BT) * w_BT)
  return jnp.sum(nll_BT * w_BT) / jnp.maximum(count, 1.0), (correct, count)


def run_variant(cfg: dict, name: str, ctx) -> list[dict]:
  family, width = _split(name)
  m = model_config(cfg, family, width)
  out = train_model(cfg, m, ctx, name, steps=cfg["steps"], learning_rate=_rate(cfg, name))
  return [{"family": family, "d_model": width, "learning_rate": _rate(cfg, name), "short_conv": m.conv_kernel,
           **out}]


def train_model(cfg: dict, m, ctx, desc: str, *, steps: int, learning_rate: float) -> dict:
  """Trains a TransformerLM of ModelConfig m on MQAR rows of cfg's task settings (seq_len, num_kv_pairs,
  vocab_size, power_a, batch_size, warmup_steps, eval_examples, seed, mesh.context / context_layout) for
  `steps`; returns the `_synthetic.train_and_eval` row with the task's shape and FLOPs (also the hybrid
  experiment's recall task)."""
  from efficient_attn import flops
  from efficient_attn.experiment import context_mesh
  from efficient_attn.model import TransformerLM

  from ._synthetic import step_seed, train_and_eval

  model = TransformerLM(m, context_layout=cfg["mesh.context_layout"])
  mesh = context_mesh(cfg)

  def loss_fn(variables, batch):  # segment ids and positions: only under mesh.context > 1
    logits = model.apply(variables, batch["inputs"], segment_ids=batch.get("segment_ids"),
                         positions=batch.get("positions"))
    return task_loss(logits, batch)

  B, T, seed = cfg["batch_size"], cfg["seq_len"], cfg["seed"]
  held_out = _batch(cfg, step_seed(seed, 1), cfg["eval_examples"])
  evals = [{k: v[i:i + B] for k, v in held_out.items()} for i in range(0, cfg["eval_examples"], B)]
  out = train_and_eval(model, loss_fn, lambda i: _batch(cfg, step_seed(seed, 0, i), B), evals,
                       steps=steps, learning_rate=learning_rate, warmup_steps=cfg["warmup_steps"],
                       seed=seed, tokens_per_batch=B * T, eval_every=max(steps // 4, 1),
                       progress=ctx.progress, desc=desc, mesh=mesh, context_layout=cfg["mesh.context_layout"])
  per_token = flops.model_flops_per_token(m, T)["train"]
  trained = out["diverged_at_step"] or steps
  return {"seq_len": T, "num_kv_pairs": cfg["num_kv_pairs"], "batch_size": B, "flops_per_token": per_token,
          "flops": per_token * B * T * trained, **out}


def _accuracy(r) -> str:
  if r is None:
    return "-"
  return f"NaN at step {r['diverged_at_step']}" if r.get("diverged_at_step") else f"{100 * r['accuracy']:.1f}"


def best_rows(rows: list[dict]) -> list[dict]:
  """One row per (family, width): the learning rate with the best held-out accuracy (a diverged run loses)."""
  best: dict = {}
  for r in rows:
    key = (r["family"], r["d_model"])
    score = -1.0 if r.get("diverged_at_step") else r["accuracy"]
    if key not in best or score > best[key][0]:
      best[key] = (score, r)
  return [r for _, r in best.values()]


def summarize(cfg: dict, rows: list[dict]) -> str:
  swept = len(_rates(cfg)) > 1
  rows = best_rows(rows)
  widths = sorted({r["d_model"] for r in rows})
  cell = {(r["family"], r["d_model"]): r for r in rows}
  head = "| family | " + " | ".join(f"d={w}" for w in widths) + " |"
  acc = [head + " published: source; setting; outcome |", "|---|" + "---|" * (len(widths) + 1)]
  speed = [head, "|---|" + "---|" * len(widths)]
  for f in dict.fromkeys(r["family"] for r in rows):
    acc.append(f"| {f} | " + " | ".join(_accuracy(cell.get((f, w))) + (
        f" (lr {cell[f, w]['learning_rate']:g})" if swept and (f, w) in cell else "") for w in widths)
               + f" | {'; '.join(MQAR_PUBLISHED.get(f, ('-',)))} |")
    speed.append(f"| {f} | " + " | ".join(f"{cell[f, w]['tokens_per_sec']:.0f}" if (f, w) in cell else "-"
                                          for w in widths) + " |")
  chance = 100 / (cfg["vocab_size"] - cfg["vocab_size"] // 2)
  verdict = []
  for f in dict.fromkeys(r["family"] for r in rows):
    solved = [w for w in widths if (f, w) in cell and cell[f, w]["accuracy"] >= 0.9]
    finite = [cell[f, w]["accuracy"] for w in widths if (f, w) in cell and not cell[f, w].get("diverged_at_step")]
    best = max(finite, default=0.0)
    verdict.append(f"{f} from d={solved[0]}" if solved else f"{f} at no width (best {100 * best:.1f}%)"
                   if finite else f"{f} at no width (every run diverged)")
  return (
      f"Rows of {cfg['seq_len']} tokens with {cfg['num_kv_pairs']} key-value pairs, every key queried once"
      f" (power_a {cfg['power_a']}), vocabulary {cfg['vocab_size']}; causal LM with {cfg['num_layers']} layers,"
      f" {cfg['num_heads']} head(s), FFN {cfg['ffn_mult']}x width, RoPE"
      + (f", short convolution on q / k / v (kernel {cfg['short_conv']})" if cfg["short_conv"] > 0 else
         ", each family's default short convolution" if cfg["short_conv"] == -1 else ", no short convolution")
      + (f"; the best of learning rates {_rates(cfg)} per cell (the rate in brackets)" if swept else
         f"; learning rate {cfg['learning_rate']:g}")
      + f"; {cfg['steps']} steps of batch"
      f" {cfg['batch_size']} (fresh rows every step), loss on the query positions only; Performer M ="
      f" {attention_option(cfg, 'performer', 'num_features')}, linear = elu+1 features (M = head dim). Accuracy (%) on"
      f" {cfg['eval_examples']} held-out rows ({cfg['eval_examples'] * cfg['num_kv_pairs']} queries); guessing"
      f" a value scores {chance:.1f}%.\n\n" + "\n".join(acc)
      + f"\n\n{MQAR_PUBLISHED_NOTE}"
      + f"\n\n90% accuracy reached by: {'; '.join(verdict)}. Zoology sweeps learning rates and trains to"
      " convergence; here every variant gets the same short run"
      + (" at each rate of the sweep" if swept else " at one learning rate")
      + ", so a model near chance may need more steps as well as more width. NaN: the loss became non-finite"
      " and training stopped there."
      + "\n\nTraining tokens/s (jitted step alone, shared 2-core CPU, noisy):\n\n" + "\n".join(speed)
      + f"\n\nAnchor: {ZOOLOGY_NOTE}"
  )


def plot(cfg: dict, rows: list[dict], workdir: str) -> list[str]:
  rows = best_rows(rows)
  series = {}
  for f in dict.fromkeys(r["family"] for r in rows):
    mine = sorted((r["d_model"], float("nan") if r.get("diverged_at_step") else 100 * r["accuracy"])
                  for r in rows if r["family"] == f)  # a diverged run leaves a gap
    series[f] = ([w for w, _ in mine], [a for _, a in mine])
  chance = (100 / (cfg["vocab_size"] - cfg["vocab_size"] // 2), "chance (uniform value)")
  return [line_plot(os.path.join(workdir, "mqar_accuracy.png"), series, xlabel="model width (d_model)",
                    ylabel="query accuracy (%)", title=f"MQAR: {cfg['num_kv_pairs']} pairs, T={cfg['seq_len']}",
                    logx=True, hline=chance)]
