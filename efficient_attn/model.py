"""The decoder LM and the encoder classifier, built once from `layers.Block`.

`TransformerLM(config)` maps int tokens [B, T] to logits [B, T, V]; every
attention family and the MoE FFN are chosen by `config` (a `config.ModelConfig`).
`EncoderClassifier(config, num_classes)` maps [B, T] to class logits [B, classes]
with bidirectional attention and mean pooling over non-padding tokens.
`generate` decodes with each family's decoding state (KV cache or recurrent state).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficient_attn import attention as attention_lib
from efficient_attn import sharding as sharding_lib
from efficient_attn.attention.short_conv import init_short_conv_state
from efficient_attn.layers import Block, Projection, RMSNorm


def is_moe_layer(cfg, i: int) -> bool:
  return bool(cfg.num_experts) and (i + 1) % cfg.moe_every == 0


def period(cfg) -> int:
  """The layers after which both the families (a hybrid's pattern) and the MoE placement repeat: the unit
  `nn.scan` repeats with `scan_layers` (one compiled period, the remainder layers unrolled after it)."""
  moe = cfg.moe_every if cfg.num_experts else 1
  return math.lcm(cfg.family_period(), moe)


class _Group(nn.Module):
  """One period of blocks, each with its own layer's family (and MoE or dense FFN): what `nn.scan` repeats."""
  config: Any
  is_causal: bool = True
  mesh: Any = None
  context_layout: str = "zigzag"

  @nn.compact
  def __call__(self, x, segment_ids, positions):
    c = self.config
    for j in range(period(c)):
      x = Block(c.layer(j), is_moe_layer(c, j), self.is_causal, self.mesh, self.context_layout, name=f"block_{j}")(
          x, segment_ids, positions)
    return x, None


class _GroupDecode(nn.Module):
  config: Any
  mesh: Any = None

  @nn.compact
  def __call__(self, x, states, positions):
    c = self.config
    new = []
    for j in range(period(c)):
      x, s = Block(c.layer(j), is_moe_layer(c, j), True, self.mesh, name=f"block_{j}")(x, None, positions, states[j])
      new.append(s)
    return x, tuple(new)


class Trunk(nn.Module):
  """Embedding-free stack of L blocks, each with its layer's family (`ModelConfig.layer`), looped or, with
  `config.scan_layers`, `nn.scan`-ned over repeats of the period (`period`) with the remainder unrolled."""
  config: Any
  is_causal: bool = True
  mesh: Any = None
  context_layout: str = "zigzag"

  @nn.compact
  def __call__(self, x, segment_ids=None, positions=None, decode_states=None):
    c = self.config
    size = c.moe_every if c.num_experts else 1
    if c.num_layers % size:
      raise ValueError(f"model.num_layers={c.num_layers} must be a multiple of model.moe_every={c.moe_every}.")
    P = period(c)
    groups = c.num_layers // P if c.scan_layers else 0
    new: list = []
    if groups:
      body = _Group if decode_states is None else _GroupDecode
      if c.remat:
        body = nn.remat(body)
      axes = (nn.broadcast, nn.broadcast) if decode_states is None else (0, nn.broadcast)
      # "buffers" (the Performer's projections) stack per layer like params; split rngs: one draw each.
      scanned = nn.scan(body, variable_axes={"params": 0, "intermediates": 0, "buffers": 0},
                        split_rngs={"params": True, "dropout": True}, in_axes=axes, length=groups,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      if decode_states is None:
        x, _ = scanned(c, self.is_causal, self.mesh, self.context_layout, name="layers")(x, segment_ids, positions)
      else:
        x, stacked = scanned(c, self.mesh, name="layers")(x, tuple(decode_states[:P]), positions)
        new.extend(stacked)
    block = nn.remat(Block) if c.remat else Block
    first = groups * P
    for i in range(first, c.num_layers):  # every layer without scan_layers; the remainder after the scan
      b = block(c.layer(i), is_moe_layer(c, i % size), self.is_causal, self.mesh, self.context_layout,
                name=f"block_{i}")
      if decode_states is None:
        x = b(x, segment_ids, positions)
      else:
        x, s = b(x, None, positions, decode_states[i - first + (P if groups else 0)])
        new.append(s)
    if decode_states is None:
      return x
    return x, (tuple(new) if groups else new)


def batch_sharded(x_BTD):
  """Pins the embedded tokens to their logical sharding ("batch", "length", "embed") by the rules table.

  Batch over (data, fsdp, expert), D whole: the blocks start from the layout they keep.
  A no-op without a mesh.
  """
  return sharding_lib.constrain(x_BTD, ("batch", "length", "embed"))


class _Embed(nn.Embed):
  """nn.Embed whose table is gathered over fsdp at the lookup, as FSDP gathers every weight at use.

  Left sharded over `embed`, the lookup's gradient (a scatter-add of batch-sharded rows
  into a D-sharded table) is one XLA's SPMD partitioner cannot split: it replicated it in
  full ("Involuntary full rematerialization") on every fsdp mesh.
  """

  def __call__(self, inputs):
    table_VD = sharding_lib.constrain(jnp.asarray(self.embedding, self.dtype), ("vocab", None))
    return jnp.take(table_VD, inputs, axis=0)


def _embedding(cfg, dtype, name=None):
  table = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
  return _Embed(cfg.vocab_size, cfg.d_model, embedding_init=table, dtype=dtype, name=name)


class TransformerLM(nn.Module):
  """Decoder-only LM: tokens [B, T] -> logits [B, T, V] (float32).

  `segment_ids` [B, T] keep packed documents apart (attention and rotary
  positions restart per segment). `mesh` enables expert parallelism in MoE layers.
  Context parallelism (a mesh with a `context` axis, `jax.set_mesh`): tokens, segment ids and
  `positions` [B, T] come in `context_layout` order (`attention.context.lay_out_example`) and
  the logits go out in it.
  With `config.dropout` > 0, residual dropout is on when `apply` gets a "dropout" rng
  (training) and off otherwise (evaluation, `generate`).
  `decode` runs one token with per-layer decoding states (see `generate`).
  """
  config: Any
  mesh: Any = None
  context_layout: str = "zigzag"

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.embed = _embedding(c, dtype)
    self.trunk = Trunk(c, True, self.mesh, self.context_layout)
    self.final_norm = RMSNorm(dtype=dtype)
    self.unembed = Projection((c.vocab_size,), ("embed", "vocab"), dtype=jnp.float32)

  def __call__(self, tokens_BT, segment_ids=None, positions=None):
    x = self.trunk(batch_sharded(self.embed(tokens_BT)), segment_ids, positions)
    return self.unembed(self.final_norm(x))

  def decode(self, token_B1, position_B1, states):
    """One decoding step: (logits [B, 1, V], new states). `states` from `init_decode_states`."""
    x, states = self.trunk(self.embed(token_B1), None, position_B1, states)
    return self.unembed(self.final_norm(x)), states


def init_decode_states(cfg, batch: int, max_len: int):
  """Per-layer decoding states, each of its layer's family (a KV cache, a window ring buffer, a recurrent
  state): a list, or with scan_layers a tuple of one period's states stacked over its repeats along a
  leading axis, followed by the remainder layers' own."""
  import dataclasses

  H = cfg.d_model // cfg.num_heads
  K = cfg.num_kv_heads or cfg.num_heads

  def one(layer):
    options = layer.options
    kw = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    kw.update(layer.family.call_kwargs(options, attention_lib.Shape(1, 1, cfg.num_heads, K, H, True)))
    state = attention_lib.init_decode_state(layer.attention, batch, K, H, max_len=max_len, **kw)
    k = layer.conv_kernel
    if not k:
      return state
    conv = {"q": init_short_conv_state(batch, k, cfg.num_heads * H), "k": init_short_conv_state(batch, k, K * H),
            "v": init_short_conv_state(batch, k, K * H)}
    return (state, conv)

  layers = cfg.layer_configs()
  P = period(cfg)
  groups = cfg.num_layers // P if cfg.scan_layers else 0
  if not groups:
    return [one(layer) for layer in layers]
  stack = lambda *xs: jnp.stack(xs)  # noqa: E731
  stacked = tuple(jax.tree.map(stack, *[one(layers[j]) for _ in range(groups)]) for j in range(P))
  return stacked + tuple(one(layer) for layer in layers[groups * P:])


def decode_state_bytes(cfg, batch: int, max_len: int) -> dict:
  """Memory of the decoding states (`init_decode_states`) of model config `cfg` for `batch` sequences of up to
  `max_len` tokens, without allocating them: {"total": bytes, "per_family": {family: bytes}}. A KV cache grows
  with max_len, a local window's ring buffer and a recurrent state do not (tests/test_hybrid.py)."""
  per_family: dict = {}  # family -> [its layer config, layers]
  for layer in cfg.layer_configs():
    per_family.setdefault(layer.attention, [layer, 0])[1] += 1
  out = {}
  for family, (layer, count) in per_family.items():  # one layer's shapes per family, times its layers
    one = dataclasses.replace(layer, num_layers=1, scan_layers=False)
    shapes = jax.eval_shape(lambda: init_decode_states(one, batch, max_len))
    out[family] = count * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  return {"total": sum(out.values()), "per_family": out}


def as_variables(params_or_variables) -> dict:
  """{"params": ...[, "buffers": ...]}: accepts a model's variables or its bare params."""
  tree = params_or_variables
  return dict(tree) if "params" in tree else {"params": tree}


def generate(model: TransformerLM, params, prompt_BT, num_new: int, *, temperature: float = 0.0, rng=None):
  """Feeds the prompt token by token, then samples `num_new` tokens (greedy at temperature 0).

  `params`: the model's variables ({"params", "buffers"}) or its bare params (a family with
  buffers, the Performer, needs the variables).

  Returns (tokens [B, T + num_new], logits [B, T + num_new - 1, V]): logits[:, t]
  is the prediction made after reading token t, so it can be compared with the
  parallel forward on the same tokens.
  """
  B, T = prompt_BT.shape
  total = T + num_new
  states = init_decode_states(model.config, B, total)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  variables = as_variables(params)

  @jax.jit
  def step(carry, t):
    tokens, states, rng = carry
    tok = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    logits, states = model.apply(variables, tok, jnp.full((B, 1), t), states, method=TransformerLM.decode)
    rng, sub = jax.random.split(rng)
    nxt = (jnp.argmax(logits[:, 0], -1) if temperature == 0.0
           else jax.random.categorical(sub, logits[:, 0] / temperature))
    keep = jax.lax.dynamic_slice_in_dim(tokens, t + 1, 1, axis=1)[:, 0]
    nxt = jnp.where(t + 1 < T, keep, nxt).astype(tokens.dtype)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], t + 1, axis=1)
    return (tokens, states, rng), logits[:, 0]

  tokens = jnp.zeros((B, total), prompt_BT.dtype).at[:, :T].set(prompt_BT)
  (tokens, _, _), logits = jax.lax.scan(step, (tokens, states, rng), jnp.arange(total - 1))
  return tokens, jnp.swapaxes(logits, 0, 1)


