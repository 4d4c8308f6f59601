"""The fused attention kernels that ship with JAX, and the choice among them by lowering platform.

`by_platform` stages one candidate per platform with `jax.lax.platform_dependent`: every
candidate is traced, and lowering keeps only the one for the platform it lowers for. So
`jax.export(..., platforms=["tpu"])` on a CPU host selects the TPU kernel, a GPU run never
compiles the TPU one, and no hardware is probed at trace time. The one exception is cuDNN:
jax's cuDNN wrapper cannot be traced without jax's CUDA plugin, so `cudnn_available()` asks
(never raises) and, without it, the CUDA candidate is the Triton kernel instead.

Kernels (all from the installed jax, none vendored):
- "splash" (TPU): Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`).
  The family's visibility (causal, a sliding window, a block layout) is a static per-head
  mask whose block plan (splash's MaskInfo) is built once per shape and cached
  (`splash_kernel`); segment ids and GQA go to the kernel as they are. Lengths are padded
  to a multiple of its 128-wide tiles, the padding in a segment of its own.
- "triton" (GPU): the Pallas FlashAttention-2 kernel (`jax.experimental.pallas.ops.gpu.attention`),
  any float dtype, causal and self-attention segment ids; GQA by repeating K/V heads.
- "cudnn" (GPU): `jax.nn.dot_product_attention(implementation="cudnn")`, bf16 / f16, with segment
  ids folded into its mask and rows that see no key zeroed (`cudnn_attention`).
On any other platform "splash" and "triton" run the same Pallas kernels in interpret mode:
the same numbers, slowly (for tests and debugging).

Each kernel states what it cannot do as a sentence (`splash_refusal`, `triton_refusal`,
`cudnn_refusal`); the families fall back to their XLA path when `implementation=None` and
raise that sentence when the kernel was asked for by name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from efficient_attn import platform, sharding

by_platform = platform.by_platform  # the families' dispatch, here beside the kernels it chooses among

SPLASH_TILE = 128  # splash's tiles are multiples of the TPU's 128 lanes
_PAD_ID = np.iinfo(np.int32).min  # segment id of the padding: never a user's


# ----------------------------------------------------------------------------- dispatch


@functools.cache
def cudnn_available() -> bool:
  """Whether jax's cuDNN attention can be traced here (jax's CUDA plugin is installed)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo  # its own check, which raises without the plugin
    fused_attention_stablehlo.check_cudnn_version()
    return True
  except Exception:  # noqa: BLE001 - any failure means "not here"
    return False


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# ----------------------------------------------------------------------------- splash (TPU)


def splash_refusal(T: int, S: int, *, bias=None, mask=None, dropout=False, residual=False,
                   layout=None) -> str | None:
  """Why splash cannot run this call (None when it can)."""
  if T != S:
    return f"splash needs self-attention lengths T == S, got T={T}, S={S}"
  if bias is not None:
    return "splash takes no additive bias"
  if mask is not None:
    return "splash takes no dense mask (nor query / key lengths, which become one)"
  if dropout:
    return "splash has no attention dropout"
  if residual:
    return "splash does not return the logsumexp residual with a backward pass"
  if layout is not None and not np.diagonal(layout, axis1=1, axis2=2).all():
    return "splash needs every diagonal block in the layout (a query that sees no key would not output 0)"
  return None


