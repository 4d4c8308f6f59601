"""Scaling laws: loss against training compute per family across model sizes, fitted with bootstrap intervals.

    efficient-attn experiment scaling_laws --workdir runs/scaling_laws

Every family in `families` (attention families, and "switch": softmax attention with a
switch-MoE FFN in every `moe_every`-th layer) trains every size in `sizes`
((num_layers, d_model); heads of `head_dim`, FFN `ffn_mult` x d_model) on the same
byte-level corpus, each run once to the largest budget in `budgets` with a constant
learning rate after warmup, validated on the same held-out batches `evals_per_run`
times along the way. A run's loss at a smaller budget is read from that curve
(interpolated in log compute): Kaplan et al. 2020's learning-curve method, one run per
(family, size), not Chinchilla's separately annealed run per (size, budget), which
would cost more runs and compiles than this machine has; every loss is therefore
un-annealed, the same way for every family. Compute is the ideal training FLOPs of
`efficient_attn.flops` (attention terms included; the MoE's active FLOPs); N is the
non-embedding matmul parameters a token passes through.

Learning rate: `lr_sweep` rates are tried per family at the smallest size, to the second
budget; the best (lowest validation loss) is scaled to each size as
lr x (d_min / d_model)^lr_width_power (a rule of thumb, checked at the smallest width only).
`seeds` > 1 repeats size `seed_size` with other seeds: their spread is the run-to-run noise.

Fits (`efficient_attn.scaling`): per family, L(C) = E + A·C^(−α) on the compute-efficient
frontier (the lowest loss over sizes at 12 log-spaced computes in [budgets[0], budgets[-1]]; each
validation curve first smoothed by a line through each `smooth_evals` neighbouring evaluations),
with 95% bootstrap intervals; the largest budget predicted from a fit without it (held-out
error); an IsoFLOP parabola per budget (N_opt) and N_opt ∝ C^a; pairwise crossovers.
summary.md claims a family "scales better" only where the α intervals do not overlap.
Plots: `scaling_frontier.png` (loss vs FLOPs per size, the fitted frontier per family),
`scaling_isoflop.png` (loss vs N per budget), `scaling_alpha.png` (α with its interval).
`--set smoke=true` runs a 2-family, 3-size grid in under a minute; `--set preset=accelerator`
is the ~20M-400M-parameter grid for a GPU / TPU cluster (README). `mesh_data` devices split
each run's batch (-1: all); under a launcher (`scripts/launch_local.sh`, SLURM, a TPU pod) every
process holds an equal part of every run (`_lm.base_config` multiplies the data axis by the process
count when that does not divide it), so the batch must divide by the data axis.
"""

from __future__ import annotations

import dataclasses
import math
import os

from efficient_attn.config import ConfigError, DataConfig, did_you_mean
from efficient_attn.experiment import check_attention_variants, finished_rows

from . import _lm
from ._papers import SCALING_NOTE

CONTEXT_PARALLEL = True  # --set mesh.context=P: every run's sequences split over P devices (_lm)

MOE = "switch"  # the family name of the MoE variant: softmax attention + switch FFNs
GRID = 12       # log-spaced computes of the fitted frontier


def get_config() -> dict:
  return {
      "smoke": False, "preset": "cpu",
      "families": ["softmax", "linear", "gla", "gated_deltanet", MOE],
      "sizes": [[1, 16], [1, 32], [2, 32], [2, 48], [2, 64]],
      "budgets": [3e10, 6e10, 1.5e11, 3e11],
      "head_dim": 16, "ffn_mult": 4, "batch_size": 8, "seq_len": 256,
      "lr_sweep": [3e-3, 1e-2, 3e-2], "learning_rate": 3e-3, "lr_width_power": 0.5, "warmup_steps": 10,
      "seeds": 2, "seed_size": 0, "evals_per_run": 20, "eval_batches": 4, "smooth_evals": 3,
      "num_experts": 8, "capacity_factor": 1.25, "moe_every": 1,
      "attention_options": {}, "data": {}, "mesh_data": 1, "bootstrap": 1000, "seed": 0,
      "short_conv": 0,  # model.short_conv (0: none, as the measured table; -1: each family's default, e.g. 4 for gdn)
  }


