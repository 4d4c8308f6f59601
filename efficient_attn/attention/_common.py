"""Shared argument checks and small helpers for the attention families.

Every family validates its inputs here, at trace time, so a wrong shape is one
clear ValueError sentence and never an XLA error. Shapes follow the legend:
B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Dims(NamedTuple):
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int

  @property
  def G(self) -> int:
    """Query heads per key/value head (GQA group size)."""
    return self.N // self.K


def check_qkv(query, key, value, fn: str, *, value_head_dim: bool = False) -> Dims:
  """Validates BTNH / BSKH / BSKH shapes and returns the dimensions.

  value_head_dim=True lets the value's head dim Hv differ from H (value [B, S, K, Hv]). value=None
  checks query and key only (attention weights).
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x is not None and getattr(x, "ndim", None) != 4:
      raise ValueError(
          f"{fn}: `{name}` must have rank 4 ({'[B, T, N, H]' if name == 'query' else '[B, S, K, H]'}),"
          f" got shape {getattr(x, 'shape', None)}.")
  B, T, N, H = query.shape
  Bk, S, K, Hk = key.shape
  if value is not None and (key.shape[:3] != value.shape[:3] or (key.shape != value.shape and not value_head_dim)):
    what = "[B, S, K] dims" if value_head_dim else "shape [B, S, K, H]"
    raise ValueError(f"{fn}: `key` and `value` must have the same {what}, got {key.shape} and {value.shape}.")
  if Bk != B:
    raise ValueError(f"{fn}: batch sizes differ: query has B={B}, key/value have B={Bk}.")
  if Hk != H:
    raise ValueError(f"{fn}: head dims differ: query has H={H}, key/value have H={Hk}.")
  if N % K:
    raise ValueError(
        f"{fn}: query heads N={N} must be a multiple of key/value heads K={K} (MHA: K=N, GQA: K divides N, MQA: K=1).")
  return Dims(B, T, S, N, K, H)


def mean_visible_keys(T: int, window: int, causal: bool) -> float:
  """Mean number of keys a query sees (T == S, top-left causal, keys within `window` positions):
  the ideal work per query of exact attention (window = T) and of a sliding window."""
  W = min(window, T)
  if causal:
    return (W * (W + 1) / 2 + (T - W) * W) / T
  return (T + 2 * ((W - 1) * T - (W - 1) * W / 2)) / T


def stats_dtype(dtype):
  """The dtype of softmax statistics and accumulators: float32, or float64 for float64 inputs (x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def _flatten_leading(x, batch: tuple, rank: int, name: str, target: str, fn: str):
  """x broadcastable to batch + (rest of `rank` - len(batch) dims) -> [prod(batch) | 1, *rest]."""
  x = jnp.asarray(x)
  if x.ndim > rank:
    raise ValueError(f"{fn}: `{name}` of shape {list(x.shape)} has more dims than {target} ({rank}).")
  x = x.reshape((1,) * (rank - x.ndim) + x.shape)
  lead, rest = x.shape[:len(batch)], x.shape[len(batch):]
  if any(m not in (1, b) for m, b in zip(lead, batch)):
    raise ValueError(f"{fn}: `{name}` of shape {list(x.shape)} does not broadcast over the batch dims {list(batch)}"
                     f" of {target}.")
  if all(m == 1 for m in lead):
    return x.reshape((1,) + rest)
  return jnp.broadcast_to(x, batch + rest).reshape((math.prod(batch),) + rest)


def _lengths(lengths, batch: tuple, name: str, fn: str):
  lengths = jnp.asarray(lengths)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{fn}: `{name}` must be an integer array, got dtype {lengths.dtype}.")
  if lengths.shape != batch:
    raise ValueError(f"{fn}: `{name}` must have the batch shape {list(batch)}, got {list(lengths.shape)}.")
  return lengths.reshape(-1).astype(jnp.int32)


def check_dtypes(query, key, value, fn: str):
  """Refuses non-floating inputs (complex ones would silently lose their imaginary part); value may be None."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x is None:
      continue
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else "non-floating"
      raise ValueError(f"{fn}: `{name}` has {kind} dtype {jnp.dtype(dtype).name}; attention takes real floating"
                       " point inputs (for complex data, attend over real and imaginary parts as features).")


