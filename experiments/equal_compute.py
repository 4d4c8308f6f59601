"""Equal compute: every attention family pretrains the same LM on the same training-FLOPs budget.

    efficient-attn experiment equal_compute --workdir runs/equal_compute

Each family gets the steps that spend the budget at its own training FLOPs per token
(`efficient_attn.flops.model_flops_per_token`, counted per family: local pays for its
window, sparse for its layout's blocks, linear / Performer for their feature
dimension and chunks), so cheaper attention trains on more tokens. The budget is
`budget_flops`, or (0) what softmax spends in `reference_steps`. Reported: final
validation loss and bits per byte, the training seconds each family needs to reach
softmax's final validation loss, tokens/s, MFU and compiled memory.
Plots: `loss_vs_flops.png`, `loss_vs_time.png`. `--set mesh.context=P` splits each
sequence over P devices (the same losses; the step time is the split's).
"""

from __future__ import annotations

import os

from efficient_attn.config import ConfigError
from efficient_attn.experiment import check_attention_variants, line_plot

from . import _lm

CONTEXT_PARALLEL = True  # --set mesh.context=P: every variant's sequences split over P devices (_lm)

FAMILIES = ["softmax", "local", "sparse", "linear", "performer"]  # the default variants; any registered family runs


def get_config() -> dict:
  return {
      "smoke": False, "variants": list(FAMILIES), "reference_steps": 150, "budget_flops": 0.0,
      # Hybrid variants: a name in `variants` that is a key here trains that layer pattern (model.attention_pattern,
      # each family with its attention_options), e.g. --set "patterns={'gla3:1': ['gla', 'gla', 'gla', 'softmax']}"
      # --set "variants=['softmax', 'gla', 'gla3:1']".
      "patterns": {},
      "attention_options": {"local": {"window": 128}, "sparse": {"block_size": 64}, "performer": {"num_features": 64}},
      "batch_size": 8, "seq_len": 512, "d_model": 256, "num_layers": 4, "num_heads": 4, "ffn_dim": 1024,
      "learning_rate": 3e-3, "warmup_steps": 15,
      "log_every": 5, "eval_every": 15, "eval_batches": 4, "seed": 0,
  }


SMOKE = {"variants": ["softmax", "linear"], "reference_steps": 4, "batch_size": 2, "seq_len": 64, "d_model": 32,
         "num_layers": 1, "ffn_dim": 64, "warmup_steps": 1,
         "attention_options": {"local": {"window": 16}, "sparse": {"block_size": 16},
                               "performer": {"num_features": 16}},
         "log_every": 2, "eval_every": 2, "eval_batches": 1}


def _fields(cfg: dict, name: str) -> dict:
  """The model fields of variant `name`: a family, or a layer pattern from cfg["patterns"]."""
  pattern = cfg["patterns"].get(name)
  if pattern is None:
    return {"attention": name}
  opts = cfg["attention_options"]
  return {"attention": pattern[0], "attention_pattern": tuple(pattern),
          "family_options": {f: opts[f] for f in set(pattern) - {pattern[0]} if f in opts} or None}


def _model_config(cfg: dict, family: str):
  return _lm.base_config(cfg, steps=1, **_fields(cfg, family)).model


def budget(cfg: dict) -> float:
  """The training FLOPs every family spends."""
  from efficient_attn import flops

  if cfg["budget_flops"] > 0:
    return float(cfg["budget_flops"])
  per_token = flops.model_flops_per_token(_model_config(cfg, "softmax"), cfg["seq_len"])["train"]
  return per_token * cfg["batch_size"] * cfg["seq_len"] * cfg["reference_steps"]


def steps_for(cfg: dict, family: str) -> int:
  from efficient_attn import flops

  return flops.steps_for_budget(budget(cfg), _model_config(cfg, family), cfg["seq_len"], cfg["batch_size"])


