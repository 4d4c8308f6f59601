"""The `efficient-attn` command line.

    efficient-attn train      --workdir DIR [--config FILE.py] [--set KEY=VALUE]...
    efficient-attn experiment NAME --workdir DIR [--set KEY=VALUE]...
    efficient-attn bench      attention|moe [--set KEY=VALUE]... [--json FILE]
    efficient-attn generate   --workdir DIR --prompt TEXT [--set sample.KEY=VALUE]...
    efficient-attn eval       --workdir DIR [--set eval.batches=N]

`bench` prints a settings header, then one row per variant with the median / min / max
time over `rounds` interleaved rounds (`bench --help` lists its keys and defaults).
`generate` prints the prompt and its sampled continuation from DIR's newest intact
checkpoint (sample.max_new_tokens, temperature (0 = greedy), top_k, top_p, seed);
`eval` prints one JSON object: val_loss (nats per byte), perplexity and bits_per_byte on
DIR's validation split. Both read DIR/config.json, the config `train` resolved.

`train` on a DIR that keeps a config.json (from an earlier run) starts from that config and changes only
the keys given with --set (the model, data and optimiser keys only while DIR has no checkpoint yet);
with --config FILE, FILE's config must match the stored one as before.

Every subcommand takes `--plugin FILE.py` (repeatable), imported first: a user's attention
family registered there is then selectable by name (`--set model.attention=NAME`).

User errors (an unknown key, a bad value, a missing file) print one sentence and
exit with status 2 before anything compiles.
"""

from __future__ import annotations

import argparse
import os
import sys