_LAYOUTS = {"query": "[..., T, N, H]", "key": "[..., S, K, H]", "value": "[..., S, K, Hv]"}


def _listing(words) -> str:
  """"a, b and c"."""
  words = list(words)
  return ", ".join(words[:-1]) + " and " + words[-1]


_EAGER_PROGRAMS: dict = {}  # (function, call structure, fixed values) -> jitted program; the oldest evicted
_EAGER_LIMIT = 64


def compiled_when_eager(*, static: tuple[str, ...] = ()):
  """Decorator: a call on concrete arrays runs as one compiled program instead of op by op.

  Called outside any transformation, JAX dispatches a family's chunk scans and einsums one at a
  time (1-5 s per call at T = 1024 on a CPU); compiled, the call is one XLA program. The
  array arguments (jax or NumPy, at any depth of a tuple / list / dict) are the program's
  inputs; every other argument (ints, floats, strings, dtypes, callables) and the keyword
  arguments named in `static` (e.g. a NumPy block layout the function reads concretely) are
  fixed for the program and key its cache (at most 64 programs per process, the oldest
  dropped). Inside jit / grad / vmap (any argument a tracer), under `jax.disable_jit()`, or when
  a fixed argument cannot be hashed, `fn` runs as written. Errors are the same sentences: the
  checks run while the program is traced, before anything compiles.
  """

  def decorate(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if jax.config.jax_disable_jit:
        return fn(*args, **kwargs)
      fixed = {n: kwargs.pop(n) for n in static if n in kwargs}
      leaves, tree = jax.tree.flatten((args, kwargs))
      if any(isinstance(x, jax.core.Tracer) for x in (*leaves, *fixed.values())):
        return fn(*args, **kwargs, **fixed)
      is_input = tuple(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)
      consts = [x for x, a in zip(leaves, is_input) if not a]
      try:
        key = (fn, tree, is_input, tuple(map(_fixed_key, consts)), tuple((n, _fixed_key(v)) for n, v in fixed.items()))
        program = _EAGER_PROGRAMS.get(key)
      except TypeError:  # an unhashable option: run as written
        return fn(*args, **kwargs, **fixed)
      if program is None:
        def run(*inputs):
          it_in, it_const = iter(inputs), iter(consts)
          a, kw = jax.tree.unflatten(tree, [next(it_in) if a else next(it_const) for a in is_input])
          return fn(*a, **kw, **fixed)

        program = _EAGER_PROGRAMS[key] = jax.jit(run)
        while len(_EAGER_PROGRAMS) > _EAGER_LIMIT:
          del _EAGER_PROGRAMS[next(iter(_EAGER_PROGRAMS))]
      return program(*(x for x, a in zip(leaves, is_input) if a))

    return wrapper

  return decorate


def _fixed_key(x):
  """A hashable stand-in for a fixed argument: NumPy / jax arrays by shape, dtype and bytes."""
  if isinstance(x, (np.ndarray, jax.Array)):
    x = np.asarray(x)
    return ("array", x.shape, x.dtype.str, x.tobytes())
  hash(x)
  return (type(x), x)


def leading_batch_dims(*, query_mask: bool = True, result: str = "BTNH"):
  """Decorator: a family function written for [B, T, N, H] takes any number of leading batch dims.

  The decorated function accepts query [..., T, N, H], key [..., S, K, H], value
  [..., S, K, Hv] with the same leading dims `...` (none, one or several: what
  `jax.vmap` and Flax's [batch..., length, heads, features] produce); mask / bias
  broadcastable to [..., N, T, S]; segment_ids [..., T] (or a pair); and jax.nn's
  `query_seq_lengths` / `key_value_seq_lengths` (int [...]). Leading dims are
  flattened into one batch dim for `fn` and restored on the output (and on a
  (output, residual) pair). The lengths become masks: keys at s >= kv_len are
  invisible; queries at t >= q_len see no key (`query_mask=True`, the function
  then outputs 0 for them) or, for families that take key masks only, have their
  output zeroed afterwards. Four-dim calls without lengths go straight to `fn`.

  result: what `fn` computes. "BTNH": attention, fn(query, key, value, bias, mask, ...) ->
  [B, T, N, Hv] (or an (output, residual [B, T, N]) pair). "BNTS": attention weights,
  fn(query, key, bias, mask, ...) with no value -> [B, N, T, S]; the decorated function
  then takes no value either and returns [..., N, T, S].
  """
  if result not in ("BTNH", "BNTS"):
    raise ValueError(f"leading_batch_dims: `result`={result!r} is not one of 'BTNH' (attention), 'BNTS' (weights).")

  def decorate(fn):
    name = fn.__name__

    def call(arrays: dict, bias, mask, segment_ids, query_seq_lengths, key_value_seq_lengths, kw):
      check_dtypes(arrays["query"], arrays["key"], arrays.get("value"), name)
      arrays = {n: jnp.asarray(x) for n, x in arrays.items()}
      query, key = arrays["query"], arrays["key"]
      if query.ndim == 4 and query_seq_lengths is None and key_value_seq_lengths is None:
        return fn(*arrays.values(), bias, mask, segment_ids=segment_ids, **kw)
      if query.ndim < 3 or any(x.ndim != query.ndim for x in arrays.values()):
        raise ValueError(
            f"{name}: {_listing(arrays)} must have the same rank >= 3 ({', '.join(_LAYOUTS[n] for n in arrays)}),"
            f" got shapes {_listing(str(x.shape) for x in arrays.values())}.")
      batch = query.shape[:-3]
      if any(x.shape[:-3] != batch for x in arrays.values()):
        raise ValueError(f"{name}: leading batch dims differ: "
                         f"{', '.join(f'{n} {list(x.shape[:-3])}' for n, x in arrays.items())}.")
      B, (T, N, _), S = math.prod(batch), query.shape[-3:], key.shape[-3]
      arrays = {n: x.reshape((B,) + x.shape[-3:]) for n, x in arrays.items()}
      target = f"[..., N, T, S] (= {list(batch) + [N, T, S]})"
      bias = None if bias is None else _flatten_leading(bias, batch, len(batch) + 3, "bias", target, name)
      mask = None if mask is None else _flatten_leading(mask, batch, len(batch) + 3, "mask", target, name)
      if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"{name}: `mask` must be boolean (True = may attend), got dtype {mask.dtype}.")
      if segment_ids is not None:
        seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids,)
        seg = tuple(jnp.asarray(ids).reshape((B,) + jnp.shape(ids)[len(batch):]) for ids in seg)
        segment_ids = seg if isinstance(segment_ids, (tuple, list)) else seg[0]
      keep_rows = None
      if key_value_seq_lengths is not None:
        kv_len = _lengths(key_value_seq_lengths, batch, "key_value_seq_lengths", name)
        key_ok = (lax.broadcasted_iota(jnp.int32, (B, S), 1) < kv_len[:, None]).reshape(B, 1, 1, S)
        mask = key_ok if mask is None else mask & key_ok
      if query_seq_lengths is not None:
        q_len = _lengths(query_seq_lengths, batch, "query_seq_lengths", name)
        rows = lax.broadcasted_iota(jnp.int32, (B, T), 1) < q_len[:, None]
        if query_mask:
          mask = rows.reshape(B, 1, T, 1) if mask is None else mask & rows.reshape(B, 1, T, 1)
        else:  # the query rows of the result: T is dim 1 of [B, T, N, H], dim 2 of [B, N, T, S]
          keep_rows = rows.reshape(B, T, 1, 1) if result == "BTNH" else rows.reshape(B, 1, T, 1)
      out = fn(*arrays.values(), bias, mask, segment_ids=segment_ids, **kw)
      res = None
      if isinstance(out, tuple):
        out, res = out
      if keep_rows is not None:
        out = jnp.where(keep_rows, out, jnp.zeros((), out.dtype))
      out = out.reshape(batch + out.shape[1:])
      return out if res is None else (out, res.reshape(batch + res.shape[1:]))

    if result == "BTNH":
      @functools.wraps(fn)
      def wrapper(query, key, value, bias=None, mask=None, *, segment_ids=None, query_seq_lengths=None,
                  key_value_seq_lengths=None, **kw):
        return call({"query": query, "key": key, "value": value}, bias, mask, segment_ids, query_seq_lengths,
                    key_value_seq_lengths, kw)
    else:
      @functools.wraps(fn)
      def wrapper(query, key, bias=None, mask=None, *, segment_ids=None, query_seq_lengths=None,
                  key_value_seq_lengths=None, **kw):
        return call({"query": query, "key": key}, bias, mask, segment_ids, query_seq_lengths, key_value_seq_lengths,
                    kw)

    params = list(inspect.signature(fn).parameters.values())
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
             for n in ("query_seq_lengths", "key_value_seq_lengths") if n not in {p.name for p in params}]
    var_kw = [p for p in params if p.kind is p.VAR_KEYWORD]
    params = [p for p in params if p.kind is not p.VAR_KEYWORD] + extra + var_kw
    wrapper.__signature__ = inspect.Signature(params)
    return wrapper

  return decorate


