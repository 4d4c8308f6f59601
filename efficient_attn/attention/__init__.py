"""Attention families as pure JAX functions with `jax.nn.dot_product_attention`'s convention.

    out_BTNH = fn(query_BTNH, key_BSKH, value_BSKH, bias=None, mask=None, *,
                  is_causal=False, segment_ids=None, scale=None, **family_options)

Families (one per file): softmax (exact; xla / chunked / cudnn), local (sliding
window), sparse (block-sparse layouts), linear (kernelized, chunkwise-parallel),
performer (FAVOR+ random features on the linear core).

Decoding: `init_decode_state(kind, ...)` and `decode_step(kind, state, ...)` give
token-by-token generation equal to the parallel causal forward: a KV cache for
softmax / local, a constant-size recurrent state (Σφ(k)vᵀ, Σφ(k)) for linear and
Performer.
"""

from __future__ import annotations

from typing import Any, Callable

from efficient_attn.attention import masks
from efficient_attn.attention.linear import linear_attention, linear_init_state, linear_step
from efficient_attn.attention.local import local_attention
from efficient_attn.attention.performer import performer_attention, performer_projection, performer_step
from efficient_attn.attention.softmax import softmax_attention, softmax_init_state, softmax_step
from efficient_attn.attention.sparse import block_sparse_attention

ATTENTION: dict[str, Callable[..., Any]] = {
    "softmax": softmax_attention,
    "local": local_attention,
    "sparse": block_sparse_attention,
    "linear": linear_attention,
    "performer": performer_attention,
}


def _check_kind(kind: str) -> Callable[..., Any]:
  if kind not in ATTENTION:
    raise ValueError(f"unknown attention kind {kind!r}; valid kinds are {sorted(ATTENTION)}.")
  return ATTENTION[kind]


def attend(kind: str, query, key, value, bias=None, mask=None, **kw):
  """Runs the attention family `kind` ("softmax", "local", "sparse", "linear", "performer")."""
  return _check_kind(kind)(query, key, value, bias, mask, **kw)


def flax_attention_fn(kind: str = "softmax", **opts) -> Callable[..., Any]:
  """An `attention_fn` for `flax.linen.MultiHeadDotProductAttention` / `flax.nnx.MultiHeadAttention`.

  Flax calls `attention_fn(query, key, value, bias=None, mask=None, *, dropout_rng,
  dropout_rate, broadcast_dropout, deterministic, dtype, precision, module)` with
  BTNH inputs (Flax says [batch..., length, heads, head_dim]). The Flax-only
  arguments are accepted and ignored (attention dropout is not applied; the
  returned function refuses a non-zero rate in non-deterministic mode rather
  than silently skipping it). `opts` are the family's own options, e.g.
  `flax_attention_fn("local", window=128, is_causal=True)`; `is_causal=True`
  from either the options or the caller (NNX passes it) makes it causal.
  Kernelized families (linear, performer) refuse a general [T, S] mask, so pass
  causality through `is_causal`, not a Flax causal mask.
  """
  fn = _check_kind(kind)

  def attention_fn(query, key, value, bias=None, mask=None, *, dropout_rng=None, dropout_rate=0.0,
                   broadcast_dropout=True, deterministic=True, dtype=None, precision=None, module=None,
                   is_causal=False):
    del dropout_rng, broadcast_dropout, precision, module
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError(
          f"flax_attention_fn({kind!r}): attention dropout is not supported (got dropout_rate={dropout_rate});"
          " set dropout_rate=0.0 or deterministic=True.")
    kw = {**opts, "is_causal": bool(opts.get("is_causal", False) or is_causal)}
    out = fn(query, key, value, bias, mask, **kw)
    return out if dtype is None else out.astype(dtype)

  return attention_fn


def init_decode_state(kind: str, batch: int, num_kv_heads: int, head_dim: int, *, max_len: int | None = None,
                      dtype=None, **opts):
  """Empty decoding state for `kind`.

  softmax / local: a KV cache of `max_len` positions (required). linear: state
  sized by the feature map (elu / relu keep H features). performer: sized by the
  projection's M (pass `projection=`).
  """
  _check_kind(kind)
  if kind in ("softmax", "local"):
    if max_len is None:
      raise ValueError(f"init_decode_state({kind!r}): `max_len` (cache length) is required for a KV cache.")
    return softmax_init_state(batch, max_len, num_kv_heads, head_dim, **({"dtype": dtype} if dtype else {}))
  if kind == "linear":
    return linear_init_state(batch, num_kv_heads, head_dim, head_dim)
  if kind == "performer":
    projection = opts.get("projection")
    if projection is None:
      raise ValueError("init_decode_state('performer'): pass `projection=` (from performer_projection).")
    return linear_init_state(batch, num_kv_heads, projection.shape[0], head_dim)
  raise ValueError(f"init_decode_state: kind {kind!r} has no decoding state (block-sparse layouts are not causal-decodable).")


def decode_step(kind: str, state, query_B1NH, key_B1KH, value_B1KH, **opts):
  """One causal decoding step: returns (out_B1NH, new_state).

  `opts` are the family options of the parallel call (`window` for local,
  `feature_map` for linear, `projection` / `kernel` for performer, `scale`).
  """
  _check_kind(kind)
  if kind in ("softmax", "local"):  # local = the same KV cache with a window
    return softmax_step(state, query_B1NH, key_B1KH, value_B1KH, **opts)
  if kind == "linear":
    opts.pop("chunk_size", None)
    return linear_step(state, query_B1NH, key_B1KH, value_B1KH, **opts)
  if kind == "performer":
    opts.pop("chunk_size", None)
    return performer_step(state, query_B1NH, key_B1KH, value_B1KH, **opts)
  raise ValueError(f"decode_step: kind {kind!r} has no decoding step.")


__all__ = [
    "ATTENTION", "attend", "flax_attention_fn", "init_decode_state", "decode_step", "masks",
    "softmax_attention", "local_attention", "block_sparse_attention", "linear_attention",
    "performer_attention", "performer_projection",
]
