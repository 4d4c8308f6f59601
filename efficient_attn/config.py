"""Configs and the one override mechanism: `--set KEY=VALUE`.

Values parse as Python literals where they can (`20`, `1e-3`, `[1024, 2048]`,
`True`) and otherwise stay strings (`performer`); they are never evaluated as
code (`ast.literal_eval` only).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from efficient_attn.errors import ConfigError, did_you_mean  # noqa: F401  (re-exported; below every layer)


def parse_value(text: str) -> Any:
  """Parses one `--set` value: a Python literal where possible, else the string itself."""
  lowered = text.strip()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered in ("none", "null"):
    return None
  try:
    return ast.literal_eval(lowered)
  except (ValueError, SyntaxError):
    return lowered


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
  """['a.b=1', 'c=x'] -> {'a.b': 1, 'c': 'x'}; a malformed item raises ConfigError."""
  out: dict[str, Any] = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
      raise ConfigError(f"--set expects KEY=VALUE with a dotted KEY such as train.steps=20, got {item!r}.")
    out[key] = parse_value(value)
  return out


def apply_overrides(defaults: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
  """Returns `defaults` updated by `overrides`, refusing unknown keys and values of the wrong type.

  Ints are accepted where floats are expected; a list where a list is expected. A dotted key
  whose head names a dict-valued setting sets one entry inside it
  (`attention_options.local.window=64`); the owner of that dict checks its entries.
  """
  out = dict(defaults)
  for key, value in overrides.items():
    head = key.split(".", 1)[0]
    if key not in defaults and "." in key and isinstance(defaults.get(head), dict):
      out[head] = _set_nested(out[head], key.split(".")[1:], value)
      continue
    if key not in defaults:
      raise ConfigError(f"unknown key {key!r} for {where};{did_you_mean(key, defaults)} valid keys are"
                        f" {', '.join(sorted(defaults))}.")
    expected = defaults[key]
    ok = (expected is None or value is None or isinstance(value, type(expected))
          or (isinstance(expected, float) and isinstance(value, int) and not isinstance(value, bool))
          or (isinstance(expected, (list, tuple)) and isinstance(value, (list, tuple))))
    if isinstance(expected, int) and isinstance(value, bool) and not isinstance(expected, bool):
      ok = False
    if not ok:
      raise ConfigError(
          f"{where}: {key}={value!r} has type {type(value).__name__}, expected {type(expected).__name__}"
          f" like the default {expected!r}.")
    out[key] = list(value) if isinstance(value, tuple) else value
  return out


def _set_nested(tree: dict, path: list[str], value) -> dict:
  """A copy of `tree` with tree[path[0]][path[1]]... = value (missing levels become dicts)."""
  out = dict(tree)
  if len(path) == 1:
    out[path[0]] = list(value) if isinstance(value, tuple) else value
  else:
    inner = out.get(path[0], {})
    if not isinstance(inner, dict):
      raise ConfigError(f"cannot set {'.'.join(path)}: {path[0]}={inner!r} is not a mapping.")
    out[path[0]] = _set_nested(inner, path[1:], value)
  return out


# ----------------------------------------------------------------------------- training configs

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model. `attention` names a registered family (softmax | local | sparse | linear | performer
  | a plugin's); `attention_options` are that family's typed options (its `Family.options`
  dataclass; a mapping {option: value} is turned into it), `--set model.attention_options.KEY=V`."""
  attention: str = "softmax"          # a registered attention family
  attention_options: Any = None       # the family's options; None = its defaults
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 0               # 0 = num_heads (MHA); a divisor of num_heads gives GQA / MQA
  ffn_dim: int = 1024
  ffn_activation: str = "gelu"        # gelu | swiglu
  vocab_size: int = 256               # 256 with data.tokenizer other than bytes: the tokenizer's size
  num_experts: int = 0                # 0 = dense FFN in every layer
  expert_dim: int = 0                 # hidden width of each expert; 0 = ffn_dim
  top_k: int = 1
  moe_every: int = 1                  # MoE FFN in every n-th layer (layers n-1, 2n-1, ...)
  capacity_factor: float = 1.25
  router: str = "tokens_choose"       # tokens_choose | experts_choose
  dropless: bool = False
  rope_base: float = 10_000.0
  scan_layers: bool = False
  dtype: str = "float32"              # compute dtype; params stay float32
  remat: bool = False
  dropout: float = 0.0                # residual dropout on attention and FFN outputs (training only)
  # Hybrid stacks: the family of each layer. attention_pattern is cycled over the layers (a remainder at the
  # end); full_attention_every=N makes every N-th layer softmax and the others model.attention. Both empty:
  # every layer model.attention. family_options: {family: {option: value}} for the pattern's families other
  # than model.attention (whose options stay model.attention_options).
  attention_pattern: tuple = ()
  full_attention_every: int = 0
  family_options: Any = None
  # A short depthwise causal convolution (this kernel size) on q / k / v before the attention of every layer;
  # 0 = none, -1 = each layer's family's own default (`Family.short_conv`).
  short_conv: int = -1

  def __post_init__(self):
    # Typed and hashable (modules hash their config): a mapping becomes the family's options
    # dataclass once the family is registered; until then (a plugin not yet imported) a sorted tuple.
    opts = self.attention_options
    family = _registered_family(self.attention)
    if dataclasses.is_dataclass(opts) and family is not None and not isinstance(opts, family.options):
      opts = None  # another family's options (dataclasses.replace(m, attention=...)): the new family's defaults
    if family is not None:
      try:
        opts = family.make_options(dict(opts) if isinstance(opts, tuple) else opts)
      except ValueError as e:
        raise ConfigError(_model_option_message(str(e))) from None
    elif isinstance(opts, Mapping):
      opts = tuple(sorted(opts.items()))
    object.__setattr__(self, "attention_options", opts)
    object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern or ()))
    object.__setattr__(self, "family_options", _typed_family_options(self.family_options))

  def layer_families(self) -> tuple[str, ...]:
    """The attention family of each of the num_layers layers."""
    if self.attention_pattern:
      p = self.attention_pattern
      return tuple(p[i % len(p)] for i in range(self.num_layers))
    if self.full_attention_every > 0:
      n = self.full_attention_every
      return tuple("softmax" if (i + 1) % n == 0 else self.attention for i in range(self.num_layers))
    return (self.attention,) * self.num_layers

  @property
  def hybrid(self) -> bool:
    """True when the layers do not all use model.attention (a pattern or full_attention_every)."""
    return bool(self.attention_pattern) or self.full_attention_every > 0

  def family_period(self) -> int:
    """The layers after which the families repeat (1 for a homogeneous stack)."""
    if self.attention_pattern:
      return len(self.attention_pattern)
    return self.full_attention_every if self.full_attention_every > 0 else 1

  def options_of(self, family: str):
    """The options `family` runs with in this model: model.attention_options for model.attention, else
    model.family_options[family] (its defaults when absent)."""
    if family == self.attention:
      return self.attention_options
    return dict(self.family_options or ()).get(family)

  @property
  def conv_kernel(self) -> int:
    """The short convolution's kernel of this (homogeneous) config's layers: model.short_conv, or the family's
    default when it is -1; 0 = none."""
    return self.short_conv if self.short_conv >= 0 else self.family.short_conv

  def layer(self, i: int) -> "ModelConfig":
    """Layer i's own homogeneous config: its family as model.attention with that family's options."""
    family = self.layer_families()[i]
    if not self.hybrid:
      return self
    return dataclasses.replace(self, attention=family, attention_options=self.options_of(family),
                               attention_pattern=(), full_attention_every=0, family_options=None)

  def layer_configs(self) -> tuple["ModelConfig", ...]:
    return tuple(self.layer(i) for i in range(self.num_layers))

  @property
  def family(self):
    """The registered attention family record (ConfigError if the name is unknown)."""
    family = _registered_family(self.attention)
    if family is None:
      from efficient_attn.attention import names
      raise ConfigError(f"model.attention={self.attention!r} is not a registered attention family;"
                        f"{did_you_mean(self.attention, names())} valid ones are {names()} (a plugin's family"
                        " needs --plugin FILE.py).")
    return family

  @property
  def options(self):
    """The attention family's typed options."""
    return self.family.make_options(self.attention_options if not isinstance(self.attention_options, tuple)
                                    else dict(self.attention_options))