class _LayoutMask(splash_lib.Mask):
  """A block layout [nq, nk] of `block`-sized blocks as splash's lazy token mask [Tp, Tp].

  Causal adds the token triangle; the padding (positions >= T) sees only the padding.
  Slices are expanded on demand, so no [T, T] array is ever formed.
  """

  def __init__(self, layout: np.ndarray, block: int, T: int, Tp: int, causal: bool):
    self.layout, self.block, self.T, self.Tp, self.causal = layout, block, T, Tp, causal
    self._key = (layout.shape, layout.tobytes(), block, T, Tp, causal)

  @property
  def shape(self):
    return (self.Tp, self.Tp)

  def __getitem__(self, idx):
    rows, cols = (np.arange(*s.indices(self.Tp))[:, None] if i == 0 else np.arange(*s.indices(self.Tp))[None]
                  for i, s in enumerate(idx))
    real = (rows < self.T) & (cols < self.T)
    seen = self.layout[np.minimum(rows, self.T - 1) // self.block, np.minimum(cols, self.T - 1) // self.block]
    seen = seen & real
    if self.causal:
      seen = seen & (cols <= rows)
    return seen | ((rows >= self.T) & (cols >= self.T))

  def __eq__(self, other):
    return isinstance(other, _LayoutMask) and self._key == other._key

  def __hash__(self):
    return hash(self._key)


def splash_tile(T: int) -> int:
  """The tile splash runs at length T: the largest of 512 / 256 / 128 dividing T padded to a
  multiple of 128 (MaxText's default tile is 512)."""
  Tp = _round_up(T, SPLASH_TILE)
  return next(b for b in (512, 256, SPLASH_TILE) if Tp % b == 0)


@functools.lru_cache(maxsize=64)
def splash_kernel(T: int, num_heads: int, causal: bool, window: tuple[int, int] | None = None,
                  layout_key: tuple | None = None, interpret: bool = False):
  """The splash kernel for one static shape and visibility, built once and cached (its MaskInfo
  block plan is NumPy work proportional to the number of tiles).

  T: the unpadded length (padded to a multiple of 128 inside). window: (left, right), query t sees
  keys t - left .. t + right (right is 0 when causal). layout_key: (layout bytes, shape, block) of a
  bool [1 | N, nq, nk] block layout.
  """
  Tp = _round_up(T, SPLASH_TILE)
  if layout_key is not None:
    data, shape, block = layout_key
    layout = np.frombuffer(data, bool).reshape(shape)
    heads = [_LayoutMask(layout[h if shape[0] > 1 else 0], block, T, Tp, causal) for h in range(num_heads)]
  elif window is not None:
    left, right = window
    heads = [splash_lib.LocalMask((Tp, Tp), (left, 0 if causal else right), offset=0)] * num_heads
  elif causal:
    heads = [splash_lib.CausalMask((Tp, Tp))] * num_heads
  else:
    heads = [splash_lib.FullMask((Tp, Tp))] * num_heads
  b = splash_tile(T)
  sizes = splash_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
  with jax.ensure_compile_time_eval():  # built concretely even when first asked for inside a trace
    kernel = splash_lib.make_splash_mha(splash_lib.MultiHeadMask(heads), block_sizes=sizes, head_shards=1,
                                        q_seq_shards=1, interpret=interpret)
  # The plan as NumPy: device arrays captured across traces would become extra arguments of an
  # exported function; NumPy ones are embedded as constants in each trace.
  return jax.tree.map(np.asarray, kernel)


def xla_or_splash(fn_name: str, implementation, refusal: str | None, xla, splash):
  """The rule of the families whose kernel is splash only (local, sparse): "xla" -> `xla()`; "splash" ->
  `splash(interpret)` compiled on TPU, interpreted elsewhere (refused in one sentence when it cannot run);
  None -> splash when lowered for TPU and not refused, else xla."""
  if implementation not in (None, "xla", "splash"):
    raise ValueError(f"{fn_name}: `implementation`={implementation!r} is not one of None, 'xla', 'splash'.")
  if implementation == "splash" and refusal:
    raise ValueError(f"{fn_name}: implementation='splash': {refusal}; use None or 'xla'.")
  if implementation == "xla":
    return xla()
  compiled = lambda: splash(False)
  if implementation == "splash":
    return by_platform((), cpu=lambda: splash(True), tpu=compiled)
  return by_platform((), cpu=xla, tpu=xla if refusal else compiled)


def layout_key(layout: np.ndarray, block: int) -> tuple:
  """The hashable form of a static bool layout [h, nq, nk] for `splash_kernel`."""
  layout = np.ascontiguousarray(layout, bool)
  return (layout.tobytes(), layout.shape, int(block))


def splash_attention(query, key, value, *, causal: bool, segment_ids=None, scale: float, window=None,
                     layout=None, interpret: bool = False):
  """Softmax attention by the splash kernel. query [B, T, N, H]; key [B, T, K, H]; value [B, T, K, Hv].

  segment_ids: None or (q_ids, kv_ids) int32 [B, T]. window: (left, right) or None. layout:
  `layout_key(...)` or None. Returns [B, T, N, Hv] in the query's dtype. Under a mesh
  (`jax.set_mesh`) the kernel runs per shard (`jax.shard_map`): batch over the batch axes,
  heads over "tensor" when both N and K divide by it.
  """
  B, T, N, _ = query.shape
  Tp = _round_up(T, SPLASH_TILE)
  kernel = splash_kernel(T, N, bool(causal), None if window is None else tuple(window), layout, interpret)
  q = (query * jnp.asarray(scale, jnp.float32)).astype(query.dtype)  # splash applies no logit scale
  pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
  q_BNTH, k_BKTH, v_BKTH = (jnp.moveaxis(jnp.pad(x, pad), 1, 2) for x in (q, key, value))
  if segment_ids is None and Tp == T:
    ids = None
  else:
    q_ids, kv_ids = segment_ids if segment_ids is not None else (jnp.zeros((B, T), jnp.int32),) * 2
    ids = splash_lib.SegmentIds(*(jnp.pad(x, ((0, 0), (0, Tp - T)), constant_values=_PAD_ID) for x in (q_ids, kv_ids)))

  def run(q_BNTH, k_BKTH, v_BKTH, ids):
    return jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=i))(q_BNTH, k_BKTH, v_BKTH, ids)

  out_BNTH = _per_shard(run, q_BNTH, k_BKTH, v_BKTH, ids, head_axis=1)
  return jnp.moveaxis(out_BNTH, 1, 2)[:, :T].astype(query.dtype)


