"""The short depthwise causal convolution recurrent layers put on q / k / v before the recurrence.

    y[t, c] = Σ_{j=0}^{k−1} w[k−1−j, c] · x[t−j, c]      (taps that cross a document start or t−j < 0 are 0)

Mamba-2's conv1d, fla's `ShortConvolution` (`use_short_conv`, kernel 4), Based's and Zoology's short
convolutions: a linear recurrence alone cannot copy the previous token, which associative recall needs;
k − 1 taps of lookback give every token its neighbours before the state mixes them.

`short_conv(x, w, segment_ids)` [B, T, C] -> [B, T, C]; packed documents never see each other. Under a mesh
with a `context` axis (each sequence split over its devices in `context_layout` order, as the layers
receive it) every local piece takes the k − 1 tokens before it from the shard holding the previous piece
(`context.halo`, one `ppermute` per slot pair): k − 1 rows move, never O(T), and the result is one device's.
Decoding: `short_conv_step(x_BTC, w, state)` with `state` [B, k − 1, C] the last k − 1 inputs
(`init_short_conv_state`); returns (y [B, T, C], new state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.attention import context


def _conv(x, w, ids, halo=None, halo_ids=None):
  """The causal taps over x [B, L, C] (ids [B, L] or None), with `halo` [B, k − 1, C] before it (or zeros)."""
  k = w.shape[0]
  B, L, C = x.shape
  if k == 1:
    return x * w[0]
  if halo is None:
    halo = jnp.zeros((B, k - 1, C), x.dtype)
    halo_ids = None if ids is None else jnp.full((B, k - 1), -1, ids.dtype)  # no document
  xp = jnp.concatenate([halo.astype(x.dtype), x], axis=1)                      # [B, k − 1 + L, C]
  idp = None if ids is None else jnp.concatenate([halo_ids.astype(ids.dtype), ids], axis=1)
  y = jnp.zeros_like(x)
  for j in range(k):  # tap j looks j tokens back
    shifted = jax.lax.dynamic_slice_in_dim(xp, k - 1 - j, L, axis=1)
    if idp is not None and j:
      same = jax.lax.dynamic_slice_in_dim(idp, k - 1 - j, L, axis=1) == ids
      shifted = jnp.where(same[..., None], shifted, 0)
    y = y + shifted * w[k - 1 - j].astype(x.dtype)
  return y


def short_conv(x_BTC, weight_KC, segment_ids=None, *, context_layout: str = "zigzag",
               axis_name: str = context.AXIS):
  """Depthwise causal convolution of x [B, T, C] with weights [k, C] (the last row weighs the token itself),
  within each document of `segment_ids` [B, T]; split over the current mesh's `axis_name` when it has one."""
  if x_BTC.ndim != 3 or weight_KC.ndim != 2 or weight_KC.shape[1] != x_BTC.shape[-1]:
    raise ValueError(f"short_conv: x must be [B, T, C] and the weights [k, C]; got {list(x_BTC.shape)} and"
                     f" {list(weight_KC.shape)}.")
  if context.mesh_shards(axis_name) == 1:
    return _conv(x_BTC, weight_KC, segment_ids)
  return _split(x_BTC, weight_KC, segment_ids, context_layout, axis_name)


def _split(x, w, ids, layout: str, axis_name: str):
  from efficient_attn import sharding

  mesh = jax.sharding.get_abstract_mesh()
  B, T, C = x.shape
  k = w.shape[0]
  (batch,) = sharding.mesh_axes(("batch",), mesh)
  batch = sharding.divisible_axes(batch, B, mesh)
  spec = sharding.spec([batch, (axis_name,), ()])
  ids_spec = sharding.spec([batch, (axis_name,)])
  has_ids = ids is not None

  def local(x, w, ids):
    B = x.shape[0]  # this shard's rows
    n = context.local_pieces(layout, x.shape[1], "short_conv")
    L = x.shape[1] // n
    if k - 1 > L:
      raise ValueError(f"short_conv: a kernel of {k} needs pieces of at least {k - 1} tokens; each device holds"
                       f" {n} of {L}.")
    xs = x.reshape(B, n, L, C)
    ends = {"x": xs[:, :, L - (k - 1):]}
    if has_ids:
      ends["ids"] = ids.reshape(B, n, L)[:, :, L - (k - 1):]
    got, has = context.halo(ends, axis_name, layout, n, -1) if k > 1 else ({}, None)
    pieces = context.to_pieces(x, n)                                            # [B·n, L, C]
    piece_ids = context.to_pieces(ids, n) if has_ids else None
    halo = halo_ids = None
    if k > 1:
      halo = got["x"].reshape(B * n, k - 1, C)
      keep = jnp.tile(has, B).reshape(B * n, 1)                                  # b-major, as to_pieces
      halo = jnp.where(keep[..., None], halo, 0)
      if has_ids:
        halo_ids = jnp.where(keep, got["ids"].reshape(B * n, k - 1), -1)
      else:  # no documents: the sequence start alone cuts the taps, and the zeros above do that
        halo_ids = None
    return context.from_pieces(_conv(pieces, w, piece_ids, halo, halo_ids), n)

  in_specs = (spec, jax.sharding.PartitionSpec(), ids_spec if has_ids else jax.sharding.PartitionSpec())
  return jax.shard_map(local, in_specs=in_specs, out_specs=spec)(
      x, w, ids if has_ids else jnp.zeros((), jnp.int32))


def weight_init(kernel: int):
  """The weights' initializer: uniform in ±1/√kernel (PyTorch's conv1d default for a depthwise kernel)."""
  bound = 1 / kernel ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def init_short_conv_state(batch: int, kernel: int, channels: int, dtype=jnp.float32):
  """The decoding state: the last kernel − 1 inputs, zeros before the first token: [B, kernel − 1, C]."""
  return jnp.zeros((batch, max(kernel - 1, 0), channels), dtype)


def short_conv_step(x_BTC, weight_KC, state):
  """Decoding T ≥ 1 new tokens after those `state` [B, k − 1, C] holds: (y [B, T, C], the new state)."""
  k = weight_KC.shape[0]
  if k == 1:
    return x_BTC * weight_KC[0].astype(x_BTC.dtype), state
  y = _conv(x_BTC, weight_KC, None, state)
  return y, jnp.concatenate([state.astype(x_BTC.dtype), x_BTC], axis=1)[:, x_BTC.shape[1]:]
