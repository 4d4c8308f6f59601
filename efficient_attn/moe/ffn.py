"""`moe_ffn`: the mixture-of-experts feed-forward layer as one pure function.

Steps (each a pure function in router.py / dispatch.py / gmm.py / parallel.py):
  1. router: logits_GSE = x @ router in float32 (+ jitter), probs = softmax.
  2. route (`router.ROUTES[router, dropless]`): tokens pick their top-k experts
     (Switch / GShard) into capacity slots (`Slots`, tokens over capacity dropped) or,
     dropless, as (expert, gate) pairs (`Pairs`); or experts pick their top-C tokens
     (expert choice, `Slots`).
  3. experts, by the record's type: slots -> one batched matmul per weight; pairs -> a
     counting sort by expert and a grouped matmul; with a mesh, on the devices that hold
     them, tokens moved by all-to-all.
  4. combine: each token's outputs weighted by its gates; + the shared expert, if any.

A token group is one sequence (G = B, S = T): capacity is per sequence, so the result
does not depend on the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp

from efficient_attn.moe import dispatch, gmm, parallel, router as routing

ROUTERS = tuple(dict.fromkeys(name for name, _ in routing.ROUTES))  # ("tokens_choose", "experts_choose")
ACTIVATIONS = {
    "gelu": jax.nn.gelu,  # tanh approximation, as flax / T5X
    "gelu_exact": partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
EXPERT_KEYS = ("w_in", "w_out", "w_gate")
SHARED_KEYS = ("shared_w_in", "shared_w_out", "shared_w_gate")
AUX_RANKS = {"expert_fraction": 1}  # rank of each aux entry of one layer; the others are scalars


def resolve_activation(activation, fn: str = "moe_ffn"):
  if callable(activation):
    return activation
  if activation not in ACTIVATIONS:
    raise ValueError(f"{fn}: `activation`={activation!r} is unknown; use one of {sorted(ACTIVATIONS)} or a callable.")
  return ACTIVATIONS[activation]


def _shape(params, key):
  return tuple(getattr(params[key], "shape", ()))


def check_params(params, d_model: int, fn: str = "moe_ffn"):
  """Validates the params dict against x's model dim D; returns (E, F)."""
  if not isinstance(params, Mapping):
    raise ValueError(f"{fn}: `params` must be a dict with 'router', 'w_in', 'w_out', got {type(params).__name__}.")
  allowed = ("router",) + EXPERT_KEYS + SHARED_KEYS
  for key in params:
    if key not in allowed:
      raise ValueError(f"{fn}: `params` has an unknown key {key!r}; valid keys are {list(allowed)}.")
  for key in ("router", "w_in", "w_out"):
    if key not in params:
      raise ValueError(f"{fn}: `params` lacks {key!r}; it needs 'router' [D, E], 'w_in' [E, D, F], 'w_out' [E, F, D].")
  if len(_shape(params, "router")) != 2 or _shape(params, "router")[0] != d_model:
    raise ValueError(f"{fn}: params['router'] must have shape [D, E] with D={d_model}, got {list(_shape(params, 'router'))}.")
  E = _shape(params, "router")[1]
  w_in = _shape(params, "w_in")
  if len(w_in) != 3 or w_in[:2] != (E, d_model):
    raise ValueError(f"{fn}: params['w_in'] must have shape [E, D, F] = [{E}, {d_model}, F], got {list(w_in)}.")
  F = w_in[2]
  expected = {"w_out": (E, F, d_model), "w_gate": (E, d_model, F)}
  for key, shape in expected.items():
    if key in params and _shape(params, key) != shape:
      raise ValueError(f"{fn}: params[{key!r}] must have shape {list(shape)} (E, D, F from 'router' and 'w_in'),"
                       f" got {list(_shape(params, key))}.")
  if any(k in params for k in SHARED_KEYS):
    if "shared_w_in" not in params or "shared_w_out" not in params:
      raise ValueError(f"{fn}: a shared expert needs both 'shared_w_in' [D, F_shared] and 'shared_w_out' [F_shared, D].")
    s_in = _shape(params, "shared_w_in")
    if len(s_in) != 2 or s_in[0] != d_model:
      raise ValueError(f"{fn}: params['shared_w_in'] must have shape [D, F_shared] with D={d_model}, got {list(s_in)}.")
    shared = {"shared_w_out": (s_in[1], d_model), "shared_w_gate": s_in}
    for key, shape in shared.items():
      if key in params and _shape(params, key) != shape:
        raise ValueError(f"{fn}: params[{key!r}] must have shape {list(shape)}, got {list(_shape(params, key))}.")
  return E, F


