"""Step time and memory of one small LM per attention family at 1K-8K tokens, relative to softmax (LRA Table 2).

    efficient-attn experiment attention_scaling --workdir runs/attention_scaling

The CPU counterpart of the Long Range Arena efficiency table (Tay et al. 2020, Table 2).
One fixed TransformerLM (2 layers, d_model 256, 4 heads, batch 1, causal) is compiled
once per attention family and sequence length; a row records the median wall time of
its training step (forward + backward of the LM loss, `jax.value_and_grad` of
`train.loss_fn`, timed after a warm-up call), the compiled step's temporary memory
(XLA `memory_analysis()`; device peak bytes on GPU/TPU too) and its FLOPs, and the
speed-up and memory ratio against exact softmax with materialised logits ("softmax",
XLA) at the same length. "softmax_chunked" is the same exact softmax computed flash-style
(online softmax over key chunks), the counterpart LRA does not have.

A length whose step is predicted (quadratic growth from the previous length) to take
longer than `max_step_s`, or whose compiled memory exceeds `max_memory_gib`, is
compiled but not run: its row keeps the memory and says why; one predicted past
LONG_STEP_S is timed once after the warm-up. `--set smoke=true`
measures a tiny model at 256 and 512 tokens in about 20 s. `--set mesh.context=P` compiles and
times every step with each sequence split over P devices (as long_context does; rows carry
"context", memory is per device); on CPU the P devices are emulated and share the cores.
"""

from __future__ import annotations

import math
import os

from efficient_attn.config import ConfigError
from efficient_attn.experiment import attention_option, attention_variant, check_attention_variants, line_plot

from ._papers import LRA_LENGTHS, LRA_TABLE2, LRA_TABLE2_NOTE

# The default variants, in table order; any registered family (a --plugin's too) can be added.
# "softmax" (the baseline, run first) materialises its logits; "softmax_chunked" is an alias:
# the same family with its flash-style implementation.
FAMILIES = ["softmax", "softmax_chunked", "local", "sparse", "linear", "performer"]
ALIASES = {"softmax": ("softmax", {"implementation": "xla"}),
           "softmax_chunked": ("softmax", {"implementation": "chunked"})}
BASELINE = "softmax"
LONG_STEP_S = 10.0
CONTEXT_PARALLEL = True  # --set mesh.context=P: every step with its sequence split over P devices


def get_config() -> dict:
  return {
      "smoke": False, "families": list(FAMILIES), "seq_lens": [1024, 2048, 4096, 8192], "batch_size": 1,
      "d_model": 256, "num_layers": 2, "num_heads": 4, "ffn_dim": 1024, "dtype": "float32",
      "attention_options": {"local": {"window": 256}, "sparse": {"block_size": 64, "window": 3, "num_global": 1,
                                                                 "num_random": 1},
                            "performer": {"num_features": 256}},
      "repeats": 3, "min_time_s": 0.2, "max_step_s": 120.0, "max_memory_gib": 12.0, "compile_threads": 2,
      "seed": 0,
      "short_conv": 0,  # model.short_conv of every model (0: none, as the measured tables; -1: each family's default)
  }


SMOKE = {"seq_lens": [256, 512], "d_model": 64, "num_layers": 1, "num_heads": 2, "ffn_dim": 128,
         "attention_options": {"local": {"window": 64}, "sparse": {"block_size": 64},
                               "performer": {"num_features": 32}},
         "repeats": 2, "min_time_s": 0.02}