# ----------------------------------------------------------------------------- Pallas Triton (GPU)


def triton_refusal(T: int, S: int, H: int, Hv: int, *, bias=None, mask=None, dropout=False, residual=False,
                   window=None, segment_ids=None) -> str | None:
  """Why the Pallas GPU flash kernel cannot run this call (None when it can)."""
  if T != S:
    return f"the Triton kernel needs self-attention lengths T == S, got T={T}, S={S}"
  if Hv != H:
    return f"the Triton kernel needs value's head dim == key's, got Hv={Hv}, H={H}"
  if bias is not None or mask is not None:
    return "the Triton kernel takes no bias and no dense mask (nor query / key lengths)"
  if window is not None:
    return "the Triton kernel has no sliding window"
  if dropout or residual:
    return "the Triton kernel has no dropout and returns no residual"
  if segment_ids is not None and segment_ids[0] is not segment_ids[1]:
    return "the Triton kernel takes one segment-id array for queries and keys (self-attention)"
  return None


def _triton_len(T: int) -> int:
  """Triton tiles are powers of two: lengths below 128 pad to one, longer ones to a multiple of 128."""
  return _round_up(T, 128) if T > 128 else max(32, 1 << (T - 1).bit_length())


def triton_attention(query, key, value, *, causal: bool, segment_ids=None, scale: float, interpret: bool = False):
  """Softmax attention by the Pallas GPU flash kernel. query [B, T, N, H]; key / value [B, T, K, H].

  segment_ids: None or a pair of the same int32 [B, T] array. Returns [B, T, N, H] in the
  query's dtype; runs per shard under a mesh, as `splash_attention`.
  """
  B, T, N, _ = query.shape
  G = N // key.shape[2]
  if G > 1:  # head n = k·G + g reads kv head k
    key, value = (jnp.repeat(x, G, axis=2) for x in (key, value))
  Tp = _triton_len(T)
  pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (query, key, value))
  ids = None
  if segment_ids is not None or Tp != T:
    ids = segment_ids[0] if segment_ids is not None else jnp.zeros((B, T), jnp.int32)
    ids = jnp.pad(ids, ((0, 0), (0, Tp - T)), constant_values=_PAD_ID)

  def run(q, k, v, ids):
    return pallas_gpu.mha(q, k, v, ids, sm_scale=float(scale), causal=bool(causal), interpret=interpret)

  out = _per_shard(run, q, k, v, ids, head_axis=2)
  return out[:, :T].astype(query.dtype)


