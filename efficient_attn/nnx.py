"""Flax NNX modules over the pure functions: attention (any registered family) and the MoE FFN.

They mirror the Linen modules of `layers.py` (same param names, shapes and maths, so the same
weights give the same outputs; `load_linen` copies a Linen layer's variables in) and need no
sharding context: no mesh, no `nnx.use_eager_sharding`. Every param still carries its logical
axis names as `out_sharding` metadata (never applied eagerly); `param_shardings(model, mesh)`
places them by `sharding.RULES`.

State, by `nnx.Variable` type:
  nnx.Param   q / k / v / out kernels, norm scales, router and expert weights (trained).
  Buffer      an attention family's non-trainable per-layer arrays (the Performer's projection
              [M, H]); drawn at construction, redrawn by `MultiHeadAttention.redraw_buffers`.
  nnx.Cache   the decoding state made by `MultiHeadAttention.init_cache` (KV cache or recurrent state).
  MoEAux      `MoEFeedForward.aux`: the last call's auxiliary losses, overwritten on every call.

Modules: `MultiHeadAttention`, `MoEFeedForward`, `FeedForward`, `RMSNorm`, the pre-norm `Block`.
Optimise with `nnx.Optimizer(model, tx, wrt=nnx.Param)`: buffers, caches and aux stay out of it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn import attention as attention_lib
from efficient_attn import sharding
from efficient_attn.attention import short_conv as short_conv_lib
from efficient_attn.layers import _expert_init, rope, segment_positions
from efficient_attn.moe import collect_aux as _collect_aux, moe_ffn
from efficient_attn.moe.ffn import check_options, resolve_activation


class Buffer(nnx.Variable):
  """A non-trainable array an attention family takes as a keyword (the Performer's projection)."""


class MoEAux(nnx.Variable):
  """The auxiliary losses and telemetry of a MoE layer's last call (a dict; see `moe.moe_ffn`)."""


def _param(init, key, shape, dtype, axes) -> nnx.Param:
  # Logical names only as metadata: eager sharding would need a mesh in context.
  return nnx.Param(init(key, shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def param_shardings(model: nnx.Module, mesh) -> Any:
  """NamedShardings for `nnx.state(model, nnx.Param)` by `sharding.RULES`, from each param's logical
  axis names: `nnx.update(model, jax.device_put(nnx.state(model, nnx.Param), param_shardings(model, mesh)))`."""
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  return nn.logical_to_mesh_sharding(specs, mesh, sharding.RULES)


class Projection(nnx.Module):
  """Bias-free linear map of the last `len(in_shape)` axes to `features`, as `layers.Projection`
  (kernel [*in_shape, *features], LeCun normal; one 2-D matmul)."""

  def __init__(self, in_shape, features, axes, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_shape, self.features, self.dtype = tuple(in_shape), tuple(features), dtype
    n_in, n_out = len(self.in_shape), len(self.features)
    init = nnx.initializers.lecun_normal(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    self.kernel = _param(init, rngs.params(), (*self.in_shape, *self.features), param_dtype, axes)

  def __call__(self, x):
    k_in, k_out = math.prod(self.in_shape), math.prod(self.features)
    kernel = self.kernel[...].reshape(k_in, k_out).astype(self.dtype)
    y = x.reshape(-1, k_in).astype(self.dtype) @ kernel
    return y.reshape(*x.shape[:x.ndim - len(self.in_shape)], *self.features)


class RMSNorm(nnx.Module):
  """RMS normalisation (Zhang & Sennrich 2019), statistics in float32; as `layers.RMSNorm`."""

  def __init__(self, num_features: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), out_sharding=("norm",), eager_sharding=False)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(self.dtype)


# ----------------------------------------------------------------------------- attention


class MultiHeadAttention(nnx.Module):
  """[B, T, D] -> [B, T, D]: q/k/v projections, rotary positions, any registered family, output projection.

  As `layers.MultiHeadAttention` (same params: query / key / value kernels [D, N|K, H], out [N, H, D]).
  `attention` names the family (`efficient_attn.attention.names()`), `attention_options` its typed
  options (a mapping or the family's options dataclass; None = defaults), checked here. A family
  with buffers (the Performer) draws them now from `rngs.params()` into `self.buffers` (a `Buffer`);
  `redraw_buffers(key)` draws them anew (FAVOR+ redraws during training).

  Call: `mha(x_BTD, segment_ids=None, positions=None)`; positions default to the position inside
  each segment. Decoding: `mha.init_cache(B, max_len)` once, then `mha(x_BTD, decode=True)` with
  one or more new tokens per call (rotary positions continue from the cache); token by token it
  equals the parallel causal forward. Cost: the family's (softmax O(T²), linear O(T), ...).
  Context parallelism: under a mesh with a `context` axis (`jax.set_mesh`) the attention runs on the
  sequence split over it; x, segment_ids and positions (required then) come in `context_layout`
  order (`attention.context.lay_out_example`).
  """

  def __init__(self, num_heads: int, in_features: int, *, num_kv_heads: int | None = None,
               attention: str = "softmax", attention_options=None, is_causal: bool = True,
               rope_base: float | None = 10_000.0, dtype=jnp.float32, param_dtype=jnp.float32,
               context_layout: str = "zigzag", short_conv: int = 0, rngs: nnx.Rngs):
    N, K, D = num_heads, num_kv_heads or num_heads, in_features
    if D % N:
      raise ValueError(f"MultiHeadAttention: num_heads={N} does not divide in_features={D}.")
    if N % K:
      raise ValueError(f"MultiHeadAttention: num_kv_heads={K} does not divide num_heads={N}.")
    family = attention_lib.get(attention)
    self.attention, self.options = family.name, family.make_options(attention_options)
    self.num_heads, self.num_kv_heads, self.head_dim = N, K, D // N
    self.is_causal, self.rope_base, self.dtype = is_causal, rope_base, dtype
    self.context_layout = context_layout
    H = self.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = Projection((D,), (N, H), ("embed", "heads", "head_dim"), **kw)
    self.key = Projection((D,), (K, H), ("embed", "kv_heads", "head_dim"), **kw)
    self.value = Projection((D,), (K, H), ("embed", "kv_heads", "head_dim"), **kw)
    self.out = Projection((N, H), (D,), ("heads", "head_dim", "embed"), **kw)
    # The short convolution on q / k / v (`attention.short_conv`), params as Linen's: NAME_conv [k, n, H].
    self.short_conv = short_conv
    if short_conv:
      init = short_conv_lib.weight_init(short_conv)
      for name, n, axis in (("query", N, "heads"), ("key", K, "kv_heads"), ("value", K, "kv_heads")):
        setattr(self, f"{name}_conv", _param(init, rngs.params(), (short_conv, n, H), param_dtype,
                                             ("conv", axis, "head_dim")))
    # Per-token input params (gates, β: `Family.inputs`) sit beside the projections, as in Linen.
    self.input_names = ()
    if family.inputs is not None:
      spec = family.input_params(self.options, self._shape(1), D)
      self.input_names = tuple(spec)
      for name, (shape, axes, init) in spec.items():
        setattr(self, name, _param(init, rngs.params(), shape, param_dtype, axes))
    self.buffers = nnx.data(None)
    if family.buffers is not None:
      self.buffers = Buffer(self._draw_buffers(rngs.params()))
    self.cache = nnx.data(None)

  def _shape(self, T: int) -> attention_lib.Shape:
    return attention_lib.Shape(T, T, self.num_heads, self.num_kv_heads, self.head_dim, self.is_causal)

  def _draw_buffers(self, key) -> dict:
    return dict(attention_lib.get(self.attention).buffers(key, self.options, self._shape(1)))

  def redraw_buffers(self, key) -> None:
    """Draws this layer's buffers (the Performer's projection) anew from `key`; no-op without buffers."""
    if self.buffers is not None:
      self.buffers.set_value(self._draw_buffers(key))

  def family_kwargs(self, T: int) -> dict:
    """The family's keyword arguments at length T: prepared options (cached per shape) + buffers."""
    kw = attention_lib.get(self.attention).call_kwargs(self.options, self._shape(T))
    if self.buffers is not None:
      kw.update(self.buffers.get_value())
    return kw

  def token_inputs(self, x_BTD) -> dict:
    """The family's per-token inputs [B, T, ...] computed from x (empty for most families)."""
    if not self.input_names:
      return {}
    params = {name: getattr(self, name)[...] for name in self.input_names}
    return attention_lib.get(self.attention).inputs(params, x_BTD, self.options, self._shape(x_BTD.shape[1]))

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> None:
    """An empty decoding state in `self.cache` (nnx.Cache): a KV cache of `max_len` positions
    (softmax; local keeps a window), or the recurrent state (linear, Performer)."""
    if not self.is_causal:
      raise ValueError("MultiHeadAttention.init_cache: decoding is causal; this layer has is_causal=False.")
    kw = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}
    kw.update(self.family_kwargs(1))
    state = attention_lib.init_decode_state(self.attention, batch, self.num_kv_heads, self.head_dim,
                                            max_len=max_len, dtype=dtype, **kw)
    conv = None
    if self.short_conv:
      conv = {n: short_conv_lib.init_short_conv_state(batch, self.short_conv, c * self.head_dim, dtype)
              for n, c in (("q", self.num_heads), ("k", self.num_kv_heads), ("v", self.num_kv_heads))}
    self.cache = nnx.Cache({"state": state, "index": jnp.zeros((), jnp.int32), "conv": conv})

  def _conv(self, name: str, x_BTnH, segment_ids, state):
    """x through its short convolution and SiLU; with a decoding `state` [B, k − 1, n·H] also the new one."""
    B, T, n, H = x_BTnH.shape
    w = jnp.asarray(getattr(self, f"{name}_conv")[...], self.dtype).reshape(self.short_conv, n * H)
    x = x_BTnH.reshape(B, T, n * H)
    if state is None:
      y = short_conv_lib.short_conv(x, w, segment_ids, context_layout=self.context_layout)
    else:  # one or several new tokens after the state's
      y, state = short_conv_lib.short_conv_step(x, w, state)
    return nnx.silu(y).reshape(B, T, n, H), state

  def __call__(self, x_BTD, segment_ids=None, positions=None, *, decode: bool = False):
    B, T, _ = x_BTD.shape
    q, k, v = self.query(x_BTD), self.key(x_BTD), self.value(x_BTD)
    if decode:
      if self.cache is None:
        raise ValueError("MultiHeadAttention(decode=True): call init_cache(batch, max_len) first.")
      if segment_ids is not None:
        raise ValueError("MultiHeadAttention(decode=True): segment_ids are not supported while decoding.")
      index = self.cache["index"]
      if self.short_conv:
        conv = self.cache["conv"]
        (q, cq), (k, ck), (v, cv) = (self._conv("query", q, None, conv["q"]), self._conv("key", k, None, conv["k"]),
                                     self._conv("value", v, None, conv["v"]))
        self.cache["conv"] = {"q": cq, "k": ck, "v": cv}
      if positions is None:
        positions = jnp.broadcast_to(index + jnp.arange(T), (B, T))
    elif positions is None:
      positions = segment_positions(segment_ids) if segment_ids is not None else jnp.broadcast_to(jnp.arange(T), (B, T))
    if self.short_conv and not decode:
      q, k, v = (self._conv("query", q, segment_ids, None)[0], self._conv("key", k, segment_ids, None)[0],
                 self._conv("value", v, segment_ids, None)[0])
    if self.rope_base:
      q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
    inputs = self.token_inputs(x_BTD)
    if decode:
      out = self._decode(q, k, v, inputs)
    else:
      out = attention_lib.attend(self.attention, q, k, v, is_causal=self.is_causal, segment_ids=segment_ids,
                                 context_layout=self.context_layout, **self.family_kwargs(T), **inputs)
    return self.out(out)

  def _decode(self, q_BTNH, k_BTKH, v_BTKH, inputs=None):
    """T decoding steps from the cache (a scan over tokens); updates the cache."""
    kw = self.family_kwargs(1)

    def step(state, xs):
      (q1, k1, v1), extra = jax.tree.map(lambda a: a[:, None], xs)  # one token, its inputs too
      out, state = attention_lib.decode_step(self.attention, state, q1, k1, v1, **kw, **extra)
      return state, out[:, 0]

    cache = self.cache.get_value()
    xs = (tuple(jnp.swapaxes(a, 0, 1) for a in (q_BTNH, k_BTKH, v_BTKH)),
          {n: jnp.swapaxes(a, 0, 1) for n, a in (inputs or {}).items()})
    state, out_TBNH = jax.lax.scan(step, cache["state"], xs)
    self.cache.set_value({**self.cache.get_value(), "state": state, "index": cache["index"] + q_BTNH.shape[1]})
    return jnp.swapaxes(out_TBNH, 0, 1)


# ----------------------------------------------------------------------------- feed-forward


class FeedForward(nnx.Module):
  """[B, T, D] -> [B, T, D]: GELU MLP, or SwiGLU (Shazeer 2020) with `activation="swiglu"`; as `layers.FeedForward`."""

  def __init__(self, in_features: int, hidden_dim: int, *, activation: str = "gelu", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if activation not in ("gelu", "swiglu"):
      raise ValueError(f"FeedForward: activation={activation!r} is not 'gelu' or 'swiglu'.")
    D, F, kw = in_features, hidden_dim, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.activation = activation
    self.w_in = Projection((D,), (F,), ("embed", "mlp"), **kw)
    self.w_gate = Projection((D,), (F,), ("embed", "mlp"), **kw) if activation == "swiglu" else nnx.data(None)
    self.w_out = Projection((F,), (D,), ("mlp", "embed"), **kw)

  def __call__(self, x_BTD):
    h = self.w_in(x_BTD)
    h = jax.nn.silu(self.w_gate(x_BTD)) * h if self.w_gate is not None else nn.gelu(h)
    return self.w_out(h)


class MoEFeedForward(nnx.Module):
  """Mixture-of-experts feed-forward layer: [B, T, D] -> [B, T, D] (see `efficient_attn.moe.moe_ffn`).

  As `layers.MoEFeedForward` (same params: router [D, E], w_in / w_gate [E, D, F], w_out [E, F, D],
  shared_w_* with `shared_hidden_dim`). Routing: float32 router (+ jitter when not deterministic)
  -> top-k experts per token, or top-C tokens per expert -> capacity slots or dropless sort ->
  experts (sharded over `mesh`'s `expert_axis` if a mesh is given) -> gate-weighted combine.

  Aux losses: every call overwrites `self.aux` (a `MoEAux` variable holding moe_ffn's aux dict:
  load_balancing_loss, router_z_loss, dropped_fraction, expert_fraction [E], router_entropy,
  router_confidence); nothing accumulates across calls. Read it with `moe.aux.get_value()`,
  `collect_aux(model)` (mean over a model's MoE layers) or `nnx.state(model, MoEAux)`, or call
  with `return_aux=True` to get `(y, aux)`. A typical loss adds 0.01 · load_balancing_loss +
  0.001 · router_z_loss.

  Jitter draws from `rngs` (its "dropout" stream) when `deterministic` is False (the attribute,
  `nnx.view(model, deterministic=...)`, or the call's keyword); with jitter=0 it has no effect.
  """

  def __init__(self, in_features: int, num_experts: int, hidden_dim: int, *, top_k: int = 1,
               capacity_factor: float = 1.25, router: str = "tokens_choose", dropless: bool = False,
               jitter: float = 0.0, activation: str | Callable = "gelu", glu: bool = False,
               shared_hidden_dim: int = 0, mesh: Any = None, expert_axis: str = "expert", dtype=None,
               param_dtype=jnp.float32, deterministic: bool = False, rngs: nnx.Rngs):
    D, E, F = in_features, num_experts, hidden_dim
    check_options(E, top_k=top_k, capacity_factor=capacity_factor, router=router, dropless=dropless,
                  jitter=jitter, fn="MoEFeedForward")
    resolve_activation(activation, "MoEFeedForward")
    self.options = dict(top_k=top_k, capacity_factor=capacity_factor, router=router, dropless=dropless,
                        jitter=jitter, activation=activation, expert_axis=expert_axis)
    self.mesh, self.dtype, self.deterministic = mesh, dtype, deterministic
    expert, router_init = _expert_init(1.0), _expert_init(0.1)  # Switch §2.4: a smaller router init
    squeeze = lambda init: lambda key, shape, dtype: init(key, (1, *shape), dtype)[0]  # noqa: E731
    p = lambda init, shape, axes: _param(init, rngs.params(), shape, param_dtype, axes)  # noqa: E731
    self.router = p(squeeze(router_init), (D, E), ("embed", "expert"))
    self.w_in = p(expert, (E, D, F), ("expert", "embed", "mlp"))
    self.w_out = p(expert, (E, F, D), ("expert", "mlp", "embed"))
    self.w_gate = p(expert, (E, D, F), ("expert", "embed", "mlp")) if glu else nnx.data(None)
    self.shared_w_in = self.shared_w_out = self.shared_w_gate = nnx.data(None)
    if shared_hidden_dim:
      Fs = shared_hidden_dim
      self.shared_w_in = p(squeeze(expert), (D, Fs), ("embed", "mlp"))
      self.shared_w_out = p(squeeze(expert), (Fs, D), ("mlp", "embed"))
      if glu:
        self.shared_w_gate = p(squeeze(expert), (D, Fs), ("embed", "mlp"))
    self.rngs = rngs["dropout"].fork() if jitter > 0 else nnx.data(None)
    x = jax.ShapeDtypeStruct((1, 1, D), jnp.float32)
    shapes = jax.eval_shape(lambda x, p: moe_ffn(x, p, **self.options)[1], x, self._params())  # no mesh: same aux
    self.aux = MoEAux(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

  def _params(self) -> dict:
    names = ("router", "w_in", "w_out", "w_gate", "shared_w_in", "shared_w_out", "shared_w_gate")
    return {n: getattr(self, n)[...] for n in names if getattr(self, n) is not None}

  def _ffn_options(self) -> dict:
    return {**self.options, "mesh": self.mesh}

  def set_view(self, deterministic: bool | None = None):
    """For `nnx.view(model, deterministic=...)`."""
    if deterministic is not None:
      self.deterministic = deterministic

  def __call__(self, x_BTD, *, deterministic: bool | None = None, return_aux: bool = False):
    deterministic = self.deterministic if deterministic is None else deterministic
    dtype = self.dtype or x_BTD.dtype
    params = {k: (v if k == "router" else v.astype(dtype)) for k, v in self._params().items()}
    rng = self.rngs() if self.rngs is not None and not deterministic else None
    y_BTD, aux = moe_ffn(x_BTD.astype(dtype), params, rng=rng, **self._ffn_options())
    self.aux.set_value(aux)
    return (y_BTD, aux) if return_aux else y_BTD


def collect_aux(model: nnx.Module) -> dict:
  """The last call's aux of every `MoEFeedForward` in `model`, averaged over layers ({} without MoE)."""
  found = [m.aux.get_value() for _, m in nnx.iter_modules(model) if isinstance(m, MoEFeedForward)]
  return _collect_aux({"moe_aux": found})


# ----------------------------------------------------------------------------- block, Linen weights


class Block(nnx.Module):
  """Pre-norm transformer block: x + drop(attn(norm(x))), then x + drop(ffn(norm(x))); as `layers.Block`.

  `num_experts` > 0 makes the FFN a `MoEFeedForward` (`moe_options`: its keywords, e.g. top_k);
  `attention_options`: the family's options. drop: residual dropout at rate `dropout` (an
  `nnx.Dropout`, on by default as NNX's; `nnx.view(model, deterministic=True)` turns it and the MoE
  jitter off; never while decoding). Decoding: `init_cache` then `block(x, decode=True)`.
  """

  def __init__(self, d_model: int, num_heads: int, ffn_dim: int, *, num_kv_heads: int | None = None,
               attention: str = "softmax", attention_options=None, is_causal: bool = True,
               rope_base: float | None = 10_000.0, ffn_activation: str = "gelu", num_experts: int = 0,
               moe_options: dict | None = None, dropout: float = 0.0, dtype=jnp.float32, short_conv: int = 0,
               rngs: nnx.Rngs):
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout else None)
    self.attention_norm = RMSNorm(d_model, dtype=dtype)
    self.attention = MultiHeadAttention(num_heads, d_model, num_kv_heads=num_kv_heads, attention=attention,
                                        attention_options=attention_options, is_causal=is_causal,
                                        rope_base=rope_base, dtype=dtype, short_conv=short_conv, rngs=rngs)
    self.ffn_norm = RMSNorm(d_model, dtype=dtype)
    if num_experts:
      glu = ffn_activation == "swiglu"
      self.moe = MoEFeedForward(d_model, num_experts, ffn_dim, glu=glu, activation="silu" if glu else "gelu",
                                dtype=dtype, rngs=rngs, **(moe_options or {}))
    else:
      self.ffn = FeedForward(d_model, ffn_dim, activation=ffn_activation, dtype=dtype, rngs=rngs)

  def token_inputs(self, x_BTD) -> dict:
    """The family's per-token inputs [B, T, ...] computed from x (empty for most families)."""
    if not self.input_names:
      return {}
    params = {name: getattr(self, name)[...] for name in self.input_names}
    return attention_lib.get(self.attention).inputs(params, x_BTD, self.options, self._shape(x_BTD.shape[1]))

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> None:
    self.attention.init_cache(batch, max_len, dtype)

  def __call__(self, x_BTD, segment_ids=None, positions=None, *, decode: bool = False):
    drop = (lambda y: y) if decode else self.dropout  # noqa: E731
    x_BTD = x_BTD + drop(self.attention(self.attention_norm(x_BTD), segment_ids, positions, decode=decode))
    ffn = self.moe if hasattr(self, "moe") else self.ffn
    return x_BTD + drop(ffn(self.ffn_norm(x_BTD)))


def load_linen(module: nnx.Module, variables) -> nnx.Module:
  """Copies a Linen module's variables into the NNX `module` of the same structure, in place.

  `variables`: `{"params": ...[, "buffers": ...]}` (or bare params) from the `layers.py` module
  that this one mirrors (`layers.MultiHeadAttention`, `MoEFeedForward`, `FeedForward`, `Block`):
  the param paths are the same. Attention buffers come from the "buffers" collection.
  A missing path or a shape that differs is a ValueError naming it.
  """
  variables = nn.meta.unbox(dict(variables))
  params = variables.get("params", variables)
  linen_buffers = variables.get("buffers", {})

  def lookup(tree, path, what):
    for name in path:
      if not isinstance(tree, dict) or name not in tree:
        raise ValueError(f"load_linen: the Linen {what} have no {'/'.join(map(str, path))}.")
      tree = tree[name]
    return tree

  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Param):
      value = jnp.asarray(lookup(params, path, "params"))
      if value.shape != node[...].shape:
        raise ValueError(f"load_linen: {'/'.join(map(str, path))} has shape {value.shape} in the Linen params,"
                         f" {node[...].shape} here.")
      node.set_value(value.astype(node[...].dtype))
    elif isinstance(node, MultiHeadAttention) and node.buffers is not None:
      node.buffers.set_value(dict(lookup(linen_buffers, (*path, node.attention), "buffers")))
  return module


__all__ = ["MultiHeadAttention", "MoEFeedForward", "FeedForward", "RMSNorm", "Block", "Projection", "Buffer",
           "MoEAux", "collect_aux", "load_linen", "param_shardings"]