def _typed_family_options(value):
  """model.family_options as a sorted tuple of (family, options): each registered family's typed options
  dataclass (a ConfigError naming model.family_options.FAMILY.KEY on a bad option), else a sorted tuple."""
  if not value:
    return None
  if isinstance(value, tuple):
    value = dict(value)
  if not isinstance(value, Mapping) or not all(isinstance(v, (Mapping, tuple)) or dataclasses.is_dataclass(v)
                                               for v in value.values()):
    raise ConfigError(f"model.family_options={value!r} must map a family to its options, e.g."
                      " {'local': {'window': 512}}.")
  out = []
  for name, opts in sorted(value.items()):
    family = _registered_family(name)
    if family is not None:
      if dataclasses.is_dataclass(opts) and not isinstance(opts, family.options):
        opts = None
      try:
        opts = family.make_options(dict(opts) if isinstance(opts, tuple) else opts)
      except ValueError as e:
        raise ConfigError(f"model.family_options.{name}: {e}") from None
    elif isinstance(opts, Mapping):
      opts = tuple(sorted(opts.items()))
    out.append((name, opts))
  return tuple(out)


def _registered_family(name: str):
  from efficient_attn.attention import registry
  return registry.FAMILIES.get(name)


def _model_option_message(msg: str) -> str:
  """Family errors in config terms: `option window=` -> `model.attention_options.window=`."""
  return msg.replace("option ", "model.attention_options.", 1) if "option " in msg and "no option" not in msg else msg


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 200
  batch_size: int = 8
  seq_len: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100
  max_to_keep: int = 3
  eval_batches: int = 4
  eval_every: int = 0                 # validation loss every n steps (a multiple of log_every); 0 = at the end
  aux_loss_weight: float = 0.01       # MoE load balancing
  z_loss_weight: float = 0.001        # MoE router z-loss
  on_nonfinite: str = "stop"          # stop | skip
  redraw_every: int = 0               # redraw the attention buffers (Performer features) every n steps; 0 = never
  grad_accum: int = 1                 # micro-batches per optimizer step (same update as the whole batch at once)
  schedule: str = "cosine"            # after warmup: cosine | linear (to 10%) | constant | wsd (last 20% to 10%)
  tensorboard: bool = False           # also write TensorBoard scalars to DIR/tensorboard (needs tensorboardX)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str = "stdlib"                # stdlib | text | json | parquet | arrow | a save_to_disk DIR | a hub name
  files: str = ""                     # text / json / parquet / arrow: a path, a glob or a directory
  text_field: str = "text"
  val_fraction: float = 0.05          # held-out share of documents (by content CRC); unused with validation_split
  tokenizer: str = "bytes"            # bytes | bpe:N | unigram:N (trained on the train split) | tokenizer.json / DIR
  config: str = ""                    # hub dataset config (e.g. wikitext-103-raw-v1)
  split: str = "train"                # the training split (hub / save_to_disk DatasetDict)
  validation_split: str = ""          # the dataset's own validation split, if it has one
  cache_dir: str = ""                 # token stores, trained tokenizers; "" = $EFFICIENT_ATTN_DATA_CACHE or ~/.cache/...
  num_proc: int = 1                   # worker processes tokenizing local files when the store is built
  sample_by: str = "document"         # text files: document (one per file) | paragraph | line


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1                      # -1 = all devices not used by the other axes
  fsdp: int = 1
  context: int = 1                    # devices each sequence is split over (attention.context)
  tensor: int = 1
  expert: int = 1
  context_layout: str = "zigzag"      # zigzag (causal load balance) | contiguous: which tokens each holds


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()