# ----------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_refusal(T: int, S: int, H: int, Hv: int, dtype, *, has_bias=False, dropout=False,
                  window=None, causal=False) -> str | None:
  """Why cuDNN's flash kernel cannot run this call here (None when it can): the shapes it takes on
  every GPU generation (jax checks the rest), and jax's CUDA plugin to trace it at all."""
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or H % 8 or H > 128:
    return (f"cuDNN needs bfloat16/float16 inputs and a head dim divisible by 8 up to 128, got"
            f" {jnp.dtype(dtype).name}, H={H}")
  if Hv != H or dropout:
    return f"cuDNN (as wrapped here) takes no dropout and needs value's head dim == key's, got Hv={Hv}, H={H}"
  if has_bias and (T % 2 or S % 2):
    return f"cuDNN needs even lengths with a bias, got T={T}, S={S}"
  if window is not None and not causal and window[1] != 0:
    return "cuDNN's sliding window is causal only"
  if not cudnn_available():
    return "cuDNN needs a GPU build of jax (pip install 'jax[cuda12]'); this one cannot trace it"
  return None


def cudnn_attention(query, key, value, bias, mask, seg, causal, scale, dims, window, return_residual):
  """jax.nn.dot_product_attention(implementation="cudnn") with segments folded into the mask.

  query [B, T, N, H]; key / value [B, S, K, H]; bias / mask broadcastable to [B, N, T, S]; seg None
  or (q_ids [B, T], kv_ids [B, S]); dims the call's `_common.Dims`; window jax.nn's
  `local_window_size`. Returns [B, T, N, H] in the query's dtype (and the residual [B, T, N] when
  asked). cuDNN turns a mask into a large negative bias, so a row that sees no key would
  average all values; such rows are zeroed here to keep the library's convention.
  """
  if seg is not None:
    seg_mask = (seg[0][:, None, :, None] == seg[1][:, None, None, :])
    mask = seg_mask if mask is None else mask & seg_mask.reshape((1,) * (mask.ndim - 4) + seg_mask.shape)
  if bias is not None:  # cuDNN wants full [.., T, S] bias in the query dtype
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (dims.T, dims.S)).astype(query.dtype)
  if mask is not None:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  out = jax.nn.dot_product_attention(query, key, value, bias, mask, scale=scale, is_causal=causal,
                                     local_window_size=window, implementation="cudnn",
                                     return_residual=return_residual)
  res = None
  if return_residual:
    out, res = out
  if mask is not None:
    seen = mask & jnp.tril(jnp.ones((1, 1, dims.T, dims.S), bool)) if causal else mask
    seen_BTN = jnp.broadcast_to(seen.any(-1), (dims.B, dims.N, dims.T)).transpose(0, 2, 1)
    out = jnp.where(seen_BTN[..., None], out, jnp.zeros((), out.dtype)).astype(query.dtype)
    if res is not None:
      res = jnp.where(seen_BTN, res, jnp.asarray(-jnp.inf, res.dtype))
  return out if res is None else (out, res)


# ----------------------------------------------------------------------------- sharding


def _per_shard(run, q, k, v, ids, *, head_axis: int):
  """run(q, k, v, ids) under `jax.shard_map` over the current mesh's batch (and head) axes.

  A Pallas kernel is one opaque custom call that the SPMD partitioner cannot split, so
  under a mesh each device runs it on its own shard. Without a mesh, runs it as it is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q, k, v, ids)
  batch = sharding.divisible_axes(sharding.mesh_axes(("batch",), mesh)[0], q.shape[0], mesh)
  heads = sharding.mesh_axes(("heads",), mesh)[0]
  heads = heads if all(x.shape[head_axis] % max(1, int(np.prod([mesh.shape[a] for a in heads]))) == 0
                       for x in (q, k)) else ()
  spec = [None] * 4
  spec[0], spec[head_axis] = batch or None, heads or None
  qkv_spec = jax.sharding.PartitionSpec(*spec)
  ids_spec = None if ids is None else jax.tree.map(lambda _: jax.sharding.PartitionSpec(batch or None, None), ids)
  return jax.shard_map(run, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, ids_spec), out_specs=qkv_spec,
                       check_vma=False)(q, k, v, ids)