def check_options(num_experts, *, top_k, capacity_factor, router, dropless, jitter, fn="moe_ffn"):
  names = list(dict.fromkeys(name for name, _ in routing.ROUTES))  # ROUTERS + any registered since
  if router not in names:
    raise ValueError(f"{fn}: `router`={router!r} is unknown; use one of {names}.")
  if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
    raise ValueError(f"{fn}: `top_k`={top_k!r} must be an integer in [1, num_experts={num_experts}].")
  if not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
    raise ValueError(f"{fn}: `capacity_factor`={capacity_factor!r} must be a number > 0 (1.0-2.0 is typical).")
  if (router, bool(dropless)) not in routing.ROUTES:  # experts choose a fixed number of tokens: no dropless form
    valid = [name for name, d in routing.ROUTES if d == bool(dropless)]
    raise ValueError(f"{fn}: `dropless`={dropless!r} works with router in {valid}, not router={router!r}.")
  if not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
    raise ValueError(f"{fn}: `jitter`={jitter!r} must be a number in [0, 1) (Switch uses 0.01).")


def shared_expert(x_BTD, params, act):
  """The always-on shared expert (DeepSeekMoE): a dense MLP every token goes through, unweighted."""
  B, T, D = x_BTD.shape
  weights = {k.removeprefix("shared_"): params[k] for k in SHARED_KEYS if k in params}
  return gmm.expert_mlp(x_BTD.reshape(B * T, D), weights, act).reshape(B, T, D)


def run_experts(x_GSD, routed, experts, act, mesh=None, expert_axis: str = "expert"):
  """The experts on routed tokens, by the record's type (float32 [G, S, D]).

  `routing.Slots`: capacity slots, one batched matmul per weight; `routing.Pairs`: dropless,
  a counting sort and a grouped matmul. With `mesh`, experts sharded over `expert_axis`.
  """
  if isinstance(routed, routing.Slots):
    if mesh is None:
      return dispatch.capacity_experts(x_GSD, routed.token_GEC, routed.gate_GEC, experts, act)
    return parallel.sharded_capacity_experts(x_GSD, routed.token_GEC, routed.gate_GEC, experts, act, mesh,
                                             expert_axis)
  if isinstance(routed, routing.Pairs):
    if mesh is None:
      return dispatch.dropless_experts(x_GSD, routed.expert_GSk, routed.gate_GSk, experts, act)
    return parallel.sharded_dropless_experts(x_GSD, routed.expert_GSk, routed.gate_GSk, experts, act, mesh,
                                             expert_axis)
  raise TypeError(f"run_experts: a router returned {type(routed).__name__}; expected router.Slots or router.Pairs.")