from efficient_attn.config import ConfigError, parse_overrides


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage error is one line (like every other refusal) instead of usage + error."""

  keys_help = None  # () -> str: the settings listing `--help` ends with, built only when asked (imports jax)

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help).\n")

  def format_help(self):
    if self.keys_help is not None:
      self.epilog = self.keys_help()
    return super().format_help()


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="efficient-attn", description="Efficient attention and MoE in JAX/Flax.")
  sub = p.add_subparsers(dest="command", required=True)
  sets = dict(action="append", default=[], metavar="KEY=VALUE", help="override one setting (repeatable)")
  plugin = dict(action="append", default=[], metavar="FILE.py",
                help="import this Python file first (it is code), e.g. to register an attention family (repeatable)")

  t = sub.add_parser("train", help="pretrain a TransformerLM")
  t.add_argument("--workdir", required=True)
  t.add_argument("--config")
  t.add_argument("--set", **sets)
  t.add_argument("--plugin", **plugin)

  e = sub.add_parser("experiment", help="run a named scaling comparison")
  e.add_argument("name")
  e.add_argument("--workdir", required=True)
  e.add_argument("--set", **sets)
  e.add_argument("--plugin", **plugin)

  raw = argparse.RawDescriptionHelpFormatter
  b = sub.add_parser("bench", help="speed / memory tables", formatter_class=raw,
                     description="Times forward+backward of each variant (median / min / max over interleaved"
                                 " rounds, after a warm-up call) and reports XLA's compiled temporary memory.")
  b.add_argument("what", choices=["attention", "moe"])
  b.add_argument("--set", **sets)
  b.add_argument("--json", metavar="FILE", help="also write the rows (each with its settings) as JSON")
  b.add_argument("--plugin", **plugin)
  b.keys_help = _bench_keys_help

  g = sub.add_parser("generate", help="sample a continuation of a prompt from a training workdir",
                     formatter_class=raw)
  g.add_argument("--workdir", required=True, help="a training workdir (its config.json and checkpoints)")
  g.add_argument("--prompt", required=True, help="the text to continue (UTF-8 bytes)")
  g.add_argument("--set", **sets)
  g.add_argument("--plugin", **plugin)
  g.keys_help = lambda: _workdir_keys_help("sample.")

  v = sub.add_parser("eval", help="validation loss, perplexity and bits/byte of a training workdir (JSON)",
                     formatter_class=raw)
  v.add_argument("--workdir", required=True, help="a training workdir (its config.json and checkpoints)")
  v.add_argument("--set", **sets)
  v.add_argument("--plugin", **plugin)
  v.keys_help = lambda: _workdir_keys_help("eval.")
  return p


def _bench_keys_help() -> str:
  from efficient_attn.bench import attention as attention_bench, moe as moe_bench
  from efficient_attn.measure import settings_help

  return ("keys of --set KEY=VALUE, with their defaults:\n\n"
          + settings_help("bench attention", attention_bench.ATTENTION_DEFAULTS, attention_bench.SETTINGS_HELP)
          + "\n\n" + settings_help("bench moe", moe_bench.DEFAULTS, moe_bench.SETTINGS_HELP))


def _workdir_keys_help(prefix: str) -> str:
  from efficient_attn import generate
  from efficient_attn.measure import settings_help

  defaults = {**generate.SAMPLE_DEFAULTS, **generate.EVAL_DEFAULTS}
  return "keys of --set KEY=VALUE, with their defaults:\n\n" + settings_help(
      "", {k: v for k, v in defaults.items() if k.startswith(prefix)}, generate.SETTINGS_HELP)


def _bench(args) -> None:
  from efficient_attn.measure import write_json

  overrides = parse_overrides(args.set)
  if args.json:
    parent = os.path.dirname(os.path.abspath(args.json))
    if not os.path.isdir(parent):
      raise ConfigError(f"--json {args.json}: directory {parent} does not exist.")
  progress = sys.stderr.isatty()
  if args.what == "attention":
    from efficient_attn.bench import attention as bench

    rows = bench.bench_attention(overrides, progress=progress)
    header, table = bench.attention_header(rows), bench.attention_table(rows)
  else:
    from efficient_attn.bench import moe as moe_bench

    rows = moe_bench.bench_moe(overrides, progress=progress)
    header, table = moe_bench.moe_header(rows), moe_bench.format_moe_table(rows)
  print(header + "\n\n" + table)
  if args.json:
    write_json(rows, args.json)
    print(f"wrote {len(rows)} rows to {args.json}")


def _generate(args) -> None:
  from efficient_attn import generate

  out = generate.generate(args.workdir, args.prompt, parse_overrides(args.set))
  print(out["text"])
  print(f"efficient-attn: sampled {len(out['tokens'])} bytes from step {out['step']} of {args.workdir}.",
        file=sys.stderr)


def _eval(args) -> None:
  import json

  from efficient_attn import generate

  print(json.dumps(generate.evaluate(args.workdir, parse_overrides(args.set))))


def _emulate_devices() -> None:
  # The experiments' meshes (quickstart: 2x4) need 8 devices; on CPU they are emulated. Must be
  # set before jax initialises its backends (so before any plugin runs); GPU/TPU are unaffected.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()


def _experiment(args) -> None:
  from efficient_attn import experiment

  out = experiment.run(args.name, args.workdir, parse_overrides(args.set))
  import jax

  if jax.process_index():  # one process reports (process 0 wrote the files)
    return
  print(out["summary"])
  print("wrote " + ", ".join(os.path.join(args.workdir, p) for p in ("results.jsonl", "summary.md"))
        + (", " + ", ".join(out["plots"]) if out["plots"] else ""))


def _emulate_mesh_devices(mesh) -> None:
  """`train` on one process: XLA_FLAGS=--xla_force_host_platform_device_count=N, N = the devices the
  mesh names (mesh.data=-1 counts 1), unless XLA_FLAGS sets a count, N is 1, or jax has started (a
  plugin or config file ran it). Only the CPU platform reads the flag: a GPU / TPU host keeps its devices."""
  flags = os.environ.get("XLA_FLAGS", "")
  need = max(mesh.data, 1) * mesh.fsdp * mesh.context * mesh.tensor * mesh.expert
  if need <= 1 or "xla_force_host_platform_device_count" in flags or _multi_process() or _jax_started():
    return
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()


def _jax_started() -> bool:
  try:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # cannot tell: leave XLA_FLAGS alone
    return True


def _multi_process() -> bool:
  env = os.environ
  return bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1")) > 1 or \
      env.get("TPU_WORKER_HOSTNAMES", "localhost") != "localhost"


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when launched as one of several processes.

  scripts/launch_local.sh sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID; SLURM (several tasks) and Cloud TPU pods are auto-detected by JAX.
  """
  import jax

  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env.get("JAX_NUM_PROCESSES", "1")),
                               int(env.get("JAX_PROCESS_ID", "0")))
  elif _multi_process():
    jax.distributed.initialize()


