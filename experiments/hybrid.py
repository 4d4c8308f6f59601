"""Hybrid: the ratio of linear to softmax layers at equal training FLOPs, on recall (MQAR) and on language modelling.

    efficient-attn experiment hybrid --workdir runs/hybrid

One model per arrangement of families (`model.attention_pattern`): pure `linear`
(default gated_deltanet, with its short convolution), R:1 (R linear layers per softmax
layer; 7:1 as MiniMax-01 and Jamba, 3:1 as Qwen3-Next, 1:1), pure softmax, and Gemma's
local:global 5:1 (sliding window `window`, `model.full_attention_every=6`). Each trains on
two tasks at the same training FLOPs (the softmax model's for `steps`, `flops.steps_for_budget`
giving each arrangement its own steps): MQAR (`mqar.train_model`: recall accuracy on held-out
queries, on `mqar_num_layers` = 4 layers of `mqar_num_heads` = 1 head: at 8 layers every
arrangement, softmax included, stayed near MQAR's plateau (11-23%) through 300-600 steps at learning
rates from 1e-3 to 1e-2, and 4 heads of 16 dimensions at 4 layers reached 23% in 600 steps, while
4 layers of one head leave it within ~300 steps; an arrangement whose pattern needs more layers,
7:1 and local5:1, is not run on MQAR) and the default byte-level corpus (`_lm.train_variant`: validation
loss, bits per byte, step time). Decoding memory comes from `model.decode_state_bytes` (a KV cache grows with the
context, a recurrent state does not). Plots: `hybrid_recall.png` (recall vs the share of
softmax layers), `hybrid_loss.png` (validation loss vs the same). `--set smoke=true`: softmax
and 1:1, tiny (43-47 s from the command line here, 3 runs).

Anchor: a systematic study of hybrid linear attention (arXiv 2507.06457, 72 models) found
language-modelling loss nearly flat across linear:full ratios while recall rises sharply as
full-attention layers are added, most of it at ratios of 3:1 or richer in softmax.
"""

from __future__ import annotations

import os

from efficient_attn.config import ConfigError, ModelConfig
from efficient_attn.experiment import check_attention_variants, line_plot

from . import _lm
from ._papers import HYBRID_NOTE

CONTEXT_PARALLEL = True  # --set mesh.context=P: both tasks split every sequence over P devices

TASKS = ("mqar", "lm")


def get_config() -> dict:
  return {
      "smoke": False, "linear": "gated_deltanet", "arrangements": ["linear", "7:1", "3:1", "1:1", "softmax", "local5:1"],
      "tasks": list(TASKS), "window": 16, "short_conv": -1,
      "num_layers": 8, "d_model": 64, "num_heads": 4, "ffn_mult": 2,
      # MQAR (recall): rows of seq_len tokens with num_kv_pairs pairs, on a shallower model with one head
      # (as experiment mqar): the 8-layer, 4-head one stays on the task's plateau at this budget
      "mqar_num_layers": 4, "mqar_num_heads": 1,
      "mqar_steps": 500, "mqar_batch_size": 64, "mqar_seq_len": 64, "num_kv_pairs": 8, "vocab_size": 64,
      "power_a": 0.01, "mqar_learning_rate": 3e-3, "eval_examples": 512,
      # language modelling on the default corpus
      "lm_steps": 150, "lm_batch_size": 8, "lm_seq_len": 256, "lm_learning_rate": 3e-3, "eval_batches": 4,
      "warmup_steps": 40, "decode_context": 4096, "seed": 0,
  }


SMOKE = {"arrangements": ["softmax", "1:1"], "num_layers": 2, "mqar_num_layers": 2, "d_model": 32, "mqar_steps": 4,
         "mqar_batch_size": 8, "mqar_seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32, "eval_examples": 16,
         "lm_steps": 4, "lm_batch_size": 2, "lm_seq_len": 64, "eval_batches": 1, "warmup_steps": 1}


def _ratio(name: str) -> int | None:
  """R of an "R:1" arrangement, else None."""
  head, _, tail = name.partition(":")
  return int(head) if tail == "1" and head.isdigit() else None


def model_fields(cfg: dict, name: str) -> dict:
  """ModelConfig fields of an arrangement (attention, pattern, options) besides the shared sizes."""
  lin = cfg["linear"]
  if name == "linear":
    return {"attention": lin}
  if name == "softmax":
    return {"attention": "softmax"}
  if name == "local5:1":
    return {"attention": "local", "attention_options": {"window": cfg["window"]}, "full_attention_every": 6}
  return {"attention": lin, "attention_pattern": (lin,) * _ratio(name) + ("softmax",)}