SMOKE = {"families": ["softmax", "linear"], "sizes": [[1, 16], [1, 32], [2, 32]], "budgets": [2e8, 4e8, 8e8, 1.6e9],
         "seq_len": 64, "batch_size": 4, "lr_sweep": [], "seeds": 1, "evals_per_run": 4, "eval_batches": 1,
         "warmup_steps": 2, "bootstrap": 50}

# Hoffmann et al.'s and Kaplan et al.'s ranges, on a cluster: 19M-382M non-embedding parameters, 1024-token
# sequences, 64 per batch, 3e16-3e17 FLOPs per run (about 1e19 training FLOPs for the grid; not run here).
# Bring a corpus: --set "data={'name': 'parquet', 'files': '/data/*.parquet', 'tokenizer': 'bpe:32000'}".
PRESETS = {
    "cpu": {},
    "accelerator": {"sizes": [[8, 448], [8, 640], [12, 768], [16, 1024], [24, 1152]], "head_dim": 64,
                    "budgets": [3e16, 6e16, 1.5e17, 3e17], "seq_len": 1024, "batch_size": 64,
                    "lr_sweep": [3e-4, 1e-3, 3e-3], "warmup_steps": 200, "evals_per_run": 40, "eval_batches": 16,
                    "mesh_data": -1},
}


# ----------------------------------------------------------------------------- the grid


def _sizes(cfg: dict) -> list[tuple[int, int]]:
  return [(int(L), int(d)) for L, d in cfg["sizes"]]


def _size_name(L: int, d: int) -> str:
  return f"L{L}-d{d}"


def _model_fields(cfg: dict, family: str, L: int, d: int) -> dict:
  fields = {"num_layers": L, "d_model": d, "num_heads": d // cfg["head_dim"], "ffn_dim": cfg["ffn_mult"] * d,
            "short_conv": cfg["short_conv"]}
  if family == MOE:
    return {**fields, "attention": "softmax", "num_experts": cfg["num_experts"],
            "capacity_factor": cfg["capacity_factor"], "moe_every": cfg["moe_every"]}
  return {**fields, "attention": family}