class EncoderClassifier(nn.Module):
  """Bidirectional encoder for sequence classification (e.g. ListOps): tokens [B, T] -> logits [B, classes].

  Padding is segment id 0: padded tokens neither attend to nor are attended by
  real ones, and the mean pool ignores them. Context parallelism as `TransformerLM` (tokens, segment
  ids and `positions` in `context_layout` order; the pool does not depend on the order).
  """
  config: Any
  num_classes: int
  mesh: Any = None
  context_layout: str = "zigzag"

  @nn.compact
  def __call__(self, tokens_BT, segment_ids=None, positions=None):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    x = _embedding(c, dtype, "embed")(tokens_BT)
    x = Trunk(c, False, self.mesh, self.context_layout, name="trunk")(x, segment_ids, positions)
    x = RMSNorm(dtype=dtype, name="final_norm")(x).astype(jnp.float32)
    w = jnp.ones(tokens_BT.shape, jnp.float32) if segment_ids is None else (segment_ids > 0).astype(jnp.float32)
    pooled = jnp.sum(x * w[..., None], 1) / jnp.maximum(jnp.sum(w, 1, keepdims=True), 1.0)
    head = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab"))
    return nn.Dense(self.num_classes, kernel_init=head, dtype=jnp.float32, name="head")(pooled)