def softmax_share(m: ModelConfig) -> float:
  return sum(f == "softmax" for f in m.layer_families()) / m.num_layers


def layers_needed(name: str) -> int:
  """The fewest layers that hold one full period of an arrangement (one softmax layer among R linear ones;
  local5:1's global layer is the 6th)."""
  r = _ratio(name)
  return r + 1 if r is not None else 6 if name == "local5:1" else 1


def _depth_key(task: str) -> str:
  """The setting that holds a task's number of layers."""
  return "mqar_num_layers" if task == "mqar" else "num_layers"


def _depth(cfg: dict, task: str) -> int:
  return cfg[_depth_key(task)]


def runs_on(cfg: dict, name: str, task: str) -> bool:
  """Whether an arrangement fits a task's depth (MQAR's may be shallower: those that do not fit are skipped)."""
  return layers_needed(name) <= _depth(cfg, task)


def _model(cfg: dict, name: str, task: str) -> ModelConfig:
  mqar = task == "mqar"
  return ModelConfig(**model_fields(cfg, name), num_layers=_depth(cfg, task), d_model=cfg["d_model"],
                     num_heads=cfg["mqar_num_heads"] if mqar else cfg["num_heads"],
                     ffn_dim=cfg["ffn_mult"] * cfg["d_model"], vocab_size=cfg["vocab_size"] if mqar else 256,
                     short_conv=cfg["short_conv"])


def _steps(cfg: dict, name: str, task: str) -> int:
  """Steps that spend what softmax spends in cfg[task + "_steps"] (ideal training FLOPs)."""
  from efficient_attn import flops

  T, B = cfg[f"{task}_seq_len"], cfg[f"{task}_batch_size"]
  budget = flops.model_flops_per_token(_model(cfg, "softmax", task), T)["train"] * T * B * cfg[f"{task}_steps"]
  return max(1, flops.steps_for_budget(budget, _model(cfg, name, task), T, B))


