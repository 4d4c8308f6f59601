"""Quickstart: softmax, local, linear and Performer attention, and a dense vs a switch-MoE FFN, on the default corpus.

    efficient-attn experiment quickstart --workdir runs/quickstart

The README's main job: five short byte-level LM pretraining runs of the same 2-layer
model over an emulated 2x4 CPU mesh (data x fsdp for the dense models, data x expert
for the MoE; `efficient-attn` sets XLA_FLAGS to 8 host devices when you have not),
the same steps and data for each, validated on the same held-out batches every
`eval_every` steps; see README for the measured wall time on a 2-core CPU. It prints the
table and writes three plots of validation loss: `quickstart_loss.png` (vs step),
`quickstart_time.png` (vs training seconds, counted as steps x each variant's median step
time, so machine load does not bend the curves) and `quickstart_flops.png` (vs training
FLOPs). `--set smoke=true` runs 6 steps of a tiny model for three of the variants.
`--set mesh.context=P` splits each sequence over P devices too (mesh_data x mesh_model x P in all,
e.g. with mesh_model=2 for P=2 on 8 devices).
"""

from __future__ import annotations

import os

from efficient_attn.experiment import line_plot

from . import _lm

CONTEXT_PARALLEL = True  # --set mesh.context=P: every variant's sequences split over P devices (_lm)

VARIANTS = {
    "softmax": {"attention": "softmax"},
    "local": {"attention": "local"},
    "linear": {"attention": "linear"},
    "performer": {"attention": "performer"},
    "softmax+moe": {"attention": "softmax", "num_experts": 8, "top_k": 1, "capacity_factor": 1.25},
}


def get_config() -> dict:
  return {
      "smoke": False, "variants": list(VARIANTS), "steps": 120, "batch_size": 8, "seq_len": 128,
      "d_model": 128, "num_layers": 2, "num_heads": 4, "ffn_dim": 512,
      "attention_options": {"local": {"window": 32}, "performer": {"num_features": 32}},
      "learning_rate": 3e-3, "warmup_steps": 12, "log_every": 10, "eval_every": 20, "eval_batches": 2, "seed": 0,
      "mesh_data": 2, "mesh_model": 4,   # data x (fsdp for dense | expert for MoE)
  }


SMOKE = {"variants": ["softmax", "linear", "softmax+moe"], "steps": 6, "d_model": 64, "num_layers": 2,
         "ffn_dim": 128, "seq_len": 64, "log_every": 2, "eval_every": 6, "warmup_steps": 2, "eval_batches": 1,
         "attention_options": {"local": {"window": 32}, "performer": {"num_features": 16}}}


def _config(cfg: dict, name: str):
  spec = dict(VARIANTS[name])
  moe = spec.get("num_experts", 0) > 0
  mesh = {"data": cfg["mesh_data"], ("expert" if moe else "fsdp"): cfg["mesh_model"]}
  return _lm.base_config(cfg, steps=cfg["steps"], mesh=mesh, **spec)


def check(cfg: dict) -> None:
  from efficient_attn.config import ConfigError, did_you_mean

  bad = [v for v in cfg["variants"] if v not in VARIANTS]
  if bad:
    raise ConfigError(f"unknown variants {bad} for experiment quickstart;{did_you_mean(bad[0], VARIANTS)} valid"
                      f" variants are {list(VARIANTS)}.")
  for name in cfg["variants"]:
    _lm.check_trainable(_config(cfg, name), f"quickstart variant {name}")


def variants(cfg: dict) -> list[str]:
  return list(cfg["variants"])


def run_variant(cfg: dict, name: str, ctx) -> list[dict]:
  return [_lm.train_variant(_config(cfg, name), ctx)]


def summarize(cfg: dict, rows: list[dict]) -> str:
  f = _lm.fmt
  lines = ["| variant | val loss | val ppl | bits/byte | train loss | median step ms | tokens/s | compiled temp MiB |"
           " train GFLOP/token (ideal / XLA) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {f(r['val_loss'], '.3f')} | {f(r.get('val_perplexity'), '.2f')}"
                 f" | {f(r['val_bpb'], '.3f')} | {f(r['loss'], '.3f')}"
                 f" | {f(r['step_time_s'] * 1e3, '.0f')} | {f(r['tokens_per_sec'], '.0f')}"
                 f" | {f(r['memory_bytes'] / 2**20, '.1f')}"
                 f" | {f(r['flops_per_token'] / 1e9, '.3f')} / {f((r['xla_flops_per_token'] or 0) / 1e9, '.3f')} |")
  mesh = f"{cfg['mesh_data']}x{cfg['mesh_model']}"
  return (f"{cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} bytes each, d_model {cfg['d_model']},"
          f" {cfg['num_layers']} layers, mesh {mesh} (data x fsdp; data x expert for the MoE with 8 experts,"
          " top-1, capacity 1.25, same active FLOPs per token as dense). Validation loss in nats per byte"
          f" on the same {cfg['eval_batches']} held-out batches of stdlib files every {cfg['eval_every']} steps;"
          " train loss averaged over the last logging window; step time and tokens/s are medians over the"
          " logging windows after the first (compilation); MFU is in results.jsonl.\n\n" + "\n".join(lines))


def _val_curves(rows: list[dict], x: str) -> dict:
  """{variant: (xs, validation losses)}; x: "step" | "seconds" (steps x median step time) | "flops"."""
  out = {}
  for r in rows:
    steps = r["val_step"]
    xs = {"step": steps, "seconds": [s * r["step_time_s"] for s in steps],
          "flops": [r["flops"] * s / r["steps"] for s in steps]}[x]
    out[r["variant"]] = (xs, r["val_curve"])
  return out


def plot(cfg: dict, rows: list[dict], workdir: str) -> list[str]:
  title = f"quickstart: {cfg['d_model']}-wide {cfg['num_layers']}-layer byte LM, validation loss"
  return [line_plot(os.path.join(workdir, "quickstart_loss.png"), _val_curves(rows, "step"), xlabel="step",
                    ylabel="validation loss (nats/byte)", title=title),
          line_plot(os.path.join(workdir, "quickstart_time.png"), _val_curves(rows, "seconds"),
                    xlabel="training seconds (steps x median step time)", ylabel="validation loss (nats/byte)",
                    title=title),
          line_plot(os.path.join(workdir, "quickstart_flops.png"), _val_curves(rows, "flops"),
                    xlabel="training FLOPs (model count)", ylabel="validation loss (nats/byte)", title=title)]
