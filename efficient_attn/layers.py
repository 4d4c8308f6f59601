"""Thin Flax Linen modules over the pure functions: they create params (with logical
axis names for `sharding.py`'s rules) and call the maths.

Logical axes: "embed" (D), "mlp" (F), "expert" (E), "heads" (N), "kv_heads" (K),
"head_dim" (H), "vocab" (V).

Modules: `MultiHeadAttention` (any registered family + rotary positions; `redraw_buffers`),
`FeedForward` (GELU / SwiGLU), `MoEFeedForward`, `RMSNorm`, and the pre-norm `Block`.
"""

from __future__ import annotations

import math

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficient_attn import attention as attention_lib
from efficient_attn.attention import short_conv as short_conv_lib
from efficient_attn.moe import moe_ffn


def _expert_init(scale: float = 1.0):
  """Fan-in truncated normal for [E, fan_in, fan_out] weights (each expert initialised like a dense layer)."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                          batch_axis=(0,))


class MoEFeedForward(nn.Module):
  """Mixture-of-experts feed-forward layer: [B, T, D] -> [B, T, D] (see `efficient_attn.moe.moe_ffn`).

  Routing steps: float32 router (+ jitter in training) -> top-k experts per token, or
  top-C tokens per expert -> capacity slots or dropless sort -> experts (sharded over
  `mesh`'s `expert_axis` if a mesh is given) -> gate-weighted combine (+ shared expert).

  Params (logical axes): router [D, E] ("embed", "expert"); w_in, w_gate [E, D, F]
  ("expert", "embed", "mlp"); w_out [E, F, D] ("expert", "mlp", "embed"); with
  `shared_hidden_dim` > 0, shared_w_in / shared_w_gate [D, Fs] ("embed", "mlp") and
  shared_w_out [Fs, D] ("mlp", "embed").

  Returns y only, so it drops in for a dense FFN. The auxiliary losses and telemetry
  (`moe_ffn`'s aux dict: load_balancing_loss, router_z_loss, dropped_fraction,
  expert_fraction [E], router_entropy, router_confidence) are sown as
  `self.sow("intermediates", "moe_aux", aux)`. Collect them with
  `y, state = model.apply(variables, x, mutable=["intermediates"])` and
  `efficient_attn.moe.collect_aux(state["intermediates"])` (mean over MoE layers); without
  a mutable "intermediates" collection nothing is stored.

  Jitter noise is drawn from the `rng_collection` stream ("dropout") when
  `deterministic=False`; with `deterministic=True` (default) the router is deterministic.
  """
  num_experts: int
  hidden_dim: int
  top_k: int = 1
  capacity_factor: float = 1.25
  router: str = "tokens_choose"
  dropless: bool = False
  jitter: float = 0.0
  activation: str | Callable = "gelu"
  glu: bool = False
  shared_hidden_dim: int = 0
  mesh: Any = None
  expert_axis: str = "expert"
  dtype: Any = None  # computation dtype of the experts; None = the input's
  param_dtype: Any = jnp.float32
  kernel_init: Callable = _expert_init(1.0)
  router_init: Callable = _expert_init(0.1)  # Switch §2.4: smaller init for stability
  rng_collection: str = "dropout"

  def _param(self, name, axes, shape, init):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool = True):
    D, E, F = x_BTD.shape[-1], self.num_experts, self.hidden_dim
    router_init = lambda key, shape, dtype: self.router_init(key, (1, *shape), dtype)[0]
    params = {
        "router": self._param("router", ("embed", "expert"), (D, E), router_init),
        "w_in": self._param("w_in", ("expert", "embed", "mlp"), (E, D, F), self.kernel_init),
        "w_out": self._param("w_out", ("expert", "mlp", "embed"), (E, F, D), self.kernel_init),
    }
    if self.glu:
      params["w_gate"] = self._param("w_gate", ("expert", "embed", "mlp"), (E, D, F), self.kernel_init)
    if self.shared_hidden_dim:
      Fs = self.shared_hidden_dim
      shared_init = lambda key, shape, dtype: self.kernel_init(key, (1, *shape), dtype)[0]
      params["shared_w_in"] = self._param("shared_w_in", ("embed", "mlp"), (D, Fs), shared_init)
      params["shared_w_out"] = self._param("shared_w_out", ("mlp", "embed"), (Fs, D), shared_init)
      if self.glu:
        params["shared_w_gate"] = self._param("shared_w_gate", ("embed", "mlp"), (D, Fs), shared_init)
    dtype = self.dtype or x_BTD.dtype
    params = {k: (v if k == "router" else v.astype(dtype)) for k, v in params.items()}
    rng = None
    if self.jitter > 0 and not deterministic:
      rng = self.make_rng(self.rng_collection)
    y_BTD, aux = moe_ffn(
        x_BTD.astype(dtype), params, top_k=self.top_k, capacity_factor=self.capacity_factor,
        router=self.router, dropless=self.dropless, jitter=self.jitter, rng=rng,
        activation=self.activation, mesh=self.mesh, expert_axis=self.expert_axis)
    self.sow("intermediates", "moe_aux", aux)
    return y_BTD


# ----------------------------------------------------------------------------- attention, FFN, block


def rope(x_BTNH, positions_BT, base: float):
  """Rotary position embedding (Su et al. 2021), half-split convention, computed in float32."""
  H = x_BTNH.shape[-1]
  half = H // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
  x1, x2 = x_BTNH[..., :half].astype(jnp.float32), x_BTNH[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def segment_positions(segment_ids_BT):
  """Position of each token inside its segment (packed rows restart positions at 0)."""
  T = segment_ids_BT.shape[1]
  t = jnp.arange(T)[None, :]
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  start_BT = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
  return t - start_BT


class Projection(nn.Module):
  """Bias-free linear map of the last `in_dims` axes to `features` ([..., *in] -> [..., *features]).

  The kernel [*in, *features] carries logical axis names. The product runs as one
  2-D matmul ([rows, in] @ [in, out]): XLA:CPU runs a batched 3-D dot about 2x slower.
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]
  in_dims: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_in, n_out = self.in_dims, len(self.features)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    in_shape = x.shape[x.ndim - n_in:]
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), (*in_shape, *self.features))
    k_in, k_out = math.prod(in_shape), math.prod(self.features)
    y = x.reshape(-1, k_in).astype(self.dtype) @ kernel.reshape(k_in, k_out).astype(self.dtype)
    return y.reshape(*x.shape[:x.ndim - n_in], *self.features)


