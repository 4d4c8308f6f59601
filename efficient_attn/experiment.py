"""The experiment runner: `efficient-attn experiment NAME --workdir DIR [--set KEY=VALUE]...`.

An experiment is a module `experiments/NAME.py` that defines

    get_config() -> dict           flat settings, every key overridable with --set; includes "smoke"
    SMOKE: dict                    what smoke=true changes (well under a minute on a laptop CPU)
    check(cfg) -> None             optional: raise ConfigError on impossible settings, before compiling
    variants(cfg) -> list[str]     the independent runs, in order
    run_variant(cfg, name, ctx) -> list[dict]   rows of one variant (ctx: workdir, progress)
    summarize(cfg, rows) -> str    the Markdown comparison table(s)
    plot(cfg, rows, workdir) -> list[str]       the PNG files written

and the runner does the rest, the same way for all of them:

    DIR/config.json            the resolved settings; a rerun with different ones is refused
    DIR/variants/V/rows.json   one finished variant, written atomically: a rerun skips it
    DIR/variants/V/...         the variant's own scratch (a training run's checkpoints resume)
    DIR/results.jsonl          every finished row, in variant order (rebuilt after each variant)
    DIR/summary.md             the table(s), with the anchor paper's numbers where there are any
    DIR/*.png                  the plots

A killed experiment loses at most the variant in flight (and a training variant
resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from typing import Any

from efficient_attn.config import ConfigError, apply_overrides

EXPERIMENTS = ("quickstart", "attention_scaling", "equal_compute", "moe_scaling", "listops", "mqar")


@dataclasses.dataclass(frozen=True)
class Context:
  """What a variant may use: its own scratch directory and whether to draw progress bars."""
  workdir: str
  progress: bool


def load(name: str):
  """The module `experiments.NAME`; an unknown name is a ConfigError listing the valid ones."""
  if name not in EXPERIMENTS:
    raise ConfigError(f"unknown experiment {name!r}; valid experiments are {', '.join(EXPERIMENTS)}.")
  return importlib.import_module(f"experiments.{name}")


def resolve_config(module, overrides: dict[str, Any]) -> dict[str, Any]:
  """get_config() updated by smoke (if set) and then by the user's --set values, checked."""
  name = module.__name__.rsplit(".", 1)[-1]
  where = f"experiment {name}"
  cfg = apply_overrides(module.get_config(), overrides, where)
  if cfg.get("smoke"):
    cfg = apply_overrides(apply_overrides(cfg, module.SMOKE, where), overrides, where)
  if hasattr(module, "check"):
    module.check(cfg)
  return cfg


def _atomic_write(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def _check_same_config(workdir: str, cfg: dict) -> None:
  """Refuses a workdir that holds results of other settings (they would be mixed into one table)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    _atomic_write(path, json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    return
  with open(path) as f:
    old = json.load(f)
  diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
  if diff:
    shown = ", ".join(f"{k}={old.get(k)!r} there vs {cfg.get(k)!r} now" for k in diff[:3])
    raise ConfigError(f"--workdir {workdir} holds results of different settings ({shown}); use a new --workdir,"
                      " or the same settings to resume.")


def finished_rows(workdir: str, variant: str) -> list[dict] | None:
  """The saved rows of a finished variant, or None if it has not finished."""
  path = os.path.join(workdir, "variants", variant, "rows.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run(name: str, workdir: str, overrides: dict[str, Any] | None = None, *,
        progress: bool | None = None) -> dict[str, Any]:
  """Runs (or resumes) experiment `name` in `workdir`; returns {"rows", "summary", "plots"}."""
  from tqdm.auto import tqdm

  from efficient_attn import reliability

  module = load(name)
  cfg = resolve_config(module, overrides or {})
  names = module.variants(cfg)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory; pass a directory (it is created if missing).")
  os.makedirs(workdir, exist_ok=True)
  progress = sys.stderr.isatty() if progress is None else progress
  with reliability.workdir_lock(workdir):
    _check_same_config(workdir, cfg)
    rows: list[dict] = []
    bar = tqdm(names, desc=name, unit="variant", disable=not progress)
    for variant in bar:
      bar.set_postfix_str(variant)
      done = finished_rows(workdir, variant)
      if done is None:
        vdir = os.path.join(workdir, "variants", variant)
        os.makedirs(vdir, exist_ok=True)
        done = [{"experiment": name, "variant": variant, **r}
                for r in module.run_variant(cfg, variant, Context(vdir, progress))]
        _atomic_write(os.path.join(vdir, "rows.json"), json.dumps(done, indent=1) + "\n")
      rows.extend(done)
      _atomic_write(os.path.join(workdir, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    bar.close()
    body = module.summarize(cfg, rows)
    doc = module.__doc__.strip().splitlines()[0] if module.__doc__ else name
    settings = " ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
    summary = f"# {name}: {doc}\n\n{body.strip()}\n\nSettings: `{settings}`\n"
    _atomic_write(os.path.join(workdir, "summary.md"), summary)
    plots = module.plot(cfg, rows, workdir)
  return {"rows": rows, "summary": summary, "plots": plots}


# ----------------------------------------------------------------------------- shared by the experiments


def line_plot(path: str, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
              logx: bool = False, logy: bool = False, hline: tuple[float, str] | None = None) -> str:
  """One PNG with a line per series {label: (xs, ys)}; returns `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
  for label, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o" if len(xs) <= 12 else None, markersize=3, label=label)
  if hline is not None:
    ax.axhline(hline[0], color="gray", linestyle="--", linewidth=1, label=hline[1])
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  if logx:
    ax.set_xscale("log", base=2)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