def check(cfg: dict) -> None:
  from efficient_attn.config import validate

  check_attention_variants(cfg, cfg["families"], "attention_scaling", "families", ALIASES)
  lens = cfg["seq_lens"]
  positive = all(isinstance(T, int) and not isinstance(T, bool) and T > 0 for T in lens)
  if not lens or not positive or len(set(lens)) < len(lens):
    raise ConfigError(f"seq_lens={lens!r} must be a non-empty list of distinct positive integers.")
  for key in ("repeats", "batch_size", "compile_threads"):
    if cfg[key] < 1:
      raise ConfigError(f"{key}={cfg[key]} must be a positive integer.")
  for key in ("min_time_s", "max_step_s", "max_memory_gib"):
    if not cfg[key] > 0:
      raise ConfigError(f"{key}={cfg[key]} must be a positive number.")
  for name in cfg["families"]:
    for T in lens:  # each family checks its own constraints (e.g. sparse: T a multiple of its block)
      try:
        validate(_train_config(cfg, name, T), cfg["mesh.context"])
      except ConfigError as e:
        raise ConfigError(f"attention_scaling family {name}: {e}") from None


def variants(cfg: dict) -> list[str]:
  return sorted(cfg["families"], key=lambda f: f != BASELINE)  # the baseline first: the others' ratios need it


def _train_config(cfg: dict, name: str, T: int):
  from efficient_attn.config import Config, MeshConfig, ModelConfig, TrainConfig

  keys = ("d_model", "num_layers", "num_heads", "ffn_dim", "dtype", "short_conv")
  attention, options = attention_variant(cfg, name, ALIASES)
  m = ModelConfig(attention=attention, attention_options=options, **{k: cfg[k] for k in keys})
  mesh = MeshConfig(data=1, context=cfg["mesh.context"], context_layout=cfg["mesh.context_layout"])
  return Config(model=m, train=TrainConfig(batch_size=cfg["batch_size"], seq_len=T), mesh=mesh)


def _compile(cfg: dict, name: str, T: int, variables, mesh) -> tuple[dict, object, dict]:
  """Compiles the training step of family `name` at length T: (row with memory and FLOPs, executable, batch).

  mesh: None (one device), or `experiment.context_mesh`: the step splits each sequence over its P devices
  (`variables` already whole on each), the batch laid out for them."""
  import contextlib

  import jax

  from efficient_attn import flops, train
  from efficient_attn.measure import compile_fn, temp_bytes, xla_flops
  from efficient_attn.model import TransformerLM

  config = _train_config(cfg, name, T)
  m, B = config.model, cfg["batch_size"]
  tokens = jax.random.randint(jax.random.PRNGKey(cfg["seed"] + T), (B, T + 1), 0, m.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": None,
           "weights": jax.numpy.ones((B, T), jax.numpy.float32)}
  if mesh is not None:
    batch = _laid_out(cfg, batch, mesh)
  model = TransformerLM(m, context_layout=cfg["mesh.context_layout"])
  params, buffers = variables
  step = jax.value_and_grad(lambda p, b: train.loss_fn(p, b, model, config.train, buffers), has_aux=True)
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):  # per thread: compiles run in a pool
    compiled = compile_fn(step, params, batch)
  impl = getattr(m.options, "implementation", None)
  fpt = flops.model_flops_per_token(m, T)
  row = {"family": name, "attention": m.attention, "implementation": impl, "seq_len": T, "batch_size": B,
         "context": cfg["mesh.context"], "memory_bytes": temp_bytes(compiled), "flops": fpt["train"] * B * T,
         "flops_executed": fpt["executed_train"] * B * T, "xla_flops": xla_flops(compiled) or None,
         "step_time_s": None, "repeats": 0, "load_avg": None, "tokens_per_sec": None, "device_peak_bytes": None,
         "skipped": None}
  return row, compiled, batch


def _laid_out(cfg: dict, batch: dict, mesh) -> dict:
  """`batch` laid out for the mesh's P context devices (`context.lay_out_example`, positions added) and
  sharded over them. Every row is one segment (`train.loss_fn` reads segment ids; all ones attend as None
  does)."""
  import numpy as np

  from efficient_attn.attention import context

  example = {k: np.asarray(v) for k, v in batch.items() if v is not None}
  example["segment_ids"] = np.ones(example["inputs"].shape, np.int32)
  return context.global_example(example, mesh, cfg["mesh.context_layout"])


