"""What a training run tells its reader: metrics.jsonl, lines on stderr, TensorBoard scalars.

    log = RunLog(workdir, t, start, progress=None)   # process 0; the others get RunLog(..., enabled=False)
    log.say("resumed from step 100 (checkpoint ...)")
    log.step(row, eta_s)     # metrics.jsonl (+ TensorBoard); a bar on a terminal, else one plain line
    log.val(row)
    summary = log.summary(step=..., row=..., val=..., tokens_per_sec=..., wall_s=...)  # the row and last line

A row holds the step's metrics (`to_host`), its time and throughput, MFU (`mfu_fields`: None with the
reason when it cannot be trusted) and the compiled step's costs (`cost_fields`); a validation row
`val_metrics`.

On a terminal (or with progress=True) stderr shows a tqdm bar; otherwise (nohup, sbatch,
a pipe) every logged step prints one line `step 40/200  loss 2.9133  tokens/s 3,412  eta 1m52s`,
so a job left in the background can be read as it runs.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import numpy as np

from efficient_attn import flops
from efficient_attn.config import ConfigError
from efficient_attn.measure import temp_bytes, xla_flops

TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> None:
  """ConfigError (before anything compiles) when train.tensorboard is on but tensorboardX is missing."""
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    raise ConfigError("train.tensorboard=true needs the tensorboardX package: pip install tensorboardX (or"
                      " install this project with its [tensorboard] extra), or leave it off.") from None


def duration(seconds: float | None) -> str:
  """3725 -> '1h02m05s', 112 -> '1m52s', 4.2 -> '4.2s'."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  if seconds < 60:
    return f"{seconds:.1f}s"
  s = int(round(seconds))
  h, m = divmod(s // 60, 60)
  return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s"


class RunLog:
  """metrics.jsonl (rows past the resumed step dropped first: they will be redone), stderr, TensorBoard."""

  def __init__(self, workdir: str, t, start: int, *, progress: bool | None = None, enabled: bool = True):
    self.t, self.enabled, self.elapsed = t, enabled, 0.0
    self.file = self.bar = self.tb = None
    if not enabled:
      return
    self.file, self.elapsed = _open_metrics(workdir, start)
    bar = sys.stderr.isatty() if progress is None else progress
    if bar:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=t.steps, initial=start, desc="train", unit="step")
    if t.tensorboard:
      from tensorboardX import SummaryWriter

      # purge_step: TensorBoard drops the steps a killed run logged past the checkpoint we resume from.
      self.tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=start or None)

  def say(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def _write(self, row: dict) -> None:
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()

  def step(self, row: dict, eta_s: float | None) -> None:
    """One logged training step: metrics.jsonl, TensorBoard's train/*, the bar or a plain line."""
    if not self.enabled:
      return
    self._write(row)
    self._scalars("train", row)
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{row['loss']:.3f}")
    else:
      self.say(f"step {row['step']}/{self.t.steps}  loss {row['loss']:.4f}  tokens/s {row['tokens_per_sec']:,.0f}"
               f"  eta {duration(eta_s)}")

  def val(self, row: dict) -> None:
    if not self.enabled:
      return
    self._write(row)
    self._scalars("val", {"loss": row["val_loss"], "bits_per_byte": row.get("val_bpb"),
                          "perplexity": row.get("val_perplexity")}, row["step"])
    self.say(f"step {row['step']}/{self.t.steps}  val loss {row['val_loss']:.4f}"
             + (f"  bits/byte {row['val_bpb']:.3f}" if row.get("val_bpb") is not None else ""))

  def advance(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def _scalars(self, prefix: str, row: dict, step: int | None = None) -> None:
    if self.tb is None:
      return
    step = row["step"] if step is None else step
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        self.tb.add_scalar(f"{prefix}/{k}", v, step)
    self.tb.flush()

  def summary(self, *, step: int, row: dict, val: dict, tokens_per_sec: float | None, wall_s: float) -> dict:
    """The run's summary row and its last line: final train loss (mean of the last logging window), val loss,
    bits/byte, tokens/s (training steps only, this invocation), wall time (this invocation: data, compile,
    evaluation included). `row`: the last logged step's; `val`: the final validation's ({} if none ran)."""
    out = {"step": step, "loss": row.get("loss_avg"), "val_loss": val.get("val_loss"), "val_bpb": val.get("val_bpb"),
           "val_perplexity": val.get("val_perplexity"), "tokens_per_sec": tokens_per_sec, "time_s": self.elapsed,
           "wall_s": wall_s}
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    loss, val_loss, bpb = out["loss"], out["val_loss"], out["val_bpb"]
    bpb = bpb if bpb is not None or val_loss is None else val_loss / math.log(2)  # bytes: loss / ln 2
    done = "done" if step >= self.t.steps else "stopped"
    self.say(f"{done}: step {step}/{self.t.steps}, train loss {f(loss, '.4f')}, val loss {f(val_loss, '.4f')},"
             f" bits/byte {f(bpb, '.3f')}, tokens/s {f(tokens_per_sec, ',.0f')}, wall {duration(wall_s)}")
    return out

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.tb is not None:
      self.tb.close()
    if self.file is not None:
      self.file.close()


def _open_metrics(workdir: str, resume_step: int):
  """Opens metrics.jsonl for appending, first dropping rows past the resumed step (they will be redone)
  and a last line cut short by a kill. Returns (file, training seconds logged up to the resumed step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  elapsed = 0.0
  if os.path.exists(path):
    with open(path) as f:
      rows = [r for r in f if r.endswith("\n") and (row := _json_or_none(r)) is not None
              and row.get("step", 0) <= resume_step]
    with open(path + ".tmp", "w") as f:
      f.writelines(rows)
    os.replace(path + ".tmp", path)
    elapsed = max([json.loads(r).get("time_s", 0.0) for r in rows], default=0.0)
  return open(path, "a"), elapsed


def _json_or_none(line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


# ----------------------------------------------------------------------------- what a row holds


def to_host(metrics: dict) -> dict:
  """A step's metrics as Python numbers (arrays as lists)."""
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = v.tolist() if v.ndim else v.item()
  return out


def val_metrics(nats: float, tokens: float, nbytes: float) -> dict:
  """{"val_loss" (nats per token), "val_perplexity", "val_bpb" (total nats / total bytes / ln 2)}."""
  loss = nats / max(tokens, 1.0)
  return {"val_loss": loss, "val_perplexity": float(np.exp(min(loss, 700.0))),
          "val_bpb": nats / max(nbytes, 1.0) / np.log(2)}


def cost_fields(cfg, compiled, num_devices: int) -> dict:
  """What every step row repeats: FLOPs per token (the model's, `flops.model_flops_per_token`, and those
  the compiled step executes), its temporary bytes, the peak FLOP/s per device and where it came from."""
  m, t = cfg.model, cfg.train
  fpt = flops.model_flops_per_token(m, t.seq_len)["train"]
  peak, peak_source = flops.peak_flops_per_device(m.dtype if m.dtype != "bfloat16" else "float32")
  load_at_peak = flops.measured_load(m.dtype if m.dtype != "bfloat16" else "float32")
  # cost_analysis of an SPMD program is one device's share: every device executes its partition. A scan
  # (train.grad_accum > 1) is counted once by XLA, so its micro-batches are multiplied back in.
  executed = xla_flops(compiled) * num_devices * t.grad_accum / (t.batch_size * t.seq_len)
  return {"flops_per_token": fpt, "executed_flops_per_token": executed, "temp_bytes": temp_bytes(compiled),
          "peak_flops": peak, "peak_source": peak_source,
          **({"load_at_peak": load_at_peak} if load_at_peak is not None else {})}


def mfu_fields(cost: dict, tps: float, num_devices: int) -> dict:
  """{"mfu": value or None, "mfu_note": why None} (see `flops.honest_mfu`); on CPU the load average too.
  `cost`: `cost_fields`' dict."""
  on_cpu = jax.devices()[0].platform == "cpu"
  load = flops.cpu_load() if on_cpu else None
  # Emulated CPU devices share one machine, whose measured matmul rate is the peak.
  value, note = flops.honest_mfu(cost["flops_per_token"], tps, 1 if on_cpu else num_devices, cost["peak_flops"],
                                 loads=(cost.get("load_at_peak"), load), cores=flops.cpu_cores() if on_cpu else None)
  return {"mfu": value, **({"mfu_note": note} if note else {}), **({"load_avg": load} if on_cpu else {})}