OPTIONS_PREFIX = "model.attention_options."
FAMILY_OPTIONS_PREFIX = "model.family_options."  # model.family_options.FAMILY.OPTION


def _option_items(opts) -> dict:
  items = {g.name: getattr(opts, g.name) for g in dataclasses.fields(opts)} if dataclasses.is_dataclass(opts) \
      else dict(opts or ())
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in items.items()}


def flatten(cfg) -> dict:
  """Config -> {'model.attention': 'softmax', ..., 'model.attention_options.window': 128, ...}.

  The attention family's options appear as `model.attention_options.NAME`, one key each; a hybrid's
  other families' as `model.family_options.FAMILY.NAME`.
  """
  flat = {}
  for sec in dataclasses.fields(cfg):
    sub = getattr(cfg, sec.name)
    for f in dataclasses.fields(sub):
      if sec.name == "model" and f.name == "attention_options":
        opts = sub.options if _registered_family(sub.attention) else dict(sub.attention_options or ())
        flat.update({OPTIONS_PREFIX + k: v for k, v in _option_items(opts).items()})
      elif sec.name == "model" and f.name == "family_options":
        for family, opts in sub.family_options or ():
          flat.update({f"{FAMILY_OPTIONS_PREFIX}{family}.{k}": v for k, v in _option_items(opts).items()})
      else:
        value = getattr(sub, f.name)
        flat[f"{sec.name}.{f.name}"] = list(value) if isinstance(value, tuple) else value
  return flat


