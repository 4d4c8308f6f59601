"""MoE scaling: a dense LM vs switch / top-2 mixture-of-experts LMs at equal active FLOPs per token.

    efficient-attn experiment moe_scaling --workdir runs/moe_scaling

Every model has the same attention and the same active FLOPs per token: switch
(top-1) experts are as wide as the dense FFN, top-2 experts half as wide. The MoE
FFN replaces every `moe_every`-th dense FFN (every other one, as in the Switch
Transformer). Variants: switch with E in {2, 4, 8, 16} at capacity factor 1.25,
E=8 at capacity factors 1.0 and 2.0, top-2 at E=8, and dropless E=8. All train
for the same steps on the same data. Reported: final validation loss, the
speed-up to reach the dense model's final validation loss in steps
and in seconds, tokens/s, executed-vs-active FLOPs (capacity padding), compiled
memory. Plots: `moe_loss_vs_step.png`, `moe_speedup.png`. `--set mesh.context=P`
splits each sequence over P devices: dense losses are the same, an MoE's move a little (which
tokens a full expert drops depends on the order the split puts them in).

Anchor: Fedus et al. 2021 (Switch Transformers), Figure 1 and Table 1: at equal
FLOPs per token, more experts reach a given quality in fewer steps (Switch-Base up to
7x faster to T5-Base's quality); capacity factor trades dropped tokens for padding.
"""

from __future__ import annotations

import os

from efficient_attn.config import ConfigError, did_you_mean
from efficient_attn.experiment import line_plot

from . import _lm
from ._papers import SWITCH_NOTE

CONTEXT_PARALLEL = True  # --set mesh.context=P: every variant's sequences split over P devices (_lm)

# name -> MoE fields (ffn_scale: expert width / dense FFN width, for equal active FLOPs)
VARIANTS = {
    "dense": {},
    "switch-e2": {"num_experts": 2},
    "switch-e4": {"num_experts": 4},
    "switch-e8": {"num_experts": 8},
    "switch-e16": {"num_experts": 16},
    "switch-e8-cf1.0": {"num_experts": 8, "capacity_factor": 1.0},
    "switch-e8-cf2.0": {"num_experts": 8, "capacity_factor": 2.0},
    "top2-e8": {"num_experts": 8, "top_k": 2, "ffn_scale": 0.5},
    "dropless-e8": {"num_experts": 8, "dropless": True},
}


def get_config() -> dict:
  return {
      "smoke": False, "variants": list(VARIANTS), "steps": 150, "batch_size": 8, "seq_len": 256,
      "d_model": 256, "num_layers": 4, "num_heads": 4, "ffn_dim": 1024, "moe_every": 2,
      "capacity_factor": 1.25, "learning_rate": 3e-3, "warmup_steps": 15, "log_every": 5, "eval_every": 15,
      "eval_batches": 4,
      "seed": 0,
  }


SMOKE = {"variants": ["dense", "top2-e8"], "steps": 4, "batch_size": 2, "seq_len": 32,
         "d_model": 32, "num_layers": 2, "ffn_dim": 64, "warmup_steps": 1, "log_every": 2, "eval_every": 2,
         "eval_batches": 1}


def _config(cfg: dict, name: str):
  spec = dict(VARIANTS[name])
  scale = spec.pop("ffn_scale", 1.0)
  if spec:
    spec = {"capacity_factor": cfg["capacity_factor"], "moe_every": cfg["moe_every"],
            "expert_dim": int(cfg["ffn_dim"] * scale), **spec}
  return _lm.base_config(cfg, steps=cfg["steps"], **spec)


def check(cfg: dict) -> None:
  bad = [v for v in cfg["variants"] if v not in VARIANTS]
  if bad:
    raise ConfigError(f"unknown variants {bad} for experiment moe_scaling;{did_you_mean(bad[0], VARIANTS)} valid"
                      f" variants are {list(VARIANTS)}.")
  if cfg["moe_every"] > cfg["num_layers"]:
    raise ConfigError(f"moe_every={cfg['moe_every']} exceeds num_layers={cfg['num_layers']}, so no layer would"
                      f" be MoE; use 1..{cfg['num_layers']}.")
  for name in cfg["variants"]:
    _lm.check_trainable(_config(cfg, name), f"moe_scaling variant {name}")