def _mesh(cfg: dict) -> dict:
  import jax

  n = cfg["mesh_data"]
  return {"data": (len(jax.devices()) // cfg["mesh.context"] if n == -1 else n)}


def _steps(cfg: dict, family: str, L: int, d: int) -> int:
  """Steps that spend the largest budget, rounded up to a multiple of evals_per_run."""
  fpt = _flops_per_token(cfg, family, L, d)
  steps = math.ceil(max(cfg["budgets"]) / (fpt * cfg["batch_size"] * cfg["seq_len"]))
  k = cfg["evals_per_run"]
  return max(k, -(-steps // k) * k)


def _config(cfg: dict, family: str, L: int, d: int, *, steps: int, lr: float, seed: int):
  every = steps // cfg["evals_per_run"]
  run = {**cfg, "learning_rate": lr, "seed": seed, "log_every": every, "eval_every": every,
         "warmup_steps": max(1, min(cfg["warmup_steps"], steps // 10))}
  config = _lm.base_config(run, steps=steps, mesh=_mesh(cfg), **_model_fields(cfg, family, L, d))
  return dataclasses.replace(config, train=dataclasses.replace(config.train, schedule="constant"))


def _model(cfg: dict, family: str, L: int, d: int):
  return _lm.base_config(cfg, steps=1, mesh=_mesh(cfg), **_model_fields(cfg, family, L, d)).model


def _flops_per_token(cfg: dict, family: str, L: int, d: int) -> float:
  from efficient_attn import flops

  return flops.model_flops_per_token(_model(cfg, family, L, d), cfg["seq_len"])["train"]


def non_embedding_params(cfg: dict, family: str, L: int, d: int) -> float:
  """Kaplan's N: the matmul weights a token passes through, without the LM head (the MoE's active ones),
  from the dense forward FLOPs (2 per weight)."""
  from efficient_attn import flops

  m = _model(cfg, family, L, d)
  per_token = flops.model_flops_per_token(m, cfg["seq_len"])
  return (per_token["dense"] - 2 * m.d_model * _vocab(cfg)) / 2


def _vocab(cfg: dict) -> int:
  from efficient_attn.config import resolve_vocab

  return resolve_vocab(_lm.base_config(cfg, steps=1, mesh=_mesh(cfg))).model.vocab_size


def _sweep_name(family: str, lr: float) -> str:
  return f"lr-{family}-{lr:g}"


def _run_name(family: str, L: int, d: int, seed_offset: int = 0) -> str:
  return f"{family}-{_size_name(L, d)}" + (f"-seed{seed_offset}" if seed_offset else "")


def variants(cfg: dict) -> list[str]:
  sizes = _sizes(cfg)
  names = [_sweep_name(f, lr) for f in cfg["families"] for lr in cfg["lr_sweep"]]
  names += [_run_name(f, L, d) for f in cfg["families"] for L, d in sizes]
  L, d = sizes[cfg["seed_size"]]
  names += [_run_name(f, L, d, s) for f in cfg["families"] for s in range(1, cfg["seeds"])]
  return names


def _parse(cfg: dict, name: str) -> dict:
  """{"family", "L", "d", "seed_offset"} of a run variant, or {"family", "lr"} of a sweep variant."""
  for f in cfg["families"]:
    for lr in cfg["lr_sweep"]:
      if name == _sweep_name(f, lr):
        return {"family": f, "lr": lr}
    for L, d in _sizes(cfg):
      for s in range(cfg["seeds"]):
        if name == _run_name(f, L, d, s):
          return {"family": f, "L": L, "d": d, "seed_offset": s}
  raise KeyError(name)


def check(cfg: dict) -> None:
  fams = cfg["families"]
  attention = [f for f in fams if f != MOE]
  if attention:
    check_attention_variants(cfg, attention, "scaling_laws", "families")
  if not fams or len(set(fams)) < len(fams):
    raise ConfigError(f"families={fams!r} for experiment scaling_laws: give distinct attention families, or"
                      f" {MOE!r} for the switch MoE.")
  sizes = cfg["sizes"]
  if len(sizes) < 3 or not all(isinstance(s, (list, tuple)) and len(s) == 2 and all(
      isinstance(v, int) and v > 0 for v in s) for s in sizes):
    raise ConfigError(f"sizes={sizes!r} for experiment scaling_laws must list at least 3 [num_layers, d_model]"
                      " pairs of positive integers (an IsoFLOP parabola needs 3 sizes).")
  if any(d % cfg["head_dim"] for _, d in sizes):
    raise ConfigError(f"sizes={sizes!r}: every d_model must be a multiple of head_dim={cfg['head_dim']}.")
  budgets = cfg["budgets"]
  if len(budgets) < 3 or sorted(budgets) != list(budgets) or len(set(budgets)) < len(budgets) or budgets[0] <= 0:
    raise ConfigError(f"budgets={budgets!r} for experiment scaling_laws must be at least 3 increasing positive"
                      " FLOP counts.")
  if not 0 <= cfg["seed_size"] < len(sizes) or cfg["seeds"] < 1:
    raise ConfigError(f"seeds={cfg['seeds']} must be >= 1 and seed_size={cfg['seed_size']} an index into sizes"
                      f" (0..{len(sizes) - 1}).")
  if cfg["evals_per_run"] < 2 or cfg["bootstrap"] < 0 or cfg["smooth_evals"] < 1:
    raise ConfigError(f"evals_per_run={cfg['evals_per_run']} must be >= 2, bootstrap={cfg['bootstrap']} >= 0 and"
                      f" smooth_evals={cfg['smooth_evals']} >= 1.")
  if any(lr <= 0 for lr in cfg["lr_sweep"]) or cfg["learning_rate"] <= 0:
    raise ConfigError(f"lr_sweep={cfg['lr_sweep']!r} and learning_rate={cfg['learning_rate']} must be positive.")
  if not isinstance(cfg["data"], dict) or any(k not in DataConfig.__dataclass_fields__ for k in cfg["data"]):
    bad = next((k for k in cfg["data"] if k not in DataConfig.__dataclass_fields__), None) if isinstance(
        cfg["data"], dict) else None
    hint = f" {bad!r} is not one;{did_you_mean(bad, list(DataConfig.__dataclass_fields__))}" if bad else ""
    raise ConfigError(f"data={cfg['data']!r} for experiment scaling_laws must map DataConfig fields to values"
                      f" (e.g. {{'name': 'text', 'files': 'corpus/'}}):{hint} fields are"
                      f" {', '.join(DataConfig.__dataclass_fields__)}.")
  if cfg["mesh_data"] != -1 and cfg["mesh_data"] < 1:
    raise ConfigError(f"mesh_data={cfg['mesh_data']} must be a positive number of devices, or -1 for all.")
  d_min = min(d for _, d in sizes)
  for f in fams:
    for L, d in _sizes(cfg):
      if f == MOE and cfg["moe_every"] > L:
        raise ConfigError(f"moe_every={cfg['moe_every']} exceeds num_layers={L} of size [{L}, {d}], so that"
                          " switch model has no MoE layer; lower moe_every or drop the size.")
      lr = cfg["learning_rate"] * (d_min / d) ** cfg["lr_width_power"]
      _lm.check_trainable(_config(cfg, f, L, d, steps=_steps(cfg, f, L, d), lr=lr, seed=cfg["seed"]),
                          f"scaling_laws {_run_name(f, L, d)}")


# ----------------------------------------------------------------------------- running


def _best_lr(cfg: dict, family: str, ctx) -> float:
  """The sweep's best rate for `family` (its finished rows in this workdir), else cfg["learning_rate"]."""
  if not cfg["lr_sweep"]:
    return cfg["learning_rate"]
  workdir = os.path.dirname(os.path.dirname(ctx.workdir))  # DIR/variants/V -> DIR
  tried = []
  for lr in cfg["lr_sweep"]:
    rows = finished_rows(workdir, _sweep_name(family, lr))
    if rows is None:
      raise RuntimeError(f"scaling_laws: the learning-rate sweep {_sweep_name(family, lr)} has not finished.")
    loss = rows[0]["val_loss"]
    tried.append((loss if loss is not None and math.isfinite(loss) else math.inf, lr))
  return min(tried)[1]


def _train(config, ctx) -> dict:
  """`_lm.train_variant`, or {"diverged": the message} when the loss became non-finite (a sweep's too-high rate)."""
  from efficient_attn.train import NonFiniteError

  try:
    return _lm.train_variant(config, ctx)
  except NonFiniteError as e:
    return {"diverged": str(e), "val_loss": None, "val_curve": [], "val_step": [], "flops": 0.0,
            "steps": config.train.steps}


def run_variant(cfg: dict, name: str, ctx) -> list[dict]:
  spec = _parse(cfg, name)
  f = spec["family"]
  sizes = _sizes(cfg)
  if "lr" in spec:  # the sweep: the smallest size, to the second budget
    L, d = sizes[0]
    sweep = {**cfg, "budgets": [cfg["budgets"][1]]}
    row = _train(_config(sweep, f, L, d, steps=_steps(sweep, f, L, d), lr=spec["lr"], seed=cfg["seed"]), ctx)
    return [{**_slim(row), "family": f, "kind": "lr_sweep", "lr": spec["lr"], "num_layers": L, "d_model": d}]
  L, d = spec["L"], spec["d"]
  d_min = min(dd for _, dd in sizes)
  lr = _best_lr(cfg, f, ctx) * (d_min / d) ** cfg["lr_width_power"]
  row = _train(_config(cfg, f, L, d, steps=_steps(cfg, f, L, d), lr=lr, seed=cfg["seed"] + spec["seed_offset"]), ctx)
  return [{**_slim(row), "family": f, "kind": "run", "lr": lr, "num_layers": L, "d_model": d,
           "seed_offset": spec["seed_offset"], "params": non_embedding_params(cfg, f, L, d),
           "val_flops": [row["flops"] * s / row["steps"] for s in row["val_step"]]}]


def _slim(row: dict) -> dict:
  """A training row without the per-step train-loss curve (the validation curve is what the fits use)."""
  return {k: v for k, v in row.items() if not k.startswith("curve_")}


# ----------------------------------------------------------------------------- analysis


def smoothed_curve(curve, k: int, x=None):
  """The validation curve smoothed over k evaluations: at each one, the least-squares line through the k
  nearest (in the order of `x`, log compute; default the index) evaluated there, so a steady fall is not
  bent at the ends as a running mean would. A constant learning rate leaves the weights, and so each
  evaluation, fluctuating around the trend."""
  import numpy as np

  y = np.asarray(curve, np.float64)
  n = len(y)
  if k <= 1 or n < 3:
    return y
  k = min(k, n)
  x = np.arange(n, dtype=np.float64) if x is None else np.asarray(x, np.float64)
  out = np.empty(n)
  for i in range(n):
    lo = min(max(0, i - k // 2), n - k)
    slope, intercept = np.polyfit(x[lo:lo + k], y[lo:lo + k], 1)
    out[i] = intercept + slope * x[i]
  return out


def _interp(row: dict, compute: float, smooth: int = 1) -> float:
  """The run's (smoothed) validation loss at `compute`, linear in log compute between evaluations; nan outside."""
  import numpy as np

  xs = np.log(row["val_flops"])
  ys = smoothed_curve(row["val_curve"], smooth, xs)
  x = math.log(compute)
  if not xs[0] - 1e-9 <= x <= xs[-1] + 1e-9:
    return float("nan")
  return float(np.interp(x, xs, ys))


def _loss_at(runs: list[dict], compute: float, smooth: int = 1) -> float:
  """The mean over a size's seeds of the (smoothed) loss at `compute`."""
  vals = [_interp(r, compute, smooth) for r in runs]
  return float(sum(vals) / len(vals))


def analyze(cfg: dict, rows: list[dict]) -> dict:
  """Per family: sizes, frontier, fits, IsoFLOP optima, noise; plus pairwise crossovers. Every fit that the
  runs cannot support is None with a reason in "notes"."""
  import numpy as np

  from efficient_attn import scaling

  budgets = [float(b) for b in cfg["budgets"]]
  grid = np.exp(np.linspace(math.log(budgets[0]), math.log(budgets[-1]), GRID))
  out = {"families": {}, "grid": grid, "budgets": budgets}
  boot = cfg["bootstrap"]
  for f in cfg["families"]:
    runs = [r for r in rows if r.get("kind") == "run" and r["family"] == f and not r.get("diverged")]
    for r in rows:
      if r.get("kind") == "run" and r["family"] == f and r.get("diverged"):
        out.setdefault("diverged", []).append(r["variant"])
    if not runs:
      continue
    by_size = {}
    for r in runs:
      by_size.setdefault((r["num_layers"], r["d_model"]), []).append(r)
    sizes = sorted(by_size, key=lambda s: by_size[s][0]["params"])
    params = [by_size[s][0]["params"] for s in sizes]
    notes = []
    k = cfg.get("smooth_evals", 1)
    table = np.array([[_loss_at(by_size[s], c, k) for s in sizes] for c in grid])  # [GRID, sizes]
    frontier = np.nanmin(np.where(np.isnan(table), np.inf, table), axis=1)
    ok = np.isfinite(frontier)
    fam = {"sizes": sizes, "params": params, "runs": by_size, "frontier": frontier, "notes": notes,
           "winner": [sizes[int(i)] if np.isfinite(v) else None
                      for i, v in zip(np.argmin(np.where(np.isnan(table), np.inf, table), 1), frontier)]}
    fam["fit"] = scaling.fit_power_law(grid[ok], frontier[ok], bootstrap=boot, seed=cfg["seed"]) \
        if ok.sum() >= 4 else None
    # Held out: the frontier up to the second-largest budget predicts the largest.
    part = ok & (grid <= budgets[-2] * (1 + 1e-9))
    fam["heldout"] = None
    if part.sum() >= 4 and np.isfinite(frontier[-1]):
      early = scaling.fit_power_law(grid[part], frontier[part], bootstrap=0)
      pred = float(early.predict(budgets[-1]))
      fam["heldout"] = {"predicted": pred, "measured": float(frontier[-1]),
                        "error": pred - float(frontier[-1]), "relative": pred / float(frontier[-1]) - 1}
    else:
      notes.append("too few frontier points below the largest budget for a held-out prediction")
    # IsoFLOP: each budget's losses over sizes; a parabola in log N through the best size and its neighbours.
    iso = []
    for b in budgets:
      losses = [_loss_at(by_size[s], b, k) for s in sizes]
      entry = {"budget": b, "losses": losses, "n_opt": None, "l_opt": None}
      finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
      if finite:
        i = min(finite, key=lambda j: losses[j])
        if 0 < i < len(sizes) - 1 and math.isfinite(losses[i - 1]) and math.isfinite(losses[i + 1]):
          try:
            entry["n_opt"], entry["l_opt"] = scaling.isoflop_optimum(params[i - 1:i + 2], losses[i - 1:i + 2])
          except ValueError:
            pass
        else:
          entry["edge"] = "smallest" if i == 0 else "largest"
      iso.append(entry)
    fam["isoflop"] = iso
    inner = [(e["budget"], e["n_opt"]) for e in iso if e["n_opt"] is not None]
    edges = [f"{e['budget']:.2g}: {e['edge']}" for e in iso if "edge" in e]
    if edges:
      notes.append("the best size is at the edge of the grid at budgets " + ", ".join(edges)
                   + " (no interior IsoFLOP minimum there)")
    fam["n_opt_fit"] = scaling.fit_optimal_size(*zip(*inner), bootstrap=boot, seed=cfg["seed"]) \
        if len(inner) >= 3 else None
    # Noise: the spread over seeds of the final validation loss at seed_size.
    seeded = by_size.get(tuple(_sizes(cfg)[cfg["seed_size"]]), [])
    finals = [smoothed_curve(r["val_curve"], k, np.log(r["val_flops"]))[-1] for r in seeded]
    fam["seed_std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else None
    out["families"][f] = fam
  fits = {f: v["fit"] for f, v in out["families"].items() if v["fit"] is not None}
  names = list(fits)
  out["crossovers"] = {(a, b): scaling.crossover(fits[a], fits[b])
                       for i, a in enumerate(names) for b in names[i + 1:]}
  return out


def _overlap(a: tuple, b: tuple) -> bool:
  return not (a[0] > b[1] or b[0] > a[1])


NOISE_SHARE = 0.25  # seed noise above this share of the frontier's fall: the frontier's intervals cannot be trusted


def noise_share(v: dict) -> float | None:
  """A family's seed std of the final loss over the fall of its frontier across the grid (None: unknown)."""
  import numpy as np

  front = np.asarray(v.get("frontier", []), np.float64)
  front = front[np.isfinite(front)]
  if v.get("seed_std") is None or front.size < 2 or front[0] <= front[-1]:
    return None
  return v["seed_std"] / (front[0] - front[-1])


def claims(analysis: dict) -> list[str]:
  """A sentence per pair of families: which scales better (α intervals apart and the seed noise small next to
  the frontier's fall), or why the grid cannot tell. The bootstrap resamples the frontier's points of one
  run per size, so it does not see run-to-run noise: a family whose seeds differ by more than NOISE_SHARE of
  its frontier's fall supports no claim."""
  fams = [(f, v["fit"], noise_share(v)) for f, v in analysis["families"].items() if v["fit"] is not None]
  out = []
  for i, (a, fa, na) in enumerate(fams):
    for b, fb, nb in fams[i + 1:]:
      ia, ib = fa.ci["alpha"], fb.ci["alpha"]
      noisy = [(f, n) for f, n in ((a, na), (b, nb)) if n is not None and n > NOISE_SHARE]
      if noisy:
        shown = ", ".join(f"{f} {100 * n:.0f}%" for f, n in noisy)
        out.append(f"{a} vs {b}: no claim; the seed noise is {shown} of the frontier's fall over the grid, more"
                   f" than the {100 * NOISE_SHARE:.0f}% the intervals could be trusted at (they resample one run"
                   " per size and do not see it).")
      elif any(math.isnan(v) for v in ia + ib):
        out.append(f"{a} vs {b}: no intervals (bootstrap=0), so no claim.")
      elif _overlap(ia, ib):
        out.append(f"{a} vs {b}: the α intervals overlap ({ia[0]:.3f}-{ia[1]:.3f} vs {ib[0]:.3f}-{ib[1]:.3f});"
                   " this grid cannot say which scales better.")
      else:
        hi, lo = (a, b) if fa.alpha > fb.alpha else (b, a)
        out.append(f"{hi} scales better than {lo} over this range: its α interval lies wholly above"
                   f" ({max(ia[0], ib[0]):.3f} > {min(ia[1], ib[1]):.3f}); compare E too (the loss each"
                   " approaches).")
  return out


def summarize(cfg: dict, rows: list[dict]) -> str:
  f = _lm.fmt
  an = analyze(cfg, rows)

  def ci(fit, key, spec=".3f"):
    lo, hi = fit.ci[key]
    return f"{format(getattr(fit, key), spec)} [{f(lo, spec)}, {f(hi, spec)}]"

  lines = ["| family | lr (smallest size) | α [95% CI] | E [95% CI] | A | N_opt exponent a [95% CI] |"
           " held-out L at the largest budget: predicted / measured (error) | fit RMS (log L) | seed std |",
           "|" + "---|" * 9]
  for fam, v in an["families"].items():
    fit, nf, ho = v["fit"], v["n_opt_fit"], v["heldout"]
    held = f"{ho['predicted']:.3f} / {ho['measured']:.3f} ({100 * ho['relative']:+.1f}%)" if ho else "-"
    small = min(v["runs"][v["sizes"][0]], key=lambda r: r["seed_offset"])
    rms = f(float((fit.residuals ** 2).mean() ** 0.5), ".4f") if fit else "-"
    lines.append(
        f"| {fam} | {small['lr']:.2g} | {ci(fit, 'alpha') if fit else '-'} | {ci(fit, 'E') if fit else '-'}"
        f" | {f(fit.A, '.3g') if fit else '-'}"
        f" | {f'{nf.exponent:.2f} [{nf.ci[0]:.2f}, {nf.ci[1]:.2f}]' if nf else '-'}"
        f" | {held}"
        f" | {rms} | {f(v['seed_std'], '.4f')} |")
  size_lines = ["| family | " + " | ".join(f"{_size_name(L, d)}" for L, d in _sizes(cfg)) + " |",
                "|" + "---|" * (1 + len(cfg["sizes"]))]
  for fam, v in an["families"].items():
    cells = []
    for L, d in _sizes(cfg):
      runs = v["runs"].get((L, d))
      cells.append(f"{runs[0]['params'] / 1e3:.0f}K, {runs[0]['steps']} steps, {runs[0]['val_curve'][-1]:.3f}"
                   if runs else "-")
    size_lines.append(f"| {fam} | " + " | ".join(cells) + " |")
  iso_lines = ["| family | " + " | ".join(f"{b:.2g} FLOPs" for b in an["budgets"]) + " |",
               "|" + "---|" * (1 + len(an["budgets"]))]
  for fam, v in an["families"].items():
    cells = [f"{e['n_opt'] / 1e3:.0f}K ({e['l_opt']:.3f})" if e["n_opt"] else
             f"edge: {e['edge']}" if "edge" in e else "-" for e in v["isoflop"]]
    iso_lines.append(f"| {fam} | " + " | ".join(cells) + " |")
  cross = []
  for (a, b), c in an["crossovers"].items():
    if c is None:
      lo, hi = an["budgets"][0], 100 * an["budgets"][-1]
      cross.append(f"- {a} / {b}: no crossing of the fitted curves in [{lo:.2g}, {hi:.2g}] FLOPs.")
    else:
      cross.append(f"- {a} / {b}: the fitted curves cross at {c.compute:.3g} FLOPs (95% CI {c.ci[0]:.3g}-"
                   f"{c.ci[1]:.3g} over the {100 * c.fraction:.0f}% of bootstrap pairs that cross in range).")
  notes = [f"- {fam}: {n}." for fam, v in an["families"].items() for n in v["notes"]]
  notes += [f"- {v}: the loss became non-finite; left out of the fits." for v in an.get("diverged", [])]
  sweeps = [r for r in rows if r.get("kind") == "lr_sweep"]
  for fam in cfg["families"]:
    tried = sorted((r["lr"], r["val_loss"]) for r in sweeps if r["family"] == fam)
    if len(tried) > 1:
      shown = ", ".join(f"{lr:g}: {'diverged' if loss is None else format(loss, '.3f')}" for lr, loss in tried)
      notes.append(f"- {fam} learning-rate sweep (val loss at the smallest size): {shown}.")
  stds = [v["seed_std"] for v in an["families"].values() if v["seed_std"] is not None]
  small = ("" if not stds else
           f" Run-to-run noise (seed std of the final loss at one size): {min(stds):.4f}-{max(stds):.4f} nats/byte.")
  return (
      f"{len(cfg['sizes'])} sizes x {len(cfg['families'])} families, each run to {max(cfg['budgets']):.2g} training"
      f" FLOPs ({cfg['batch_size']} x {cfg['seq_len']} bytes a step, constant learning rate after warmup,"
      f" validated on the same {cfg['eval_batches']} held-out batches {cfg['evals_per_run']} times); budgets"
      f" {', '.join(f'{b:.2g}' for b in cfg['budgets'])}. Fits on the frontier (lowest loss over sizes at {GRID}"
      f" log-spaced computes, validation curves smoothed over {cfg['smooth_evals']} evaluations), {cfg['bootstrap']}"
      " bootstrap refits; learning rate per size = the family's best"
      f" of {cfg['lr_sweep'] or [cfg['learning_rate']]} at the smallest size x (d_min / d)^{cfg['lr_width_power']}."
      f"{small}\n\n"
      + "\n".join(lines)
      + "\n\nClaims (a family scales better only where the α intervals do not overlap and its seed noise is"
      f" below {100 * NOISE_SHARE:.0f}% of its frontier's fall):\n\n"
      + "\n".join(f"- {c}" for c in claims(an) or ["one family: nothing to compare."])
      + "\n\nCrossovers:\n\n" + ("\n".join(cross) or "- one family: none.")
      + "\n\nRuns (non-embedding params N, steps, final validation loss in nats/byte):\n\n" + "\n".join(size_lines)
      + "\n\nIsoFLOP optima (N_opt and its loss per budget; 'edge' = the best size is the smallest or largest"
      " run, so the optimum lies outside the grid):\n\n" + "\n".join(iso_lines)
      + ("\n\nNotes:\n\n" + "\n".join(notes) if notes else "")
      + f"\n\nAnchors: {SCALING_NOTE}")


# ----------------------------------------------------------------------------- plots


def plot(cfg: dict, rows: list[dict], workdir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  an = analyze(cfg, rows)
  fams = list(an["families"])
  if not fams:
    return []
  out = []
  cols = min(3, len(fams))
  nrows = -(-len(fams) // cols)
  # 1. Loss vs FLOPs: a curve per size, the frontier and its fit per family.
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), dpi=100, squeeze=False)
  for ax, fam in zip(axes.flat, fams):
    v = an["families"][fam]
    for k, s in enumerate(v["sizes"]):
      r = v["runs"][s][0]
      ax.plot(r["val_flops"], r["val_curve"], lw=1, alpha=0.7, label=f"{_size_name(*s)} ({v['params'][k] / 1e3:.0f}K)")
    ax.plot(an["grid"], v["frontier"], "k.", ms=5, label="frontier")
    if v["fit"] is not None:
      c = np.exp(np.linspace(np.log(an["grid"][0]), np.log(an["grid"][-1] * 3), 100))
      ax.plot(c, v["fit"].predict(c), "k-", lw=1.6,
              label=f"fit α={v['fit'].alpha:.3f}")
    ax.set(xscale="log", title=fam, xlabel="training FLOPs", ylabel="val loss (nats/byte)")
    lo = np.nanmin(v["frontier"])
    ax.set_ylim(lo - 0.1, lo + 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  for ax in list(axes.flat)[len(fams):]:
    ax.axis("off")
  fig.tight_layout()
  out.append(_save(fig, os.path.join(workdir, "scaling_frontier.png")))
  # 2. IsoFLOP curves: loss vs N per budget.
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), dpi=100, squeeze=False)
  for ax, fam in zip(axes.flat, fams):
    v = an["families"][fam]
    for e in v["isoflop"]:
      line, = ax.plot(v["params"], e["losses"], "o-", ms=3, lw=1, label=f"{e['budget']:.2g}")
      if e["n_opt"]:
        ax.plot([e["n_opt"]], [e["l_opt"]], "*", color=line.get_color(), ms=9)
    ax.set(xscale="log", title=fam, xlabel="non-embedding params N", ylabel="val loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, title="FLOPs (★ N_opt)", title_fontsize=6)
  for ax in list(axes.flat)[len(fams):]:
    ax.axis("off")
  fig.tight_layout()
  out.append(_save(fig, os.path.join(workdir, "scaling_isoflop.png")))
  # 3. α per family with its 95% interval.
  fitted = [(f, an["families"][f]["fit"]) for f in fams if an["families"][f]["fit"] is not None]
  if fitted:
    fig, ax = plt.subplots(figsize=(1.2 * len(fitted) + 2.5, 3.6), dpi=100)
    xs = np.arange(len(fitted))
    alpha = np.array([fit.alpha for _, fit in fitted])
    lo = np.array([fit.ci["alpha"][0] for _, fit in fitted])
    hi = np.array([fit.ci["alpha"][1] for _, fit in fitted])
    ax.errorbar(xs, alpha, yerr=[np.nan_to_num(alpha - lo), np.nan_to_num(hi - alpha)], fmt="o", capsize=5)
    ax.set_xticks(xs, [f for f, _ in fitted], rotation=20)
    ax.set(ylabel="α in L = E + A·C^(−α)", title="fitted α with 95% bootstrap interval")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out.append(_save(fig, os.path.join(workdir, "scaling_alpha.png")))
  return out


def _save(fig, path: str) -> str:
  import matplotlib.pyplot as plt

  fig.savefig(path)
  plt.close(fig)
  return path