def check(cfg: dict) -> None:
  from efficient_attn import flops

  patterns = cfg["patterns"]
  if not isinstance(patterns, dict) or not all(isinstance(p, (list, tuple)) and p for p in patterns.values()):
    raise ConfigError(f"patterns={patterns!r} for experiment equal_compute must map a variant name to a non-empty"
                      " list of families, e.g. {'gla3:1': ['gla', 'gla', 'gla', 'softmax']}.")
  for name, pattern in patterns.items():
    check_attention_variants(cfg, list(dict.fromkeys(pattern)), "equal_compute", f"patterns.{name}")
  check_attention_variants(cfg, cfg["variants"], "equal_compute", "variants",
                           aliases={n: (p[0], {}) for n, p in patterns.items()})
  if cfg["budget_flops"] < 0 or cfg["reference_steps"] < 1:
    raise ConfigError(f"budget_flops={cfg['budget_flops']} must be >= 0 and reference_steps="
                      f"{cfg['reference_steps']} >= 1.")
  for family in cfg["variants"]:
    _lm.check_trainable(_lm.base_config(cfg, steps=1, **_fields(cfg, family)), f"equal_compute variant {family}")
    if steps_for(cfg, family) < 1:
      one = flops.model_flops_per_token(_model_config(cfg, family), cfg["seq_len"])["train"]
      raise ConfigError(f"budget_flops={budget(cfg):.3g} is too small to run one step of {family}, which needs"
                        f" {one * cfg['batch_size'] * cfg['seq_len']:.3g} FLOPs; raise budget_flops.")


def variants(cfg: dict) -> list[str]:
  return list(cfg["variants"])


def run_variant(cfg: dict, name: str, ctx) -> list[dict]:
  row = _lm.train_variant(_lm.base_config(cfg, steps=steps_for(cfg, name), **_fields(cfg, name)), ctx)
  return [{**row, "budget_flops": budget(cfg), "pattern": cfg["patterns"].get(name)}]


def summarize(cfg: dict, rows: list[dict]) -> str:
  f = _lm.fmt
  ref = next((r for r in rows if r["variant"] == "softmax"), None)
  target = _lm.final_loss(ref) if ref else None
  lines = ["| family | steps | train FLOPs | val loss | val ppl | bits/byte | s to softmax's loss | tokens/s | MFU |"
           " compiled temp MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    reach = _lm.time_to_loss(r, target) if target is not None else None
    lines.append(f"| {r['variant']} | {r['steps']} | {f(r['flops'], '.3g')} | {f(r['val_loss'], '.3f')}"
                 f" | {f(r.get('val_perplexity'), '.2f')} | {f(r['val_bpb'], '.3f')} | {f(reach, '.0f')}"
                 f" | {f(r['tokens_per_sec'], '.0f')}"
                 f" | {f(r['mfu'], '.2f')} | {f(r['memory_bytes'] / 2**20, '.0f')} |")
  return (f"Budget {budget(cfg):.3g} training FLOPs per family (= softmax x {cfg['reference_steps']} steps unless"
          f" budget_flops is set); batch {cfg['batch_size']} x {cfg['seq_len']} bytes, d_model {cfg['d_model']},"
          f" {cfg['num_layers']} layers, family options {_options_text(cfg)}."
          " FLOPs are the ideal per-family count (forward x 3);"
          " '-' = never reached softmax's final validation loss (the same held-out batches evaluated"
          f" every {cfg['eval_every']} steps; with eval_every=0 the train loss, smoothed over {_lm.SMOOTH} logs).\n\n"
          + "\n".join(lines))


def _options_text(cfg: dict) -> str:
  opts = cfg["attention_options"]
  return "; ".join(f"{f} " + ", ".join(f"{k}={v}" for k, v in opts[f].items()) for f in cfg["variants"]
                   if opts.get(f)) or "defaults"


def plot(cfg: dict, rows: list[dict], workdir: str) -> list[str]:
  by_flops = {k: ([x / 1e15 for x in xs], ys) for k, (xs, ys) in _lm.loss_curves(rows, "flops").items()}
  by_time = _lm.loss_curves(rows, "time_s")
  return [line_plot(os.path.join(workdir, "loss_vs_flops.png"), by_flops, xlabel="training PFLOPs",
                    ylabel="validation loss (nats/byte)", title="equal compute: loss vs FLOPs"),
          line_plot(os.path.join(workdir, "loss_vs_time.png"), by_time, xlabel="training seconds",
                    ylabel="validation loss (nats/byte)", title="equal compute: loss vs wall time")]