def with_overrides(cfg: Config, overrides: dict) -> Config:
  """Applies {'section.key': value} overrides with key and type checks (ConfigError on a bad one).

  `model.attention` is applied first: a new family starts from its own default options,
  which `model.attention_options.KEY` overrides then update (checked against that family).
  """
  def split(flat: dict) -> tuple[dict, dict]:  # (the family's options, everything else)
    opts = {k[len(OPTIONS_PREFIX):]: v for k, v in flat.items() if k.startswith(OPTIONS_PREFIX)}
    return opts, {k: v for k, v in flat.items() if not k.startswith(OPTIONS_PREFIX)}

  def split_families(flat: dict) -> tuple[dict, dict]:  # ({family: {option: value}}, everything else)
    fams: dict = {}
    for k, v in flat.items():
      if k.startswith(FAMILY_OPTIONS_PREFIX):
        family, _, option = k[len(FAMILY_OPTIONS_PREFIX):].partition(".")
        if not option:
          raise ConfigError(f"{k}: name one option of the family, as in {FAMILY_OPTIONS_PREFIX}local.window=512.")
        fams.setdefault(family, {})[option] = v
    return fams, {k: v for k, v in flat.items() if not k.startswith(FAMILY_OPTIONS_PREFIX)}

  families, overrides = split_families(overrides)
  old_families, _ = split_families(flatten(cfg))
  options, overrides = split(overrides)
  old_opts, base = split(flatten(cfg))
  base = {k: v for k, v in base.items() if not k.startswith(FAMILY_OPTIONS_PREFIX)}
  base["model.family_options"] = None
  flat = apply_overrides(base, overrides, "the training config")
  if options and _registered_family(flat["model.attention"]) is None:
    _ = ModelConfig(attention=flat["model.attention"]).family  # the ConfigError naming the registered families
  new_opts = old_opts if flat["model.attention"] == cfg.model.attention else {}
  sections = {}
  for sec in dataclasses.fields(cfg):
    sub = getattr(cfg, sec.name)
    values = {f.name: flat[f"{sec.name}.{f.name}"] for f in dataclasses.fields(sub) if f"{sec.name}.{f.name}" in flat}
    if sec.name == "model":
      values["attention_options"] = {**new_opts, **options}
      merged = {f: dict(o) for f, o in old_families.items()}
      whole = values.get("family_options")  # --set model.family_options="{'local': {'window': 64}}"
      if whole is not None and not isinstance(whole, Mapping):
        raise ConfigError(f"model.family_options={whole!r} must map a family to its options, e.g."
                          " {'local': {'window': 512}}.")
      for f, o in (whole or {}).items():
        merged.setdefault(f, {}).update(dict(o) if isinstance(o, (Mapping, tuple)) else o)
      for f, o in families.items():
        merged.setdefault(f, {}).update(o)
      values["family_options"] = merged or None
    sections[sec.name] = dataclasses.replace(sub, **values)
  return Config(**sections)


CONFIG_JSON = "config.json"  # a training workdir's resolved config