def resolve_scale(scale, head_dim: int) -> float:
  """`scale` or the default H ** -0.5."""
  return head_dim ** -0.5 if scale is None else scale


def split_segment_ids(segment_ids, dims: Dims, fn: str):
  """Returns (q_ids [B, T], kv_ids [B, S]) int32, or None when not given.

  `segment_ids` is either one int array [B, T] (self-attention, T == S) or a pair
  (q_ids [B, T], kv_ids [B, S]).
  """
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"{fn}: `segment_ids` pair must be (q_ids [B, T], kv_ids [B, S]), got {len(segment_ids)} arrays.")
    q_ids, kv_ids = segment_ids
  else:
    if dims.T != dims.S:
      raise ValueError(
          f"{fn}: a single `segment_ids` array needs T == S (self-attention), got T={dims.T}, S={dims.S};"
          " pass a pair (q_ids [B, T], kv_ids [B, S]).")
    q_ids = kv_ids = segment_ids
  q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
  if q_ids.shape != (dims.B, dims.T):
    raise ValueError(f"{fn}: query `segment_ids` must have shape [B, T]={[dims.B, dims.T]}, got {list(q_ids.shape)}.")
  if kv_ids.shape != (dims.B, dims.S):
    raise ValueError(f"{fn}: key `segment_ids` must have shape [B, S]={[dims.B, dims.S]}, got {list(kv_ids.shape)}.")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def check_mask(mask, dims: Dims, fn: str):
  """Checks that a boolean mask broadcasts to [B, N, T, S]; returns it as bool or None."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  target = (dims.B, dims.N, dims.T, dims.S)
  if mask.ndim > 4 or any(m not in (1, t) for m, t in zip(mask.shape[::-1], target[::-1])):
    raise ValueError(f"{fn}: `mask` of shape {list(mask.shape)} does not broadcast to [B, N, T, S]={list(target)}.")
  if mask.dtype != jnp.bool_:
    raise ValueError(f"{fn}: `mask` must be boolean (True = may attend), got dtype {mask.dtype}.")
  return mask


def check_bias(bias, dims: Dims, fn: str):
  """Checks that an additive bias broadcasts to [B, N, T, S]."""
  if bias is None:
    return None
  bias = jnp.asarray(bias)
  target = (dims.B, dims.N, dims.T, dims.S)
  if bias.ndim > 4 or any(m not in (1, t) for m, t in zip(bias.shape[::-1], target[::-1])):
    raise ValueError(f"{fn}: `bias` of shape {list(bias.shape)} does not broadcast to [B, N, T, S]={list(target)}.")
  return bias


def check_divisible(length: int, block: int, what: str, arg: str, fn: str):
  if block <= 0:
    raise ValueError(f"{fn}: `{arg}` must be a positive integer, got {block}.")
  if length % block:
    raise ValueError(
        f"{fn}: {what} {length} is not divisible by `{arg}`={block}; pad the sequence or pick a {arg} that divides it.")


def masked_softmax(logits, visible, axis=-1):
  """Softmax of `logits` over `axis` in the stats dtype (float32, float64 for float64), restricted to `visible`.

  A row with no visible entry (or only -inf logits) gets all-zero weights, so
  its attention output is exactly 0 and its gradients are finite.
  """
  logits = jnp.where(visible, logits.astype(stats_dtype(logits.dtype)), -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=axis, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def gather_block_pairs(x, block: int, kv_blocks, q_blocks=None):
  """Blocks of a mask / bias at static (query block, key block) pairs, never expanding it.

  x: broadcastable to [B, N, T, S]; a size-1 axis stays size 1 (a [B, 1, 1, S]
  padding mask is never expanded to T x S). kv_blocks: int NumPy [h, u, M]
  (h = 1 or N), the key block that slot m of the u-th query block reads;
  q_blocks: int NumPy [u], which query blocks those are (default 0 .. u-1).
  Out-of-range key blocks are clipped (the caller masks those slots). T and S
  are zero-padded up to multiples of `block`.
  Returns [B|1, N|1, u|1, block|1, M|1, block|1].
  """
  x = jnp.asarray(x)
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  mb, mn, mt, ms = x.shape
  u = kv_blocks.shape[1]
  q_blocks = np.arange(u) if q_blocks is None else np.asarray(q_blocks)
  tq, bq = (-(-mt // block), block) if mt > 1 else (1, 1)
  tk, bk = (-(-ms // block), block) if ms > 1 else (1, 1)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, tq * bq - mt), (0, tk * bk - ms)))
  x = x.reshape(mb, mn, tq, bq, tk, bk).transpose(0, 1, 2, 4, 3, 5)
  zero = np.zeros((1, 1, 1), np.int32)
  hi = np.arange(mn).reshape(mn, 1, 1) if mn > 1 else zero
  qi = q_blocks.reshape(1, u, 1) if mt > 1 else zero
  ki = np.clip(kv_blocks, 0, tk - 1) if ms > 1 else zero
  return x[:, hi, qi, ki].transpose(0, 1, 2, 4, 3, 5)


@jax.custom_vjp
def scale_rows(x, s):
  """x * s[..., None]: x [..., n], s [...] (broadcastable against x's leading axes).

  The same product, with the gradient of s written as a contraction (einsum) instead of the
  multiply-then-reduce autodiff emits: XLA:CPU (jax 0.10, its YNN reduce fusions) runs that
  reduction over the last axis 20-40x slower than the equivalent dot.
  """
  return x * s[..., None]


def _scale_rows_fwd(x, s):
  return x * s[..., None], (x, s)


def _scale_rows_bwd(res, dy):
  x, s = res
  ds = jnp.einsum("...i,...i->...", dy, x)
  lead = ds.ndim - s.ndim                     # s may broadcast against x's leading axes
  summed = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(s.shape) if n == 1 != ds.shape[lead + i])
  ds = jnp.sum(ds, axis=summed)
  return dy * s[..., None], ds.reshape(s.shape)


scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)
