"""Configs and the one override mechanism: `--set KEY=VALUE`.

Values parse as Python literals where they can (`20`, `1e-3`, `[1024, 2048]`,
`True`) and otherwise stay strings (`performer`); they are never evaluated as
code (`ast.literal_eval` only).
"""

from __future__ import annotations

import ast
from typing import Any


class ConfigError(ValueError):
  """A user-facing configuration error: one sentence, exit status 2 on the command line."""


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

  Ints are accepted where floats are expected; a list where a list is expected.
  """
  out = dict(defaults)
  for key, value in overrides.items():
    if key not in defaults:
      raise ConfigError(f"unknown key {key!r} for {where}; valid keys are {', '.join(sorted(defaults))}.")
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


# ----------------------------------------------------------------------------- training configs

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

ATTENTION_KINDS = ("softmax", "local", "sparse", "linear", "performer")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  attention: str = "softmax"          # softmax | local | sparse | linear | performer
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 0               # 0 = num_heads (MHA); a divisor of num_heads gives GQA / MQA
  ffn_dim: int = 1024
  ffn_activation: str = "gelu"        # gelu | swiglu
  vocab_size: int = 256
  num_experts: int = 0                # 0 = dense FFN in every layer
  expert_dim: int = 0                 # hidden width of each expert; 0 = ffn_dim
  top_k: int = 1
  moe_every: int = 1                  # MoE FFN in every n-th layer (layers n-1, 2n-1, ...)
  capacity_factor: float = 1.25
  router: str = "tokens_choose"       # tokens_choose | experts_choose
  dropless: bool = False
  window: int = 128                   # local attention
  block_size: int = 64                # sparse attention
  sparse_global: int = 1
  sparse_random: int = 1
  sparse_window: int = 3
  num_features: int = 128             # performer M
  feature_map: str = "elu"            # linear
  chunk_size: int = 0                 # 0 = the family's default
  softmax_impl: str = ""              # "" = automatic | xla | chunked (flash-style) | cudnn
  rope_base: float = 10_000.0
  scan_layers: bool = False
  dtype: str = "float32"              # compute dtype; params stay float32
  remat: bool = False


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


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str = "stdlib"                # stdlib | text | json | a Hugging Face dataset name
  files: str = ""                     # path or glob for text / json
  text_field: str = "text"
  val_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1                      # -1 = all devices not used by the other axes
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()


def flatten(cfg) -> dict:
  """Config -> {'model.attention': 'softmax', ...}."""
  return {f"{sec.name}.{f.name}": getattr(getattr(cfg, sec.name), f.name)
          for sec in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, sec.name))}


def with_overrides(cfg: Config, overrides: dict) -> Config:
  """Applies {'section.key': value} overrides with key and type checks (ConfigError on a bad one)."""
  flat = apply_overrides(flatten(cfg), overrides, "the training config")
  sections = {}
  for sec in dataclasses.fields(cfg):
    sub = getattr(cfg, sec.name)
    sections[sec.name] = dataclasses.replace(sub, **{f.name: flat[f"{sec.name}.{f.name}"]
                                                     for f in dataclasses.fields(sub)})
  return Config(**sections)


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


def _need(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolves `data=-1` and checks that the mesh uses exactly `num_devices` devices."""
  sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor, "expert": mesh.expert}
  for k, v in sizes.items():
    _need(v == -1 if k == "data" and v < 1 else v >= 1,
          f"mesh.{k}={v} must be a positive integer{' (or -1 for the remaining devices)' if k == 'data' else ''}.")
  others = mesh.fsdp * mesh.tensor * mesh.expert
  if sizes["data"] == -1:
    _need(num_devices % others == 0, f"mesh.data=-1 with mesh.fsdp={mesh.fsdp} x mesh.tensor={mesh.tensor} x"
          f" mesh.expert={mesh.expert} = {others}, which does not divide the {num_devices} available devices;"
          f" choose sizes whose product divides {num_devices}.")
    sizes["data"] = num_devices // others
  _need(math.prod(sizes.values()) == num_devices,
        f"{' x '.join(f'mesh.{k}={v}' for k, v in sizes.items())} = {math.prod(sizes.values())} devices, but"
        f" {num_devices} are available; make the product equal {num_devices} (mesh.data=-1 fills in).")
  return sizes