def variants(cfg: dict) -> list[str]:
  return list(cfg["variants"])


def run_variant(cfg: dict, name: str, ctx) -> list[dict]:
  c = _config(cfg, name)
  m = c.model
  return [{**_lm.train_variant(c, ctx), "top_k": m.top_k if m.num_experts else 0,
           "capacity_factor": None if not m.num_experts or m.dropless else m.capacity_factor,
           "expert_ffn_dim": m.expert_dim or m.ffn_dim}]


def _speedups(rows: list[dict]) -> dict[str, tuple]:
  """variant -> (steps to dense's final loss, step speed-up, seconds, time speed-up).

  Both are measured against the point where dense itself first reaches that loss (a
  noisy curve can touch its final value before the end), so dense's speed-up is 1."""
  dense = next((r for r in rows if r["variant"] == "dense"), None)
  if dense is None:
    return {}
  target = _lm.final_loss(dense)
  base_steps, base_secs = _lm.steps_to_loss(dense, target), _lm.time_to_loss(dense, target)
  out = {}
  for r in rows:
    steps, secs = _lm.steps_to_loss(r, target), _lm.time_to_loss(r, target)
    out[r["variant"]] = (steps, base_steps / steps if steps else None, secs,
                         base_secs / secs if secs and base_secs else None)
  return out


def summarize(cfg: dict, rows: list[dict]) -> str:
  f = _lm.fmt
  sp = _speedups(rows)
  lines = ["| variant | E | k | capacity | val loss | bits/byte | steps to dense loss | step speed-up | time speed-up |"
           " tokens/s | GFLOP/token active / executed | temp MiB |", "|" + "---|" * 12]
  for r in rows:
    steps, ssp, _, tsp = sp.get(r["variant"], (None,) * 4)
    cap = "dropless" if r["num_experts"] and r["capacity_factor"] is None else f(r["capacity_factor"], ".2f")
    lines.append(f"| {r['variant']} | {r['num_experts'] or '-'} | {r['top_k'] or '-'} | {cap}"
                 f" | {f(r['val_loss'], '.3f')} | {f(r.get('val_bpb'), '.3f')} | {f(steps, 'd')} | {f(ssp, '.2f')}"
                 f" | {f(tsp, '.2f')}"
                 f" | {f(r['tokens_per_sec'], '.0f')} | {f(r['flops_per_token'] / 1e9, '.4f')} /"
                 f" {f(r['executed_flops_per_token'] / 1e9, '.4f')} | {f(r['memory_bytes'] / 2**20, '.0f')} |")
  return (f"{cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} bytes, d_model {cfg['d_model']},"
          f" {cfg['num_layers']} layers, MoE in every {cfg['moe_every']}-th FFN, dense FFN {cfg['ffn_dim']}."
          " Speed-up = dense's steps (seconds) / the variant's steps (seconds) to first reach dense's final"
          f" validation loss (the same held-out batches every {cfg['eval_every']} steps); '-' = not reached."
          f" Anchor (Fedus et al. 2021, Fig. 1 / Table 1): {SWITCH_NOTE} — our runs are 10^2 steps of"
          " byte-level stdlib text on a CPU, so expect the direction, not the size.\n\n" + "\n".join(lines))


def plot(cfg: dict, rows: list[dict], workdir: str) -> list[str]:
  curves = _lm.loss_curves(rows, "step")
  out = [line_plot(os.path.join(workdir, "moe_loss_vs_step.png"), curves, xlabel="step",
                   ylabel="validation loss (nats/byte)", title="MoE vs dense at equal active FLOPs")]
  sp = _speedups(rows)
  switch = sorted((r["num_experts"], sp.get(r["variant"], (None, None))[1]) for r in rows
                  if r["variant"].startswith("switch-e") and "cf" not in r["variant"])
  if any(s is not None for _, s in switch):
    xs = [e for e, s in switch]
    ys = [s if s is not None else float("nan") for _, s in switch]
    out.append(line_plot(os.path.join(workdir, "moe_speedup.png"), {"switch, capacity 1.25": (xs, ys)},
                         xlabel="experts E", ylabel="step speed-up to dense's final loss",
                         title="speed-up vs number of experts", logx=True, hline=(1.0, "dense")))
  return out
