"""The experiment runner: `efficient-attn experiment NAME|FILE.py --workdir DIR [--set KEY=VALUE]...`.

An experiment is a file `experiments/NAME.py` (or a user's own FILE.py) that defines

    get_config() -> dict           flat settings, every key overridable with --set; includes "smoke"
                                   (the runner adds RUNNER_DEFAULTS: mesh.context, mesh.context_layout)
    SMOKE: dict                    what smoke=true changes (well under a minute on a laptop CPU)
    PRESETS: dict                  optional: {name: changes}, chosen by the setting "preset" (e.g. a grid
                                   for an accelerator cluster); applied before smoke, under --set
    check(cfg) -> None             optional: raise ConfigError on impossible settings, before compiling
    CONTEXT_PARALLEL = True        optional: the runs split each sequence over cfg["mesh.context"] devices
                                   in cfg["mesh.context_layout"] (without it mesh.context > 1 is refused)
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

The files are loaded by path, not installed as a top-level `experiments` package
(which would shadow a user's own): each runs as a module of the private package
`efficient_attn._experiments`, whose path is the experiments directory, so
experiment files import their shared helpers relatively (`from . import _lm`);
a user's FILE.py can do the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import sys
from typing import Any

from efficient_attn.config import ConfigError, apply_overrides, did_you_mean

EXPERIMENTS = ("quickstart", "attention_scaling", "equal_compute", "moe_scaling", "listops", "mqar", "long_context",
               "scaling_laws", "hybrid")
PACKAGE = "efficient_attn._experiments"
# Settings every experiment accepts, under its own get_config(): the devices each sequence is split over
# (context parallelism, `efficient_attn.attention.context`) and the token layout over them.
RUNNER_DEFAULTS = {"mesh.context": 1, "mesh.context_layout": "zigzag"}


@dataclasses.dataclass(frozen=True)
class Context:
  """What a variant may use: its own scratch directory and whether to draw progress bars."""
  workdir: str
  progress: bool


def experiments_dir() -> str:
  """The directory of the experiment files.

  A wheel ships experiments/*.py inside the package as efficient_attn/_experiments/ (see
  setup.py); a source checkout or an editable install has them in the top-level experiments/.
  """
  here = os.path.dirname(os.path.abspath(__file__))
  for path in (os.path.join(here, "_experiments"), os.path.join(os.path.dirname(here), "experiments")):
    if os.path.isfile(os.path.join(path, "quickstart.py")):
      return path
  raise ConfigError(f"the experiment files are missing: neither {here}/_experiments nor {os.path.dirname(here)}"
                    "/experiments holds them; reinstall efficient_attn.")


def _package():
  """The package PACKAGE over experiments_dir(), registered once, so relative imports between files work."""
  if PACKAGE not in sys.modules:
    spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [experiments_dir()]
    sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
  return sys.modules[PACKAGE]


def load(name: str):
  """The experiment module NAME (experiments/NAME.py), or the user's experiment file at path NAME (*.py).

  Loaded once as `efficient_attn._experiments.STEM` (STEM: the file name without .py); an
  unknown name, a missing file or a file named like a built-in one is a ConfigError.
  """
  if name.endswith(".py"):
    path = os.path.abspath(name)
    if not os.path.isfile(path):
      raise ConfigError(f"experiment file {name} does not exist; pass one of {', '.join(EXPERIMENTS)} or the path"
                        " of an experiment file.")
  elif name in EXPERIMENTS:
    path = os.path.join(experiments_dir(), name + ".py")
  else:
    raise ConfigError(f"unknown experiment {name!r};{did_you_mean(name, EXPERIMENTS)} valid experiments are"
                      f" {', '.join(EXPERIMENTS)}, or the path of your own experiment file (FILE.py).")
  path, stem = os.path.realpath(path), os.path.basename(path)[:-3]
  _package()
  builtin = os.path.join(experiments_dir(), stem + ".py")
  if not stem.isidentifier() or (os.path.exists(builtin) and os.path.realpath(builtin) != path):
    raise ConfigError(f"experiment file {name}: rename it; its name must be a Python identifier other than those"
                      f" of the files in {os.path.dirname(builtin)}.")
  module = sys.modules.get(f"{PACKAGE}.{stem}")
  if module is not None and os.path.realpath(module.__file__) == path:
    return module  # loaded already (the tests patch functions of the loaded module)
  spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{stem}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[spec.name]
    raise
  return module


def resolve_config(module, overrides: dict[str, Any]) -> dict[str, Any]:
  """RUNNER_DEFAULTS + get_config(), updated by the chosen preset (if the experiment has PRESETS), by smoke (if
  set) and each time again by the user's --set values, checked."""
  name = module.__name__.rsplit(".", 1)[-1]
  where = f"experiment {name}"
  cfg = apply_overrides({**RUNNER_DEFAULTS, **module.get_config()}, overrides, where)
  presets = getattr(module, "PRESETS", None)
  if presets is not None:
    if cfg.get("preset") not in presets:
      raise ConfigError(f"{where}: preset={cfg.get('preset')!r} is not one of {', '.join(presets)};"
                        f"{did_you_mean(str(cfg.get('preset')), presets)} pick one of those.")
    cfg = apply_overrides(apply_overrides(cfg, presets[cfg["preset"]], where), overrides, where)
  if cfg.get("smoke"):
    cfg = apply_overrides(apply_overrides(cfg, module.SMOKE, where), overrides, where)
  _check_context(module, cfg, where)
  if hasattr(module, "check"):
    module.check(cfg)
  return cfg


def _check_context(module, cfg: dict, where: str) -> None:
  """ConfigError (one sentence) unless mesh.context is a positive integer that the devices hold, 1 for an
  experiment that does not split sequences (CONTEXT_PARALLEL), and mesh.context_layout a known layout;
  each experiment checks its own lengths against the split."""
  import jax

  from efficient_attn.attention.context import LAYOUTS

  P, layout = cfg["mesh.context"], cfg["mesh.context_layout"]
  if P < 1:
    raise ConfigError(f"{where}: mesh.context={P} must be a positive integer (the devices each sequence is split"
                      " over; 1 = no split).")
  if P > 1 and not getattr(module, "CONTEXT_PARALLEL", False):
    # long_context compares several splits itself: its own `contexts` list is the knob there.
    own = (f"; set its own contexts list instead (now {cfg['contexts']!r}), such as contexts=[1, {P}]"
           if "contexts" in cfg else "; leave mesh.context=1")
    raise ConfigError(f"{where} does not split its sequences by mesh.context={P}{own}.")
  if P > len(jax.devices()):
    raise ConfigError(f"{where}: mesh.context={P} needs {P} devices, but {len(jax.devices())} are available (on CPU"
                      " the command emulates 8).")
  if layout not in LAYOUTS:
    raise ConfigError(f"{where}: mesh.context_layout={layout!r} is not one of {' | '.join(LAYOUTS)}.")


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
    old = {**RUNNER_DEFAULTS, **json.load(f)}  # a workdir from before the runner's keys ran at their defaults
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
  name = module.__name__.rsplit(".", 1)[-1]  # a file path runs under its file's name
  cfg = resolve_config(module, overrides or {})
  names = module.variants(cfg)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory; pass a directory (it is created if missing).")
  os.makedirs(workdir, exist_ok=True)
  # Not on a terminal (output to a file, a batch job) and not told otherwise: a plain line per variant instead.
  plain = progress is None and not sys.stderr.isatty()
  progress = sys.stderr.isatty() if progress is None else progress
  # Under a launcher (several processes, one global mesh) every process runs every variant's collectives;
  # process 0 alone holds the lock and writes, and barriers keep all of them deciding from the same files.
  main = _process_index() == 0
  with reliability.workdir_lock(workdir) if main else contextlib.nullcontext():
    if main:
      _check_same_config(workdir, cfg)
    _barrier(f"experiment {name}: config")
    rows: list[dict] = []
    bar = tqdm(names, desc=name, unit="variant", disable=not (progress and main))
    for variant in bar:
      bar.set_postfix_str(variant)
      done = finished_rows(workdir, variant)
      if done is None:
        vdir = os.path.join(workdir, "variants", variant)
        os.makedirs(vdir, exist_ok=True)
        done = [{"experiment": name, "variant": variant, **r}
                for r in module.run_variant(cfg, variant, Context(vdir, progress and main))]
        if main:
          _atomic_write(os.path.join(vdir, "rows.json"), json.dumps(done, indent=1) + "\n")
      _barrier(f"experiment {name}: {variant}")
      if plain and main:
        print(f"experiment {name}: variant {variant} done ({names.index(variant) + 1}/{len(names)})",
              file=sys.stderr, flush=True)
      rows.extend(done)
      if main:
        _atomic_write(os.path.join(workdir, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    bar.close()
    body = module.summarize(cfg, rows)
    doc = module.__doc__.strip().splitlines()[0] if module.__doc__ else name
    settings = " ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
    summary = f"# {name}: {doc}\n\n{body.strip()}\n\nSettings: `{settings}`\n"
    plots = []
    if main:
      _atomic_write(os.path.join(workdir, "summary.md"), summary)
      plots = module.plot(cfg, rows, workdir)
  return {"rows": rows, "summary": summary, "plots": plots}


def _process_index() -> int:
  import jax

  return jax.process_index()


def _barrier(name: str) -> None:
  """Every process of a multi-process run waits here for the others (a no-op in one process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- shared by the experiments


def context_mesh(cfg: dict):
  """The mesh of this process's first P = cfg["mesh.context"] devices, all on its `context` axis (each
  sequence split over them), or None when P is 1 (the experiment runs on one device, unsplit). Under a
  launcher every process runs its own copy on its own devices (process 0 writes the results)."""
  import jax

  from efficient_attn import sharding

  P = cfg["mesh.context"]
  if P > len(jax.local_devices()):
    raise ConfigError(f"mesh.context={P} needs {P} devices in each process, but one holds"
                      f" {len(jax.local_devices())}.")
  return None if P == 1 else sharding.make_mesh({"context": P}, jax.local_devices()[:P])


def attention_variant(cfg: dict, name: str, aliases: dict | None = None) -> tuple[str, dict]:
  """(family, options) of an experiment's attention variant `name`.

  A variant is a registered family (built-in or a --plugin's) run with
  cfg["attention_options"][family], or one of the experiment's own `aliases`
  {variant: (family, options)} (e.g. "softmax_chunked"), whose options win over the shared ones.
  """
  family, extra = (aliases or {}).get(name, (name, {}))
  return family, {**cfg.get("attention_options", {}).get(family, {}), **extra}


def attention_option(cfg: dict, family: str, name: str):
  """Option `name` of `family` as the experiment runs it: cfg["attention_options"][family], else the default."""
  from efficient_attn import attention

  return getattr(attention.get(family).make_options(cfg.get("attention_options", {}).get(family)), name)


def check_attention_variants(cfg: dict, names: list[str], experiment: str, key: str,
                             aliases: dict | None = None) -> None:
  """ConfigError (one sentence) unless every name is a registered family or an alias, all distinct,
  and every family's options in cfg["attention_options"] are valid for it."""
  from efficient_attn import attention

  valid = list(aliases or {}) + [n for n in attention.names() if n not in (aliases or {})]
  bad = [n for n in names if n not in valid]
  if bad or not names or len(set(names)) < len(names):
    hint = f" {bad[0]!r} is not one;{did_you_mean(bad[0], valid)}" if bad else ""
    raise ConfigError(f"{key}={list(names)!r} for experiment {experiment}:{hint} use distinct names from {valid}"
                      " (a plugin's family needs --plugin FILE.py).")
  options = cfg.get("attention_options", {})
  if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
    raise ConfigError(f"attention_options={options!r} for experiment {experiment} must map a family to a dict"
                      " of its options, e.g. {'local': {'window': 64}}.")
  for family in options:
    if family not in attention.names():
      raise ConfigError(f"attention_options.{family} for experiment {experiment}: unknown attention family"
                        f" {family!r};{did_you_mean(family, attention.names())} registered families are"
                        f" {attention.names()}.")
  for name in names:
    family, opts = attention_variant(cfg, name, aliases)
    try:
      attention.get(family).make_options(opts)
    except ValueError as e:
      raise ConfigError(f"experiment {experiment}, variant {name}: {e}") from None


def line_plot(path: str, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
              logx: bool = False, logy: bool = False, hline: tuple[float, str] | None = None) -> str:
  """One PNG with a line per series {label: (xs, ys)}; returns `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
  markers, styles = "osD^vPX*", ("-", "--", "-.", ":")
  for i, (label, (xs, ys)) in enumerate(series.items()):  # marker + line style per series: none hides another
    ax.plot(xs, ys, marker=markers[i % len(markers)], markevery=max(1, len(xs) // 12), markersize=4,
            linestyle=styles[i % len(styles)], linewidth=1.3, label=label)
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