def _train_config(args):
  """(config, note) of a `train` call: --config FILE (or the defaults) with the --set keys applied; on a
  workdir that keeps a config.json (and no --config), that stored config with only the --set keys changed,
  refused here already if the change would mix two runs (`reliability.check_same_run`), and a line saying so."""
  from efficient_attn import reliability
  from efficient_attn.config import CONFIG_JSON, Config, flatten, load_config_file, load_config_json, with_overrides

  overrides = parse_overrides(args.set)
  path = os.path.join(args.workdir, CONFIG_JSON)
  if args.config or not os.path.isfile(path):
    return with_overrides(load_config_file(args.config) if args.config else Config(), overrides), None
  stored = load_config_json(path)
  cfg = with_overrides(stored, overrides)
  resuming = reliability.has_checkpoints(args.workdir)
  reliability.check_same_run(args.workdir, cfg, resuming)
  old, new = flatten(stored), flatten(cfg)
  changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]]
  why = ([] if resuming else ["no checkpoint yet"]) + ([f"changed: {', '.join(changed)}"] if changed else [])
  return cfg, (f"{'continuing the run' if resuming else 'starting the run afresh'} in {args.workdir} from its"
               f" {CONFIG_JSON}" + (f" ({'; '.join(why)})" if why else ""))


def _train(args) -> int:
  cfg, note = _train_config(args)
  _emulate_mesh_devices(cfg.mesh)
  maybe_initialize_distributed()
  from efficient_attn import train

  row = dict(train.train(cfg, args.workdir, announce=note))
  stopped_by, stopped_at = row.pop("stopped_by", None), row.pop("stopped_at", None)
  if row:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                   if v is not None and not isinstance(v, list)))
  if stopped_by:  # preempted: the checkpoint is written, the rerun resumes from it
    print(f"efficient-attn: stopped by {stopped_by} at step {stopped_at}; checkpoint saved.", file=sys.stderr)
    return 130 if stopped_by == "SIGINT" else 0
  return 0


def load_plugin(path: str) -> None:
  """Imports a user's Python file (code: trust it as such), e.g. one that calls
  `efficient_attn.attention.register(Family(...))`. A missing file or one that fails to
  import is a ConfigError naming it."""
  import importlib.util

  if not os.path.isfile(path):
    raise ConfigError(f"--plugin {path}: no such file; pass a Python file (e.g. one that registers an attention family).")
  name = "efficient_attn_plugin_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
  if name in sys.modules:
    return
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except (ConfigError, ValueError, ImportError, SyntaxError) as e:
    del sys.modules[name]
    raise ConfigError(f"--plugin {path}: {type(e).__name__}: {e}") from None


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from efficient_attn.data.text import DataError

  if args.command == "experiment" or (args.command == "bench" and any(a.startswith("mesh.") for a in args.set)):
    _emulate_devices()  # a context split of a bench needs its devices; GPU / TPU hosts keep theirs
  if args.command == "experiment":
    maybe_initialize_distributed()  # under a launcher every process joins one global mesh, as `train` does
  try:
    from efficient_attn.flops import given_peak

    given_peak()  # a bad EFFICIENT_ATTN_PEAK_FLOPS is one sentence now, not a traceback after compiling
    for path in args.plugin:
      load_plugin(path)
    if args.command == "bench":
      _bench(args)
    elif args.command == "train":
      return _train(args)
    elif args.command == "generate":
      _generate(args)
    elif args.command == "eval":
      _eval(args)
    else:
      _experiment(args)
  except (ConfigError, DataError) as e:
    print(f"efficient-attn: error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    if type(e).__name__ not in ("NonFiniteError", "CheckpointError"):
      raise
    print(f"efficient-attn: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
