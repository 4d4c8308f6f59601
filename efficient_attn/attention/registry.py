"""Attention families as records, and the one registry every other part derives from.

A family is one `Family` record: its name, its pure function (the standard
signature below), and optionally its typed options, static preparation, buffers,
decoding, FLOPs and checks. Built-in families define a module-level `FAMILY` in
their own file (`attention/softmax.py`, ...) and are registered when the package is
imported; a user's family is one call in their own file:

    from efficient_attn.attention import Family, register
    register(Family(name="mine", fn=my_attention))

    out_BTNH = fn(query_BTNH, key_BSKH, value_BSKH, bias=None, mask=None, *,
                  is_causal=False, segment_ids=None, scale=None, **call_kwargs)

`call_kwargs` are what `prepare(options, shape)` returns (default: the options'
fields as keywords) plus the family's buffers (e.g. the Performer's projection).
Everything that lists families — `ATTENTION`, `attend`, `flax_attention_fn`, the
decoding API, `layers.MultiHeadAttention`, `flops`, `bench attention`, config
validation and the experiments' variant lists — reads this registry.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Callable, NamedTuple

from efficient_attn.errors import did_you_mean


class Shape(NamedTuple):
  """The static shape of one attention call: what preparation, checks and FLOPs see.

  seq_len T, kv_len S, num_heads N, num_kv_heads K, head_dim H, causal.
  """
  seq_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  causal: bool = True


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """The options of a family that has none."""


@dataclasses.dataclass(frozen=True)
class Family:
  """One attention family.

  Fields (only `name` and `fn` are required):
    name: the registry key (`model.attention=NAME`, `attend(NAME, ...)`).
    fn: the pure attention function with the standard signature (module docstring).
    options: a frozen dataclass whose fields are the family's typed options with defaults;
      its `__post_init__` may raise ValueError on a bad value.
    prepare: (options, Shape) -> dict of keyword arguments for `fn`, built once per
      (options, shape) and cached (e.g. sparse's static block layout). Default: the options'
      fields as keywords.
    buffers: (rng, options, Shape) -> dict of non-trainable arrays passed to `fn` and `step`
      as keywords (e.g. the Performer's random projection). `layers.MultiHeadAttention` keeps
      them in the "buffers" collection, one draw per layer; they must not depend on seq_len.
    init_state: (batch, num_kv_heads, head_dim, *, max_len, dtype, **call_kwargs) -> the
      empty decoding state. step: (state, q_B1NH, k_B1KH, v_B1KH, **call_kwargs) -> (out, state);
      token by token it equals the causal parallel forward. None: no decoding.
    decode_window: options -> int | None, the sliding window (positions a query sees, itself
      included) of a family whose causal attention is exact softmax over the last `window`
      keys (local). Flax's decode=True path (`flax_attention_fn`) then keeps only those keys of
      the cache visible. None (the default): no window; the family's own function runs.
    flops: (options, Shape) -> {"ideal", "executed"} forward FLOPs per token of one layer's
      attention core (optionally "backward": executed backward FLOPs, default 2 x executed).
      None: XLA's count of `fn` at that shape (ideal = executed).
    check: (options, Shape) -> None, raising ValueError on an impossible combination
      (e.g. a length that is not a multiple of the block size), before anything compiles.
    input_params: (options, Shape, d_model) -> {name: (shape, logical_axes, init)}: the params
      of per-token inputs the family computes from the layer input x (gates, β, ...); `init` is
      a JAX initializer (key, shape, dtype); they must not depend on seq_len. The attention
      layers declare them beside q / k / v under these names (Linen `layers.MultiHeadAttention`
      and `nnx.MultiHeadAttention`, same paths) and train them with the rest.
    inputs: (params, x_BTD, options, Shape) -> dict of keyword arrays [B, T, ...] for `fn`
      (and, on a one-token x [B, 1, D], for `step`). Both or neither; without them `fn` and
      `step` must run on their own defaults (a pure call, `bench attention`).
    context: (options, Shape, shards, layout) -> None: the family runs with each sequence split over
      `shards` devices of a mesh axis (context parallelism): its `fn` takes `context_axis` (the axis
      name; the call then runs inside `jax.shard_map` on one shard's tokens) and `context_layout`
      ("zigzag" | "contiguous", see `attention.context`) and equals the one-device call; this hook
      raises ValueError for a split it cannot run (e.g. a length the shards do not divide:
      `context.check_split` is the usual one). None (the default): refused under `mesh.context` > 1
      with one sentence naming the family.
    short_conv: the kernel of the short depthwise causal convolution on q / k / v the models put before this
      family when model.short_conv is -1 (its default; `attention.short_conv`); 0 = none.
    description: one line for listings.
  """
  name: str
  fn: Callable[..., Any]
  options: type = NoOptions
  prepare: Callable[[Any, Shape], dict] | None = None
  buffers: Callable[[Any, Any, Shape], dict] | None = None
  init_state: Callable[..., Any] | None = None
  step: Callable[..., Any] | None = None
  decode_window: Callable[[Any], int | None] | None = None
  flops: Callable[[Any, Shape], dict] | None = None
  check: Callable[[Any, Shape], None] | None = None
  input_params: Callable[[Any, Shape, int], dict] | None = None
  inputs: Callable[..., dict] | None = None
  context: Callable[[Any, Shape, int, str], None] | None = None
  short_conv: int = 0
  description: str = ""

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name.isidentifier():
      raise ValueError(f"Family: `name` must be an identifier such as 'mine', got {self.name!r}.")
    if not callable(self.fn):
      raise ValueError(f"Family {self.name!r}: `fn` must be the attention function, got {type(self.fn).__name__}.")
    if not (dataclasses.is_dataclass(self.options) and isinstance(self.options, type)):
      raise ValueError(f"Family {self.name!r}: `options` must be a frozen dataclass type, got {self.options!r}.")
    if (self.init_state is None) != (self.step is None):
      raise ValueError(f"Family {self.name!r}: decoding needs both `init_state` and `step` (or neither).")
    if (self.input_params is None) != (self.inputs is None):
      raise ValueError(f"Family {self.name!r}: per-token inputs need both `input_params` and `inputs` (or neither).")

  # --------------------------------------------------------------------------- options

  @property
  def option_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(self.options))

  def make_options(self, value=None):
    """The family's options from None (defaults), a mapping {name: value} or an options instance.

    An unknown name, a value of the wrong type or one the options refuse is a ValueError
    naming the family, the option and what is valid.
    """
    if isinstance(value, self.options):
      return value
    if value is None:
      value = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      raise ValueError(f"attention family {self.name!r} takes {self.options.__name__}, got "
                       f"{type(value).__name__}.")
    items = dict(value)
    fields = {f.name: f for f in dataclasses.fields(self.options)}
    for key, v in items.items():
      if key not in fields:
        valid = ", ".join(fields) if fields else "none"
        raise ValueError(f"attention family {self.name!r} has no option {key!r};{did_you_mean(key, fields)}"
                         f" its options are {valid}.")
      items[key] = _coerce(self.name, key, v, fields[key])
    try:
      return self.options(**items)
    except (TypeError, ValueError) as e:
      raise ValueError(f"attention family {self.name!r}: {e}") from None

  # --------------------------------------------------------------------------- per-call pieces

  def call_kwargs(self, options, shape: Shape) -> dict:
    """Keyword arguments of `fn` for these options at this shape (cached; buffers not included)."""
    return dict(_prepared(self, self.make_options(options), Shape(*shape)))

  def validate(self, options, shape: Shape) -> None:
    """ValueError (one sentence) if the family cannot run these options at this shape."""
    options = self.make_options(options)
    if self.check is not None:
      self.check(options, Shape(*shape))

  def validate_context(self, options, shape: Shape, shards: int, layout: str) -> None:
    """ValueError (one sentence) unless the family runs these options with each sequence split over `shards`
    devices in `layout`; a family without a `context` hook is refused (one sentence naming it)."""
    options, shape = self.make_options(options), Shape(*shape)
    if self.context is None:
      raise ValueError(f"attention family {self.name!r} has no context-parallel rule (its Family sets no `context`"
                       " hook), so its sequence cannot be split over devices; use mesh.context=1 or give it one.")
    self.validate(options, shape)
    self.context(options, shape, shards, layout)

  def flops_per_token(self, options, shape: Shape) -> dict:
    """{"ideal", "executed", "backward"}: forward FLOPs per token (+ executed backward) of one layer."""
    options, shape = self.make_options(options), Shape(*shape)
    self.validate(options, shape)
    out = dict(self.flops(options, shape) if self.flops is not None else _xla_flops(self, options, shape))
    out.setdefault("backward", 2.0 * out["executed"])
    return {k: float(v) for k, v in out.items()}

  @property
  def decodes(self) -> bool:
    return self.step is not None


def _coerce(family: str, key: str, value, field: dataclasses.Field):
  """Type-checks one option value against its default (ints where floats go; lists become tuples)."""
  default = field.default
  if isinstance(value, list):
    value = tuple(value)
  if default is dataclasses.MISSING or default is None or value is None:
    return value
  ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
  if isinstance(value, bool) and not isinstance(default, bool):
    ok = False
  if not ok:
    raise ValueError(f"attention family {family!r}: option {key}={value!r} has type {type(value).__name__},"
                     f" expected {type(default).__name__} like the default {default!r}.")
  return value


@functools.lru_cache(maxsize=256)
def _prepared(family: Family, options, shape: Shape) -> tuple:
  if family.prepare is None:
    kw = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
  else:
    kw = family.prepare(options, shape)
  return tuple(kw.items())


@functools.lru_cache(maxsize=256)
def _xla_flops(family: Family, options, shape: Shape) -> dict:
  """XLA's count of one call of `fn` (batch 1, float32) per query token: the default for a family without `flops`."""
  import jax
  import jax.numpy as jnp

  from efficient_attn import measure

  T, S, N, K, H, causal = shape
  q = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, S, K, H), jnp.float32)
  kw = dict(_prepared(family, options, shape))
  if family.buffers is not None:
    kw.update(family.buffers(jax.random.key(0), options, shape))
  compiled = jax.jit(lambda q, k, v: family.fn(q, k, v, is_causal=causal, **kw)).lower(q, kv, kv).compile()
  per_token = measure.xla_flops(compiled) / T
  return {"ideal": per_token, "executed": per_token}


# ----------------------------------------------------------------------------- the registry

FAMILIES: dict[str, Family] = {}
# name -> fn, the view the pure-function API and older callers use.
ATTENTION: dict[str, Callable[..., Any]] = {}


def register(family: Family, *, replace: bool = False) -> Family:
  """Adds `family` to the registry (a second family of the same name needs replace=True)."""
  if not isinstance(family, Family):
    raise ValueError(f"register: expected an efficient_attn.attention.Family, got {type(family).__name__}.")
  if family.name in FAMILIES and not replace and FAMILIES[family.name] is not family:
    raise ValueError(f"register: an attention family named {family.name!r} is already registered;"
                     " pick another name or pass replace=True.")
  FAMILIES[family.name] = family
  ATTENTION[family.name] = family.fn
  return family


def get(kind: str) -> Family:
  """The registered family `kind`; an unknown name is a ValueError listing the valid ones."""
  if isinstance(kind, Family):
    return kind
  if kind not in FAMILIES:
    raise ValueError(f"unknown attention kind {kind!r};{did_you_mean(kind, FAMILIES)} valid kinds are"
                     f" {sorted(FAMILIES)}.")
  return FAMILIES[kind]


def names() -> list[str]:
  """Registered family names, in registration order (built-ins first)."""
  return list(FAMILIES)


def options_type_hints(family: Family) -> dict[str, Any]:
  """Field name -> annotation of a family's options (for listings and docs)."""
  try:
    return typing.get_type_hints(family.options)
  except Exception:  # string annotations naming types we cannot resolve
    return {f.name: f.type for f in dataclasses.fields(family.options)}
