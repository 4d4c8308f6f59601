"""Attention families as pure JAX functions with `jax.nn.dot_product_attention`'s convention.

    out_BTNH = fn(query_BTNH, key_BSKH, value_BSKH, bias=None, mask=None, *,
                  is_causal=False, segment_ids=None, scale=None, **family_options)

Families (one per file, each defining a `FAMILY` record, see `registry.py`): softmax
(exact; xla / chunked / cudnn), local (sliding window), sparse (block-sparse layouts),
linear (kernelized, chunkwise-parallel), performer (FAVOR+ random features on the
linear core); on the decay-gated core `gated_linear_attention` (gated.py): retnet, gla,
mamba2; on the delta-rule core `delta_rule_attention` (delta.py): deltanet,
gated_deltanet; based (Taylor features on the linear core + a sliding window).
Every module of this package that defines `FAMILY` is registered on import, so a new
built-in family is one new file; a user's family is
`register(Family(name="mine", fn=my_attention))` in their own file.

Decoding: `init_decode_state(kind, ...)` and `decode_step(kind, state, ...)` give
token-by-token generation equal to the parallel causal forward: a KV cache for
softmax / local, a constant-size recurrent state (Σφ(k)vᵀ, Σφ(k)) for linear and
Performer.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from efficient_attn.attention import context, masks
from efficient_attn.attention.delta import delta_rule_attention, delta_step
from efficient_attn.attention.gated import gated_init_state, gated_linear_attention, gated_step
from efficient_attn.attention.linear import linear_attention, linear_init_state, linear_step
from efficient_attn.attention.local import local_attention
from efficient_attn.attention.performer import performer_attention, performer_projection, performer_step
from efficient_attn.attention.registry import ATTENTION, FAMILIES, Family, NoOptions, Shape, get, names, register
from efficient_attn.attention.softmax import softmax_attention, softmax_weights
from efficient_attn.attention.softmax_decode import softmax_init_state, softmax_step
from efficient_attn.attention.sparse import block_sparse_attention
from efficient_attn.errors import did_you_mean

_NOT_FAMILIES = ("context", "masks", "registry")


def _register_builtins() -> None:
  """Registers the `FAMILY` of every public module of this package (built-ins first, in name order
  after the classic five)."""
  order = ["softmax", "local", "sparse", "linear", "performer"]
  found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
                 and m.name not in _NOT_FAMILIES)
  for name in order + [n for n in found if n not in order]:
    module = importlib.import_module(f"{__name__}.{name}")
    if hasattr(module, "FAMILY"):
      register(module.FAMILY, replace=True)


_register_builtins()


def attend(kind: str, query, key, value, bias=None, mask=None, *, context_layout: str = "zigzag", **kw):
  """Runs the registered attention family `kind` (see `names()`) with its own keyword options.

  Under a mesh (`jax.set_mesh`) with a `context` axis of size P > 1, the sequence is split over it
  (context parallelism, `context.split_call`): query / key / value and every [B, T, ...] keyword array
  must already be in `context_layout` order ("zigzag" | "contiguous"; the trainer's data pipeline lays
  tokens out once, `context.lay_out_example`), and the output comes back in that order. A family
  without a context rule (`Family.context`), a bias or a mask is refused there in one sentence.
  """
  family = get(kind)
  shards = context.mesh_shards()
  if shards == 1:
    return family.fn(query, key, value, bias, mask, **kw)
  if family.context is None:
    raise ValueError(f"attend: attention family {kind!r} has no context-parallel rule (its Family sets no"
                     f" `context` hook), so it cannot run with the sequence split over the mesh's {shards}"
                     " context devices; use a mesh without a context axis or give the family one.")
  if bias is not None or mask is not None:
    raise ValueError(f"attend({kind!r}): a bias or mask cannot be split over the mesh's {shards} context devices;"
                     " pass segment_ids (packing) and is_causal instead.")
  return context.split_call(family.fn, query, key, value, context_layout=context_layout, **kw)


def flax_attention_fn(kind: str = "softmax", **opts) -> Callable[..., Any]:
  """An `attention_fn` for `flax.linen.MultiHeadDotProductAttention` / `flax.nnx.MultiHeadAttention`.

  The returned function takes what Flax's own `dot_product_attention` takes, in its order:
  `(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
  dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None)` plus
  the keywords Linen / NNX pass (`is_causal`, `force_fp32_for_softmax`, `promote_dtype`,
  `einsum_dot_general`, `qk_attn_weights_einsum`, `attn_weights_value_einsum`), with
  Flax's semantics:
  - shapes [batch..., length, heads, features] with any number of batch dims (none too);
  - `mask` may be bool, int or float (Flax's `make_attention_mask` / `make_causal_mask` /
    `combine_masks` return float32): nonzero = may attend;
  - dropout on the attention weights when `not deterministic and dropout_rate > 0`
    (`deterministic` defaults to False, as Flax's); softmax family only (xla and chunked
    paths draw the same mask for the same rng), other families refuse it when it is
    actually requested;
  - inputs are cast to `dtype` (else promoted to their common type, or by `promote_dtype`);
  - `precision` applies to every matmul of the call (`jax.default_matmul_precision`);
  - `module` (Flax passes it when `sow_weights=True`): the softmax family sows its weights
    [batch..., heads, T, S] as 'attention_weights' in 'intermediates' (Linen) or
    `nnx.Intermediate` (NNX), before dropout, as Flax does;
  - `force_fp32_for_softmax`: softmax statistics are always float32 (float64 for float64
    inputs); with it, sowed weights are float32 as in Flax. A custom einsum / dot_general is
    refused with one sentence (this function owns its matmuls).
  - Flax's `decode=True` cache: one query (T == 1) facing the S cached keys under a mask is
    a decoding step; the query sits at the last key the mask lets it see, causality is that
    mask, and a family with a `decode_window` (local) applies its window back from that
    position, so generation equals the parallel causal forward for softmax, local, linear and
    performer.
  A query that sees no key outputs 0 (Flax's own function averages all values there).

  `opts` are the family's typed options (checked now, prepared for the shape of each call,
  e.g. `flax_attention_fn("sparse", block_size=16)` builds its layout for the length it is
  called with) and any other keyword of its function, e.g. `projection=` for the Performer
  or `is_causal=True`; `is_causal=True` from either the options or the caller (NNX passes
  it) makes it causal. Kernelized families (linear, performer) refuse a general [T, S] mask,
  so pass causality through `is_causal`, not a Flax causal mask.
  """
  family = get(kind)
  options = family.make_options({k: v for k, v in opts.items() if k in family.option_names})
  passthrough = {k: v for k, v in opts.items() if k not in family.option_names and k != "is_causal"}
  params = inspect.signature(family.fn).parameters
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    unknown = sorted(set(passthrough) - set(params))
    if unknown:
      valid = sorted(set(family.option_names) | {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY})
      raise ValueError(f"flax_attention_fn({kind!r}): unknown keyword(s) {unknown};{did_you_mean(unknown[0], valid)}"
                       f" the family's options and keywords are {valid}.")
  drops_out = "dropout_rate" in params
  what = f"flax_attention_fn({kind!r})"

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                   dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None, *,
                   force_fp32_for_softmax=False, einsum_dot_general=None, qk_attn_weights_einsum=None,
                   attn_weights_value_einsum=None, promote_dtype=None, is_causal=False):
    custom = [n for n, f in (("einsum_dot_general", einsum_dot_general), ("qk_attn_weights_einsum",
              qk_attn_weights_einsum), ("attn_weights_value_einsum", attn_weights_value_einsum)) if f is not None]
    if custom:
      raise ValueError(f"{what}: a custom {custom[0]} is not supported (the attention family computes its own"
                       " matmuls); use Flax's dot_product_attention for quantized einsums.")
    query, key, value = _promote(query, key, value, dtype, promote_dtype, what)
    if mask is not None:
      mask = jnp.asarray(mask)
      mask = mask if mask.dtype == jnp.bool_ else mask != 0
    causal = bool(opts.get("is_causal", False) or is_causal)
    shape = Shape(query.shape[-3], key.shape[-3], query.shape[-2], key.shape[-2], query.shape[-1], causal)
    kw = {**family.call_kwargs(options, shape), **passthrough}
    fn = family.fn
    if query.shape[-3] == 1 and key.shape[-3] > 1 and mask is not None:  # Flax's decode=True step
      window = None if family.decode_window is None else family.decode_window(options)
      if causal or window is not None:
        mask, causal = _decode_mask(mask, key.shape[-3], window), False
        if window is not None:  # the window is in the mask now: exact softmax over it
          fn, kw = softmax_attention, {}
    if not deterministic and dropout_rate > 0.0:
      if not drops_out:
        raise ValueError(f"{what}: attention family {kind!r} has no dropout (dropout_rate={dropout_rate},"
                         " deterministic=False); set dropout_rate=0.0 or deterministic=True, or use 'softmax'.")
      kw.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng, broadcast_dropout=broadcast_dropout)
    with _matmul_precision(precision, what):
      if module is not None:
        _sow_weights(module, family, fn, query, key, bias, mask, causal, kw, what, force_fp32_for_softmax)
      out = fn(query, key, value, bias, mask, is_causal=causal, **kw)
    return out.astype(query.dtype)

  return attention_fn


def _promote(query, key, value, dtype, promote_dtype, what):
  """Flax's promotion: all three cast to `dtype`, else to their common type (or by `promote_dtype`)."""
  if promote_dtype is not None:
    return promote_dtype((query, key, value), dtype=dtype)
  dtype = dtype or jnp.result_type(query, key, value)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(f"{what}: complex inputs ({jnp.dtype(dtype).name}) are not supported; attention takes real"
                     " floating point inputs.")
  return tuple(jnp.asarray(x, dtype) for x in (query, key, value))


