"""The longest sequence each family trains within a per-device memory budget, split over 1, 2, 4 and 8 devices.

    efficient-attn experiment long_context --workdir runs/long_context

Context parallelism (`mesh.context`, `efficient_attn.attention.context`): each sequence is split over
P devices. For every family and P in `contexts`, a small TransformerLM's training step (forward +
backward of the LM loss, batch 1) is compiled, not run, at doubling lengths from `start_len`: the
longest whose per-device compiled memory (XLA's temporary + argument bytes of the SPMD program) fits
`budget_mib`, searched from the reach at the previous P and then refined between the last length that
fit and the first that did not (to a multiple of 2048·P tokens), is the family's reach at P. Then every family's
step is compiled and timed at `time_len` (a length all of them fit) on each P, with the bytes its
collectives move per step read from the compiled program. On CPU the P devices are emulated
(`--xla_force_host_platform_device_count`) and share the machine's cores: the memory and the bytes
moved are what P accelerators would hold and send, the times are not a speed-up measurement.
`--set smoke=true` runs two families at P = 1, 2 on a tiny model in about 30 s.
"""

from __future__ import annotations

import os

from efficient_attn.config import ConfigError
from efficient_attn.experiment import attention_variant, check_attention_variants, line_plot

from ._papers import LONG_CONTEXT_NOTE

FAMILIES = ["softmax", "local", "sparse", "linear", "performer", "retnet", "gla", "mamba2", "deltanet",
            "gated_deltanet", "based"]


def get_config() -> dict:
  return {
      "smoke": False, "families": list(FAMILIES), "contexts": [1, 2, 4, 8], "context_layout": "zigzag",
      "budget_mib": 1024.0, "start_len": 4096, "max_len": 1048576, "time_len": 8192,
      "d_model": 128, "num_layers": 2, "num_heads": 4, "ffn_dim": 512, "dtype": "float32",
      "attention_options": {"local": {"window": 256}, "sparse": {"block_size": 64},
                            "performer": {"num_features": 64}},
      "repeats": 3, "min_time_s": 0.2, "seed": 0,
      "short_conv": 0,  # model.short_conv of every model (0: none, as the measured table; -1: each family's default)
  }


SMOKE = {"families": ["softmax", "gla"], "contexts": [1, 2], "budget_mib": 2.0, "start_len": 128, "max_len": 256,
         "time_len": 128, "d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64, "repeats": 2,
         "min_time_s": 0.0}


def check(cfg: dict) -> None:
  import jax

  from efficient_attn.config import validate

  check_attention_variants(cfg, cfg["families"], "long_context", "families")
  contexts = cfg["contexts"]
  if not contexts or len(set(contexts)) < len(contexts) or any(not isinstance(p, int) or p < 1 for p in contexts):
    raise ConfigError(f"contexts={contexts!r} must be a non-empty list of distinct positive integers.")
  if max(contexts) > len(jax.local_devices()):  # under a launcher each process measures on its own devices
    raise ConfigError(f"contexts={contexts!r} needs {max(contexts)} devices, but {len(jax.local_devices())} are"
                      " available (on CPU the command emulates 8).")
  for key in ("start_len", "max_len", "time_len", "repeats"):
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ConfigError(f"{key}={cfg[key]!r} must be a positive integer.")
  if cfg["max_len"] < cfg["start_len"]:
    raise ConfigError(f"max_len={cfg['max_len']} is below start_len={cfg['start_len']}.")
  if not cfg["budget_mib"] > 0:
    raise ConfigError(f"budget_mib={cfg['budget_mib']} must be a positive number.")
  for name in cfg["families"]:
    for P in contexts:
      for T in (cfg["start_len"], cfg["time_len"]):
        try:
          validate(_config(cfg, name, P, T), P)
        except ConfigError as e:
          raise ConfigError(f"long_context family {name} at context {P}, T={T}: {e}") from None


def variants(cfg: dict) -> list[str]:
  return list(cfg["families"])


def _config(cfg: dict, name: str, P: int, T: int):
  from efficient_attn.config import Config, MeshConfig, ModelConfig, TrainConfig

  attention, options = attention_variant(cfg, name)
  m = ModelConfig(attention=attention, attention_options=options,
                  **{k: cfg[k] for k in ("d_model", "num_layers", "num_heads", "ffn_dim", "dtype", "short_conv")})
  return Config(model=m, train=TrainConfig(batch_size=1, seq_len=T),
                mesh=MeshConfig(data=1, context=P, context_layout=cfg["context_layout"]))