def _dense(features, axes, name, dtype, in_axes=-1):
  features = (features,) if isinstance(features, int) else tuple(features)
  return Projection(features, axes, 1 if in_axes == -1 else len(in_axes), dtype, name=name)


class RMSNorm(nn.Module):
  """RMS normalisation (Zhang & Sennrich 2019); statistics in float32.

  The scale's logical axis is "norm" (replicated): sharding it like `embed` would pull
  the activations it multiplies onto the fsdp axis and force GSPMD into a full reshard.
  """
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.reshape((1,) * (x.ndim - 1) + scale.shape)).astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """[B, T, D] -> [B, T, D]: q/k/v projections, rotary positions, any registered family, output projection.

  `attention` names the family (`efficient_attn.attention.names()`); `options` are its typed
  options (its `Family.options` dataclass, or a mapping turned into it; None = defaults).
  A family with per-token inputs (`Family.inputs`: GLA / Mamba-2 gates, DeltaNet's β) declares
  their params here and computes them from x.
  A family with buffers (the Performer's projection) keeps them in the "buffers" collection,
  drawn at init from the "params" rng of this layer (so every layer draws its own), saved in
  checkpoints with the params and redrawn with `redraw_buffers`.
  Decoding: pass `decode_state` (from `init_decode_state`) and x of shape
  [B, 1, D] with `positions` [B, 1]; returns (y, new_state).
  Context parallelism: under a mesh with a `context` axis the attention runs on the sequence split
  over it; x, `segment_ids` and `positions` (required then: RoPE needs each token's own) must be
  in `context_layout` order (`attention.context.lay_out_example`).
  """
  num_heads: int
  num_kv_heads: int | None = None
  attention: str = "softmax"
  options: Any = None
  is_causal: bool = True
  rope_base: float | None = 10_000.0
  dtype: Any = jnp.float32
  context_layout: str = "zigzag"  # the token order under a mesh with a `context` axis (see `attention.attend`)
  short_conv: int = 0             # kernel of the depthwise causal convolution on q / k / v (+ SiLU); 0 = none

  def conv(self, name: str, x_BTnH, axis: str, segment_ids, state):
    """x [B, T, n, H] through its short convolution (params `NAME_conv` [k, n, H]) and SiLU; with a decoding
    `state` [B, k − 1, n·H] returns (y, new state)."""
    B, T, n, H = x_BTnH.shape
    k = self.short_conv
    w = self.param(f"{name}_conv", nn.with_logical_partitioning(short_conv_lib.weight_init(k),
                                                                 ("conv", axis, "head_dim")), (k, n, H))
    w = jnp.asarray(w, self.dtype).reshape(k, n * H)
    x = x_BTnH.reshape(B, T, n * H)
    if state is None:
      y = short_conv_lib.short_conv(x, w, segment_ids, context_layout=self.context_layout)
    else:
      y, state = short_conv_lib.short_conv_step(x, w, state)
    y = nn.silu(y).reshape(B, T, n, H)
    return y if state is None else (y, state)

  def family_kwargs(self, T: int, H: int) -> dict:
    """The family's keyword arguments at length T: prepared options (cached per shape) + this layer's buffers."""
    family = attention_lib.get(self.attention)
    options = family.make_options(self.options)
    shape = attention_lib.Shape(T, T, self.num_heads, self.num_kv_heads or self.num_heads, H, self.is_causal)
    kw = family.call_kwargs(options, shape)
    if family.buffers is not None:
      init = lambda: family.buffers(self.make_rng("params"), options, shape)  # noqa: E731
      kw.update(self.variable("buffers", family.name, init).value)
    return kw

  def token_inputs(self, x_BTD, H: int) -> dict:
    """The family's per-token inputs from x (gates, β: `Family.inputs`), its params declared here."""
    family = attention_lib.get(self.attention)
    if family.inputs is None:
      return {}
    options = family.make_options(self.options)
    shape = attention_lib.Shape(x_BTD.shape[1], x_BTD.shape[1], self.num_heads, self.num_kv_heads or self.num_heads,
                                H, self.is_causal)
    spec = family.input_params(options, shape, x_BTD.shape[-1])
    params = {name: self.param(name, nn.with_logical_partitioning(init, axes), shape_)
              for name, (shape_, axes, init) in spec.items()}
    return family.inputs(params, x_BTD, options, shape)

  @nn.compact
  def __call__(self, x_BTD, segment_ids=None, positions=None, decode_state=None):
    B, T, D = x_BTD.shape
    N, K = self.num_heads, self.num_kv_heads or self.num_heads
    if D % N:
      raise ValueError(f"MultiHeadAttention: num_heads={N} does not divide the model dim D={D}.")
    H = D // N
    q = _dense((N, H), ("embed", "heads", "head_dim"), "query", self.dtype)(x_BTD)
    k = _dense((K, H), ("embed", "kv_heads", "head_dim"), "key", self.dtype)(x_BTD)
    v = _dense((K, H), ("embed", "kv_heads", "head_dim"), "value", self.dtype)(x_BTD)
    conv_state = None
    if self.short_conv:
      if decode_state is not None:
        decode_state, old = decode_state
        (q, sq), (k, sk), (v, sv) = (self.conv("query", q, "heads", None, old["q"]),
                                     self.conv("key", k, "kv_heads", None, old["k"]),
                                     self.conv("value", v, "kv_heads", None, old["v"]))
        conv_state = {"q": sq, "k": sk, "v": sv}
      else:
        q, k, v = (self.conv("query", q, "heads", segment_ids, None), self.conv("key", k, "kv_heads", segment_ids, None),
                   self.conv("value", v, "kv_heads", segment_ids, None))
    if positions is None:
      positions = segment_positions(segment_ids) if segment_ids is not None else jnp.broadcast_to(jnp.arange(T), (B, T))
    if self.rope_base:
      q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
    kw = {**self.family_kwargs(T, H), **self.token_inputs(x_BTD, H)}
    if decode_state is None:
      out = attention_lib.attend(self.attention, q, k, v, is_causal=self.is_causal, segment_ids=segment_ids,
                                 context_layout=self.context_layout, **kw)
    else:
      out, decode_state = attention_lib.decode_step(self.attention, decode_state, q, k, v, **kw)
      if self.short_conv:
        decode_state = (decode_state, conv_state)
    y = _dense(D, ("heads", "head_dim", "embed"), "out", self.dtype, in_axes=(-2, -1))(out)
    return y if decode_state is None else (y, decode_state)