def _decode_mask(mask, S: int, window):
  """The mask of a decoding step: the query sits at the last visible key; a window keeps
  the `window` keys ending there."""
  mask = mask.reshape((1,) * max(0, 3 - mask.ndim) + mask.shape)
  if window is None:
    return mask
  s_pos = lax.broadcasted_iota(jnp.int32, mask.shape[:-1] + (S,), mask.ndim - 1)
  full = jnp.broadcast_to(mask, mask.shape[:-1] + (S,))
  pos = jnp.max(jnp.where(full, s_pos, -1), axis=-1, keepdims=True)
  return full & (s_pos > pos - window)


class _matmul_precision:
  """Context: Flax's `precision` (None, a lax.Precision, its name, or an equal pair) for every matmul."""

  def __init__(self, precision, what):
    if isinstance(precision, (tuple, list)):
      if len(set(precision)) != 1:
        raise ValueError(f"{what}: `precision`={precision!r}: one precision for both operands is supported.")
      precision = precision[0]
    if isinstance(precision, lax.Precision):
      precision = precision.name.lower()
    self.ctx = None if precision is None else jax.default_matmul_precision(str(precision).lower())

  def __enter__(self):
    if self.ctx is not None:
      self.ctx.__enter__()

  def __exit__(self, *exc):
    return None if self.ctx is None else self.ctx.__exit__(*exc)


