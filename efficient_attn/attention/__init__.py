"""Attention families as pure JAX functions with `jax.nn.dot_product_attention`'s convention.

    out_BTNH = fn(query_BTNH, key_BSKH, value_BSKH, bias=None, mask=None, *,
                  is_causal=False, segment_ids=None, scale=None, **family_options)

Families (one per file, each defining a `FAMILY` record, see `registry.py`): softmax
(exact; xla / chunked / cudnn), local (sliding window), sparse (block-sparse layouts),
linear (kernelized, chunkwise-parallel), performer (FAVOR+ random features on the
linear core). Every module of this package that defines `FAMILY` is registered on
import, so a new built-in family is one new file; a user's family is
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

from efficient_attn.attention import masks
from efficient_attn.attention.linear import linear_attention, linear_init_state, linear_step
from efficient_attn.attention.local import local_attention
from efficient_attn.attention.performer import performer_attention, performer_projection, performer_step
from efficient_attn.attention.registry import ATTENTION, FAMILIES, Family, NoOptions, Shape, get, names, register
from efficient_attn.attention.softmax import softmax_attention, softmax_init_state, softmax_step
from efficient_attn.attention.sparse import block_sparse_attention

_NOT_FAMILIES = ("masks", "registry", "bench")


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


def attend(kind: str, query, key, value, bias=None, mask=None, **kw):
  """Runs the registered attention family `kind` (see `names()`) with its own keyword options."""
  return get(kind).fn(query, key, value, bias, mask, **kw)


def flax_attention_fn(kind: str = "softmax", **opts) -> Callable[..., Any]:
  """An `attention_fn` for `flax.linen.MultiHeadDotProductAttention` / `flax.nnx.MultiHeadAttention`.

  Flax calls `attention_fn(query, key, value, bias=None, mask=None, *, dropout_rng,
  dropout_rate, broadcast_dropout, deterministic, dtype, precision, module)` with
  BTNH inputs (Flax says [batch..., length, heads, head_dim]). The Flax-only
  arguments are accepted and ignored (attention dropout is not applied; the
  returned function refuses a non-zero rate in non-deterministic mode rather
  than silently skipping it). `opts` are the family's typed options (checked now,
  prepared for the shape of each call, e.g. `flax_attention_fn("sparse", block_size=16)`
  builds its layout for the length it is called with) and any other keyword of its
  function, e.g. `projection=` for the Performer or `is_causal=True`; `is_causal=True`
  from either the options or the caller (NNX passes it) makes it causal. Kernelized
  families (linear, performer) refuse a general [T, S] mask, so pass causality through
  `is_causal`, not a Flax causal mask.
  """
  family = get(kind)
  options = family.make_options({k: v for k, v in opts.items() if k in family.option_names})
  passthrough = {k: v for k, v in opts.items() if k not in family.option_names and k != "is_causal"}
  params = inspect.signature(family.fn).parameters
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    unknown = sorted(set(passthrough) - set(params))
    if unknown:
      valid = sorted(set(family.option_names) | {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY})
      raise ValueError(f"flax_attention_fn({kind!r}): unknown keyword(s) {unknown}; the family's options and"
                       f" keywords are {valid}.")

  def attention_fn(query, key, value, bias=None, mask=None, *, dropout_rng=None, dropout_rate=0.0,
                   broadcast_dropout=True, deterministic=True, dtype=None, precision=None, module=None,
                   is_causal=False):
    del dropout_rng, broadcast_dropout, precision, module
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError(
          f"flax_attention_fn({kind!r}): attention dropout is not supported (got dropout_rate={dropout_rate});"
          " set dropout_rate=0.0 or deterministic=True.")
    causal = bool(opts.get("is_causal", False) or is_causal)
    shape = Shape(query.shape[-3], key.shape[-3], query.shape[-2], key.shape[-2], query.shape[-1], causal)
    kw = {**family.call_kwargs(options, shape), **passthrough}
    out = family.fn(query, key, value, bias, mask, is_causal=causal, **kw)
    return out if dtype is None else out.astype(dtype)

  return attention_fn


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
    "softmax_attention", "local_attention", "block_sparse_attention", "linear_attention",
    "performer_attention", "performer_projection",
    # each family's own decoding functions (the shared API above dispatches to them)
    "softmax_init_state", "softmax_step", "linear_init_state", "linear_step", "performer_step",
]