class _Step:
  """One family's training step, compiled per (P, T) on a P-device `context` mesh."""

  def __init__(self, cfg: dict, name: str):
    import flax.linen as nn
    import jax

    from efficient_attn.model import TransformerLM

    self.cfg, self.name = cfg, name
    config = _config(cfg, name, 1, cfg["start_len"])
    self.train_cfg = config.train
    self.model = TransformerLM(config.model, context_layout=cfg["context_layout"])
    tokens = jax.ShapeDtypeStruct((1, cfg["start_len"]), jax.numpy.int32)
    self.shapes = jax.eval_shape(lambda k, x: nn.unbox(self.model.init(k, x)), jax.random.PRNGKey(0), tokens)

  def compile(self, P: int, T: int):
    """The compiled step (params, buffers, batch) -> (loss, grads) with each sequence on P devices."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from efficient_attn import sharding, train

    mesh = sharding.make_mesh({"context": P}, jax.local_devices()[:P])
    whole = NamedSharding(mesh, PartitionSpec())
    split = sharding.batch_sharding(mesh)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=whole), self.shapes["params"])
    buffers = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=whole),
                           self.shapes.get("buffers", {}))
    batch = {k: jax.ShapeDtypeStruct((1, T), jax.numpy.int32, sharding=split)
             for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["weights"] = jax.ShapeDtypeStruct((1, T), jax.numpy.float32, sharding=split)
    model, t = self.model, self.train_cfg
    grads = jax.value_and_grad(lambda p, buf, b: train.loss_fn(p, b, model, t, buf or None), has_aux=True)
    with jax.set_mesh(mesh):
      return jax.jit(grads).lower(params, buffers, batch).compile(), mesh

  def memory(self, P: int, T: int) -> dict:
    from efficient_attn.measure import argument_bytes, collective_bytes, temp_bytes

    compiled, _ = self.compile(P, T)
    temp, args = temp_bytes(compiled), argument_bytes(compiled)
    return {"seq_len": T, "temp_bytes": temp, "argument_bytes": args, "device_bytes": temp + args,
            "collective_bytes": sum(collective_bytes(compiled).values())}

  def time(self, P: int, T: int) -> dict:
    import jax
    import numpy as np

    from efficient_attn.attention import context
    from efficient_attn.measure import argument_bytes, collective_bytes, temp_bytes, time_compiled

    compiled, mesh = self.compile(P, T)
    rng = np.random.default_rng(self.cfg["seed"])

    def draw(s):  # matrices ~ N(0, 0.02²), norm scales 1: time and memory do not depend on the values
      return np.asarray(0.02 * rng.standard_normal(s.shape) if len(s.shape) > 1 else np.ones(s.shape), s.dtype)

    params = jax.tree.map(draw, self.shapes["params"])
    buffers = jax.tree.map(draw, self.shapes.get("buffers", {}))
    tokens = rng.integers(0, self.model.config.vocab_size, (1, T + 1)).astype(np.int32)
    example = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((1, T), np.int32),
               "weights": np.ones((1, T), np.float32), "positions": np.arange(T, dtype=np.int32)[None]}
    batch = context.global_example(example, mesh, self.cfg["context_layout"])  # the step takes positions at any P
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params, buffers = jax.device_put((params, buffers), whole)
    times = [time_compiled(compiled, params, buffers, batch, repeats=1, min_time=self.cfg["min_time_s"])
             for _ in range(self.cfg["repeats"])]
    moved = collective_bytes(compiled)
    return {"seq_len": T, "step_time_s": float(np.median(times)), "step_time_min_s": min(times),
            "step_time_max_s": max(times), "temp_bytes": temp_bytes(compiled),
            "argument_bytes": argument_bytes(compiled), "collective_bytes": sum(moved.values()),
            "collectives": moved, "load_avg": os.getloadavg()[0]}


def run_variant(cfg: dict, name: str, ctx) -> list[dict]:
  """Per context P: the reach (longest T in the budget, its probes) and the step timed at time_len."""
  from tqdm.auto import tqdm

  step = _Step(cfg, name)
  budget = cfg["budget_mib"] * 2**20
  rows, reach = [], cfg["start_len"]
  bar = tqdm(sorted(cfg["contexts"]), desc=f"{name} reach", unit="context", disable=not ctx.progress, leave=False)
  for P in bar:
    probes, T, best, capped = [], reach, None, False
    while True:  # doubling from the previous context's reach (more devices never hold more per device)
      probe = step.memory(P, T)
      probes.append(probe)
      if probe["device_bytes"] > budget:
        if T > cfg["start_len"] and best is None:  # the previous reach no longer fits: halve down
          T //= 2
          continue
        break
      best = probe
      if 2 * T > cfg["max_len"]:
        capped = True
        break
      T *= 2
    if best is not None and not capped and probes[-1]["device_bytes"] > budget:
      best = _refine(step, P, best, probes, budget)
    reach = best["seq_len"] if best else cfg["start_len"]
    rows.append({"kind": "reach", "family": name, "context": P, "max_len": best and best["seq_len"],
                 "device_bytes": best and best["device_bytes"], "capped": capped,
                 "collective_bytes": best and best["collective_bytes"], "probes": probes,
                 "budget_mib": cfg["budget_mib"]})
    rows.append({"kind": "time", "family": name, "context": P, **step.time(P, cfg["time_len"])})
  return rows


def _refine(step, P: int, best: dict, probes: list[dict], budget: float) -> dict:
  """Between the reach `best` and the doubled length that did not fit: the length memory predicts (per-device
  bytes are close to linear in T), rounded down to a multiple of 2048·P, then lower by that step until it fits
  (each try compiled; at most a few). Returns the longest fitting probe."""
  over = probes[-1]
  step_len = 2048 * P
  slope = (over["device_bytes"] - best["device_bytes"]) / (over["seq_len"] - best["seq_len"])
  T = best["seq_len"] + int((budget - best["device_bytes"]) / slope) if slope > 0 else best["seq_len"]
  T = T // step_len * step_len
  while T > best["seq_len"]:
    probe = step.memory(P, T)
    probes.append(probe)
    if probe["device_bytes"] <= budget:
      return probe
    T -= step_len
  return best


def _fmt_len(T) -> str:
  if T is None:
    return "-"
  return f"{T // 1024}K" if T >= 1024 and T % 1024 == 0 else str(T)  # K = 1024 tokens


def summarize(cfg: dict, rows: list[dict]) -> str:
  contexts = sorted(cfg["contexts"])
  families = list(dict.fromkeys(r["family"] for r in rows))
  reach = {(r["family"], r["context"]): r for r in rows if r["kind"] == "reach"}
  timed = {(r["family"], r["context"]): r for r in rows if r["kind"] == "time"}
  lines = [f"## Longest trainable sequence within {cfg['budget_mib']:g} MiB per device",
           "", "Compiled (not run) training step of the LM, batch 1; per-device temporary + argument bytes; `≥` = the"
           f" search stopped at max_len={cfg['max_len']}. Ratio: reach at the largest context over reach at"
           f" {contexts[0]}.", "",
           "| family | " + " | ".join(f"context {P}" for P in contexts) + " | ratio |",
           "|---|" + "---|" * (len(contexts) + 1)]
  for f in families:
    cells, lens = [], []
    for P in contexts:
      r = reach.get((f, P))
      T = r and r["max_len"]
      lens.append(T)
      cells.append(("≥" if r and r["capped"] else "") + _fmt_len(T) + (
          f" ({r['device_bytes'] / 2**20:.0f} MiB)" if T else ""))
    ratio = f"{lens[-1] / lens[0]:.1f}x" if lens[0] and lens[-1] else "-"
    lines.append(f"| {f} | " + " | ".join(cells) + f" | {ratio} |")
  T = cfg["time_len"]
  lines += ["", f"## Step at T={_fmt_len(T)}: time, memory and bytes moved per device", "",
            "Median of the repeats (min-max); emulated CPU devices share the cores, so time does not fall with P"
            " here. Collective bytes: every collective's result in the compiled fwd+bwd.", "",
            "| family | context | step s (min-max) | temp MiB / device | args MiB / device | collectives KiB |",
            "|---|---|---|---|---|---|"]
  for f in families:
    for P in contexts:
      r = timed.get((f, P))
      if r:
        lines.append(f"| {f} | {P} | {r['step_time_s']:.3f} ({r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f})"
                     f" | {r['temp_bytes'] / 2**20:.1f} | {r['argument_bytes'] / 2**20:.1f}"
                     f" | {r['collective_bytes'] / 2**10:.0f} |")
  lines += ["", "## Against the papers", "", LONG_CONTEXT_NOTE]
  return "\n".join(lines)


def plot(cfg: dict, rows: list[dict], workdir: str) -> list[str]:
  contexts = sorted(cfg["contexts"])
  series = {}
  for f in dict.fromkeys(r["family"] for r in rows):
    pts = [(r["context"], r["max_len"]) for r in rows if r["kind"] == "reach" and r["family"] == f and r["max_len"]]
    if pts:
      series[f] = ([p for p, _ in pts], [T for _, T in pts])
  if not series:
    return []
  return [line_plot(os.path.join(workdir, "long_context.png"), series, xlabel="devices per sequence (context)",
                    ylabel="longest T in budget (tokens)", logx=True, logy=True,
                    title=f"Reach within {cfg['budget_mib']:g} MiB per device (contexts {contexts})")]