def _sow_weights(module, family, fn, query, key, bias, mask, causal, kw, what, force_fp32):
  """Sows the softmax weights [batch..., N, T, S] into `module` as Flax's dot_product_attention does
  (in the inputs' dtype, or float32 with `force_fp32_for_softmax`)."""
  if fn is not softmax_attention:
    raise ValueError(f"{what}: sow_weights needs materialised attention weights, which attention family"
                     f" {family.name!r} never forms; use 'softmax' to inspect weights.")
  weights = softmax_weights(query, key, bias, mask, is_causal=causal, segment_ids=kw.get("segment_ids"),
                            scale=kw.get("scale"), local_window_size=kw.get("local_window_size"))
  weights = weights.astype(jnp.float32 if force_fp32 else query.dtype)
  from flax import nnx  # a Linen module passes the collection by name, an NNX one by type
  if isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", weights)
  else:
    module.sow("intermediates", "attention_weights", weights)


def _decoding_family(kind: str, what: str) -> Family:
  family = get(kind)
  if not family.decodes:
    raise ValueError(f"{what}: attention family {kind!r} has no decoding state (it defines no init_state / step;"
                     " block-sparse layouts, for one, are not causal-decodable).")
  return family


def init_decode_state(kind: str, batch: int, num_kv_heads: int, head_dim: int, *, max_len: int | None = None,
                      dtype=None, **opts):
  """Empty decoding state for `kind`.

  softmax: a KV cache of `max_len` positions (required); local: a ring buffer of
  `window` positions. linear: state sized by the feature map (elu / relu keep H
  features). performer: sized by the projection's M (pass `projection=`).
  `opts` are the family's keyword arguments of the parallel call.
  """
  family = _decoding_family(kind, "init_decode_state")
  return family.init_state(batch, num_kv_heads, head_dim, max_len=max_len, dtype=dtype, **opts)


def decode_step(kind: str, state, query_B1NH, key_B1KH, value_B1KH, **opts):
  """One causal decoding step: returns (out_B1NH, new_state).

  `opts` are the family options of the parallel call (`window` for local,
  `feature_map` for linear, `projection` / `kernel` for performer, `scale`).
  """
  family = _decoding_family(kind, "decode_step")
  return family.step(state, query_B1NH, key_B1KH, value_B1KH, **opts)


__all__ = [
    "ATTENTION", "FAMILIES", "Family", "NoOptions", "Shape", "register", "get", "names",
    "attend", "flax_attention_fn", "init_decode_state", "decode_step", "masks",
    "softmax_attention", "softmax_weights", "local_attention", "block_sparse_attention", "linear_attention",
    "performer_attention", "performer_projection", "gated_linear_attention", "delta_rule_attention",
    # each family's own decoding functions (the shared API above dispatches to them)
    "softmax_init_state", "softmax_step", "linear_init_state", "linear_step", "performer_step",
    "gated_init_state", "gated_step", "delta_step",
]