def _time(cfg: dict, row: dict, compiled, params, batch, predicted_s: float | None) -> None:
  """Fills row's step time, unless its memory or its predicted time is over the limits (then says why)."""
  from efficient_attn.measure import peak_device_bytes, time_compiled

  if row["memory_bytes"] > cfg["max_memory_gib"] * 2**30:
    row["skipped"] = f"compiled memory {row['memory_bytes'] / 2**30:.1f} GiB > max_memory_gib={cfg['max_memory_gib']:g}"
  elif predicted_s is not None and predicted_s > cfg["max_step_s"]:
    row["skipped"] = f"predicted step {predicted_s:.0f} s > max_step_s={cfg['max_step_s']:g}"
  else:
    # A step predicted past LONG_STEP_S is timed once after the warm-up: timer noise is nil at that
    # scale, and repeating it would not remove the noise of a shared machine, only add minutes.
    repeats = 1 if predicted_s is not None and predicted_s > LONG_STEP_S else cfg["repeats"]
    row["step_time_s"] = time_compiled(compiled, params, batch, repeats=repeats, min_time=cfg["min_time_s"])
    row["repeats"] = repeats
    row["load_avg"] = os.getloadavg()[0]  # the machine's 1-minute load when timed: other jobs slow the step
    row["tokens_per_sec"] = row["batch_size"] * row["seq_len"] / row["step_time_s"]
    row["device_peak_bytes"] = peak_device_bytes()  # process-wide peak so far (GPU/TPU only)


def _init_params(cfg: dict, name: str):
  """Params of the model, drawn with NumPy: the step's time and memory do not depend on their values,
  and compiling `model.init` would cost as much as compiling the step itself."""
  import flax.linen as nn
  import jax
  import numpy as np

  from efficient_attn.model import TransformerLM

  T = min(cfg["seq_lens"])  # the params depend neither on T nor on the attention family
  model = TransformerLM(_train_config(cfg, name, T).model)
  tokens = jax.ShapeDtypeStruct((cfg["batch_size"], T), jax.numpy.int32)
  shapes = jax.eval_shape(lambda key, x: nn.unbox(model.init(key, x))["params"], jax.random.PRNGKey(0), tokens)
  rng = np.random.default_rng(cfg["seed"])

  def draw(s):  # matrices ~ N(0, 0.02²); norm scales 1
    return jax.numpy.asarray(0.02 * rng.standard_normal(s.shape) if len(s.shape) > 1 else np.ones(s.shape), s.dtype)

  # A family's buffers (the Performer's projections) as init draws them; only they are computed.
  zeros = jax.numpy.zeros(tokens.shape, tokens.dtype)
  buffers = jax.jit(lambda key: model.init(key, zeros).get("buffers"))(jax.random.PRNGKey(cfg["seed"]))
  return jax.tree.map(draw, shapes), buffers


def run_variant(cfg: dict, name: str, ctx) -> list[dict]:
  """Rows of family `name` at every length, shortest first; ratios against the baseline's finished rows.

  All lengths are compiled first, `compile_threads` at a time (XLA compiles outside the GIL;
  compiling is most of a small run), then timed one after the other.
  """
  from concurrent.futures import ThreadPoolExecutor

  import jax
  from tqdm.auto import tqdm

  from efficient_attn import sharding
  from efficient_attn.experiment import context_mesh, finished_rows

  root = os.path.dirname(os.path.dirname(ctx.workdir))  # the runner's DIR (ctx.workdir = DIR/variants/NAME)
  base = {r["seq_len"]: r for r in (finished_rows(root, BASELINE) or [])}
  mesh = context_mesh(cfg)
  variables = _init_params(cfg, name)
  if mesh is not None:  # params and buffers whole on every device of the split
    variables = jax.device_put(variables, sharding.replicated(mesh))
  params = variables[0]
  lengths = sorted(cfg["seq_lens"])
  bar = tqdm(total=2 * len(lengths), desc=f"{name} compile+time", unit="step", disable=not ctx.progress,
             leave=False)

  def build(T):
    out = _compile(cfg, name, T, variables, mesh)
    bar.update()
    return out

  with ThreadPoolExecutor(cfg["compile_threads"]) as pool:
    built = list(pool.map(build, lengths))
  last = None
  for row, compiled, batch in built:
    T = row["seq_len"]
    bar.set_postfix_str(f"T={T}")
    predicted = last[1] * (T / last[0]) ** 2 if last else None  # quadratic: right for softmax, safe for the rest
    _time(cfg, row, compiled, params, batch, predicted)
    if row["step_time_s"] is not None:
      last = (T, row["step_time_s"])
    bar.update()
  bar.close()
  rows = [row for row, _, _ in built]
  for row in rows:
    b = row if name == BASELINE else base.get(row["seq_len"])
    row["speedup"] = b["step_time_s"] / row["step_time_s"] if b and b["step_time_s"] and row["step_time_s"] else None
    row["memory_ratio"] = row["memory_bytes"] / b["memory_bytes"] if b and b["memory_bytes"] else None
  return rows