def moe_ffn(x_BTD, params, *, top_k: int = 1, capacity_factor: float = 1.25,
            router: str = "tokens_choose", dropless: bool = False, jitter: float = 0.0,
            rng=None, activation="gelu", mesh=None, expert_axis: str = "expert"):
  """Mixture-of-experts feed-forward layer: y_BTD, aux = moe_ffn(x_BTD, params).

  Args:
    x_BTD: tokens [B, T, D]. Each sequence is one routing group (capacity per sequence).
    params: {"router": [D, E], "w_in": [E, D, F], "w_out": [E, F, D]}, optionally
      "w_gate" [E, D, F] (GLU experts: act(x @ w_gate) ⊙ (x @ w_in)) and a shared expert
      every token also goes through, unweighted: "shared_w_in" [D, Fs], "shared_w_out"
      [Fs, D], optionally "shared_w_gate" [D, Fs].
    top_k: experts per token (tokens choose), or the capacity multiplier (experts choose).
      1 = Switch: output scaled by the router probability; > 1: the k probabilities are
      renormalised to sum to 1.
    capacity_factor: C = ceil(capacity_factor · T · top_k / E) slots per expert and
      sequence; a (token, choice) past them is dropped (output 0, the residual carries it).
    router: "tokens_choose" or "experts_choose" (each expert takes its top-C tokens).
    dropless: no capacity, no drops: counting sort by expert + grouped matmul.
    jitter, rng: multiplicative router-input noise in [1-jitter, 1+jitter] (only with rng).
    activation: "gelu" (tanh), "gelu_exact", "relu", "silu"/"swish", or a callable.
    mesh, expert_axis: with a mesh, experts are sharded over `expert_axis` and tokens
      move by all-to-all (see parallel.py); equal to the single-device result.

  Returns:
    y_BTD in x's dtype, and aux: {"load_balancing_loss", "router_z_loss",
    "dropped_fraction", "expert_fraction" [E], "router_entropy", "router_confidence"}
    (see `router.router_aux`). A typical loss adds 0.01 · load_balancing_loss +
    0.001 · router_z_loss.

  Cost: O(B·T·D·E) routing + O(B·T·k·D·F) experts (× capacity_factor on the capacity path).
  Papers: Switch Transformer (Fedus et al. 2021), GShard (Lepikhin et al. 2020), ST-MoE
  (Zoph et al. 2022), expert choice (Zhou et al. 2022), MegaBlocks (Gale et al. 2022).
  """
  fn = "moe_ffn"
  if getattr(x_BTD, "ndim", None) != 3:
    raise ValueError(f"{fn}: `x_BTD` must have rank 3 [B, T, D], got shape {getattr(x_BTD, 'shape', None)}.")
  B, _, D = x_BTD.shape
  E, _ = check_params(params, D, fn)
  check_options(E, top_k=top_k, capacity_factor=capacity_factor, router=router, dropless=dropless,
                jitter=jitter, fn=fn)
  act = resolve_activation(activation, fn)
  if mesh is not None:
    parallel.check_mesh(mesh, expert_axis, num_experts=E, batch=B, fn=fn)
  experts = {k: params[k] for k in EXPERT_KEYS if k in params}

  logits_GSE = routing.router_logits(x_BTD, params["router"], jitter=jitter, rng=rng)
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  route = routing.ROUTES[router, bool(dropless)]
  routed = route(probs_GSE, top_k=top_k, capacity_factor=capacity_factor)
  y_BTD = run_experts(x_BTD, routed, experts, act, mesh, expert_axis)
  if "shared_w_in" in params:
    y_BTD = y_BTD + shared_expert(x_BTD, params, act).astype(jnp.float32)
  aux = routing.router_aux(logits_GSE, probs_GSE, routed.expert_GSk, routed.dropped_fraction)
  return y_BTD.astype(x_BTD.dtype), aux


def flops_per_token(d_model: int, hidden_dim: int, num_experts: int, *, top_k: int = 1,
                    capacity_factor: float | None = None, tokens_per_group: int | None = None,
                    glu: bool = False, shared_hidden_dim: int = 0) -> dict:
  """Forward FLOPs per token of one MoE layer (× 3 for forward + backward).

  "ideal": router + top_k experts + shared expert. "executed": what the capacity path
  really multiplies: E·C / S expert slots per token (padding included), when
  `capacity_factor` and `tokens_per_group` are given; else = ideal (dropless).
  """
  per_expert = (6 if glu else 4) * d_model * hidden_dim
  shared = (6 if glu else 4) * d_model * shared_hidden_dim
  router = 2 * d_model * num_experts
  ideal = router + top_k * per_expert + shared
  slots = top_k
  if capacity_factor is not None and tokens_per_group:
    C = dispatch.expert_capacity(tokens_per_group, num_experts, top_k, capacity_factor)
    slots = num_experts * C / tokens_per_group
  return {"ideal": float(ideal), "executed": float(router + slots * per_expert + shared)}


def collect_aux(tree) -> dict:
  """Averages every "moe_aux" dict sown by `layers.MoEFeedForward` in a collection tree.

  E.g. `_, state = model.apply(variables, x, mutable=["intermediates"])`, then
  `collect_aux(state["intermediates"])` -> {"load_balancing_loss": mean over layers, ...};
  {} when the model has no MoE layer.
  """
  found = []

  def walk(node):
    if isinstance(node, Mapping):
      for key, value in node.items():
        if key == "moe_aux":
          found.extend(value if isinstance(value, (tuple, list)) else [value])
        else:
          walk(value)

  walk(tree)
  if not found:
    return {}

  def per_layer(name, x):  # nn.scan stacks the layers it runs along leading axes: [..., *entry shape]
    rank = AUX_RANKS.get(name, 0)
    return x.reshape(-1, *x.shape[x.ndim - rank:])

  return {k: jnp.mean(jnp.concatenate([per_layer(k, aux[k]) for aux in found]), axis=0) for k in found[0]}