def validate(cfg: Config, num_devices: int) -> dict[str, int]:
  """Checks every field before anything compiles; returns the resolved mesh shape."""
  m, t, d = cfg.model, cfg.train, cfg.data
  _need(m.attention in ATTENTION_KINDS, f"model.attention={m.attention!r} is not one of {list(ATTENTION_KINDS)}.")
  for sec, obj in (("model", m), ("train", t)):
    for f in dataclasses.fields(obj):
      v = getattr(obj, f.name)
      if isinstance(v, float):
        _need(math.isfinite(v), f"{sec}.{f.name}={v} must be a finite number.")
  for k in ("num_layers", "d_model", "num_heads", "ffn_dim", "vocab_size", "top_k", "moe_every", "window",
            "block_size", "num_features"):
    _need(getattr(m, k) >= 1, f"model.{k}={getattr(m, k)} must be a positive integer.")
  for k in ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "max_to_keep", "eval_batches"):
    _need(getattr(t, k) >= 1, f"train.{k}={getattr(t, k)} must be a positive integer.")
  for k in ("num_experts", "expert_dim", "num_kv_heads", "chunk_size", "warmup_steps", "eval_every", "sparse_global",
            "sparse_random"):
    obj = m if hasattr(m, k) else t
    _need(getattr(obj, k) >= 0, f"{'model' if obj is m else 'train'}.{k}={getattr(obj, k)} must be >= 0.")
  _need(m.d_model % m.num_heads == 0,
        f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; pick a divisor of {m.d_model}.")
  kv = m.num_kv_heads or m.num_heads
  _need(m.num_heads % kv == 0, f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}.")
  _need(m.ffn_activation in ("gelu", "swiglu"), f"model.ffn_activation={m.ffn_activation!r} is not gelu or swiglu.")
  _need(m.feature_map in ("elu", "relu"), f"model.feature_map={m.feature_map!r} is not elu or relu.")
  _need(m.router in ("tokens_choose", "experts_choose"),
        f"model.router={m.router!r} is not tokens_choose or experts_choose.")
  _need(m.softmax_impl in ("", "xla", "chunked", "cudnn"),
        f"model.softmax_impl={m.softmax_impl!r} is not '' (automatic), xla, chunked or cudnn.")
  _need(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r} is not float32 or bfloat16.")
  _need(m.capacity_factor > 0, f"model.capacity_factor={m.capacity_factor} must be > 0.")
  if m.num_experts:
    _need(m.top_k <= m.num_experts, f"model.top_k={m.top_k} exceeds model.num_experts={m.num_experts}.")
  _need(t.learning_rate > 0, f"train.learning_rate={t.learning_rate} must be > 0.")
  _need(t.weight_decay >= 0 and t.grad_clip >= 0, "train.weight_decay and train.grad_clip must be >= 0.")
  _need(t.eval_every % t.log_every == 0, f"train.eval_every={t.eval_every} must be a multiple of"
        f" train.log_every={t.log_every} (evaluation happens on logging steps).")
  _need(t.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite={t.on_nonfinite!r} is not stop or skip.")
  _need(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in [0, 1).")
  _need(d.name not in ("text", "json") or d.files, f"data.name={d.name!r} needs data.files (a path or glob).")
  if m.attention == "sparse":
    _need(t.seq_len % m.block_size == 0, f"train.seq_len={t.seq_len} is not divisible by model.block_size="
          f"{m.block_size}; pick a seq_len that is a multiple of {m.block_size}.")
  sizes = mesh_shape(cfg.mesh, num_devices)
  if m.num_experts:
    _need(m.num_experts % sizes["expert"] == 0, f"model.num_experts={m.num_experts} is not divisible by"
          f" mesh.expert={sizes['expert']}; use a multiple of {sizes['expert']} experts.")
  else:
    _need(sizes["expert"] == 1, f"mesh.expert={sizes['expert']} needs an MoE model (model.num_experts > 0).")
  batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  _need(t.batch_size % batch_shards == 0, f"train.batch_size={t.batch_size} is not divisible by the"
        f" data-parallel size data x fsdp x expert = {batch_shards}; use a multiple of {batch_shards}.")
  _need(m.num_heads % sizes["tensor"] == 0 and kv % sizes["tensor"] == 0 and m.ffn_dim % sizes["tensor"] == 0,
        f"mesh.tensor={sizes['tensor']} must divide model.num_heads={m.num_heads}, the kv heads ({kv}) and"
        f" model.ffn_dim={m.ffn_dim}.")
  _need(not m.num_experts or (m.expert_dim or m.ffn_dim) % sizes["tensor"] == 0,
        f"mesh.tensor={sizes['tensor']} must divide model.expert_dim={m.expert_dim}.")
  return sizes