# ----------------------------------------------------------------------------- table and plots


def _f(v, spec: str) -> str:
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _lra_ratios(family: str, T: int) -> tuple[float, float] | None:
  """LRA's (speed-up, memory ratio) vs the vanilla Transformer at length T, if Table 2 has it."""
  if family not in LRA_TABLE2 or T not in LRA_LENGTHS:
    return None
  i = LRA_LENGTHS.index(T)
  _, steps, mem = LRA_TABLE2[family]
  _, base_steps, base_mem = LRA_TABLE2[BASELINE]
  return steps[i] / base_steps[i], mem[i] / base_mem[i]


def _measured_table(rows: list[dict]) -> str:
  lines = ["| family | T | step s | tokens/s | speed-up vs softmax | compiled MiB | memory vs softmax |"
           " train GFLOP/step (ideal / executed / XLA) |", "|---|---|---|---|---|---|---|---|"]
  order = {f: i for i, f in enumerate(dict.fromkeys(r["family"] for r in rows))}  # variant order
  for r in sorted(rows, key=lambda r: (r["seq_len"], order[r["family"]])):
    step = _f(r["step_time_s"], ".4f") if not r["skipped"] else "skipped"
    lines.append(f"| {r['family']} | {r['seq_len']} | {step} | {_f(r['tokens_per_sec'], '.0f')}"
                 f" | {_f(r['speedup'], '.2f')} | {r['memory_bytes'] / 2**20:.1f} | {_f(r['memory_ratio'], '.3f')}"
                 f" | {r['flops'] / 1e9:.2f} / {r['flops_executed'] / 1e9:.2f}"
                 f" / {_f((r['xla_flops'] or 0) / 1e9, '.2f')} |")
  return "\n".join(lines)