def save_config_json(cfg: Config, path: str) -> None:
  """Writes `flatten(cfg)` as JSON (atomically: a crash leaves the old file or the new one)."""
  import json

  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(flatten(cfg), f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def load_config_json(path: str) -> Config:
  """The Config a `save_config_json` file holds (checked like --set overrides); a missing, unreadable or
  foreign file (an experiment's config.json) or a stale key is a ConfigError naming the file."""
  import json

  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no such file; a training workdir keeps its config there once `train` has run.")
  try:
    with open(path, encoding="utf-8") as f:
      flat = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is not readable JSON ({e}); fix it or move it aside.") from None
  if not isinstance(flat, dict) or "model.attention" not in flat:
    raise ConfigError(f"{path} is not a training config (an experiment's?); pass a training workdir, such as an"
                      " experiment's DIR/variants/NAME.")
  try:
    return with_overrides(Config(), flat)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None


def load_config_file(path: str) -> Config:
  """Runs a Python config file and returns its `get_config()` (a config file is code: trust it as such)."""
  if not os.path.isfile(path):
    raise ConfigError(f"--config {path}: no such file; pass a Python file that defines get_config().")
  spec = importlib.util.spec_from_file_location("_efficient_attn_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config {path}: the file defines no get_config() function.")
  cfg = module.get_config()
  if not isinstance(cfg, Config):
    raise ConfigError(f"--config {path}: get_config() returned {type(cfg).__name__}, expected efficient_attn.config.Config.")
  return cfg


def check_attention(m: ModelConfig, seq_len: int, causal: bool = True) -> None:
  """ConfigError (one sentence) unless model m's attention family can run its options at seq_len."""
  from efficient_attn.attention import Shape

  H = m.d_model // m.num_heads
  try:
    m.family.validate(m.options, Shape(seq_len, seq_len, m.num_heads, m.num_kv_heads or m.num_heads, H, causal))
  except ValueError as e:
    raise ConfigError(f"model.attention={m.attention!r} at train.seq_len={seq_len}: {e}") from None


def _need(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolves `data=-1` and checks that the mesh uses exactly `num_devices` devices."""
  sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "context": mesh.context, "tensor": mesh.tensor,
           "expert": mesh.expert}
  for k, v in sizes.items():
    _need(v == -1 if k == "data" and v < 1 else v >= 1,
          f"mesh.{k}={v} must be a positive integer{' (or -1 for the remaining devices)' if k == 'data' else ''}.")
  others = mesh.fsdp * mesh.context * mesh.tensor * mesh.expert
  if sizes["data"] == -1:
    rest = " x ".join(f"mesh.{k}={v}" for k, v in sizes.items() if k != "data" and (k != "context" or v > 1))
    _need(num_devices % others == 0, f"mesh.data=-1 with {rest} = {others}, which does not divide the {num_devices}"
          f" available devices;"
          f" choose sizes whose product divides {num_devices}{_more_devices(others, num_devices)}")
    sizes["data"] = num_devices // others
  need = math.prod(sizes.values())
  _need(need == num_devices,
        f"{' x '.join(f'mesh.{k}={v}' for k, v in sizes.items() if k != 'context' or v > 1)} = {need} devices, but {num_devices} are"
        f" available; make the product equal {num_devices} (mesh.data=-1 fills in){_more_devices(need, num_devices)}")
  return sizes


def _more_devices(need: int, have: int) -> str:
  """The end of a mesh-size sentence: how to get `need` devices when fewer are there."""
  if need <= have:
    return "."
  return (f" or get {need} devices: on CPU XLA_FLAGS=--xla_force_host_platform_device_count={need} (`efficient-attn"
          f" train` sets it itself when XLA_FLAGS has no device count), on GPU / TPU more processes or a bigger slice.")


SCHEDULES = ("cosine", "linear", "constant", "wsd")  # train.schedule (see train.make_schedule)


def _check_tokenizer(m: ModelConfig, d: DataConfig) -> None:
  """data.tokenizer well-formed, and model.vocab_size not below a vocabulary known without loading anything."""
  from efficient_attn.data import tokenizer

  msg = tokenizer.check_spec(d.tokenizer)
  _need(msg is None, msg or "")
  kind, n = tokenizer.parse_spec(d.tokenizer)
  follows = kind != "bytes" and m.vocab_size == ModelConfig.vocab_size  # the default follows the tokenizer
  _need(n is None or follows or m.vocab_size >= n, f"model.vocab_size={m.vocab_size} is smaller than the"
        f" {n} tokens of data.tokenizer={d.tokenizer!r}; use at least {n} (or leave model.vocab_size unset).")


def resolve_vocab(cfg: Config) -> Config:
  """`cfg` with model.vocab_size following data.tokenizer when left at its default (256); a smaller
  explicit size than the tokenizer's is a ConfigError naming both (checked before anything compiles).
  Unlike `validate`, this loads a tokenizer file to learn its size."""
  from efficient_attn.data import tokenizer

  m, d = cfg.model, cfg.data
  if d.tokenizer == "bytes":
    return cfg
  n = tokenizer.vocab_size_of(d.tokenizer)
  if m.vocab_size == ModelConfig.vocab_size:
    return dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=n))
  _need(m.vocab_size >= n, f"model.vocab_size={m.vocab_size} is smaller than the {n} tokens of"
        f" data.tokenizer={d.tokenizer!r}; use at least {n} (or leave model.vocab_size unset).")
  return cfg


def validate(cfg: Config, num_devices: int, *, text_data: bool = True) -> dict[str, int]:
  """Checks every field before anything compiles; returns the resolved mesh shape.

  text_data=False: the model trains on something other than `cfg.data` (the synthetic tasks, with their
  own vocabulary), so model.vocab_size is not held against data.tokenizer."""
  m, t, d = cfg.model, cfg.train, cfg.data
  _ = m.family  # a ConfigError naming the registered families if model.attention is unknown
  for sec, obj in (("model", m), ("train", t)):
    for f in dataclasses.fields(obj):
      v = getattr(obj, f.name)
      if isinstance(v, float):
        _need(math.isfinite(v), f"{sec}.{f.name}={v} must be a finite number.")
  for k in ("num_layers", "d_model", "num_heads", "ffn_dim", "vocab_size", "top_k", "moe_every"):
    _need(getattr(m, k) >= 1, f"model.{k}={getattr(m, k)} must be a positive integer.")
  for k in ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "max_to_keep", "eval_batches",
            "grad_accum"):
    _need(getattr(t, k) >= 1, f"train.{k}={getattr(t, k)} must be a positive integer.")
  for k in ("num_experts", "expert_dim", "num_kv_heads", "warmup_steps", "eval_every", "redraw_every"):
    obj = m if hasattr(m, k) else t
    _need(getattr(obj, k) >= 0, f"{'model' if obj is m else 'train'}.{k}={getattr(obj, k)} must be >= 0.")
  _need(m.d_model % m.num_heads == 0,
        f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; pick a divisor of {m.d_model}.")
  kv = m.num_kv_heads or m.num_heads
  _need(m.num_heads % kv == 0, f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}.")
  _need(m.ffn_activation in ("gelu", "swiglu"), f"model.ffn_activation={m.ffn_activation!r} is not gelu or swiglu.")
  from efficient_attn.moe import ROUTERS  # the registered routers (moe/router.py ROUTES)
  _need(m.router in ROUTERS, f"model.router={m.router!r} is not one of {list(ROUTERS)}.")
  _need(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r} is not float32 or bfloat16.")
  _need(m.capacity_factor > 0, f"model.capacity_factor={m.capacity_factor} must be > 0.")
  if m.num_experts:
    _need(m.top_k <= m.num_experts, f"model.top_k={m.top_k} exceeds model.num_experts={m.num_experts}.")
    _need(m.num_layers % m.moe_every == 0, f"model.num_layers={m.num_layers} must be a multiple of"
          f" model.moe_every={m.moe_every} (an MoE FFN closes every group of moe_every layers).")
  _need(t.learning_rate > 0, f"train.learning_rate={t.learning_rate} must be > 0.")
  _need(t.weight_decay >= 0 and t.grad_clip >= 0, "train.weight_decay and train.grad_clip must be >= 0.")
  _need(t.eval_every % t.log_every == 0, f"train.eval_every={t.eval_every} must be a multiple of"
        f" train.log_every={t.log_every} (evaluation happens on logging steps).")
  _need(t.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite={t.on_nonfinite!r} is not stop or skip.")
  _need(t.schedule in SCHEDULES, f"train.schedule={t.schedule!r} is not one of {' | '.join(SCHEDULES)}.")
  _need(0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1).")
  _need(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in [0, 1).")
  _need(d.name not in ("text", "json", "parquet", "arrow") or d.files,
        f"data.name={d.name!r} needs data.files (a path, a glob or a directory).")
  if text_data:
    _check_tokenizer(m, d)
  _need(d.num_proc >= 1, f"data.num_proc={d.num_proc} must be a positive integer.")
  _need(d.sample_by in ("document", "paragraph", "line"),
        f"data.sample_by={d.sample_by!r} is not document, paragraph or line.")
  check_pattern(m)
  _need(m.short_conv >= -1, f"model.short_conv={m.short_conv} must be a kernel size >= 0 (0 = off) or -1 (each"
        " family's default).")
  for layer in _distinct_layers(m):
    check_attention(layer, t.seq_len)
  sizes = mesh_shape(cfg.mesh, num_devices)
  if m.num_experts:
    _need(m.num_experts % sizes["expert"] == 0, f"model.num_experts={m.num_experts} is not divisible by"
          f" mesh.expert={sizes['expert']}; use a multiple of {sizes['expert']} experts.")
  else:
    _need(sizes["expert"] == 1, f"mesh.expert={sizes['expert']} needs an MoE model (model.num_experts > 0).")
  batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  _need(t.batch_size % batch_shards == 0, f"train.batch_size={t.batch_size} is not divisible by the"
        f" data-parallel size data x fsdp x expert = {batch_shards}; use a multiple of {batch_shards}.")
  _need(t.batch_size % (t.grad_accum * batch_shards) == 0, f"train.batch_size={t.batch_size} does not split into"
        f" train.grad_accum={t.grad_accum} micro-batches of a multiple of the data-parallel size {batch_shards};"
        f" use a batch size that is a multiple of {t.grad_accum * batch_shards}.")
  _need(m.num_heads % sizes["tensor"] == 0 and kv % sizes["tensor"] == 0 and m.ffn_dim % sizes["tensor"] == 0,
        f"mesh.tensor={sizes['tensor']} must divide model.num_heads={m.num_heads}, the kv heads ({kv}) and"
        f" model.ffn_dim={m.ffn_dim}.")
  _need(not m.num_experts or (m.expert_dim or m.ffn_dim) % sizes["tensor"] == 0,
        f"mesh.tensor={sizes['tensor']} must divide model.expert_dim={m.expert_dim}.")
  for layer in _distinct_layers(m):
    check_context(layer, t.seq_len, sizes["context"], cfg.mesh.context_layout)
  return sizes


def _distinct_layers(m: ModelConfig) -> list[ModelConfig]:
  """One homogeneous config per distinct family of model m's layers (m itself when it is not a hybrid)."""
  if not m.hybrid:
    return [m]
  seen: dict = {}
  for i, family in enumerate(m.layer_families()):
    seen.setdefault(family, i)
  return [m.layer(i) for i in seen.values()]


def check_pattern(m: ModelConfig) -> None:
  """ConfigError (one sentence) unless the hybrid settings name registered families, do not conflict, and
  family_options names only families the layers use (other than model.attention)."""
  from efficient_attn.attention import names

  _need(m.full_attention_every >= 0, f"model.full_attention_every={m.full_attention_every} must be >= 0 (0 = off).")
  _need(not (m.attention_pattern and m.full_attention_every), "model.attention_pattern and"
        f" model.full_attention_every={m.full_attention_every} both set the layers' families; use one of them.")
  for family in m.attention_pattern:
    _need(isinstance(family, str) and _registered_family(family) is not None,
          f"model.attention_pattern={list(m.attention_pattern)!r}: {family!r} is not a registered attention family;"
          f"{did_you_mean(str(family), names())} valid ones are {names()}.")
  used = sorted(set(m.layer_families()))
  for family, _ in m.family_options or ():
    _need(family != m.attention, f"model.family_options.{family}: {family} is model.attention; set its options as"
          f" model.attention_options.KEY.")
    _need(family in used, f"model.family_options.{family}: no layer uses {family!r};"
          f"{did_you_mean(family, used)} the layers' families are {used}.")


def check_context(m: ModelConfig, seq_len: int, shards: int, layout: str, causal: bool = True) -> None:
  """ConfigError (one sentence) unless model m's attention family can run with each sequence of seq_len tokens
  split over `shards` devices in `layout` (`Family.context`)."""
  from efficient_attn.attention import Shape, context

  _need(layout in context.LAYOUTS, f"mesh.context_layout={layout!r} is not one of {' | '.join(context.LAYOUTS)}.")
  if shards == 1:
    return
  H = m.d_model // m.num_heads
  try:
    m.family.validate_context(m.options, Shape(seq_len, seq_len, m.num_heads, m.num_kv_heads or m.num_heads, H,
                                               causal), shards, layout)
  except ValueError as e:
    raise ConfigError(f"model.attention={m.attention!r} with mesh.context={shards}: {e}") from None