def redraw_buffers(module: nn.Module, variables, rng, *args, **kwargs):
  """`variables` with every attention buffer (the Performer's projection, ...) drawn anew from `rng`.

  FAVOR+ redraws its random features during training (Choromanski et al. 2021, §4);
  this is the user-code form of `train.redraw_every`. `args` / `kwargs` are an example
  input of `module` (only their shapes matter: under `jax.jit` the forward pass is dead
  code and never runs). Each layer draws its own features from `rng` folded with its path.
  """
  if "buffers" not in variables:
    return variables
  rest = {k: v for k, v in variables.items() if k != "buffers"}
  _, fresh = module.apply(rest, *args, rngs={"params": rng}, mutable=["buffers"], **kwargs)
  return {**rest, "buffers": fresh["buffers"]}


class FeedForward(nn.Module):
  """[B, T, D] -> [B, T, D]: GELU MLP, or SwiGLU (Shazeer 2020) with `activation="swiglu"`."""
  hidden_dim: int
  activation: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    if self.activation not in ("gelu", "swiglu"):
      raise ValueError(f"FeedForward: activation={self.activation!r} is not 'gelu' or 'swiglu'.")
    D = x_BTD.shape[-1]
    h = _dense(self.hidden_dim, ("embed", "mlp"), "w_in", self.dtype)(x_BTD)
    if self.activation == "swiglu":
      h = nn.silu(_dense(self.hidden_dim, ("embed", "mlp"), "w_gate", self.dtype)(x_BTD)) * h
    else:
      h = nn.gelu(h)
    return _dense(D, ("mlp", "embed"), "w_out", self.dtype)(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + drop(attn(norm(x))), then x + drop(ffn(norm(x))) (dense or MoE).

  `config` is a `config.ModelConfig`; `use_moe` picks `MoEFeedForward`, whose aux
  losses are sown into the "intermediates" collection (see `moe.collect_aux`).
  drop: residual dropout at rate `config.dropout` (Vaswani et al. 2017, §5.4), active only
  when the caller passes a "dropout" rng (`apply(..., rngs={"dropout": key})`, as training
  does); without one (evaluation, decoding) it is the identity.
  In decode mode (`decode_state` given) returns (x, new_state).
  """
  config: Any
  use_moe: bool = False
  is_causal: bool = True
  mesh: Any = None
  context_layout: str = "zigzag"

  @nn.compact
  def __call__(self, x_BTD, segment_ids=None, positions=None, decode_state=None):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    attn = MultiHeadAttention(c.num_heads, c.num_kv_heads or None, c.attention, c.options, self.is_causal,
                              c.rope_base, dtype, self.context_layout, c.conv_kernel, name="attention")
    training = c.dropout > 0 and self.has_rng("dropout")
    drop = (lambda y: nn.Dropout(c.dropout, deterministic=False)(y)) if training else (lambda y: y)  # noqa: E731
    h = RMSNorm(dtype=dtype, name="attention_norm")(x_BTD)
    if decode_state is None:
      x_BTD = x_BTD + drop(attn(h, segment_ids, positions))
    else:
      a, decode_state = attn(h, segment_ids, positions, decode_state)
      x_BTD = x_BTD + a
    h = RMSNorm(dtype=dtype, name="ffn_norm")(x_BTD)
    if self.use_moe:
      ffn = MoEFeedForward(c.num_experts, c.expert_dim or c.ffn_dim, top_k=c.top_k,
                           capacity_factor=c.capacity_factor, router=c.router, dropless=c.dropless, glu=c.ffn_activation == "swiglu",
                           activation="silu" if c.ffn_activation == "swiglu" else "gelu", mesh=self.mesh,
                           dtype=dtype, name="moe")
    else:
      ffn = FeedForward(c.ffn_dim, c.ffn_activation, dtype, name="ffn")
    x_BTD = x_BTD + drop(ffn(h))
    return x_BTD if decode_state is None else (x_BTD, decode_state)
