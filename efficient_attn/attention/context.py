"""Context parallelism for the recurrent families: sequence layouts and the state-passing combine.

A sequence of T tokens is split over the P devices of a mesh axis (the `context` axis).
Two layouts, decided once by the data pipeline (`to_layout`) and undone on the outputs
(`from_layout`):

    contiguous   shard r holds tokens [r·T/P, (r+1)·T/P)
    zigzag       the sequence is cut into 2P pieces; shard r holds pieces r and 2P−1−r, in that
                 order (causal load balance: every shard has one early and one late piece)

A recurrence S_t = A_t S_{t-1} + u_t (A a diagonal decay, or a matrix for the delta rule) is
passed across shards as in LASP-2 (Sun et al. 2025): each local piece is run from a zero state,
giving its summary (transition A = the product of its A_t, end state U), one
`jax.lax.all_gather` collects every piece's summary, and each shard folds the pieces that come
before its own (`incoming_state`: an exclusive prefix combine, or suffix for the reverse
direction of a bidirectional call) with the rule S ↦ A S + U, the same rule the chunkwise
kernels use between chunks (`prefix_states`). The traffic is P·n summaries of
[B, K, H, Hv] (+ the transition), independent of T.

In a model, `attend` splits the call itself when the current mesh has a `context` axis of size > 1
(`split_call`: `jax.shard_map` with T on `context` and the batch on the batch axes); the trainer's
data pipeline lays every [B, T] array out once (`lay_out_example`: tokens, targets, segment ids and
the positions RoPE uses), so the whole model works on laid-out tokens and the loss, a mean over
tokens, does not care about their order.

Legend: B batch, T tokens, K kv heads, H key head dim, Hv value head dim, P shards,
n local pieces per shard (1 contiguous, 2 zigzag), M = n·P pieces in all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.attention._common import scale_rows

LAYOUTS = ("contiguous", "zigzag")
AXIS = "context"  # the mesh axis `attend` splits the sequence over


def check_layout(layout: str, fn: str) -> int:
  """The number of local pieces of `layout` (1 contiguous, 2 zigzag), or a ValueError naming it."""
  if layout not in LAYOUTS:
    raise ValueError(f"{fn}: `context_layout`={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}.")
  return 2 if layout == "zigzag" else 1


def piece_order(P: int, layout: str) -> np.ndarray:
  """Sequence position of each piece, in the order the shards hold them: int [M].

  contiguous: [0, 1, .., P−1]; zigzag: [0, 2P−1, 1, 2P−2, .., P−1, P] (shard r: r, 2P−1−r).
  """
  n = check_layout(layout, "piece_order")
  if n == 1:
    return np.arange(P)
  r = np.arange(P)
  return np.stack([r, 2 * P - 1 - r], axis=1).reshape(-1)


def to_layout(x, P: int, layout: str):
  """A full [B, T, ...] array in sequence order -> [B, T, ...] in shard order: split along T into P
  equal slices, slice r is what shard r holds (`jax.shard_map` with the T axis on the context axis)."""
  return _permute(x, P, layout, piece_order(P, layout))


def from_layout(x, P: int, layout: str):
  """Inverse of `to_layout`: [B, T, ...] in shard order -> sequence order."""
  return _permute(x, P, layout, np.argsort(piece_order(P, layout)))


def _permute(x, P: int, layout: str, order: np.ndarray):
  x = jnp.asarray(x)
  M = len(order)
  B, T = x.shape[:2]
  if T % M:
    raise ValueError(f"{layout} layout over {P} shards cuts T into {M} equal pieces; T={T} is not a multiple of {M}.")
  pieces = x.reshape(B, M, T // M, *x.shape[2:])
  return jnp.take(pieces, jnp.asarray(order), axis=1).reshape(x.shape)


def varying_axes(x) -> frozenset:
  """The `jax.shard_map` axes x varies over (empty outside shard_map or for a replicated value)."""
  kind = getattr(jax.typeof(x), "manual_axis_type", None)  # jax 0.10: ManualAxisType(varying=...)
  return frozenset(kind.varying) if kind is not None else frozenset()


def varying(x, axis_name, like=None):
  """x marked as varying over `axis_name` (and every axis `like` varies over) inside `jax.shard_map`; a no-op if
  it already is, or None: inputs built from shapes alone (zero or fixed decays, empty accumulators) are
  otherwise replicated, and a custom VJP, a scan carry or the branches of a `lax.cond` whose other side varies
  would not type-check. `like`: an input of the call, e.g. the queries, which under `split_call` vary over
  the batch axes too."""
  if x is None:
    return x
  missing = ({axis_name} | (varying_axes(like) if like is not None else frozenset())) - varying_axes(x)
  return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def vary_together(arrays, axis_name):
  """`arrays` (None entries kept) each marked varying over `axis_name` and every axis any of them varies over:
  under `split_call` the queries vary over the batch axes too, while fixed decays built from shapes vary over
  nothing, and a custom VJP or scan over both needs one type."""
  axes = frozenset({axis_name}).union(*(varying_axes(x) for x in arrays if x is not None))
  out = []
  for x in arrays:
    missing = None if x is None else axes - varying_axes(x)
    out.append(jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x)
  return tuple(out)


def local_pieces(layout: str, T_local: int, fn: str) -> int:
  """The number of pieces n a shard holds in `layout` (1 contiguous, 2 zigzag); a ValueError naming `fn` if its
  T_local tokens do not split into them."""
  n = check_layout(layout, fn)
  if T_local % n:
    raise ValueError(f"{fn}: the zigzag layout holds two equal pieces per shard; the local length T={T_local} is odd.")
  return n


def run_pieces(direction, arrays, ids_BT, is_causal: bool, axis_name, n: int):
  """A recurrent family's outputs on one shard: `direction(arrays, ids, reverse)` run on the shard's n pieces
  as separate sequences [B·n, T_local / n, ...] (inputs marked varying over `axis_name`), and for a
  non-causal call again on the flipped pieces (the reverse recurrence; its output flipped back), summed.
  arrays: [B, T_local, ...] each; ids_BT: int [B, T_local] or None. Returns [B, T_local, ...]."""
  piece = lambda x: None if x is None else to_pieces(x, n)  # noqa: E731
  *arrays, ids_BT = vary_together((*arrays, ids_BT), axis_name)
  arrays, ids_BT = tuple(map(piece, arrays)), piece(ids_BT)

  def run(reverse: bool):
    flip = (lambda x: None if x is None else jnp.flip(x, axis=1)) if reverse else (lambda x: x)  # noqa: E731
    return flip(direction(tuple(map(flip, arrays)), flip(ids_BT), reverse))

  out = run(False)
  return from_pieces(out if is_causal else out + run(True), n)


def edges(ids_BT):
  """The (first, last) segment id of each piece, int [B·n, 2] (what `incoming_state` links by), or None."""
  return None if ids_BT is None else jnp.stack([ids_BT[:, 0], ids_BT[:, -1]], axis=-1)


def to_pieces(x, n: int):
  """One shard's [B, T_local, ...] -> its n pieces as separate sequences [B·n, T_local / n, ...] (b-major)."""
  return x.reshape(x.shape[0] * n, x.shape[1] // n, *x.shape[2:])


def from_pieces(x, n: int):
  """Inverse of `to_pieces`: [B·n, T_local / n, ...] -> [B, T_local, ...]."""
  return x.reshape(x.shape[0] // n, x.shape[1] * n, *x.shape[2:])


def apply_transition(A, S):
  """A S for a state S [..., H, Hv]: A a diagonal [..., H or 1] (or as a column, [..., H or 1, 1]: the rows
  of S scaled) or a matrix [..., H, H] (the delta rule)."""
  if A.ndim < S.ndim:
    return scale_rows(S, A)
  return A @ S if A.shape[-1] > 1 else scale_rows(S, A[..., 0])


def prefix_states(A, U, initial=None):
  """Exclusive prefix combine along axis 1: S_0 = initial (default 0), S_{m+1} = A_m S_m + U_m; returns S
  [B, M, ..., H, Hv].

  A [B, M, ..., H or 1] (diagonal) or [B, M, ..., H, H] (matrix; see `apply_transition`); U [B, M, ..., H, Hv].
  A `lax.scan` over M steps of the small state: chunks inside a kernel, pieces across shards.
  """
  def step(S, x):
    a, u = x
    return apply_transition(a, S) + u, S

  first = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
  start = jnp.zeros_like(U[:, 0]) if initial is None else initial.astype(U.dtype)
  _, S = jax.lax.scan(step, start, (first(A), first(U)))
  return jnp.moveaxis(S, 0, 1)


def product(A):
  """A_{M-1} ⋯ A_1 A_0 of matrices A [B, M, ..., H, H] along axis 1 (a piece's transition from its chunks')."""
  # Started from A_0, not the identity: the carry then has A's type, sharded-varying inside shard_map too.
  out, _ = jax.lax.scan(lambda P, a: (a @ P, None), A[:, 0], jnp.moveaxis(A[:, 1:], 1, 0))
  return out


def _ids_as_values(ids, dtype):
  """int [..., 2] segment ids as `dtype` values, to travel with the float summaries in one all_gather (exact up
  to 2^24 documents in a row for float32: more than any row's length)."""
  return ids.astype(dtype)


def _values_as_ids(x):
  """Inverse of `_ids_as_values`."""
  return x.astype(jnp.int32)


def incoming_state(transition, state, axis_name, layout: str, *, reverse: bool = False, ids=None):
  """Each local piece's incoming state, from every piece's summary: [B·n, K, H, Hv].

  Inside `jax.shard_map` over `axis_name` (P shards, each holding n pieces in `layout`, stacked
  b-major as `to_pieces` does). Per local piece, in the direction of the recurrence:
    transition  [B·n, K, H or 1] (a diagonal decay) or [B·n, K, H, H] (a matrix): S_end = A S_in + U
    state       U [B·n, K, H, Hv]: the piece's end state from a zero start
    ids         optional int [B·n, 2]: the (first, last) segment id of the piece; a piece whose first
                id differs from the previous piece's last id starts a document and takes a zero state
                (the transition must already be zero when a document starts inside the piece)
  One all_gather of the packed summaries (M·B·(K·H·Hv + K·H + 1) numbers, whatever T), the M
  pieces put in sequence order, an exclusive prefix combine (reverse=True: suffix, for the
  backward recurrence of a bidirectional call, whose pieces were run from their ends), and each
  shard takes its own pieces' entries. Exact; autodiff through it transposes the all_gather.
  """
  n = check_layout(layout, "incoming_state")
  Bn = state.shape[0]
  B = Bn // n
  acc = state.dtype
  parts = [transition.astype(acc).reshape(B, n, -1), state.reshape(B, n, -1)]
  if ids is not None:
    parts.append(_ids_as_values(ids, acc).reshape(B, n, -1))
  sizes = np.cumsum([p.shape[-1] for p in parts])[:-1]
  packed = jnp.concatenate(parts, axis=-1)                               # [B, n, F]
  every = jax.lax.all_gather(packed, axis_name)                          # [P, B, n, F]
  P = every.shape[0]
  order = piece_order(P, layout)                                         # position of gathered piece j
  slot = np.argsort(order)                                               # gathered index of position m
  every = jnp.moveaxis(every, 0, 1).reshape(B, P * n, -1)[:, slot]       # [B, M, F], sequence order
  if reverse:
    every = every[:, ::-1]
  pieces = jnp.split(every, sizes, axis=-1)
  A = pieces[0].reshape(B, P * n, *transition.shape[1:])
  U = pieces[1].reshape(B, P * n, *state.shape[1:])
  link = None
  if ids is not None:
    first_last = _values_as_ids(pieces[2])                              # [B, M, 2]
    prev_last = jnp.concatenate([first_last[:, :1, 0], first_last[:, :-1, 1]], axis=1)
    link = (first_last[..., 0] == prev_last).astype(acc)                 # [B, M]; piece 0 gets a zero state anyway
    A = A * link.reshape(B, P * n, *(1,) * (A.ndim - 2))
  S_in = prefix_states(A, U)                                             # [B, M, K, H, Hv]
  if link is not None:
    S_in = S_in * link.reshape(B, P * n, 1, 1, 1)
  if reverse:
    S_in = S_in[:, ::-1]
  mine = jnp.asarray(order.reshape(P, n))[jax.lax.axis_index(axis_name)]  # positions of this shard's pieces [n]
  return jnp.take(S_in, mine, axis=1).reshape(Bn, *state.shape[1:])


# ----------------------------------------------------------------------------- in a model


def check_split(options, shape, shards: int, layout: str) -> int:
  """The usual `Family.context` hook: T must cut into shards × pieces (1 contiguous, 2 zigzag) equal pieces.
  Returns the piece length (for a family's own further checks)."""
  del options
  M = shards * check_layout(layout, "context")
  if shape.seq_len % M:
    raise ValueError(f"the {layout} layout over {shards} devices cuts each sequence into {M} equal pieces, and"
                     f" T={shape.seq_len} is not a multiple of {M}.")
  return shape.seq_len // M


def mesh_shards(axis_name: str = AXIS) -> int:
  """The size of `axis_name` in the current mesh (`jax.set_mesh`), 1 without one or without that axis."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(axis_name, 1)


def split_call(fn, query, key, value, *, context_layout: str = "zigzag", axis_name: str = AXIS, **kw):
  """`fn(query, key, value, **kw)` with each sequence split over the current mesh's `axis_name`.

  query [B, T, N, H], key / value [B, T, K, H(v)] and every keyword array of shape [B, T, ...] (segment
  ids, gates, β) already in `context_layout` order (the data pipeline's `lay_out_example`), T on `axis_name` and
  B on the batch axes (those B divides); other arrays (the Performer's projection) whole. Runs `fn` in a
  `jax.shard_map` over the whole mesh with `context_axis=axis_name, context_layout=context_layout`; returns
  [B, T, N, Hv] in the same layout. Inside, heads are whole on `tensor`.
  """
  from efficient_attn import sharding

  mesh = jax.sharding.get_abstract_mesh()
  B, T = query.shape[:2]
  (batch,) = sharding.mesh_axes(("batch",), mesh)
  batch = sharding.divisible_axes(batch, B, mesh)

  def spec(x):
    if hasattr(x, "shape") and x.ndim >= 2 and tuple(x.shape[:2]) == (B, T):
      return sharding.spec([batch, (axis_name,)] + [()] * (x.ndim - 2))
    return jax.sharding.PartitionSpec()

  arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}  # NumPy (sparse's layout) stays fixed
  fixed = {k: v for k, v in kw.items() if k not in arrays}

  def local(q, k, v, arrays):
    return fn(q, k, v, context_axis=axis_name, context_layout=context_layout, **arrays, **fixed)

  qkv = (query, key, value)
  return jax.shard_map(local, in_specs=(*map(spec, qkv), {k: spec(v) for k, v in arrays.items()}),
                       out_specs=spec(query))(*qkv, arrays)


def positions(segment_ids_BT: np.ndarray) -> np.ndarray:
  """int32 [B, T]: each token's position inside its segment (a new id starts at 0), as the layers compute it."""
  B, T = segment_ids_BT.shape
  t = np.broadcast_to(np.arange(T), (B, T))
  starts = np.concatenate([np.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  return (t - np.maximum.accumulate(np.where(starts, t, 0), axis=1)).astype(np.int32)


def global_example(example: dict[str, np.ndarray], mesh, layout: str) -> dict:
  """This process's rows of a batch as global arrays on `mesh`: `lay_out_example` for the mesh's context axis
  (none: as it is), then `sharding.global_batch` ([B, T] arrays on the batch axes and `context`)."""
  from efficient_attn import sharding

  return sharding.global_batch(lay_out_example(example, dict(mesh.shape).get(AXIS, 1), layout), mesh)


def lay_out_example(example: dict[str, np.ndarray], shards: int, layout: str) -> dict[str, np.ndarray]:
  """A batch of numpy arrays in `layout` order for `shards` context devices: every [B, T, ...] array (T: the
  length of "inputs"; inputs, targets, segment_ids, weights, ...) permuted along T, others (a label per row)
  kept, plus "positions" (computed in sequence order from segment_ids, then laid out the same way) for
  RoPE. The identity (no positions added) when shards == 1."""
  if shards == 1:
    return example
  out = dict(example)
  B, T = out["inputs"].shape[:2]
  if "positions" not in out:
    seg = out.get("segment_ids")
    out["positions"] = positions(seg) if seg is not None else np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  M = shards * check_layout(layout, "lay_out_example")
  order = piece_order(shards, layout)
  for k, x in out.items():
    if x.ndim < 2 or x.shape[:2] != (B, T):
      continue
    if T % M:
      raise ValueError(f"lay_out_example: the {layout} layout over {shards} devices cuts T into {M} pieces;"
                       f" {k!r} has T={T}.")
    out[k] = np.ascontiguousarray(x.reshape(B, M, T // M, *x.shape[2:])[:, order].reshape(x.shape))
  return out


def halo(ends, axis_name, layout: str, n: int, step: int):
  """What each local piece's neighbour in the sequence sends (step −1: the piece before it, +1: after it).

  ends: {name: [B, n, h, ...]}, the h positions at the end each local piece offers (its last h for step −1,
  its first h for step +1). Returns ({name: [B, n, h, ...]}, bool [n]: whether the piece has that
  neighbour; the first and last pieces of the sequence have none and receive zeros). One
  `jax.lax.ppermute` per (sending slot, receiving slot) pair: contiguous 1; zigzag 2, as pieces
  P − 1 and P meet on shard P − 1 and need no transfer.
  """
  P = jax.lax.axis_size(axis_name)
  order = piece_order(P, layout).reshape(P, n)   # sequence position of shard s's slot j
  holder = {int(m): (s, j) for (s, j), m in np.ndenumerate(order)}
  routes: dict = {}                                      # (sending slot, receiving slot) -> [(from, to) shards]
  has = np.zeros((P, n), bool)
  for (s, j), m in np.ndenumerate(order):
    if int(m) + step in holder:
      src, i = holder[int(m) + step]
      routes.setdefault((i, j), []).append((src, s))
      has[s, j] = True
  me = jax.lax.axis_index(axis_name)
  slot = lambda i: {name: x[:, i] for name, x in ends.items()}  # noqa: E731
  got = [{name: jnp.zeros_like(x[:, 0]) for name, x in ends.items()} for _ in range(n)]
  for (i, j), pairs in routes.items():
    moved = [(a, b) for a, b in pairs if a != b]
    here = jnp.asarray(np.isin(np.arange(P), [b for _, b in pairs]))[me]
    arrived = jax.lax.ppermute(slot(i), axis_name, moved) if moved else slot(i)
    got[j] = {name: jnp.where(here, arrived[name], got[j][name]) for name in ends}
  out = {name: jnp.stack([g[name] for g in got], axis=1) for name in ends}
  return out, jnp.asarray(has)[me]