def _anchor_table(rows: list[dict]) -> str:
  """Our ratios beside LRA Table 2's at the lengths both have."""
  ours = {(r["family"], r["seq_len"]): r for r in rows}
  lens = [T for T in LRA_LENGTHS if any(r["seq_len"] == T for r in rows)]
  if not lens:
    return "(none of the measured lengths is one of LRA's 1K / 2K / 3K / 4K)"
  head = " | ".join(f"speed-up {T // 1024}K" for T in lens) + " | " + " | ".join(f"memory {T // 1024}K" for T in lens)
  lines = [f"| family (LRA model) | {head} |", "|---|" + "---|" * 2 * len(lens)]
  for fam, (label, _, _) in LRA_TABLE2.items():
    if not any((fam, T) in ours for T in lens):
      continue
    cells = []
    for key, idx in (("speedup", 0), ("memory_ratio", 1)):
      for T in lens:
        r, lra = ours.get((fam, T)), _lra_ratios(fam, T)
        cells.append(f"{_f(r and r[key], '.2f')} / {lra[idx]:.2f}")
    lines.append(f"| {fam} ({label}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def summarize(cfg: dict, rows: list[dict]) -> str:
  lra_abs = ["| LRA model | steps/s 1K / 2K / 3K / 4K | peak GB 1K / 2K / 3K / 4K |", "|---|---|---|"]
  for label, steps, mem in LRA_TABLE2.values():
    lra_abs.append(f"| {label} | {' / '.join(map(str, steps))} | {' / '.join(map(str, mem))} |")
  loads = [r["load_avg"] for r in rows if r.get("load_avg") is not None]
  load = f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores" if loads else "not recorded"
  skipped = [f"- {r['family']} at T={r['seq_len']}: {r['skipped']} (memory still reported)" for r in rows
             if r["skipped"]]
  opt = lambda family, name: attention_option(cfg, family, name)  # noqa: E731
  model = (f"{cfg['num_layers']}-layer causal TransformerLM, d_model {cfg['d_model']}, {cfg['num_heads']} heads,"
           f" FFN {cfg['ffn_dim']}, batch {cfg['batch_size']}, {cfg['dtype']}; local window {opt('local', 'window')};"
           f" sparse = BigBird layout of {opt('sparse', 'block_size')}-token blocks ({opt('sparse', 'window')} window,"
           f" {opt('sparse', 'num_global')} global, {opt('sparse', 'num_random')} random); Performer"
           f" M={opt('performer', 'num_features')}")
  P = cfg["mesh.context"]
  split = (f" Each sequence is split over {P} devices (mesh.context, {cfg['mesh.context_layout']} layout): memory"
           " and XLA FLOPs are per device; emulated CPU devices share the cores." if P > 1 else "")
  intro = (f"One training step (forward + backward of the LM loss) of a {model}.{split} Time: median of >="
           f" {cfg['repeats']} calls after a warm-up (one call where the step was predicted past {LONG_STEP_S:g} s)."
           " Memory: XLA's compiled temporary bytes of the step. Ratios are against `softmax` (exact, XLA,"
           " materialised T x T logits) at the same length. FLOPs: ideal and executed from"
           " `flops.model_flops_per_token`, XLA from `cost_analysis()`, which counts a loop body once and so"
           " under-reports the chunked softmax (its key-chunk loop is a while loop).")
  differs = ("How ours differs: a causal decoder (kernelized attention runs chunkwise; softmax XLA still computes"
             " the full T x T logits); batch 1 on a shared CPU, where other jobs ran at the same time (1-minute"
             f" load average {load} while timing) and the families were timed minutes apart, so the times are"
             " noisy; compiled scratch memory rather than device peak (params and optimizer state, the same for"
             " every family, are left out); and `softmax_chunked`, an exact flash-style softmax LRA did not"
             " have, which removes most of the quadratic memory without approximating anything.")
  return "\n\n".join([
      intro, "## Measured", _measured_table(rows),
      "## Beside LRA Table 2 (ours / LRA; relative to softmax = LRA's vanilla Transformer)", _anchor_table(rows),
      LRA_TABLE2_NOTE + "\n\n" + "\n".join(lra_abs), differs,
      "Skipped:\n" + ("\n".join(skipped) if skipped else "- nothing"),
  ])


def plot(cfg: dict, rows: list[dict], workdir: str) -> list[str]:
  fams = [f for f in cfg["families"] if any(r["family"] == f for r in rows)]

  def series(key, scale=1.0):
    out = {}
    for f in fams:
      pts = sorted((r["seq_len"], r[key] * scale) for r in rows if r["family"] == f and r[key] is not None)
      if pts:
        out[f] = ([p[0] for p in pts], [p[1] for p in pts])
    return out

  return [line_plot(os.path.join(workdir, "attention_scaling_time.png"), series("step_time_s"),
                    xlabel="sequence length T", ylabel="training step time (s)",
                    title="attention_scaling: step time vs length", logx=True, logy=True),
          line_plot(os.path.join(workdir, "attention_scaling_memory.png"), series("memory_bytes", 2**-20),
                    xlabel="sequence length T", ylabel="compiled temporary memory (MiB)",
                    title="attention_scaling: memory vs length", logx=True, logy=True)]