def _lm_config(cfg: dict, name: str):
  flat = {"d_model": cfg["d_model"], "num_layers": cfg["num_layers"], "num_heads": cfg["num_heads"],
          "ffn_dim": cfg["ffn_mult"] * cfg["d_model"], "batch_size": cfg["lm_batch_size"], "seq_len": cfg["lm_seq_len"],
          "learning_rate": cfg["lm_learning_rate"], "warmup_steps": cfg["warmup_steps"], "seed": cfg["seed"],
          "eval_batches": cfg["eval_batches"], "mesh.context": cfg["mesh.context"],
          "mesh.context_layout": cfg["mesh.context_layout"]}
  steps = _steps(cfg, name, "lm")
  log = max(1, steps // 10)
  return _lm.base_config({**flat, "log_every": log, "eval_every": log}, steps=steps, short_conv=cfg["short_conv"],
                         **model_fields(cfg, name))


def _mqar_cfg(cfg: dict) -> dict:
  return {"seq_len": cfg["mqar_seq_len"], "num_kv_pairs": cfg["num_kv_pairs"], "vocab_size": cfg["vocab_size"],
          "power_a": cfg["power_a"], "batch_size": cfg["mqar_batch_size"], "warmup_steps": cfg["warmup_steps"],
          "eval_examples": cfg["eval_examples"], "seed": cfg["seed"], "mesh.context": cfg["mesh.context"],
          "mesh.context_layout": cfg["mesh.context_layout"]}


def check(cfg: dict) -> None:
  from ._synthetic import check_model

  check_attention_variants(cfg, [cfg["linear"]], "hybrid", "linear")
  bad = [a for a in cfg["arrangements"] if a not in ("linear", "softmax", "local5:1") and _ratio(a) is None]
  if bad or not cfg["arrangements"] or len(set(cfg["arrangements"])) < len(cfg["arrangements"]):
    raise ConfigError(f"arrangements={cfg['arrangements']!r} for experiment hybrid: use distinct names among"
                      " 'linear', 'softmax', 'local5:1' and 'R:1' (R linear layers per softmax layer, e.g. '3:1').")
  tasks = cfg["tasks"]
  if not tasks or any(t not in TASKS for t in tasks):
    raise ConfigError(f"tasks={tasks!r} for experiment hybrid: choose from {list(TASKS)}.")
  for a in cfg["arrangements"]:
    if not any(runs_on(cfg, a, t) for t in tasks):
      depths = " and ".join(f"{_depth_key(t)}={_depth(cfg, t)}" for t in tasks)
      raise ConfigError(f"arrangement {a} needs at least {layers_needed(a)} layers for one softmax layer; {depths}.")
    if "mqar" in tasks and runs_on(cfg, a, "mqar"):
      check_model(_model(cfg, a, "mqar"), seq_len=cfg["mqar_seq_len"], batch_size=cfg["mqar_batch_size"],
                  what=f"experiment hybrid, {a} on mqar", context=cfg["mesh.context"],
                  layout=cfg["mesh.context_layout"])
    if "lm" in tasks and runs_on(cfg, a, "lm"):
      _lm.check_trainable(_lm_config(cfg, a), f"experiment hybrid, {a} on lm")


def _id(arrangement: str) -> str:
  return arrangement.replace(":", "to")


def variants(cfg: dict) -> list[str]:
  return [f"{t}-{_id(a)}" for t in cfg["tasks"] for a in cfg["arrangements"] if runs_on(cfg, a, t)]


def run_variant(cfg: dict, name: str, ctx) -> list[dict]:
  from efficient_attn.model import decode_state_bytes

  from . import mqar

  task, ident = name.split("-", 1)
  arrangement = next(a for a in cfg["arrangements"] if _id(a) == ident)
  m = _model(cfg, arrangement, task)
  ctx_len = cfg["decode_context"]
  at, half = decode_state_bytes(m, 1, ctx_len)["total"], decode_state_bytes(m, 1, ctx_len // 2)["total"]
  common = {"arrangement": arrangement, "task": task, "layers": list(m.layer_families()),
            "softmax_share": softmax_share(m), "decode_bytes": at,
            "decode_bytes_per_token": (at - half) / (ctx_len - ctx_len // 2)}
  if task == "mqar":
    steps = _steps(cfg, arrangement, "mqar")
    out = mqar.train_model(_mqar_cfg(cfg), m, ctx, name, steps=steps, learning_rate=cfg["mqar_learning_rate"])
    return [{**common, "steps": steps, **out}]
  row = _lm.train_variant(_lm_config(cfg, arrangement), ctx)
  return [{**common, **{k: v for k, v in row.items() if not k.startswith("curve_")}}]


def _cell(rows, arrangement, task, key, spec):
  r = next((r for r in rows if r["arrangement"] == arrangement and r["task"] == task), None)
  if r is None or r.get(key) is None:
    return "-"
  if task == "mqar" and r.get("diverged_at_step"):
    return f"NaN at {r['diverged_at_step']}"
  v = r[key] * (100 if key == "accuracy" else 1)
  return format(v, spec)


def summarize(cfg: dict, rows: list[dict]) -> str:
  arrangements = [a for a in cfg["arrangements"] if any(r["arrangement"] == a for r in rows)]
  lines = [f"| arrangement | layers | softmax share | MQAR accuracy % ({cfg['mqar_num_layers']} layers) | MQAR steps"
           " | LM val loss | bits/byte | LM steps"
           " | LM step ms | decode state KiB / token | at " + f"{cfg['decode_context']} tokens, MiB |",
           "|" + "---|" * 11]
  for a in arrangements:
    lm = next((x for x in rows if x["arrangement"] == a and x["task"] == "lm"), None)
    r = lm or next(r for r in rows if r["arrangement"] == a)  # the layers and decoding state of the LM model
    layers = " ".join({"softmax": "S", "local": "W"}.get(f, "L") for f in r["layers"])
    recall = _cell(rows, a, "mqar", "accuracy", ".1f")
    if "mqar" in cfg["tasks"] and not runs_on(cfg, a, "mqar"):
      recall = f"not run: needs {layers_needed(a)} layers"
    lines.append(f"| {a} | {layers} | {r['softmax_share']:.3f} | {recall}"
                 f" | {_cell(rows, a, 'mqar', 'steps', 'd')} | {_cell(rows, a, 'lm', 'val_loss', '.3f')}"
                 f" | {_cell(rows, a, 'lm', 'val_bpb', '.3f')} | {_cell(rows, a, 'lm', 'steps', 'd')}"
                 f" | {format(lm['step_time_s'] * 1e3, '.0f') if lm else '-'}"
                 f" | {r['decode_bytes_per_token'] / 1024:.2f} | {r['decode_bytes'] / 2 ** 20:.2f} |")
  return (
      f"{cfg['num_layers']} layers, {cfg['num_heads']} heads (MQAR: {cfg['mqar_num_layers']} layers, the pattern"
      f" cycled over them, {cfg['mqar_num_heads']} head(s)), d_model {cfg['d_model']}; linear family {cfg['linear']}"
      f" (short_conv {cfg['short_conv']}: -1 = each family's default), local window {cfg['window']}. Layers: L"
      " linear, S softmax, W sliding window. Equal training FLOPs per task: softmax's"
      f" {cfg['mqar_steps']} MQAR steps ({cfg['mqar_batch_size']} rows of {cfg['mqar_seq_len']} tokens,"
      f" {cfg['num_kv_pairs']} pairs, vocabulary {cfg['vocab_size']}, lr {cfg['mqar_learning_rate']:g}) and"
      f" {cfg['lm_steps']} LM steps ({cfg['lm_batch_size']} x {cfg['lm_seq_len']} bytes, lr"
      f" {cfg['lm_learning_rate']:g}); MQAR accuracy on {cfg['eval_examples']} held-out rows, LM loss in nats per"
      f" byte on the same {cfg['eval_batches']} held-out batches. Decoding state from"
      " `model.decode_state_bytes` (float32, batch 1): the KV caches grow per token, recurrent states and window"
      " buffers do not.\n\n" + "\n".join(lines) + "\n\n" + findings(rows) + f"\n\nAnchor: {HYBRID_NOTE}")


TASK_METRIC = {"mqar": ("accuracy", 100.0), "lm": ("val_loss", 1.0)}  # the row key each task reports, its scale


def _measured(rows: list[dict], task: str) -> list[tuple[float, float, str]]:
  """(softmax share, the task's metric in % or nats/byte, arrangement) of the rows that measured it, by share."""
  key, scale = TASK_METRIC[task]
  return sorted((r["softmax_share"], r[key] * scale, r["arrangement"]) for r in rows
                if r["task"] == task and r.get(key) is not None and not r.get("diverged_at_step"))


def findings(rows: list[dict]) -> str:
  """Ours in the anchor's two terms: does recall rise with the share of softmax layers, and how far does LM
  loss move across the linear : softmax ratios (local5:1 aside)?"""
  out = []
  recall = [(v, a) for _, v, a in _measured(rows, "mqar") if a != "local5:1"]
  if len(recall) >= 2:
    rises = all(b >= a - 1.0 for (a, _), (b, _) in zip(recall, recall[1:]))
    out.append("MQAR recall by softmax share: " + " -> ".join(f"{a} {v:.1f}%" for v, a in recall) + "; "
               + ("it rises with the share (within 1 point), as the anchor reports." if rises else
                  "it does not rise steadily with the share, unlike the anchor."))
  loss = [(v, a) for _, v, a in _measured(rows, "lm") if a != "local5:1"]
  if len(loss) >= 2:
    lo, hi = min(v for v, _ in loss), max(v for v, _ in loss)
    out.append("LM validation loss by softmax share: " + " -> ".join(f"{a} {v:.3f}" for v, a in loss)
               + f"; spread {hi - lo:.3f} nats/byte ({100 * (hi - lo) / lo:.1f}% of the best).")
  return "\n".join(f"- {x}" for x in out)


def plot(cfg: dict, rows: list[dict], workdir: str) -> list[str]:
  out = []
  for task, ylabel, fname in (("mqar", "MQAR recall accuracy (%)", "hybrid_recall.png"),
                               ("lm", "validation loss (nats/byte)", "hybrid_loss.png")):
    measured = _measured(rows, task)
    ratio = [(x, y) for x, y, a in measured if a != "local5:1"]
    series = {f"{cfg['linear']} : softmax": ([x for x, _ in ratio], [y for _, y in ratio])}
    gemma = [(x, y) for x, y, a in measured if a == "local5:1"]
    if gemma:
      series["local 5:1 (Gemma)"] = ([gemma[0][0]], [gemma[0][1]])
    if ratio or gemma:
      out.append(line_plot(os.path.join(workdir, fname), series, xlabel="share of softmax layers",
                           ylabel=ylabel, title=f"hybrid: {ylabel.split(' (')[0]} vs ratio"))
  return out
